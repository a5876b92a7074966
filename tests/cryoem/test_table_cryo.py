"""The tabulated path against direct simulation on the cryo-EM operator (AdK C-alpha, small box)."""

import jax
import jax.numpy as jnp
import numpy as np

from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.data.adk import adk_model
from cryosip.data.distributions import make_distribution
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.pipeline.simulate import simulate_dataset
from cryosip.sip.discrepancies import KL
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.table import TabulatedOperator


def test_table_matches_direct_on_adk():
    model = adk_model(ca_only=True)
    op = CryoEMOperator(
        model,
        ImageModel.for_atoms(32, 3.0, model.atoms),
        1.0,
        NuisancePrior(shift_sd_in_angstroms=2.0),
    )
    sim = simulate_dataset(
        jax.random.key(0), op, make_distribution("bimodal", model.lower, model.upper), 24, snr=0.05
    )
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


def test_flat_pair_batches_equal_per_pair_rendering():
    """pair_means / log_likelihood_matrix / paired_sq_distances render all (image, particle)
    pairs as one flat batch, in chunks: they must equal rendering each pair on its own."""
    model = adk_model(ca_only=True)
    op = CryoEMOperator(
        model,
        ImageModel.for_atoms(32, 3.0, model.atoms),
        0.05,
        NuisancePrior(shift_sd_in_angstroms=2.0),
    )
    nu = op.sample_nuisance(jax.random.key(2), 5)
    theta = jnp.array([[0.1], [0.45], [0.9]])
    y = op.sample(jax.random.key(3), jnp.full((5, 1), 0.5), nu)
    from cryosip.sip.operator import Observations

    obs = Observations(y, nu)
    ref = np.stack(
        [
            [
                np.asarray(op.mean(theta[i], jax.tree_util.tree_map(lambda a: a[n], nu)))
                for i in range(3)
            ]
            for n in range(5)
        ]
    )
    np.testing.assert_allclose(
        np.asarray(op.pair_means(theta, nu)), ref, rtol=0, atol=2e-5 * np.abs(ref).max()
    )  # float32, other summation order
    ll_ref = np.array(
        [
            [float(op.noise.log_likelihood(y[n], jnp.asarray(ref[n, i]))) for i in range(3)]
            for n in range(5)
        ]
    )
    for bs in (None, 2):  # one chunk, and chunks of 2 (last one padded)
        np.testing.assert_allclose(
            np.asarray(op.log_likelihood_matrix(theta, obs, batch_size=bs)), ll_ref, rtol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(op.paired_means(theta, obs, batch_size=bs)),
            ref,
            atol=2e-5 * np.abs(ref).max(),
        )
        dy, dmm = op.paired_sq_distances(theta, obs, batch_size=bs)
        np.testing.assert_allclose(
            np.asarray(dy), ((ref - np.asarray(y)[:, None]) ** 2).sum((-1, -2)), rtol=1e-4
        )
        np.testing.assert_allclose(
            np.asarray(dmm),
            ((ref[:, :, None] - ref[:, None]) ** 2).sum((-1, -2)),
            rtol=1e-3,
            atol=1e-6 * (ref**2).sum((-1, -2)).max(),
        )


def test_profiled_scale_table_matches_direct_for_kl_and_paired_distances():
    """With the per-image scale and offset profiled (the default), the tabulated and the direct
    path agree on the log-likelihoods and on the paired squared distances the paired MMD uses,
    on images with a per-image amplitude in U(0.5, 1.5) and an offset."""
    model = adk_model(ca_only=True)
    base = CryoEMOperator(
        model,
        ImageModel.for_atoms(32, 3.0, model.atoms),
        1.0,
        NuisancePrior(shift_sd_in_angstroms=2.0),
        fit_scale=True,
    )
    sim = simulate_dataset(
        jax.random.key(3), base, make_distribution("bimodal", model.lower, model.upper), 24, snr=0.1
    )
    amp = np.random.default_rng(0).uniform(0.5, 1.5, 24)[:, None, None]
    obs = sim.stack.observations()
    obs = eqx_replace_values(obs, obs.values * amp + 0.3 * sim.sigma)
    op = base.with_sigma(sim.sigma)
    assert op.fit_scale
    tab = TabulatedOperator.build(op, obs, n_nodes=33)
    pos = jax.random.uniform(jax.random.key(1), (10, 1))
    d = np.asarray(op.log_likelihood_matrix(pos, obs))
    t = np.asarray(tab.log_likelihood_matrix(pos, tab.observations()))
    d, t = d - d.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    np.testing.assert_allclose(t, d, atol=0.02 * np.abs(d).max() + 0.05)
    dy_d, dmm_d = (np.asarray(x) for x in op.paired_sq_distances(pos, obs))
    dy_t, dmm_t = (np.asarray(x) for x in tab.paired_sq_distances(pos, tab.observations()))
    np.testing.assert_allclose(dy_t, dy_d, rtol=2e-3)
    np.testing.assert_allclose(dmm_t, dmm_d, rtol=0.02, atol=0.02 * dmm_d.max())
    # the profile takes the amplitude out: the per-pair residual is that of the unit-scale image
    assert np.all(
        dy_d
        <= np.sum((obs.values - obs.values.mean((1, 2), keepdims=True)) ** 2, (1, 2))[:, None]
        + 1e-3
    )


def eqx_replace_values(obs, values):
    from cryosip.sip.operator import Observations

    return Observations(values, obs.nuisance, obs.index, obs.weight)
