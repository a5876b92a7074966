"""CryojaxOperator (cryojax's image model behind the engine's operator interface) against
CryoEMOperator: the same images, likelihoods and KL velocities on AdK (C-alpha, 64 px, 2 A/px).

Measured here (relative L2 of noise-free images, 3 random nuisances with astigmatism and
5 A shifts): default integrator 4.5e-4 to 5.7e-4 (C-alpha), 2.0e-4 to 2.4e-4 (all-atom);
fastest (``suggest_n_spread``) 3.6e-3 to 4.1e-3 (C-alpha), 2.2e-3 to 2.4e-3 (all-atom).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("cryojax.simulator")

from cryosip.cryoem.image_model import ImageModel, NuisancePrior  # noqa: E402
from cryosip.pipeline.cryojax_operator import CryojaxOperator  # noqa: E402
from cryosip.pipeline.operator import CryoEMOperator  # noqa: E402
from cryosip.sip.discrepancies import KL  # noqa: E402
from cryosip.sip.measure import ParticleMeasure  # noqa: E402
from cryosip.sip.operator import Observations  # noqa: E402

BOX, PIXEL, SIGMA = 64, 2.0, 0.02


@pytest.fixture(scope="module")
def setup():
    from cryosip.data.adk import adk_model

    model = adk_model(ca_only=True)
    prior = NuisancePrior(shift_sd_in_angstroms=5.0, astigmatism_sd_in_angstroms=400.0)
    ours = CryoEMOperator(model, ImageModel.for_atoms(BOX, PIXEL, model.atoms), SIGMA, prior)

    @eqx.filter_jit
    def draw(op, key):  # one compiled call (eager dispatch of the sampler is slow)
        k_nu, k_th, k_y = jax.random.split(key, 3)
        nu = op.sample_nuisance(k_nu, 3)
        theta = jax.random.uniform(k_th, (3, 1))
        return nu, theta, op.sample(k_y, theta, nu)

    nu, theta, y = draw(ours, jax.random.key(0))
    return model, prior, ours, nu, theta, Observations(y, nu)


_means = eqx.filter_jit(lambda op, theta, nu: op.means(theta, nu))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=(-2, -1)) / np.linalg.norm(b, axis=(-2, -1))


@pytest.mark.parametrize("integrator, tol", [("default", 1e-3), ("fastest", 1e-2)])
def test_mean_agrees_with_cryosip(setup, integrator, tol):
    model, prior, ours, nu, theta, _ = setup
    cj = CryojaxOperator(model, BOX, PIXEL, SIGMA, prior, integrator=integrator)
    rel = _rel(_means(ours, theta, nu), _means(cj, theta, nu))
    assert np.all(rel < tol), rel
    if integrator == "fastest":
        assert isinstance(cj.n_spread, (int, tuple))


def test_kl_log_likelihoods_and_velocities_agree(setup):
    model, prior, ours, _, _, obs = setup
    cj = CryojaxOperator(model, BOX, PIXEL, SIGMA, prior)
    pos = jnp.array([[0.1], [0.45], [0.8]])

    @eqx.filter_jit
    def evaluate(op):
        ll = op.log_likelihood_matrix(pos, obs)
        val, g = jax.value_and_grad(lambda p: KL()(None, op, ParticleMeasure(p), obs))(pos)
        return ll, val, g

    ll_a, kl_a, g_a = evaluate(ours)
    ll_b, kl_b, g_b = evaluate(cj)
    # the log-likelihoods are ~1e4 (the Gaussian normaliser at sigma = 0.02); what the flow sees
    # are the differences between particles, 10-30 nats here, which agree to ~1e-2 nats
    d_a = np.asarray(ll_a - ll_a[:, :1])
    d_b = np.asarray(ll_b - ll_b[:, :1])
    np.testing.assert_allclose(d_a, d_b, rtol=0, atol=0.05)
    np.testing.assert_allclose(np.asarray(ll_a), np.asarray(ll_b), rtol=1e-5)
    np.testing.assert_allclose(float(kl_a), float(kl_b), rtol=1e-4)
    assert np.isfinite(np.asarray(g_b)).all()
    a, b = np.asarray(g_a).ravel(), np.asarray(g_b).ravel()
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.999
