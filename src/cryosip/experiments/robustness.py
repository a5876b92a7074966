"""Robustness: W1 error against SNR and against the number of images, mean +- sd over seeds.

AdK along its closed->open path (C-alpha Gaussians by default, ``--all-atom`` for every atom),
bimodal truth 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2) on s in [0, 1], 64-px images at
2 A/px with known poses, shifts (sd 2 A) and astigmatic CTF. For every seed, SNR and number
of images N the methods ``wgf-kl`` (particle flow of the KL, started at the per-image-MAP
quantiles), ``wgf-mmd`` (flow of the paired, noise-averaged Gaussian-kernel score; bandwidth
from the median heuristic on the images), ``em-grid`` (EM weights on the 33 table nodes) and
``per-image`` (histogram of per-image MAP CVs) recover rho*, and W1/W2 to rho* (200,000 draws)
are recorded, with the W1 of the images' own true CVs (``oracle``: the sampling floor).

The sweep is exact and cheap: every SNR reuses one render per seed and the N-image data set
is the first N images of the seed's largest one (nested subsets; seeds are independent); see
:mod:`cryosip.experiments._common`.

Outputs in ``--out``: ``robustness.csv`` (one row per seed, SNR, N and method),
``robustness_summary.csv`` (mean and sd over seeds), ``robustness_snr.png`` (W1 against SNR,
one panel per N), ``robustness_n.png`` (W1 against N, one panel per SNR) and ``config.json``.

Cost on a 2-core CPU (C-alpha): the default (4 SNRs x N in {500, 2000, 10000} x 3 seeds x 4
methods, 144 reconstructions) takes about an hour (see docs/results.md for measured times);
``--quick`` (3 SNRs x N in {500, 2000} x 3 seeds) a few minutes.

examples:
  $ cryosip experiment robustness --quick --out robustness-quick/
  $ cryosip experiment robustness --out robustness/
  $ cryosip experiment robustness --snrs 0.01,0.001 --n-images 1000,5000 --seeds 0-4 --out r/
  $ cryosip experiment robustness --all-atom --quick --out robustness-aa/
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import pandas as pd

from ._common import AdkFlowSettings, Results, adk_study, check_names, reconstruct, score, setting

logger = logging.getLogger(__name__)

NAME = "robustness"
METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
ALL_METHODS = ("wgf-kl", "wgf-mmd", "wgf-kl+mmd", "em-grid", "per-image")


@dataclasses.dataclass(frozen=True)
class Settings(AdkFlowSettings):
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds")
    snrs: tuple[float, ...] = setting((0.1, 0.01, 0.003, 0.001), "SNRs", quick=(0.1, 0.01, 0.001))
    n_images: tuple[int, ...] = setting((500, 2000, 10000), "data set sizes", quick=(500, 2000))
    methods: tuple[str, ...] = setting(METHODS, "methods, among " + ",".join(ALL_METHODS))
    n_steps: int = setting(200, "WGF steps", quick=150)
    box: int = setting(64, "box size in pixels")
    pixel_size: float = setting(2.0, "pixel size in Angstrom")

    def __post_init__(self):
        super().__post_init__()
        self._set(
            n_images=tuple(sorted(int(n) for n in self.n_images)),
            snrs=tuple(sorted((float(s) for s in self.snrs), reverse=True)),
            methods=check_names(self.methods, ALL_METHODS),
        )


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    """Run the sweep and write its CSVs, figures and config into ``out_dir``; returns the per-run table."""
    t_start, s = time.perf_counter(), settings
    scene, out, ref = adk_study(out_dir, NAME, s, s.box, s.pixel_size)
    rows = []
    for seed in s.seeds:
        theta, nu, k_noise = scene.draw(jax.random.key(seed), max(s.n_images))
        tabs = scene.tabulate(k_noise, theta, nu, s.n_nodes)
        logger.info("seed %d: %d images tabulated in %.0f s", seed, len(tabs), tabs.seconds)
        for snr in s.snrs:
            sigma = tabs.sigma_for_snr(snr)
            for n in s.n_images:
                problem = tabs.problem(scene.operator, sigma, n)
                common = dict(seed=seed, snr=snr, n_images=n)
                oracle = score(theta[:n], None, ref)
                rows.append(dict(common, method="oracle", **oracle, seconds=0.0, sigma=sigma))
                for i, method in enumerate(s.methods):
                    k = jax.random.fold_in(jax.random.key(seed), 1000 + i)
                    r = reconstruct(problem, method, s, key=k)
                    m = score(r.positions, r.weights, ref)
                    rows.append(dict(common, method=method, **m, seconds=r.seconds, sigma=sigma))
                    logger.info("seed %d SNR %g N %d %s: W1 %.4f", seed, snr, n, method, m["w1"])
                # partial results survive an interrupt
                out.table("robustness", rows)
    df, summary = out.tables(
        "robustness", rows, ["snr", "n_images", "method"], ("w1", "w2", "seconds")
    )
    plot(out, summary, s)
    logger.info("robustness: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Results, summary: pd.DataFrame, s: Settings) -> list[Path]:
    from ._common import W1_SEEDS_LABEL, log_axes, method_style, pyplot, w1_lines

    plt = pyplot()
    # the oracle last in the legend
    summary = summary.sort_values("method", key=lambda m: m == "oracle", kind="stable")
    paths = []
    for fname, xcol, pcol, xlabel in (
        ("robustness_snr.png", "snr", "n_images", "SNR"),
        ("robustness_n.png", "n_images", "snr", "number of images N"),
    ):
        panels = sorted(summary[pcol].unique(), reverse=(pcol == "snr"))
        fig, axes = plt.subplots(
            1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False
        )
        for ax, pv in zip(axes[0], panels):
            w1_lines(ax, summary[summary[pcol] == pv], xcol, "method", method_style)
            log_axes(ax, xlabel, f"N = {pv}" if pcol == "n_images" else f"SNR = {pv:g}")
        axes[0][0].set_ylabel(W1_SEEDS_LABEL)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(
            f"AdK ({s.model_name}), bimodal truth, known poses, {len(s.seeds)} seeds", fontsize=10
        )
        paths.append(out.figure(fig, fname))
    return paths
