"""Conformation models: a differentiable map from a CV theta in R^d to atomic coordinates."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..cryoem.atoms import AtomParameters


class AbstractConformationModel(eqx.Module):
    """theta -> coordinates (n_atoms, 3) in Angstrom, centred near the origin.

    Domain rule: ``__call__`` clamps theta into [lower, upper] (it never extrapolates); the
    particle flow reflects particles at the boundary, so clamping only matters for callers
    that pass out-of-range values directly.
    """

    atoms: eqx.AbstractVar[AtomParameters]

    @property
    @abc.abstractmethod
    def lower(self) -> Float[Array, " dim"]:
        """Lower corner of the CV box (one value per CV)."""

    @property
    @abc.abstractmethod
    def upper(self) -> Float[Array, " dim"]:
        """Upper corner of the CV box (one value per CV)."""

    @abc.abstractmethod
    def coordinates(self, theta: Float[Array, " dim"]) -> Float[Array, "n_atoms 3"]:
        """Coordinates for an in-domain theta."""

    def __call__(self, theta: Float[Array, " dim"]) -> Float[Array, "n_atoms 3"]:
        theta = jnp.clip(jnp.atleast_1d(theta), self.lower, self.upper)
        return self.coordinates(theta)

    @property
    def dim(self) -> int:
        """Number of collective variables."""
        return int(self.lower.shape[0])

    @property
    def cv_names(self) -> tuple[str, ...]:
        """One name per CV, for tables and plots (``cv0``, ``cv1``, ... unless a model names them)."""
        return tuple(f"cv{i}" for i in range(self.dim))
