"""Random forward operators F(theta, xi) = F0(theta, xi0) + noise, and the observations they explain.

The engine only needs what is defined here. A concrete operator implements ``mean`` (the
noise-free output for one conformation under one nuisance draw), ``sample_nuisance`` and the
``domain`` of theta; everything a discrepancy asks for (log-likelihood matrices, paired
squared distances, fresh samples) is derived here by ``vmap`` over particles and observations.
"""

from __future__ import annotations

import abc
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._dtypes import promote
from .noise import GaussianNoise, paired_profiled_sq_distances


class Observations(eqx.Module):
    """Observed data with (optionally) known nuisances, indices and multiplicity weights.

    ``values`` and ``nuisance`` have a leading axis over observations. ``index`` is each
    observation's position in the full data set (tabulated operators look rows up by it);
    ``weight`` multiplies its term in an objective (1 by default; bootstrap uses counts).
    """

    values: PyTree
    nuisance: PyTree | None
    index: Int[Array, " n"]
    weight: Float[Array, " n"]

    def __init__(self, values, nuisance=None, index=None, weight=None):
        n = jax.tree_util.tree_leaves(values)[0].shape[0]
        self.values = values
        self.nuisance = nuisance
        self.index = (
            jnp.arange(n, dtype=jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
        )
        self.weight = (
            jnp.ones((n,), jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
        )

    def __len__(self) -> int:
        return self.index.shape[0]

    def take(self, idx) -> Observations:
        """A sub-batch (``idx``: integer array, traced or not)."""

        def t(x):
            return jax.tree_util.tree_map(lambda a: a[idx], x)

        return Observations(
            t(self.values),
            None if self.nuisance is None else t(self.nuisance),
            self.index[idx],
            self.weight[idx],
        )

    def with_weight(self, weight) -> Observations:
        """The same observations with per-observation weights ``weight``."""
        return Observations(self.values, self.nuisance, self.index, weight)


@eqx.filter_jit
def take_rows(obs: Observations, idx) -> Observations:
    """``obs.take(idx)`` as one compiled program, for eager callers whose observations live on
    the device (op by op, ``take`` compiles ~6 small programs per array and shape). Observations
    backed by NumPy arrays would be copied to the device whole on every call: use ``take``."""
    return obs.take(idx)


def batch_workers() -> int:
    """Batches :func:`imap_ordered` runs at once: one per usable CPU core on the CPU (at most 8),
    two on an accelerator (one computes while the other's result comes back to the host).

    JAX's CPU client runs concurrent calls of a compiled program in parallel, and the
    projector's loop over cache-sized chunks is single-threaded: on a 2-core machine two
    batches at once took the 33-node table of 2,000 AdK images from 9.06 s to 5.63 s
    (``benchmarks/concurrent_batches.py``). ``CRYOSIP_BATCH_WORKERS`` overrides the rule.
    """
    env = os.environ.get("CRYOSIP_BATCH_WORKERS")
    if env:
        return max(1, int(env))
    if jax.default_backend() != "cpu":
        return 2
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


_END = object()


def imap_ordered(fn: Callable, items, *, workers: int | None = None) -> Iterator:
    """``fn(item)`` for every item, yielded in order; the first alone (it compiles what ``fn``
    compiles), the others ``workers`` at a time on threads (default :func:`batch_workers`), at
    most ``workers`` results ahead of the consumer (memory stays at a few items' outputs).

    ``fn`` should return host (NumPy) values, so that each thread waits for its own program.
    For pure ``fn`` the results do not depend on ``workers``."""
    items = list(items)
    if not items:
        return
    yield fn(items[0])
    workers = batch_workers() if workers is None else max(1, int(workers))
    rest = iter(items[1:])
    if workers == 1:
        yield from map(fn, rest)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, x) for x in itertools.islice(rest, workers))
        while pending:
            done = pending.popleft().result()
            nxt = next(rest, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield done


def map_batches(
    fn: Callable[[Observations], PyTree],
    obs: Observations,
    batch_size: int,
    *,
    progress: Callable[[int], object] | None = None,
    workers: int | None = None,
) -> list:
    """``fn`` on every ``batch_size`` rows of ``obs``, its outputs as NumPy arrays cut to the
    batch's real rows, in order (one pytree per batch), run by :func:`imap_ordered`.
    ``progress(count)`` is called in order, from the calling thread.

    Every batch has ``batch_size`` rows (the last one padded with copies of the final row, so
    that a compiled ``fn`` sees one shape). The observations go to the device once and each
    thread cuts its batch by one compiled program (:func:`take_rows`): op-by-op indexing costs
    ~18 ms per batch of 13 arrays on a CPU, which was 6 of the 31 s of a 3-CV table with 3
    images per batch.
    """
    obs = jax.device_put(obs)
    n = len(obs)

    def one(s: int):
        idx = jnp.asarray(np.minimum(np.arange(s, s + batch_size), n - 1), jnp.int32)
        count = min(batch_size, n - s)
        out = fn(take_rows(obs, idx))
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:count], out), count

    results = []
    for out, count in imap_ordered(one, range(0, n, batch_size), workers=workers):
        results.append(out)
        if progress is not None:
            progress(count)
    return results


def _map_rows(f, xs, batch_size: int | None):
    """lax.map with batching (bounded memory), or vmap when batch_size is None."""
    if batch_size is None:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=batch_size)


def _map_chunks(f, xs, batch_size: int | None):
    """``f`` applied to whole chunks of ``batch_size`` rows of ``xs`` (leading axis), results
    concatenated; ``f`` itself is vectorised over a chunk. ``None``: one chunk of everything.

    Unlike :func:`_map_rows` the rows of a chunk are not vmapped one by one: ``f`` sees the
    chunk and can render all of its (row, particle) pairs as one flat batch.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if batch_size is None or n <= batch_size:
        return f(xs)
    n_chunks = -(-n // batch_size)
    total = n_chunks * batch_size

    def split(a):
        if total != n:  # pad with copies of the last row; their results are dropped
            a = jnp.concatenate([a, jnp.repeat(a[-1:], total - n, axis=0)])
        return a.reshape((n_chunks, batch_size) + a.shape[1:])

    out = jax.lax.map(f, jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda y: y.reshape((total,) + y.shape[2:])[:n], out)


def _require_nuisance(obs: Observations) -> None:
    if obs.nuisance is None:
        raise ValueError(
            "paired quantities need the nuisances of the observations (known poses/CTF)"
        )


class AbstractRandomOperator(eqx.Module):
    """A random forward operator with additive Gaussian noise."""

    noise: eqx.AbstractVar[GaussianNoise]
    fit_scale: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def mean(self, theta: Float[Array, " dim"], nuisance: PyTree) -> Array:
        """Noise-free output F0(theta, xi0) for one conformation and one nuisance draw."""

    @abc.abstractmethod
    def sample_nuisance(self, key: PRNGKeyArray, n: int) -> PyTree:
        """n independent nuisance draws (leading axis n)."""

    @property
    @abc.abstractmethod
    def domain(self) -> tuple[Float[Array, " dim"], Float[Array, " dim"]]:
        """(lower, upper) bounds of theta (may be +-inf)."""

    # ---- derived quantities used by discrepancies -------------------------------------------
    def means(self, theta: Float[Array, "n dim"], nuisance: PyTree) -> Array:
        """F0 for paired rows of theta and nuisance."""
        return jax.vmap(self.mean)(theta, nuisance)

    def sample(
        self, key: PRNGKeyArray, theta: Float[Array, "n dim"], nuisance: PyTree | None = None
    ) -> Array:
        """Fresh observations y_j = F(theta_j, xi_j) (nuisances drawn when not given)."""
        kn, ke = jax.random.split(key)
        if nuisance is None:
            nuisance = self.sample_nuisance(kn, theta.shape[0])
        return self.noise.sample(ke, self.means(theta, nuisance))

    def pair_means(self, theta: Float[Array, "n_particles dim"], nuisance: PyTree) -> Array:
        """F0(theta_i, xi_n) for every nuisance row n and particle i: (N, P, ...).

        All N x P pairs are rendered as one flat ``vmap`` over pairs (not a vmap over rows of a
        vmap over particles): a simulator with its own batching rule (the cryo-EM projector)
        then sees one batch of N x P images, which nested vmaps would hide from it.
        """
        n = jax.tree_util.tree_leaves(nuisance)[0].shape[0]
        p = theta.shape[0]
        th = jnp.tile(theta, (n,) + (1,) * (theta.ndim - 1))  # row n * P + i is theta_i
        nu = jax.tree_util.tree_map(lambda a: jnp.repeat(a, p, axis=0), nuisance)
        m = jax.vmap(self.mean)(th, nu)
        return m.reshape((n, p) + m.shape[1:])

    def node_means(self, nodes: Float[Array, "n_nodes dim"], nuisance: PyTree) -> Array:
        """F0 at fixed nodes for every nuisance row: (N, G, ...), as :meth:`pair_means`; the
        tabulation's kernel (:mod:`cryosip.sip.table`). Simulators that can share work across
        rows (a node's structure) or across nodes (a row's optics) override it."""
        return self.pair_means(nodes, nuisance)

    def paired_means(
        self,
        theta: Float[Array, "n_particles dim"],
        obs: Observations,
        batch_size: int | None = None,
    ) -> Array:
        """F0(theta_i, xi_n) for every observation n (its own nuisance) and particle i: (B, P, ...)."""
        _require_nuisance(obs)
        return _map_chunks(lambda nu: self.pair_means(theta, nu), obs.nuisance, batch_size)

    def log_likelihood_matrix(
        self,
        theta: Float[Array, "n_particles dim"],
        obs: Observations,
        *,
        key: PRNGKeyArray | None = None,
        n_nuisance: int = 64,
        batch_size: int | None = None,
    ) -> Float[Array, "n_obs n_particles"]:
        """log p(y_n | theta_i) for every observation and particle.

        Known nuisances: the Gaussian log-density under each observation's own nuisance.
        Unknown nuisances (``obs.nuisance is None``): a Monte Carlo average over ``n_nuisance``
        draws, log-mean-exp in log space.
        """

        def ll(y, m):
            return self.noise.log_likelihood(
                y, m, fit_scale=self.fit_scale, fit_offset=self.fit_scale
            )

        if obs.nuisance is not None:

            def chunk(args):
                ys, nus = args
                ms = self.pair_means(theta, nus)  # (b, P, ...)
                return jax.vmap(lambda y, m: jax.vmap(lambda mi: ll(y, mi))(m))(ys, ms)

            return _map_chunks(chunk, (obs.values, obs.nuisance), batch_size)
        if key is None:
            raise ValueError("unknown nuisances: a key is needed to draw them")
        nus = self.sample_nuisance(key, n_nuisance)
        ms = self.pair_means(theta, nus)  # (M, P, ...)

        def row_mc(y):
            lls = jax.vmap(jax.vmap(lambda m: ll(y, m)))(ms)  # (M, P)
            return jax.scipy.special.logsumexp(lls, axis=0) - jnp.log(n_nuisance)

        return _map_rows(row_mc, obs.values, batch_size)

    def paired_sq_distances(
        self,
        theta: Float[Array, "n_particles dim"],
        obs: Observations,
        batch_size: int | None = None,
    ) -> tuple[Float[Array, "n_obs n_particles"], Float[Array, "n_obs n_particles n_particles"]]:
        """(||F0(theta_i, xi_n) - y_n||^2, ||F0(theta_i, xi_n) - F0(theta_j, xi_n)||^2)."""
        _require_nuisance(obs)
        p = theta.shape[0]

        def chunk(args):
            ys, nus = args
            ms = self.pair_means(theta, nus)
            ms = ms.reshape(ms.shape[0], p, -1)  # (b, P, pixels)
            yv = ys.reshape(ys.shape[0], 1, -1)
            if self.fit_scale:  # per-image scale and offset profiled (noise.py)
                ms = ms - ms.mean(axis=-1, keepdims=True)
                yv = yv - yv.mean(axis=-1, keepdims=True)
            sq = jnp.sum(ms * ms, axis=-1)
            gram = jnp.einsum("bip,bjp->bij", ms, ms)
            dmm = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * gram, 0.0)
            if self.fit_scale:
                cross = jnp.sum(ms * yv, axis=-1)
                return paired_profiled_sq_distances(cross, sq, jnp.sum(yv * yv, axis=(1, 2)), dmm)
            dy = jnp.sum((ms - yv) ** 2, axis=-1)
            return dy, dmm

        return _map_chunks(chunk, (obs.values, obs.nuisance), batch_size)

    @property
    def obs_size(self) -> int:
        """Number of scalar entries in one observation (pixels for images)."""
        raise NotImplementedError


def _wrapped_property(name: str) -> property:
    """A read-only property: the ``name`` of ``self.wrapped``."""
    return property(lambda self: getattr(self.wrapped, name), doc=f"The wrapped operator's {name}.")


class AbstractWrappedOperator(AbstractRandomOperator):
    """An operator built on another one (``wrapped``): its noise, ``fit_scale``, ``mean``,
    nuisance draws, ``domain`` and ``obs_size`` are the wrapped operator's unless overridden."""

    @property
    @abc.abstractmethod
    def wrapped(self) -> AbstractRandomOperator:
        """The operator this one is built on."""

    noise = _wrapped_property("noise")
    fit_scale = _wrapped_property("fit_scale")
    domain = _wrapped_property("domain")
    obs_size = _wrapped_property("obs_size")

    def mean(self, theta, nuisance):
        return self.wrapped.mean(theta, nuisance)

    def sample_nuisance(self, key, n: int):
        return self.wrapped.sample_nuisance(key, n)


def reflect_into(theta: Array, lower: Array, upper: Array) -> Array:
    """Reflect coordinates into [lower, upper] (a triangle wave; identity inside, no-op for infinite bounds)."""
    theta, lower, upper = promote(theta, lower, upper)  # integer bounds: the CVs' float dtype
    finite = jnp.isfinite(lower) & jnp.isfinite(upper)
    lo = jnp.where(finite, lower, 0.0)
    width = jnp.where(finite, upper - lower, 1.0)
    z = jnp.mod(theta - lo, 2 * width)
    refl = lo + jnp.where(z > width, 2 * width - z, z)
    return jnp.where(finite, refl, theta)
