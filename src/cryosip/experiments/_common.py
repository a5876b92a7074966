"""What the studies share: settings, the AdK scene and its noise-free tables, reconstruction by
method label, scores, the result tables and the figure plumbing.

**Settings.** Each study declares one frozen dataclass of :class:`Settings` whose fields are made
by :func:`setting` (default, help text, ``--quick`` value). The command line of
``cryosip experiment NAME`` is generated from it (:mod:`cryosip.cli.experiment`), so a setting
is spelled once: ``n_images`` becomes ``--n-images``, a tuple a comma-separated list, a bool a
switch.

**The noise-free sweep** (robustness, pose errors, discrepancies): the noise-free image of
particle n, its images at the CV nodes and one unit-variance noise image eps_n are rendered
once per seed; every table entry the tabulated operator needs is a polynomial in sigma,

    <m_g, y_n> = <m_g, c_n> + sigma <m_g, eps_n>,   |y_n|^2 = |c_n|^2 + 2 sigma <c_n, eps_n> + sigma^2 |eps_n|^2,

with y_n = c_n + sigma eps_n the observed image, so every SNR reuses the same renders (the data
sets differ only by the noise level, as in a dilution series), and an N-image data set is the
first N images of the seed's largest one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import _atomic
from ..analysis.metrics import w1, w2
from ..cryoem.image_model import ImageModel, NuisancePrior
from ..data.distributions import make_distribution
from ..data.models import load_model
from ..pipeline.methods import WGF, run_method
from ..pipeline.operator import CryoEMOperator
from ..pipeline.problem import Problem
from ..sip import dto
from ..sip.discrepancies import median_distance
from ..sip.measure import ParticleMeasure
from ..sip.noise import GaussianNoise
from ..sip.operator import Observations
from ..sip.table import TabulatedOperator

logger = logging.getLogger(__name__)

N_REFERENCE = 200_000  # draws of rho* used as the truth in W1/W2
FINE_FACTOR = 8  # per-image MAP / em-grid grid: (n_nodes - 1) * FINE_FACTOR + 1 points
_UNSET = object()

# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def setting(default, help: str, *, quick=_UNSET, flag=None, choices=None):
    """A study setting: its default, its help text and its ``--quick`` value where that differs.

    ``flag`` names the command-line flag (or a tuple of flags: the first, then aliases) where the
    field's name does not (``--no-2d`` for ``with_2d``); ``choices`` restricts a string setting.
    """
    meta = {"help": help, "quick": quick, "flag": flag, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings of a study (subclassed once per study; every field made by :func:`setting`)."""

    seeds: tuple[int, ...] = setting((0,), "seeds")

    @classmethod
    def quick(cls, **changes):
        """The small version that runs in minutes on a CPU (``--quick``), with ``changes``."""
        small = {
            f.name: f.metadata["quick"]
            for f in dataclasses.fields(cls)
            if f.metadata.get("quick", _UNSET) is not _UNSET
        }
        return cls(**{**small, **changes})

    def given(self, **values):
        """A copy with every value that is not None."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def _set(self, **values) -> None:
        """Normalise fields in ``__post_init__`` (the dataclass is frozen)."""
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def __post_init__(self):
        self._set(seeds=tuple(int(s) for s in self.seeds))


def check_names(given, known, what: str = "methods") -> tuple[str, ...]:
    """``given`` as a tuple, every name in ``known`` (ValueError naming the others)."""
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {tuple(known)}")
    return tuple(given)


@dataclasses.dataclass(frozen=True)
class AdkFlowSettings(Settings):
    """The settings every AdK study shares: atoms, particles, flow steps, table nodes, Fisher-Rao."""

    all_atom: bool = setting(False, "all 3,341 AdK atoms instead of the 214 C-alphas (slower)")
    n_particles: int = setting(64, "WGF particles")
    n_steps: int = setting(200, "WGF steps")
    n_nodes: int = setting(33, "table nodes on the CV")
    fisher_rao: float | None = setting(
        None, "Fisher-Rao weight step of the flows (None: the pipeline's; 0: pure Wasserstein flow)"
    )

    @property
    def model_name(self) -> str:
        return "adk" if self.all_atom else "adk-ca"


def fisher_rao_used(settings) -> float | None:
    """The Fisher-Rao step the flows run with: the setting, or the pipeline's default (None:
    :meth:`~cryosip.pipeline.methods.WGF.flow` picks 0.3 for the KL and 0 for the MMDs)."""
    return settings.fisher_rao if settings.fisher_rao is not None else WGF.fisher_rao


# ------------------------------------------------------------------------------------------------
# The scene: a conformation model, its operator (noise 1; the tables fix sigma later) and the truth
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scene:
    """A conformation model with its cryo-EM operator, nuisance prior and true CV distribution."""

    model_name: str
    model: object
    operator: CryoEMOperator
    truth: object

    def reference(self, n: int = N_REFERENCE, seed: int = 12345) -> np.ndarray:
        """Draws of the true distribution used as rho* in W1/W2."""
        return np.asarray(self.truth.sample(np.random.default_rng(seed), n), np.float64)

    def draw(self, key, n_images: int):
        """(theta (n, d), nuisance, noise key) of one data set: ``key`` split in three."""
        k_theta, k_nu, k_noise = jax.random.split(key, 3)
        theta = np.asarray(self.truth.sample(k_theta, n_images), np.float32)
        nu = self.operator.sample_nuisance(k_nu, n_images)
        nu = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), nu)
        return theta.reshape(n_images, -1), nu, k_noise

    def tabulate(self, key, theta, nuisance, n_nodes: int, **kw) -> NoiseFreeTables:
        """:func:`tabulate_noise_free` with this scene's operator."""
        return tabulate_noise_free(key, self.operator, theta, nuisance, n_nodes, **kw)


def make_operator(model, box: int, pixel_size: float) -> CryoEMOperator:
    """``model`` imaged on a ``box``-px grid: random poses, shifts (sd 2 A) and astigmatic CTF
    (defocus 1-2.5 um)."""
    image_model = ImageModel.for_atoms(box, pixel_size, model.atoms)
    prior = NuisancePrior(shift_sd_in_angstroms=2.0, defocus_range_in_angstroms=(1e4, 2.5e4))
    return CryoEMOperator(model, image_model, 1.0, prior)


def make_scene(model_name="adk-ca", truth="bimodal", *, box=64, pixel_size=2.0) -> Scene:
    """The built-in model ``model_name`` with random poses/shifts/CTF and the named truth."""
    model = load_model(model_name)
    op = make_operator(model, box, pixel_size)
    return Scene(model_name, model, op, make_distribution(truth, model.lower, model.upper))


def adk_study(out_dir, name: str, settings: AdkFlowSettings, box=64, pixel_size=2.0, **extra):
    """An AdK study's start: the scene (bimodal truth), its result folder (``config.json``
    written, with ``extra``) and the draws of rho*."""
    scene = make_scene(settings.model_name, "bimodal", box=box, pixel_size=pixel_size)
    truth, fisher_rao = scene.truth.params(), fisher_rao_used(settings)
    config = dict(model=settings.model_name, truth=truth, n_reference=N_REFERENCE, **extra)
    config["fisher_rao"] = fisher_rao
    return scene, Results(out_dir, name, settings, **config), scene.reference()


# ------------------------------------------------------------------------------------------------
# Noise-free tables: render once per seed, reuse for every SNR and every N
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NoiseFreeTables:
    """Per image n: Gram tables of its node images against its clean image c_n and a unit noise image eps_n.

    ``gram`` (N, G, G) = <m_g, m_h>, ``cross_clean``/``cross_noise`` (N, G) = <m_g, c_n>, <m_g, eps_n>,
    ``clean_sq``, ``clean_noise``, ``noise_sq`` (N,) the three scalar products of c_n and eps_n
    (float64), ``signal_var`` (N,) the variance of c_n over the box (the SNR's numerator), and
    the first ``len(clean_head)`` clean and noise images themselves (bandwidths, direct paths).
    The node images m_g may use other nuisances than the clean image (``table_nuisance``:
    perturbed poses).
    """

    theta: np.ndarray
    nuisance: object
    table_nuisance: object
    gram: np.ndarray
    cross_clean: np.ndarray
    cross_noise: np.ndarray
    clean_sq: np.ndarray
    clean_noise: np.ndarray
    noise_sq: np.ndarray
    signal_var: np.ndarray
    clean_head: np.ndarray
    noise_head: np.ndarray
    lower: float
    upper: float
    n_nodes: int
    seconds: float

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    @property
    def n_entries(self) -> int:
        return int(np.prod(self.clean_head.shape[1:]))

    @property
    def nodes(self) -> np.ndarray:
        return np.linspace(self.lower, self.upper, self.n_nodes)

    def sigma_for_snr(self, snr: float, pilot: int = 256) -> float:
        """sigma with SNR = mean var(clean image) / sigma^2 over the first ``pilot`` images (as ``simulate``)."""
        return float(np.sqrt(np.mean(self.signal_var[:pilot]) / snr))

    def table(self, sigma: float, n: int | None = None) -> TabulatedOperator:
        """The tabulated operator of the first n images at noise level sigma."""
        n = len(self) if n is None else int(n)
        cross = self.cross_clean[:n] + sigma * self.cross_noise[:n]
        ysq = self.clean_sq[:n] + 2 * sigma * self.clean_noise[:n] + sigma**2 * self.noise_sq[:n]
        tables = (jnp.asarray(self.gram[:n]), *(jnp.asarray(a, jnp.float32) for a in (cross, ysq)))
        grid = (self.lower, self.upper, self.n_nodes, self.n_entries)
        return TabulatedOperator(GaussianNoise(sigma), False, *grid, *tables)

    def images(self, sigma: float, n: int) -> np.ndarray:
        """The first n observed images c + sigma eps (n <= len(clean_head))."""
        if n > len(self.clean_head):
            raise ValueError(f"only {len(self.clean_head)} images kept; asked for {n}")
        return self.clean_head[:n] + np.float32(sigma) * self.noise_head[:n]

    def observations(self, sigma: float, n: int) -> Observations:
        """Direct-path observations (images and their true nuisances) of the first n images."""
        nu = jax.tree_util.tree_map(lambda a: jnp.asarray(a[:n]), self.nuisance)
        return Observations(jnp.asarray(self.images(sigma, n)), nu)

    def problem(self, operator: CryoEMOperator, sigma: float, n: int | None = None) -> Problem:
        """A :class:`~cryosip.pipeline.problem.Problem` (tables, per-image log-likelihood on a fine grid, bandwidth)."""
        t0 = time.perf_counter()
        n = len(self) if n is None else int(n)
        m = min(n, len(self.clean_head), 1000)
        bandwidth = median_distance(self.images(sigma, m).reshape(m, -1))
        table = self.table(sigma, n)
        return table_problem(
            operator, table, sigma, self.lower, self.upper, self.n_nodes, bandwidth, t0
        )


def table_problem(
    operator: CryoEMOperator, table, sigma: float, lower, upper, n_nodes: int, bandwidth, t0=None
) -> Problem:
    """A Problem on a tabulated engine (an image table or a log-likelihood table on ``n_nodes``
    nodes), with the per-image log-likelihood on a grid ``FINE_FACTOR`` times finer."""
    t0 = time.perf_counter() if t0 is None else t0
    fine = np.linspace(lower, upper, FINE_FACTOR * (n_nodes - 1) + 1)
    fine_ll = dto.loglik_on_nodes(table, table.observations(), fine, batch_size=1024)
    return Problem(
        operator.with_sigma(sigma),
        None,
        table,
        np.array([lower]),
        np.array([upper]),
        fine,
        fine_ll,
        bandwidth,
        time.perf_counter() - t0,
    )


def batches(n: int, batch_size: int):
    """(start, stop, indices) per batch; the last batch is padded with the last index (one shape)."""
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size), np.minimum(np.arange(s, s + batch_size), n - 1)


def take_rows(tree, idx):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), tree)


def tabulate_noise_free(
    key,
    operator: CryoEMOperator,
    theta: np.ndarray,
    nuisance,
    n_nodes: int = 33,
    *,
    table_nuisance=None,
    keep_images: int = 1000,
    batch_size: int = 64,
) -> NoiseFreeTables:
    """Render every image's clean version, its node images and a unit noise image; keep their scalar products.

    Image n's noise is ``normal(fold_in(key, n))``: it does not depend on the batching.
    """
    t0 = time.perf_counter()
    lo, hi = (float(np.asarray(b).reshape(-1)[0]) for b in operator.domain)
    nodes = jnp.linspace(lo, hi, n_nodes, dtype=jnp.float32)[:, None]
    table_nuisance = nuisance if table_nuisance is None else table_nuisance
    D = operator.image_model.box_size

    @jax.jit
    def batch(th, nu, nu_tab, idx):
        def one(th, nu, nu_tab, i):
            c = operator.mean(th, nu).reshape(-1)
            e = jax.random.normal(jax.random.fold_in(key, i), c.shape, c.dtype)
            ms = jax.vmap(lambda g: operator.mean(g, nu_tab))(nodes).reshape(n_nodes, -1)
            return ms @ ms.T, ms @ c, ms @ e, c @ c, c @ e, e @ e, jnp.var(c), c, e

        return jax.vmap(one)(th, nu, nu_tab, idx)

    n = int(theta.shape[0])
    keep = min(n, int(keep_images))
    names = ("gram", "cross_clean", "cross_noise", "clean_sq", "clean_noise", "noise_sq")
    parts = {k: [] for k in (*names, "signal_var")}
    clean_head = np.empty((keep, D, D), np.float32)
    noise_head = np.empty((keep, D, D), np.float32)
    for s, e, idx in batches(n, batch_size):
        res = batch(
            jnp.asarray(theta[idx], jnp.float32),
            take_rows(nuisance, idx),
            take_rows(table_nuisance, idx),
            jnp.asarray(idx, jnp.int32),
        )
        res = [np.asarray(r)[: e - s] for r in res]
        for k, r in zip(parts, res[:7]):
            parts[k].append(r)
        if s < keep:
            m = min(e, keep) - s
            clean_head[s : s + m] = res[7][:m].reshape(m, D, D)
            noise_head[s : s + m] = res[8][:m].reshape(m, D, D)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    for k in ("clean_sq", "clean_noise", "noise_sq", "signal_var"):
        cat[k] = cat[k].astype(np.float64)
    return NoiseFreeTables(
        np.asarray(theta, np.float32),
        nuisance,
        table_nuisance,
        **cat,
        clean_head=clean_head,
        noise_head=noise_head,
        lower=lo,
        upper=hi,
        n_nodes=int(n_nodes),
        seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------------------------------------
# Methods and scores
# ------------------------------------------------------------------------------------------------


def reconstruct(problem: Problem, method: str, settings, *, key, init: str = "auto", **kw):
    """One method by its label (``wgf-kl``, ``wgf-mmd``, ``wgf-kl+mmd``, ``em-grid``, ``per-image``, ...).

    The flows use the pipeline's settings (:func:`cryosip.pipeline.methods.run_method`) with the
    study's ``n_particles``, ``n_steps`` and ``fisher_rao`` (None: the pipeline's default);
    ``kw`` overrides them."""
    if not method.startswith("wgf-"):
        return run_method(problem, method, "kl", key=key, progress=False)
    kw = {"n_particles": settings.n_particles, "n_steps": settings.n_steps, **kw}
    fisher_rao = kw.pop("fisher_rao", settings.fisher_rao)
    if fisher_rao is not None:
        kw["fisher_rao"] = float(fisher_rao)
    return run_method(problem, "wgf", method[4:], key=key, init=init, progress=False, **kw)


def initial_speed(discrepancy, operator, obs, init: ParticleMeasure, key) -> float:
    """The median over particles of n |d objective / d position| at the start (nonzero entries;
    1 if none): how far a unit step moves the median particle, for choosing a step size."""

    def objective(p):
        return discrepancy(key, operator, ParticleMeasure(p, init.log_weights), obs)

    v = init.n_particles * np.abs(np.asarray(jax.grad(objective)(init.positions)))
    return float(np.median(v[v > 0])) if np.any(v > 0) else 1.0


def score(positions, weights, reference) -> dict:
    """W1 and W2 of a weighted sample to the reference draws."""
    pos = np.asarray(positions, np.float64)
    return {"w1": w1(pos, reference, weights), "w2": w2(pos, reference, weights)}


# ------------------------------------------------------------------------------------------------
# Result tables and figures
# ------------------------------------------------------------------------------------------------


def summarise(df: pd.DataFrame, by: list[str], metrics=("w1", "w2", "seconds")) -> pd.DataFrame:
    """Mean, sd (ddof 1; 0 for one seed) and count over seeds."""
    g = df.groupby(by, sort=False, dropna=False)  # keep rows with a NaN key (the oracle's SNR)
    out = g.size().rename("n_seeds").reset_index()
    for m in metrics:
        if m in df:
            out[f"{m}_mean"] = g[m].mean().values
            out[f"{m}_sd"] = g[m].std(ddof=1).fillna(0.0).values
    return out


def pyplot():
    """matplotlib.pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Results:
    """A study's output folder: ``config.json`` when the study starts (the study's name, its
    settings and ``extra``), then its tables and figures, each written atomically."""

    def __init__(self, out_dir, name: str | None = None, settings=None, **extra):
        self.path = Path(out_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        if name is not None:
            config = {"experiment": name, **dataclasses.asdict(settings), **extra}
            _atomic.write_json(self.path / "config.json", config)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def table(self, stem: str, rows: list[dict]) -> pd.DataFrame:
        """``<stem>.csv``, one row per run (also written as the study goes: an interrupt keeps it)."""
        df = pd.DataFrame(rows)
        _atomic.write_csv(self / f"{stem}.csv", df)
        return df

    def tables(self, stem: str, rows: list[dict], by, metrics, summary: str | None = None):
        """``<stem>.csv`` and ``<summary or stem_summary>.csv`` (over seeds, grouped ``by``)."""
        df = self.table(stem, rows)
        table = summarise(df, by, metrics)
        _atomic.write_csv(self / f"{summary or stem + '_summary'}.csv", table)
        return df, table

    def figure(self, fig, name: str, dpi: int = 120) -> Path:
        """Lay out, write and close a figure."""
        fig.tight_layout()
        _atomic.savefig(fig, self / name, dpi=dpi)
        pyplot().close(fig)
        return self / name


def w1_lines(ax, summary: pd.DataFrame, x: str, by, style) -> None:
    """One error-bar line of W1 (mean +- sd over seeds) against ``x`` per value of ``by``, in
    the order of the summary; ``style(value)`` gives its keywords (label, colour, line, marker)."""
    for value, d in summary.groupby(by, sort=False):
        d = d.sort_values(x)
        ax.errorbar(d[x], d["w1_mean"], d["w1_sd"], capsize=3, **style(value))


def method_style(method: str) -> dict:
    """The line of a method in the W1 figures (the oracle: a dashed grey sampling floor)."""
    from ..analysis.plots import COLORS

    oracle = method == "oracle"
    label = "true CVs (sampling floor)" if oracle else method
    return dict(label=label, color=COLORS.get(method, "0.5"), ls="--" if oracle else "-",
                marker="" if oracle else "o")  # fmt: skip


def density_panel(ax, grid, truth_density, estimates: dict, color, xlabel: str, title: str):
    """The truth's density (dashed) and a kernel density estimate of each weighted estimate."""
    from ..analysis.density import kde

    ax.plot(grid, truth_density, "k--", lw=2, label="truth")
    for name, (pos, w) in estimates.items():
        dens = kde(pos, w, grid, lower=grid[0], upper=grid[-1])
        ax.plot(grid, dens, color=color(name), lw=1.6, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)


def log_axes(ax, xlabel: str, title: str, *, logx: bool = True, legend: bool = False) -> None:
    """The studies' W1 panels: log axes, a grid, labels."""
    if logx:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=7)


def floor_line(ax, value: float, label: str = "true CVs (sampling floor)", ls: str = "--"):
    """A horizontal reference line (the sampling floor of the images' true CVs, a start)."""
    ax.axhline(float(value), color="0.5" if ls == "--" else "0.3", ls=ls, lw=1, label=label)


W1_LABEL = r"$W_1(\hat\rho, \rho^*)$"
W1_SEEDS_LABEL = W1_LABEL + r"  (mean $\pm$ sd over seeds)"
