from __future__ import annotations

import abc

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from ..measure import ParticleMeasure
from ..operator import AbstractRandomOperator, Observations


class AbstractDiscrepancy(eqx.Module):
    """D(mu[rho], nu): how far the model's observations are from the data."""

    @abc.abstractmethod
    def __call__(
        self,
        key: PRNGKeyArray,
        operator: AbstractRandomOperator,
        measure: ParticleMeasure,
        obs: Observations,
    ) -> Float[Array, ""]:
        """A (stochastic where it simulates) estimate of the objective on a batch of observations."""

    @property
    def name(self) -> str:
        """The name written to outputs and logs (the class name in lower case unless a subclass says otherwise)."""
        return type(self).__name__.lower()
