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

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import _atomic
from ..analysis.metrics import w1
from ..sip import dto
from ..sip.discrepancies import KL, GaussianKernel, PairedMMD, median_distance
from ..sip.examples import DecayOperator
from ..sip.flow import WassersteinGradientFlow
from ..sip.measure import ParticleMeasure, uniform_measure
from ..sip.operator import Observations
from . import common_parser, resolve, seeds_from
from .robustness import parse_floats, parse_methods, summarise, write_config

logger = logging.getLogger(__name__)

NAME = "general-sip"
METHODS = ("wgf-kl", "wgf-mmd", "wgf-mmd-median", "em-grid", "per-curve")
DEFAULTS = dict(
    seeds=(0, 1, 2),
    sigmas=(0.05, 0.1, 0.3),
    n_curves=1000,
    n_particles=64,
    n_steps=300,
    fisher_rao=0.3,
)
QUICK = dict(DEFAULTS, seeds=(0,), sigmas=(0.1,), n_steps=200)
WEIGHTS, MEANS, SDS = (0.6, 0.4), (0.8, 2.0), (0.15, 0.2)


def sample_truth(
    rng: np.random.Generator, n: int, lower: float = 0.1, upper: float = 3.0
) -> np.ndarray:
    """rho*: the two-component mixture truncated to [lower, upper] (rejection)."""
    out = np.empty(0)
    while out.size < n:
        first = rng.uniform(size=2 * n) < WEIGHTS[0]
        x = np.where(
            first, rng.normal(MEANS[0], SDS[0], 2 * n), rng.normal(MEANS[1], SDS[1], 2 * n)
        )
        out = np.concatenate([out, x[(x >= lower) & (x <= upper)]])
    return out[:n]


def truth_pdf(x: np.ndarray, lower: float = 0.1, upper: float = 3.0) -> np.ndarray:
    from scipy import stats

    p = sum(w * stats.norm.pdf(x, m, s) for w, m, s in zip(WEIGHTS, MEANS, SDS))
    mass = sum(
        w * (stats.norm.cdf(upper, m, s) - stats.norm.cdf(lower, m, s))
        for w, m, s in zip(WEIGHTS, MEANS, SDS)
    )
    return np.where((x >= lower) & (x <= upper), p / mass, 0.0)


def auto_flow(
    disc, op, obs, init: ParticleMeasure, key, n_steps: int, fisher_rao: float, move: float = 0.03
):
    """The step size that moves the median particle ``move`` of the domain at the start."""
    g = jax.grad(lambda p: disc(key, op, ParticleMeasure(p, init.log_weights), obs))(init.positions)
    speed = float(np.median(np.abs(np.asarray(g)))) * init.n_particles
    lo, hi = (float(b[0]) for b in op.domain)
    return WassersteinGradientFlow(
        step_size=move * (hi - lo) / max(speed, 1e-30),
        n_steps=int(n_steps),
        max_displacement=0.05 * (hi - lo),
        fisher_rao=float(fisher_rao),
    )


def run_case(
    sigma: float, seed: int, cfg: dict, methods, reference: np.ndarray
) -> tuple[list[dict], dict]:
    op = DecayOperator(sigma=sigma)
    lo, hi = (float(b[0]) for b in op.domain)
    key = jax.random.fold_in(jax.random.key(seed), int(round(sigma * 1e6)))
    k_nu, k_noise, k_init, k_flow = jax.random.split(key, 4)
    n = int(cfg["n_curves"])
    theta = sample_truth(np.random.default_rng([seed, int(round(sigma * 1e6))]), n, lo, hi)
    amplitude = op.sample_nuisance(k_nu, n)
    obs = Observations(
        op.sample(k_noise, jnp.asarray(theta[:, None], jnp.float32), amplitude), amplitude
    )
    init = uniform_measure(k_init, cfg["n_particles"], lo, hi)
    md = median_distance(np.asarray(obs.values))
    common = dict(sigma=sigma, seed=seed, n_curves=n)
    rows = [
        dict(common, method="oracle", w1=w1(theta, reference), seconds=0.0),
        dict(
            common, method="start", w1=w1(np.asarray(init.positions)[:, 0], reference), seconds=0.0
        ),
    ]
    shown = {"theta": theta}
    discs = {
        "wgf-kl": KL(),
        "wgf-mmd": PairedMMD(GaussianKernel(0.5 * md)),
        "wgf-mmd-median": PairedMMD(GaussianKernel(md)),
    }
    for method in methods:
        t0 = time.perf_counter()
        if method in discs:
            disc = discs[method]
            flow = auto_flow(disc, op, obs, init, k_flow, cfg["n_steps"], cfg["fisher_rao"])
            res = flow.run(disc, op, obs, init, key=k_flow)
            x, w = np.asarray(res.measure.positions)[:, 0], np.asarray(res.measure.weights)
        elif method == "em-grid":
            x = np.linspace(lo, hi, 59)
            w, _ = dto.em_weights(dto.loglik_on_nodes(op, obs, x))
        elif method == "per-curve":
            x, w = dto.per_image_map(op, obs, np.linspace(lo, hi, 465)), None
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        rows.append(
            dict(common, method=method, w1=w1(x, reference, w), seconds=time.perf_counter() - t0)
        )
        shown[method] = (x, w)
        logger.info("sigma %g seed %d %s: W1 %.4f", sigma, seed, method, rows[-1]["w1"])
    return rows, shown


def run(
    out_dir,
    *,
    seeds=None,
    sigmas=None,
    n_curves=None,
    n_particles=None,
    n_steps=None,
    fisher_rao=None,
    methods=METHODS,
    quick: bool = False,
) -> pd.DataFrame:
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        sigmas=sigmas,
        n_curves=n_curves,
        n_particles=n_particles,
        n_steps=n_steps,
        fisher_rao=fisher_rao,
    )
    cfg["sigmas"] = tuple(sorted(float(s) for s in cfg["sigmas"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(
        out,
        experiment=NAME,
        methods=list(methods),
        truth=dict(weights=WEIGHTS, means=MEANS, sds=SDS),
        quick=bool(quick),
        **cfg,
    )
    reference = sample_truth(np.random.default_rng(12345), 200_000)
    rows, shown = [], {}
    mid = cfg["sigmas"][len(cfg["sigmas"]) // 2]
    for seed in cfg["seeds"]:
        for sigma in cfg["sigmas"]:
            r, s = run_case(sigma, seed, cfg, methods, reference)
            rows.extend(r)
            if seed == cfg["seeds"][0] and sigma == mid:
                shown = s
    df = pd.DataFrame(rows)
    _atomic.write_csv(out / "general_sip.csv", df)
    summary = summarise(df, ["sigma", "method"], ("w1", "seconds"))
    _atomic.write_csv(out / "general_sip_summary.csv", summary)
    plot(out, summary, shown, cfg, mid)
    logger.info("general-sip: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Path, summary: pd.DataFrame, shown: dict, cfg: dict, mid: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.density import kde

    colors = {
        "wgf-kl": "C0",
        "wgf-mmd": "C1",
        "wgf-mmd-median": "C5",
        "em-grid": "C3",
        "per-curve": "C7",
        "oracle": "0.5",
        "start": "0.3",
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for m in summary["method"].unique():
        d = summary[summary["method"] == m].sort_values("sigma")
        lab = {"oracle": "true rates (sampling floor)", "start": "uniform start"}.get(m, m)
        ax.errorbar(
            d["sigma"],
            d["w1_mean"],
            d["w1_sd"],
            marker="" if m in ("oracle", "start") else "o",
            capsize=3,
            ls="--" if m in ("oracle", "start") else "-",
            color=colors.get(m),
            label=lab,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise sd sigma (amplitudes 0.5-1.5)")
    ax.set_ylabel(r"$W_1(\hat\rho, \rho^*)$  (mean $\pm$ sd over seeds)")
    ax.set_title(f"decay rates, {cfg['n_curves']} curves, {len(cfg['seeds'])} seed(s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax = axes[1]
    g = np.linspace(0.1, 3.0, 300)
    ax.plot(g, truth_pdf(g), "k--", lw=2, label="truth")
    for m, v in shown.items():
        if isinstance(v, tuple):
            ax.plot(
                g, kde(v[0], v[1], g, lower=0.1, upper=3.0), color=colors.get(m), lw=1.5, label=m
            )
    ax.set_xlabel("decay rate theta")
    ax.set_ylabel("density")
    ax.set_title(f"recovered densities, sigma {mid:g}, seed {cfg['seeds'][0]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "general_sip.png"
    _atomic.savefig(fig, p, dpi=120)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--sigmas",
        type=parse_floats,
        default=None,
        help=f"noise levels (default {DEFAULTS['sigmas']})",
    )
    p.add_argument(
        "--n-curves",
        type=int,
        default=None,
        help=f"curves per data set (default {DEFAULTS['n_curves']})",
    )
    p.add_argument("--n-particles", type=int, default=None, help="WGF particles (default 64)")
    p.add_argument(
        "--n-steps", type=int, default=None, help=f"WGF steps (default {DEFAULTS['n_steps']})"
    )
    p.add_argument(
        "--fisher-rao",
        type=float,
        default=None,
        help="Fisher-Rao weight step (default 0.3; 0: pure W flow)",
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=METHODS,
        help=f"methods (default {','.join(METHODS)})",
    )
    a = p.parse_args(argv)
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        sigmas=a.sigmas,
        n_curves=a.n_curves,
        n_particles=a.n_particles,
        n_steps=a.n_steps,
        fisher_rao=a.fisher_rao,
        methods=a.methods,
        quick=a.quick,
    )
    return 0
