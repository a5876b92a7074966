"""Additive Gaussian noise: sampling and likelihood on one object, so they cannot drift apart."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class GaussianNoise(eqx.Module):
    """y = mean + sigma * N(0, I)."""

    sigma: Float[Array, ""]

    def __init__(self, sigma):
        self.sigma = jnp.asarray(sigma, jnp.float32)

    def sample(self, key: PRNGKeyArray, mean: Array) -> Array:
        return mean + self.sigma * jax.random.normal(key, mean.shape, mean.dtype)

    def log_likelihood(
        self, observed: Array, mean: Array, *, fit_scale: bool = False, fit_offset: bool = False
    ) -> Float[Array, ""]:
        """log N(observed; mean, sigma^2 I), optionally profiled over a contrast scale/offset.

        With ``fit_scale`` the mean is replaced by ``a * mean (+ b)`` with the least-squares
        (maximum-likelihood) ``a >= 0`` and ``b``, in closed form.
        """
        y = observed.reshape(-1)
        m = mean.reshape(-1)
        d = y.shape[0]
        if fit_offset:
            y = y - jnp.mean(y)
            m = m - jnp.mean(m)
        if fit_scale:
            a = jnp.clip(jnp.vdot(m, y) / jnp.maximum(jnp.vdot(m, m), 1e-30), 0.0)
            m = a * m
        r2 = jnp.sum((y - m) ** 2)
        return -0.5 * r2 / self.sigma**2 - 0.5 * d * jnp.log(2 * jnp.pi * self.sigma**2)
