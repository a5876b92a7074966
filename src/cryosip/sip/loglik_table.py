"""Tabulated log-likelihoods: log p(y_n | theta) on a node grid (any d), interpolated in theta.

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
first and last interval, where the ghost nodes are linear extrapolations). It is differentiable in theta, so the KL
flow (:class:`~cryosip.sip.discrepancies.KL`) runs on it unchanged, and
:func:`cryosip.sip.dto.loglik_on_nodes` / :func:`~cryosip.sip.dto.em_weights` use it like any
operator. Paired MMD needs images, not log-likelihoods: it is not available on this table.

In d dimensions the table holds the nodes of a uniform product grid and the interpolant is the
tensor product of the 1-D ones (4^d nodes per point): the cost of a flow step does not grow
with the grid, only the tabulation (one likelihood per image and node) and the memory (one
float per image and node) do. This is the engine for d > 1 CVs (``docs/method.md``).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .noise import GaussianNoise
from .operator import AbstractRandomOperator, Observations, map_batches
from .table import catmull_rom_sparse


def _stencil(theta, lower: float, upper: float, n_nodes: int, xp=jnp):
    """Catmull-Rom stencil whose ghost nodes beyond the ends are linear extrapolations
    (f_-1 = 2 f_0 - f_1): exact for linear functions up to the domain edge (a clamped stencil
    halves the slope there), second order in the end intervals. ``xp=np``: in NumPy."""
    idx, w = catmull_rom_sparse(theta, lower, upper, n_nodes, xp)
    first = idx[:, 1] == 0  # idx[:, 0] is the clamped ghost node -1 -> 0
    last = idx[:, 2] == n_nodes - 1  # idx[:, 3] is the ghost node G -> G-1
    w0, w3 = w[:, 0], w[:, 3]
    if xp is np:
        w = w.copy()
        w[:, 0], w[:, 2] = np.where(first, 2 * w0, w0), w[:, 2] + np.where(first, -w0, 0.0)
        w[:, 3], w[:, 1] = np.where(last, 2 * w3, w3), w[:, 1] + np.where(last, -w3, 0.0)
        return idx, w
    w = w.at[:, 0].set(jnp.where(first, 2 * w0, w0))
    w = w.at[:, 2].add(jnp.where(first, -w0, 0.0))
    w = w.at[:, 3].set(jnp.where(last, 2 * w3, w3))
    w = w.at[:, 1].add(jnp.where(last, -w3, 0.0))
    return idx, w


def interpolate_loglik(
    table: Float[Array, "n_obs n_nodes"],
    theta: Float[Array, "n_particles ..."],
    lower,
    upper,
    shape: tuple[int, ...] | None = None,
) -> Float[Array, "n_obs n_particles"]:
    """Tensor-product Catmull-Rom interpolation of every row of ``table`` at ``theta``.

    ``table[:, j]`` holds the values on the uniform product grid of ``shape`` (C order: the
    last CV varies fastest) over the box [lower, upper]; ``theta`` is (P,) for one CV or (P, d).
    Each point reads a 4^d stencil of nodes."""
    theta = theta[:, None] if theta.ndim == 1 else theta
    d = theta.shape[1]
    lower = np.broadcast_to(np.asarray(lower, np.float64), (d,))
    upper = np.broadcast_to(np.asarray(upper, np.float64), (d,))
    shape = (table.shape[1],) if shape is None else tuple(shape)
    flat = jnp.zeros((theta.shape[0], 1), jnp.int32)
    weight = jnp.ones((theta.shape[0], 1), theta.dtype)
    for a in range(d):  # grow the stencil one axis at a time: (P, 4^a) -> (P, 4^(a+1))
        idx, w = _stencil(theta[:, a], float(lower[a]), float(upper[a]), shape[a])
        flat = (flat[:, :, None] * shape[a] + idx[:, None, :]).reshape(theta.shape[0], -1)
        weight = (weight[:, :, None] * w[:, None, :]).reshape(theta.shape[0], -1)
    vals = table[:, flat]  # (B, P, 4^d)
    return jnp.einsum("bpf,pf->bp", vals, weight)


def interpolation_matrix(points, lower: float, upper: float, n_nodes: int) -> np.ndarray:
    """(len(points), n_nodes) float64: row i holds the weights :func:`interpolate_loglik` gives
    the nodes of one CV at ``points[i]`` (the 1-D interpolant; the d-D one is their tensor
    product, so a table is resampled on a product grid one axis at a time)."""
    idx, w = _stencil(np.asarray(points, np.float64), lower, upper, n_nodes, np)
    out = np.zeros((len(idx), n_nodes))
    np.add.at(out, (np.arange(len(idx))[:, None], idx), w)
    return out


def product_nodes(lower, upper, shape: tuple[int, ...]) -> np.ndarray:
    """(prod(shape), d) float32 nodes of the uniform product grid, C order (last CV fastest)."""
    axes = [np.linspace(a, b, k) for a, b, k in zip(lower, upper, shape)]
    return (
        np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape)).astype(np.float32)
    )


class LogLikTableOperator(AbstractRandomOperator):
    """A (n_obs, n_nodes) table of log-likelihoods on a uniform product grid, interpolated in theta.

    ``shape`` gives the nodes per CV (default: one CV with ``table.shape[1]`` nodes); column j
    of the table is node j of :func:`product_nodes` (C order). Build it from any operator with
    :meth:`build` (one log-likelihood evaluation per observation and node), or from a table
    computed elsewhere with the constructor. Rows are looked up by ``Observations.index``, as for
    :class:`~cryosip.sip.table.TabulatedOperator`; :meth:`observations` returns the matching
    index-only observations. Memory: n_obs x n_nodes floats; a likelihood evaluation reads 4^d
    entries per (observation, particle), whatever the grid size.
    """

    noise: GaussianNoise
    fit_scale: bool
    table: Float[Array, "n_obs n_nodes"]
    lower_bounds: tuple[float, ...] = eqx.field(static=True)
    upper_bounds: tuple[float, ...] = eqx.field(static=True)
    shape: tuple[int, ...] = eqx.field(static=True)
    n_obs_entries: int = eqx.field(static=True)

    def __init__(
        self,
        table,
        lower,
        upper,
        *,
        shape: tuple[int, ...] | None = None,
        noise: GaussianNoise | float = 1.0,
        fit_scale: bool = False,
        n_obs_entries: int = 0,
    ):
        table = jnp.asarray(table, jnp.float32)
        shape = (int(table.shape[-1]),) if shape is None else tuple(int(k) for k in shape)
        lo = tuple(float(x) for x in np.broadcast_to(np.asarray(lower, np.float64), (len(shape),)))
        hi = tuple(float(x) for x in np.broadcast_to(np.asarray(upper, np.float64), (len(shape),)))
        if table.ndim != 2 or min(shape) < 4 or table.shape[1] != int(np.prod(shape)):
            raise ValueError(
                f"table must be (n_obs, prod(shape)) with >= 4 nodes per CV, got shape "
                f"{table.shape} for nodes {shape}"
            )
        if not all(a < b for a, b in zip(lo, hi)):
            raise ValueError(f"need lower < upper, got {lo}, {hi}")
        self.table, self.shape = table, shape
        self.lower_bounds, self.upper_bounds = lo, hi
        self.noise = noise if isinstance(noise, GaussianNoise) else GaussianNoise(noise)
        self.fit_scale = bool(fit_scale)
        self.n_obs_entries = int(n_obs_entries)

    @classmethod
    def build(
        cls,
        operator: AbstractRandomOperator,
        obs: Observations,
        n_nodes: int | tuple[int, ...] = 33,
        *,
        key: PRNGKeyArray | None = None,
        batch_size: int = 64,
        progress=None,
    ) -> LogLikTableOperator:
        """Tabulate ``operator.log_likelihood_matrix`` on the product grid of its bounded domain
        (``n_nodes`` per CV, an int for every CV or one per CV).

        ``progress(n_done)`` is called after each batch of observations. The table's row n is
        observation n of ``obs`` (``obs.index`` is not used to build it).
        """
        lower, upper = (np.asarray(b, np.float64).reshape(-1) for b in operator.domain)
        if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise ValueError("a log-likelihood table needs a bounded domain")
        shape = tuple(np.broadcast_to(np.asarray(n_nodes, int), lower.shape).tolist())
        nodes = jnp.asarray(product_nodes(lower, upper, shape))
        f = jax.jit(lambda o: operator.log_likelihood_matrix(nodes, o, key=key))
        rows = map_batches(f, obs, batch_size, progress=progress)
        entries = 0
        try:
            entries = int(operator.obs_size)
        except NotImplementedError:
            pass
        return cls(
            np.concatenate(rows),
            lower,
            upper,
            shape=shape,
            noise=operator.noise,
            fit_scale=operator.fit_scale,
            n_obs_entries=entries,
        )

    def with_table(self, table) -> LogLikTableOperator:
        """The same grid and noise with other values (e.g. a smoothed likelihood)."""
        return LogLikTableOperator(
            table,
            self.lower_bounds,
            self.upper_bounds,
            shape=self.shape,
            noise=self.noise,
            fit_scale=self.fit_scale,
            n_obs_entries=self.n_obs_entries,
        )

    # ---- the operator interface ----------------------------------------------------------------
    @property
    def lower(self) -> float:
        """The lower bound of a 1-D table (``lower_bounds`` in any d)."""
        return self.lower_bounds[0]

    @property
    def upper(self) -> float:
        return self.upper_bounds[0]

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def n_nodes(self) -> int:
        return int(self.table.shape[1])

    @property
    def nodes(self) -> Float[Array, "n_nodes dim"]:
        """(n_nodes, d) nodes, in table column order."""
        return jnp.asarray(product_nodes(self.lower_bounds, self.upper_bounds, self.shape))

    @property
    def domain(self):
        return jnp.array(self.lower_bounds), jnp.array(self.upper_bounds)

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
        return interpolate_loglik(
            self.table[obs.index], theta, self.lower_bounds, self.upper_bounds, self.shape
        )


# ------------------------------------------------------------------------------------------------
# How many nodes per CV: measured, not assumed
# ------------------------------------------------------------------------------------------------

_LINE = 25  # nodes on each probe line; grids of k nodes with (k - 1) | 24 are nested in it
_PROBED = (4, 5, 7, 9, 13)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Nodes per CV of a log-likelihood table, chosen from the measured interpolation error.

    ``errors[a][j]`` is the rms error (nats) of interpolating the log-likelihood along CV ``a``
    from ``probed[j]`` nodes over the range; ``needed`` the nodes per CV that bring it under
    ``tolerance``; ``shape`` what was used (``needed``, shrunk when its product exceeds
    ``max_nodes``); ``expected_error`` the error per CV at ``shape`` (from the same curve)."""

    shape: tuple[int, ...]
    needed: tuple[int, ...]
    tolerance: float
    max_nodes: int
    probed: tuple[int, ...]
    errors: tuple[tuple[float, ...], ...]
    expected_error: tuple[float, ...]
    n_images: int
    n_lines: int

    @property
    def capped(self) -> bool:
        return self.shape != self.needed

    def to_dict(self) -> dict:
        return {
            "rule": "fewest nodes per CV whose measured interpolation error is under the tolerance",
            "nodes_per_cv": list(self.shape),
            "nodes_needed_per_cv": list(self.needed),
            "tolerance_nats": self.tolerance,
            "max_nodes": self.max_nodes,
            "expected_interpolation_error_nats": [round(e, 4) for e in self.expected_error],
            "probed_nodes": list(self.probed),
            "probed_errors_nats": [[round(e, 4) for e in row] for row in self.errors],
            "probe": f"{self.n_lines} lines per CV of {_LINE} nodes, {self.n_images} images",
        }


def _error_at(errors: np.ndarray, k: float) -> float:
    """The interpolation error at k nodes: log-log interpolation between the probed counts,
    a power law beyond them (the last two probes' slope, between k^-1 and k^-4)."""
    lk, le = np.log(np.asarray(_PROBED, float) - 1), np.log(np.maximum(errors, 1e-12))
    x = np.log(max(k, 2.0) - 1)
    if x <= lk[-1]:
        return float(np.exp(np.interp(x, lk, le)))
    slope = float(np.clip((le[-1] - le[-2]) / (lk[-1] - lk[-2]), -4.0, -1.0))
    return float(np.exp(le[-1] + slope * (x - lk[-1])))


def _nodes_needed(errors: np.ndarray, tolerance: float, max_per_cv: int) -> int:
    for k in range(_PROBED[0], max_per_cv + 1):
        if _error_at(errors, k) <= tolerance:
            return k
    return max_per_cv


def probe_interpolation(
    operator: AbstractRandomOperator, obs: Observations, *, n_lines: int = 4, seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:  # fmt: skip
    """(d, len(_PROBED)) rms error, in nats, of the tabulated log-likelihood's interpolation
    along each CV: the log-likelihood of every image in ``obs`` is evaluated on ``n_lines``
    lines per CV (25 nodes across the range, the other CVs at random points of the box), and
    the grids of 4, 5, 7, 9 and 13 nodes nested in a line are interpolated (the table's own
    Catmull-Rom rule) onto the line's other nodes. Cost: d x n_lines x 25 evaluations per image."""
    lower, upper = (np.asarray(b, np.float64).reshape(-1) for b in operator.domain)
    d = lower.size
    rng = np.random.default_rng(seed)
    u = np.linspace(0.0, 1.0, _LINE)
    pts = []
    for a in range(d):
        p = np.repeat(rng.uniform(size=(n_lines, d)), _LINE, axis=0)
        p[:, a] = np.tile(u, n_lines)
        pts.append(p)
    theta = jnp.asarray(lower + (upper - lower) * np.concatenate(pts), jnp.float32)
    f = jax.jit(lambda o: operator.log_likelihood_matrix(theta, o))
    n = len(obs)
    L = (
        np.concatenate(map_batches(f, obs, batch_size))
        .astype(np.float64)
        .reshape(n, d, n_lines, _LINE)
        .transpose(1, 0, 2, 3)
    )
    out = np.zeros((d, len(_PROBED)))
    for j, k in enumerate(_PROBED):
        stride = (_LINE - 1) // (k - 1)
        off = np.ones(_LINE, bool)
        off[::stride] = False
        weights = interpolation_matrix(u, 0.0, 1.0, k).T  # (k, _LINE), the same for every CV
        for a in range(d):
            line = L[a].reshape(-1, _LINE)
            err = line[:, ::stride] @ weights - line
            out[a, j] = float(np.sqrt(np.mean(err[:, off] ** 2)))
    return out


def choose_resolution(
    operator: AbstractRandomOperator,
    obs: Observations,
    *,
    tolerance: float = 0.02,
    max_nodes: int = 640,
    max_per_cv: int = 65,
    n_lines: int = 4,
    seed: int = 0,
) -> Resolution:
    """Nodes per CV for :meth:`LogLikTableOperator.build`: on each CV the fewest whose measured
    interpolation error (:func:`probe_interpolation` on ``obs``, a pilot subset of the images)
    is at most ``tolerance`` nats, at least 4. CVs differ: a CV along which the images change a
    lot needs many nodes, one along which they hardly change needs four. When the product
    exceeds ``max_nodes`` (the tabulation renders every image at every node; 640 is about the
    5^4 of the fixed grid used before in 4-D, 1.6x its 7^3 and 20^2), the tolerance is raised
    until it fits, so that every CV has the same error, and :attr:`Resolution.capped` is set.

    The tolerance is far below what one image's likelihood would need because the error is not
    noise: every image is interpolated between the same nodes, so the errors add up across
    images at the same places. On two-hinge (1,000 images at SNR 0.01, the log-likelihood
    spanning 2.1 nats of the box per image) a table at 0.09 nats (8 x 11 nodes) made the
    bandwidth cross-validation choose no smoothing and the flow land at W2 9.3 degrees; 20 x 20
    (0.017 nats) gives 5.9.

    Why: with the same nodes on every CV, the first PCA mode of AdK (8.1 A RMS across its
    range, against 2.0 and 1.2 for the next two) was interpolated from 7 nodes at 0.8-1.0 nats
    rms error (the log-likelihood's spread across the box: 3.7 nats); the error put spikes at the
    nodes, the bandwidth cross-validation chose no smoothing and the flow collapsed onto them
    (W2 0.46 on 1,000 images, 3 CVs). On 26 x 6 x 4 nodes (0.12 nats, the 640-node budget) the
    same data give 0.26."""
    errors = probe_interpolation(operator, obs, n_lines=n_lines, seed=seed)
    needed = tuple(_nodes_needed(e, tolerance, max_per_cv) for e in errors)
    shape, tol = needed, tolerance
    while int(np.prod(shape)) > max_nodes and max(shape) > _PROBED[0]:
        tol *= 1.05  # the same error on every CV, as small as the budget allows
        shape = tuple(_nodes_needed(e, tol, max_per_cv) for e in errors)
    while shape != needed:  # what the budget leaves: a node more where the error is largest
        err = [_error_at(e, k) if k < n else -1.0 for e, k, n in zip(errors, shape, needed)]
        fits = [
            a
            for a in np.argsort(err)[::-1]
            if err[a] >= 0 and int(np.prod(shape)) // shape[a] * (shape[a] + 1) <= max_nodes
        ]
        if not fits:
            break
        shape = shape[: fits[0]] + (shape[fits[0]] + 1,) + shape[fits[0] + 1 :]
    return Resolution(
        shape=tuple(int(k) for k in shape),
        needed=tuple(int(k) for k in needed),
        tolerance=float(tolerance),
        max_nodes=int(max_nodes),
        probed=_PROBED,
        errors=tuple(tuple(float(v) for v in e) for e in errors),
        expected_error=tuple(_error_at(e, k) for e, k in zip(errors, shape)),
        n_images=len(obs),
        n_lines=int(n_lines),
    )
