"""Tabulated log-likelihoods: log p(y_n | theta) on a 1-D node grid, interpolated in theta.

:class:`~cryosip.sip.table.TabulatedOperator` tabulates *images* (their Gram matrices), which
only works when log p(y | theta) is a Gaussian log-density of one interpolated image. Some
likelihoods are not: a pose-marginalised likelihood (a log-mean-exp over pose perturbations,
:mod:`cryosip.pipeline.pose_marginal`) or a Monte Carlo average over unknown nuisances. For a
1-D CV such a likelihood is still a smooth function of theta per observation, so it can be
tabulated directly,

    L[n, g] = log p(y_n | theta_g),   g = 0 .. G-1 uniform nodes on [lower, upper],

and interpolated by the same local cubic (Catmull-Rom) basis as the image tables,
``log p(y_n | theta) ~= sum_f w_f(theta) L[n, k_f(theta)]`` (four nodes per theta). The
interpolant is C^1 and exact at the nodes, and in the interior intervals it reproduces
quadratics exactly, so a log-likelihood that is locally quadratic in theta (Gaussian noise,
smooth forward model) is interpolated to third order in the node spacing (second order in the
first and last interval, where the stencil is clamped). It is differentiable in theta, so the KL
flow (:class:`~cryosip.sip.discrepancies.KL`) runs on it unchanged, and
:func:`cryosip.sip.dto.loglik_on_nodes` / :func:`~cryosip.sip.dto.em_weights` use it like any
operator. Paired MMD needs images, not log-likelihoods: it is not available on this table.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .noise import GaussianNoise
from .operator import AbstractRandomOperator, Observations
from .table import catmull_rom_sparse


def interpolate_loglik(
    table: Float[Array, "n_obs n_nodes"],
    theta: Float[Array, " n_particles"],
    lower: float,
    upper: float,
) -> Float[Array, "n_obs n_particles"]:
    """Catmull-Rom interpolation of every row of ``table`` (values on uniform nodes) at ``theta``."""
    idx, w = catmull_rom_sparse(theta, lower, upper, table.shape[1])  # (P, 4) each
    vals = table[:, idx]  # (B, P, 4)
    return jnp.einsum("bpf,pf->bp", vals, w)


class LogLikTableOperator(AbstractRandomOperator):
    """A (n_obs, n_nodes) table of log-likelihoods on uniform 1-D nodes, interpolated in theta.

    Build it from any operator with :meth:`build` (one log-likelihood evaluation per
    observation and node), or from a table computed elsewhere with the constructor. Rows are
    looked up by ``Observations.index``, as for :class:`~cryosip.sip.table.TabulatedOperator`;
    :meth:`observations` returns the matching index-only observations.
    """

    noise: GaussianNoise
    fit_scale: bool
    table: Float[Array, "n_obs n_nodes"]
    lower: float = eqx.field(static=True)
    upper: float = eqx.field(static=True)
    n_obs_entries: int = eqx.field(static=True)

    def __init__(
        self,
        table,
        lower: float,
        upper: float,
        *,
        noise: GaussianNoise | float = 1.0,
        fit_scale: bool = False,
        n_obs_entries: int = 0,
    ):
        table = jnp.asarray(table, jnp.float32)
        if table.ndim != 2 or table.shape[1] < 4:
            raise ValueError(f"table must be (n_obs, n_nodes >= 4), got shape {table.shape}")
        if not float(lower) < float(upper):
            raise ValueError(f"need lower < upper, got {lower}, {upper}")
        self.table = table
        self.lower, self.upper = float(lower), float(upper)
        self.noise = noise if isinstance(noise, GaussianNoise) else GaussianNoise(noise)
        self.fit_scale = bool(fit_scale)
        self.n_obs_entries = int(n_obs_entries)

    @classmethod
    def build(
        cls,
        operator: AbstractRandomOperator,
        obs: Observations,
        n_nodes: int = 33,
        *,
        key: PRNGKeyArray | None = None,
        batch_size: int = 64,
        progress=None,
    ) -> LogLikTableOperator:
        """Tabulate ``operator.log_likelihood_matrix`` on ``n_nodes`` uniform nodes of its (1-D, bounded) domain.

        ``progress(n_done)`` is called after each batch of observations. The table's row n is
        observation n of ``obs`` (``obs.index`` is not used to build it).
        """
        lower, upper = (np.asarray(b, np.float64).reshape(-1) for b in operator.domain)
        if lower.shape != (1,) or not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise ValueError("a log-likelihood table needs a 1-D theta with a bounded domain")
        nodes = jnp.linspace(float(lower[0]), float(upper[0]), int(n_nodes), dtype=jnp.float32)[
            :, None
        ]
        f = jax.jit(lambda o: operator.log_likelihood_matrix(nodes, o, key=key))
        n = len(obs)
        rows = []
        for s in range(0, n, batch_size):
            idx = np.minimum(np.arange(s, s + batch_size), n - 1)  # one compiled shape
            rows.append(np.asarray(f(obs.take(jnp.asarray(idx))))[: min(batch_size, n - s)])
            if progress is not None:
                progress(min(batch_size, n - s))
        entries = 0
        try:
            entries = int(operator.obs_size)
        except NotImplementedError:
            pass
        return cls(
            np.concatenate(rows),
            float(lower[0]),
            float(upper[0]),
            noise=operator.noise,
            fit_scale=operator.fit_scale,
            n_obs_entries=entries,
        )

    # ---- the operator interface ----------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return int(self.table.shape[1])

    @property
    def nodes(self) -> Float[Array, " n_nodes"]:
        return jnp.linspace(self.lower, self.upper, self.n_nodes)

    @property
    def domain(self):
        return jnp.array([self.lower]), jnp.array([self.upper])

    @property
    def obs_size(self) -> int:
        return self.n_obs_entries

    def observations(self) -> Observations:
        """Index-only observations, one per table row."""
        idx = jnp.arange(self.table.shape[0], dtype=jnp.int32)
        return Observations(idx, None, idx)

    def mean(self, theta, nuisance):
        raise NotImplementedError(
            "a log-likelihood table has no outputs; simulate with the operator it was built from"
        )

    def sample_nuisance(self, key: PRNGKeyArray, n: int):
        raise NotImplementedError("a log-likelihood table is tied to its observations")

    def paired_sq_distances(self, theta, obs, batch_size=None):
        raise NotImplementedError(
            "paired MMD needs images: use the image table (TabulatedOperator) or the direct operator"
        )

    def log_likelihood_matrix(self, theta, obs, *, key=None, n_nuisance=0, batch_size=None):
        """Interpolated log p(y_n | theta_i) for the observations' rows (``obs.index``), (B, P)."""
        return interpolate_loglik(self.table[obs.index], theta[:, 0], self.lower, self.upper)
