"""Simulate particle stacks from a conformation distribution through the cryo-EM operator."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .image_model import CryoNuisance
from .operator import CryoEMOperator


def render_batch_fn(operator: CryoEMOperator) -> Callable:
    """A jitted function (theta (B, d), nuisance batch) -> noise-free images (B, D, D)."""
    return jax.jit(jax.vmap(operator.mean))


def render_clean(operator: CryoEMOperator, theta: np.ndarray, nuisance: CryoNuisance, batch_size: int = 256) -> np.ndarray:
    """Noise-free images for paired rows of theta and nuisance, in batches (NumPy out)."""
    f = render_batch_fn(operator)
    n = theta.shape[0]
    out = np.empty((n, operator.image_model.box_size, operator.image_model.box_size), np.float32)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        # pad the last batch to a full one so that only one shape is ever compiled
        idx = np.minimum(np.arange(s, s + batch_size), n - 1)
        nu = jax.tree_util.tree_map(lambda a: jnp.asarray(a[idx]), nuisance)
        out[s:e] = np.asarray(f(jnp.asarray(theta[idx], jnp.float32), nu))[: e - s]
    return out


def sigma_for_snr(clean: np.ndarray, snr: float) -> float:
    """sigma such that SNR = mean over images of var(clean image over the box) / sigma^2."""
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    return float(np.sqrt(np.mean(np.var(clean.reshape(clean.shape[0], -1), axis=1)) / snr))


def add_noise(key: PRNGKeyArray, clean: np.ndarray, sigma: float, batch_size: int = 1024) -> np.ndarray:
    """clean + sigma N(0, I), batch by batch with keys folded from ``key`` (reproducible from the seed)."""
    out = np.empty_like(clean)
    for b, s in enumerate(range(0, clean.shape[0], batch_size)):
        e = min(clean.shape[0], s + batch_size)
        noise = jax.random.normal(jax.random.fold_in(key, b), (e - s,) + clean.shape[1:], jnp.float32)
        out[s:e] = clean[s:e] + sigma * np.asarray(noise)
    return out
