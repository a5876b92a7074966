"""Distances between recovered and true CV distributions."""

from __future__ import annotations

import numpy as np
import ot
import scipy.stats


def _as2d(x):
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


def _w(w, n):
    return np.full(n, 1.0 / n) if w is None else np.asarray(w, np.float64) / np.sum(w)


def w1(x, y, wx=None, wy=None) -> float:
    """Wasserstein-1 between weighted samples: quantile formula in 1-D, exact OT (POT) in n-D."""
    x, y = _as2d(x), _as2d(y)
    if x.shape[1] == 1:
        return float(scipy.stats.wasserstein_distance(x[:, 0], y[:, 0], wx, wy))
    M = ot.dist(x, y, metric="euclidean")
    return float(ot.emd2(_w(wx, len(x)), _w(wy, len(y)), M, numItermax=10**7))


def w2(x, y, wx=None, wy=None) -> float:
    """Wasserstein-2 (exact OT; 1-D via quantile functions)."""
    x, y = _as2d(x), _as2d(y)
    if x.shape[1] == 1:
        # W2 in 1-D: integral of squared quantile differences on a common grid of levels
        qs = np.linspace(0, 1, 4001)[1:-1]
        qx = _weighted_quantile(x[:, 0], _w(wx, len(x)), qs)
        qy = _weighted_quantile(y[:, 0], _w(wy, len(y)), qs)
        return float(np.sqrt(np.mean((qx - qy) ** 2)))
    M = ot.dist(x, y, metric="sqeuclidean")
    return float(np.sqrt(ot.emd2(_w(wx, len(x)), _w(wy, len(y)), M, numItermax=10**7)))


def _weighted_quantile(x, w, qs):
    o = np.argsort(x)
    cw = np.cumsum(w[o])
    cw /= cw[-1]
    idx = np.clip(np.searchsorted(cw, qs, side="left"), 0, len(x) - 1)
    return x[o][idx]


def energy_distance(x, y, wx=None, wy=None) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (1-D: scipy's sqrt form squared; n-D: direct)."""
    x, y = _as2d(x), _as2d(y)
    if x.shape[1] == 1:
        return float(scipy.stats.energy_distance(x[:, 0], y[:, 0], wx, wy) ** 2)
    a, b = _w(wx, len(x)), _w(wy, len(y))
    dxy = ot.dist(x, y, metric="euclidean")
    dxx = ot.dist(x, x, metric="euclidean")
    dyy = ot.dist(y, y, metric="euclidean")
    return float(2 * a @ dxy @ b - a @ dxx @ a - b @ dyy @ b)


def populations(x, edges, w=None) -> np.ndarray:
    """Population of each bin (sums to 1)."""
    h, _ = np.histogram(np.asarray(x).reshape(-1), bins=edges, weights=w)
    return h / max(h.sum(), 1e-300)


def all_metrics(x, truth, wx=None) -> dict[str, float]:
    return {"w1": w1(x, truth, wx), "w2": w2(x, truth, wx), "energy": energy_distance(x, truth, wx)}
