"""Which bandwidth rule (issue 17)? The rule cryosip uses against per-CV kernels and one-SE rules.

On the dimension study's data sets (``cryosip experiment dimension``: 1,000 images of 40 px,
SNR 0.01; ``adk-d`` the first d PCA modes of MDAnalysisTests' AdK trajectory, ``two-hinge``;
truths with structure), the flow's reported measure equals the smoothed NPMLE on the refined
table (measured on adk-3: W2 0.262 / 0.293 / 0.256 for the flow against 0.267 / 0.288 / 0.275
for EM on the smoothed fine grid, seeds 0-2). So each rule can be scored without running
flows: for every bandwidth on a grid of candidates (in 1-D ``sip.smoothing.CANDIDATES``; above,
per-CV bandwidths on a product grid), the script computes

- the 3-fold held-out log-likelihood of the images (per image, as ``choose_bandwidth`` does),
- W2 to the truth of the smoothed NPMLE on the whole data set (``n_draws`` draws of
  rho_h = mu * N(0, diag(h_a^2)), reflected into the box, exact OT against ``n_draws`` draws
  of the truth),

and reports the choice of each rule and its W2:

- ``isotropic-argmax``: one h for every CV, the best held-out total (the rule cryosip uses,
  ``sip/smoothing.py``, since 2026-12-05);
- ``isotropic-least``: one h, the least smoothing within one standard error of the best (the
  rule used before);
- ``isotropic-most``: one h, the most smoothing within one standard error (the textbook one-SE
  rule, ESL 7.10);
- ``per-cv-argmax``, ``per-cv-most``: the same with one h per CV;
- ``oracle``: the h with the smallest W2 to the truth (not a rule: what is attainable).

    python benchmarks/bandwidth_rules.py                 # adk-3, seeds 0-2 (~10-14 min, 2 cores)
    python benchmarks/bandwidth_rules.py --case adk-1 --seeds 0,1,2,3,4     # 25 s
Writes benchmarks/results/bandwidth_rules_<case>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cryosip import _atomic
from cryosip.analysis.metrics import w2
from cryosip.experiments import dimension
from cryosip.experiments._common import make_operator
from cryosip.pipeline.problem import EXACT_PHYSICS, prepare
from cryosip.pipeline.simulate import simulate_dataset
from cryosip.sip.operator import reflect_into
from cryosip.sip.smoothing import (
    CANDIDATES,
    _em_smoothed,
    _kernels,
    cv_folds,
    heldout_loglik,
    refine,
)

HERE = Path(__file__).parent
H_FIRST = (0.0, 0.02, 0.03, 0.045, 0.065)  # relative bandwidths tried on the first CV
H_OTHER = (0.0, 0.03, 0.065, 0.13, 0.2)  # and on the others (little signal: wider range)
N_FOLDS, N_ITER = 3, 200


def fine_table(case: str, seed: int, s: dimension.Settings):
    """The refined log-likelihood table of the study's data set (case, seed) and the truth."""
    problem, reference = study_problem(case, seed, s)
    return refine(problem.loglik), reference


def study_problem(case: str, seed: int, s: dimension.Settings):
    """The dimension study's data set (case, seed) as ``prepare`` makes it, and the truth."""
    model = dimension.case_model(case)
    truth = dimension.case_truth(model)
    reference = truth.sample(np.random.default_rng(12345), s.n_reference)
    key = jax.random.fold_in(jax.random.key(seed), dimension.CASES.index(case))
    k_sim = jax.random.split(key, 3)[0]
    sim = simulate_dataset(
        k_sim, make_operator(model, s.box, s.pixel_size), truth, s.n_images, snr=s.snr
    )
    return prepare(sim.stack, model, sigma=sim.sigma, progress=False, **EXACT_PHYSICS), reference


def draws(nodes, w, h_abs, lo, hi, n, rng) -> np.ndarray:
    """n draws of mu * N(0, diag(h_abs^2)), reflected into [lo, hi]."""
    x = nodes[rng.choice(len(w), n, p=w / w.sum())] + rng.standard_normal((n, len(lo))) * h_abs
    return np.asarray(reflect_into(jnp.asarray(x), jnp.asarray(lo), jnp.asarray(hi)), np.float64)


def fit_smoothed(E: np.ndarray, shape, h, n_iter: int, counts=None) -> np.ndarray:
    """The smoothed NPMLE's mixing weights w on the fine grid (rho_h = sum_g w_g N(node_g, h^2)):
    ``n_iter`` EM iterations, as ``choose_bandwidth`` fits each fold; (G,) on all images, or
    (F, G), one fit per row of image ``counts`` (F, N) (e.g. bootstrap replicates)."""
    kernels = tuple(jnp.asarray(k[None], jnp.float32) for k in _kernels(shape, h))
    c = np.ones((1, len(E))) if counts is None else np.asarray(counts)
    w = _em_smoothed(
        jnp.asarray(E, jnp.float32), kernels, jnp.asarray(c, jnp.float32), jnp.zeros(n_iter),
        tuple(shape),
    )  # fmt: skip
    w = np.asarray(w, np.float64)[0]
    return w[0] if counts is None else w


def score_all(fine, reference, n_draws: int) -> list[dict]:
    """Held-out log-likelihood per image and W2 of every per-CV bandwidth on the grid."""
    L = np.asarray(fine.table, np.float64)
    E = np.exp(L - L.max(axis=1, keepdims=True))
    n = len(E)
    folds = cv_folds(n, N_FOLDS)  # as choose_bandwidth
    lo, hi = np.asarray(fine.lower_bounds), np.asarray(fine.upper_bounds)
    nodes = np.asarray(fine.nodes, np.float64)
    ref = reference[:n_draws]
    d = len(fine.shape)
    out = []
    grid = (
        [(h,) for h in CANDIDATES] if d == 1 else itertools.product(H_FIRST, *([H_OTHER] * (d - 1)))
    )
    grid = list(grid)
    # every candidate in one EM pass; per image, for the one-SE rules
    held = heldout_loglik(E, fine.shape, grid, folds, N_ITER, per_image=True)
    for h, held_h in zip(grid, held):
        w_all = fit_smoothed(E, fine.shape, h, N_ITER)
        x = draws(
            nodes, w_all, np.asarray(h) * (hi - lo), lo, hi, n_draws, np.random.default_rng(1)
        )
        out.append({"h": [float(v) for v in h], "held": held_h, "w2": w2(x, ref)})
    return out


def rules(rows: list[dict]) -> dict:
    """The choice of each rule (module docstring) and its W2."""
    n = len(rows[0]["held"])
    total = {tuple(r["h"]): float(r["held"].sum()) for r in rows}
    held = {tuple(r["h"]): r["held"] for r in rows}

    def within(cands):
        best = max(cands, key=total.get)
        return best, [
            c
            for c in cands
            if total[c] >= total[best] - float(np.sqrt(n) * np.std(held[best] - held[c]))
        ]

    iso = [h for h in total if len(set(h)) == 1]
    iso_best, iso_within = within(iso)
    best, per_cv_within = within(list(total))
    w2 = {tuple(r["h"]): r["w2"] for r in rows}
    oracle = min(w2, key=w2.get)
    chosen = {
        "isotropic-least": min(iso_within),
        "isotropic-argmax": iso_best,
        "isotropic-most": max(iso_within),
        "per-cv-argmax": best,
        "per-cv-most": max(per_cv_within, key=lambda h: (sum(h), h)),
        "oracle": oracle,
    }
    return {
        k: {"h": list(h), "w2": w2[h], "heldout_minus_best": total[h] - total[best]}
        for k, h in chosen.items()
    }


def w2_summary(per_seed: list[dict], keys) -> dict:
    """Mean and sd over seeds of ``row[key]["w2"]`` for every key."""
    return {
        k: {
            "w2_mean": float(np.mean([r[k]["w2"] for r in per_seed])),
            "w2_sd": float(np.std([r[k]["w2"] for r in per_seed], ddof=1))
            if len(per_seed) > 1
            else 0.0,
        }
        for k in keys
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="adk-3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-draws", type=int, default=2000)
    ap.add_argument("--out", default=None, help="default: results/bandwidth_rules_<case>.json")
    a = ap.parse_args(argv)
    a.out = a.out or str(HERE / "results" / f"bandwidth_rules_{a.case}.json")
    s = dimension.Settings()
    t0 = time.perf_counter()
    per_seed = []
    for seed in (int(v) for v in a.seeds.split(",")):
        fine, reference = fine_table(a.case, seed, s)
        chosen = rules(score_all(fine, reference, a.n_draws))
        per_seed.append({"seed": seed, "fine_grid": list(fine.shape), **chosen})
        print(json.dumps(per_seed[-1]), flush=True)
    names = (
        "isotropic-least",
        "isotropic-argmax",
        "isotropic-most",
        "per-cv-argmax",
        "per-cv-most",
        "oracle",
    )
    summary = w2_summary(per_seed, names)
    result = {
        "benchmark": "bandwidth_rules",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "case": a.case,
        "n_images": s.n_images,
        "what": "W2 (Angstrom RMS) to the truth of the smoothed NPMLE on the refined table, for "
        "the per-CV bandwidth each rule picks from the 3-fold held-out log-likelihood",
        "candidates": {"first_cv": list(H_FIRST), "other_cvs": list(H_OTHER)}
        if len(per_seed[0]["fine_grid"]) > 1
        else list(CANDIDATES),
        "n_draws": a.n_draws,
        "seeds": per_seed,
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "load_average_at_end": list(os.getloadavg()),
    }
    _atomic.write_json(a.out, result)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
