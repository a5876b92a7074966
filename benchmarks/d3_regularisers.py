"""Would another regulariser, or a sparse table, give the flow its d = 3 margin (issue 17)?

On the dimension study's ``adk-3`` data sets (``cryosip experiment dimension``: 1,000 images of
40 px, SNR 0.01, the first three PCA modes of MDAnalysisTests' AdK trajectory; seeds 0-2), the
flow's reported measure is the smoothed NPMLE on the refined table at the cross-validated
bandwidth h (``benchmarks/bandwidth_rules.py``). This script scores, without flows, at that h:

- ``em_<k>``: the smoothed NPMLE after k EM iterations from uniform weights (k = 3 ... 1000;
  ``choose_bandwidth`` fits with 200): early stopping as a regulariser, with each k's 3-fold
  held-out log-likelihood (what a data-driven choice of k would see);
- ``bagged_<B>``: the mean of B bootstrap replicates' smoothed NPMLEs (multinomial image
  counts, 200 iterations each);
- ``sparse``: the share of the flow's table (the pilot's nodes per CV) that a two-pass
  tabulation would render: every node for a quarter of the images, then only the nodes where
  those images' posterior mass (EM responsibilities summed over the images) is above 1e-3 of
  its maximum, dilated by one node on every CV.

W2 (Angstrom RMS) as in bandwidth_rules.py: ``n_draws`` draws of rho_h against as many of the
truth, exact OT.

    python benchmarks/d3_regularisers.py            # adk-3, seeds 0-2 (~3 min, 2 cores)
Writes benchmarks/results/d3_regularisers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from bandwidth_rules import draws, fit_smoothed, study_problem, w2_summary
from scipy import ndimage

from cryosip import _atomic
from cryosip.analysis.metrics import w2
from cryosip.experiments import dimension
from cryosip.sip import dto
from cryosip.sip.smoothing import cv_folds, heldout_loglik

HERE = Path(__file__).parent
ITERATIONS = (3, 10, 30, 100, 200, 300, 1000)
N_BAGS, N_ITER = 8, 200


def sparse_share(table, rng, pilot_share=0.25, threshold=1e-3) -> dict:
    """The two-pass tabulation's cost against the full table's (module docstring)."""
    L = np.asarray(table.table, np.float64)
    n, g = L.shape
    pilot = rng.choice(n, int(pilot_share * n), replace=False)
    w, _ = dto.em_weights(L[pilot])
    post = L[pilot] + np.log(np.maximum(np.asarray(w), 1e-300))
    post = np.exp(post - post.max(axis=1, keepdims=True))
    mass = (post / post.sum(axis=1, keepdims=True)).sum(axis=0).reshape(table.shape)
    keep = ndimage.binary_dilation(mass > threshold * mass.max(), np.ones((3,) * mass.ndim, bool))
    return {
        "table_shape": list(table.shape),
        "nodes_kept": int(keep.sum()),
        "nodes": int(g),
        "cost_share": float(pilot_share + (1 - pilot_share) * keep.sum() / g),
    }


def one_seed(case: str, seed: int, s, n_draws: int) -> dict:
    problem, reference = study_problem(case, seed, s)
    bandwidth, _ = problem.regularised("auto")  # what the flow runs with
    fine, h = problem.loglik, bandwidth.relative
    L = np.asarray(fine.table, np.float64)
    E = np.exp(L - L.max(axis=1, keepdims=True))
    lo, hi = np.asarray(fine.lower_bounds), np.asarray(fine.upper_bounds)
    nodes, h_abs = np.asarray(fine.nodes, np.float64), h * (hi - lo)
    folds = cv_folds(len(E))  # as choose_bandwidth

    def score(w):
        return w2(
            draws(nodes, w, h_abs, lo, hi, n_draws, np.random.default_rng(1)), reference[:n_draws]
        )

    out = {"seed": seed, "bandwidth": h}
    held = {k: float(heldout_loglik(E, fine.shape, [h], folds, k)[0]) for k in ITERATIONS}
    best = max(held.values())
    for k in ITERATIONS:
        out[f"em_{k}"] = {
            "w2": score(fit_smoothed(E, fine.shape, h, k)),
            "heldout_minus_best": held[k] - best,
        }
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(E), np.full(len(E), 1.0 / len(E)), size=N_BAGS).astype(np.float32)
    bags = fit_smoothed(E, fine.shape, h, N_ITER, counts)
    out[f"bagged_{N_BAGS}"] = {"w2": score(bags.mean(axis=0))}
    out["sparse"] = sparse_share(problem.table, rng)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="adk-3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-draws", type=int, default=3000)
    ap.add_argument("--out", default=str(HERE / "results" / "d3_regularisers.json"))
    a = ap.parse_args(argv)
    s = dimension.Settings()
    t0 = time.perf_counter()
    per_seed = []
    for seed in (int(v) for v in a.seeds.split(",")):
        per_seed.append(one_seed(a.case, seed, s, a.n_draws))
        print(json.dumps(per_seed[-1]), flush=True)
    keys = [f"em_{k}" for k in ITERATIONS] + [f"bagged_{N_BAGS}"]
    summary = w2_summary(per_seed, keys)
    summary["sparse_cost_share"] = [r["sparse"]["cost_share"] for r in per_seed]
    _atomic.write_json(
        a.out,
        {
            "benchmark": "d3_regularisers",
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "case": a.case,
            "n_images": s.n_images,
            "what": "W2 (Angstrom RMS) to the truth of the smoothed NPMLE at the cross-validated "
            "bandwidth after k EM iterations, of the mean of bootstrap replicates, and the share of "
            "the table a two-pass sparse tabulation would render (module docstring)",
            "n_draws": a.n_draws,
            "seeds": per_seed,
            "summary": summary,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "load_average_at_end": list(os.getloadavg()),
        },
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
