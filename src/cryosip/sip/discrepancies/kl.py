"""KL(nu_N || mu[rho]) = const - (1/N) sum_n log sum_i w_i p(y_n | theta_i): the negative marginal log-likelihood."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float

from .._dtypes import promoted_dtype
from .base import AbstractDiscrepancy


def kl(
    log_likelihood: Float[Array, "n_obs n_particles"],
    log_weights: Float[Array, " n_particles"],
    obs_weight: Float[Array, " n_obs"] | None = None,
) -> Float[Array, ""]:
    """Negative mean log marginal likelihood (the data->model KL up to the data's entropy)."""
    lm = logsumexp(log_likelihood + log_weights[None, :], axis=1)
    if obs_weight is None:
        return -jnp.mean(lm)
    dtype = promoted_dtype(obs_weight, lm)  # float64 likelihoods: float64
    return -jnp.sum(obs_weight.astype(dtype) * lm) / jnp.sum(obs_weight).astype(dtype)


class KL(AbstractDiscrepancy):
    """The marginal-likelihood objective. Nuisances: known per observation, or averaged over
    ``n_nuisance`` Monte Carlo draws when the observations carry none."""

    n_nuisance: int = 64
    batch_size: int | None = None

    def __call__(self, key, operator, measure, obs):
        ll = operator.log_likelihood_matrix(
            measure.positions, obs, key=key, n_nuisance=self.n_nuisance, batch_size=self.batch_size
        )
        return kl(ll, measure.log_weights, obs.weight)

    @property
    def name(self) -> str:
        return "kl"
