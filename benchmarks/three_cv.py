"""Three CVs from a real trajectory (issue 17): time, peak memory and error of the default
reconstruction on a 3-mode linear model.

The model is what ``cryosip reconstruct --model adk.psf adk_dims.dcd --modes 3 --atoms ca``
builds: 3 PCA modes of MDAnalysisTests' AdK trajectory (C-alpha atoms; 1 CV unit = 1 Angstrom
RMS displacement). The truth is a two-component Gaussian mixture in the modes' box (weights
0.6 / 0.4, sd 0.12 of each range, means at 0.3 and 0.7 of the ranges). Images: 64 px at
2 A/px, SNR 0.01, known poses and CTF (cryosip's simulator). Reconstructions, in this process,
after one shared tabulation (nodes per CV from the pilot's interpolation probe): the default
KL flow (regularised, 8 bootstrap replicates), em-grid on the table's nodes, per-image MAP. W2 in CV units (= Angstrom RMS).

    python benchmarks/three_cv.py                 # 5000 images
    python benchmarks/three_cv.py --n-images 1000
Writes benchmarks/results/three_cv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "three_cv.json"))
    a = p.parse_args()

    from MDAnalysisTests.datafiles import DCD, PSF

    from cryosip import prepare, run_method
    from cryosip.analysis.metrics import w2
    from cryosip.cryoem.image_model import ImageModel, NuisancePrior
    from cryosip.data.distributions import make_distribution
    from cryosip.data.models import model_from_files
    from cryosip.pipeline.operator import CryoEMOperator
    from cryosip.pipeline.problem import EXACT_PHYSICS
    from cryosip.pipeline.simulate import simulate_dataset

    t_all = time.perf_counter()
    model, _ = model_from_files([DCD], topology=PSF, atoms="ca", modes=3)
    lo, hi = np.asarray(model.lower, np.float64), np.asarray(model.upper, np.float64)
    truth = make_distribution(
        "bimodal",
        lo,
        hi,
        means=np.stack([lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo)]),
        sds=np.stack([0.12 * (hi - lo)] * 2),
        weights=np.array([0.6, 0.4]),
    )
    im = ImageModel.for_atoms(64, 2.0, model.atoms)
    prior = NuisancePrior(shift_sd_in_angstroms=2.0, defocus_range_in_angstroms=(10000.0, 25000.0))
    k_sim, k_rec = jax.random.split(jax.random.key(a.seed))
    t0 = time.perf_counter()
    sim = simulate_dataset(
        k_sim, CryoEMOperator(model, im, 1.0, prior), truth, a.n_images, snr=0.01
    )
    t_sim = time.perf_counter() - t0
    th = np.asarray(sim.theta)
    t0 = time.perf_counter()
    problem = prepare(sim.stack, model, sigma=sim.sigma, progress=False, **EXACT_PHYSICS)
    t_prep = time.perf_counter() - t0
    rows = []
    for method, kw in (("wgf", {"n_bootstrap": 8}), ("em-grid", {}), ("per-image", {})):
        t0 = time.perf_counter()
        r = run_method(problem, method, "kl", key=k_rec, progress=False, **kw)
        rows.append(
            {
                "method": method,
                "seconds": round(time.perf_counter() - t0, 1),
                "w2": w2(r.positions, th, r.weights),
                "bandwidth_relative": None if r.bandwidth is None else r.bandwidth.relative,
            }
        )
        print(json.dumps(rows[-1]), flush=True)  # noqa: T201
    result = {
        "benchmark": "three_cv",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "n_images": a.n_images,
        "case": "AdK C-alpha, 3 PCA modes of MDAnalysisTests adk_dims.dcd, 64 px, 2 A/px, SNR 0.01",
        "table_nodes": list(problem.table.shape),
        "w2_true_cvs_floor": w2(th[: len(th) // 2], th[len(th) // 2 :]),
        "seconds_simulate": round(t_sim, 1),
        "seconds_prepare": round(t_prep, 1),
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(json.dumps(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
