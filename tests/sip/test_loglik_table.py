"""LogLikTableOperator: a tabulated, Catmull-Rom-interpolated log-likelihood against direct evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryosip.sip import dto
from cryosip.sip.discrepancies import KL, GaussianKernel, PairedMMD
from cryosip.sip.examples import DecayOperator
from cryosip.sip.loglik_table import LogLikTableOperator
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.operator import Observations


@pytest.fixture(scope="module")
def decay():
    """60 decay curves (noise 0.1) with known amplitudes, rates from two clusters."""
    op = DecayOperator(sigma=0.1)
    k = jax.random.split(jax.random.key(0), 3)
    theta = jnp.where(jax.random.bernoulli(k[0], 0.6, (60,)), 0.8, 2.0)[:, None]
    nu = op.sample_nuisance(k[1], 60)
    obs = Observations(op.sample(k[2], theta, nu), nu)
    return op, obs, LogLikTableOperator.build(op, obs, n_nodes=97)


def test_table_is_exact_at_the_nodes(decay):
    op, obs, tab = decay
    nodes = tab.nodes[:, None]
    direct = np.asarray(op.log_likelihood_matrix(nodes, obs))
    got = np.asarray(tab.log_likelihood_matrix(nodes, tab.observations()))
    # float32 log-likelihoods of size ~10: a few ulps
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-4)


def test_interpolation_matches_direct_evaluation_between_nodes(decay):
    op, obs, tab = decay
    theta = jax.random.uniform(jax.random.key(1), (200, 1), minval=0.1, maxval=3.0)
    direct = np.asarray(op.log_likelihood_matrix(theta, obs))
    got = np.asarray(tab.log_likelihood_matrix(theta, tab.observations()))
    spread = np.ptp(direct, axis=1, keepdims=True)  # each curve's log-likelihood spans 50-350 nats
    assert spread.min() > 30
    # where the posterior lives (within 20 nats of each curve's best rate): errors below 0.05 nats
    near = direct > direct.max(axis=1, keepdims=True) - 20
    assert near.sum() > 500
    np.testing.assert_allclose(got[near], direct[near], rtol=0, atol=5e-2)
    # in the far tails the log-likelihood bends fast (rates where the curve is all wrong): a few
    # percent of its range, irrelevant once exponentiated
    assert np.all(np.abs(got - direct) < 0.05 * spread)


def test_rows_follow_the_observation_index(decay):
    op, obs, tab = decay
    idx = jnp.array([5, 3, 41])
    sub = tab.observations().take(idx)
    np.testing.assert_allclose(
        np.asarray(tab.log_likelihood_matrix(tab.nodes[[7, 70], None], sub)),
        np.asarray(op.log_likelihood_matrix(tab.nodes[[7, 70], None], obs.take(idx))),
        rtol=0,
        atol=1e-4,
    )


def test_kl_and_its_gradient_match_the_direct_operator(decay):
    op, obs, tab = decay
    m = ParticleMeasure(
        jnp.array([[0.55], [0.83], [1.31], [1.95], [2.4]]),
        jnp.log(jnp.array([0.3, 0.3, 0.1, 0.2, 0.1])),
    )
    f_tab = jax.jit(
        jax.value_and_grad(
            lambda p: KL()(None, tab, ParticleMeasure(p, m.log_weights), tab.observations())
        )
    )
    f_dir = jax.jit(
        jax.value_and_grad(lambda p: KL()(None, op, ParticleMeasure(p, m.log_weights), obs))
    )
    (v_tab, g_tab), (v_dir, g_dir) = f_tab(m.positions), f_dir(m.positions)
    np.testing.assert_allclose(float(v_tab), float(v_dir), rtol=0, atol=1e-3)
    g_tab, g_dir = np.asarray(g_tab), np.asarray(g_dir)
    assert np.all(np.isfinite(g_tab))
    # the interpolant's derivative: first-order accurate in the spacing (1e-2 of a gradient of size ~1)
    np.testing.assert_allclose(g_tab, g_dir, rtol=0, atol=0.05 * np.abs(g_dir).max())


def test_gradient_matches_finite_differences(decay, x64):
    _, obs, tab32 = decay
    tab = LogLikTableOperator(np.asarray(tab32.table, np.float64), tab32.lower, tab32.upper)
    tab = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if isinstance(a, jax.Array) else a, tab
    )
    pos = jnp.array([[0.61], [1.27], [2.05]], jnp.float64)
    lw = jnp.log(jnp.array([0.5, 0.2, 0.3], jnp.float64))
    f = jax.jit(lambda p: KL()(None, tab, ParticleMeasure(p, lw), tab.observations()))
    g = np.asarray(jax.jit(jax.grad(f))(pos))
    d = np.asarray(jax.random.normal(jax.random.key(2), pos.shape, jnp.float64))
    eps = 1e-5
    fd = (float(f(pos + eps * d)) - float(f(pos - eps * d))) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-6, atol=1e-9)


def test_em_weights_on_the_table_match_em_on_the_direct_operator(decay):
    op, obs, tab = decay
    nodes = np.linspace(0.1, 3.0, 30)
    w_tab, _ = dto.em_weights(dto.loglik_on_nodes(tab, tab.observations(), nodes))
    w_dir, _ = dto.em_weights(dto.loglik_on_nodes(op, obs, nodes))
    np.testing.assert_allclose(w_tab, w_dir, rtol=0, atol=2e-3)
    # the recovered mixture puts ~60% of the mass near 0.8 and ~40% near 2.0
    np.testing.assert_allclose(w_tab[nodes < 1.4].sum(), 0.6, atol=0.12)


def test_paired_mmd_and_multidimensional_domains_are_refused(decay):
    op, obs, tab = decay
    m = ParticleMeasure(jnp.array([[1.0], [2.0]]))
    with pytest.raises(NotImplementedError, match="paired MMD needs images"):
        PairedMMD(GaussianKernel(1.0))(jax.random.key(0), tab, m, tab.observations())
    with pytest.raises(ValueError, match="n_nodes >= 4"):
        LogLikTableOperator(np.zeros((3, 2)), 0.0, 1.0)
