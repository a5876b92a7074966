"""Reconstruction methods as configured objects: a method's settings are its fields, and
``run(problem, key)`` gives one :class:`MethodResult`. :class:`Bootstrap` wraps any method that
can resample the images (its replicates give the bands). :data:`METHODS` is the one place where
the names the CLI takes become objects (:func:`method_from_name`); :func:`run_method` is the
string API of scripts and studies; :func:`run_streamed`: the flow on stacks larger than memory,
one minibatch read from disk per step (``cryosip reconstruct --stream``)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..conformations.base import AbstractConformationModel
from ..data.particles import ParticleStack
from ..sip import dto
from ..sip.discrepancies import (
    KL,
    Composite,
    GaussianKernel,
    PairedMMD,
    UnpairedMMD,
    balance_weights,
)
from ..sip.flow import FlowResult, TqdmProgress, WassersteinGradientFlow
from ..sip.loglik_table import LogLikTableOperator, product_nodes
from ..sip.measure import ParticleMeasure, uniform_measure
from ..sip.operator import imap_ordered, take_rows
from ..sip.smoothing import Bandwidth, expand_particles
from .calibrate import calibrate, calibrated_stack
from .fitcheck import log_prior
from .problem import Problem, default_grid_nodes, prepare

logger = logging.getLogger(__name__)

OBJECTIVES = ("kl", "mmd", "kl+mmd", "mmd-unconditional")


@dataclasses.dataclass
class MethodResult:
    """What every method returns: the recovered measure (positions, weights) and its bootstrap
    replicates; a flow's objective per step, trajectory and step size."""

    method: str
    objective: str | None
    positions: np.ndarray  # (K, d)
    weights: np.ndarray  # (K,)
    seconds: float
    losses: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    replicates: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    flow: FlowResult | None = None
    # a regularised flow: positions/weights are rho_h (particles spread by the kernel);
    # these are the particles themselves and the bandwidth
    particles: tuple[np.ndarray, np.ndarray] | None = None
    bandwidth: Bandwidth | None = None
    particle_replicates: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=list
    )
    # a flow: the step size it ran with (WGF.step_size, or resolved by its policy)
    step_size: float | None = None

    @property
    def label(self) -> str:
        """The name used in tables and file names: the method, or ``wgf-<objective>`` for a flow."""
        return self.method if self.method != "wgf" else f"wgf-{self.objective}"


def make_discrepancy(problem: Problem, objective: str, *, key, init: ParticleMeasure, batch=256):
    if objective == "kl":
        return KL()
    kernel = GaussianKernel(problem.bandwidth)
    if objective == "mmd":
        return PairedMMD(kernel)
    if objective == "mmd-unconditional":
        return UnpairedMMD(kernel, n_samples=256)
    if objective == "kl+mmd":
        terms = (KL(), PairedMMD(kernel))
        op, obs = problem.engine
        w = balance_weights(terms, key, op, init, obs.take(jnp.arange(min(batch, len(obs)))))
        logger.info("kl+mmd: weights balanced on initial gradient norms: %s", w)
        return Composite(terms, w)
    raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")


def initial_measure(problem: Problem, n_particles: int, key, init: str = "auto") -> ParticleMeasure:
    """Particles at the quantiles of the per-image MAP estimates (1-D; the flow then deconvolves),
    at the per-image MAPs of randomly chosen images (d > 1), or uniform in the domain."""
    if init == "auto":
        init = "per-image" if problem.fine_loglik is not None else "uniform"
    if init == "per-image":
        m = problem.per_image_map()
        if m.ndim == 1:
            q = np.quantile(m, (np.arange(n_particles) + 0.5) / n_particles)
            return ParticleMeasure(np.asarray(q, np.float32)[:, None])
        k1, k2 = jax.random.split(key)
        idx = jax.random.choice(k1, len(m), (n_particles,), replace=len(m) < n_particles)
        # a quarter of the fine grid's spacing of jitter: no two particles start on one node
        spacing = (problem.upper - problem.lower) / (np.asarray(problem.loglik.shape) - 1)
        u = np.asarray(jax.random.uniform(k2, (n_particles, m.shape[1]), minval=-1))
        x = np.clip(m[np.asarray(idx)] + 0.25 * spacing * u, problem.lower, problem.upper)
        return ParticleMeasure(jnp.asarray(x, jnp.float32))
    if init == "uniform":
        return uniform_measure(key, n_particles, problem.lower, problem.upper)
    raise ValueError(f"unknown init {init!r}")


@eqx.filter_jit
def _initial_gradient(disc, key, op, init, obs):
    """Gradient of the objective in the particles' positions, compiled as one program."""
    return jax.grad(lambda p: disc(key, op, ParticleMeasure(p, init.log_weights), obs))(
        init.positions
    )


@functools.partial(jax.jit, static_argnames=("n",))
def _split_keys(key, n: int):
    """``jax.random.split(key, n)`` as a tuple of n keys: one compiled program."""
    return tuple(jax.random.split(key, n))


@functools.partial(jax.jit, static_argnames=("n",))
def _resample_draw(key, b, n: int):
    kb = jax.random.fold_in(key, b)
    return kb, jax.random.randint(kb, (n,), 0, n)


def _resample_counts(key, b: int, n: int):
    """The key of the b-th bootstrap resample of n rows and how often it draws each row."""
    kb, rows = _resample_draw(key, b, n)
    return kb, np.bincount(np.asarray(rows), minlength=n)


class Method:
    """A reconstruction method: a frozen dataclass whose fields are its settings. ``_fit(problem,
    key)`` gives the result on all images and ``replicate(b)``, the b-th bootstrap replicate
    (positions, weights), a pure function of b (None: no bootstrap): the replicates run
    concurrently (:func:`~cryosip.sip.operator.imap_ordered`)."""

    resamples = True  # Bootstrap can wrap it

    def run(self, problem: Problem, key) -> MethodResult:
        """The method on all of ``problem``'s images (no bootstrap: wrap it in :class:`Bootstrap`)."""
        return self._run(problem, key, 0)

    def _run(self, problem: Problem, key, n_bootstrap: int) -> MethodResult:
        t0 = time.perf_counter()
        out, replicate = self._fit(problem, key)
        out.replicates = list(imap_ordered(replicate, range(n_bootstrap)))  # the one bootstrap loop
        self._finish(problem, out)
        out.seconds = time.perf_counter() - t0
        return out

    def _finish(self, problem: Problem, out: MethodResult) -> None:
        """Complete the result once its replicates are in."""


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """``method`` on all images, then on ``n`` resamplings of them with replacement: the
    replicates (:attr:`MethodResult.replicates`) that give the bands."""

    method: Method
    n: int = 8

    def __post_init__(self):
        if not self.method.resamples:
            raise ValueError(f"{type(self.method).__name__} has no bootstrap")

    def run(self, problem: Problem, key) -> MethodResult:
        """The wrapped method's result, with its ``n`` bootstrap replicates in ``replicates``."""
        return self.method._run(problem, key, self.n)


@dataclasses.dataclass(frozen=True)
class WGF(Method):
    """The Wasserstein(-Fisher-Rao) particle flow of ``objective`` (:data:`OBJECTIVES`) from
    ``n_particles`` particles (``init``: :func:`initial_measure`), ``n_steps`` steps of
    ``batch_size`` images (None: all; 256 for the MMDs); ``fisher_rao`` and the step size:
    :meth:`flow` (the step size used is :attr:`MethodResult.step_size`).
    ``heldout_fraction`` of the images track the objective on unseen data.

    ``bandwidth`` (KL flow on a tabulated likelihood): the regularisation of the recovered
    measure, a kernel of that relative width (:mod:`cryosip.sip.smoothing`); ``"auto"`` chooses
    it by cross-validation over images, 0 or None turns it off. With it, the flow runs on the
    kernel-smoothed likelihood, the particles' weights are then converged by EM on their final
    positions (the Fisher-Rao part of the flow run to its end; not when the chosen bandwidth is
    0, where that would give the spiky NPMLE), and ``positions``/``weights`` are the smoothed
    measure (``particles``: the particles themselves). A bootstrap replicate reruns the flow
    from the final particles for a third of the steps (at least 50)."""

    objective: str = "kl"
    n_particles: int = 64
    n_steps: int = 300
    batch_size: int | None = None
    entropy: float = 0.0
    fisher_rao: float | None = None
    step_size: float | None = None
    step_fraction: float = 0.003
    init: str = "auto"
    heldout_fraction: float = 0.0
    bandwidth: float | str | None = "auto"
    progress: bool = True
    checkpoint: str | None = None  # a path
    checkpoint_every: int = 0
    resume: bool = False

    def _fit(self, problem: Problem, key):
        op, obs = problem.engine
        objective, batch_size = self.objective, self.batch_size
        k_init, k_flow, k_boot = _split_keys(key, 3)
        m0 = initial_measure(problem, self.n_particles, k_init, self.init)
        choice, bandwidth = None, self.bandwidth
        if objective == "kl" and problem.loglik is not None and bandwidth not in (None, 0, 0.0):
            choice, op = problem.regularised(bandwidth)
            obs = op.observations()
        elif objective != "kl" and isinstance(problem.table, LogLikTableOperator):
            if problem.observations is None:
                raise ValueError(f"{objective} needs images; this problem has a likelihood table")
            op, obs = problem.operator, problem.observations  # MMD needs images: the direct path
        if objective in ("mmd", "kl+mmd") and batch_size is None:
            batch_size = min(len(obs), 256)
        disc = make_discrepancy(problem, objective, key=k_flow, init=m0)
        held = None
        if self.heldout_fraction > 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 7), len(obs)))
            n_held = max(1, int(round(self.heldout_fraction * len(obs))))
            held, obs = (obs.take(jnp.asarray(np.sort(p))) for p in (perm[:n_held], perm[n_held:]))
        flow = self.flow(problem, disc, m0, k_flow, batch_size, engine=(op, obs))
        if held is not None:
            flow = dataclasses.replace(flow, heldout_every=flow.chunk_size)
        res = flow.run(
            disc,
            op,
            obs,
            m0,
            key=k_flow,
            progress=TqdmProgress(f"wgf {objective}") if self.progress else None,
            checkpoint=self.checkpoint,
            checkpoint_every=self.checkpoint_every,
            resume=self.resume,
            heldout=held,
        )

        def finish(measure, counts=None):
            """(positions, weights) reported: the particles, or with a bandwidth the smoothed
            measure after the weights are converged by EM on the particles' positions."""
            x = np.asarray(measure.positions)
            if choice is None or choice.relative == 0:
                # no kernel: the flow's own (damped Fisher-Rao) weights; converging them by EM
                # gives the spiky NPMLE (W1 0.036 against 0.011 on 300 cryojax images)
                return x, np.asarray(measure.weights)
            L = dto.loglik_on_nodes(op, op.observations(), x, batch_size=1024)
            w, _ = dto.em_weights(L, obs_weight=counts)
            return x, w

        train = None  # with a held-out split, the weights are converged on the training rows
        if choice is not None and held is not None:
            train = np.zeros(len(op.observations()))
            train[np.asarray(obs.index)] = 1.0
        x, w = finish(res.measure, train)
        losses, trajectory = np.asarray(res.losses), np.asarray(res.trajectory)
        out = MethodResult("wgf", objective, x, w, 0.0, losses, trajectory, flow=res)
        out.bandwidth, out.step_size = choice, float(flow.step_size)
        boot_flow = dataclasses.replace(flow, n_steps=max(50, self.n_steps // 3))
        n_all = len(op.observations()) if choice is not None else len(obs)

        def replicate(b):
            kb, counts = _resample_counts(k_boot, b, len(obs))
            weighted = obs.with_weight(jnp.asarray(counts, jnp.float32))
            r = boot_flow.run(disc, op, weighted, res.measure, key=kb)
            full = np.zeros(n_all)  # the counts on every table row (held-out rows: 0)
            full[np.asarray(obs.index)] = counts
            return finish(r.measure, full if choice is not None else None)

        return out, replicate

    def flow(self, problem, disc, init, key, batch_size, engine=None) -> WassersteinGradientFlow:
        """The flow this runs on ``engine`` (operator, observations; default: the problem's).
        ``fisher_rao`` None: 0.3 for KL only (its first variation -R_i/w_i has a natural scale,
        0.3 is a damped EM step; for MMD terms the scale is arbitrary and minibatch noise in it
        makes weights random-walk, so those flows keep equal weights). ``step_size`` None: the
        median particle's initial velocity moves it ``step_fraction`` of the domain per step."""
        op, obs = engine or problem.engine
        width, step = float(np.max(problem.upper - problem.lower)), self.step_size
        if step is None:
            sub = obs if batch_size is None else obs.take(jnp.arange(min(batch_size, len(obs))))
            g = np.asarray(_initial_gradient(disc, key, op, init, sub))
            v = init.n_particles * np.linalg.norm(g, axis=-1)
            med = float(np.median(v[v > 0])) if np.any(v > 0) else 1.0
            step = self.step_fraction * width / med
        fr = self.fisher_rao if self.fisher_rao is not None else 0.3 * (self.objective == "kl")
        return WassersteinGradientFlow(
            step_size=step,
            n_steps=self.n_steps,
            batch_size=batch_size,
            entropy=self.entropy,
            max_displacement=0.02 * width,
            fisher_rao=fr,
            schedule="cosine",
            chunk_size=25,
        )

    def _finish(self, problem: Problem, out: MethodResult) -> None:
        if out.bandwidth is not None:  # a regularised flow: report the kernel mixture
            h, lo, hi = out.bandwidth.absolute, problem.lower, problem.upper
            out.particles, out.particle_replicates = (out.positions, out.weights), out.replicates
            out.positions, out.weights = expand_particles(*out.particles, h, lo, hi)
            out.replicates = [expand_particles(xb, wb, h, lo, hi) for xb, wb in out.replicates]


def _grid_loglik(problem: Problem, per_cv: int | None, name: str):
    """(nodes, (N, K) log-likelihood) of the grid methods: the table's nodes (1-D), the
    log-likelihood table's grid (d > 1), else the direct likelihood on a regular grid of
    ``per_cv`` nodes per CV over the (bounded) CV box."""
    tab = problem.table
    if problem.fine_loglik is not None and problem.fine_grid.ndim == 1:  # 1-D: table nodes
        nodes = np.asarray(tab.nodes).reshape(-1, 1)
        return nodes, problem.fine_loglik[:, :: (len(problem.fine_grid) - 1) // (len(nodes) - 1)]
    if isinstance(tab, LogLikTableOperator) and per_cv in (None, tab.shape[0]):
        return np.asarray(tab.nodes), np.asarray(tab.table)  # d > 1: the table's grid
    lo, hi = np.asarray(problem.lower, np.float64), np.asarray(problem.upper, np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("grid methods need a bounded CV domain")
    k = default_grid_nodes(lo.size) if per_cv is None else int(per_cv)
    nodes = product_nodes(lo, hi, (k,) * lo.size)
    logger.info("%s: %d grid nodes (%d per CV)", name, len(nodes), k)
    op, obs = problem.engine
    return nodes, dto.loglik_on_nodes(op, obs, nodes, batch_size=max(1, 4096 // len(nodes)))


@dataclasses.dataclass(frozen=True)
class EMGrid(Method):
    """The weights of fixed grid nodes converged by EM (the grid NPMLE, :func:`_grid_loglik`;
    ``nodes`` per CV, None: the table's)."""

    nodes: int | None = None

    def _fit(self, problem: Problem, key):
        nodes, L = _grid_loglik(problem, self.nodes, "em-grid")
        w, _ = dto.em_weights(L)

        def replicate(b):
            counts = _resample_counts(key, b, L.shape[0])[1]
            return nodes, dto.em_weights(L, obs_weight=counts)[0]

        return MethodResult("em-grid", "kl", nodes, w, 0.0), replicate


@dataclasses.dataclass(frozen=True)
class PerImageMAP(Method):
    """Every image's most likely CV, equally weighted (on the fine grid when the problem has one,
    else on :func:`_grid_loglik`'s nodes). Bootstrap: the images resampled (numpy)."""

    nodes: int | None = None

    def _fit(self, problem: Problem, key):
        if problem.fine_loglik is not None:
            m = problem.per_image_map()
        else:
            nodes, L = _grid_loglik(problem, self.nodes, "per-image")
            m = nodes[np.argmax(L, 1)]
        m = m.reshape(m.shape[0], -1)
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        out = MethodResult("per-image", None, m, np.full(len(m), 1.0 / len(m)), 0.0)

        def replicate(b):
            rng = np.random.default_rng([seed, b])  # replicate b's own draws
            return m[rng.integers(0, len(m), len(m))], np.full(len(m), 1.0 / len(m))

        return out, replicate


@dataclasses.dataclass(frozen=True)
class MAPClasses(Method):
    """``n_particles`` discrete classes by MAP-EM (:func:`cryosip.sip.dto.map_classes`)."""

    n_particles: int = 64
    resamples = False

    def _fit(self, problem: Problem, key):
        op, obs = problem.engine
        meas = dto.map_classes(op, obs, self.n_particles, key=key)
        x, w = np.asarray(meas.positions), np.asarray(meas.weights)
        return MethodResult("map-classes", "kl", x, w, 0.0), None


@dataclasses.dataclass(frozen=True)
class GMM(Method):
    """A Gaussian mixture of ``n_components`` fitted by EM (:func:`cryosip.sip.dto.gmm`; 1-D: on
    the fine grid)."""

    n_components: int = 2
    resamples = False

    def _fit(self, problem: Problem, key):
        fine = problem.fine_grid
        grid = fine if fine is not None and fine.ndim == 1 else None
        op, obs = problem.engine
        meas = dto.gmm(op, obs, self.n_components, key=key, grid=grid)
        meas = meas[0] if isinstance(meas, tuple) else meas
        x, w = np.asarray(meas.positions), np.asarray(meas.weights)
        return MethodResult("gmm", "kl", x, w, 0.0), None


# the one place where the methods' names (the CLI's --method) become objects
METHODS: dict[str, type[Method]] = {
    "wgf": WGF,
    "em-grid": EMGrid,
    "per-image": PerImageMAP,
    "map-classes": MAPClasses,
    "gmm": GMM,
}


def method_from_name(name: str, **settings) -> Method:
    """The method called ``name`` (:data:`METHODS`) with those of ``settings`` that are its
    fields (settings of other methods are ignored: one set of options configures any method;
    a setting no method takes is a TypeError)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {tuple(METHODS)}")
    known = {f.name for c in METHODS.values() for f in dataclasses.fields(c)}
    if unknown := sorted(set(settings) - known):
        raise TypeError(f"no method takes the setting(s) {', '.join(unknown)}")
    cls = METHODS[name]
    return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})


def run_method(problem, method="wgf", objective="kl", *, key, n_bootstrap=0, grid_nodes=None, **kw):
    """Run the method called ``method`` (:func:`method_from_name`: ``objective``, ``grid_nodes``
    as ``nodes`` and ``kw``) with ``n_bootstrap`` replicates when it has a bootstrap."""
    m = method_from_name(method, objective=objective, nodes=grid_nodes, **kw)
    return (Bootstrap(m, n_bootstrap) if n_bootstrap and m.resamples else m).run(problem, key)


@eqx.filter_jit
def _llm_weighted(op, pos, logw, obs):
    return op.log_likelihood_matrix(pos, obs) + logw[None, :]


def posterior_responsibilities(
    problem: Problem, result: MethodResult, chunk: int = 1024
) -> np.ndarray:
    """(N, K) float32 posterior probability of each image over the K recovered particles
    (the recovered weights as the prior, the engine's likelihood)."""
    op, obs = problem.engine
    pos = np.asarray(result.positions, np.float32)
    logw = log_prior(np.asarray(result.weights, np.float32))
    n = len(obs)
    chunk = min(chunk, n)
    out = []
    for s in range(0, n, chunk):
        # the last chunk padded with repeats of the last image: one compiled shape (the
        # softmax is per row: the padding rows are dropped after it). The softmax stays op by
        # op: compiled as one program, XLA fuses exp(x - max) and changes the last bits
        idx = np.minimum(np.arange(s, s + chunk), n - 1).astype(np.int32)
        lj = _llm_weighted(op, pos, logw, take_rows(obs, idx))
        out.append(np.asarray(jax.nn.softmax(lj, axis=1), np.float32)[: min(chunk, n - s)])
    return np.concatenate(out)


def posterior_cv(
    problem: Problem, result: MethodResult
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image posterior mean and sd of the CV under the recovered distribution, and the
    responsibilities they come from (:func:`posterior_responsibilities`)."""
    r = posterior_responsibilities(problem, result).astype(np.float64)
    pos = np.asarray(result.positions, np.float64)
    m = r @ pos
    v = r @ (pos**2) - m**2
    return m, np.sqrt(np.maximum(v, 0.0)), r.astype(np.float32)


def run_streamed(
    stack: ParticleStack,
    conformation: AbstractConformationModel,
    method: WGF,
    *,
    key,
    batch_size: int = 256,
    devices: int | None = None,
    fit_scale: bool = True,
    n_nodes: int = 33,
    pilot_images: int = 512,
    prefetch: int = 2,
    stop=None,
    **calibration,
) -> tuple[Problem | None, MethodResult]:
    """The particle flow ``method`` on the direct operator, fed one minibatch read from disk per
    step (its ``batch_size``, ``init``, ``heldout_fraction`` and ``bandwidth`` are not used).

    For stacks larger than memory: the images are never loaded whole (peak memory does not grow
    with the number of images, ``benchmarks/scaling.py``). Every step renders and differentiates
    ``batch_size x n_particles`` images (:class:`~cryosip.pipeline.operator.CryoEMOperator`), so
    this path works for any CV dimension. ``calibration``: the options of
    :func:`~cryosip.pipeline.calibrate.calibrate` (sigma, contrast, box_size, noise, envelope),
    ``fit_scale`` and ``n_nodes``: :func:`prepare`'s. A *pilot* subset of ``pilot_images`` random images is
    prepared first (:func:`prepare`; tabulated for 1-D CVs) to choose what the in-memory pipeline
    chooses from all images: the contrast sign, the initial particles (per-image-MAP quantiles),
    the kernel bandwidth and the step size. ``devices`` > 1 splits each minibatch over that many devices
    (:mod:`cryosip.sip.sharding`; particles replicated): ``batch_size`` must be a multiple of it.

    Several processes (``jax.distributed`` initialised, ``jax.process_count()`` > 1): every
    process calls this with the same arguments; each minibatch is split over every process's
    devices and each process reads only its own rows of it; only process 0 calibrates and
    prepares the pilot, and the others receive its calibration, operator, objective, initial
    particles and step sizes (pickled, bit for bit), so every process takes the same steps and
    none compiles the pilot's programs for its own device. ``devices`` is then ignored (all
    devices of all processes are used).

    The method's ``checkpoint`` (a path) with ``checkpoint_every`` k: the flow's state and the stream position
    are saved every k steps (process 0 writes); ``resume`` continues from it (same particles as
    an uninterrupted run). ``stop(step)`` True ends the flow early (tests).

    Returns the pilot :class:`Problem` (its operator is the direct one; None on the processes
    other than 0 of a multi-process run) and the flow's result.
    Not available here: bootstrap bands and per-image posteriors (both need passes over every
    image). No per-image table is written, so ``stack.metadata`` is not needed: the CLI drops it
    before the call (O(N) strings; memory stays flat in N).
    """
    from ..data.star import release_freed_memory
    from ..data.streaming import MinibatchStream, spill_rows
    from ..sip import sharding
    from ..sip.streaming_flow import run_streaming

    objective, n_particles, n_steps = method.objective, method.n_particles, method.n_steps
    if objective not in ("kl", "mmd", "kl+mmd"):
        raise ValueError(f"streamed reconstruction supports kl, mmd and kl+mmd, not {objective!r}")
    t0 = time.perf_counter()
    n = len(stack)
    batch_size = int(min(batch_size, n))
    multi = jax.process_count() > 1
    n_dev = len(jax.devices()) if multi else (1 if devices is None else int(devices))
    if n_dev > 1 and batch_size % n_dev:
        raise ValueError(f"batch size {batch_size} does not split evenly over {n_dev} devices")
    k_pilot, k_init, k_flow, k_stream = jax.random.split(key, 4)
    # in a multi-process run only process 0 calibrates and builds the pilot; the others take
    # its results (bit for bit) instead of compiling the same programs for their own device:
    # JAX caches compiled programs from process 0 only (docs/scaling.md)
    lead = jax.process_index() == 0
    if lead:
        working, cal = calibrate(stack, conformation, n_pilot=pilot_images, **calibration)
    if multi:
        cal = sharding.share_from_first_process(cal if lead else None)
        if not lead:
            working = calibrated_stack(stack, cal)
    # the calibration's per-image envelope and noise group: held out of memory like the rest
    stack = dataclasses.replace(working, nuisance=spill_rows(working.nuisance))
    del working
    release_freed_memory()  # the calibration's per-image temporaries
    pilot_idx = np.sort(
        np.asarray(jax.random.choice(k_pilot, n, (min(pilot_images, n),), replace=False))
    )
    # the pilot's rows are read into memory it owns, so the stack's file pages do not stay in
    # this process's RSS (peak memory must not grow with the stack: benchmarks/time_to_answer.py)
    pilot = None
    if lead:
        rows = stack.read(pilot_idx)
        pilot = prepare(
            rows,
            conformation,
            fit_scale=fit_scale,
            n_nodes=n_nodes,
            progress=False,
            calibration=cal,
        )
        m0 = initial_measure(pilot, n_particles, k_init)
        disc = make_discrepancy(pilot, objective, key=k_flow, init=m0)
        flow = method.flow(pilot, disc, m0, k_flow, min(batch_size, len(pilot_idx)))
        op = pilot.operator
    if multi:  # the same start, objective, operator and step sizes on every process
        op, disc, m0, flow = sharding.share_from_first_process(
            (op, disc, m0, flow) if lead else None
        )
    shard = None
    if n_dev > 1:
        if not multi and n_dev > len(jax.devices()):
            raise ValueError(
                f"{n_dev} devices asked for, {len(jax.devices())} available: {jax.devices()}"
            )
        mesh = sharding.make_mesh(jax.devices() if multi else jax.devices()[:n_dev])
        op = sharding.DataParallelOperator(op, mesh)
        m0 = sharding.replicate(m0, mesh)
        if multi:
            op, disc = sharding.replicate((op, disc), mesh)
        shard = sharding.data_sharding(mesh)
    if pilot is not None:
        pilot = dataclasses.replace(pilot, setup_seconds=time.perf_counter() - t0)
    t1 = time.perf_counter()
    transform = jax.jit(lambda b: cal.transform(b))  # one compiled program, global arrays too
    streams = []

    def batches(start: int):
        s = MinibatchStream(
            stack, batch_size, k_stream, prefetch=prefetch, sharding=shard, start=start
        ).start()
        streams.append(s)
        return (transform(b) for b in s)

    keys = {"flow_key": jax.random.key_data(k_flow), "stream_key": jax.random.key_data(k_stream)}
    tag = dict(keys, n_images=n, batch_size=batch_size, n_particles=n_particles, n_steps=n_steps)
    shown = method.progress and jax.process_index() == 0
    bar = TqdmProgress(f"wgf {objective} (streamed)") if shown else None
    try:
        res = run_streaming(
            flow,
            disc,
            op,
            batches,
            m0,
            key=k_flow,
            progress=bar,
            checkpoint=method.checkpoint,
            checkpoint_every=method.checkpoint_every,
            resume=method.resume,
            checkpoint_tag=tag,
            stop=stop,
        )
    finally:
        for s in streams:
            s.close()
    for s in streams:
        counts = (s.n_batches, batch_size, s.rows_per_batch, s.read_seconds, s.wait_seconds)
        logger.info(
            "streamed %d minibatches of %d images (%d read here): reader busy %.1f s, flow "
            "waited %.1f s for data",
            *counts,
        )
    x, w = np.asarray(res.measure.positions), np.asarray(res.measure.weights)
    seconds, step = time.perf_counter() - t1, float(flow.step_size)
    losses, traj = np.asarray(res.losses), np.asarray(res.trajectory)
    out = MethodResult("wgf", objective, x, w, seconds, losses, traj, flow=res, step_size=step)
    return pilot, out
