"""The data-chosen regularisation: kernel-smoothed likelihood tables, the bandwidth chosen by
cross-validation over images, and the smoothed measure as weighted points."""

from __future__ import annotations

import numpy as np
import scipy.stats

from cryosip.sip.dto import em_weights
from cryosip.sip.loglik_table import LogLikTableOperator, product_nodes
from cryosip.sip.smoothing import choose_bandwidth, expand_particles, refine, smooth


def _deconvolution_table(truth: np.ndarray, tau: float, grid: np.ndarray, seed: int = 0):
    """Images y_n = theta_n + N(0, tau^2): their Gaussian log-likelihoods on the grid."""
    y = truth + tau * np.random.default_rng(seed).standard_normal(truth.shape)
    return -0.5 * ((grid[None, :] - y[:, None]) / tau) ** 2


def test_expanded_particles_carry_the_kernel_moments_and_are_close_in_w1():
    x = np.array([[0.3], [0.6]])
    w = np.array([0.25, 0.75])
    h = 0.05
    pts, pw = expand_particles(x, w, h, [0.0], [1.0])
    q = 17  # points per particle in 1-D
    assert pts.shape == (2 * q, 1)
    np.testing.assert_allclose(pw.sum(), 1.0, rtol=1e-12)
    for k in range(
        2
    ):  # each particle: its position and the kernel's variance h^2, exactly (float32 reflection)
        p, c = pts[q * k : q * k + q, 0], pw[q * k : q * k + q] / w[k]
        np.testing.assert_allclose(c @ p, x[k, 0], atol=1e-7)
        np.testing.assert_allclose(c @ (p - x[k, 0]) ** 2, h**2, rtol=1e-6)
    # the points stand for the continuous mixture: W1 to a fine sample of it < 0.1 h (measured
    # 0.082 h for one kernel; the 5-point Gauss-Hermite rule used before was 0.35 h away)
    rng = np.random.default_rng(0)
    comp = rng.choice(2, 400_000, p=w)
    ref = x[comp, 0] + h * rng.standard_normal(400_000)
    assert scipy.stats.wasserstein_distance(pts[:, 0], ref, pw) < 0.1 * h
    # 2-D: 7 x 7 points per particle, per-CV bandwidths, reflected at the domain edge
    pts, pw = expand_particles(np.array([[0.5, 0.01]]), [1.0], [0.1, 0.02], [0, 0], [1, 1])
    assert pts.shape == (49, 2)
    np.testing.assert_allclose(pw @ pts[:, 0], 0.5, atol=1e-7)
    np.testing.assert_allclose(pw @ (pts[:, 0] - 0.5) ** 2, 0.01, rtol=1e-6)
    assert pts[:, 1].min() >= 0.0  # points below 0 (0.01 - 1.6 x 0.02) were reflected


def test_smoothing_a_gaussian_likelihood_adds_the_kernel_variance():
    grid = np.linspace(0.0, 1.0, 401)
    s, h = 0.03, 0.04
    tab = LogLikTableOperator((-0.5 * ((grid - 0.5) / s) ** 2)[None, :], 0.0, 1.0)
    got = np.asarray(smooth(tab, h).table[0], np.float64)
    got = got - got.max()
    want = -0.5 * (grid - 0.5) ** 2 / (s**2 + h**2)
    near = np.abs(grid - 0.5) < 0.2
    np.testing.assert_allclose(got[near], want[near], atol=2e-3)


def test_refine_keeps_the_values_and_bounds_memory():
    shape = (6, 5)
    nodes = product_nodes([0, 0], [1, 2], shape).astype(np.float64)
    table = LogLikTableOperator(
        -(nodes**2).sum(1)[None, :].repeat(3, 0), [0, 0], [1, 2], shape=shape
    )
    fine = refine(table)
    assert fine.shape[0] > 6 and (fine.shape[0] - 1) % 5 == 0 and (fine.shape[1] - 1) % 4 == 0
    fn = np.asarray(fine.nodes, np.float64)
    # the quadratic is reproduced (ghost nodes extrapolate linearly: end intervals 2nd order)
    np.testing.assert_allclose(np.asarray(fine.table[0]), -(fn**2).sum(1), atol=0.1)
    # many images: the refined grid shrinks so that images x nodes stays bounded
    assert refine(LogLikTableOperator(np.zeros((40_000, 33)), 0.0, 1.0)).shape == (97,)


def test_cross_validation_smooths_a_smooth_truth_and_not_spikes():
    """Deconvolution with noise sd 0.08: for a smooth two-component truth the chosen bandwidth
    is positive and the smoothed NPMLE is closer to the truth (W1) than the NPMLE; for a truth
    of three atoms the rule keeps the bandwidth small."""
    rng = np.random.default_rng(1)
    grid = np.linspace(0.0, 1.0, 129)
    n = 3000
    smooth_truth = np.where(rng.random(n) < 0.6, rng.normal(0.3, 0.06, n), rng.normal(0.7, 0.05, n))
    smooth_truth = np.clip(smooth_truth, 0, 1)
    L = _deconvolution_table(smooth_truth, 0.08, grid)
    choice, fine = choose_bandwidth(LogLikTableOperator(L, 0.0, 1.0))
    assert choice.relative >= 0.02
    assert choice.candidates[0] == 0.0 and len(choice.heldout_loglik) == len(choice.candidates)
    w_raw, _ = em_weights(L)
    w_h, _ = em_weights(np.asarray(fine.table, np.float64))
    fine_grid = np.asarray(fine.nodes, np.float64)[:, 0]  # refined: 257 nodes
    x, wx = expand_particles(fine_grid, w_h, choice.absolute, [0.0], [1.0])
    d_raw = scipy.stats.wasserstein_distance(grid, smooth_truth, w_raw)
    d_h = scipy.stats.wasserstein_distance(x[:, 0], smooth_truth, wx)
    assert d_h < 0.8 * d_raw, (d_h, d_raw)

    spikes = rng.choice([0.2, 0.5, 0.8], n)
    L = _deconvolution_table(spikes, 0.08, grid, seed=2)
    choice, _ = choose_bandwidth(LogLikTableOperator(L, 0.0, 1.0))
    assert choice.relative <= 0.02, choice


def test_per_cv_kernel_smooths_only_the_cvs_it_is_given():
    """``_smooth_exp`` with one bandwidth per CV (benchmarks/bandwidth_rules.py): equal entries
    are the isotropic kernel, a zero leaves that CV's axis untouched, and mass is kept away
    from the edges."""
    from cryosip.sip.smoothing import _smooth_exp

    shape = (21, 11)
    E = np.zeros((1, 21 * 11))
    E[0, 10 * 11 + 5] = 1.0  # a point mass in the middle of the grid
    np.testing.assert_allclose(
        _smooth_exp(E, shape, (0.1, 0.1)), _smooth_exp(E, shape, 0.1), rtol=0, atol=1e-15
    )
    only_first = _smooth_exp(E, shape, (0.1, 0.0)).reshape(shape)
    np.testing.assert_allclose(only_first[:, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]], 0.0, atol=1e-15)
    np.testing.assert_allclose(only_first.sum(), 1.0, rtol=1e-3)
    u = np.linspace(0.0, 1.0, 21)
    col = only_first[:, 5] / only_first[:, 5].sum()
    np.testing.assert_allclose(np.sqrt(np.sum(col * (u - 0.5) ** 2)), 0.1, rtol=0.05)


def test_refine_is_the_tables_own_interpolant_at_the_fine_nodes():
    """The separable resampling equals interpolate_loglik (the flow's lookup) at every fine
    node, in 1-D and 3-D, with the ghost-node rule at the edges."""
    import jax.numpy as jnp

    from cryosip.sip.loglik_table import interpolate_loglik

    rng = np.random.default_rng(0)
    for shape, lo, hi in (((9,), [0.0], [2.0]), ((6, 5, 4), [-1.0, 0.0, 0.5], [2.0, 1.0, 0.9])):
        table = LogLikTableOperator(rng.normal(size=(7, int(np.prod(shape)))), lo, hi, shape=shape)
        fine = refine(table, n_obs=3000)
        assert all(f > g for f, g in zip(fine.shape, shape))
        nodes = jnp.asarray(fine.nodes, jnp.float32)
        want = interpolate_loglik(table.table, nodes, lo, hi, shape)
        np.testing.assert_allclose(np.asarray(fine.table), np.asarray(want), rtol=0, atol=2e-5)


def test_shared_pass_cross_validation_equals_em_on_each_smoothed_table():
    """heldout_loglik runs every candidate's EM in one pass over the unsmoothed table (E K_h w
    as E (K_h w)); the held-out totals equal EM run on each explicitly smoothed table E K_h,
    in 2-D (per-axis kernels) within float32 rounding."""
    import jax.numpy as jnp

    from cryosip.sip.smoothing import _smooth_exp, heldout_loglik

    rng = np.random.default_rng(3)
    shape = (9, 7)
    nodes = product_nodes([0, 0], [1, 1], shape).astype(np.float64)
    truth = rng.uniform(0.2, 0.8, size=(300, 2))
    y = truth + 0.1 * rng.standard_normal(truth.shape)
    L = -0.5 * (((nodes[None] - y[:, None]) / 0.1) ** 2).sum(-1)
    E = np.exp(L - L.max(1, keepdims=True))
    folds = rng.permutation(len(E)) % 3
    cands = [0.0, 0.05, 0.13]
    got = heldout_loglik(E, shape, cands, folds, n_iter=100)
    want = []
    for h in cands:
        Eh = _smooth_exp(E, shape, h)
        total = 0.0
        for k in range(3):
            w = np.full(Eh.shape[1], 1.0 / Eh.shape[1])
            train = Eh[folds != k]
            for _ in range(100):
                w = w * (train / (train @ w)[:, None]).mean(0)
            total += np.log(Eh[folds == k] @ w).sum()
        want.append(total)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02)
    assert np.argmax(got) == np.argmax(want) and jnp.isfinite(jnp.asarray(got)).all()
