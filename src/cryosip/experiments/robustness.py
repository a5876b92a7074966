"""Robustness: W1 error against SNR and against the number of images, mean +- sd over seeds.

AdK along its closed->open path (C-alpha Gaussians by default, ``--all-atom`` for every atom),
bimodal truth 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2) on s in [0, 1], 64-px images at
2 A/px with known poses, shifts (sd 2 A) and astigmatic CTF. For every seed, SNR and number
of images N the methods ``wgf-kl`` (particle flow of the KL, started at the per-image-MAP
quantiles), ``wgf-mmd`` (flow of the paired, noise-averaged Gaussian-kernel score; bandwidth
from the median heuristic on the images), ``em-grid`` (EM weights on the 33 table nodes) and
``per-image`` (histogram of per-image MAP CVs) recover rho*, and W1/W2 to rho* (200,000 draws)
are recorded, with the W1 of the images' own true CVs (``oracle``: the sampling floor).

How the sweep is made cheap (exact, not an approximation): the noise-free image of particle
n, its images at the CV nodes and one unit-variance noise image eps_n are rendered once per
seed; every table entry the tabulated operator needs is a polynomial in sigma,

    <m_g, y_n> = <m_g, c_n> + sigma <m_g, eps_n>,   |y_n|^2 = |c_n|^2 + 2 sigma <c_n, eps_n> + sigma^2 |eps_n|^2,

with y_n = c_n + sigma eps_n the observed image, so every SNR reuses the same renders (the data
sets differ only by the noise level, as in a dilution series), and the N-image data set is the
first N images of the seed's largest one (nested subsets; seeds are independent).

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
import inspect
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
from ..pipeline.operator import CryoEMOperator
from ..reconstruction import Problem, run_method
from ..sip import dto
from ..sip.discrepancies import median_distance
from ..sip.noise import GaussianNoise
from ..sip.operator import Observations
from ..sip.table import TabulatedOperator
from . import common_parser, parse_ints, resolve, seeds_from

logger = logging.getLogger(__name__)

NAME = "robustness"
METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
DEFAULTS = dict(
    seeds=(0, 1, 2),
    snrs=(0.1, 0.01, 0.003, 0.001),
    n_images=(500, 2000, 10000),
    n_particles=64,
    n_steps=200,
    n_nodes=33,
    box=64,
    pixel_size=2.0,
)
QUICK = dict(
    seeds=(0, 1, 2),
    snrs=(0.1, 0.01, 0.001),
    n_images=(500, 2000),
    n_particles=64,
    n_steps=150,
    n_nodes=33,
    box=64,
    pixel_size=2.0,
)
N_REFERENCE = 200_000
FINE_FACTOR = 8  # per-image MAP / em-grid grid: (n_nodes - 1) * FINE_FACTOR + 1 points


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.1,0.01"`` -> (0.1, 0.01)."""
    import argparse

    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def parse_methods(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


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

    @property
    def lower(self) -> np.ndarray:
        return np.asarray(self.model.lower, np.float64)

    @property
    def upper(self) -> np.ndarray:
        return np.asarray(self.model.upper, np.float64)

    def reference(self, n: int = N_REFERENCE, seed: int = 12345) -> np.ndarray:
        """Draws of the true distribution used as rho* in W1/W2."""
        return np.asarray(self.truth.sample(np.random.default_rng(seed), n), np.float64)


def make_scene(
    model_name: str = "adk-ca",
    truth: str = "bimodal",
    *,
    box: int = 64,
    pixel_size: float = 2.0,
    shift_sd_in_angstroms: float = 2.0,
) -> Scene:
    """The built-in model ``model_name`` with a 64-px image model, random poses/shifts/CTF and the named truth."""
    model = load_model(model_name)
    image_model = ImageModel.for_atoms(box, pixel_size, model.atoms)
    prior = NuisancePrior(
        shift_sd_in_angstroms=shift_sd_in_angstroms, defocus_range_in_angstroms=(10000.0, 25000.0)
    )
    op = CryoEMOperator(model, image_model, 1.0, prior)
    return Scene(model_name, model, op, make_distribution(truth, model.lower, model.upper))


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
        return TabulatedOperator(
            GaussianNoise(sigma),
            False,
            self.lower,
            self.upper,
            self.n_nodes,
            self.n_entries,
            jnp.asarray(self.gram[:n]),
            jnp.asarray(cross, jnp.float32),
            jnp.asarray(ysq, jnp.float32),
        )

    def images(self, sigma: float, n: int) -> np.ndarray:
        """The first n observed images c + sigma eps (n <= len(clean_head))."""
        if n > len(self.clean_head):
            raise ValueError(f"only {len(self.clean_head)} images kept; asked for {n}")
        return self.clean_head[:n] + np.float32(sigma) * self.noise_head[:n]

    def observations(self, sigma: float, n: int) -> Observations:
        """Direct-path observations (images and their true nuisances) of the first n images."""
        nu = jax.tree_util.tree_map(lambda a: jnp.asarray(a[:n]), self.nuisance)
        return Observations(jnp.asarray(self.images(sigma, n)), nu)

    def problem(
        self,
        operator: CryoEMOperator,
        sigma: float,
        n: int | None = None,
        fine_factor: int = FINE_FACTOR,
    ) -> Problem:
        """A :class:`~cryosip.reconstruction.Problem` (tables, per-image log-likelihood on a fine grid, bandwidth)."""
        t0 = time.perf_counter()
        n = len(self) if n is None else int(n)
        table = self.table(sigma, n)
        fine = np.linspace(self.lower, self.upper, fine_factor * (self.n_nodes - 1) + 1)
        fine_ll = dto.loglik_on_nodes(table, table.observations(), fine, batch_size=1024)
        m = min(n, len(self.clean_head), 1000)
        bw = median_distance(self.images(sigma, m).reshape(m, -1))
        return Problem(
            operator.with_sigma(sigma),
            None,
            table,
            np.array([self.lower]),
            np.array([self.upper]),
            fine,
            fine_ll,
            bw,
            time.perf_counter() - t0,
        )


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
    out = {k: [] for k in ("gram", "cc", "cn", "c2", "ce", "e2", "var")}
    clean_head = np.empty((keep, D, D), np.float32)
    noise_head = np.empty((keep, D, D), np.float32)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        idx = np.minimum(np.arange(s, s + batch_size), n - 1)
        take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), tree)  # noqa: E731
        res = [
            np.asarray(r)[: e - s]
            for r in batch(
                jnp.asarray(theta[idx], jnp.float32),
                take(nuisance),
                take(table_nuisance),
                jnp.asarray(idx, jnp.int32),
            )
        ]
        for k, r in zip(out, res[:7]):
            out[k].append(r)
        if s < keep:
            m = min(e, keep) - s
            clean_head[s : s + m] = res[7][:m].reshape(m, D, D)
            noise_head[s : s + m] = res[8][:m].reshape(m, D, D)
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return NoiseFreeTables(
        np.asarray(theta, np.float32),
        nuisance,
        table_nuisance,
        cat["gram"],
        cat["cc"],
        cat["cn"],
        cat["c2"].astype(np.float64),
        cat["ce"].astype(np.float64),
        cat["e2"].astype(np.float64),
        cat["var"].astype(np.float64),
        clean_head,
        noise_head,
        lo,
        hi,
        int(n_nodes),
        time.perf_counter() - t0,
    )


def draw_dataset(key, scene: Scene, n_images: int):
    """(theta (n, d), nuisance) for one data set: the key is split into (conformations, nuisances, noise)."""
    k_theta, k_nu, k_noise = jax.random.split(key, 3)
    theta = np.asarray(scene.truth.sample(k_theta, n_images), np.float32).reshape(n_images, -1)
    nu = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float32), scene.operator.sample_nuisance(k_nu, n_images)
    )
    return theta, nu, k_noise


def pipeline_fisher_rao() -> float | None:
    """The pipeline's default Fisher-Rao weight step (``run_method``'s ``fisher_rao``), recorded in configs.

    None: ``run_method`` picks it by objective (0.3 for the KL, 0 for the MMD objectives)."""
    default = inspect.signature(run_method).parameters["fisher_rao"].default
    return None if default is None else float(default)


def reconstruct(
    problem: Problem,
    method: str,
    *,
    key,
    n_particles: int,
    n_steps: int,
    init: str = "auto",
    fisher_rao: float | None = None,
    **kw,
):
    """One method by its label (``wgf-kl``, ``wgf-mmd``, ``wgf-kl+mmd``, ``em-grid``, ``per-image``, ...).

    The flows use the pipeline's settings (:func:`cryosip.reconstruction.run_method`); ``fisher_rao``
    None keeps its default."""
    if method.startswith("wgf-"):
        if fisher_rao is not None:
            kw["fisher_rao"] = float(fisher_rao)
        return run_method(
            problem,
            "wgf",
            method[4:],
            key=key,
            n_particles=n_particles,
            n_steps=n_steps,
            init=init,
            progress=False,
            **kw,
        )
    return run_method(problem, method, "kl", key=key, progress=False)


def score(positions, weights, reference) -> dict:
    pos = np.asarray(positions, np.float64)
    return {"w1": w1(pos, reference, weights), "w2": w2(pos, reference, weights)}


def summarise(df: pd.DataFrame, by: list[str], metrics=("w1", "w2", "seconds")) -> pd.DataFrame:
    """Mean, sd (ddof 1; 0 for one seed) and count over seeds."""
    g = df.groupby(by, sort=False, dropna=False)  # keep rows with a NaN key (the oracle's SNR)
    out = g.size().rename("n_seeds").reset_index()
    for m in metrics:
        if m in df:
            out[f"{m}_mean"] = g[m].mean().values
            out[f"{m}_sd"] = g[m].std(ddof=1).fillna(0.0).values
    return out


def add_adk_flow_options(parser, defaults: dict) -> None:
    """The options every AdK study shares: atoms, particles, flow steps and table nodes."""
    parser.add_argument(
        "--all-atom",
        action="store_true",
        help="all 3,341 AdK atoms instead of the 214 C-alphas (slower)",
    )
    for flag, what in (
        ("n_particles", "WGF particles"),
        ("n_steps", "WGF steps"),
        ("n_nodes", "table nodes on the CV"),
    ):
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            type=int,
            default=None,
            help=f"{what} (default {defaults[flag]})",
        )


def add_fisher_rao(parser) -> None:
    parser.add_argument(
        "--fisher-rao",
        type=float,
        default=None,
        help="Fisher-Rao weight step of the flows (default: the pipeline's; 0: pure Wasserstein flow)",
    )


def write_config(out: Path, **cfg) -> None:
    _atomic.write_json(out / "config.json", cfg)


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


def run(
    out_dir,
    *,
    seeds=None,
    snrs=None,
    n_images=None,
    methods=METHODS,
    all_atom: bool = False,
    quick: bool = False,
    n_particles=None,
    n_steps=None,
    n_nodes=None,
    box=None,
    pixel_size=None,
    fisher_rao=None,
) -> pd.DataFrame:
    """Run the sweep and write its CSVs, figures and config into ``out_dir``; returns the per-run table."""
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        snrs=snrs,
        n_images=n_images,
        n_particles=n_particles,
        n_steps=n_steps,
        n_nodes=n_nodes,
        box=box,
        pixel_size=pixel_size,
    )
    cfg["n_images"] = tuple(sorted(int(n) for n in cfg["n_images"]))
    cfg["snrs"] = tuple(sorted((float(s) for s in cfg["snrs"]), reverse=True))
    unknown = set(methods) - {"wgf-kl", "wgf-mmd", "wgf-kl+mmd", "em-grid", "per-image"}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name = "adk" if all_atom else "adk-ca"
    scene = make_scene(model_name, "bimodal", box=cfg["box"], pixel_size=cfg["pixel_size"])
    write_config(
        out,
        experiment=NAME,
        model=model_name,
        truth=scene.truth.params(),
        methods=list(methods),
        quick=bool(quick),
        n_reference=N_REFERENCE,
        fisher_rao=pipeline_fisher_rao() if fisher_rao is None else fisher_rao,
        **cfg,
    )
    ref = scene.reference()
    rows = []
    n_max = max(cfg["n_images"])
    for seed in cfg["seeds"]:
        theta, nu, k_noise = draw_dataset(jax.random.key(seed), scene, n_max)
        tabs = tabulate_noise_free(k_noise, scene.operator, theta, nu, cfg["n_nodes"])
        logger.info(
            "seed %d: %d images rendered and tabulated in %.0f s", seed, n_max, tabs.seconds
        )
        for snr in cfg["snrs"]:
            sigma = tabs.sigma_for_snr(snr)
            for n in cfg["n_images"]:
                problem = tabs.problem(scene.operator, sigma, n)
                oracle = score(theta[:n], None, ref)
                rows.append(
                    dict(
                        seed=seed,
                        snr=snr,
                        n_images=n,
                        method="oracle",
                        **oracle,
                        seconds=0.0,
                        sigma=sigma,
                    )
                )
                for i, method in enumerate(methods):
                    key = jax.random.fold_in(jax.random.key(seed), 1000 + i)
                    r = reconstruct(
                        problem,
                        method,
                        key=key,
                        n_particles=cfg["n_particles"],
                        n_steps=cfg["n_steps"],
                        fisher_rao=fisher_rao,
                    )
                    rows.append(
                        dict(
                            seed=seed,
                            snr=snr,
                            n_images=n,
                            method=method,
                            **score(r.positions, r.weights, ref),
                            seconds=r.seconds,
                            sigma=sigma,
                        )
                    )
                    logger.info(
                        "seed %d SNR %g N %d %s: W1 %.4f (%.1f s)",
                        seed,
                        snr,
                        n,
                        method,
                        rows[-1]["w1"],
                        r.seconds,
                    )
                _atomic.write_csv(
                    out / "robustness.csv", pd.DataFrame(rows)
                )  # partial results survive an interrupt
    df = pd.DataFrame(rows)
    _atomic.write_csv(out / "robustness.csv", df)
    summary = summarise(df, ["snr", "n_images", "method"])
    _atomic.write_csv(out / "robustness_summary.csv", summary)
    plot(out, summary, cfg, model_name)
    logger.info("robustness: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Path, summary: pd.DataFrame, cfg: dict, model_name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import COLORS

    methods = [m for m in summary["method"].unique() if m != "oracle"] + ["oracle"]
    style = lambda m: dict(
        color=COLORS.get(m, "0.5"),
        ls="--" if m == "oracle" else "-",  # noqa: E731
        marker="" if m == "oracle" else "o",
    )
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
            for m in methods:
                d = summary[(summary[pcol] == pv) & (summary["method"] == m)].sort_values(xcol)
                if len(d):
                    lab = "true CVs (sampling floor)" if m == "oracle" else m
                    ax.errorbar(d[xcol], d["w1_mean"], d["w1_sd"], capsize=3, label=lab, **style(m))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(f"N = {pv}" if pcol == "n_images" else f"SNR = {pv:g}")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel(r"$W_1(\hat\rho, \rho^*)$  (mean $\pm$ sd over seeds)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(
            f"AdK ({model_name}), bimodal truth, known poses, {len(cfg['seeds'])} seeds",
            fontsize=10,
        )
        fig.tight_layout()
        p = out / fname
        _atomic.savefig(fig, p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--snrs", type=parse_floats, default=None, help=f"SNRs (default {DEFAULTS['snrs']})"
    )
    p.add_argument(
        "--n-images",
        type=parse_ints,
        default=None,
        help=f"data set sizes (default {DEFAULTS['n_images']})",
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=METHODS,
        help=f"methods (default {','.join(METHODS)})",
    )
    add_adk_flow_options(p, DEFAULTS)
    p.add_argument("--box", type=int, default=None, help="box size in pixels (default 64)")
    p.add_argument(
        "--pixel-size", type=float, default=None, help="pixel size in Angstrom (default 2.0)"
    )
    add_fisher_rao(p)
    a = p.parse_args(argv)
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        snrs=a.snrs,
        n_images=a.n_images,
        methods=a.methods,
        all_atom=a.all_atom,
        quick=a.quick,
        n_particles=a.n_particles,
        n_steps=a.n_steps,
        n_nodes=a.n_nodes,
        box=a.box,
        pixel_size=a.pixel_size,
        fisher_rao=a.fisher_rao,
    )
    return 0
