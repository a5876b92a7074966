"""Structures along a recovered CV distribution: atom labels, a line through CV space, ensembles.

* :func:`atom_labels` finds the element/name/residue of every model atom (a model may carry
  ``atom_labels``; else the built-in AdK arrays or the ``--model`` structure files are read
  again; else pseudo-atoms ``C``/``UNK``).
* :func:`cv_line` is the segment of CV space that frames, maps and the report's slider walk
  along: between the 1st and 99th weighted percentile of the particles (1-D), or of their
  projection on the weighted first principal axis (d-D), clipped to the model's box.
* :func:`ensemble_members` reduces the particle measure to at most ``max_members`` weighted
  conformations (the particles themselves when few; CV bins in 1-D; weighted k-means in d-D).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np

from .clusters import weighted_kmeans

logger = logging.getLogger(__name__)

__all__ = [
    "AtomLabels",
    "atom_labels",
    "weighted_quantile",
    "cv_line",
    "ensemble_members",
    "conformations",
]


@dataclasses.dataclass(frozen=True)
class AtomLabels:
    """Per-atom labels for PDB/mmCIF writers (all arrays of length n_atoms)."""

    elements: np.ndarray
    names: np.ndarray
    resnames: np.ndarray
    resids: np.ndarray
    chains: np.ndarray
    pseudo: bool = False  # True when the labels are placeholders (toy pseudo-atoms)

    @property
    def n_atoms(self) -> int:
        return int(self.names.shape[0])

    def select(self, mask) -> AtomLabels:
        m = np.asarray(mask)
        return dataclasses.replace(
            self,
            elements=self.elements[m],
            names=self.names[m],
            resnames=self.resnames[m],
            resids=self.resids[m],
            chains=self.chains[m],
        )

    def ca_mask(self) -> np.ndarray:
        return (np.char.upper(self.names.astype(str)) == "CA") & (
            np.char.upper(self.elements.astype(str)) == "C"
        )

    def writer_args(self) -> tuple:
        """``(elements, names, resnames, resids, chains)`` for ``write_ensemble_pdb``."""
        return self.elements, self.names, self.resnames, self.resids, self.chains


def _labels(elements, names, resnames, resids, chains=None, pseudo=False) -> AtomLabels:
    n = len(names)
    return AtomLabels(
        np.asarray(elements, dtype=object),
        np.asarray(names, dtype=object),
        np.asarray(resnames, dtype=object),
        np.asarray(resids, dtype=np.int64),
        np.asarray(["A"] * n if chains is None else chains, dtype=object),
        pseudo,
    )


def _pseudo_labels(n: int) -> AtomLabels:
    return _labels(["C"] * n, ["C"] * n, ["UNK"] * n, np.arange(1, n + 1), pseudo=True)


def atom_labels(model, settings: dict | None = None) -> AtomLabels:
    """Labels of the model's atoms, from the model itself, the built-in data or the model files."""
    n = int(model.atoms.n_atoms)
    own = getattr(model, "atom_labels", None)
    if own is not None:
        try:
            lab = own if isinstance(own, AtomLabels) else _labels(**dict(own))
            if lab.n_atoms == n:
                return lab
        except (TypeError, ValueError):
            pass
    spec = (settings or {}).get("model")
    if isinstance(spec, (str, os.PathLike)):
        spec = [spec]
    try:
        lab = _labels_from_spec(list(spec or []), settings or {})
    except Exception as e:  # any reader error: fall back to pseudo-atoms, never fail the run
        logger.warning("atom labels of the model not found (%s): writing pseudo-atoms", e)
        lab = None
    if lab is not None and lab.n_atoms == n:
        return lab
    if lab is not None:
        logger.warning(
            "atom labels of the model files have %d atoms, the model %d: writing pseudo-atoms",
            lab.n_atoms,
            n,
        )
    return _pseudo_labels(n)


def _labels_from_spec(spec: list, settings: dict) -> AtomLabels | None:
    if not spec:
        return None
    first = os.fspath(spec[0])
    if first in ("adk", "adk-ca") and not os.path.exists(first):
        from ..data.adk import load_adk_arrays

        a = load_adk_arrays()
        sel = a["names"] == "CA" if first == "adk-ca" else np.ones(a["names"].shape, bool)
        return _labels(a["elements"][sel], a["names"][sel], a["resnames"][sel], a["resids"][sel])
    if not all(os.path.exists(os.fspath(p)) for p in spec):
        return None  # a built-in toy: pseudo-atoms
    from ..data.structures import is_structure_file, read_structures, select_atoms

    topology = settings.get("topology")
    s = read_structures(first, topology=None if is_structure_file(first) else topology)
    s = select_atoms(s, settings.get("atoms") or "all")
    return _labels(s.elements, s.names, s.resnames, s.resids, s.chains)


def weighted_quantile(x, w, q) -> np.ndarray:
    """Quantiles ``q`` of the weighted sample ``x`` (midpoint rule on the sorted cumulative weight)."""
    x = np.asarray(x, np.float64).ravel()
    w = np.asarray(w, np.float64).ravel()
    order = np.argsort(x)
    x, w = x[order], w[order]
    c = (np.cumsum(w) - 0.5 * w) / w.sum()
    return np.interp(np.asarray(q, np.float64), c, x)


def cv_line(
    positions, weights, lower, upper, n: int, quantiles=(0.01, 0.99)
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CV points (n, d) along the landscape and their coordinate along the line (n,).

    1-D: from the ``quantiles[0]`` to the ``quantiles[1]`` weighted percentile of the particles
    (the coordinate is the CV itself). d-D: the same percentiles of the projection on the
    weighted first principal axis through the weighted mean, clipped to the box (the coordinate
    is the signed distance from the mean along that axis). A degenerate spread (all particles
    at one point) widens to the whole box (1-D) or to a tenth of it (d-D).
    """
    pos = np.asarray(positions, np.float64)
    if pos.ndim == 1:
        pos = pos[:, None]
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    lo_b = np.asarray(lower, np.float64).ravel()
    hi_b = np.asarray(upper, np.float64).ravel()
    d = pos.shape[1]
    if d == 1:
        a, b = weighted_quantile(pos[:, 0], w, quantiles)
        if not b - a > 1e-9 * (hi_b[0] - lo_b[0]):
            a, b = lo_b[0], hi_b[0]
        t = np.linspace(a, b, n)
        return t[:, None], t
    mean = w @ pos
    c = (pos - mean).T @ ((pos - mean) * w[:, None])
    vals, vecs = np.linalg.eigh(c)
    v = vecs[:, -1]
    v = v if v[np.argmax(np.abs(v))] > 0 else -v
    proj = (pos - mean) @ v
    a, b = weighted_quantile(proj, w, quantiles)
    if not b - a > 1e-9:
        span = 0.05 * float(np.linalg.norm(hi_b - lo_b))
        a, b = -span, span
    t = np.linspace(a, b, n)
    pts = np.clip(mean[None, :] + t[:, None] * v[None, :], lo_b, hi_b)
    return pts, t


def ensemble_members(
    positions, weights, lower, upper, max_members: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_members`` conformations (k, d) and their populations (k,), summing to 1.

    The particles themselves (sorted by the first CV, zero weights dropped) when there are few
    enough; else, in 1-D, ``max_members`` equal-width bins of the box (each non-empty bin is its
    weighted mean CV with the bin's mass); in d-D, weighted k-means clusters.
    """
    pos = np.asarray(positions, np.float64)
    if pos.ndim == 1:
        pos = pos[:, None]
    w = np.asarray(weights, np.float64)
    keep = w > 1e-12 * w.max()
    pos, w = pos[keep], w[keep] / w[keep].sum()
    if len(pos) <= max_members:
        order = np.lexsort(pos.T[::-1])
        return pos[order], w[order]
    if pos.shape[1] == 1:
        lo, hi = float(np.ravel(lower)[0]), float(np.ravel(upper)[0])
        edges = np.linspace(lo, hi, max_members + 1)
        b = np.clip(np.searchsorted(edges, pos[:, 0], side="right") - 1, 0, max_members - 1)
        thetas, pops = [], []
        for k in range(max_members):
            m = b == k
            if m.any():
                pops.append(w[m].sum())
                thetas.append([np.average(pos[m, 0], weights=w[m])])
        return np.asarray(thetas), np.asarray(pops) / np.sum(pops)
    labels, centers = weighted_kmeans(pos, w, max_members, seed=seed)
    pops = np.bincount(labels, weights=w, minlength=len(centers))
    ok = pops > 0
    centers, pops = centers[ok], pops[ok]
    order = np.lexsort(centers.T[::-1])
    return centers[order], pops[order] / pops.sum()


def conformations(model, thetas) -> np.ndarray:
    """Coordinates (k, n_atoms, 3) of the model at CV points ``thetas`` (k, d): one compiled
    call for all k (the model's arrays are arguments, not constants; point by point it ran
    ~20 small programs per point, 8 ms each)."""
    th = np.asarray(thetas, np.float32)
    if th.ndim == 1:
        th = th[:, None]
    return np.asarray(_batched_model()(model, th), np.float64)


@functools.cache
def _batched_model():
    """``(model, thetas) -> coordinates``, compiled (JAX imported on first use)."""
    import equinox as eqx
    import jax

    return eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
