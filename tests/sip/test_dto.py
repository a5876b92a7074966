"""DTO baselines (EM on a grid, multi-class MAP, GMM, per-image MAP, bootstrap) on the decay toy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from cryosip.sip import dto
from cryosip.sip.examples import DecayOperator
from cryosip.sip.operator import Observations
from cryosip.sip.table import TabulatedOperator


def _data(theta: np.ndarray, sigma: float, seed: int = 0):
    """Decay observations of the given rates with known amplitudes (nuisances)."""
    op = DecayOperator(sigma=sigma)
    n = theta.shape[0]
    nu = op.sample_nuisance(jax.random.key(seed), n)
    y = op.sample(jax.random.key(seed + 1), jnp.asarray(theta[:, None], jnp.float32), nu)
    return op, Observations(y, nu)


def _bimodal(rng, n):
    """0.6 N(0.8, 0.15^2) + 0.4 N(2.0, 0.2^2), truncated to the decay domain [0.1, 3]."""
    out = np.empty(0)
    while out.size < n:
        c = rng.uniform(size=n) < 0.6
        x = np.where(c, rng.normal(0.8, 0.15, n), rng.normal(2.0, 0.2, n))
        out = np.concatenate([out, x[(x >= 0.1) & (x <= 3.0)]])
    return out[:n]


@pytest.fixture(scope="module")
def low_snr():
    """1,000 decay curves with noise 0.3 (the amplitude is 0.5-1.5): a per-image fit is poor."""
    rng = np.random.default_rng(0)
    theta = _bimodal(rng, 1000)
    op, obs = _data(theta, sigma=0.3)
    grid = np.linspace(0.1, 3.0, 145)
    L = dto.loglik_on_nodes(op, obs, grid)
    return theta, op, obs, grid, L


def test_em_increases_the_likelihood_monotonically(low_snr):
    _, _, _, grid, L = low_snr
    for alpha, weight in (
        (1.0, None),
        (2.0, None),
        (1.0, np.random.default_rng(1).integers(0, 3, L.shape[0])),
    ):
        w, hist = dto.em_weights(
            L[:, ::4], n_iter=200, prior_alpha=alpha, obs_weight=weight, tol=0.0
        )
        assert hist.size == 200
        # float64 round-off on a sum of ~2,000 terms of size ~10: 1e-9 relative is generous
        assert np.all(np.diff(hist) >= -1e-9 * np.abs(hist[1:])), np.diff(hist).min()
        assert hist[-1] > hist[0] + 1.0
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
        assert np.all(w >= 0)


def test_em_objective_is_the_marginal_likelihood():
    rng = np.random.default_rng(2)
    L = rng.normal(-50.0, 3.0, (40, 5))
    w, hist = dto.em_weights(L, n_iter=1, tol=0.0)
    # history[0] is the log-likelihood of the uniform start
    expected = np.sum(np.log(np.mean(np.exp(L), axis=1)))
    np.testing.assert_allclose(hist[0], expected, rtol=1e-12)


def test_em_grid_recovers_known_weights():
    """Three well-separated rates, little noise: every curve is classified, so EM returns the
    empirical class frequencies; those are within 3 binomial sds of the true weights."""
    rng = np.random.default_rng(3)
    nodes = np.array([0.3, 1.0, 2.5])
    true_w = np.array([0.5, 0.3, 0.2])
    n = 3000
    labels = rng.choice(3, size=n, p=true_w)
    op, obs = _data(nodes[labels], sigma=0.05, seed=4)
    m = dto.em_grid(op, obs, nodes)
    w = np.asarray(m.weights, np.float64)
    np.testing.assert_allclose(np.asarray(m.positions)[:, 0], nodes, rtol=1e-6)
    freq = np.bincount(labels, minlength=3) / n
    np.testing.assert_allclose(w, freq, atol=2e-3)  # separation: misclassification is negligible
    sd = np.sqrt(true_w * (1 - true_w) / n)  # <= 0.0092
    np.testing.assert_allclose(w, true_w, atol=3 * sd.max())


def test_bootstrap_em_bands(low_snr):
    _, _, _, _, L = low_snr
    Lc = L[:, ::9]  # 17 nodes
    w_full, _ = dto.em_weights(Lc)
    boot = dto.bootstrap_em(Lc, 8, jax.random.key(0))
    assert boot.shape == (8, Lc.shape[1])
    np.testing.assert_allclose(boot.sum(axis=1), 1.0, rtol=1e-10)
    assert np.all(boot.std(axis=0).max() > 0)
    # replicates scatter around the full-data estimate (a weight's sd is ~0.03 for 1,000 images)
    np.testing.assert_allclose(boot.mean(axis=0), w_full, atol=0.06)
    again = dto.bootstrap_em(Lc, 8, jax.random.key(0))
    np.testing.assert_allclose(again, boot, rtol=0, atol=0)


def test_map_classes_finds_two_separated_classes():
    """Direct (untabulated) operator: two rates 0.5 and 2.0 with weights 0.7 / 0.3."""
    rng = np.random.default_rng(5)
    n = 600
    labels = rng.uniform(size=n) < 0.7
    op, obs = _data(np.where(labels, 0.5, 2.0), sigma=0.1, seed=6)
    m = dto.map_classes(op, obs, 2, key=jax.random.key(0), n_steps=300)
    pos = np.asarray(m.positions)[:, 0]
    order = np.argsort(pos)
    np.testing.assert_allclose(pos[order], [0.5, 2.0], atol=0.05)
    # weights: the class frequencies, to within sampling (sd 0.019) and the fit
    np.testing.assert_allclose(
        np.asarray(m.weights)[order], [labels.mean(), 1 - labels.mean()], atol=0.02
    )


def test_map_classes_approaches_the_npmle_objective(low_snr):
    """More classes fit the data better than fewer; K=16 comes close to the fine-grid NPMLE."""
    theta, op, obs, grid, L = low_snr

    def ll(Lm, w):
        Lm = np.asarray(Lm, np.float64)
        return np.mean(
            np.log(np.exp(Lm - Lm.max(1, keepdims=True)) @ np.asarray(w, np.float64)) + Lm.max(1)
        )

    ll_np = ll(L, dto.em_weights(L, n_iter=2000)[0])
    lls = []
    for K in (2, 16):
        m = dto.map_classes(op, obs, K, key=jax.random.key(K), n_steps=300)
        lls.append(ll(dto.loglik_on_nodes(op, obs, np.asarray(m.positions)[:, 0]), m.weights))
    assert lls[1] > lls[0] + 0.01
    assert ll_np - lls[1] < 0.01  # nats per curve
    assert ll_np - lls[1] > -2e-3  # the NPMLE on 145 nodes is (nearly) the best any measure does


def test_map_classes_direct_and_tabulated_agree():
    rng = np.random.default_rng(7)
    op, obs = _data(np.where(rng.uniform(size=300) < 0.4, 0.7, 1.8), sigma=0.1, seed=8)
    table = TabulatedOperator.build(op, obs, n_nodes=33)
    a = dto.map_classes(op, obs, 2, key=jax.random.key(0), n_steps=200)
    b = dto.map_classes(table, table.observations(), 2, key=jax.random.key(0), n_steps=200)
    # Catmull-Rom on 33 nodes over [0.1, 3] interpolates these curves to ~1e-4: the optima coincide
    np.testing.assert_allclose(
        np.sort(np.asarray(b.positions)[:, 0]), np.sort(np.asarray(a.positions)[:, 0]), atol=5e-3
    )
    np.testing.assert_allclose(
        np.sort(np.asarray(b.weights)), np.sort(np.asarray(a.weights)), atol=5e-3
    )


def test_gmm_matched_case():
    """The truth is a two-component mixture: gmm with 2 components recovers it."""
    rng = np.random.default_rng(0)
    theta = _bimodal(rng, 1000)
    op, obs = _data(theta, sigma=0.1)
    grid = np.linspace(0.1, 3.0, 145)
    L = dto.loglik_on_nodes(op, obs, grid)
    fit = dto.gmm(op, obs, 2, key=jax.random.key(0), grid=grid, loglik=L, n_restarts=2)
    # against the sample's own component statistics (split at 1.4): the noise (0.1) costs little
    hi = theta > 1.4
    np.testing.assert_allclose(fit.weights, [1 - hi.mean(), hi.mean()], atol=0.01)
    np.testing.assert_allclose(fit.means[:, 0], [theta[~hi].mean(), theta[hi].mean()], atol=0.01)
    np.testing.assert_allclose(fit.sds[:, 0], [theta[~hi].std(), theta[hi].std()], atol=0.01)
    # and the true parameters within ~3 sampling sds (weight 0.015, means 0.006 / 0.010,
    # sds 0.005 / 0.007)
    np.testing.assert_allclose(fit.weights, [0.6, 0.4], atol=0.05)
    np.testing.assert_allclose(fit.means[:, 0], [0.8, 2.0], atol=0.03)
    np.testing.assert_allclose(fit.sds[:, 0], [0.15, 0.2], atol=0.03)
    np.testing.assert_allclose(float(jnp.sum(fit.measure.weights)), 1.0, rtol=1e-5)
    assert fit[0] is fit.measure  # a tuple whose first item is the measure
    one = dto.gmm(op, obs, 1, key=jax.random.key(0), grid=grid, loglik=L, n_restarts=2)
    assert fit.log_likelihood > one.log_likelihood + 0.1
    w1_2 = wasserstein_distance(grid, theta, np.asarray(fit.measure.weights))
    w1_1 = wasserstein_distance(grid, theta, np.asarray(one.measure.weights))
    assert w1_2 < 0.02  # the sampling floor of 1,000 draws is ~0.01
    assert w1_1 > 0.1  # one Gaussian cannot be bimodal (measured 0.18)


def test_gmm_best_fit_to_a_density():
    """With an identity likelihood, gmm_from_loglik fits the density itself (a truncated normal)."""
    grid = np.linspace(0.0, 1.0, 201)
    p = np.exp(-0.5 * ((grid - 0.3) / 0.1) ** 2)
    L = np.where(np.eye(grid.size, dtype=bool), 0.0, -np.inf)
    fit = dto.gmm_from_loglik(
        L, grid, 1, key=jax.random.key(0), obs_weight=p / p.sum(), n_steps=600
    )
    np.testing.assert_allclose(fit.means[0, 0], 0.3, atol=2e-3)
    np.testing.assert_allclose(fit.sds[0, 0], 0.1, atol=2e-3)


def test_per_image_map_is_biased_at_low_snr(low_snr):
    """Per-image MAP histograms do not deconvolve the noise; em-grid does."""
    theta, op, obs, grid, L = low_snr
    pim = dto.per_image_map(op, obs, grid)
    w_pim = wasserstein_distance(pim, theta)
    w_em = wasserstein_distance(grid[::4], theta, dto.em_weights(L[:, ::4])[0])
    assert w_pim > 0.1  # measured 0.17
    assert w_em < 0.5 * w_pim  # measured 0.05
