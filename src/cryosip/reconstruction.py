"""End-to-end reconstruction of a CV distribution from a particle stack (the library behind
``cryosip reconstruct`` and ``cryosip demo``)."""

from __future__ import annotations

import dataclasses
import logging
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .conformations.base import AbstractConformationModel
from .data.particles import ParticleStack
from .pipeline.calibrate import Calibration, calibrate
from .pipeline.operator import CryoEMOperator
from .pipeline.pose_marginal import PoseMarginalOperator
from .sip import dto
from .sip.discrepancies import (
    KL,
    Composite,
    GaussianKernel,
    PairedMMD,
    UnpairedMMD,
    balance_weights,
    median_distance,
)
from .sip.flow import FlowResult, TqdmProgress, WassersteinGradientFlow
from .sip.loglik_table import LogLikTableOperator, Resolution, choose_resolution, product_nodes
from .sip.measure import ParticleMeasure, uniform_measure
from .sip.smoothing import Bandwidth, choose_bandwidth, expand_particles, refine, smooth
from .sip.table import TabulatedOperator

logger = logging.getLogger(__name__)

METHODS = ("wgf", "em-grid", "per-image", "map-classes", "gmm")
OBJECTIVES = ("kl", "mmd", "kl+mmd", "mmd-unconditional")


@dataclasses.dataclass
class Problem:
    """Everything a method needs, computed once: the operator, the observations and (1-D CVs) the tables."""

    operator: CryoEMOperator
    observations: object
    table: TabulatedOperator | LogLikTableOperator | None
    lower: np.ndarray
    upper: np.ndarray
    fine_grid: np.ndarray | None
    fine_loglik: np.ndarray | None
    bandwidth: float
    setup_seconds: float
    calibration: Calibration | None = None
    stack: ParticleStack | None = None  # the working stack (cropped, with noise groups)
    # the likelihood on a fine product grid (any d), what regularisation and KL flows run on
    loglik: LogLikTableOperator | None = None
    # d > 1: how the table's nodes per CV were chosen (None: given, or 1-D)
    resolution: Resolution | None = None
    _bandwidth: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        # a 1-D problem built with its fine log-likelihood (the studies build their own) gets the
        # likelihood table the regularised KL flow runs on from it
        if self.loglik is None and self.fine_loglik is not None and np.ndim(self.fine_grid) == 1:
            self.loglik = LogLikTableOperator(
                self.fine_loglik, float(self.fine_grid[0]), float(self.fine_grid[-1])
            )

    def regularised(self, bandwidth: float | str = "auto") -> tuple[Bandwidth, LogLikTableOperator]:
        """The kernel-smoothed likelihood table (:mod:`cryosip.sip.smoothing`) with its bandwidth:
        ``"auto"`` chooses it by cross-validation over images (computed once, cached), a number
        is a relative bandwidth given by the user (0: none)."""
        if self.loglik is None:
            raise ValueError("regularisation needs a likelihood table (a bounded CV domain)")
        if bandwidth == "auto":
            if "auto" not in self._bandwidth:
                t0 = time.perf_counter()
                self._bandwidth["auto"] = choose_bandwidth(self.loglik)
                logger.info(
                    "regularisation: kernel bandwidth %.3g of the CV range, chosen by held-out "
                    "likelihood in %.1f s",
                    self._bandwidth["auto"][0].relative,
                    time.perf_counter() - t0,
                )
            return self._bandwidth["auto"]
        h = float(bandwidth)
        lo, hi = np.asarray(self.loglik.lower_bounds), np.asarray(self.loglik.upper_bounds)
        given = Bandwidth(h, tuple(float(v) for v in h * (hi - lo)), (h,), (0.0,), 0, 0.0)
        return given, smooth(self.loglik, h)

    @property
    def inverted(self) -> bool:
        """The observations are the input images with their contrast flipped."""
        return self.calibration is not None and self.calibration.inverted

    @property
    def engine_operator(self):
        return self.table if self.table is not None else self.operator

    @property
    def engine_observations(self):
        return self.table.observations() if self.table is not None else self.observations

    def per_image_map(self) -> np.ndarray:
        """(N,) in 1-D, (N, d) above: each image's most likely CV on the fine grid."""
        if self.fine_loglik is None:
            raise ValueError("per-image MAP needs a tabulated likelihood (a bounded CV domain)")
        return self.fine_grid[np.argmax(self.fine_loglik, axis=1)]


@dataclasses.dataclass
class MethodResult:
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

    @property
    def label(self) -> str:
        return self.method if self.method != "wgf" else f"wgf-{self.objective}"


# images of the pilot that measures the log-likelihood's interpolation error per CV (d > 1)
PILOT_IMAGES = 64

# cryosip's own simulations follow the model exactly: no per-image amplitude, no envelope, the
# box they were simulated at. Studies of the method (experiments, the demo) state it with these.
EXACT_PHYSICS = {"fit_scale": False, "envelope": False, "keep_box": True}


def prepare(
    stack: ParticleStack,
    conformation: AbstractConformationModel,
    *,
    sigma: float | None = None,
    contrast: str = "auto",
    fit_scale: bool = True,
    n_nodes: int | None = None,
    use_table: bool | None = None,
    progress: bool = True,
    batch_size: int = 64,
    box_size: int | None = None,
    noise: str = "coloured",
    envelope: bool = True,
    keep_box: bool = False,
    pose_error: tuple[float, float] | str | None = None,
    calibration: Calibration | None = None,
) -> Problem:
    """Calibrate (contrast, noise spectrum, envelope, working box: :mod:`cryosip.pipeline.calibrate`)
    unless ``calibration`` is given (then ``stack`` is already the working stack), build the
    operator in whitened working units with the per-image scale and offset profiled
    (``fit_scale``), and tabulate the likelihood on a bounded CV domain: images on ``n_nodes``
    nodes for one CV (default 33), the log-likelihood on a product grid of ``n_nodes`` per CV
    above (default: nodes per CV from the interpolation error measured on a pilot of
    ``PILOT_IMAGES`` images, :func:`~cryosip.sip.loglik_table.choose_resolution`, recorded in
    :attr:`Problem.resolution`; :func:`default_grid_nodes` with a pose average; one rendering
    per image and node, chunked: memory grows with images x nodes, not with particles). ``use_table=False`` keeps the direct operator.

    ``pose_error`` = "auto": the calibration's estimate when it says it matters
    (:attr:`~cryosip.pipeline.calibrate.Calibration.pose_error_matters`), else none;
    (rms angle in degrees, rms shift in Angstrom): tabulate the likelihood
    averaged over pose errors of that size around the given poses
    (:class:`~cryosip.pipeline.pose_marginal.PoseMarginalOperator`, 16 antithetic draws per image:
    16x the tabulation's cost); KL-based methods only (paired MMD needs images)."""
    t0 = time.perf_counter()
    if calibration is None:
        stack, calibration = calibrate(
            stack,
            conformation,
            contrast=contrast,
            box_size=stack.box_size if keep_box and box_size is None else box_size,
            noise=noise,
            sigma=sigma,
            envelope=envelope,
        )
    if isinstance(pose_error, str):
        if pose_error != "auto":
            raise ValueError(
                f"pose_error must be 'auto', (degrees, Angstrom) or None, got {pose_error!r}"
            )
        pose_error = calibration.pose_error_matters
        if pose_error is not None:
            logger.warning(
                "the given poses are off by ~%.1f degrees / %.1f A (local search on the pilot): "
                "the likelihood is averaged over pose errors of that size (16x the tabulation)",
                *pose_error,
            )
    op = CryoEMOperator(
        conformation, calibration.image_model(conformation.atoms), 1.0, fit_scale=fit_scale
    )
    obs = calibration.transform(stack.observations())
    lower, upper = (np.asarray(b, np.float64) for b in op.domain)
    bounded = bool(np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)))
    if use_table is None:
        use_table = bounded
    dim = conformation.dim
    resolution = None
    if use_table and dim > 1 and n_nodes is None and pose_error is None:
        # nodes per CV from the measured interpolation error on a pilot of the images
        m = min(len(obs), PILOT_IMAGES)
        pilot = np.unique(np.linspace(0, len(obs) - 1, m).round().astype(np.int64))
        resolution = choose_resolution(op, obs.take(jnp.asarray(pilot)))
        n_nodes = resolution.shape
        logger.info(
            "log-likelihood table: %s nodes per CV (interpolation error %s nats)%s",
            "x".join(map(str, resolution.shape)),
            ", ".join(f"{e:.2g}" for e in resolution.expected_error),
            f"; {'x'.join(map(str, resolution.needed))} would be needed for "
            f"{resolution.tolerance} nats, capped at {resolution.max_nodes} nodes"
            if resolution.capped
            else "",
        )
    elif n_nodes is None:
        n_nodes = default_grid_nodes(dim)
    else:
        n_nodes = int(n_nodes)
    table = fine_grid = fine_ll = loglik = None
    if use_table:
        bar = TqdmProgress("tabulate") if progress else None
        if bar is not None:
            bar.start(len(stack))
        try:
            if pose_error is not None:
                rot, shift = (float(x) for x in pose_error)
                table = PoseMarginalOperator(op, 16, rot, shift, jax.random.key(0)).tabulate(
                    obs,
                    n_nodes,
                    batch_size=max(1, batch_size // 4),
                    progress=bar.advance if bar else None,
                )
            elif dim == 1:  # images on the nodes (Gram tables): KL and paired MMD, exact splines
                table = TabulatedOperator.build(
                    op,
                    obs,
                    n_nodes,
                    batch_size=batch_size,
                    progress=bar.advance if bar else None,
                )
            else:  # any d: the log-likelihood on a product grid, n_nodes per CV
                table = LogLikTableOperator.build(
                    op,
                    obs,
                    n_nodes,
                    batch_size=loglik_table_batch(int(np.prod(n_nodes)), 1, batch_size),
                    progress=bar.advance if bar else None,
                )
        finally:
            if bar is not None:
                bar.close()
        if dim == 1:
            fine_grid = np.linspace(lower[0], upper[0], 8 * (n_nodes - 1) + 1)
            fine_ll = dto.loglik_on_nodes(table, table.observations(), fine_grid, batch_size=1024)
            # the table of fine_ll the regularised flow runs on: Problem.__post_init__
        else:
            loglik = refine(table)
            fine_grid = np.asarray(loglik.nodes, np.float64)
            fine_ll = np.asarray(loglik.table)
    m = min(len(stack), 1000)
    bw = median_distance(np.asarray(obs.values[:m]).reshape(m, -1))
    return Problem(
        op,
        obs,
        table,
        lower,
        upper,
        fine_grid,
        fine_ll,
        bw,
        time.perf_counter() - t0,
        calibration=calibration,
        stack=stack,
        loglik=loglik,
        resolution=resolution,
    )


def make_discrepancy(
    problem: Problem, objective: str, *, key, init: ParticleMeasure, batch: int = 256
):
    if objective == "kl":
        return KL()
    kernel = GaussianKernel(problem.bandwidth)
    if objective == "mmd":
        return PairedMMD(kernel)
    if objective == "mmd-unconditional":
        return UnpairedMMD(kernel, n_samples=256)
    if objective == "kl+mmd":
        terms = (KL(), PairedMMD(kernel))
        obs = problem.engine_observations
        sub = obs.take(jnp.arange(min(batch, len(obs))))
        w = balance_weights(terms, key, problem.engine_operator, init, sub)
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
            return ParticleMeasure(jnp.asarray(q, jnp.float32)[:, None])
        k1, k2 = jax.random.split(key)
        idx = jax.random.choice(k1, len(m), (n_particles,), replace=len(m) < n_particles)
        # a quarter of the fine grid's spacing of jitter: no two particles start on one node
        spacing = (problem.upper - problem.lower) / (np.asarray(problem.loglik.shape) - 1)
        jitter = (
            0.25
            * spacing
            * np.asarray(jax.random.uniform(k2, (n_particles, m.shape[1]), minval=-1))
        )
        x = np.clip(m[np.asarray(idx)] + jitter, problem.lower, problem.upper)
        return ParticleMeasure(jnp.asarray(x, jnp.float32))
    if init == "uniform":
        return uniform_measure(key, n_particles, problem.lower, problem.upper)
    raise ValueError(f"unknown init {init!r}")


def _auto_flow(
    problem,
    disc,
    init,
    key,
    n_steps,
    batch_size,
    entropy,
    fisher_rao,
    step_fraction=0.003,
    engine=None,
):
    """Step size from the initial velocities: the median particle moves ``step_fraction`` of the
    domain per step. ``engine`` (operator, observations): what the flow runs on (default: the
    problem's engine)."""
    op, obs = engine or (problem.engine_operator, problem.engine_observations)
    sub = obs if batch_size is None else obs.take(jnp.arange(min(batch_size, len(obs))))
    g = _initial_gradient(disc, key, op, init, sub)
    v = init.n_particles * np.linalg.norm(np.asarray(g), axis=-1)
    width = float(np.max(problem.upper - problem.lower))
    med = float(np.median(v[v > 0])) if np.any(v > 0) else 1.0
    return WassersteinGradientFlow(
        step_size=step_fraction * width / med,
        n_steps=n_steps,
        batch_size=batch_size,
        entropy=entropy,
        max_displacement=0.02 * width,
        fisher_rao=fisher_rao,
        schedule="cosine",
        chunk_size=25,
    )


@eqx.filter_jit
def _initial_gradient(disc, key, op, init, obs):
    """Gradient of the objective in the particles' positions, compiled as one program."""
    return jax.grad(lambda p: disc(key, op, ParticleMeasure(p, init.log_weights), obs))(
        init.positions
    )


def loglik_table_batch(n_nodes: int, dim: int, batch_size: int = 64) -> int:
    """Images per compiled call when tabulating the log-likelihood on n_nodes^dim nodes:
    ``batch_size x 32`` (image, node) pairs, at least one image."""
    return max(1, (batch_size * 32) // n_nodes**dim)


def default_grid_nodes(dim: int) -> int:
    """Grid nodes per CV for grid methods in ``dim`` dimensions: at most ~400 nodes in all
    (20 per CV in 2-D, 7 in 3-D, 5 in 4-D; 33 in 1-D, the tabulated path's grid)."""
    return 33 if dim == 1 else max(5, int(np.floor(400 ** (1.0 / dim) + 1e-9)))


def product_grid(lower, upper, per_cv: int | None) -> np.ndarray:
    """(per_cv^d, d) nodes on a regular grid over the (bounded) CV box."""
    lo, hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("grid methods need a bounded CV domain")
    k = default_grid_nodes(lo.size) if per_cv is None else int(per_cv)
    return product_nodes(lo, hi, (k,) * lo.size)


def default_fisher_rao(objective: str) -> float:
    """Fisher-Rao weights by default for KL only: its first variation -R_i/w_i has a natural
    scale (0.3 is a damped EM step); for MMD terms the scale is arbitrary and minibatch noise in
    it makes weights random-walk, so those flows keep equal weights."""
    return 0.3 if objective == "kl" else 0.0


def run_method(
    problem: Problem,
    method: str = "wgf",
    objective: str = "kl",
    *,
    key,
    n_particles: int = 64,
    n_steps: int = 300,
    batch_size: int | None = None,
    entropy: float = 0.0,
    fisher_rao: float | None = None,
    n_bootstrap: int = 0,
    init: str = "auto",
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: int = 0,
    resume: bool = False,
    n_components: int = 2,
    heldout_fraction: float = 0.0,
    grid_nodes: int | None = None,
    bandwidth: float | str | None = "auto",
) -> MethodResult:
    """Run one method on a prepared problem.

    ``bandwidth`` (KL flow on a tabulated likelihood): the regularisation of the recovered
    measure, a kernel of that relative width (:mod:`cryosip.sip.smoothing`); ``"auto"`` chooses
    it by cross-validation over images, 0 or None turns it off. With it, the flow runs on the
    kernel-smoothed likelihood, the particles' weights are then converged by EM on their final
    positions (the Fisher-Rao part of the flow run to its end; not when the chosen bandwidth is
    0, where that would give the spiky NPMLE), and ``positions``/``weights`` are the smoothed
    measure (``particles``: the particles themselves)."""
    t0 = time.perf_counter()
    op, obs = problem.engine_operator, problem.engine_observations
    if method == "wgf":
        if fisher_rao is None:
            fisher_rao = default_fisher_rao(objective)
        k_init, k_flow, k_boot = jax.random.split(key, 3)
        m0 = initial_measure(problem, n_particles, k_init, init)
        choice = None
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
        if heldout_fraction > 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 7), len(obs)))
            n_held = max(1, int(round(heldout_fraction * len(obs))))
            held, obs = (
                obs.take(jnp.asarray(np.sort(perm[:n_held]))),
                obs.take(jnp.asarray(np.sort(perm[n_held:]))),
            )
        flow = _auto_flow(
            problem, disc, m0, k_flow, n_steps, batch_size, entropy, fisher_rao, engine=(op, obs)
        )
        if held is not None:
            flow = dataclasses.replace(flow, heldout_every=flow.chunk_size)
        res = flow.run(
            disc,
            op,
            obs,
            m0,
            key=k_flow,
            progress=TqdmProgress(f"wgf {objective}") if progress else None,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
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
        out = MethodResult(
            "wgf",
            objective,
            x,
            w,
            0.0,
            np.asarray(res.losses),
            np.asarray(res.trajectory),
            flow=res,
        )
        if n_bootstrap:
            boot_flow = dataclasses.replace(flow, n_steps=max(50, n_steps // 3))
            n_all = len(op.observations()) if choice is not None else len(obs)
            for b in range(n_bootstrap):
                kb = jax.random.fold_in(k_boot, b)
                counts = np.bincount(
                    np.asarray(jax.random.randint(kb, (len(obs),), 0, len(obs))), minlength=len(obs)
                )
                r = boot_flow.run(
                    disc, op, obs.with_weight(jnp.asarray(counts, jnp.float32)), res.measure, key=kb
                )
                full = np.zeros(n_all)  # the counts on every table row (held-out rows: 0)
                full[np.asarray(obs.index)] = counts
                out.replicates.append(finish(r.measure, full if choice is not None else None))
        if choice is not None:
            out.particles = (out.positions, out.weights)
            out.bandwidth = choice
            lo, hi = problem.lower, problem.upper
            out.positions, out.weights = expand_particles(x, w, choice.absolute, lo, hi)
            out.particle_replicates = out.replicates
            out.replicates = [
                expand_particles(xb, wb, choice.absolute, lo, hi) for xb, wb in out.replicates
            ]
    elif method in ("em-grid", "per-image"):
        tab = problem.table
        if problem.fine_loglik is not None and problem.fine_grid.ndim == 1:  # 1-D: table nodes
            nodes = np.asarray(tab.nodes).reshape(-1, 1)
            L = problem.fine_loglik[:, :: (len(problem.fine_grid) - 1) // (len(nodes) - 1)]
        elif isinstance(tab, LogLikTableOperator) and grid_nodes in (None, tab.shape[0]):
            nodes, L = np.asarray(tab.nodes), np.asarray(tab.table)  # d > 1: the table's grid
        else:  # any d: the direct likelihood on a product grid (grid_nodes per CV)
            nodes = product_grid(problem.lower, problem.upper, grid_nodes)
            logger.info(
                "%s: %d grid nodes (%d per CV)",
                method,
                len(nodes),
                len(nodes) ** (1 / nodes.shape[1]),
            )
            L = dto.loglik_on_nodes(op, obs, nodes, batch_size=max(1, 4096 // len(nodes)))
        if method == "em-grid":
            w, _ = dto.em_weights(L)
            out = MethodResult("em-grid", "kl", nodes, w, 0.0)
            for b in range(n_bootstrap):
                kb = jax.random.fold_in(key, b)
                counts = np.bincount(
                    np.asarray(jax.random.randint(kb, (L.shape[0],), 0, L.shape[0])),
                    minlength=L.shape[0],
                )
                wb, _ = dto.em_weights(L, obs_weight=counts)
                out.replicates.append((nodes, wb))
        else:
            m = (
                problem.per_image_map()
                if problem.fine_loglik is not None
                else nodes[np.argmax(L, 1)]
            )
            m = m.reshape(m.shape[0], -1)
            out = MethodResult("per-image", None, m, np.full(len(m), 1.0 / len(m)), 0.0)
            rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
            for _ in range(n_bootstrap):
                mb = m[rng.integers(0, len(m), len(m))]
                out.replicates.append((mb, np.full(len(m), 1.0 / len(m))))
    elif method == "map-classes":
        meas = dto.map_classes(op, obs, n_particles, key=key)
        out = MethodResult(
            "map-classes", "kl", np.asarray(meas.positions), np.asarray(meas.weights), 0.0
        )
    elif method == "gmm":
        grid = (
            problem.fine_grid
            if problem.fine_grid is not None and problem.fine_grid.ndim == 1
            else None
        )
        meas = dto.gmm(op, obs, n_components, key=key, grid=grid)
        meas = meas[0] if isinstance(meas, tuple) else meas
        out = MethodResult("gmm", "kl", np.asarray(meas.positions), np.asarray(meas.weights), 0.0)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    out.seconds = time.perf_counter() - t0
    return out


@eqx.filter_jit
def _llm_weighted(op, pos, logw, obs):
    return op.log_likelihood_matrix(pos, obs) + logw[None, :]


def posterior_responsibilities(
    problem: Problem, result: MethodResult, chunk: int = 1024
) -> np.ndarray:
    """(N, K) float32 posterior probability of each image over the K recovered particles
    (the recovered weights as the prior, the engine's likelihood)."""
    op, obs = problem.engine_operator, problem.engine_observations
    pos = jnp.asarray(result.positions, jnp.float32)
    logw = jnp.log(jnp.clip(jnp.asarray(result.weights, jnp.float32), 1e-30))
    n = len(obs)
    chunk = min(chunk, n)
    out = []
    for s in range(0, n, chunk):
        # the last chunk padded with repeats of the last image: one compiled shape
        idx = jnp.asarray(np.minimum(np.arange(s, s + chunk), n - 1))
        lj = _llm_weighted(op, pos, logw, obs.take(idx))[: min(chunk, n - s)]
        out.append(np.asarray(jax.nn.softmax(lj, axis=1), np.float32))
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
    objective: str = "kl",
    *,
    key,
    n_particles: int = 64,
    n_steps: int = 300,
    batch_size: int = 256,
    devices: int | None = None,
    sigma: float | None = None,
    contrast: str = "auto",
    fit_scale: bool = True,
    box_size: int | None = None,
    noise: str = "coloured",
    envelope: bool = True,
    n_nodes: int = 33,
    pilot_images: int = 512,
    entropy: float = 0.0,
    fisher_rao: float | None = None,
    prefetch: int = 2,
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop=None,
) -> tuple[Problem, MethodResult]:
    """The particle flow on the direct operator, fed one minibatch read from disk per step.

    For stacks larger than memory: the images are never loaded whole (peak memory does not grow
    with the number of images, ``benchmarks/scaling.py``). Every step renders and differentiates
    ``batch_size x n_particles`` images (:class:`~cryosip.pipeline.operator.CryoEMOperator`), so
    this path works for any CV dimension. A *pilot* subset of ``pilot_images`` random images is
    prepared first (:func:`prepare`; tabulated for 1-D CVs) to choose what the in-memory pipeline
    chooses from all images: the contrast sign, the initial particles (per-image-MAP quantiles),
    the kernel bandwidth and the step size. ``devices`` > 1 splits each minibatch over that many devices
    (:mod:`cryosip.sip.sharding`; particles replicated): ``batch_size`` must be a multiple of it.

    Several processes (``jax.distributed`` initialised, ``jax.process_count()`` > 1): every
    process calls this with the same arguments; each minibatch is split over every process's
    devices and each process reads only its own rows of it; the calibration, the pilot's choices
    and the initial particles are process 0's (broadcast), so every process takes the same
    steps. ``devices`` is then ignored (all devices of all processes are used).

    ``checkpoint`` (a path) with ``checkpoint_every`` k: the flow's state and the stream position
    are saved every k steps (process 0 writes); ``resume`` continues from it (same particles as
    an uninterrupted run). ``stop(step)`` True ends the flow early (tests).

    Returns the pilot :class:`Problem` (its operator is the direct one) and the flow's result.
    Not available here: bootstrap bands and per-image posteriors (both need passes over every
    image). No per-image table is written, so ``stack.metadata`` is not needed: the CLI drops it
    before the call (O(N) strings; memory stays flat in N).
    """
    from .data.streaming import MinibatchStream
    from .sip import sharding
    from .sip.streaming_flow import run_streaming

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
    working, cal = calibrate(
        stack,
        conformation,
        contrast=contrast,
        box_size=box_size,
        noise=noise,
        sigma=sigma,
        envelope=envelope,
        n_pilot=pilot_images,
    )
    if multi:  # every process must whiten, sign-correct and blur exactly as process 0 does
        spec, inverted, bfactor = sharding.broadcast_from_first_process(
            (cal.noise, np.int32(cal.inverted), np.float32(cal.bfactor_in_angstroms2))
        )
        cal = dataclasses.replace(
            cal, noise=spec, inverted=bool(inverted), bfactor_in_angstroms2=float(bfactor)
        )
        nu = working.nuisance
        b0 = np.asarray(stack.nuisance.ctf.bfactor_in_angstroms2)
        ctf = dataclasses.replace(nu.ctf, bfactor_in_angstroms2=b0 + np.float32(bfactor))
        working = dataclasses.replace(working, nuisance=dataclasses.replace(nu, ctf=ctf))
    stack = working
    pilot_idx = np.sort(
        np.asarray(jax.random.choice(k_pilot, n, (min(pilot_images, n),), replace=False))
    )
    # the pilot's rows are read into memory it owns, so the stack's file pages do not stay in
    # this process's RSS (peak memory must not grow with the stack: benchmarks/time_to_answer.py)
    pilot = prepare(
        stack.read(pilot_idx),
        conformation,
        fit_scale=fit_scale,
        n_nodes=n_nodes,
        progress=False,
        calibration=cal,
    )
    if fisher_rao is None:
        fisher_rao = default_fisher_rao(objective)
    m0 = initial_measure(pilot, n_particles, k_init)
    disc = make_discrepancy(pilot, objective, key=k_flow, init=m0)
    flow = _auto_flow(
        pilot, disc, m0, k_flow, n_steps, min(batch_size, len(pilot_idx)), entropy, fisher_rao
    )
    op = pilot.operator
    if multi:  # the same start, objective, operator and step sizes on every process
        op, disc, m0, flow = sharding.broadcast_from_first_process((op, disc, m0, flow))
        pilot = dataclasses.replace(pilot, operator=op)
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
    setup = time.perf_counter() - t0
    pilot = dataclasses.replace(pilot, setup_seconds=setup)
    t1 = time.perf_counter()
    transform = jax.jit(lambda b: cal.transform(b))  # one compiled program, global arrays too
    streams = []

    def batches(start: int):
        s = MinibatchStream(
            stack, batch_size, k_stream, prefetch=prefetch, sharding=shard, start=start
        ).start()
        streams.append(s)
        return (transform(b) for b in s)

    tag = {
        "flow_key": jax.random.key_data(k_flow),
        "stream_key": jax.random.key_data(k_stream),
        "n_images": n,
        "batch_size": batch_size,
        "n_particles": n_particles,
        "n_steps": n_steps,
    }
    try:
        res = run_streaming(
            flow,
            disc,
            op,
            batches,
            m0,
            key=k_flow,
            progress=TqdmProgress(f"wgf {objective} (streamed)")
            if progress and jax.process_index() == 0
            else None,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            checkpoint_tag=tag,
            stop=stop,
        )
    finally:
        for s in streams:
            s.close()
    for s in streams:
        logger.info(
            "streamed %d minibatches of %d images (%d read here): reader busy %.1f s, flow "
            "waited %.1f s for data",
            s.n_batches,
            batch_size,
            s.rows_per_batch,
            s.read_seconds,
            s.wait_seconds,
        )
    out = MethodResult(
        "wgf",
        objective,
        np.asarray(res.measure.positions),
        np.asarray(res.measure.weights),
        time.perf_counter() - t1,
        np.asarray(res.losses),
        np.asarray(res.trajectory),
        flow=res,
    )
    return pilot, out
