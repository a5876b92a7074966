"""Toys: dumbbell, hinge and square with unimodal/bimodal/skewed/uniform truths, and one 2-D CV case.

1-D cases: every toy of :mod:`cryosip.conformations.toys` (dumbbell separation 10-40 A, hinge
angle 30-150 degrees, square side 10-40 A) under every truth of
:func:`cryosip.data.distributions.make_distribution` (``unimodal``, ``bimodal``, ``skewed``,
``uniform``). Images are simulated by :func:`cryosip.pipeline.simulate.simulate_dataset` (40 px at
2 A/px, random poses, shifts with sd 2 A and astigmatic CTF, known to every method) and
reconstructed through the ordinary pipeline (:func:`cryosip.reconstruction.prepare` and
:func:`~cryosip.reconstruction.run_method`): ``wgf-kl``, ``wgf-mmd``, ``em-grid``,
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

import logging
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .. import _atomic
from ..analysis.metrics import w1, w2
from ..cryoem.image_model import ImageModel, NuisancePrior
from ..data.distributions import make_distribution
from ..pipeline.operator import CryoEMOperator
from ..pipeline.simulate import simulate_dataset
from ..reconstruction import EXACT_PHYSICS, prepare, run_method
from ..sip import dto
from . import common_parser, resolve, seeds_from
from .robustness import (
    add_fisher_rao,
    parse_methods,
    pipeline_fisher_rao,
    reconstruct,
    summarise,
    write_config,
)

logger = logging.getLogger(__name__)

NAME = "toys"
TOYS = ("dumbbell", "hinge", "square")
TRUTHS = ("unimodal", "bimodal", "skewed", "uniform")
METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
UNITS = {"dumbbell": "A", "hinge": "deg", "square": "A", "two-hinge": "deg"}
DEFAULTS = dict(
    seeds=(0,),
    toys=TOYS,
    truths=TRUTHS,
    n_images=1000,
    snr=0.01,
    n_particles=64,
    n_steps=200,
    n_nodes=33,
    box=40,
    pixel_size=2.0,
    n_images_2d=400,
    snr_2d=0.05,
    n_particles_2d=40,
    n_steps_2d=150,
    batch_2d=16,
    grid_2d=15,
    fisher_rao=None,
)
QUICK = dict(
    DEFAULTS,
    truths=("bimodal", "skewed"),
    n_images=400,
    n_steps=120,
    n_images_2d=200,
    n_particles_2d=32,
    n_steps_2d=80,
    grid_2d=11,
)


def toy_model(name: str):
    from ..conformations import toys

    return toys.TOYS[name]()


def make_operator(model, box: int, pixel_size: float) -> CryoEMOperator:
    image_model = ImageModel.for_atoms(box, pixel_size, model.atoms)
    prior = NuisancePrior(shift_sd_in_angstroms=2.0, defocus_range_in_angstroms=(10000.0, 25000.0))
    return CryoEMOperator(model, image_model, 1.0, prior)


def run_1d(toy: str, truth_name: str, seed: int, cfg: dict, methods) -> tuple[list[dict], dict]:
    model = toy_model(toy)
    lo, hi = float(model.lower[0]), float(model.upper[0])
    truth = make_distribution(truth_name, model.lower, model.upper)
    ref = truth.sample(np.random.default_rng(12345), 200_000)[:, 0]
    op = make_operator(model, cfg["box"], cfg["pixel_size"])
    key = jax.random.fold_in(
        jax.random.key(seed), zlib.crc32(f"{toy}/{truth_name}".encode()) % 2**31
    )
    t0 = time.perf_counter()
    sim = simulate_dataset(key, op, truth, cfg["n_images"], snr=cfg["snr"])
    problem = prepare(
        sim.stack, model, sigma=sim.sigma, n_nodes=cfg["n_nodes"], progress=False, **EXACT_PHYSICS
    )
    t_setup = time.perf_counter() - t0
    width = hi - lo
    rows = [
        dict(
            toy=toy,
            truth=truth_name,
            seed=seed,
            dim=1,
            unit=UNITS[toy],
            method="oracle",
            w1=w1(sim.theta[:, 0], ref),
            w2=w2(sim.theta[:, 0], ref),
            seconds=0.0,
            setup_seconds=t_setup,
        )
    ]
    shown = {"theta": sim.theta[:, 0], "truth": truth, "lo": lo, "hi": hi}
    for i, method in enumerate(methods):
        r = reconstruct(
            problem,
            method,
            key=jax.random.fold_in(key, 10 + i),
            n_particles=cfg["n_particles"],
            n_steps=cfg["n_steps"],
            fisher_rao=cfg["fisher_rao"],
        )
        pos = np.asarray(r.positions)[:, 0]
        rows.append(
            dict(
                toy=toy,
                truth=truth_name,
                seed=seed,
                dim=1,
                unit=UNITS[toy],
                method=method,
                w1=w1(pos, ref, r.weights),
                w2=w2(pos, ref, r.weights),
                seconds=r.seconds,
                setup_seconds=t_setup,
            )
        )
        shown[method] = (pos, np.asarray(r.weights))
        logger.info(
            "%s %s seed %d %s: W1 %.3f %s (%.3f of the domain)",
            toy,
            truth_name,
            seed,
            method,
            rows[-1]["w1"],
            UNITS[toy],
            rows[-1]["w1"] / width,
        )
    for r in rows:
        r["w1_rel"] = r["w1"] / width
    return rows, shown


def run_2d(seed: int, cfg: dict, truth_name: str = "bimodal") -> tuple[list[dict], dict]:
    """The two-hinge toy: KL flow on the direct operator, EM and per-image MAP on a 2-D grid; W2 by exact OT."""
    model = toy_model("two-hinge")
    lo, hi = np.asarray(model.lower, np.float64), np.asarray(model.upper, np.float64)
    truth = make_distribution(truth_name, model.lower, model.upper)
    ref = truth.sample(np.random.default_rng(12345), 4000)
    op = make_operator(model, cfg["box"], cfg["pixel_size"])
    key = jax.random.fold_in(jax.random.key(seed), 2)
    t0 = time.perf_counter()
    sim = simulate_dataset(key, op, truth, cfg["n_images_2d"], snr=cfg["snr_2d"])
    problem = prepare(
        sim.stack, model, sigma=sim.sigma, use_table=False, progress=False, **EXACT_PHYSICS
    )
    t_setup = time.perf_counter() - t0
    width = float(np.mean(hi - lo))

    def row(method, pos, weights=None, seconds=0.0, **extra):
        return dict(
            toy="two-hinge",
            truth=truth_name,
            seed=seed,
            dim=2,
            unit="deg",
            method=method,
            w1=w1(pos, ref, weights),
            w2=w2(pos, ref, weights),
            seconds=seconds,
            setup_seconds=t_setup,
            **extra,
        )

    rows = [row("oracle", sim.theta)]
    shown = {"theta": sim.theta, "truth": truth, "lo": lo, "hi": hi}
    # the flow on the direct operator
    kw = {} if cfg["fisher_rao"] is None else {"fisher_rao": float(cfg["fisher_rao"])}
    r = run_method(
        problem,
        "wgf",
        "kl",
        key=jax.random.fold_in(key, 1),
        n_particles=cfg["n_particles_2d"],
        n_steps=cfg["n_steps_2d"],
        batch_size=cfg["batch_2d"],
        init="uniform",
        progress=False,
        **kw,
    )
    pos, wts = np.asarray(r.positions, np.float64), np.asarray(r.weights, np.float64)
    start = np.asarray(r.trajectory[0], np.float64)
    rows.append(row("wgf-kl (direct)", pos, wts, r.seconds, w2_start=w2(start, ref)))
    shown["wgf-kl"] = (pos, wts, start)
    logger.info(
        "two-hinge seed %d wgf-kl: W2 %.2f deg (start %.2f) in %.0f s",
        seed,
        rows[-1]["w2"],
        rows[-1]["w2_start"],
        r.seconds,
    )
    # EM weights and per-image MAP on a grid (one log-likelihood per image and node)
    t0 = time.perf_counter()
    g = cfg["grid_2d"]
    axes = [np.linspace(lo[j], hi[j], g) for j in range(2)]
    nodes = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
    L = dto.loglik_on_nodes(problem.operator, problem.observations, nodes, batch_size=32)
    t_ll = time.perf_counter() - t0
    wg, _ = dto.em_weights(L, n_iter=1000)
    rows.append(row(f"em-grid ({g}x{g})", nodes, wg, time.perf_counter() - t0))
    shown["em-grid"] = (nodes, wg)
    pim = nodes[np.argmax(L, axis=1)]
    rows.append(row(f"per-image ({g}x{g})", pim, None, t_ll))
    logger.info(
        "two-hinge seed %d: em-grid W2 %.2f, per-image W2 %.2f deg",
        seed,
        rows[-2]["w2"],
        rows[-1]["w2"],
    )
    for row in rows:
        row["w1_rel"] = row["w1"] / width
    return rows, shown


def run(
    out_dir,
    *,
    seeds=None,
    toys=None,
    truths=None,
    methods=METHODS,
    n_images=None,
    snr=None,
    n_particles=None,
    n_steps=None,
    with_2d: bool = True,
    truth_2d: str = "bimodal",
    quick: bool = False,
    **sizes,
) -> pd.DataFrame:
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        toys=toys,
        truths=truths,
        n_images=n_images,
        snr=snr,
        n_particles=n_particles,
        n_steps=n_steps,
        **sizes,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(
        out,
        experiment=NAME,
        methods=list(methods),
        with_2d=bool(with_2d),
        truth_2d=truth_2d,
        quick=bool(quick),
        fisher_rao_used=pipeline_fisher_rao() if cfg["fisher_rao"] is None else cfg["fisher_rao"],
        **cfg,
    )
    rows, shown = [], {}
    for seed in cfg["seeds"]:
        for toy in cfg["toys"]:
            for truth in cfg["truths"]:
                r, s = run_1d(toy, truth, seed, cfg, methods)
                rows.extend(r)
                if seed == cfg["seeds"][0]:
                    shown[(toy, truth)] = s
                _atomic.write_csv(out / "toys.csv", pd.DataFrame(rows))
        if with_2d:
            r, s = run_2d(seed, cfg, truth_2d)
            rows.extend(r)
            if seed == cfg["seeds"][0]:
                shown["2d"] = s
    df = pd.DataFrame(rows)
    _atomic.write_csv(out / "toys.csv", df)
    summary = summarise(
        df, ["toy", "truth", "dim", "unit", "method"], ("w1", "w1_rel", "w2", "seconds")
    )
    _atomic.write_csv(out / "toys_summary.csv", summary)
    plot(out, summary, shown, cfg)
    logger.info("toys: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Path, summary: pd.DataFrame, shown: dict, cfg: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.density import kde
    from ..analysis.plots import COLORS

    paths = []
    cases = [k for k in shown if isinstance(k, tuple)]
    if cases:
        toys = [t for t in cfg["toys"] if any(c[0] == t for c in cases)]
        truths = [t for t in cfg["truths"] if any(c[1] == t for c in cases)]
        fig, axes = plt.subplots(
            len(toys), len(truths), figsize=(3.6 * len(truths), 2.8 * len(toys)), squeeze=False
        )
        for i, toy in enumerate(toys):
            for j, tr in enumerate(truths):
                ax = axes[i][j]
                s = shown.get((toy, tr))
                if s is None:
                    ax.axis("off")
                    continue
                grid = np.linspace(s["lo"], s["hi"], 201)
                ax.plot(grid, s["truth"].pdf(grid), "k--", lw=1.8, label="truth")
                for m, v in s.items():
                    if isinstance(v, tuple):
                        ax.plot(
                            grid,
                            kde(v[0], v[1], grid, lower=s["lo"], upper=s["hi"]),
                            color=COLORS.get(m, "0.5"),
                            lw=1.3,
                            label=m,
                        )
                ax.set_title(f"{toy}, {tr}", fontsize=9)
                ax.set_xlabel(f"CV ({UNITS[toy]})", fontsize=8)
                ax.tick_params(labelsize=7)
                if i == 0 and j == len(truths) - 1:
                    ax.legend(fontsize=6)
        fig.suptitle(
            f"toys: {cfg['n_images']} images at SNR {cfg['snr']:g}, seed {cfg['seeds'][0]} "
            "(KDE of the recovered measures)",
            fontsize=10,
        )
        fig.tight_layout()
        p = out / "toys.png"
        _atomic.savefig(fig, p, dpi=110)
        plt.close(fig)
        paths.append(p)

        d = summary[(summary["dim"] == 1)]
        labels = [f"{t}\n{tr}" for t in toys for tr in truths]
        methods = [m for m in d["method"].unique()]
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 3.8))
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
        fig.tight_layout()
        p = out / "toys_w1.png"
        _atomic.savefig(fig, p, dpi=110)
        plt.close(fig)
        paths.append(p)

    if "2d" in shown:
        s = shown["2d"]
        lo, hi = s["lo"], s["hi"]
        xs = np.linspace(lo[0], hi[0], 121)
        ys = np.linspace(lo[1], hi[1], 121)
        X, Y = np.meshgrid(xs, ys, indexing="ij")
        P = s["truth"].pdf(np.stack([X.ravel(), Y.ravel()], -1)).reshape(X.shape)
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        for ax in axes:
            ax.contour(X, Y, P, levels=6, colors="k", linewidths=0.8)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xlabel("angle 1 (deg)")
            ax.set_ylabel("angle 2 (deg)")
        axes[0].scatter(s["theta"][:, 0], s["theta"][:, 1], s=3, color="0.5")
        axes[0].set_title("truth (contours) and the images' true CVs")
        pos, wts, start = s["wgf-kl"]
        axes[1].scatter(
            start[:, 0], start[:, 1], s=8, color="0.7", marker="x", label="start (uniform)"
        )
        axes[1].scatter(
            pos[:, 0],
            pos[:, 1],
            s=600 * wts,
            color=COLORS["wgf-kl"],
            label="WGF-KL particles (area = weight)",
        )
        axes[1].legend(fontsize=7, loc="lower left")
        d = summary[(summary["dim"] == 2)]
        w2f = d[d["method"].str.startswith("wgf")]["w2_mean"]
        axes[1].set_title(
            f"KL flow, direct operator: W2 = {float(w2f.iloc[0]):.1f} deg"
            if len(w2f)
            else "KL flow"
        )
        nodes, wg = s["em-grid"]
        axes[2].scatter(nodes[:, 0], nodes[:, 1], s=2000 * wg, color=COLORS["em-grid"], alpha=0.7)
        w2e = d[d["method"].str.startswith("em-grid")]["w2_mean"]
        axes[2].set_title(
            f"EM weights on the grid: W2 = {float(w2e.iloc[0]):.1f} deg" if len(w2e) else "EM grid"
        )
        fig.suptitle(
            f"two-hinge (2-D CV): {cfg['n_images_2d']} images at SNR {cfg['snr_2d']:g}", fontsize=10
        )
        fig.tight_layout()
        p = out / "toys_2d.png"
        _atomic.savefig(fig, p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--toys", type=parse_methods, default=None, help=f"toys (default {','.join(TOYS)})"
    )
    p.add_argument(
        "--truths", type=parse_methods, default=None, help=f"truths (default {','.join(TRUTHS)})"
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=METHODS,
        help=f"1-D methods (default {','.join(METHODS)})",
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=None,
        help=f"images per 1-D case (default {DEFAULTS['n_images']})",
    )
    p.add_argument(
        "--snr", type=float, default=None, help=f"SNR of the 1-D cases (default {DEFAULTS['snr']})"
    )
    p.add_argument("--n-particles", type=int, default=None, help="WGF particles, 1-D (default 64)")
    p.add_argument(
        "--n-steps", type=int, default=None, help=f"WGF steps, 1-D (default {DEFAULTS['n_steps']})"
    )
    p.add_argument("--no-2d", action="store_true", help="skip the 2-D case")
    p.add_argument(
        "--truth-2d",
        default="bimodal",
        help="truth of the 2-D case (bimodal, banana, ring, uniform, ...)",
    )
    p.add_argument(
        "--n-images-2d",
        type=int,
        default=None,
        help=f"images, 2-D case (default {DEFAULTS['n_images_2d']})",
    )
    p.add_argument(
        "--snr-2d", type=float, default=None, help=f"SNR, 2-D case (default {DEFAULTS['snr_2d']})"
    )
    p.add_argument(
        "--n-particles-2d", type=int, default=None, help="WGF particles, 2-D (default 48)"
    )
    p.add_argument("--n-steps-2d", type=int, default=None, help="WGF steps, 2-D (default 150)")
    p.add_argument(
        "--grid-2d", type=int, default=None, help="EM grid points per axis, 2-D (default 15)"
    )
    p.add_argument(
        "--batch-2d", type=int, default=None, help="images per flow step, 2-D (default 16)"
    )
    add_fisher_rao(p)
    a = p.parse_args(argv)
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        toys=a.toys,
        truths=a.truths,
        methods=a.methods,
        n_images=a.n_images,
        snr=a.snr,
        n_particles=a.n_particles,
        n_steps=a.n_steps,
        with_2d=not a.no_2d,
        truth_2d=a.truth_2d,
        quick=a.quick,
        n_images_2d=a.n_images_2d,
        snr_2d=a.snr_2d,
        n_particles_2d=a.n_particles_2d,
        n_steps_2d=a.n_steps_2d,
        grid_2d=a.grid_2d,
        batch_2d=a.batch_2d,
        fisher_rao=a.fisher_rao,
    )
    return 0
