"""Measures on the conformation space represented by weighted particles."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class ParticleMeasure(eqx.Module):
    """rho = sum_i w_i delta_{theta_i}; ``log_weights`` are normalised on construction."""

    positions: Float[Array, "n_particles dim"]
    log_weights: Float[Array, " n_particles"]

    def __init__(self, positions, log_weights=None):
        positions = jnp.asarray(positions)
        if positions.ndim == 1:
            positions = positions[:, None]
        if positions.ndim != 2:
            raise ValueError(f"positions must be (n_particles, dim), got shape {positions.shape}")
        n = positions.shape[0]
        if log_weights is None:
            log_weights = jnp.full((n,), -jnp.log(n), positions.dtype)
        else:
            log_weights = jnp.asarray(log_weights, positions.dtype)
            log_weights = log_weights - jax.scipy.special.logsumexp(log_weights)
        self.positions = positions
        self.log_weights = log_weights

    @property
    def weights(self) -> Float[Array, " n_particles"]:
        """Normalised particle weights (they sum to 1)."""
        return jnp.exp(self.log_weights)

    @property
    def n_particles(self) -> int:
        """Number of particles."""
        return self.positions.shape[0]

    @property
    def dim(self) -> int:
        """Dimension of a particle's position (the number of CVs)."""
        return self.positions.shape[1]

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n dim"]:
        """``n`` draws of particle positions, each particle with its weight's probability."""
        idx = jax.random.categorical(key, self.log_weights, shape=(n,))
        return self.positions[idx]

    def mean(self) -> Float[Array, " dim"]:
        """Weighted mean position."""
        return self.weights @ self.positions


def uniform_measure(key: PRNGKeyArray, n_particles: int, lower, upper) -> ParticleMeasure:
    """Particles drawn uniformly in the box [lower, upper] (arrays of length dim, or scalars)."""
    lower = jnp.atleast_1d(jnp.asarray(lower, jnp.float32))
    upper = jnp.atleast_1d(jnp.asarray(upper, jnp.float32))
    u = jax.random.uniform(key, (n_particles, lower.shape[0]))
    return ParticleMeasure(lower + (upper - lower) * u)


def grid_measure(nodes, weights=None) -> ParticleMeasure:
    """Atoms at fixed nodes (1-D array or (K, dim)) with the given weights (default uniform)."""
    nodes = jnp.asarray(nodes, jnp.float32)
    lw = None if weights is None else jnp.log(jnp.clip(jnp.asarray(weights, jnp.float32), 1e-30))
    return ParticleMeasure(nodes, lw)
