"""The problem every method solves, computed once from a particle stack: the calibrated operator,
the observations and (bounded CV domain) the likelihood tables (the library behind
``cryosip reconstruct`` and ``cryosip demo``; the methods: :mod:`cryosip.pipeline.methods`)."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..conformations.base import AbstractConformationModel
from ..data.particles import ParticleStack
from ..sip import dto
from ..sip.discrepancies import median_distance
from ..sip.flow import TqdmProgress
from ..sip.loglik_table import LogLikTableOperator, Resolution, choose_resolution
from ..sip.smoothing import Bandwidth, choose_bandwidth, refine, smooth
from ..sip.table import TabulatedOperator
from .calibrate import Calibration, calibrate
from .operator import CryoEMOperator
from .pose_marginal import PoseMarginalOperator

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a method needs, computed once (immutable): the operator, the observations and
    (1-D CVs) the tables."""

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
            lo, hi = float(self.fine_grid[0]), float(self.fine_grid[-1])
            object.__setattr__(self, "loglik", LogLikTableOperator(self.fine_loglik, lo, hi))

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
    def engine(self):
        """(operator, observations) the methods run on: the table's when there is one."""
        t = self.table
        return (t, t.observations()) if t is not None else (self.operator, self.observations)

    def per_image_map(self) -> np.ndarray:
        """(N,) in 1-D, (N, d) above: each image's most likely CV on the fine grid."""
        if self.fine_loglik is None:
            raise ValueError("per-image MAP needs a tabulated likelihood (a bounded CV domain)")
        return self.fine_grid[np.argmax(self.fine_loglik, axis=1)]


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
    if use_table is None:  # a bounded domain
        use_table = bool(np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)))
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
    else:
        n_nodes = default_grid_nodes(dim) if n_nodes is None else int(n_nodes)
    table = fine_grid = fine_ll = loglik = None
    if use_table:
        bar = TqdmProgress("tabulate") if progress else None
        if bar is not None:
            bar.start(len(stack))
        adv = bar.advance if bar else None
        try:
            if pose_error is not None:
                rot, shift = (float(x) for x in pose_error)
                pm = PoseMarginalOperator(op, 16, rot, shift, jax.random.key(0))
                table = pm.tabulate(obs, n_nodes, batch_size=max(1, batch_size // 4), progress=adv)
            elif dim == 1:  # images on the nodes (Gram tables): KL and paired MMD, exact splines
                # batch_size // 4 images per call (16: 528 renders at 33 nodes); on 2 cores with
                # 2 threads 5.9 s against 6.5 s for 64 images per call (2,000 AdK images, 64 px;
                # the same table to the bit)
                table = TabulatedOperator.build(
                    op, obs, n_nodes, batch_size=max(1, batch_size // 4), progress=adv
                )
            else:  # any d: the log-likelihood on a product grid, n_nodes per CV
                b = loglik_table_batch(int(np.prod(n_nodes)), 1, batch_size)
                table = LogLikTableOperator.build(op, obs, n_nodes, batch_size=b, progress=adv)
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
    tables = (table, lower, upper, fine_grid, fine_ll, bw, time.perf_counter() - t0)
    return Problem(op, obs, *tables, calibration, stack, loglik, resolution)


def loglik_table_batch(n_nodes: int, dim: int, batch_size: int = 64) -> int:
    """Images per compiled call when tabulating the log-likelihood on n_nodes^dim nodes:
    ``batch_size x 32`` (image, node) pairs, at least one image."""
    return max(1, (batch_size * 32) // n_nodes**dim)


def default_grid_nodes(dim: int) -> int:
    """Grid nodes per CV for grid methods in ``dim`` dimensions: at most ~400 nodes in all
    (20 per CV in 2-D, 7 in 3-D, 5 in 4-D; 33 in 1-D, the tabulated path's grid)."""
    return 33 if dim == 1 else max(5, int(np.floor(400 ** (1.0 / dim) + 1e-9)))
