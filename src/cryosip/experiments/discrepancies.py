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

import dataclasses
import logging
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from ..pipeline.problem import Problem
from ._common import AdkFlowSettings, Results, adk_study, check_names, reconstruct, score, setting

logger = logging.getLogger(__name__)

NAME = "discrepancies"
OBJECTIVES = ("kl", "mmd-unconditional", "mmd", "kl+mmd")


@dataclasses.dataclass(frozen=True)
class Settings(AdkFlowSettings):
    seeds: tuple[int, ...] = setting((0, 1), "seeds", quick=(0,))
    snrs: tuple[float, ...] = setting((0.1, 0.01, 0.003, 0.001), "SNRs", quick=(0.1, 0.01, 0.001))
    n_images: int = setting(1000, "images", quick=500)
    n_steps: int = setting(200, "WGF steps", quick=100)
    objectives: tuple[str, ...] = setting(OBJECTIVES, "objectives")
    unconditional_batch: int = setting(256, "observed images per step of the unconditional MMD")

    def __post_init__(self):
        super().__post_init__()
        self._set(
            snrs=tuple(sorted((float(x) for x in self.snrs), reverse=True)),
            objectives=check_names(self.objectives, OBJECTIVES, "objectives"),
        )


def direct_problem(table_problem: Problem, observations) -> Problem:
    """The same data on the direct (simulating) operator: no tables, the observed images themselves."""
    p = table_problem
    return Problem(p.operator, observations, None, p.lower, p.upper, None, None, p.bandwidth, 0.0)


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    t_start, s = time.perf_counter(), settings
    scene, out, ref = adk_study(out_dir, NAME, s, init="uniform")
    N = s.n_images
    rows, shown = [], {}
    nan = dict(w1_start=np.nan, loss_first=np.nan, loss_last=np.nan)
    for seed in s.seeds:
        theta, nu, k_noise = scene.draw(jax.random.key(seed), N)
        tabs = scene.tabulate(k_noise, theta, nu, s.n_nodes, keep_images=N)
        oracle = score(theta, None, ref)
        rows.append(dict(seed=seed, snr=np.nan, objective="oracle", **oracle, **nan, seconds=0.0))
        # the same key for every objective: the same initial particles
        k_run = jax.random.fold_in(jax.random.key(seed), 500)
        for snr in s.snrs:
            sigma = tabs.sigma_for_snr(snr)
            problem = tabs.problem(scene.operator, sigma)
            for obj in s.objectives:
                pb, kw = problem, {}
                if obj == "mmd-unconditional":  # the direct operator, a fresh data minibatch a step
                    pb = direct_problem(problem, tabs.observations(sigma, N))
                    kw["batch_size"] = min(N, s.unconditional_batch)
                r = reconstruct(pb, "wgf-" + obj, s, key=k_run, init="uniform", **kw)
                losses = np.asarray(r.losses)
                losses = losses[np.isfinite(losses)]
                m = score(r.positions, r.weights, ref)
                rows.append(
                    dict(
                        seed=seed,
                        snr=snr,
                        objective=obj,
                        **m,
                        w1_start=score(np.asarray(r.trajectory[0]), None, ref)["w1"],
                        loss_first=float(losses[0]) if losses.size else np.nan,
                        loss_last=float(losses[-1]) if losses.size else np.nan,
                        seconds=r.seconds,
                    )
                )
                logger.info("seed %d SNR %g %s: W1 %.4f", seed, snr, obj, m["w1"])
                if seed == s.seeds[0] and snr in (s.snrs[0], s.snrs[-1]):
                    shown[(snr, obj)] = (np.asarray(r.positions)[:, 0], np.asarray(r.weights))
            out.table("discrepancies", rows)
    _, summary = out.tables(
        "discrepancies", rows, ["snr", "objective"], ("w1", "w2", "w1_start", "seconds")
    )
    plot(out, summary, shown, scene, s)
    logger.info("discrepancies: done in %.0f s", time.perf_counter() - t_start)
    return pd.DataFrame(rows)


def plot(out: Results, summary: pd.DataFrame, shown: dict, scene, s: Settings) -> Path:
    from ..analysis.plots import COLORS
    from ._common import W1_SEEDS_LABEL, density_panel, floor_line, log_axes, pyplot, w1_lines

    def color(objective):
        return COLORS.get(f"wgf-{objective}", "0.5")

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    flows = summary[summary["objective"] != "oracle"]
    style = lambda obj: dict(marker="o", color=color(obj), label=obj)  # noqa: E731
    w1_lines(ax, flows, "snr", "objective", style)
    if len(flows):
        floor_line(ax, flows["w1_start_mean"].mean(), "uniform start", ls=":")
    o = summary[summary["objective"] == "oracle"]
    if len(o):
        floor_line(ax, o["w1_mean"].iloc[0])
    ax.set_ylabel(W1_SEEDS_LABEL)
    title = f"{s.n_images} images, {len(s.seeds)} seed(s), uniform start"
    log_axes(ax, "SNR", title, legend=True)
    grid = np.linspace(float(scene.model.lower[0]), float(scene.model.upper[0]), 201)
    for ax, snr in zip(axes[1:], (s.snrs[0], s.snrs[-1])):
        shown_here = {obj: shown[(snr, obj)] for obj in OBJECTIVES if (snr, obj) in shown}
        title = f"recovered densities, SNR {snr:g}, seed {s.seeds[0]}"
        density_panel(
            ax, grid, scene.truth.pdf(grid), shown_here, color, "s (0 = closed, 1 = open)", title
        )
    fig.suptitle(f"AdK ({s.model_name}): what each objective sees", fontsize=10)
    return out.figure(fig, "discrepancies.png")
