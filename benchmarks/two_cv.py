"""Two CVs from the command line (issue 17): the default `cryosip reconstruct` on a 2-D model
against grid EM and per-image MAP, wall time and peak memory of each command.

The case of docs/results.md: ``cryosip simulate --dataset two-hinge --distribution ring
--n-images 2000 --box 48 --pixel-size 2 --snr 0.05`` (two arm angles in [30, 150]^2 degrees),
then, on the same files:

- ``default``: ``cryosip reconstruct particles.star --model two-hinge`` (nothing else: the KL
  flow on the 20 x 20 likelihood table with the bandwidth chosen by cross-validation, 8
  bootstrap replicates, every output);
- ``em-grid-15``: ``--method em-grid --nodes 15`` (the 15 x 15 grid of the issue);
- ``em-grid``: ``--method em-grid`` (the default table: nodes per CV from the pilot);
- ``per-image``: ``--method per-image``.

W2 and W1 (degrees) against the true angles of the images (``cryosip evaluate``). Targets:
default W2 <= 0.8 x em-grid-15's; the default command under 3 minutes on a 2-core CPU.

    python benchmarks/two_cv.py                  # 2000 images, seed 0
    python benchmarks/two_cv.py --seeds 0,1
Writes benchmarks/results/two_cv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CLI = [
    sys.executable,
    "-c",
    "import sys; from cryosip.cli.main import main; sys.exit(main(sys.argv[1:]))",
]

RUNS = {
    "default": [],
    "em-grid-15": ["--method", "em-grid", "--nodes", "15"],
    "em-grid": ["--method", "em-grid"],
    "per-image": ["--method", "per-image"],
}


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one command (GNU time)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        t0 = time.perf_counter()
        subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        return wall, int(f.read().split()[-1]) / 1024**2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=str(HERE / "results" / "two_cv.json"))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in a.seeds.split(",")):
            sim = os.path.join(tmp, f"sim{seed}")
            args = "--dataset two-hinge --distribution ring --box 48 --pixel-size 2 --snr 0.05"
            subprocess.run(
                [*CLI, "simulate", *args.split(), "--n-images", str(a.n_images),
                 "--seed", str(seed), "--out", sim, "--no-progress"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for name, extra in RUNS.items():
                out = os.path.join(tmp, f"{name}{seed}")
                wall, rss = timed(
                    [
                        *CLI,
                        "reconstruct",
                        os.path.join(sim, "particles.star"),
                        "--model",
                        "two-hinge",
                        "--out",
                        out,
                        "--no-progress",
                        *extra,
                    ]
                )
                ev = subprocess.run(
                    [*CLI, "evaluate", out, "--truth", os.path.join(sim, "truth.csv"), "--json"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                met = json.loads(ev.stdout.strip().splitlines()[-1])
                summary = json.load(open(os.path.join(out, "summary.json")))
                row = {
                    "seed": seed,
                    "run": name,
                    "seconds": round(wall, 1),
                    "peak_rss_gb": round(rss, 2),
                    "w2": met["w2"],
                    "w1": met["w1"],
                    "regularisation": summary.get("regularisation"),
                }
                print(json.dumps(row), flush=True)  # noqa: T201
                rows.append(row)
    result = {
        "benchmark": "two_cv",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "n_images": a.n_images,
        "case": "two-hinge, ring truth, 48 px at 2 A/px, SNR 0.05; W in degrees",
        "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
