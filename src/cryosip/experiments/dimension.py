"""Dimension: W2 of the KL flow, grid EM and per-image MAP against the number of CVs, d = 1..4.

Cases: ``adk-1`` .. ``adk-4``, the first d PCA modes of MDAnalysisTests' AdK trajectory
(``adk_dims.dcd``, C-alpha atoms; what ``cryosip reconstruct --model adk.psf adk_dims.dcd
--atoms ca --modes d`` builds; 1 CV unit = 1 Angstrom RMS displacement of the atoms), and
``two-hinge`` (the toy with two arm angles in [30, 150]^2 degrees). Truths with structure, in
unit coordinates u of the CV box: d = 1, a three-mode mixture 0.4 N(0.22, 0.06^2) +
0.25 N(0.5, 0.05^2) + 0.35 N(0.78, 0.06^2); d >= 2, :class:`ArcAndMode`: 70 % of the mass on a
curved ridge (an arc of radius 0.42 around (0.5, 0.2) from 20 to 160 degrees, radial sd 0.035,
in the first two CVs; N(0.6, 0.08^2) in the others) and 30 % in a compact mode at (0.5, 0.3)
(sd 0.045; N(0.35, 0.06^2) in the others). Images: ``simulate_dataset`` (random poses, shifts
with sd 2 A, astigmatic CTF, all known to every method), SNR 0.01.

Methods, each through the ordinary pipeline (``prepare`` then ``run_method``):

- ``wgf-kl``: the KL flow with ``run_method``'s defaults (64 particles, 300 steps, the
  regularisation bandwidth chosen by cross-validation), on the likelihood table ``prepare``
  builds (1-D: 33-node image table; d > 1: ``default_grid_nodes(d)`` per CV, refined).
  Its wall time T_flow = ``prepare`` + ``run_method``.
- ``em-grid``: EM weights on a product grid of k nodes per CV, the log-likelihood of every
  image tabulated exactly at every node (``LogLikTableOperator.build``, what ``prepare`` builds
  for d > 1). **Grid rule**: the tabulation's cost is measured on the data set itself (c =
  steady-state seconds per (image, node); :func:`tabulation_cost`, a few seconds on the first
  images), and k is the largest integer with N k^d c <= T_flow (at least 4; and N k^d <=
  ``max_grid_entries``): the largest grid whose tabulation runs in the flow's wall time. c
  depends on the shape of the compiled call, so it is measured twice: on the flow's default
  grid, giving k0, then on k0's grid, giving k. The grid's compilation is not in the rule (a
  single first call is too noisy a measure of it on a shared machine, and with JAX's
  compilation cache warm it is near zero) but is in the grid's measured time. Then the grid is
  held to its budget by its own measured time (:func:`hold_to_budget`, since 2026-12-06): the
  full tabulation's steady-state cost per entry (its first call's compilation left out, as in
  the rule) gives the rule's k again; a grid that overran is replaced by that smaller one, and
  a larger one is tabulated and kept if it ran within the flow's time (``grid_rule_per_cv`` is
  the k before this step). The grid's measured time (tabulation + EM) is
  recorded (``seconds``; ``grid_time_ratio`` = grid / flow), so the rule can be checked.
- ``per-image``: the histogram of per-image MAP CVs on the flow's (refined) table.
- ``wgf-mmd`` (``--no-mmd`` skips it): the flow of the nuisance-paired Gaussian-kernel score
  with the same particles and steps (minibatches of 256 images). It needs images, not
  log-likelihoods: in 1-D it runs on the image table, in d > 1 on the direct operator (every
  step renders its minibatch for every particle and differentiates them; no table). Its
  seconds are the flow's alone. Not regularised (docs/method.md, section 3).

Errors: W2 to the truth in CV units (Angstrom RMS for the modes; degrees for two-hinge) and,
for two-hinge, W2 with the ground cost the RMS distance between the atoms of the two structures
(``w2_rms``, Angstrom; exact OT, POT). For the AdK modes the two are the same number (the modes
are orthonormal, 1 Angstrom RMS per unit), so ``w2_rms`` = ``w2`` there. The reference is
``n_reference`` draws of the truth (200,000 in 1-D); ``oracle`` rows score the images' own true
CVs (the sampling floor).

Outputs in ``--out``: ``dimension.csv`` (one row per case, seed and method, with times, grid
nodes, the chosen bandwidth and the load average), ``dimension_summary.csv`` and
``summary.json`` (mean and sd over seeds, the flow/grid W2 ratio, the machine and its load),
``estimates/`` (every recovered measure, for the figures), ``dimension_w2.png`` (W2 against d
per method), ``dimension_ratio.png`` (flow/grid W2 and wall times against d),
``dimension_maps.png`` (first two CVs: truth and estimates, first seed) and ``config.json``.
``--replot`` redraws the figures from the tables.

Cost on a 2-core CPU (5 cases x 1,000 images of 40 px, JAX's compilation cache warm): 3 seeds
with ``--no-mmd`` in 12 minutes (735 s, load 1.3-2.0); the flow's tabulation and about the same
time again for the grid dominate.
The paired-MMD flow adds 4-8 minutes per d > 1 data set (0.9-1.5 s per step on the direct
operator, 2026-12-05: 3 seeds with it in 83 minutes; seconds in 1-D).
``--quick`` (adk-1, adk-2, two-hinge; 300 images of 32 px, one seed): a few minutes.
docs/results.md has the measured table.

examples:
  $ cryosip experiment dimension --quick --out dimension-quick/
  $ cryosip experiment dimension --out dimension/
  $ cryosip experiment dimension --cases adk-3,adk-4 --n-images 2000 --seeds 0-2 --out dim34/
  $ cryosip experiment dimension --out dimension/ --replot
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pandas as pd

from .. import _atomic
from ..analysis.metrics import w2
from ..data.distributions import as_rng, make_distribution
from ..pipeline.methods import WGF, run_method
from ..pipeline.problem import EXACT_PHYSICS, default_grid_nodes, loglik_table_batch, prepare
from ..pipeline.simulate import simulate_dataset
from ..sip import dto
from ..sip.loglik_table import LogLikTableOperator
from ._common import (
    Results,
    check_names,
    make_operator,
    method_style,
    pyplot,
    setting,
    summarise,
)
from ._common import Settings as _Settings

logger = logging.getLogger(__name__)

NAME = "dimension"
CASES = ("adk-1", "adk-2", "adk-3", "adk-4", "two-hinge")
METHODS = ("wgf-kl", "wgf-mmd", "em-grid", "per-image")
N_REFERENCE_1D = 200_000


@dataclasses.dataclass(frozen=True)
class Settings(_Settings):
    seeds: tuple[int, ...] = setting((0, 1), "seeds", quick=(0,))
    cases: tuple[str, ...] = setting(
        CASES, "cases, among " + ",".join(CASES), quick=("adk-1", "adk-2", "two-hinge")
    )
    n_images: int = setting(1000, "images per data set", quick=300)
    snr: float = setting(0.01, "SNR")
    box: int = setting(40, "box size in pixels", quick=32)
    pixel_size: float = setting(2.0, "pixel size in Angstrom", quick=3.0)
    n_particles: int = setting(WGF.n_particles, "flow particles")
    n_steps: int = setting(WGF.n_steps, "flow steps", quick=100)
    n_reference: int = setting(3000, "draws of the truth for W2 when d > 1 (exact OT)")
    max_grid_entries: float = setting(5e7, "at most this many (image, node) entries in the grid")
    with_mmd: bool = setting(
        True, "run the paired-MMD flow too (--no-mmd skips it: in d > 1 it is the slow one)",
        flag="--no-mmd",
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        self._set(cases=check_names(self.cases, CASES, "cases"))


# ------------------------------------------------------------------------------------------------
# Models and truths
# ------------------------------------------------------------------------------------------------


@functools.cache
def case_model(case: str):
    """The conformation model of a case (the AdK modes are built once per process)."""
    if case == "two-hinge":
        from ..data.models import load_model

        return load_model("two-hinge")
    from MDAnalysisTests.datafiles import DCD, PSF

    from ..data.models import model_from_files

    return model_from_files([DCD], topology=PSF, atoms="ca", modes=int(case.split("-")[1]))[0]


@dataclasses.dataclass(frozen=True, eq=False)
class ArcAndMode:
    """A curved ridge and a compact mode on the box [lower, upper] (d >= 2), in unit coordinates:
    with probability ``arc_weight``, (u1, u2) on the arc of ``radius`` around ``center`` between
    ``angles`` (degrees, uniform), displaced radially by N(0, ``width``^2), the other
    coordinates N(0.6, 0.08^2); else N(``mode``, 0.045^2) in (u1, u2), N(0.35, 0.06^2) in the
    others. Truncated to the box (rejection)."""

    lower: np.ndarray
    upper: np.ndarray
    arc_weight: float = 0.7
    center: tuple[float, float] = (0.5, 0.2)
    radius: float = 0.42
    angles: tuple[float, float] = (20.0, 160.0)
    width: float = 0.035
    mode: tuple[float, float] = (0.5, 0.3)
    name = "arc+mode"

    @property
    def dim(self) -> int:
        return int(np.size(self.lower))

    def _draw_unit(self, rng: np.random.Generator, n: int) -> np.ndarray:
        d = self.dim
        arc = rng.random(n) < self.arc_weight
        phi = np.deg2rad(rng.uniform(*self.angles, n))
        r = self.radius + self.width * rng.standard_normal(n)
        on_arc = np.asarray(self.center) + r[:, None] * np.stack([np.cos(phi), np.sin(phi)], -1)
        in_mode = np.asarray(self.mode) + 0.045 * rng.standard_normal((n, 2))
        rest = np.where(
            arc[:, None],
            0.6 + 0.08 * rng.standard_normal((n, d - 2)),
            0.35 + 0.06 * rng.standard_normal((n, d - 2)),
        )
        return np.concatenate([np.where(arc[:, None], on_arc, in_mode), rest], 1)

    def sample(self, key, n: int) -> np.ndarray:
        rng, out, have = as_rng(key), [], 0
        while have < n:
            u = self._draw_unit(rng, max(64, 2 * (n - have)))
            u = u[np.all((u >= 0) & (u <= 1), 1)]
            out.append(u)
            have += len(u)
        lo, hi = np.asarray(self.lower, np.float64), np.asarray(self.upper, np.float64)
        return lo + np.concatenate(out)[:n] * (hi - lo)

    def params(self) -> dict:
        return {
            "name": self.name,
            **{
                f.name: np.asarray(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)
            },
        }


def case_truth(model):
    """The truth of a case: the three-mode mixture in 1-D, :class:`ArcAndMode` above."""
    lo, hi = np.asarray(model.lower, np.float64), np.asarray(model.upper, np.float64)
    if lo.size > 1:
        return ArcAndMode(lo, hi)
    w = hi - lo
    means = lo + np.array([[0.22], [0.5], [0.78]]) * w
    sds = np.array([[0.06], [0.05], [0.06]]) * w
    return make_distribution("bimodal", lo, hi, means=means, sds=sds, weights=(0.4, 0.25, 0.35))


def spread(reference: np.ndarray) -> float:
    """sqrt(E|X - E X|^2): the W2 from the truth to a point mass at its mean."""
    ref = reference.reshape(len(reference), -1)
    return float(np.sqrt(np.sum(np.var(ref, 0))))


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def prune(positions, weights, tol: float = 1e-9):
    """(positions (K, d), weights) without the points of weight < tol (renormalised)."""
    x = np.asarray(positions, np.float64).reshape(len(positions), -1)
    w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights, np.float64)
    keep = w >= tol * w.max()
    return x[keep], w[keep] / w[keep].sum()


def w2_rms(model, x, wx, y) -> float:
    """W2 between the weighted CVs x and the draws y with the ground cost the RMS distance
    between the structures' atoms (Angstrom; exact OT)."""
    coords = jax.jit(jax.vmap(model.coordinates))

    def flat(t):
        return np.asarray(coords(jnp.asarray(t, jnp.float32)), np.float64).reshape(len(t), -1)

    n_atoms = model.atoms.n_atoms
    M = ot.dist(flat(x), flat(y), metric="sqeuclidean") / n_atoms
    return float(
        np.sqrt(ot.emd2(wx / wx.sum(), np.full(len(y), 1.0 / len(y)), M, numItermax=10**7))
    )


def scores(case: str, model, x, wx, reference) -> dict:
    """W2 in CV units and in RMS atom displacement (the same for the AdK modes)."""
    x, wx = prune(x, wx)
    out = {"w2": w2(x, reference, wx), "n_support": len(x)}
    out["w2_rms"] = w2_rms(model, x, wx, reference) if case == "two-hinge" else out["w2"]
    return out


# ------------------------------------------------------------------------------------------------
# The grid rule
# ------------------------------------------------------------------------------------------------


def grid_nodes_per_cv(d: int, n_images: int, budget_seconds, per_entry, max_entries) -> int:
    """The largest k (at least 4) with ``n_images k^d per_entry <= budget_seconds`` and
    ``n_images k^d <= max_entries``."""
    budget = float(budget_seconds) / (n_images * float(per_entry))
    budget = min(budget, float(max_entries) / n_images)
    k = int(np.floor(max(budget, 1.0) ** (1.0 / d) + 1e-9))
    while (k + 1) ** d <= budget:  # floating-point guard on the d-th root
        k += 1
    while k**d > budget and k > 4:
        k -= 1
    return max(4, k)


def _timed_build(problem, per_cv: int, n: int | None = None):
    """The exact log-likelihood table of the first ``n`` images (default: all) on the product
    grid, the wall time of each compiled call and the whole wall time, ``(table, (calls,)
    seconds, seconds)``."""
    d = int(np.size(problem.lower))
    obs = problem.observations if n is None else problem.observations.take(jnp.arange(n))
    stamps = [time.perf_counter()]
    table = LogLikTableOperator.build(
        problem.operator, obs, per_cv, batch_size=loglik_table_batch(per_cv, d),
        progress=lambda _: stamps.append(time.perf_counter()),
    )  # fmt: skip
    jax.block_until_ready(table.table)
    return table, np.diff(stamps), time.perf_counter() - stamps[0]


def _steady(steps) -> tuple[float, float]:
    """(median seconds of a call after the first, the first call's extra: its compilation)."""
    steady = float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0])
    return steady, max(0.0, float(steps[0]) - steady)


def tabulation_cost(problem, per_cv: int, min_entries: int = 20_000) -> tuple[float, float]:
    """Seconds per (image, node) of the exact log-likelihood table in steady state, and the
    first call's extra time (compilation), measured on the first images (at least 4 calls and
    ``min_entries`` entries after the first)."""
    d = int(np.size(problem.lower))
    G, bs = per_cv**d, loglik_table_batch(per_cv, d)
    n_calls = max(4, int(np.ceil(min_entries / (bs * G))) + 1)
    steady, extra = _steady(
        _timed_build(problem, per_cv, min(len(problem.observations), n_calls * bs))[1]
    )
    return steady / (bs * G), extra


def hold_to_budget(problem, k: int, timed, budget: float, max_entries: int):
    """The grid re-sized from its own measured time: the rule's k comes from a cost measured on
    a few batches, which a load spike on a shared machine can move by 20-40 %, and one node per
    CV is a factor ((k + 1) / k)^d in time. ``timed`` is the grid's :func:`_table`; its
    steady-state time (compilation left out, as in the rule) per entry gives k' (the same rule).
    A grid that overran the budget is replaced by k' (up to three corrections), and a larger k'
    is tabulated and kept only if it ran within the budget. Returns (k, :func:`_table` of the
    grid kept)."""
    n, d = len(problem.observations), int(np.size(problem.lower))
    for _ in range(3):
        k_new = grid_nodes_per_cv(d, n, budget, timed[1] / (n * k**d), max_entries)
        if k_new == k:
            break
        new = _table(problem, k_new)
        if k_new > k and new[1] > budget:  # the larger grid overran: keep the one that fit
            break
        k, timed = k_new, new
    return k, timed


def _table(problem, per_cv: int):
    """The exact log-likelihood of every image on the product grid, its steady-state wall time
    (the first call's compilation left out) and its whole wall time."""
    table, steps, total = _timed_build(problem, per_cv)
    return table, total - _steady(steps)[1], total


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


def run_case(case: str, seed: int, s: Settings, est_dir: Path) -> list[dict]:
    """One case and seed: simulate, reconstruct by every method, score; rows of the table."""
    model = case_model(case)
    d = int(np.size(model.lower))
    truth = case_truth(model)
    n_ref = N_REFERENCE_1D if d == 1 else s.n_reference
    reference = truth.sample(np.random.default_rng(12345), n_ref)
    key = jax.random.fold_in(jax.random.key(seed), CASES.index(case))
    k_sim, k_flow, k_pi = jax.random.split(key, 3)
    op = make_operator(model, s.box, s.pixel_size)
    t0 = time.perf_counter()
    sim = simulate_dataset(k_sim, op, truth, s.n_images, snr=s.snr)
    t_sim = time.perf_counter() - t0
    theta = np.asarray(sim.theta, np.float64).reshape(s.n_images, d)

    t0 = time.perf_counter()
    problem = prepare(sim.stack, model, sigma=sim.sigma, progress=False, **EXACT_PHYSICS)
    t_prep = time.perf_counter() - t0
    flow = run_method(
        problem, "wgf", "kl", key=k_flow, progress=False,
        n_particles=s.n_particles, n_steps=s.n_steps,
    )  # fmt: skip
    t_flow = t_prep + flow.seconds
    pim = run_method(problem, "per-image", "kl", key=k_pi, progress=False)
    mmd = None
    if s.with_mmd:  # paired MMD needs images: 1-D the image table, d > 1 the direct operator
        direct = problem if d == 1 else dataclasses.replace(problem, table=None)
        mmd = run_method(
            direct, "wgf", "mmd", key=jax.random.fold_in(key, 7), progress=False,
            n_particles=s.n_particles, n_steps=s.n_steps,
        )  # fmt: skip

    ref_nodes = default_grid_nodes(d)
    # the cost per entry depends on the compiled call's shape: measured on the default grid,
    # then again on the grid that gives (the rule's k)
    k0 = grid_nodes_per_cv(
        d, s.n_images, t_flow, tabulation_cost(problem, ref_nodes)[0], s.max_grid_entries
    )
    cost = tabulation_cost(problem, k0)
    k = grid_nodes_per_cv(d, s.n_images, t_flow, cost[0], s.max_grid_entries)
    k_rule = k
    if d > 1 and tuple(problem.table.shape) == (k,) * d:
        table, t_grid_tab = problem.table, t_prep
    else:
        k, (table, _, t_grid_tab) = hold_to_budget(
            problem, k, _table(problem, k), t_flow, s.max_grid_entries
        )
    t0 = time.perf_counter()
    w_grid, _ = dto.em_weights(np.asarray(table.table))
    t_grid = t_grid_tab + time.perf_counter() - t0

    common = dict(case=case, d=d, seed=seed, n_images=s.n_images, sigma=float(sim.sigma))
    estimates = {
        "oracle": (theta, None, 0.0),
        "wgf-kl": (flow.positions, flow.weights, t_flow),
        "em-grid": (np.asarray(table.nodes), w_grid, t_grid),
        "per-image": (pim.positions, pim.weights, t_prep + pim.seconds),
    }
    if mmd is not None:  # its seconds: the flow alone (it needs no table in d > 1)
        estimates["wgf-mmd"] = (mmd.positions, mmd.weights, mmd.seconds)
    if d > 1:  # grid EM on the flow's own table: the same renders, nodes chosen per CV
        t0 = time.perf_counter()
        w_table, _ = dto.em_weights(np.asarray(problem.table.table))
        t_table = t_prep + time.perf_counter() - t0
        estimates["em-table"] = (np.asarray(problem.table.nodes), w_table, t_table)
    rows, saved = [], {}
    for method, (x, w, seconds) in estimates.items():
        sc = scores(case, model, x, w, reference)
        row = dict(common, method=method, **sc, seconds=seconds)
        if method == "wgf-kl":
            row["bandwidth_relative"] = flow.bandwidth.relative if flow.bandwidth else 0.0
        if method in ("wgf-kl", "em-table") and problem.resolution is not None:
            row["table_shape"] = "x".join(map(str, problem.resolution.shape))
            row["grid_nodes"] = int(np.prod(problem.resolution.shape))
        if method == "em-grid":
            row.update(
                grid_per_cv=k,
                grid_pilot_per_cv=k0,
                grid_rule_per_cv=k_rule,
                grid_nodes=k**d,
                grid_time_ratio=t_grid / t_flow,
            )
        row.update(
            flow_seconds=t_flow, seconds_per_entry=cost[0], compile_seconds=cost[1],
            simulate_seconds=t_sim, load_1min=os.getloadavg()[0],
        )  # fmt: skip
        rows.append(row)
        px, pw = prune(x, w)
        saved[f"{method}_x"], saved[f"{method}_w"] = px.astype(np.float32), pw
        logger.info("%s seed %d %s: W2 %.4g (%.0f s)", case, seed, method, sc["w2"], seconds)
    saved["truth"] = reference[:2000].astype(np.float32)
    saved["lower"], saved["upper"] = np.asarray(model.lower), np.asarray(model.upper)
    with _atomic.atomic_path(est_dir / f"{case}_seed{seed}.npz", ".npz") as tmp:
        np.savez(tmp, **saved)
    return rows


def run(out_dir, settings: Settings = Settings()) -> pd.DataFrame:
    """Run every case and seed; write the tables, summary.json and the figures into ``out_dir``."""
    t_start, s = time.perf_counter(), settings
    load_start = os.getloadavg()
    truths = {c: case_truth(case_model(c)).params() for c in s.cases}
    out = Results(out_dir, NAME, s, truths=truths, n_reference_1d=N_REFERENCE_1D)
    est_dir = out / "estimates"
    est_dir.mkdir(exist_ok=True)
    rows = []
    for case in s.cases:
        for seed in s.seeds:
            rows += run_case(case, seed, s, est_dir)
            out.table(NAME, rows)  # partial results survive an interrupt
    df = out.table(NAME, rows)
    machine = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "seconds_total": time.perf_counter() - t_start,
    }
    write_summary(out, df, machine)
    replot(out.path)
    logger.info("dimension: done in %.0f s", time.perf_counter() - t_start)
    return df


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per case and seed: W2 of the flow / W2 of the grid (CV units and RMS), then mean +- sd."""
    piv = df.pivot_table(index=["case", "d", "seed"], columns="method", values=["w2", "w2_rms"])
    cols = {
        "ratio": piv["w2"]["wgf-kl"] / piv["w2"]["em-grid"],
        "ratio_rms": piv["w2_rms"]["wgf-kl"] / piv["w2_rms"]["em-grid"],
    }
    if "em-table" in piv["w2"]:  # against grid EM on the flow's own nodes (d > 1)
        cols["ratio_table"] = piv["w2"]["wgf-kl"] / piv["w2"]["em-table"]
    r = pd.DataFrame(cols).reset_index()
    return summarise(r, ["case", "d"], tuple(c for c in cols))


def write_summary(out: Results, df: pd.DataFrame, machine: dict) -> None:
    """``dimension_summary.csv`` (mean, sd over seeds) and ``summary.json`` (with the ratios)."""
    metrics = ("w2", "w2_rms", "seconds", "grid_per_cv", "grid_time_ratio", "bandwidth_relative")
    table = summarise(df, ["case", "d", "method"], metrics)
    _atomic.write_csv(out / f"{NAME}_summary.csv", table)
    rat = ratios(df)
    doc = {
        "experiment": NAME,
        **machine,
        "rows": table.to_dict("records"),
        "flow_over_grid": rat.to_dict("records"),
    }
    _atomic.write_json(out / "summary.json", _atomic.json_safe(doc))


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def replot(out_dir) -> list[Path]:
    """Redraw the figures from ``dimension.csv`` and ``estimates/`` (without ``estimates/``, as
    in docs/figures, the maps are left as they are)."""
    out = Results(out_dir)
    df = pd.read_csv(out / f"{NAME}.csv")
    figures = [plot_w2(out, df), plot_ratio(out, df)]
    if not (out / "estimates").is_dir():
        logger.warning("%s has no estimates/: the maps figure is not redrawn", out.path)
        return figures
    return [*figures, plot_maps(out, df)]


def _present(df: pd.DataFrame, methods=METHODS) -> list[str]:
    """``methods`` that have rows in ``df``, in order (``--no-mmd`` leaves ``wgf-mmd`` out)."""
    have = set(df["method"])
    return [m for m in methods if m in have]


def plot_w2(out: Results, df: pd.DataFrame) -> Path:
    plt = pyplot()
    table = summarise(df, ["case", "d", "method"], ("w2", "w2_rms"))
    adk = table[table["case"].str.startswith("adk")]
    hinge = table[table["case"] == "two-hinge"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), gridspec_kw={"width_ratios": [2, 1, 1]})
    order = _present(table, (*METHODS, "oracle"))
    for m in order:
        t = adk[adk["method"] == m].sort_values("d")
        if len(t):
            axes[0].errorbar(t["d"], t["w2_mean"], t["w2_sd"], capsize=3, **method_style(m))
    axes[0].set_xticks(sorted(adk["d"].unique()) if len(adk) else [1])
    axes[0].set_xlabel("number of CVs d (AdK PCA modes, C-alpha)")
    axes[0].set_ylabel(r"$W_2$ (Angstrom RMS), mean $\pm$ sd over seeds")
    axes[0].set_title("AdK linear modes, SNR 0.01")
    axes[0].set_yscale("log")
    axes[0].grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    for ax, col, unit in ((axes[1], "w2", "degrees"), (axes[2], "w2_rms", "Angstrom RMS")):
        for i, m in enumerate(order):
            t = hinge[hinge["method"] == m]
            if len(t):
                st = method_style(m)
                ax.errorbar(
                    [i], t[f"{col}_mean"], t[f"{col}_sd"], capsize=4, color=st["color"],
                    marker="o" if m != "oracle" else "_", ms=8, ls="none",
                )  # fmt: skip
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=20, fontsize=8)
        ax.set_ylabel(f"$W_2$ ({unit})")
        ax.set_title(f"two-hinge (d = 2), {unit}")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    n_seeds = df["seed"].nunique()
    fig.suptitle(f"W2 to the truth against dimension ({n_seeds} seeds)", fontsize=10)
    return out.figure(fig, "dimension_w2.png")


def plot_ratio(out: Results, df: pd.DataFrame) -> Path:
    plt = pyplot()
    rat = ratios(df)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    adk = rat[rat["case"].str.startswith("adk")].sort_values("d")
    ax.errorbar(adk["d"], adk["ratio_mean"], adk["ratio_sd"], capsize=3, marker="o",
                color="C0", label="AdK modes")  # fmt: skip
    th = rat[rat["case"] == "two-hinge"]
    if len(th):
        ax.errorbar(th["d"] + 0.05, th["ratio_mean"], th["ratio_sd"], capsize=3, marker="s",
                    ls="none", color="C2", label="two-hinge")  # fmt: skip
    ax.axhline(1.0, color="0.3", lw=1, label="flow = grid")
    ax.axhline(1 / 1.5, color="0.5", lw=1, ls="--", label="target 1/1.5 (d = 3, 4)")
    ax.set_xticks(sorted(rat["d"].unique()))
    ax.set_xlabel("number of CVs d")
    ax.set_ylabel(r"$W_2$(flow) / $W_2$(grid EM, same wall time)")
    ax.set_title("below 1: the flow is closer to the truth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    tab = summarise(df, ["case", "d", "method"], ("seconds", "grid_per_cv"))
    for m in _present(tab):
        t = tab[(tab["method"] == m) & tab["case"].str.startswith("adk")].sort_values("d")
        ax.errorbar(t["d"], t["seconds_mean"], t["seconds_sd"], capsize=3, **method_style(m))
        if m == "em-grid":
            for dd, sec, k in zip(t["d"], t["seconds_mean"], t["grid_per_cv_mean"]):
                ax.annotate(f"{k:.0f}$^{dd}$", (dd, sec), textcoords="offset points",
                            xytext=(4, -12), fontsize=8, color="C3")  # fmt: skip
    ax.set_xticks(sorted(tab["d"].unique()))
    ax.set_xlabel("number of CVs d (AdK)")
    ax.set_ylabel("wall seconds (tabulation included)")
    ax.set_title("wall time; grid nodes annotated (k^d)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return out.figure(fig, "dimension_ratio.png")


def plot_maps(out: Results, df: pd.DataFrame) -> Path:
    from scipy.ndimage import gaussian_filter

    plt = pyplot()
    cases = [c for c in dict.fromkeys(df["case"]) if int(df[df["case"] == c]["d"].iloc[0]) > 1]
    seed = int(df["seed"].min())
    cols = ("truth", *_present(df))
    fig, axes = plt.subplots(
        max(1, len(cases)), len(cols), figsize=(3.2 * len(cols), 3.0 * max(1, len(cases))),
        squeeze=False,
    )  # fmt: skip
    for row, case in zip(axes, cases):
        e = np.load(out / "estimates" / f"{case}_seed{seed}.npz")
        lo, hi = e["lower"], e["upper"]
        for ax, col in zip(row, cols):
            if col == "truth":
                x, w = e["truth"], np.full(len(e["truth"]), 1.0 / len(e["truth"]))
            else:
                x, w = e[f"{col}_x"], e[f"{col}_w"]
            h, xe, ye = np.histogram2d(
                x[:, 0], x[:, 1], bins=60, range=[[lo[0], hi[0]], [lo[1], hi[1]]], weights=w
            )
            h = gaussian_filter(h, 1.5)  # spikes (grid nodes, particles) made visible
            ax.imshow(h.T, origin="lower", extent=(xe[0], xe[-1], ye[0], ye[-1]), aspect="auto",
                      cmap="Greys" if col == "truth" else "Blues")  # fmt: skip
            ax.set_title(f"{case}: {col}", fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("CV 2")
    for ax in axes[-1]:
        ax.set_xlabel("CV 1")
    fig.suptitle(
        f"first two CVs, seed {seed} (weighted histograms, blurred by 1.5 bins)", fontsize=10
    )
    return out.figure(fig, "dimension_maps.png")
