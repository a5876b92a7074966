"""Reconstruction accuracy and run time on AdK (issue 11's targets), all methods on the same data.

AdK all atoms, 64 px, 1.5 A/px, known poses/CTF, bimodal truth. For each SNR: simulate, tabulate
once (one simulation per image and CV node), then run wgf-kl, wgf-mmd (paired), wgf-kl+mmd,
em-grid and per-image, recording W1 to the truth and the seconds of each stage.

Targets: kl W1 <= 0.015 at SNR 0.01 and <= 0.03 at SNR 0.001; paired mmd W1 <= 0.05 at SNR 0.1;
kl+mmd no worse than kl at SNR 0.01.

    python benchmarks/reconstruction.py                 # 5000 images, SNR 0.1 / 0.01 / 0.001
    python benchmarks/reconstruction.py --quick         # 1000 images, C-alpha
Writes benchmarks/results/reconstruction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

from cryosip import _atomic, prepare, run_method
from cryosip.analysis.metrics import w1
from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.data.distributions import make_distribution
from cryosip.data.models import load_model
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.pipeline.simulate import simulate_dataset

TARGETS = {"0.01": {"wgf-kl": 0.015}, "0.001": {"wgf-kl": 0.03}, "0.1": {"wgf-mmd": 0.05}}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--model", default="adk")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "reconstruction.json")
    )
    a = p.parse_args(argv)
    if a.quick:
        a.n_images, a.model = 1000, "adk-ca"
    model = load_model(a.model)
    truth = make_distribution("bimodal", model.lower, model.upper)
    op = CryoEMOperator(
        model,
        ImageModel.for_atoms(a.box, a.pixel_size, model.atoms),
        1.0,
        NuisancePrior(shift_sd_in_angstroms=2.0),
    )
    rows = []
    for snr in a.snrs:
        key = jax.random.key(a.seed)
        t0 = time.perf_counter()
        sim = simulate_dataset(key, op, truth, a.n_images, snr=snr)
        t_sim = time.perf_counter() - t0
        problem = prepare(sim.stack, model, sigma=sim.sigma, progress=False)
        row = {
            "snr": snr,
            "n_images": a.n_images,
            "simulate_seconds": t_sim,
            "tabulate_seconds": problem.setup_seconds,
            "methods": {},
        }
        for i, (m, obj) in enumerate(
            [
                ("wgf", "kl"),
                ("wgf", "mmd"),
                ("wgf", "kl+mmd"),
                ("em-grid", "kl"),
                ("per-image", "kl"),
            ]
        ):
            r = run_method(
                problem,
                m,
                obj,
                key=jax.random.fold_in(key, 100 + i),
                n_steps=a.steps,
                progress=False,
            )
            row["methods"][r.label] = {
                "w1": w1(r.positions[:, 0], sim.theta[:, 0], r.weights),
                "seconds": r.seconds,
            }
            print(
                f"SNR {snr:g} {r.label:<12} W1 {row['methods'][r.label]['w1']:.4f}  {r.seconds:.1f} s",
                flush=True,
            )
        for lab, bound in TARGETS.get(f"{snr:g}", {}).items():
            row.setdefault("targets", {})[lab] = {
                "bound": bound,
                "met": row["methods"][lab]["w1"] <= bound,
            }
        if f"{snr:g}" == "0.01":
            row.setdefault("targets", {})["kl+mmd<=kl"] = {
                "met": row["methods"]["wgf-kl+mmd"]["w1"] <= row["methods"]["wgf-kl"]["w1"] + 1e-3
            }
        rows.append(row)
    out = {
        "benchmark": "reconstruction",
        "model": a.model,
        "box": a.box,
        "pixel_size": a.pixel_size,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}",
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "rows": rows,
    }
    _atomic.write_json(a.out, out)
    print(
        json.dumps(
            {
                f"{r['snr']:g}": {k: round(v["w1"], 4) for k, v in r["methods"].items()}
                for r in rows
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
