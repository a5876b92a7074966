"""Projected potential of Gaussian atoms, pixel-averaged (exact erf integrals).

Each Gaussian is integrated exactly over each pixel, as cryojax's default
``GaussianMixtureProjection()`` does, but only on a small window around the atom's nearest
pixel (the 1-D pixel integrals are separable, so a window costs (w + 1) erf evaluations per
axis and Gaussian). The window half-width is chosen from the widest Gaussian so that the
mass outside it is below ~1e-4 of the total; the tail it drops is checked against the dense
computation in the tests (relative L2 < 1e-3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def window_half_width(max_variance: float, pixel_size: float) -> int:
    """Half-width h (pixels) of the (2h+1)^2 window: covers >= 3 sigma of the widest Gaussian."""
    return max(1, math.ceil(3.0 * math.sqrt(max_variance) / pixel_size - 0.5))


def project_gaussians(
    xy: Float[Array, "n_atoms 2"],
    amplitudes: Float[Array, "n_atoms n_gauss"],
    variances: Float[Array, "n_atoms n_gauss"],
    box_size: int,
    pixel_size: float,
    half_width: int,
) -> Float[Array, "y_dim x_dim"]:
    """Pixel-averaged projection onto a ``box_size``^2 grid whose pixel i has centre (i - D//2)*pixel_size."""
    D, w = box_size, 2 * half_width + 1
    u = xy / pixel_size + (D // 2)  # continuous pixel coordinates, pixel centres at integers
    start = jnp.round(u).astype(jnp.int32) - half_width  # (n, 2)
    edges = start[:, :, None].astype(u.dtype) - 0.5 + jnp.arange(w + 1, dtype=u.dtype)  # (n, 2, w+1)
    rel = (edges - u[:, :, None]) * pixel_size  # Angstrom, (n, 2, w+1)
    inv = jax.lax.rsqrt(2.0 * variances)  # (n, K)
    cdf = jax.scipy.special.erf(rel[:, :, None, :] * inv[:, None, :, None])  # (n, 2, K, w+1)
    prof = (cdf[..., 1:] - cdf[..., :-1]) * (0.5 / pixel_size)  # (n, 2, K, w): mean density per pixel
    px, py = prof[:, 0], prof[:, 1]
    foot = jnp.einsum("nk,nky,nkx->nyx", amplitudes, py, px)  # (n, w, w)
    # scatter into a padded canvas; indices outside the box land in the margin and are cropped
    pad = w
    iy = jnp.clip(start[:, 1, None] + jnp.arange(w) + pad, 0, D + 2 * pad - 1)
    ix = jnp.clip(start[:, 0, None] + jnp.arange(w) + pad, 0, D + 2 * pad - 1)
    canvas = jnp.zeros((D + 2 * pad, D + 2 * pad), foot.dtype)
    canvas = canvas.at[iy[:, :, None], ix[:, None, :]].add(foot)
    return canvas[pad : pad + D, pad : pad + D]


def project_gaussians_dense(
    xy: Float[Array, "n_atoms 2"],
    amplitudes: Float[Array, "n_atoms n_gauss"],
    variances: Float[Array, "n_atoms n_gauss"],
    box_size: int,
    pixel_size: float,
) -> Float[Array, "y_dim x_dim"]:
    """Reference: the same pixel integrals over the whole grid (no window). O(n * D) erfs."""
    D = box_size
    edges = (jnp.arange(D + 1) - D // 2 - 0.5) * pixel_size  # (D+1,)
    inv = jax.lax.rsqrt(2.0 * variances)
    cx = jax.scipy.special.erf((edges[None, None, :] - xy[:, 0, None, None]) * inv[:, :, None])
    cy = jax.scipy.special.erf((edges[None, None, :] - xy[:, 1, None, None]) * inv[:, :, None])
    px = (cx[..., 1:] - cx[..., :-1]) * (0.5 / pixel_size)
    py = (cy[..., 1:] - cy[..., :-1]) * (0.5 / pixel_size)
    return jnp.einsum("nk,nky,nkx->yx", amplitudes, py, px)
