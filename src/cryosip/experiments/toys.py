"""Toys: dumbbell, hinge and square with unimodal/bimodal/skewed/uniform truths, and one 2-D CV case.

1-D cases: every toy of :mod:`cryosip.conformations.toys` (dumbbell separation 10-40 A, hinge
angle 30-150 degrees, square side 10-40 A) under every truth of
:func:`cryosip.data.distributions.make_distribution` (``unimodal``, ``bimodal``, ``skewed``,
``uniform``). Images are simulated by :func:`cryosip.pipeline.simulate.simulate_dataset` (40 px at
2 A/px, random poses, shifts with sd 2 A and astigmatic CTF, known to every method) and
reconstructed through the ordinary pipeline (:func:`cryosip.pipeline.problem.prepare` and
:func:`~cryosip.pipeline.methods.run_method`): ``wgf-kl``, ``wgf-mmd``, ``em-grid``,
``per-image``. W1 to rho* (200,000 draws) is reported in the CV's unit and divided by the
domain width (``w1_rel``), so that toys can be compared.

2-D case: the two-hinge toy (two arm angles in [30, 150]^2 degrees) with a two-mode truth.
The tabulated path is 1-D only, so the flow of the KL runs on the direct operator (every step
renders and differentiates a minibatch of images for every particle) from a uniform start; a
fixed-support baseline is EM weights on a 15 x 15 grid (the log-likelihood of every image at
every node, rendered once), and the per-image MAP on that grid. W2 to rho* (4,000 draws) is
computed by exact optimal transport (POT), in degrees.

Outputs in ``--out``: ``toys.csv`` (one row per toy, truth, seed and method, W1, W2, relative
W1), ``toys_summary.csv`` (mean/sd over seeds), ``toys.png`` (a grid of recovered densities
against the truth, first seed), ``toys_w1.png`` (relative W1 per case and method),
``toys_2d.png`` (the 2-D truth against the flow's particles and the grid EM) and
``config.json``.

Cost on a 2-core CPU (defaults: 12 cases x 1,000 images at SNR 0.01, and the 2-D case with 400
images at SNR 0.05): about 25 minutes; ``--quick`` (bimodal and skewed only, 400 images) a few
minutes.

examples:
  $ cryosip experiment toys --quick --out toys-quick/
  $ cryosip experiment toys --out toys/
  $ cryosip experiment toys --toys hinge --truths bimodal --snr 0.001 --n-images 5000 --out hinge-low/
  $ cryosip experiment toys --no-2d --seeds 0-2 --out toys-1d/
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from ..analysis.metrics import w1, w2
from ..data.distributions import make_distribution
from ..pipeline.problem import EXACT_PHYSICS, prepare
from ..pipeline.simulate import simulate_dataset
from ..sip import dto
from ._common import (
    Results,
    check_names,
    fisher_rao_used,
    make_operator,
    pyplot,
    reconstruct,
    setting,
)
from ._common import Settings as _Settings

logger = logging.getLogger(__name__)

NAME = "toys"
TOYS = ("dumbbell", "hinge", "square")
TRUTHS = ("unimodal", "bimodal", "skewed", "uniform")
METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
UNITS = {"dumbbell": "A", "hinge": "deg", "square": "A", "two-hinge": "deg"}


@dataclasses.dataclass(frozen=True)
class Settings(_Settings):
    toys: tuple[str, ...] = setting(TOYS, "toys")
    truths: tuple[str, ...] = setting(TRUTHS, "truths", quick=("bimodal", "skewed"))
    methods: tuple[str, ...] = setting(METHODS, "1-D methods")
    n_images: int = setting(1000, "images per 1-D case", quick=400)
    snr: float = setting(0.01, "SNR of the 1-D cases")
    n_particles: int = setting(64, "WGF particles, 1-D")
    n_steps: int = setting(200, "WGF steps, 1-D", quick=120)
    n_nodes: int = setting(33, "table nodes on the CV, 1-D")
    box: int = setting(40, "box size in pixels")
    pixel_size: float = setting(2.0, "pixel size in Angstrom")
    with_2d: bool = setting(True, "run the 2-D case (--no-2d skips it)", flag="--no-2d")
    truth_2d: str = setting(
        "bimodal", "truth of the 2-D case (bimodal, banana, ring, uniform, ...)"
    )
    n_images_2d: int = setting(400, "images, 2-D case", quick=200)
    snr_2d: float = setting(0.05, "SNR, 2-D case")
    n_particles_2d: int = setting(40, "WGF particles, 2-D", quick=32)
    n_steps_2d: int = setting(150, "WGF steps, 2-D", quick=80)
    batch_2d: int = setting(16, "images per flow step, 2-D")
    grid_2d: int = setting(15, "EM grid points per axis, 2-D", quick=11)
    fisher_rao: float | None = setting(
        None, "Fisher-Rao weight step of the flows (None: the pipeline's; 0: pure Wasserstein flow)"
    )

    def __post_init__(self):
        super().__post_init__()
        self._set(
            toys=check_names(self.toys, TOYS, "toys"),
            truths=check_names(self.truths, TRUTHS, "truths"),
            methods=check_names(self.methods, METHODS),
        )


def toy_model(name: str):
    from ..conformations import toys

    return toys.TOYS[name]()


def _case(toy: str, truth_name: str, key, s: Settings, n_images, snr, n_reference, dim, **prep):
    """Simulate one toy data set and prepare it; a ``row(method, positions, weights, seconds)``
    maker scoring against ``n_reference`` draws of the truth, the rows' start and what to plot."""
    model = toy_model(toy)
    lo, hi = np.asarray(model.lower, np.float64), np.asarray(model.upper, np.float64)
    truth = make_distribution(truth_name, model.lower, model.upper)
    ref = truth.sample(np.random.default_rng(12345), n_reference)
    t0 = time.perf_counter()
    sim = simulate_dataset(key, make_operator(model, s.box, s.pixel_size), truth, n_images, snr=snr)
    problem = prepare(sim.stack, model, sigma=sim.sigma, progress=False, **EXACT_PHYSICS, **prep)
    t_setup = time.perf_counter() - t0
    common = dict(toy=toy, truth=truth_name, seed=None, dim=dim, unit=UNITS[toy])

    def row(method, pos, weights=None, seconds=0.0, **extra):
        m = dict(w1=w1(pos, ref, weights), w2=w2(pos, ref, weights))
        return dict(common, method=method, **m, seconds=seconds, setup_seconds=t_setup, **extra)

    theta = sim.theta[:, 0] if dim == 1 else sim.theta
    lo, hi = (float(lo[0]), float(hi[0])) if dim == 1 else (lo, hi)
    shown = {"theta": theta, "truth": truth, "lo": lo, "hi": hi, "reference": ref}
    return problem, row, [row("oracle", theta)], shown, float(np.mean(hi - lo))


def _relative(rows: list[dict], seed: int, width: float) -> list[dict]:
    for r in rows:
        r.update(seed=seed, w1_rel=r["w1"] / width)
    return rows


def run_1d(toy: str, truth_name: str, seed: int, s: Settings) -> tuple[list[dict], dict]:
    crc = zlib.crc32(f"{toy}/{truth_name}".encode()) % 2**31
    key = jax.random.fold_in(jax.random.key(seed), crc)
    problem, row, rows, shown, width = _case(
        toy, truth_name, key, s, s.n_images, s.snr, 200_000, 1, n_nodes=s.n_nodes
    )
    for i, method in enumerate(s.methods):
        r = reconstruct(problem, method, s, key=jax.random.fold_in(key, 10 + i))
        pos = np.asarray(r.positions)[:, 0]
        rows.append(row(method, pos, r.weights, r.seconds))
        shown[method] = (pos, np.asarray(r.weights))
        logger.info(
            "%s %s seed %d %s: W1 %.3f %s (%.3f of the domain)",
            *(toy, truth_name, seed, method, rows[-1]["w1"], UNITS[toy], rows[-1]["w1"] / width),
        )
    return _relative(rows, seed, width), shown


def run_2d(seed: int, s: Settings) -> tuple[list[dict], dict]:
    """The two-hinge toy: KL flow on the direct operator, EM and per-image MAP on a 2-D grid; W2 by exact OT."""
    key = jax.random.fold_in(jax.random.key(seed), 2)
    problem, row, rows, shown, width = _case(
        "two-hinge", s.truth_2d, key, s, s.n_images_2d, s.snr_2d, 4000, 2, use_table=False
    )
    # the flow on the direct operator
    sizes = dict(n_particles=s.n_particles_2d, n_steps=s.n_steps_2d, batch_size=s.batch_2d)
    r = reconstruct(problem, "wgf-kl", s, key=jax.random.fold_in(key, 1), init="uniform", **sizes)
    pos, wts = np.asarray(r.positions, np.float64), np.asarray(r.weights, np.float64)
    begin = np.asarray(r.trajectory[0], np.float64)
    rows.append(row("wgf-kl (direct)", pos, wts, r.seconds, w2_start=w2(begin, shown["reference"])))
    shown["wgf-kl"] = (pos, wts, begin)
    logger.info("two-hinge seed %d wgf-kl: W2 %.2f deg", seed, rows[-1]["w2"])
    # EM weights and per-image MAP on a grid (one log-likelihood per image and node)
    t0 = time.perf_counter()
    g, lo, hi = s.grid_2d, shown["lo"], shown["hi"]
    axes = [np.linspace(lo[j], hi[j], g) for j in range(2)]
    nodes = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    L = dto.loglik_on_nodes(problem.operator, problem.observations, nodes, batch_size=32)
    t_ll = time.perf_counter() - t0
    wg, _ = dto.em_weights(L, n_iter=1000)
    rows.append(row(f"em-grid ({g}x{g})", nodes, wg, time.perf_counter() - t0))
    shown["em-grid"] = (nodes, wg)
    rows.append(row(f"per-image ({g}x{g})", nodes[np.argmax(L, axis=1)], None, t_ll))
    logger.info("two-hinge seed %d: em-grid W2 %.2f deg", seed, rows[-2]["w2"])
    return _relative(rows, seed, width), shown


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    t_start, s = time.perf_counter(), settings
    out = Results(out_dir, NAME, s, fisher_rao_used=fisher_rao_used(s))
    rows, shown = [], {}
    for seed in s.seeds:
        for toy in s.toys:
            for truth in s.truths:
                r, case = run_1d(toy, truth, seed, s)
                rows.extend(r)
                if seed == s.seeds[0]:
                    shown[(toy, truth)] = case
                out.table("toys", rows)
        if s.with_2d:
            r, case = run_2d(seed, s)
            rows.extend(r)
            if seed == s.seeds[0]:
                shown["2d"] = case
    by, metrics = ["toy", "truth", "dim", "unit", "method"], ("w1", "w1_rel", "w2", "seconds")
    df, summary = out.tables("toys", rows, by, metrics)
    plot(out, summary, shown, s)
    logger.info("toys: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Results, summary: pd.DataFrame, shown: dict, s: Settings) -> list[Path]:
    cases = [k for k in shown if isinstance(k, tuple)]
    paths = []
    if cases:
        toys = [t for t in s.toys if any(c[0] == t for c in cases)]
        truths = [t for t in s.truths if any(c[1] == t for c in cases)]
        paths += [
            _plot_densities(out, shown, s, toys, truths),
            _plot_w1(out, summary, toys, truths),
        ]
    if "2d" in shown:
        paths.append(_plot_2d(out, summary, shown["2d"], s))
    return paths


def _plot_densities(out: Results, shown: dict, s: Settings, toys, truths) -> Path:
    from ..analysis.density import kde
    from ..analysis.plots import COLORS

    fig, axes = pyplot().subplots(
        len(toys), len(truths), figsize=(3.6 * len(truths), 2.8 * len(toys)), squeeze=False
    )
    for i, toy in enumerate(toys):
        for j, tr in enumerate(truths):
            ax, case = axes[i][j], shown.get((toy, tr))
            if case is None:
                ax.axis("off")
                continue
            lo, hi = case["lo"], case["hi"]
            grid = np.linspace(lo, hi, 201)
            ax.plot(grid, case["truth"].pdf(grid), "k--", lw=1.8, label="truth")
            for m, v in case.items():
                if isinstance(v, tuple):
                    dens = kde(v[0], v[1], grid, lower=lo, upper=hi)
                    ax.plot(grid, dens, color=COLORS.get(m, "0.5"), lw=1.3, label=m)
            ax.set_title(f"{toy}, {tr}", fontsize=9)
            ax.set_xlabel(f"CV ({UNITS[toy]})", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == len(truths) - 1:
                ax.legend(fontsize=6)
    fig.suptitle(
        f"toys: {s.n_images} images at SNR {s.snr:g}, seed {s.seeds[0]} "
        "(KDE of the recovered measures)",
        fontsize=10,
    )
    return out.figure(fig, "toys.png", dpi=110)


def _plot_w1(out: Results, summary: pd.DataFrame, toys, truths) -> Path:
    from ..analysis.plots import COLORS

    d = summary[(summary["dim"] == 1)]
    labels = [f"{t}\n{tr}" for t in toys for tr in truths]
    methods = list(d["method"].unique())
    fig, ax = pyplot().subplots(figsize=(max(8, 0.9 * len(labels)), 3.8))
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        vals = [
            d[(d["toy"] == t) & (d["truth"] == tr) & (d["method"] == m)]
            for t in toys
            for tr in truths
        ]
        ax.bar(
            np.arange(len(labels)) + (k - (len(methods) - 1) / 2) * width,
            [float(v["w1_rel_mean"].iloc[0]) if len(v) else np.nan for v in vals],
            width,
            yerr=[float(v["w1_rel_sd"].iloc[0]) if len(v) else 0 for v in vals],
            color="0.6" if m == "oracle" else COLORS.get(m, None),
            label="true CVs (sampling floor)" if m == "oracle" else m,
        )
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
    ax.set_ylabel(r"$W_1(\hat\rho, \rho^*)$ / domain width")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=7, ncol=3)
    return out.figure(fig, "toys_w1.png", dpi=110)


def _plot_2d(out: Results, summary: pd.DataFrame, case: dict, s: Settings) -> Path:
    from ..analysis.plots import COLORS

    lo, hi = case["lo"], case["hi"]
    X, Y = np.meshgrid(
        np.linspace(lo[0], hi[0], 121), np.linspace(lo[1], hi[1], 121), indexing="ij"
    )
    P = case["truth"].pdf(np.stack([X.ravel(), Y.ravel()], -1)).reshape(X.shape)
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 4.2))
    for ax in axes:
        ax.contour(X, Y, P, levels=6, colors="k", linewidths=0.8)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("angle 1 (deg)")
        ax.set_ylabel("angle 2 (deg)")
    axes[0].scatter(case["theta"][:, 0], case["theta"][:, 1], s=3, color="0.5")
    axes[0].set_title("truth (contours) and the images' true CVs")
    pos, wts, begin = case["wgf-kl"]
    axes[1].scatter(begin[:, 0], begin[:, 1], s=8, color="0.7", marker="x", label="start (uniform)")
    axes[1].scatter(
        pos[:, 0], pos[:, 1], s=600 * wts, color=COLORS["wgf-kl"],
        label="WGF-KL particles (area = weight)",
    )  # fmt: skip
    axes[1].legend(fontsize=7, loc="lower left")
    nodes, wg = case["em-grid"]
    axes[2].scatter(nodes[:, 0], nodes[:, 1], s=2000 * wg, color=COLORS["em-grid"], alpha=0.7)
    d = summary[(summary["dim"] == 2)]
    for ax, prefix, title in ((axes[1], "wgf", "KL flow, direct operator"),
                              (axes[2], "em-grid", "EM weights on the grid")):  # fmt: skip
        w2m = d[d["method"].str.startswith(prefix)]["w2_mean"]
        ax.set_title(f"{title}: W2 = {float(w2m.iloc[0]):.1f} deg" if len(w2m) else title)
    fig.suptitle(f"two-hinge (2-D CV): {s.n_images_2d} images at SNR {s.snr_2d:g}", fontsize=10)
    return out.figure(fig, "toys_2d.png", dpi=110)
