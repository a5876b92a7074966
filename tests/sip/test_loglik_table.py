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
from cryosip.sip.operator import Observations, batch_workers, map_batches


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
    nodes = tab.nodes
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
        np.asarray(tab.log_likelihood_matrix(tab.nodes[jnp.array([7, 70])], sub)),
        np.asarray(op.log_likelihood_matrix(tab.nodes[jnp.array([7, 70])], obs.take(idx))),
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
    with pytest.raises(ValueError, match=">= 4 nodes per CV"):
        LogLikTableOperator(np.zeros((3, 2)), 0.0, 1.0)


def test_two_dimensional_table_interpolates_a_smooth_loglik():
    """A 2-D table (12 x 9 nodes) of a smooth log-likelihood: exact at the nodes, and between
    them within the Catmull-Rom error of a quadratic-plus-cosine surface; gradients flow."""
    from cryosip.sip.loglik_table import interpolate_loglik, product_nodes

    lo, hi, shape = np.array([0.0, -1.0]), np.array([2.0, 1.0]), (12, 9)
    centres = np.array([[0.5, 0.2], [1.4, -0.5], [1.0, 0.0]])

    def f(x):  # (P, 2) -> (3, P): three "images", each a smooth log-likelihood surface
        d2 = ((x[None, :, :] - centres[:, None, :]) ** 2).sum(-1)
        return -4.0 * d2 + 0.3 * np.cos(2.0 * x[None, :, 0])

    nodes = product_nodes(lo, hi, shape)
    tab = LogLikTableOperator(f(nodes.astype(np.float64)), lo, hi, shape=shape)
    assert tab.dim == 2 and tab.n_nodes == 108
    got = np.asarray(tab.log_likelihood_matrix(jnp.asarray(nodes), tab.observations()))
    np.testing.assert_allclose(got, f(nodes.astype(np.float64)), rtol=0, atol=1e-4)
    x = np.asarray(jax.random.uniform(jax.random.key(3), (400, 2)), np.float64) * (hi - lo) + lo
    got = np.asarray(tab.log_likelihood_matrix(jnp.asarray(x, jnp.float32), tab.observations()))
    # end intervals: second order, |f''| h^2 / 8 = 8 * 0.25^2 / 8 = 0.0625 at most
    np.testing.assert_allclose(got, f(x), rtol=0, atol=0.07)
    # interior intervals: exact for the quadratic, only the cosine's third-order error
    h = (hi - lo) / (np.array(shape) - 1)
    inner = np.all((x > lo + h) & (x < hi - h), axis=1)
    assert inner.sum() > 150
    np.testing.assert_allclose(got[:, inner], f(x)[:, inner], rtol=0, atol=5e-3)
    # the same interpolant, called with a (P,) theta for 1-D, equals the 1-D operator
    g = jax.grad(lambda p: interpolate_loglik(tab.table, p, lo, hi, shape).sum())(
        jnp.asarray(x[:5], jnp.float32)
    )
    eps = 1e-3
    num = (
        np.asarray(
            tab.log_likelihood_matrix(
                jnp.asarray(x[:5] + [eps, 0], jnp.float32), tab.observations()
            )
        ).sum(0)
        - np.asarray(
            tab.log_likelihood_matrix(
                jnp.asarray(x[:5] - [eps, 0], jnp.float32), tab.observations()
            )
        ).sum(0)
    ) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g)[:, 0], num, rtol=0.02, atol=0.05)


class _TwoRates(DecayOperator):
    """Two CVs: a decay rate the curves depend on strongly and a slow drift they hardly see,
    y(t) = xi exp(-theta_0 t) + 0.02 theta_1 t."""

    def mean(self, theta, nuisance):
        return nuisance * jnp.exp(-theta[0] * self.times) + 0.02 * theta[1] * self.times

    @property
    def domain(self):
        return jnp.array([self.lower_bound, 0.0]), jnp.array([self.upper_bound, 1.0])


def test_nodes_per_cv_follow_the_measured_interpolation_error():
    """choose_resolution gives the sharp CV many nodes and the flat one few; the table it builds
    interpolates the log-likelihood at random points within twice the tolerance, while a square
    grid of as many nodes does not; with a node budget it shrinks every CV and says so."""
    from cryosip.sip.loglik_table import choose_resolution

    op = _TwoRates(sigma=0.3)
    k = jax.random.split(jax.random.key(3), 3)
    theta = jnp.stack(
        [jax.random.uniform(k[0], (80,), minval=0.3, maxval=2.5), jnp.full((80,), 0.5)], 1
    )
    nu = op.sample_nuisance(k[1], 80)
    obs = Observations(op.sample(k[2], theta, nu), nu)
    res = choose_resolution(op, obs.take(jnp.arange(0, 80, 2)), tolerance=0.1)
    assert res.shape[0] > 2 * res.shape[1], res.to_dict()
    assert res.shape[1] >= 4 and not res.capped
    points = jnp.stack(
        [
            jax.random.uniform(jax.random.key(5), (300,), minval=0.1, maxval=3.0),
            jax.random.uniform(jax.random.key(6), (300,)),
        ],
        1,
    )
    direct = np.asarray(op.log_likelihood_matrix(points, obs), np.float64)

    def rms_error(shape):
        tab = LogLikTableOperator.build(op, obs, shape)
        got = np.asarray(tab.log_likelihood_matrix(points, tab.observations()), np.float64)
        return float(np.sqrt(np.mean((got - direct) ** 2)))

    square = int(np.floor(np.sqrt(np.prod(res.shape))))
    err, err_square = rms_error(res.shape), rms_error((square, square))
    assert err < 2 * res.tolerance, (res.to_dict(), err)
    assert err_square > 2 * err, (square, err_square, err)
    capped = choose_resolution(op, obs.take(jnp.arange(0, 80, 2)), tolerance=0.1, max_nodes=40)
    assert capped.capped and np.prod(capped.shape) <= 40 and min(capped.shape) >= 4
    assert capped.expected_error[0] > res.expected_error[0]


def test_map_batches_cover_every_row_once_in_order(decay):
    """The eager tabulation loops' batches: equal shapes (the last padded with the final row),
    progress in order, and the real rows, concatenated, are the observations themselves,
    whether the batches run one at a time or on three threads."""
    _, obs, _ = decay
    for workers in (1, 3):
        shapes, counts, padded = set(), [], []

        def fn(b):
            shapes.add(b.values.shape)
            padded.append(np.asarray(b.index))  # the batch fn sees, before the cut
            return b.values, b.nuisance, b.index

        got = map_batches(fn, obs, 7, progress=counts.append, workers=workers)
        assert counts == [7] * 8 + [4]  # 60 rows: 8 batches of 7 and one of 4 real rows
        assert shapes == {(7,) + obs.values.shape[1:]}
        last = [p for p in padded if p[0] == 56]  # the last batch: padded with the final row
        assert len(last) == 1
        np.testing.assert_array_equal(last[0], [56, 57, 58, 59, 59, 59, 59])
        np.testing.assert_array_equal(got[-1][2], [56, 57, 58, 59])
        values = np.concatenate([v for v, _, _ in got])
        np.testing.assert_array_equal(values, np.asarray(obs.values))
        for a, leaf in enumerate(jax.tree_util.tree_leaves(obs.nuisance)):
            cut = [jax.tree_util.tree_leaves(nu)[a] for _, nu, _ in got]
            np.testing.assert_array_equal(np.concatenate(cut), np.asarray(leaf))


def test_table_is_the_same_on_one_thread_or_several(decay, monkeypatch):
    """Concurrent batches (the default on a multi-core CPU) give the sequential table exactly."""
    op, obs, _ = decay
    tables = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("CRYOSIP_BATCH_WORKERS", workers)
        assert batch_workers() == int(workers)
        tables[workers] = LogLikTableOperator.build(op, obs, n_nodes=33, batch_size=7).table
    np.testing.assert_array_equal(np.asarray(tables["3"]), np.asarray(tables["1"]))


def test_table_is_the_same_for_any_batch_size(decay):
    op, obs, tab = decay
    other = LogLikTableOperator.build(op, obs, n_nodes=97, batch_size=7)
    # another compiled batch shape: the same numbers up to float32 rounding
    np.testing.assert_allclose(np.asarray(other.table), np.asarray(tab.table), rtol=1e-6, atol=1e-4)
