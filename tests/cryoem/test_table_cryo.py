"""The tabulated path against direct simulation on the cryo-EM operator (AdK C-alpha, small box)."""

import jax
import jax.numpy as jnp
import numpy as np

from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.cryoem.operator import CryoEMOperator
from cryosip.cryoem.simulate import simulate_dataset
from cryosip.data.adk import adk_model
from cryosip.data.distributions import make_distribution
from cryosip.sip.discrepancies import KL
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.table import TabulatedOperator


def test_table_matches_direct_on_adk():
    model = adk_model(ca_only=True)
    op = CryoEMOperator(model, ImageModel.for_atoms(32, 3.0, model.atoms), 1.0, NuisancePrior(shift_sd_in_angstroms=2.0))
    sim = simulate_dataset(jax.random.key(0), op, make_distribution("bimodal", model.lower, model.upper), 24, snr=0.05)
    op = op.with_sigma(sim.sigma)
    obs = sim.stack.observations()
    tab = TabulatedOperator.build(op, obs, n_nodes=33)
    pos = jax.random.uniform(jax.random.key(1), (12, 1))
    direct = np.asarray(op.log_likelihood_matrix(pos, obs))
    tabbed = np.asarray(tab.log_likelihood_matrix(pos, tab.observations()))
    # log-likelihood differences across theta are what the flow sees: compare after removing each row's mean
    d = direct - direct.mean(1, keepdims=True)
    t = tabbed - tabbed.mean(1, keepdims=True)
    np.testing.assert_allclose(t, d, atol=0.02 * np.abs(d).max() + 0.05)
    # and so are the gradients that move the particles
    g_direct = jax.grad(lambda p: KL()(None, op, ParticleMeasure(p), obs))(pos)
    g_tab = jax.grad(lambda p: KL()(None, tab, ParticleMeasure(p), tab.observations()))(pos)
    cos = float(jnp.vdot(g_direct, g_tab) / (jnp.linalg.norm(g_direct) * jnp.linalg.norm(g_tab)))
    assert cos > 0.99, cos
