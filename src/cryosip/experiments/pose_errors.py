"""Pose errors: reconstruct with perturbed "known" poses; does a pose-marginalised likelihood recover the loss?

The consensus poses of real particles are not exact. Here AdK images (C-alpha by default,
``--all-atom`` for every atom; bimodal truth on the path CV s, 64 px, 2 A/px, SNR 0.01) are
simulated with the true poses, and every method is then given poses perturbed by a rotation of
``--rot-errors-in-degrees`` rms (a random angle about a uniformly random axis; see
:func:`cryosip.pipeline.pose_marginal.sample_pose_perturbations`) and in-plane shifts of
``--shift-errors-in-angstroms`` rms. The error directions are the same for every condition, only
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

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.special import logsumexp

from ..pipeline.pose_marginal import (
    PoseMarginalOperator,
    perturb_nuisance,
    sample_pose_perturbations,
)
from ..sip import dto
from ..sip.loglik_table import LogLikTableOperator
from ._common import (
    AdkFlowSettings,
    Results,
    adk_study,
    batches,
    check_names,
    reconstruct,
    score,
    setting,
    table_problem,
    take_rows,
)

logger = logging.getLogger(__name__)

NAME = "pose-errors"
GIVEN_METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
MARGINAL_METHODS = ("wgf-kl", "em-grid", "per-image")
ROTATION, SHIFT = "rotation_error_in_degrees", "shift_error_in_angstroms"  # CSV columns


@dataclasses.dataclass(frozen=True)
class Settings(AdkFlowSettings):
    rotation_errors_in_degrees: tuple[float, ...] = setting(
        (0.0, 2.0, 5.0, 10.0),
        "rotation errors, degrees rms",
        quick=(0.0, 5.0, 10.0),
        flag=("--rotation-errors-in-degrees", "--rot-errors"),
    )
    shift_errors_in_angstroms: tuple[float, ...] = setting(
        (0.0, 1.0, 2.0),
        "shift errors, Angstrom rms",
        quick=(0.0, 2.0),
        flag=("--shift-errors-in-angstroms", "--shift-errors"),
    )
    n_images: int = setting(1000, "images", quick=400)
    snr: float = setting(0.01, "SNR")
    n_draws: int = setting(8, "pose perturbations per image in the marginal")
    n_steps: int = setting(200, "WGF steps", quick=120)
    marginal: str = setting(
        "axes",
        "conditions that get the marginal likelihood: one error type at a time + the worst "
        "(axes), all, or none",
        choices=("axes", "all", "none"),
    )
    methods: tuple[str, ...] = setting(
        GIVEN_METHODS, "methods (the marginal runs those of them it supports)"
    )

    def __post_init__(self):
        super().__post_init__()
        self._set(
            rotation_errors_in_degrees=tuple(sorted(map(float, self.rotation_errors_in_degrees))),
            shift_errors_in_angstroms=tuple(sorted(map(float, self.shift_errors_in_angstroms))),
            methods=check_names(self.methods, GIVEN_METHODS),
        )


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

    parts = []
    for s, e, idx in batches(int(true_theta.shape[0]), batch_size):
        res = batch(
            jnp.asarray(true_theta[idx], jnp.float32),
            take_rows(true_nuisance, idx),
            take_rows(given_nuisance, idx),
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


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    t_start, s = time.perf_counter(), settings
    rots, shifts = s.rotation_errors_in_degrees, s.shift_errors_in_angstroms
    with_marginal = marginal_conditions(rots, shifts, s.marginal)
    scene, out, ref = adk_study(out_dir, NAME, s, marginal_conditions=sorted(with_marginal))
    N, G, K = s.n_images, s.n_nodes, s.n_draws
    rows = []
    for seed in s.seeds:
        key = jax.random.key(seed)
        theta, nu, k_noise = scene.draw(key, N)
        k_err, k_marg = jax.random.split(jax.random.fold_in(key, 77))
        sigma = None
        for rot in rots:
            for shift in shifts:
                t0 = time.perf_counter()
                dR, dt = sample_pose_perturbations(k_err, N, rot, shift)
                given = jax.tree_util.tree_map(
                    np.asarray, perturb_nuisance(jax.tree_util.tree_map(jnp.asarray, nu), dR, dt)
                )
                tabs = scene.tabulate(k_noise, theta, nu, G, table_nuisance=given)
                if sigma is None:
                    sigma = tabs.sigma_for_snr(s.snr)
                problem = tabs.problem(scene.operator, sigma)
                t_tab = time.perf_counter() - t0
                common = {"seed": seed, ROTATION: rot, SHIFT: shift, "snr": s.snr, "n_images": N}

                def run_one(prob, variant, method, key_offset, table_seconds):
                    r = reconstruct(prob, method, s, key=jax.random.fold_in(key, key_offset))
                    m = score(r.positions, r.weights, ref)
                    rows.append(
                        dict(common, variant=variant, method=method, **m, seconds=r.seconds)
                    )
                    rows[-1]["table_seconds"] = table_seconds
                    logger.info(
                        "seed %d rot %g shift %g %s %s: W1 %.4f",
                        *(seed, rot, shift, variant, method, m["w1"]),
                    )

                for i, method in enumerate(GIVEN_METHODS):
                    if method in s.methods:
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
                    llt = LogLikTableOperator(
                        table,
                        tabs.lower,
                        tabs.upper,
                        noise=sigma,
                        n_obs_entries=scene.operator.obs_size,
                    )
                    mp = table_problem(
                        scene.operator, llt, sigma, tabs.lower, tabs.upper, G, problem.bandwidth
                    )
                    these = MARGINAL_METHODS if variant == "marginal" else ("em-grid", "per-image")
                    for i, method in enumerate(these):
                        if method in s.methods:
                            run_one(mp, variant, method, 200 + i, t_marg)
                out.table("pose_errors", rows)
        oracle = {"seed": seed, ROTATION: 0.0, SHIFT: 0.0, "snr": s.snr, "n_images": N}
        rows.append(
            dict(oracle, variant="oracle", method="oracle", **score(theta, None, ref), seconds=0.0)
        )
        rows[-1]["table_seconds"] = 0.0
    df, summary = out.tables(
        "pose_errors",
        rows,
        [ROTATION, SHIFT, "variant", "method"],
        ("w1", "w2", "seconds", "table_seconds"),
    )
    plot(out, summary, s)
    logger.info("pose-errors: done in %.0f s", time.perf_counter() - t_start)
    return df


def plot(out: Results, summary: pd.DataFrame, s: Settings) -> Path:
    from ..analysis.plots import COLORS
    from ._common import W1_LABEL, floor_line, log_axes, pyplot, w1_lines

    plt = pyplot()
    errors = summary[summary["variant"] != "oracle"]
    shifts = sorted(errors[SHIFT].unique())
    fig, axes = plt.subplots(
        1, len(shifts), figsize=(4.6 * len(shifts), 4.0), sharey=True, squeeze=False
    )
    ls = {"given": "-", "marginal": "--", "refine": ":"}
    mk = {"given": "o", "marginal": "s", "refine": "^"}

    def style(key):
        variant, method = key
        label = f"{method} ({variant} poses)" if variant == "given" else f"{method} ({variant})"
        return dict(
            label=label, color=COLORS.get(method, "0.5"), ls=ls[variant], marker=mk[variant]
        )

    oracle = summary[summary["variant"] == "oracle"]
    for ax, sh in zip(axes[0], shifts):
        w1_lines(ax, errors[errors[SHIFT] == sh], ROTATION, ["variant", "method"], style)
        if len(oracle):
            floor_line(ax, oracle["w1_mean"].iloc[0])
        log_axes(ax, "rotation error (degrees rms)", f"shift error {sh:g} A rms", logx=False)
    axes[0][0].set_ylabel(W1_LABEL)
    axes[0][-1].legend(fontsize=6.5)
    fig.suptitle(
        f"AdK ({s.model_name}), {s.n_images} images, SNR {s.snr:g}, reconstruction with perturbed "
        f"poses; marginal: K = {s.n_draws} draws",
        fontsize=10,
    )
    return out.figure(fig, "pose_errors.png")
