"""3-D Coulomb potential of Gaussian atoms on a voxel grid (for maps other tools can read).

The volume is the 3-D counterpart of :func:`cryosip.cryoem.projection.project_gaussians`:
``V(r) = sum_atoms sum_k a_k N(r; x_atom, var_k I_3)``, averaged over each voxel (exact erf
integrals, separable per axis). Voxel ``i`` has centre ``(i - D // 2) * voxel_size`` on every
axis, and the array order is ``[z, y, x]`` (MRC). Projecting along z,
``V.sum(axis=0) * voxel_size``, gives the same image as ``project_gaussians`` with the identity
rotation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from .atoms import AtomParameters

__all__ = ["render_volume"]


def render_volume(
    coords,
    atoms: AtomParameters,
    box_size: int,
    voxel_size: float,
    *,
    n_sigma: float = 4.0,
    chunk: int = 2048,
) -> np.ndarray:
    """Voxel-averaged density ``(box, box, box)`` float32 of atoms at ``coords`` (n, 3) Angstrom.

    Coordinates are relative to the box centre (as in the image model). ``n_sigma`` sets the
    window around each atom (the widest Gaussian's standard deviation times ``n_sigma``).
    """
    coords = np.asarray(coords, np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (n_atoms, 3), got {coords.shape}")
    amp = np.asarray(atoms.amplitudes, np.float64)
    var = np.asarray(atoms.variances, np.float64)
    if amp.shape[0] != coords.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates but {amp.shape[0]} atoms")
    D = int(box_size)
    h = max(1, math.ceil(n_sigma * math.sqrt(float(var.max())) / voxel_size))
    w = 2 * h + 1
    pad = w
    canvas = np.zeros((D + 2 * pad,) * 3, np.float64)
    inv = 1.0 / np.sqrt(2.0 * var)  # (n, K)
    for s in range(0, coords.shape[0], chunk):
        c = coords[s : s + chunk]
        u = c / voxel_size + D // 2  # voxel coordinates (x, y, z), centres at integers
        start = np.round(u).astype(np.int64) - h  # (m, 3)
        edges = start[:, :, None] - 0.5 + np.arange(w + 1)  # (m, 3, w+1)
        rel = (edges - u[:, :, None]) * voxel_size
        cdf = erf(rel[:, :, None, :] * inv[s : s + chunk, None, :, None])  # (m, 3, K, w+1)
        prof = (cdf[..., 1:] - cdf[..., :-1]) * (
            0.5 / voxel_size
        )  # (m, 3, K, w) mean density per voxel
        foot = np.einsum(
            "mk,mkz,mky,mkx->mzyx", amp[s : s + chunk], prof[:, 2], prof[:, 1], prof[:, 0]
        )
        iz = np.clip(start[:, 2, None] + np.arange(w) + pad, 0, D + 2 * pad - 1)
        iy = np.clip(start[:, 1, None] + np.arange(w) + pad, 0, D + 2 * pad - 1)
        ix = np.clip(start[:, 0, None] + np.arange(w) + pad, 0, D + 2 * pad - 1)
        np.add.at(canvas, (iz[:, :, None, None], iy[:, None, :, None], ix[:, None, None, :]), foot)
    return canvas[pad : pad + D, pad : pad + D, pad : pad + D].astype(np.float32)
