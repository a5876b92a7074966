"""Split a weighted particle measure into states (for ``cryosip select --cluster K``).

1-D: the CV axis is cut at the ``K - 1`` most prominent minima of the recovered density (a
weighted KDE, as in ``distribution.csv``); when the density has fewer minima, at weighted
k-means boundaries. d-D: weighted k-means (k-means++ starts, best of several). Clusters are
numbered in increasing order of their weighted mean (first CV).
"""

from __future__ import annotations

import numpy as np

from .density import kde

__all__ = ["weighted_kmeans", "cluster_particles"]


def _points_and_weights(x, w) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float64 points (a 1-D array is one CV) and weights normalised to sum 1."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    return (x[:, None] if x.ndim == 1 else x), w / w.sum()


def weighted_kmeans(
    x, w, k: int, *, seed: int = 0, n_init: int = 8, n_iter: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Lloyd k-means: ``(labels (n,), centers (k', d))`` with k' <= k non-empty clusters."""
    x, w = _points_and_weights(x, w)
    n = len(x)
    k = int(min(k, n))
    if k < 1:
        raise ValueError("k must be >= 1")
    scale = x.std(0)
    scale[scale == 0] = 1.0
    z = x / scale
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        c = [z[rng.choice(n, p=w)]]
        for _ in range(1, k):
            d2 = np.min(((z[:, None, :] - np.asarray(c)[None]) ** 2).sum(-1), axis=1)
            p = w * d2
            if p.sum() <= 0:
                break
            c.append(z[rng.choice(n, p=p / p.sum())])
        c = np.asarray(c)
        for _ in range(n_iter):
            lab = np.argmin(((z[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            new = np.asarray(
                [
                    np.average(z[lab == j], axis=0, weights=w[lab == j])
                    if w[lab == j].sum() > 0
                    else c[j]
                    for j in range(len(c))
                ]
            )
            if np.allclose(new, c, rtol=0, atol=1e-12):
                break
            c = new
        lab = np.argmin(((z[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        cost = float(np.sum(w * ((z - c[lab]) ** 2).sum(-1)))
        if best is None or cost < best[0]:
            best = (cost, lab, c)
    _, lab, c = best
    used = np.unique(lab)
    remap = np.full(len(c), -1)
    remap[used] = np.arange(len(used))
    return remap[lab], c[used] * scale


def _order(labels: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Renumber clusters by increasing weighted mean of the first coordinate."""
    ids = np.unique(labels)
    means = [np.average(x[labels == i, 0], weights=w[labels == i] + 1e-300) for i in ids]
    rank = np.empty(ids.max() + 1, np.int64)
    rank[ids[np.argsort(means)]] = np.arange(len(ids))
    return rank[labels]


def cluster_particles(
    positions, weights, k: int, lower=None, upper=None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cluster label (0..k-1) of every particle, and the cut points of the CV axis (1-D) or None.

    Fewer than ``k`` clusters come back when the particles do not support ``k`` (e.g. fewer
    distinct positions than ``k``).
    """
    from scipy.signal import find_peaks

    pos, w = _points_and_weights(positions, weights)
    k = int(k)
    if k < 1:
        raise ValueError(f"the number of clusters must be >= 1, got {k}")
    if k == 1:
        return np.zeros(len(pos), np.int64), (np.empty(0) if pos.shape[1] == 1 else None)
    if pos.shape[1] == 1:
        x = pos[:, 0]
        lo = float(np.ravel(lower)[0]) if lower is not None else float(x.min())
        hi = float(np.ravel(upper)[0]) if upper is not None else float(x.max())
        grid = np.linspace(lo, hi, 801)
        dens = kde(x, w, grid, lower=lo, upper=hi)
        minima, props = find_peaks(-dens, prominence=0.0)
        cuts = np.empty(0)
        if len(minima) >= k - 1:
            top = np.argsort(props["prominences"])[::-1][: k - 1]
            cuts = np.sort(grid[minima[top]])
        else:
            lab, c = weighted_kmeans(x, w, k, seed=seed)
            c = np.sort(c[:, 0])
            cuts = 0.5 * (c[1:] + c[:-1])
        labels = np.searchsorted(cuts, x, side="right")
        # drop empty clusters, renumber densely
        used = np.unique(labels)
        remap = np.full(len(cuts) + 1, -1)
        remap[used] = np.arange(len(used))
        kept_cuts = np.asarray([cuts[i] for i in range(len(cuts)) if i + 1 in used and i in used])
        return remap[labels], kept_cuts
    labels, _ = weighted_kmeans(pos, w, k, seed=seed)
    return _order(labels, pos, w), None
