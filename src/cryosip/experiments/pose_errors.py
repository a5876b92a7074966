"""Pose errors: reconstruct with perturbed "known" poses; does a pose-marginalised likelihood recover the loss?

The consensus poses of real particles are not exact. Here AdK images (C-alpha by default,
``--all-atom`` for every atom; bimodal truth on the path CV s, 64 px, 2 A/px, SNR 0.01) are
simulated with the true poses, and every method is then given poses perturbed by a rotation of
``--rot-errors`` degrees rms (a random angle about a uniformly random axis; see
:func:`cryosip.pipeline.pose_marginal.sample_pose_perturbations`) and in-plane shifts of
``--shift-errors`` Angstrom rms. The error directions are the same for every condition, only
their scale changes, and the noise is the same, so conditions differ by the error size alone.

Variants of the likelihood, for every condition (rot, shift):

- ``given``: the given poses used as if exact: ``wgf-kl``, ``wgf-mmd``, ``em-grid``,
  ``per-image`` (image tables, as in the robustness study);
- ``marginal``: the pose-marginalised likelihood of :class:`~cryosip.pipeline.pose_marginal.PoseMarginalOperator`,
  K perturbations per image drawn with the matching scale (rot, shift) around the given pose,
  tabulated on the CV nodes per image and interpolated by a cubic in s
  (:class:`~cryosip.sip.loglik_table.LogLikTableOperator`): ``wgf-kl``, ``em-grid``,
  ``per-image``. At (0, 0) the table holds the exact given-pose log-likelihood, which measures
  what the log-likelihood interpolation alone changes;
- ``refine``: a crude per-image pose refinement from the same renders: the best of the given
  pose and its K perturbations, per image and CV node (a profile likelihood): ``em-grid``,
  ``per-image``.

Outputs in ``--out``: ``pose_errors.csv`` (one row per seed, condition, variant and method),
``pose_errors_summary.csv`` (mean and sd over seeds), ``pose_errors.png`` (W1 against the
rotation error, one panel per shift error) and ``config.json``.

Cost on a 2-core CPU (C-alpha, defaults: 1,000 images, 12 conditions, marginal on the 5
conditions with one error type and the worst one, K = 8): about 30 minutes per seed;
``--quick`` a few minutes.

examples:
  $ cryosip experiment pose-errors --quick --out pose-quick/
  $ cryosip experiment pose-errors --out pose/
  $ cryosip experiment pose-errors --marginal all --n-draws 16 --seeds 0,1 --out pose-all/
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.special import logsumexp

from .. import _atomic
from ..pipeline.pose_marginal import (
    PoseMarginalOperator,
    perturb_nuisance,
    sample_pose_perturbations,
)
from ..reconstruction import Problem
from ..sip import dto
from ..sip.loglik_table import LogLikTableOperator
from . import common_parser, resolve, seeds_from
from .robustness import (
    add_adk_flow_options,
    add_fisher_rao,
    draw_dataset,
    make_scene,
    parse_floats,
    parse_methods,
    pipeline_fisher_rao,
    reconstruct,
    score,
    summarise,
    tabulate_noise_free,
    write_config,
)

logger = logging.getLogger(__name__)

NAME = "pose-errors"
DEFAULTS = dict(
    seeds=(0,),
    rot_errors=(0.0, 2.0, 5.0, 10.0),
    shift_errors=(0.0, 1.0, 2.0),
    n_images=1000,
    snr=0.01,
    n_draws=8,
    n_particles=64,
    n_steps=200,
    n_nodes=33,
    marginal="axes",
)
QUICK = dict(
    seeds=(0,),
    rot_errors=(0.0, 5.0, 10.0),
    shift_errors=(0.0, 2.0),
    n_images=400,
    snr=0.01,
    n_draws=8,
    n_particles=64,
    n_steps=120,
    n_nodes=33,
    marginal="axes",
)
GIVEN_METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
MARGINAL_METHODS = ("wgf-kl", "em-grid", "per-image")


def marginal_conditions(rots, shifts, mode: str) -> set[tuple[float, float]]:
    """Which (rot, shift) conditions get the marginal: ``axes`` (one error type at a time, plus the
    worst case and (0, 0)), ``all`` or ``none``."""
    if mode == "none":
        return set()
    if mode == "all":
        return {(r, s) for r in rots for s in shifts}
    if mode != "axes":
        raise ValueError(f"unknown marginal mode {mode!r}")
    return {(r, s) for r in rots for s in shifts if r == 0 or s == 0} | {(max(rots), max(shifts))}


def draw_statistics(
    pm: PoseMarginalOperator,
    theta_nodes,
    given_nuisance,
    index,
    clean_key,
    true_nuisance,
    true_theta,
    *,
    batch_size: int = 8,
):
    """Per image n, draw k and node g: <m_nkg, c_n>, <m_nkg, eps_n>, |m_nkg|^2, with m_nkg the node image
    under the k-th perturbation (``pm.perturbed``) of the given pose, c_n the clean image at the true pose
    and eps_n its unit noise image (``normal(fold_in(clean_key, n))``, as :func:`tabulate_noise_free`).
    Returns three (N, K, G) float32 arrays."""
    op = pm.base
    nodes = jnp.asarray(theta_nodes, jnp.float32).reshape(-1, 1)

    @jax.jit
    def batch(th, nu_true, nu_given, idx):
        def one(th, nu_t, nu_g, i):
            c = op.mean(th, nu_t).reshape(-1)
            e = jax.random.normal(jax.random.fold_in(clean_key, i), c.shape, c.dtype)
            nus = pm.perturbed(nu_g, i)

            def per_draw(nu):
                ms = jax.vmap(lambda g: op.mean(g, nu))(nodes).reshape(nodes.shape[0], -1)
                return ms @ c, ms @ e, jnp.sum(ms * ms, axis=1)

            return jax.vmap(per_draw)(nus)

        return jax.vmap(one)(th, nu_true, nu_given, idx)

    n = int(true_theta.shape[0])
    parts = []
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        idx = np.minimum(np.arange(s, s + batch_size), n - 1)
        take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), tree)  # noqa: E731
        res = batch(
            jnp.asarray(true_theta[idx], jnp.float32),
            take(true_nuisance),
            take(given_nuisance),
            jnp.asarray(np.asarray(index)[idx], jnp.int32),
        )
        parts.append([np.asarray(r)[: e - s] for r in res])
    return tuple(np.concatenate(p) for p in zip(*parts))


def draw_logliks(
    stats, clean_sq, clean_noise, noise_sq, sigma: float, n_entries: int
) -> np.ndarray:
    """log N(y_n; m_nkg, sigma^2 I) for every image, draw and node from :func:`draw_statistics`: (N, K, G), float64."""
    cy, ey, mm = (np.asarray(a, np.float64) for a in stats)
    ysq = clean_sq + 2 * sigma * clean_noise + sigma**2 * noise_sq
    r2 = ysq[:, None, None] - 2 * (cy + sigma * ey) + mm
    return -0.5 * r2 / sigma**2 - 0.5 * n_entries * np.log(2 * np.pi * sigma**2)


def loglik_problem(
    scene,
    table: np.ndarray,
    sigma: float,
    lower: float,
    upper: float,
    bandwidth: float,
    fine_factor: int = 8,
) -> Problem:
    """A Problem whose engine is a :class:`LogLikTableOperator` over ``table`` (N, G)."""
    llt = LogLikTableOperator(
        table, lower, upper, noise=sigma, n_obs_entries=scene.operator.obs_size
    )
    G = table.shape[1]
    fine = np.linspace(lower, upper, fine_factor * (G - 1) + 1)
    fine_ll = dto.loglik_on_nodes(llt, llt.observations(), fine, batch_size=1024)
    return Problem(
        scene.operator.with_sigma(sigma),
        None,
        llt,
        np.array([lower]),
        np.array([upper]),
        fine,
        fine_ll,
        bandwidth,
        0.0,
    )


def run(
    out_dir,
    *,
    seeds=None,
    rot_errors=None,
    shift_errors=None,
    n_images=None,
    snr=None,
    n_draws=None,
    n_particles=None,
    n_steps=None,
    n_nodes=None,
    marginal=None,
    all_atom: bool = False,
    quick: bool = False,
    methods=GIVEN_METHODS,
    fisher_rao=None,
) -> pd.DataFrame:
    t_start = time.perf_counter()
    cfg = resolve(
        QUICK if quick else DEFAULTS,
        seeds=seeds,
        rot_errors=rot_errors,
        shift_errors=shift_errors,
        n_images=n_images,
        snr=snr,
        n_draws=n_draws,
        n_particles=n_particles,
        n_steps=n_steps,
        n_nodes=n_nodes,
        marginal=marginal,
    )
    rots = tuple(sorted(float(r) for r in cfg["rot_errors"]))
    shifts = tuple(sorted(float(s) for s in cfg["shift_errors"]))
    with_marginal = marginal_conditions(rots, shifts, cfg["marginal"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name = "adk" if all_atom else "adk-ca"
    scene = make_scene(model_name, "bimodal")
    unknown = set(methods) - set(GIVEN_METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {GIVEN_METHODS}")
    write_config(
        out,
        experiment=NAME,
        model=model_name,
        truth=scene.truth.params(),
        quick=bool(quick),
        marginal_conditions=sorted(with_marginal),
        methods=list(methods),
        fisher_rao=pipeline_fisher_rao() if fisher_rao is None else fisher_rao,
        **cfg,
    )
    ref = scene.reference()
    N, G, K = int(cfg["n_images"]), int(cfg["n_nodes"]), int(cfg["n_draws"])
    rows = []
    for seed in cfg["seeds"]:
        key = jax.random.key(seed)
        theta, nu, k_noise = draw_dataset(key, scene, N)
        k_err, k_marg = jax.random.split(jax.random.fold_in(key, 77))
        sigma = None
        for rot in rots:
            for shift in shifts:
                t0 = time.perf_counter()
                dR, dt = sample_pose_perturbations(k_err, N, rot, shift)
                given = jax.tree_util.tree_map(
                    np.asarray, perturb_nuisance(jax.tree_util.tree_map(jnp.asarray, nu), dR, dt)
                )
                tabs = tabulate_noise_free(
                    k_noise, scene.operator, theta, nu, G, table_nuisance=given
                )
                if sigma is None:
                    sigma = tabs.sigma_for_snr(cfg["snr"])
                problem = tabs.problem(scene.operator, sigma)
                t_tab = time.perf_counter() - t0
                common = dict(
                    seed=seed, rot_error_deg=rot, shift_error_A=shift, snr=cfg["snr"], n_images=N
                )

                def run_one(prob, variant, method, key_offset, table_seconds):
                    r = reconstruct(
                        prob,
                        method,
                        key=jax.random.fold_in(key, key_offset),
                        n_particles=cfg["n_particles"],
                        n_steps=cfg["n_steps"],
                        fisher_rao=fisher_rao,
                    )
                    rows.append(
                        dict(
                            common,
                            variant=variant,
                            method=method,
                            **score(r.positions, r.weights, ref),
                            seconds=r.seconds,
                            table_seconds=table_seconds,
                        )
                    )
                    logger.info(
                        "seed %d rot %g shift %g %s %s: W1 %.4f",
                        seed,
                        rot,
                        shift,
                        variant,
                        method,
                        rows[-1]["w1"],
                    )

                for i, method in enumerate(GIVEN_METHODS):
                    if method in methods:
                        run_one(problem, "given", method, 100 + i, t_tab)
                if (rot, shift) not in with_marginal:
                    continue
                t0 = time.perf_counter()
                L_given = dto.loglik_on_nodes(
                    problem.table, problem.table.observations(), tabs.nodes, batch_size=1024
                )
                if rot == 0 and shift == 0:
                    tables = {"marginal": L_given}
                else:
                    pm = PoseMarginalOperator(
                        scene.operator.with_sigma(sigma), K, rot, shift, key=k_marg
                    )
                    stats = draw_statistics(pm, tabs.nodes, given, np.arange(N), k_noise, nu, theta)
                    Lk = draw_logliks(
                        stats, tabs.clean_sq, tabs.clean_noise, tabs.noise_sq, sigma, tabs.n_entries
                    )
                    marg = np.asarray(logsumexp(jnp.asarray(Lk), axis=1)) - np.log(K)
                    refine = np.maximum(L_given, Lk.max(axis=1))
                    tables = {"marginal": marg, "refine": refine}
                t_marg = time.perf_counter() - t0
                for variant, table in tables.items():
                    mp = loglik_problem(
                        scene, table, sigma, tabs.lower, tabs.upper, problem.bandwidth
                    )
                    these = MARGINAL_METHODS if variant == "marginal" else ("em-grid", "per-image")
                    for i, method in enumerate(these):
                        if method in methods:
                            run_one(mp, variant, method, 200 + i, t_marg)
                _atomic.write_csv(out / "pose_errors.csv", pd.DataFrame(rows))
        rows.append(
            dict(
                seed=seed,
                rot_error_deg=0.0,
                shift_error_A=0.0,
                snr=cfg["snr"],
                n_images=N,
                variant="oracle",
                method="oracle",
                **score(theta, None, ref),
                seconds=0.0,
                table_seconds=0.0,
            )
        )
    df = pd.DataFrame(rows)
    _atomic.write_csv(out / "pose_errors.csv", df)
    summary = summarise(
        df,
        ["rot_error_deg", "shift_error_A", "variant", "method"],
        ("w1", "w2", "seconds", "table_seconds"),
    )
    _atomic.write_csv(out / "pose_errors_summary.csv", summary)
    plot(out, summary, cfg, model_name)
    logger.info("pose-errors: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Path, summary: pd.DataFrame, cfg: dict, model_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import COLORS

    shifts = sorted(summary.loc[summary["variant"] != "oracle", "shift_error_A"].unique())
    fig, axes = plt.subplots(
        1, len(shifts), figsize=(4.6 * len(shifts), 4.0), sharey=True, squeeze=False
    )
    ls = {"given": "-", "marginal": "--", "refine": ":"}
    mk = {"given": "o", "marginal": "s", "refine": "^"}
    oracle = summary[summary["variant"] == "oracle"]
    for ax, sh in zip(axes[0], shifts):
        for (variant, method), d in summary[
            (summary["shift_error_A"] == sh) & (summary["variant"] != "oracle")
        ].groupby(["variant", "method"], sort=False):
            d = d.sort_values("rot_error_deg")
            ax.errorbar(
                d["rot_error_deg"],
                d["w1_mean"],
                d["w1_sd"],
                color=COLORS.get(method, "0.5"),
                ls=ls[variant],
                marker=mk[variant],
                capsize=3,
                label=f"{method} ({variant} poses)"
                if variant == "given"
                else f"{method} ({variant})",
            )
        if len(oracle):
            ax.axhline(
                float(oracle["w1_mean"].iloc[0]),
                color="0.5",
                ls="--",
                lw=1,
                label="true CVs (sampling floor)",
            )
        ax.set_xlabel("rotation error (degrees rms)")
        ax.set_title(f"shift error {sh:g} A rms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(r"$W_1(\hat\rho, \rho^*)$")
    axes[0][-1].legend(fontsize=6.5)
    fig.suptitle(
        f"AdK ({model_name}), {cfg['n_images']} images, SNR {cfg['snr']:g}, reconstruction with perturbed poses; "
        f"marginal: K = {cfg['n_draws']} draws",
        fontsize=10,
    )
    fig.tight_layout()
    p = out / "pose_errors.png"
    _atomic.savefig(fig, p, dpi=120)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> int:
    p = common_parser(f"cryosip experiment {NAME}", __doc__)
    p.add_argument(
        "--rot-errors",
        type=parse_floats,
        default=None,
        help="rotation errors, degrees rms (default 0,2,5,10)",
    )
    p.add_argument(
        "--shift-errors",
        type=parse_floats,
        default=None,
        help="shift errors, Angstrom rms (default 0,1,2)",
    )
    p.add_argument(
        "--n-images", type=int, default=None, help=f"images (default {DEFAULTS['n_images']})"
    )
    p.add_argument("--snr", type=float, default=None, help=f"SNR (default {DEFAULTS['snr']})")
    p.add_argument(
        "--n-draws",
        type=int,
        default=None,
        help="pose perturbations per image in the marginal (default 8)",
    )
    p.add_argument(
        "--marginal",
        choices=("axes", "all", "none"),
        default=None,
        help="conditions that get the marginal likelihood: one error type at a time + the worst (axes, "
        "default), all, or none",
    )
    add_adk_flow_options(p, DEFAULTS)
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=GIVEN_METHODS,
        help=f"methods (default {','.join(GIVEN_METHODS)}; the marginal runs those of them it supports)",
    )
    add_fisher_rao(p)
    a = p.parse_args(argv)
    run(
        a.out or NAME,
        seeds=seeds_from(a),
        rot_errors=a.rot_errors,
        shift_errors=a.shift_errors,
        n_images=a.n_images,
        snr=a.snr,
        n_draws=a.n_draws,
        n_particles=a.n_particles,
        n_steps=a.n_steps,
        n_nodes=a.n_nodes,
        marginal=a.marginal,
        all_atom=a.all_atom,
        quick=a.quick,
        methods=a.methods,
        fisher_rao=a.fisher_rao,
    )
    return 0
