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

import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ..sip import dto
from ..sip.discrepancies import KL
from ..sip.flow import WassersteinGradientFlow
from ..sip.measure import ParticleMeasure
from ..sip.operator import Observations
from ..sip.table import TabulatedOperator
from . import common_parser, parse_ints, resolve, seeds_from

logger = logging.getLogger(__name__)

NAME = "dto-consistency"

# sizes: the default study, and --quick (explicit arguments override both)
DEFAULTS = dict(
    seeds=(0, 1, 2),
    ks=(2, 4, 8, 16, 32, 64, 128),
    n_images=2000,
    snr=0.01,
    box=64,
    pixel_size=2.0,
    n_particles=128,
    n_flow_steps=400,
    n_class_steps=500,
    n_nodes=33,
    n_boot=20,
)
QUICK = dict(
    seeds=(0, 1),
    ks=(2, 4, 8, 16, 32, 64),
    n_images=500,
    snr=0.01,
    box=64,
    pixel_size=2.0,
    n_particles=64,
    n_flow_steps=200,
    n_class_steps=300,
    n_nodes=33,
    n_boot=10,
)
FINE_GRID = 257  # quadrature / per-image-MAP grid on [0, 1]
N_REFERENCE = 200_000  # draws of rho* used as the truth in W1


# ------------------------------------------------------------------------------------------------
# Truths on the AdK path coordinate s in [0, 1]
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Truth:
    """A CV distribution on [0, 1]: a truncated Gaussian mixture, a uniform on [a, b] or a Beta."""

    name: str
    kind: str
    params: tuple

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "mixture":
            w, mu, sd = (np.asarray(x, np.float64) for x in self.params)
            out = np.empty(0)
            while (
                out.size < n
            ):  # rejection: draw from the untruncated mixture, keep what is in [0, 1]
                c = rng.choice(w.size, size=2 * n, p=w / w.sum())
                x = rng.normal(mu[c], sd[c])
                out = np.concatenate([out, x[(x >= 0) & (x <= 1)]])
            return out[:n]
        if self.kind == "uniform":
            a, b = self.params
            return rng.uniform(a, b, n)
        if self.kind == "beta":
            return rng.beta(*self.params, size=n)
        raise ValueError(self.kind)

    def pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.kind == "mixture":
            w, mu, sd = (np.asarray(v, np.float64) for v in self.params)
            w = w / w.sum()
            mass = np.sum(w * (stats.norm.cdf((1 - mu) / sd) - stats.norm.cdf(-mu / sd)))
            p = np.sum(
                w[:, None] * stats.norm.pdf((x[None] - mu[:, None]) / sd[:, None]) / sd[:, None],
                axis=0,
            )
            return np.where((x >= 0) & (x <= 1), p / mass, 0.0)
        if self.kind == "uniform":
            a, b = self.params
            return np.where((x >= a) & (x <= b), 1.0 / (b - a), 0.0)
        return stats.beta(*self.params).pdf(x)


TRUTHS = {
    "bimodal": Truth("bimodal", "mixture", ((0.6, 0.4), (0.25, 0.72), (0.07, 0.06))),
    "flat": Truth("flat", "uniform", (0.1, 0.9)),
    "skewed": Truth("skewed", "beta", (2.0, 6.0)),
}


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


def simulate(
    key,
    truths,
    *,
    streams=None,
    n_images: int,
    snr: float,
    box: int,
    pixel_size: float,
    all_atom: bool,
    n_nodes: int,
) -> list[Dataset]:
    """AdK images from each truth, known poses and CTF, at ``snr``; tabulated on ``n_nodes`` nodes.

    One data set of ``n_images`` per truth, each with its own sigma (SNR = mean variance of its
    clean images / sigma^2); the data sets are rendered and tabulated in one pass (one compilation).
    Data set i draws its CVs, nuisances and noise from ``fold_in(key, streams[i])`` (default i), so
    it does not depend on which other data sets are simulated with it.
    """
    from ..cryoem.image_model import ImageModel, NuisancePrior
    from ..data.adk import adk_model
    from ..pipeline.operator import CryoEMOperator
    from ..pipeline.simulate import add_noise, render_clean, sigma_for_snr
    from ..sip.noise import GaussianNoise

    t0 = time.perf_counter()
    model = adk_model(ca_only=not all_atom)
    op = CryoEMOperator(model, ImageModel.for_atoms(box, pixel_size, model.atoms), 1.0)
    streams = list(range(len(truths))) if streams is None else list(streams)
    sample_nuisance = eqx.filter_jit(NuisancePrior().sample)
    thetas, nuisances, noise_keys = [], [], []
    for truth, stream in zip(truths, streams):
        k_theta, k_nu, k_noise = jax.random.split(jax.random.fold_in(key, stream), 3)
        seed = np.asarray(jax.random.key_data(k_theta)).astype(np.uint32).ravel().tolist()
        thetas.append(truth.sample(np.random.default_rng(seed), n_images))
        nuisances.append(sample_nuisance(k_nu, n_images))
        noise_keys.append(k_noise)
    nuisance = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *nuisances)
    clean = render_clean(op, np.concatenate(thetas)[:, None].astype(np.float32), nuisance)
    images = np.empty_like(clean)
    sigmas = []
    for i in range(len(truths)):
        sl = slice(i * n_images, (i + 1) * n_images)
        sigmas.append(sigma_for_snr(clean[sl], snr))
        images[sl] = add_noise(noise_keys[i], clean[sl], sigmas[-1])
    table = TabulatedOperator.build(op, Observations(jnp.asarray(images), nuisance), n_nodes)
    out = []
    for i, sigma in enumerate(sigmas):
        sl = slice(i * n_images, (i + 1) * n_images)
        t = TabulatedOperator(
            GaussianNoise(sigma),
            table.fit_scale,
            table.lower,
            table.upper,
            table.n_nodes,
            table.n_obs_entries,
            table.gram[sl],
            table.cross[sl],
            table.ysq[sl],
        )
        out.append(Dataset(thetas[i], t, t.observations(), sigma, 0.0))
    jax.block_until_ready(out[-1].table.gram_blocks)
    seconds = (time.perf_counter() - t0) / len(truths)
    for d in out:
        d.seconds = seconds
    return out


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


def w1(positions, weights, reference: np.ndarray, reference_weights=None) -> float:
    """1-D Wasserstein-1 distance between a weighted atomic measure and a reference sample."""
    return float(
        stats.wasserstein_distance(
            np.asarray(positions, np.float64).ravel(),
            np.asarray(reference).ravel(),
            np.asarray(weights, np.float64).ravel(),
            reference_weights,
        )
    )


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

    def objective(p):
        return disc(key, data.table, ParticleMeasure(p, m0.log_weights), data.obs)

    v = m0.n_particles * np.abs(np.asarray(jax.grad(objective)(m0.positions))[:, 0])
    med = float(np.median(v[v > 0])) if np.any(v > 0) else 1.0
    flow = WassersteinGradientFlow(
        step_size=step_fraction / med,
        n_steps=n_steps,
        max_displacement=0.02,
        schedule="cosine",
        chunk_size=50,
        fisher_rao=fisher_rao,
    )
    return flow.run(disc, data.table, data.obs, m0, key=key).measure


def analyse(
    data: Dataset,
    *,
    case: str,
    truth: Truth,
    seed: int,
    ks,
    reference: np.ndarray,
    key,
    n_particles: int,
    n_flow_steps: int,
    n_class_steps: int,
    n_boot: int,
    fisher_rao: float = 1.0,
    with_k: bool = True,
) -> tuple[list[dict], dict]:
    """Every method on one data set: rows for the CSV, and the estimates (for the density plot)."""
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
    for name, fr, k in (("wgf", 0.0, 1), ("wfr", fisher_rao, 2)):
        t0 = time.perf_counter()
        m = run_flow(
            data, init, key=jax.random.fold_in(key, k), n_steps=n_flow_steps, fisher_rao=fr
        )
        pos, wts = np.asarray(m.positions)[:, 0], np.asarray(m.weights, np.float64)
        flows[name] = (pos, wts, ll_of(pos, wts), time.perf_counter() - t0)
        est[name] = (pos, wts)
    wgf, wfr = flows["wgf"][:2], flows["wfr"][:2]

    def add(method, K, pos, wts, ll, seconds, refs=True):
        rows.append(
            dict(
                case=case,
                truth=truth.name,
                seed=seed,
                method=method,
                K=K,
                w1_truth=w1(pos, wts, reference),
                w1_wgf=w1(pos, wts, *wgf) if refs and method != "wgf" else np.nan,
                w1_wfr=w1(pos, wts, *wfr) if refs and method != "wfr" else np.nan,
                loglik_gap=ll_ref - ll if ll is not None else np.nan,
                seconds=seconds,
            )
        )

    for name, (pos, wts, ll, secs) in flows.items():
        add(name, n_particles, pos, wts, ll, secs)
    uniform = np.full(pim.size, 1.0 / pim.size)
    add("per-image", len(grid), pim, uniform, ll_of(pim, uniform), t_fine)
    add("npmle-257", len(grid), grid, w_npmle, ll_ref, t_fine)
    add(
        "oracle",
        len(data.theta),
        data.theta,
        np.full(data.theta.size, 1 / data.theta.size),
        None,
        0.0,
    )

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
        add(
            f"gmm-{C}-best",
            C,
            grid,
            np.asarray(best.measure.weights, np.float64),
            None,
            0.0,
            refs=False,
        )

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
            data.table, data.obs, K, key=jax.random.fold_in(key, 100 + K), n_steps=n_class_steps
        )
        pos, wts = np.asarray(m.positions)[:, 0], np.asarray(m.weights, np.float64)
        add("map-classes", K, pos, wts, ll_of(pos, wts), time.perf_counter() - t0)
        if K == 8:
            est["map-classes"] = (pos, wts)
        logger.info(
            "%s seed %d K=%d: em-grid W1 %.4f, map-classes W1 %.4f",
            case,
            seed,
            K,
            rows[-2]["w1_truth"],
            rows[-1]["w1_truth"],
        )
    return rows, est


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StudyResult:
    rows: list[dict]
    summary: list[dict]
    csv: Path
    summary_csv: Path
    figures: list[Path]
    seconds: float


def run(
    out_dir,
    *,
    seeds=None,
    ks=None,
    n_images=None,
    snr=None,
    box=None,
    pixel_size=None,
    all_atom: bool = False,
    quick: bool = False,
    n_particles=None,
    n_flow_steps=None,
    n_class_steps=None,
    n_nodes=None,
    n_boot=None,
    mismatch_truth: str = "flat",
    fisher_rao: float = 1.0,
    cases: tuple[str, ...] = ("consistency", "mismatch"),
) -> StudyResult:
    """Run the study; write its CSVs, plots and config into ``out_dir`` (see the module docstring).

    Arguments left as None take the default size (``DEFAULTS``), or ``QUICK`` with ``quick``.
    ``fisher_rao``: the weight step of the Wasserstein-Fisher-Rao reference flow (``wfr``).
    ``cases``: ``consistency`` (bimodal truth, the K sweep; also the matched case for gmm-2)
    and/or ``mismatch`` (``mismatch_truth``, no K sweep).
    """
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        ks=ks,
        n_images=n_images,
        snr=snr,
        box=box,
        pixel_size=pixel_size,
        n_particles=n_particles,
        n_flow_steps=n_flow_steps,
        n_class_steps=n_class_steps,
        n_nodes=n_nodes,
        n_boot=n_boot,
    )
    cfg["seeds"], cfg["ks"] = (
        tuple(int(s) for s in cfg["seeds"]),
        tuple(sorted(int(k) for k in cfg["ks"])),
    )
    if any(k < 2 for k in cfg["ks"]):
        raise ValueError(f"every K must be >= 2, got {cfg['ks']}")
    if mismatch_truth not in TRUTHS or mismatch_truth == "bimodal":
        raise ValueError(
            f"mismatch_truth must be one of {sorted(set(TRUTHS) - {'bimodal'})}, "
            f"got {mismatch_truth!r}"
        )
    unknown = set(cases) - {"consistency", "mismatch"}
    if unknown or not cases:
        raise ValueError(f"cases must be among ('consistency', 'mismatch'), got {cases!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(
        experiment=NAME,
        all_atom=bool(all_atom),
        quick=bool(quick),
        mismatch_truth=mismatch_truth,
        truths={n: dataclasses.asdict(TRUTHS[n]) for n in ("bimodal", mismatch_truth)},
        fine_grid=FINE_GRID,
        n_reference=N_REFERENCE,
        fisher_rao=float(fisher_rao),
        cases=list(cases),
        **cfg,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")

    all_cases = {
        "consistency": (0, TRUTHS["bimodal"], True),
        "mismatch": (1, TRUTHS[mismatch_truth], False),
    }
    cases = [(c, *all_cases[c]) for c in ("consistency", "mismatch") if c in cases]
    refs = {t.name: t.sample(np.random.default_rng(12345), N_REFERENCE) for _, _, t, _ in cases}
    rows: list[dict] = []
    estimates: dict = {}
    for seed in cfg["seeds"]:
        datasets = simulate(
            jax.random.key(seed),
            [t for _, _, t, _ in cases],
            streams=[i for _, i, _, _ in cases],
            n_images=cfg["n_images"],
            snr=cfg["snr"],
            box=cfg["box"],
            pixel_size=cfg["pixel_size"],
            all_atom=all_atom,
            n_nodes=cfg["n_nodes"],
        )
        for (case, stream, truth, with_k), data in zip(cases, datasets):
            key = jax.random.fold_in(jax.random.key(seed), stream)
            logger.info(
                "%s seed %d: %d images simulated and tabulated in %.1f s (sigma %.4g)",
                case,
                seed,
                cfg["n_images"],
                data.seconds,
                data.sigma,
            )
            r, est = analyse(
                data,
                case=case,
                truth=truth,
                seed=seed,
                ks=cfg["ks"],
                reference=refs[truth.name],
                key=jax.random.fold_in(key, 7),
                n_particles=cfg["n_particles"],
                n_flow_steps=cfg["n_flow_steps"],
                n_class_steps=cfg["n_class_steps"],
                n_boot=cfg["n_boot"],
                fisher_rao=fisher_rao,
                with_k=with_k,
            )
            for row in r:
                row["simulate_seconds"] = data.seconds
            rows.extend(r)
            if seed == cfg["seeds"][0]:
                estimates[case] = (truth, est)
    csv_path = out / "dto_consistency.csv"
    _write_csv(csv_path, rows)
    summary = summarise(rows)
    summary_path = out / "dto_summary.csv"
    _write_csv(summary_path, summary)
    figures = plot(out, summary, estimates, cfg)
    seconds = time.perf_counter() - t_start
    logger.info("dto-consistency: done in %.0f s; %s", seconds, csv_path)
    return StudyResult(rows, summary, csv_path, summary_path, figures, seconds)


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd (ddof 1; 0 for one seed) over seeds of each (case, method, K)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["truth"], r["method"], r["K"]), []).append(r)
    out = []
    for (case, truth, method, K), rs in groups.items():
        row = dict(case=case, truth=truth, method=method, K=K, n_seeds=len(rs))
        for m in ("w1_truth", "w1_wgf", "w1_wfr", "loglik_gap", "seconds"):
            x = np.array([r[m] for r in rs], np.float64)
            row[f"{m}_mean"] = float(np.mean(x))
            row[f"{m}_sd"] = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
        out.append(row)
    return out


def plot(out: Path, summary: list[dict], estimates: dict, cfg: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def get(case, method):
        rs = sorted(
            (r for r in summary if r["case"] == case and r["method"] == method),
            key=lambda r: r["K"],
        )
        return rs

    paths = []
    # 1. W1 against K
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = (
        (axes[0, 0], "w1_truth", r"$W_1(\hat\rho_K, \rho^*)$"),
        (
            axes[0, 1],
            "loglik_gap",
            "objective gap: mean log-likelihood per image,\nNPMLE(257) minus method",
        ),
        (axes[1, 0], "w1_wgf", r"$W_1(\hat\rho_K, \hat\rho_{WGF})$ (Wasserstein flow)"),
        (axes[1, 1], "w1_wfr", r"$W_1(\hat\rho_K, \hat\rho_{WFR})$ (Wasserstein-Fisher-Rao flow)"),
    )
    P = cfg["n_particles"]
    refs = [
        ("wgf", "C2", f"WGF ({P} particles)"),
        ("wfr", "C6", f"WFR ({P} particles)"),
        ("per-image", "C3", "per-image MAP"),
        ("npmle-257", "C4", "NPMLE, 257 nodes"),
        ("oracle", "0.5", "true CVs (sampling floor)"),
    ]
    for ax, metric, title in panels:
        for method, color, marker in (("em-grid", "C0", "o"), ("map-classes", "C1", "s")):
            rs = get("consistency", method)
            if rs:
                ax.errorbar(
                    [r["K"] for r in rs],
                    [r[f"{metric}_mean"] for r in rs],
                    [r[f"{metric}_sd"] for r in rs],
                    color=color,
                    marker=marker,
                    capsize=3,
                    label=method,
                )
        for method, color, label in refs:
            rs = get("consistency", method)
            value = rs[0][f"{metric}_mean"] if rs else np.nan
            if np.isfinite(value) and (value > 0 or metric == "loglik_gap"):
                m, sd = rs[0][f"{metric}_mean"], rs[0][f"{metric}_sd"]
                ax.axhline(m, color=color, ls="--", lw=1, label=f"{label}: {m:.3g}")
                ax.axhspan(m - sd, m + sd, color=color, alpha=0.12, lw=0)
        ax.set_xscale("log", base=2)
        if metric == "loglik_gap":  # may dip just below 0: free atoms can beat the 257-node grid
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=-3e-3)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("K (nodes or classes)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"AdK, bimodal truth, {cfg['n_images']} images, SNR {cfg['snr']}, "
        f"{len(cfg['seeds'])} seeds (mean $\\pm$ sd)",
        fontsize=11,
    )
    fig.tight_layout()
    p = out / "dto_consistency.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # 2. family comparison
    methods = [
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
    fig, ax = plt.subplots(figsize=(10, 4))
    mismatch = next((r["truth"] for r in summary if r["case"] == "mismatch"), "?")
    cases = [("consistency", "matched: bimodal truth"), ("mismatch", f"mismatch: {mismatch} truth")]
    width = 0.38
    shown = [
        r["w1_truth_mean"] + r["w1_truth_sd"]
        for r in summary
        if r["method"] in {m for m, _ in methods}
        and not (r["case"] == "consistency" and r["method"] in ("gmm-1", "gmm-1-best"))
    ]
    top = (
        max(shown) * 1.1 if shown else 0.05
    )  # one-component bars on a bimodal truth are off the scale: labelled
    for i, (case, label) in enumerate(cases):
        vals = [get(case, m)[0] if get(case, m) else None for m, _ in methods]
        x = np.arange(len(methods)) + (i - 0.5) * width
        bars = ax.bar(
            x,
            [v["w1_truth_mean"] if v else np.nan for v in vals],
            width,
            color=f"C{i}",
            yerr=[v["w1_truth_sd"] if v else 0 for v in vals],
            capsize=3,
            label=label,
        )
        for bar, (m, _), v in zip(bars, methods, vals):
            if m.endswith("-best") or m == "oracle":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
            if v is not None:
                y = v["w1_truth_mean"]
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    min(y + v["w1_truth_sd"], top) + 0.0004,
                    f"{y:.4f}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
    ax.set_ylim(0, top * 1.25)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=f"C{i}", label=label) for i, (_, label) in enumerate(cases)],
        fontsize=8,
    )
    ax.set_xticks(np.arange(len(methods)), [lbl for _, lbl in methods], fontsize=8)
    ax.set_ylabel(r"$W_1(\hat\rho, \rho^*)$")
    ax.set_title(
        f"Gaussian mixtures vs the flow ({cfg['n_images']} images, SNR {cfg['snr']}, "
        f"{len(cfg['seeds'])} seeds, mean $\\pm$ sd; hatched: references, not estimators)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p = out / "dto_family.png"
    fig.savefig(p, dpi=130)
    plt.close(fig)
    paths.append(p)

    # 3. the estimates of the first seed
    if not estimates:
        return paths
    fig, axes = plt.subplots(1, len(estimates), figsize=(6 * len(estimates), 4), squeeze=False)
    grid = np.linspace(0.0, 1.0, FINE_GRID)
    bins = np.linspace(0, 1, 41)
    for ax, (case, (truth, est)) in zip(axes[0], estimates.items()):
        ax.plot(grid, truth.pdf(grid), "k-", lw=2, label=f"truth ({truth.name})")
        ax.hist(
            est["per-image"],
            bins=bins,
            density=True,
            histtype="step",
            color="C3",
            label="per-image MAP",
        )
        for name, color, label in (("wgf", "C2", "WGF"), ("wfr", "C6", "WFR")):
            pos, wts = est[name]
            ax.hist(
                pos,
                bins=bins[::2],
                weights=wts,
                density=True,
                histtype="step",
                color=color,
                lw=1.5,
                label=f"{label} ({pos.size} particles)",
            )
        dg = grid[1] - grid[0]
        for C, ls in ((1, ":"), (2, "-.")):
            ax.plot(grid, est[f"gmm-{C}"] / dg, color="C5", ls=ls, label=f"gmm-{C}")
        if "em-grid" in est:
            nodes, w, boot = est["em-grid"]
            dk = nodes[1] - nodes[0]
            ax.step(nodes, w / dk, where="mid", color="C0", label=f"em-grid K={nodes.size}")
            if boot is not None:
                lo, hi = np.quantile(boot, [0.05, 0.95], axis=0)
                ax.fill_between(
                    nodes,
                    lo / dk,
                    hi / dk,
                    step="mid",
                    color="C0",
                    alpha=0.2,
                    label="bootstrap 5-95%",
                )
        if "map-classes" in est:
            pos, wts = est["map-classes"]
            ax2 = ax.twinx()
            ax2.vlines(
                pos, 0, wts, color="C1", lw=2, label=f"map-classes K={pos.size} (weights, right)"
            )
            ax2.set_ylim(0, max(0.8, 1.2 * wts.max()))
            ax2.legend(fontsize=7, loc="upper center")
        ax.set_xlabel("s (closed 0 -> open 1)")
        ax.set_ylabel("density")
        ax.set_title(f"{case}, seed {cfg['seeds'][0]}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    p = out / "dto_densities.png"
    fig.savefig(p, dpi=130)
    plt.close(fig)
    paths.append(p)
    return paths


def replot(out_dir) -> list[Path]:
    """Redraw ``dto_consistency.png`` and ``dto_family.png`` from ``dto_summary.csv`` and
    ``config.json`` in ``out_dir`` (the per-seed estimates behind ``dto_densities.png`` are not
    stored; that figure is left as it is)."""
    out = Path(out_dir)
    cfg = json.loads((out / "config.json").read_text())
    with open(out / "dto_summary.csv", newline="") as f:
        summary = [
            {k: (v if k in ("case", "truth", "method") else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]
    for r in summary:
        r["K"] = int(r["K"])
    return plot(out, summary, {}, cfg)


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--ks", type=parse_ints, default=None, help=f"K values (default {DEFAULTS['ks']})"
    )
    p.add_argument(
        "--n-images",
        type=int,
        default=None,
        help=f"images per data set (default {DEFAULTS['n_images']})",
    )
    p.add_argument(
        "--snr", type=float, default=None, help=f"signal-to-noise ratio (default {DEFAULTS['snr']})"
    )
    p.add_argument(
        "--box", type=int, default=None, help=f"box size in pixels (default {DEFAULTS['box']})"
    )
    p.add_argument(
        "--pixel-size", type=float, default=None, help="pixel size in Angstrom (default 2.0)"
    )
    p.add_argument(
        "--all-atom",
        action="store_true",
        help="all 3,341 atoms instead of the 214 C-alphas (slower)",
    )
    p.add_argument("--n-particles", type=int, default=None, help="WGF particles (default 128)")
    p.add_argument("--n-flow-steps", type=int, default=None, help="WGF steps (default 400)")
    p.add_argument(
        "--n-class-steps", type=int, default=None, help="map-classes Adam steps (default 500)"
    )
    p.add_argument("--n-nodes", type=int, default=None, help="table nodes on the CV (default 33)")
    p.add_argument(
        "--n-boot",
        type=int,
        default=None,
        help="bootstrap replicates for the em-grid band (default 20)",
    )
    p.add_argument(
        "--mismatch-truth",
        choices=sorted(set(TRUTHS) - {"bimodal"}),
        default="flat",
        help="the truth of the family-mismatch case (default flat: uniform on [0.1, 0.9])",
    )
    p.add_argument(
        "--fisher-rao",
        type=float,
        default=1.0,
        help="weight step of the Wasserstein-Fisher-Rao reference flow (default 1.0)",
    )
    p.add_argument(
        "--cases",
        type=lambda t: tuple(c.strip() for c in t.split(",") if c.strip()),
        default=("consistency", "mismatch"),
        help="which cases: consistency, mismatch or both (default consistency,mismatch)",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the summary figures from --out's dto_summary.csv",
    )
    a = p.parse_args(argv)
    if a.replot:
        replot(a.out or NAME)
        return 0
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        ks=a.ks,
        n_images=a.n_images,
        snr=a.snr,
        box=a.box,
        pixel_size=a.pixel_size,
        all_atom=a.all_atom,
        quick=a.quick,
        n_particles=a.n_particles,
        n_flow_steps=a.n_flow_steps,
        n_class_steps=a.n_class_steps,
        n_nodes=a.n_nodes,
        n_boot=a.n_boot,
        mismatch_truth=a.mismatch_truth,
        fisher_rao=a.fisher_rao,
        cases=a.cases,
    )
    return 0
