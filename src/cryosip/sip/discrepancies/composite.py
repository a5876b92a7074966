from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import AbstractDiscrepancy


class Composite(AbstractDiscrepancy):
    """J = sum_k lambda_k D_k (e.g. lambda_KL KL + lambda_MMD MMD)."""

    terms: tuple[AbstractDiscrepancy, ...]
    weights: tuple[float, ...]

    def __init__(self, terms, weights):
        if len(terms) != len(weights) or not terms:
            raise ValueError("Composite needs one weight per term")
        self.terms = tuple(terms)
        self.weights = tuple(float(w) for w in weights)

    def __call__(self, key, operator, measure, obs):
        keys = jax.random.split(key, len(self.terms))
        return sum(
            w * d(k, operator, measure, obs) for w, d, k in zip(self.weights, self.terms, keys)
        )

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.terms)


def balance_weights(terms, key, operator, measure, obs) -> tuple[float, ...]:
    """Weights that give every term the same initial gradient norm w.r.t. the particle positions
    (the first term keeps weight 1): the terms' natural scales differ by orders of magnitude."""
    norms = []
    for t in terms:
        g = jax.grad(
            lambda pos, t=t: t(key, operator, type(measure)(pos, measure.log_weights), obs)
        )(measure.positions)
        norms.append(float(jnp.linalg.norm(g)))
    return tuple(norms[0] / max(n, 1e-30) for n in norms)
