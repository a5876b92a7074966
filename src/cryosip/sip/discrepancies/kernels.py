"""Kernels on observations, written as functions of the squared distance."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class AbstractKernel(eqx.Module):
    @abc.abstractmethod
    def __call__(self, sqdist: Float[Array, "..."]) -> Float[Array, "..."]:
        """k(x, y) from ||x - y||^2."""


class GaussianKernel(AbstractKernel):
    """k = exp(-||x-y||^2 / (2 h^2)); ``bandwidth`` may be a tuple (a sum of Gaussians)."""

    bandwidth: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, bandwidth):
        bw = tuple(float(b) for b in np.atleast_1d(bandwidth))
        if not all(b > 0 for b in bw):
            raise ValueError(f"bandwidths must be positive, got {bw}")
        self.bandwidth = bw

    def __call__(self, sqdist):
        return sum(jnp.exp(-0.5 * sqdist / (h * h)) for h in self.bandwidth)


class InverseMultiquadricKernel(AbstractKernel):
    """k = c / sqrt(c^2 + ||x-y||^2) (heavy tails; characteristic)."""

    scale: float = eqx.field(static=True)

    def __call__(self, sqdist):
        return self.scale * jnp.reciprocal(jnp.sqrt(self.scale**2 + sqdist))


class EnergyKernel(AbstractKernel):
    """k = -||x - y||: MMD becomes the energy distance (bandwidth-free)."""

    def __call__(self, sqdist):
        return -jnp.sqrt(jnp.maximum(sqdist, 1e-30))


def median_distance(data: Array, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance of (up to ``max_points`` of) the rows of ``data``."""
    x = np.asarray(data, np.float64).reshape(np.shape(data)[0], -1)[:max_points]
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    iu = np.triu_indices(x.shape[0], 1)
    return float(np.sqrt(np.median(d2[iu])))


def sq_distances(x: Float[Array, "n d"], y: Float[Array, "m d"]) -> Float[Array, "n m"]:
    sx = jnp.sum(x * x, axis=1)
    sy = jnp.sum(y * y, axis=1)
    return jnp.maximum(sx[:, None] + sy[None, :] - 2 * x @ y.T, 0.0)
