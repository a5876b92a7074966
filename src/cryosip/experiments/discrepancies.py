"""Discrepancies: how much each objective sees -- W1 against SNR for kl, unconditional MMD, paired MMD and kl+mmd.

The same AdK data sets (C-alpha by default, ``--all-atom`` for every atom; bimodal truth on the
path CV s, 64 px, 2 A/px, known poses, shifts and CTF) are reconstructed by the Wasserstein
gradient flow of four objectives, **all started from the same uniform initialisation** (the
same particles for every objective at a given seed), so that differences come from the
objective and not from the start:

- ``kl``: the negative marginal log-likelihood (known poses; image tables);
- ``mmd``: the nuisance-paired, noise-averaged Gaussian-kernel score (known poses; image tables);
- ``kl+mmd``: their sum, weights balanced on the initial gradient norms (image tables);
- ``mmd-unconditional``: the unconditional MMD between fresh model images (random poses, shifts,
  CTF and noise, 256 per step) and the observed images (the direct operator: every step renders
  and differentiates through the simulator). The poses of the data are not used.

All Gaussian kernels use one bandwidth from the median heuristic on the observed images. The
CSV records W1/W2 to rho* (200,000 draws), W1 of the initial particles, and the objective's
first and last value.

Outputs in ``--out``: ``discrepancies.csv``, ``discrepancies_summary.csv`` (mean and sd over
seeds), ``discrepancies.png`` (W1 against SNR, one line per objective, and the recovered
densities of the first seed at the highest and the lowest SNR) and ``config.json``.

Cost on a 2-core CPU (C-alpha, defaults: 1,000 images, 4 SNRs, 2 seeds, 200 steps): about 30
minutes; the unconditional MMD dominates (it renders 256 images per step). ``--quick``: 500
images, 3 SNRs, one seed, 100 steps, a few minutes.

examples:
  $ cryosip experiment discrepancies --quick --out disc-quick/
  $ cryosip experiment discrepancies --out disc/
  $ cryosip experiment discrepancies --snrs 1,0.1 --n-images 2000 --out disc-high/
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from .. import _atomic
from ..reconstruction import Problem, run_method
from . import common_parser, resolve, seeds_from
from .robustness import (
    add_adk_flow_options,
    add_fisher_rao,
    draw_dataset,
    make_scene,
    parse_floats,
    parse_methods,
    pipeline_fisher_rao,
    score,
    summarise,
    tabulate_noise_free,
    write_config,
)

logger = logging.getLogger(__name__)

NAME = "discrepancies"
OBJECTIVES = ("kl", "mmd-unconditional", "mmd", "kl+mmd")
DEFAULTS = dict(
    seeds=(0, 1),
    snrs=(0.1, 0.01, 0.003, 0.001),
    n_images=1000,
    n_particles=64,
    n_steps=200,
    n_nodes=33,
)
QUICK = dict(
    seeds=(0,), snrs=(0.1, 0.01, 0.001), n_images=500, n_particles=64, n_steps=100, n_nodes=33
)


def direct_problem(table_problem: Problem, observations) -> Problem:
    """The same data on the direct (simulating) operator: no tables, the observed images themselves."""
    p = table_problem
    return Problem(p.operator, observations, None, p.lower, p.upper, None, None, p.bandwidth, 0.0)


def run(
    out_dir,
    *,
    seeds=None,
    snrs=None,
    n_images=None,
    objectives=OBJECTIVES,
    n_particles=None,
    n_steps=None,
    n_nodes=None,
    all_atom: bool = False,
    quick: bool = False,
    fisher_rao=None,
    unconditional_batch: int = 256,
) -> pd.DataFrame:
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        snrs=snrs,
        n_images=n_images,
        n_particles=n_particles,
        n_steps=n_steps,
        n_nodes=n_nodes,
    )
    cfg["snrs"] = tuple(sorted((float(s) for s in cfg["snrs"]), reverse=True))
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown:
        raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name = "adk" if all_atom else "adk-ca"
    scene = make_scene(model_name, "bimodal")
    write_config(
        out,
        experiment=NAME,
        model=model_name,
        truth=scene.truth.params(),
        objectives=list(objectives),
        init="uniform",
        quick=bool(quick),
        unconditional_batch=unconditional_batch,
        fisher_rao=pipeline_fisher_rao() if fisher_rao is None else fisher_rao,
        **cfg,
    )
    ref = scene.reference()
    N = int(cfg["n_images"])
    rows, shown = [], {}
    for seed in cfg["seeds"]:
        theta, nu, k_noise = draw_dataset(jax.random.key(seed), scene, N)
        tabs = tabulate_noise_free(
            k_noise, scene.operator, theta, nu, cfg["n_nodes"], keep_images=N
        )
        rows.append(
            dict(
                seed=seed,
                snr=np.nan,
                objective="oracle",
                **score(theta, None, ref),
                w1_start=np.nan,
                loss_first=np.nan,
                loss_last=np.nan,
                seconds=0.0,
            )
        )
        k_run = jax.random.fold_in(
            jax.random.key(seed), 500
        )  # the same for every objective: the same initial particles
        for snr in cfg["snrs"]:
            sigma = tabs.sigma_for_snr(snr)
            problem = tabs.problem(scene.operator, sigma)
            direct = None
            for obj in objectives:
                if obj == "mmd-unconditional":
                    if direct is None:
                        direct = direct_problem(problem, tabs.observations(sigma, N))
                    pb = direct
                else:
                    pb = problem
                kw = {} if fisher_rao is None else {"fisher_rao": float(fisher_rao)}
                if obj == "mmd-unconditional":
                    kw["batch_size"] = min(
                        N, int(unconditional_batch)
                    )  # a fresh data minibatch per step
                r = run_method(
                    pb,
                    "wgf",
                    obj,
                    key=k_run,
                    n_particles=cfg["n_particles"],
                    n_steps=cfg["n_steps"],
                    init="uniform",
                    progress=False,
                    **kw,
                )
                losses = np.asarray(r.losses)
                losses = losses[np.isfinite(losses)]
                start = np.asarray(r.trajectory[0])
                rows.append(
                    dict(
                        seed=seed,
                        snr=snr,
                        objective=obj,
                        **score(r.positions, r.weights, ref),
                        w1_start=score(start, None, ref)["w1"],
                        loss_first=float(losses[0]) if losses.size else np.nan,
                        loss_last=float(losses[-1]) if losses.size else np.nan,
                        seconds=r.seconds,
                    )
                )
                logger.info(
                    "seed %d SNR %g %s: W1 %.4f (start %.4f; %.0f s)",
                    seed,
                    snr,
                    obj,
                    rows[-1]["w1"],
                    rows[-1]["w1_start"],
                    r.seconds,
                )
                if seed == cfg["seeds"][0] and snr in (cfg["snrs"][0], cfg["snrs"][-1]):
                    shown[(snr, obj)] = (np.asarray(r.positions)[:, 0], np.asarray(r.weights))
            _atomic.write_csv(out / "discrepancies.csv", pd.DataFrame(rows))
        if seed == cfg["seeds"][0]:
            shown["theta"] = theta[:, 0]
    df = pd.DataFrame(rows)
    _atomic.write_csv(out / "discrepancies.csv", df)
    summary = summarise(df, ["snr", "objective"], ("w1", "w2", "w1_start", "seconds"))
    _atomic.write_csv(out / "discrepancies_summary.csv", summary)
    plot(out, summary, shown, scene, cfg, model_name)
    logger.info("discrepancies: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Path, summary: pd.DataFrame, shown: dict, scene, cfg: dict, model_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.density import kde
    from ..analysis.plots import COLORS

    color = lambda o: COLORS.get(f"wgf-{o}", "0.5")  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for obj in [o for o in summary["objective"].unique() if o != "oracle"]:
        d = summary[summary["objective"] == obj].sort_values("snr")
        ax.errorbar(
            d["snr"], d["w1_mean"], d["w1_sd"], marker="o", capsize=3, color=color(obj), label=obj
        )
    d = summary[summary["objective"] != "oracle"]
    if len(d):
        ax.axhline(
            float(d["w1_start_mean"].mean()), color="0.3", ls=":", lw=1, label="uniform start"
        )
    o = summary[summary["objective"] == "oracle"]
    if len(o):
        ax.axhline(
            float(o["w1_mean"].iloc[0]),
            color="0.5",
            ls="--",
            lw=1,
            label="true CVs (sampling floor)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SNR")
    ax.set_ylabel(r"$W_1(\hat\rho, \rho^*)$  (mean $\pm$ sd over seeds)")
    ax.set_title(f"{cfg['n_images']} images, {len(cfg['seeds'])} seed(s), uniform start")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    grid = np.linspace(float(scene.lower[0]), float(scene.upper[0]), 201)
    for ax, snr in zip(axes[1:], (cfg["snrs"][0], cfg["snrs"][-1])):
        ax.plot(grid, scene.truth.pdf(grid), "k--", lw=2, label="truth")
        for obj in cfg.get("objectives_shown", OBJECTIVES):
            if (snr, obj) in shown:
                pos, w = shown[(snr, obj)]
                ax.plot(
                    grid,
                    kde(pos, w, grid, lower=grid[0], upper=grid[-1]),
                    color=color(obj),
                    lw=1.6,
                    label=obj,
                )
        ax.set_xlabel("s (0 = closed, 1 = open)")
        ax.set_ylabel("density")
        ax.set_title(f"recovered densities, SNR {snr:g}, seed {cfg['seeds'][0]}")
        ax.legend(fontsize=7)
    fig.suptitle(f"AdK ({model_name}): what each objective sees", fontsize=10)
    fig.tight_layout()
    p = out / "discrepancies.png"
    _atomic.savefig(fig, p, dpi=120)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--snrs", type=parse_floats, default=None, help=f"SNRs (default {DEFAULTS['snrs']})"
    )
    p.add_argument(
        "--n-images", type=int, default=None, help=f"images (default {DEFAULTS['n_images']})"
    )
    p.add_argument(
        "--objectives",
        type=parse_methods,
        default=OBJECTIVES,
        help=f"objectives (default {','.join(OBJECTIVES)})",
    )
    add_adk_flow_options(p, DEFAULTS)
    p.add_argument(
        "--unconditional-batch",
        type=int,
        default=256,
        help="observed images per step of the unconditional MMD (default 256)",
    )
    add_fisher_rao(p)
    a = p.parse_args(argv)
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        snrs=a.snrs,
        n_images=a.n_images,
        objectives=a.objectives,
        n_particles=a.n_particles,
        n_steps=a.n_steps,
        n_nodes=a.n_nodes,
        all_atom=a.all_atom,
        quick=a.quick,
        fisher_rao=a.fisher_rao,
        unconditional_batch=a.unconditional_batch,
    )
    return 0
