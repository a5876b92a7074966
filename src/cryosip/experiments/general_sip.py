"""General SIP: the same engine on a problem that is not cryo-EM (decay rates from noisy curves).

A population of exponential decays y(t) = a exp(-theta t) + sigma eps is observed at 16 times
in [0, 3] (:class:`cryosip.sip.examples.DecayOperator`); the amplitude a ~ U(0.5, 1.5) is a
nuisance known per curve, the rate theta has the unknown distribution rho* = 0.6 N(0.8, 0.15^2)
+ 0.4 N(2.0, 0.2^2) truncated to [0.1, 3]. Nothing here knows about images: the operator,
the discrepancies (:class:`~cryosip.sip.discrepancies.KL`,
:class:`~cryosip.sip.discrepancies.PairedMMD`) and the flow
(:class:`~cryosip.sip.flow.WassersteinGradientFlow`) are the ones the cryo-EM pipeline uses.

Methods, for every noise level and seed (all flows from the same uniform start, Wasserstein-
Fisher-Rao with ``fisher_rao`` 0.3, step size set so that the median particle first moves 3%
of the domain): ``wgf-kl``; ``wgf-mmd`` (Gaussian kernel, bandwidth half the median distance
between curves); ``wgf-mmd-median`` (bandwidth the median distance itself: the median
heuristic); ``em-grid`` (EM weights on 59 fixed nodes); ``per-curve`` (histogram of per-curve
maximum-likelihood rates). W1 to rho* (200,000 draws).

The same computation, stripped to a script a user can copy, is ``examples/general_sip.py``.

Outputs in ``--out``: ``general_sip.csv``, ``general_sip_summary.csv`` (mean and sd over
seeds), ``general_sip.png`` (W1 against the noise level, and the densities of the first seed
at the middle noise level) and ``config.json``.

Cost on a 2-core CPU (defaults: 3 noise levels x 3 seeds x 1,000 curves): about 10 minutes;
``--quick`` (one noise level, one seed) about a minute.

examples:
  $ cryosip experiment general-sip --quick --out gsip-quick/
  $ cryosip experiment general-sip --out gsip/
  $ cryosip experiment general-sip --sigmas 0.5,1.0 --n-curves 5000 --out gsip-noisy/
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

from ..analysis.metrics import w1
from ..data.distributions import TwoModeMixture
from ..sip import dto
from ..sip.discrepancies import KL, GaussianKernel, PairedMMD, median_distance
from ..sip.examples import DecayOperator
from ..sip.flow import WassersteinGradientFlow
from ..sip.measure import ParticleMeasure, uniform_measure
from ..sip.operator import Observations
from ._common import Results, check_names, initial_speed, setting
from ._common import Settings as _Settings

logger = logging.getLogger(__name__)

NAME = "general-sip"
METHODS = ("wgf-kl", "wgf-mmd", "wgf-mmd-median", "em-grid", "per-curve")
WEIGHTS, MEANS, SDS = (0.6, 0.4), (0.8, 2.0), (0.15, 0.2)
COLORS = {"wgf-kl": "C0", "wgf-mmd": "C1", "wgf-mmd-median": "C5", "em-grid": "C3"}
COLORS.update({"per-curve": "C7", "oracle": "0.5", "start": "0.3"})


@dataclasses.dataclass(frozen=True)
class Settings(_Settings):
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds", quick=(0,))
    sigmas: tuple[float, ...] = setting((0.05, 0.1, 0.3), "noise levels", quick=(0.1,))
    n_curves: int = setting(1000, "curves per data set")
    n_particles: int = setting(64, "WGF particles")
    n_steps: int = setting(300, "WGF steps", quick=200)
    fisher_rao: float = setting(0.3, "Fisher-Rao weight step (0: pure Wasserstein flow)")
    methods: tuple[str, ...] = setting(METHODS, "methods")

    def __post_init__(self):
        super().__post_init__()
        self._set(
            sigmas=tuple(sorted(float(x) for x in self.sigmas)),
            methods=check_names(self.methods, METHODS),
        )


def sample_truth(
    rng: np.random.Generator, n: int, lower: float = 0.1, upper: float = 3.0
) -> np.ndarray:
    """Draws of rho* by rejection (this study's own stream of draws, kept for its numbers)."""
    out = np.empty(0)
    while out.size < n:
        first = rng.uniform(size=2 * n) < WEIGHTS[0]
        x = np.where(
            first, rng.normal(MEANS[0], SDS[0], 2 * n), rng.normal(MEANS[1], SDS[1], 2 * n)
        )
        out = np.concatenate([out, x[(x >= lower) & (x <= upper)]])
    return out[:n]


truth_pdf = TwoModeMixture(0.1, 3.0, MEANS, SDS, WEIGHTS).pdf  # rho* on [0.1, 3]


def auto_flow(
    disc, op, obs, init: ParticleMeasure, key, n_steps: int, fisher_rao: float, move: float = 0.03
):
    """The flow whose step moves the median particle ``move`` of the domain at the start."""
    lo, hi = (float(b[0]) for b in op.domain)
    return WassersteinGradientFlow(
        step_size=move * (hi - lo) / max(initial_speed(disc, op, obs, init, key), 1e-30),
        n_steps=int(n_steps),
        max_displacement=0.05 * (hi - lo),
        fisher_rao=float(fisher_rao),
    )


def run_case(
    sigma: float, seed: int, s: Settings, reference: np.ndarray
) -> tuple[list[dict], dict]:
    op = DecayOperator(sigma=sigma)
    lo, hi = (float(b[0]) for b in op.domain)
    key = jax.random.fold_in(jax.random.key(seed), int(round(sigma * 1e6)))
    k_nu, k_noise, k_init, k_flow = jax.random.split(key, 4)
    n = s.n_curves
    theta = sample_truth(np.random.default_rng([seed, int(round(sigma * 1e6))]), n, lo, hi)
    amplitude = op.sample_nuisance(k_nu, n)
    obs = Observations(
        op.sample(k_noise, jnp.asarray(theta[:, None], jnp.float32), amplitude), amplitude
    )
    init = uniform_measure(k_init, s.n_particles, lo, hi)
    md = median_distance(np.asarray(obs.values))
    common = dict(sigma=sigma, seed=seed, n_curves=n)
    start_w1 = w1(np.asarray(init.positions)[:, 0], reference)
    rows = [
        dict(common, method="oracle", w1=w1(theta, reference), seconds=0.0),
        dict(common, method="start", w1=start_w1, seconds=0.0),
    ]
    shown = {"theta": theta}
    discs = {
        "wgf-kl": KL(),
        "wgf-mmd": PairedMMD(GaussianKernel(0.5 * md)),
        "wgf-mmd-median": PairedMMD(GaussianKernel(md)),
    }
    for method in s.methods:
        t0 = time.perf_counter()
        if method in discs:
            disc = discs[method]
            flow = auto_flow(disc, op, obs, init, k_flow, s.n_steps, s.fisher_rao)
            res = flow.run(disc, op, obs, init, key=k_flow)
            x, w = np.asarray(res.measure.positions)[:, 0], np.asarray(res.measure.weights)
        elif method == "em-grid":
            x = np.linspace(lo, hi, 59)
            w, _ = dto.em_weights(dto.loglik_on_nodes(op, obs, x))
        else:  # per-curve
            x, w = dto.per_image_map(op, obs, np.linspace(lo, hi, 465)), None
        rows.append(
            dict(common, method=method, w1=w1(x, reference, w), seconds=time.perf_counter() - t0)
        )
        shown[method] = (x, w)
        logger.info("sigma %g seed %d %s: W1 %.4f", sigma, seed, method, rows[-1]["w1"])
    return rows, shown


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    t_start, s = time.perf_counter(), settings
    out = Results(out_dir, NAME, s, truth=dict(weights=WEIGHTS, means=MEANS, sds=SDS))
    reference = sample_truth(np.random.default_rng(12345), 200_000)
    rows, shown = [], {}
    mid = s.sigmas[len(s.sigmas) // 2]
    for seed in s.seeds:
        for sigma in s.sigmas:
            r, case = run_case(sigma, seed, s, reference)
            rows.extend(r)
            if seed == s.seeds[0] and sigma == mid:
                shown = case
    df, summary = out.tables("general_sip", rows, ["sigma", "method"], ("w1", "seconds"))
    plot(out, summary, shown, s, mid)
    logger.info("general-sip: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Results, summary: pd.DataFrame, shown: dict, s: Settings, mid: float) -> Path:
    from ._common import density_panel, log_axes, pyplot, w1_lines

    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]

    def style(m):
        ref = m in ("oracle", "start")
        label = {"oracle": "true rates (sampling floor)", "start": "uniform start"}.get(m, m)
        return dict(
            marker="" if ref else "o", ls="--" if ref else "-", color=COLORS.get(m), label=label
        )

    w1_lines(ax, summary, "sigma", "method", style)
    ax.set_ylabel(r"$W_1(\hat\rho, \rho^*)$  (mean $\pm$ sd over seeds)")
    title = f"decay rates, {s.n_curves} curves, {len(s.seeds)} seed(s)"
    log_axes(ax, "noise sd sigma (amplitudes 0.5-1.5)", title, legend=True)
    g = np.linspace(0.1, 3.0, 300)
    shown = {m: v for m, v in shown.items() if isinstance(v, tuple)}
    title = f"recovered densities, sigma {mid:g}, seed {s.seeds[0]}"
    density_panel(axes[1], g, truth_pdf(g), shown, COLORS.get, "decay rate theta", title)
    return out.figure(fig, "general_sip.png")
