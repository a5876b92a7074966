"""DTO consistency: MAP methods (em-grid, map-classes) against K, vs the particle flow and truth.

MAP estimators are discretize-then-optimize (DTO) restrictions of the SIP objective (the KL,
i.e. the marginal likelihood) to K-atom measures (``docs/method.md`` section 4). This study
shows numerically how they approach the continuous answer as K grows:

1. simulate AdK images (C-alpha Gaussians by default, ``--all-atom`` for every atom) with known
   poses and CTF at a given SNR, from a bimodal truth 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2)
   truncated to [0, 1];
2. tabulate the images once (one simulation per image and CV node);
3. for every K: ``em-grid`` (K uniform nodes, free weights, EM; no prior) and ``map-classes``
   (K free classes, positions and weights by Adam); and per data set once: the particle flows
   of the KL on the table from P particles at the per-image-MAP quantiles, Wasserstein
   (``wgf``: equal weights, positions move) and Wasserstein-Fisher-Rao (``wfr``: weights move
   too, ``--fisher-rao``), the per-image-MAP histogram (``per-image``), EM on a 257-node grid
   (``npmle-257``), Gaussian mixtures with 1 and 2 components fitted through the likelihood
   (``gmm-1``, ``gmm-2``) and, as references, each mixture family's best fit to rho* itself
   (``gmm-C-best``) and the histogram of the true CVs of the images (``oracle``);
4. record W1(rho_K, rho*) (rho* = 200,000 draws of the truth), W1(rho_K, rho_WGF),
   W1(rho_K, rho_WFR) and the objective gap: the NPMLE's mean log marginal likelihood per
   image minus the method's (0 = as good as EM on 257 nodes; negative = better);
5. repeat 2-4 on a family-mismatch truth (``--mismatch-truth``, default ``flat``: uniform on
   [0.1, 0.9]) for the gmm-vs-flow comparison; the bimodal truth is the matched case for gmm-2.

Outputs in ``--out``: ``dto_consistency.csv`` (one row per case, seed, method and K),
``dto_summary.csv`` (mean and sd over seeds), ``dto_consistency.png`` (W1 and the objective gap
against K, error bars over seeds, log-x), ``dto_family.png`` (the gmm comparison),
``dto_densities.png`` (the estimates of the first seed, em-grid with a bootstrap band) and
``config.json``.

examples:
  $ cryosip experiment dto-consistency --quick --out dto-quick/
  $ cryosip experiment dto-consistency --out dto/
  $ cryosip experiment dto-consistency --all-atom --snr 0.003 --seeds 0-4 --out dto-aa/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..analysis.metrics import w1
from ..cryoem.image_model import ImageModel, NuisancePrior
from ..data.adk import adk_model
from ..data.distributions import Beta, TwoModeMixture, Uniform, as_rng
from ..pipeline.operator import CryoEMOperator
from ..pipeline.simulate import add_noise, render_clean, sigma_for_snr
from ..sip import dto
from ..sip.discrepancies import KL
from ..sip.flow import WassersteinGradientFlow
from ..sip.measure import ParticleMeasure
from ..sip.noise import GaussianNoise
from ..sip.operator import Observations
from ..sip.table import TabulatedOperator
from ._common import N_REFERENCE, W1_LABEL, Results, check_names, initial_speed, pyplot, setting
from ._common import Settings as _Settings

logger = logging.getLogger(__name__)

NAME = "dto-consistency"
FINE_GRID = 257  # quadrature / per-image-MAP grid on [0, 1]
CASES = ("consistency", "mismatch")

# ------------------------------------------------------------------------------------------------
# Truths on the AdK path coordinate s in [0, 1]
# ------------------------------------------------------------------------------------------------


class _DrawnInBlocks(TwoModeMixture):
    """The truncated mixture, drawn as this study always drew it (rejection in blocks of 2n), so
    that its published numbers reproduce; its density is the shared one."""

    def sample(self, key, n: int) -> np.ndarray:
        rng, w, mu, sd = as_rng(key), self.weights, self.means[:, 0], self.sds[:, 0]
        out = np.empty(0)
        while out.size < n:
            c = rng.choice(w.size, size=2 * n, p=w)
            x = rng.normal(mu[c], sd[c])
            out = np.concatenate([out, x[(x >= 0) & (x <= 1)]])
        return out[:n, None]


def _named(distribution, name: str):
    object.__setattr__(distribution, "name", name)
    return distribution


TRUTHS = {
    "bimodal": _DrawnInBlocks(0.0, 1.0, (0.25, 0.72), (0.07, 0.06), (0.6, 0.4)),
    "flat": _named(Uniform(0.1, 0.9), "flat"),
    "skewed": _named(Beta(0.0, 1.0, 2.0, 6.0), "skewed"),
}


@dataclasses.dataclass(frozen=True)
class Settings(_Settings):
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds", quick=(0, 1))
    ks: tuple[int, ...] = setting(
        (2, 4, 8, 16, 32, 64, 128), "K values", quick=(2, 4, 8, 16, 32, 64)
    )
    n_images: int = setting(2000, "images per data set", quick=500)
    snr: float = setting(0.01, "signal-to-noise ratio")
    box: int = setting(64, "box size in pixels")
    pixel_size: float = setting(2.0, "pixel size in Angstrom")
    all_atom: bool = setting(False, "all 3,341 atoms instead of the 214 C-alphas (slower)")
    n_particles: int = setting(128, "WGF particles", quick=64)
    n_flow_steps: int = setting(400, "WGF steps", quick=200)
    n_class_steps: int = setting(500, "map-classes Adam steps", quick=300)
    n_nodes: int = setting(33, "table nodes on the CV")
    n_boot: int = setting(20, "bootstrap replicates for the em-grid band", quick=10)
    mismatch_truth: str = setting(
        "flat",
        "the truth of the family-mismatch case (flat: uniform on [0.1, 0.9])",
        choices=("flat", "skewed"),
    )
    fisher_rao: float = setting(1.0, "weight step of the Wasserstein-Fisher-Rao reference flow")
    cases: tuple[str, ...] = setting(CASES, "which cases: consistency, mismatch or both")

    def __post_init__(self):
        super().__post_init__()
        self._set(ks=tuple(sorted(int(k) for k in self.ks)), cases=tuple(self.cases))
        if any(k < 2 for k in self.ks):
            raise ValueError(f"every K must be >= 2, got {self.ks}")
        if self.mismatch_truth not in TRUTHS or self.mismatch_truth == "bimodal":
            raise ValueError(
                f"mismatch_truth must be one of {sorted(set(TRUTHS) - {'bimodal'})}, "
                f"got {self.mismatch_truth!r}"
            )
        if not check_names(self.cases, CASES, "cases"):
            raise ValueError("no cases: choose consistency, mismatch or both")


# ------------------------------------------------------------------------------------------------
# Data and tables
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    theta: np.ndarray  # (N,) true CVs
    table: TabulatedOperator
    obs: Observations  # the table's observations
    sigma: float
    seconds: float


def simulate(key, truths, s: Settings, streams=None) -> list[Dataset]:
    """AdK images from each truth, known poses and CTF, at ``s.snr``; tabulated on ``s.n_nodes`` nodes.

    One data set of ``s.n_images`` per truth, each with its own sigma (SNR = mean variance of its
    clean images / sigma^2); the data sets are rendered and tabulated in one pass (one compilation).
    Data set i draws its CVs, nuisances and noise from ``fold_in(key, streams[i])`` (default i), so
    it does not depend on which other data sets are simulated with it.
    """
    t0 = time.perf_counter()
    n_images, model = s.n_images, adk_model(ca_only=not s.all_atom)
    op = CryoEMOperator(model, ImageModel.for_atoms(s.box, s.pixel_size, model.atoms), 1.0)
    streams = list(range(len(truths))) if streams is None else list(streams)
    sample_nuisance = eqx.filter_jit(NuisancePrior().sample)
    thetas, nuisances, noise_keys = [], [], []
    for truth, stream in zip(truths, streams):
        k_theta, k_nu, k_noise = jax.random.split(jax.random.fold_in(key, stream), 3)
        thetas.append(truth.sample(k_theta, n_images)[:, 0])
        nuisances.append(sample_nuisance(k_nu, n_images))
        noise_keys.append(k_noise)
    nuisance = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *nuisances)
    clean = render_clean(op, np.concatenate(thetas)[:, None].astype(np.float32), nuisance)
    images = np.empty_like(clean)
    sigmas = []
    for i in range(len(truths)):
        sl = slice(i * n_images, (i + 1) * n_images)
        sigmas.append(sigma_for_snr(clean[sl], s.snr))
        images[sl] = add_noise(noise_keys[i], clean[sl], sigmas[-1])
    table = TabulatedOperator.build(op, Observations(jnp.asarray(images), nuisance), s.n_nodes)
    out = []
    for i, sigma in enumerate(sigmas):
        sl = slice(i * n_images, (i + 1) * n_images)
        grid = (table.lower, table.upper, table.n_nodes, table.n_obs_entries)
        tables = (table.gram[sl], table.cross[sl], table.ysq[sl])
        t = TabulatedOperator(GaussianNoise(sigma), table.fit_scale, *grid, *tables)
        out.append(Dataset(thetas[i], t, t.observations(), sigma, 0.0))
    jax.block_until_ready(out[-1].table.gram_blocks)
    seconds = (time.perf_counter() - t0) / len(truths)
    for d in out:
        d.seconds = seconds
    return out


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


def mean_loglik(loglik: np.ndarray, weights: np.ndarray) -> float:
    """Mean log marginal likelihood per image of the mixture sum_k w_k p(y | theta_k) (float64)."""
    from scipy.special import logsumexp

    with np.errstate(divide="ignore"):
        lw = np.log(np.asarray(weights, np.float64))
    return float(np.mean(logsumexp(np.asarray(loglik, np.float64) + lw[None, :], axis=1)))


def run_flow(
    data: Dataset,
    init: np.ndarray,
    *,
    key,
    n_steps: int,
    step_fraction: float = 0.002,
    fisher_rao: float = 0.0,
) -> ParticleMeasure:
    """The particle flow of the KL on the table from equal-weight particles at ``init``.

    ``fisher_rao`` = 0: the Wasserstein gradient flow (positions move, weights stay equal);
    > 0: Wasserstein-Fisher-Rao (the weights move too, by that step along the Fisher-Rao
    gradient). The transport step is set so that the median particle's first move is
    ``step_fraction`` of the domain (any particle's move is capped at 0.02 per step), with a
    cosine decay. Fractions of 0.01 and up make the objective rise for the first ~100 steps
    (the particles overshoot) before the decay brings it back.
    """
    m0 = ParticleMeasure(jnp.asarray(init, jnp.float32)[:, None])
    disc = KL()
    flow = WassersteinGradientFlow(
        step_size=step_fraction / initial_speed(disc, data.table, data.obs, m0, key),
        n_steps=n_steps,
        max_displacement=0.02,
        schedule="cosine",
        chunk_size=50,
        fisher_rao=fisher_rao,
    )
    return flow.run(disc, data.table, data.obs, m0, key=key).measure


def analyse(
    data: Dataset, s: Settings, *, case: str, truth, seed: int, reference, key, with_k: bool = True
) -> tuple[list[dict], dict]:
    """Every method on one data set: rows for the CSV, and the estimates (for the density plot)."""
    ks, n_particles, n_boot = s.ks, s.n_particles, s.n_boot
    rows: list[dict] = []
    est: dict = {}
    grid = np.linspace(0.0, 1.0, FINE_GRID)
    t0 = time.perf_counter()
    L_fine = dto.loglik_on_nodes(data.table, data.obs, grid, batch_size=512)
    w_npmle, _ = dto.em_weights(L_fine, n_iter=3000)
    ll_ref = mean_loglik(L_fine, w_npmle)
    t_fine = time.perf_counter() - t0
    pim = dto.per_image_map(None, None, grid, loglik=L_fine)
    est["per-image"] = pim

    def ll_of(pos, wts):
        return mean_loglik(dto.loglik_on_nodes(data.table, data.obs, pos, batch_size=512), wts)

    # the particle flows, from the per-image-MAP quantiles: the references
    init = np.quantile(pim, (np.arange(n_particles) + 0.5) / n_particles)
    flows = {}
    for name, fr, k in (("wgf", 0.0, 1), ("wfr", s.fisher_rao, 2)):
        t0 = time.perf_counter()
        m = run_flow(
            data, init, key=jax.random.fold_in(key, k), n_steps=s.n_flow_steps, fisher_rao=fr
        )
        pos, wts = np.asarray(m.positions)[:, 0], np.asarray(m.weights, np.float64)
        flows[name] = (pos, wts, ll_of(pos, wts), time.perf_counter() - t0)
        est[name] = (pos, wts)
    wgf, wfr = flows["wgf"][:2], flows["wfr"][:2]

    def add(method, K, pos, wts, ll, seconds, refs=True):
        to = {name: w1(pos, ref[0], wts, ref[1]) if refs and method != name else np.nan
              for name, ref in (("wgf", wgf), ("wfr", wfr))}  # fmt: skip
        gap = ll_ref - ll if ll is not None else np.nan
        row = dict(case=case, truth=truth.name, seed=seed, method=method, K=K)
        row.update(w1_truth=w1(pos, reference, wts), w1_wgf=to["wgf"], w1_wfr=to["wfr"])
        rows.append(dict(row, loglik_gap=gap, seconds=seconds))

    for name, (pos, wts, ll, secs) in flows.items():
        add(name, n_particles, pos, wts, ll, secs)
    uniform = np.full(pim.size, 1.0 / pim.size)
    add("per-image", len(grid), pim, uniform, ll_of(pim, uniform), t_fine)
    add("npmle-257", len(grid), grid, w_npmle, ll_ref, t_fine)
    n = data.theta.size
    add("oracle", n, data.theta, np.full(n, 1 / n), None, 0.0)

    # Gaussian mixtures through the likelihood, and each family's own bias (its best fit to rho*)
    pstar = truth.pdf(grid)
    identity = np.where(np.eye(grid.size, dtype=bool), 0.0, -np.inf)
    for C in (1, 2):
        t0 = time.perf_counter()
        fit = dto.gmm(
            None, data.obs, C, key=jax.random.fold_in(key, 10 + C), grid=grid, loglik=L_fine
        )
        q = np.asarray(fit.measure.weights, np.float64)
        add(f"gmm-{C}", C, grid, q, fit.log_likelihood, time.perf_counter() - t0)
        est[f"gmm-{C}"] = q
        best = dto.gmm_from_loglik(
            identity, grid, C, key=jax.random.fold_in(key, 20 + C), obs_weight=pstar / pstar.sum()
        )
        q_best = np.asarray(best.measure.weights, np.float64)
        add(f"gmm-{C}-best", C, grid, q_best, None, 0.0, refs=False)

    if not with_k:
        return rows, est
    for K in ks:
        nodes = np.linspace(0.0, 1.0, K)
        t0 = time.perf_counter()
        L = dto.loglik_on_nodes(data.table, data.obs, nodes, batch_size=512)
        w, _ = dto.em_weights(L, n_iter=3000)
        add("em-grid", K, nodes, w, mean_loglik(L, w), time.perf_counter() - t0)
        if K == 32 or (K == max(ks) and 32 not in ks):
            boot = dto.bootstrap_em(L, n_boot, jax.random.fold_in(key, 3)) if n_boot else None
            est["em-grid"] = (nodes, w, boot)
        t0 = time.perf_counter()
        m = dto.map_classes(
            data.table, data.obs, K, key=jax.random.fold_in(key, 100 + K), n_steps=s.n_class_steps
        )
        pos, wts = np.asarray(m.positions)[:, 0], np.asarray(m.weights, np.float64)
        add("map-classes", K, pos, wts, ll_of(pos, wts), time.perf_counter() - t0)
        if K == 8:
            est["map-classes"] = (pos, wts)
        w1s = (rows[-2]["w1_truth"], rows[-1]["w1_truth"])
        logger.info("%s seed %d K=%d: em-grid W1 %.4f, map-classes W1 %.4f", case, seed, K, *w1s)
    return rows, est


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------

METRICS = ("w1_truth", "w1_wgf", "w1_wfr", "loglik_gap", "seconds")


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    """Run the study; write its CSVs, plots and config into ``out_dir`` (see the module docstring).

    ``settings.cases``: ``consistency`` (bimodal truth, the K sweep; also the matched case for
    gmm-2) and/or ``mismatch`` (``settings.mismatch_truth``, no K sweep).
    """
    t_start, s = time.perf_counter(), settings
    truths = {n: TRUTHS[n].params() for n in ("bimodal", s.mismatch_truth)}
    out = Results(out_dir, NAME, s, truths=truths, fine_grid=FINE_GRID, n_reference=N_REFERENCE)
    all_cases = {
        "consistency": (0, TRUTHS["bimodal"], True),
        "mismatch": (1, TRUTHS[s.mismatch_truth], False),
    }
    cases = [(c, *all_cases[c]) for c in CASES if c in s.cases]
    refs = {t.name: t.sample(np.random.default_rng(12345), N_REFERENCE) for _, _, t, _ in cases}
    rows: list[dict] = []
    estimates: dict = {}
    for seed in s.seeds:
        truths, streams = [t for _, _, t, _ in cases], [i for _, i, _, _ in cases]
        datasets = simulate(jax.random.key(seed), truths, s, streams)
        for (case, stream, truth, with_k), data in zip(cases, datasets):
            key = jax.random.fold_in(jax.random.key(seed), stream)
            logger.info(
                "%s seed %d: %d images simulated and tabulated in %.1f s (sigma %.4g)",
                *(case, seed, s.n_images, data.seconds, data.sigma),
            )
            r, est = analyse(
                data,
                s,
                case=case,
                truth=truth,
                seed=seed,
                reference=refs[truth.name],
                key=jax.random.fold_in(key, 7),
                with_k=with_k,
            )
            for row in r:
                row["simulate_seconds"] = data.seconds
            rows.extend(r)
            if seed == s.seeds[0]:
                estimates[case] = (truth, est)
    by = ["case", "truth", "method", "K"]
    df, summary = out.tables("dto_consistency", rows, by, METRICS, summary="dto_summary")
    plot(out, summary.to_dict("records"), estimates, dataclasses.asdict(s))
    logger.info("dto-consistency: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Results, summary: list[dict], estimates: dict, cfg: dict) -> list[Path]:
    """The figures from the summary rows (records) and the first seed's estimates (may be empty)."""

    def get(case, method):
        rs = (r for r in summary if r["case"] == case and r["method"] == method)
        return sorted(rs, key=lambda r: r["K"])

    title = f"{cfg['n_images']} images, SNR {cfg['snr']}, {len(cfg['seeds'])} seeds"
    paths = [_plot_against_k(out, get, cfg, title), _plot_family(out, summary, get, title)]
    if estimates:
        paths.append(_plot_estimates(out, estimates, cfg))
    return paths


def _plot_against_k(out: Results, get, cfg: dict, title: str) -> Path:
    """W1 to the truth and to the two flows, and the objective gap, against K."""
    fig, axes = pyplot().subplots(2, 2, figsize=(12, 8.5))
    panels = (
        ("w1_truth", r"$W_1(\hat\rho_K, \rho^*)$"),
        ("loglik_gap", "objective gap: mean log-likelihood per image,\nNPMLE(257) minus method"),
        ("w1_wgf", r"$W_1(\hat\rho_K, \hat\rho_{WGF})$ (Wasserstein flow)"),
        ("w1_wfr", r"$W_1(\hat\rho_K, \hat\rho_{WFR})$ (Wasserstein-Fisher-Rao flow)"),
    )
    P = cfg["n_particles"]
    refs = [
        ("wgf", "C2", f"WGF ({P} particles)"),
        ("wfr", "C6", f"WFR ({P} particles)"),
        ("per-image", "C3", "per-image MAP"),
        ("npmle-257", "C4", "NPMLE, 257 nodes"),
        ("oracle", "0.5", "true CVs (sampling floor)"),
    ]
    for ax, (metric, panel_title) in zip(axes.ravel(), panels):
        mean, sd = f"{metric}_mean", f"{metric}_sd"
        for method, color, marker in (("em-grid", "C0", "o"), ("map-classes", "C1", "s")):
            if rs := get("consistency", method):
                x, y, e = ([r[c] for r in rs] for c in ("K", mean, sd))
                ax.errorbar(x, y, e, color=color, marker=marker, capsize=3, label=method)
        for method, color, label in refs:
            rs = get("consistency", method)
            m, e = (rs[0][mean], rs[0][sd]) if rs else (np.nan, 0.0)
            if np.isfinite(m) and (m > 0 or metric == "loglik_gap"):
                ax.axhline(m, color=color, ls="--", lw=1, label=f"{label}: {m:.3g}")
                ax.axhspan(m - e, m + e, color=color, alpha=0.12, lw=0)
        ax.set_xscale("log", base=2)
        if metric == "loglik_gap":  # may dip just below 0: free atoms can beat the 257-node grid
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=-3e-3)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("K (nodes or classes)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"AdK, bimodal truth, {title} (mean $\\pm$ sd)", fontsize=11)
    return out.figure(fig, "dto_consistency.png", dpi=120)


FAMILY = [  # the bars of the family comparison: (method, label)
    ("gmm-1-best", "gmm-1\n(best fit to $\\rho^*$,\nno images)"),
    ("gmm-2-best", "gmm-2\n(best fit to $\\rho^*$,\nno images)"),
    ("gmm-1", "gmm-1"),
    ("gmm-2", "gmm-2"),
    ("wgf", "WGF"),
    ("wfr", "WFR"),
    ("npmle-257", "NPMLE\n(em-grid 257)"),
    ("per-image", "per-image\nMAP"),
    ("oracle", "true CVs\n(sampling floor)"),
]


def _plot_family(out: Results, summary: list[dict], get, title: str) -> Path:
    """W1 to the truth of the Gaussian mixtures, the flows and the references, in both cases."""
    from matplotlib.patches import Patch

    fig, ax = pyplot().subplots(figsize=(10, 4))
    mismatch = next((r["truth"] for r in summary if r["case"] == "mismatch"), "?")
    cases = [("consistency", "matched: bimodal truth"), ("mismatch", f"mismatch: {mismatch} truth")]
    # one-component bars on a bimodal truth are off the scale: labelled
    shown = [
        r["w1_truth_mean"] + r["w1_truth_sd"]
        for r in summary
        if r["method"] in {m for m, _ in FAMILY}
        and not (r["case"] == "consistency" and r["method"] in ("gmm-1", "gmm-1-best"))
    ]
    top, width = (max(shown) * 1.1 if shown else 0.05), 0.38
    for i, (case, label) in enumerate(cases):
        vals = [(get(case, m) or [None])[0] for m, _ in FAMILY]
        bars = ax.bar(
            np.arange(len(FAMILY)) + (i - 0.5) * width,
            [v["w1_truth_mean"] if v else np.nan for v in vals],
            width,
            color=f"C{i}",
            yerr=[v["w1_truth_sd"] if v else 0 for v in vals],
            capsize=3,
        )
        for bar, (m, _), v in zip(bars, FAMILY, vals):
            if m.endswith("-best") or m == "oracle":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
            if v is not None:
                y, x = v["w1_truth_mean"], bar.get_x() + bar.get_width() / 2
                y_text = min(y + v["w1_truth_sd"], top) + 0.0004
                ax.text(x, y_text, f"{y:.4f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_ylim(0, top * 1.25)
    ax.legend(
        handles=[Patch(color=f"C{i}", label=lab) for i, (_, lab) in enumerate(cases)], fontsize=8
    )
    ax.set_xticks(np.arange(len(FAMILY)), [lbl for _, lbl in FAMILY], fontsize=8)
    ax.set_ylabel(W1_LABEL)
    ax.set_title(
        f"Gaussian mixtures vs the flow ({title}, mean $\\pm$ sd; hatched: references, "
        "not estimators)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
    return out.figure(fig, "dto_family.png", dpi=130)


def _plot_estimates(out: Results, estimates: dict, cfg: dict) -> Path:
    """The estimates of the first seed against the truth, one panel per case."""
    n = len(estimates)
    fig, axes = pyplot().subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    grid, bins = np.linspace(0.0, 1.0, FINE_GRID), np.linspace(0, 1, 41)
    step = dict(density=True, histtype="step")
    for ax, (case, (truth, est)) in zip(axes[0], estimates.items()):
        ax.plot(grid, truth.pdf(grid), "k-", lw=2, label=f"truth ({truth.name})")
        ax.hist(est["per-image"], bins=bins, color="C3", label="per-image MAP", **step)
        for name, color, label in (("wgf", "C2", "WGF"), ("wfr", "C6", "WFR")):
            pos, wts = est[name]
            label = f"{label} ({pos.size} particles)"
            ax.hist(pos, bins=bins[::2], weights=wts, color=color, lw=1.5, label=label, **step)
        dg = grid[1] - grid[0]
        for C, ls in ((1, ":"), (2, "-.")):
            ax.plot(grid, est[f"gmm-{C}"] / dg, color="C5", ls=ls, label=f"gmm-{C}")
        if "em-grid" in est:
            nodes, w, boot = est["em-grid"]
            dk = nodes[1] - nodes[0]
            ax.step(nodes, w / dk, where="mid", color="C0", label=f"em-grid K={nodes.size}")
            if boot is not None:
                lo, hi = np.quantile(boot, [0.05, 0.95], axis=0) / dk
                band = dict(step="mid", color="C0", alpha=0.2, label="bootstrap 5-95%")
                ax.fill_between(nodes, lo, hi, **band)
        if "map-classes" in est:
            pos, wts = est["map-classes"]
            ax2 = ax.twinx()
            label = f"map-classes K={pos.size} (weights, right)"
            ax2.vlines(pos, 0, wts, color="C1", lw=2, label=label)
            ax2.set_ylim(0, max(0.8, 1.2 * wts.max()))
            ax2.legend(fontsize=7, loc="upper center")
        ax.set_xlabel("s (closed 0 -> open 1)")
        ax.set_ylabel("density")
        ax.set_title(f"{case}, seed {cfg['seeds'][0]}")
        ax.legend(fontsize=7, loc="upper right")
    return out.figure(fig, "dto_densities.png", dpi=130)


def replot(out_dir) -> list[Path]:
    """Redraw ``dto_consistency.png`` and ``dto_family.png`` from ``dto_summary.csv`` and
    ``config.json`` in ``out_dir`` (the per-seed estimates behind ``dto_densities.png`` are not
    stored; that figure is left as it is)."""
    out = Results(out_dir)
    cfg = json.loads((out / "config.json").read_text())
    return plot(out, pd.read_csv(out / "dto_summary.csv").to_dict("records"), {}, cfg)
