"""Additive Gaussian noise: sampling and likelihood on one object, so they cannot drift apart."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._dtypes import promoted_dtype


def profiled_scale(cross, gram):
    """The least-squares (maximum-likelihood) contrast scale ``a >= 0`` of data on a model
    image, from ``<m, y>`` and ``<m, m>`` (both mean-centred when an offset is profiled too).
    The one place the profile is defined: the direct and the tabulated likelihoods and the
    paired kernel score all call it."""
    return jnp.clip(cross / jnp.maximum(gram, 1e-30), 0.0)


def paired_profiled_sq_distances(dy_cross, m_gram, y_sq, dmm):
    """Paired squared distances with each image's scale profiled.

    ``dy_cross`` (B, P) = <m_ni, y_n>, ``m_gram`` (B, P) = |m_ni|^2, ``y_sq`` (B,) = |y_n|^2 and
    ``dmm`` (B, P, P) = |m_ni - m_nj|^2 (all centred). Returns |y_n - a_ni m_ni|^2 and
    abar_n^2 dmm with ``abar_n`` the mean over particles of the profiled scales (held fixed in
    the gradient: the simulated pair is compared at the image's scale, not re-fitted per pair).
    """
    a = profiled_scale(dy_cross, m_gram)
    dy = jnp.maximum(y_sq[:, None] - 2 * a * dy_cross + a * a * m_gram, 0.0)
    abar = jax.lax.stop_gradient(jnp.mean(a, axis=1))
    return dy, dmm * (abar * abar)[:, None, None]


class GaussianNoise(eqx.Module):
    """y = mean + sigma * N(0, I)."""

    sigma: Float[Array, ""]

    def __init__(self, sigma):
        self.sigma = jnp.asarray(sigma, jnp.float32)

    def sample(self, key: PRNGKeyArray, mean: Array) -> Array:
        """``mean`` plus i.i.d. Gaussian noise of standard deviation ``sigma``."""
        z = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + self.sigma.astype(promoted_dtype(self.sigma, z)) * z  # float64 mean: float64

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
            m = profiled_scale(jnp.vdot(m, y), jnp.vdot(m, m)) * m
        r2 = jnp.sum((y - m) ** 2)
        s2 = self.sigma**2
        dtype = promoted_dtype(r2, s2)  # float64 images: float64 (sigma^2 is float32)
        return -0.5 * r2 / s2.astype(dtype) - (0.5 * d * jnp.log(2 * jnp.pi * s2)).astype(dtype)
