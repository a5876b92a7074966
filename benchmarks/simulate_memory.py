"""Peak memory and wall time of `cryosip simulate` on a large stack (target: < 2 GB at 10^5 images).

Question: does `cryosip simulate` stream, i.e. keep memory flat in the number of images? It runs
the CLI in a child process (as a user would) and records the child's peak resident set size
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time. Compared against: the 2 GB
target of issue 3, and the size of the stack it writes (10^5 images of 64^2 float32 = 1.6 GB,
which could not fit together with the JAX runtime if it were held in memory).

    $ python benchmarks/simulate_memory.py                      # 10^5 adk-ca images at 64 px
    $ python benchmarks/simulate_memory.py --n-images 20000     # a shorter run

Writes ``benchmarks/results/simulate_memory.json``; the simulated data go to a temporary
folder that is deleted afterwards (``--keep DIR`` keeps them there instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_MB = 2048.0


def setup(n_images: int, dataset: str, box: int, pixel_size: float, out: Path) -> list[str]:
    """The command line of one run."""
    return [
        sys.executable,
        "-m",
        "cryosip.cli.main",
        "simulate",
        "--dataset",
        dataset,
        "--distribution",
        "bimodal",
        "--n-images",
        str(n_images),
        "--box",
        str(box),
        "--pixel-size",
        str(pixel_size),
        "--snr",
        "0.1",
        "--seed",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=100_000)
    p.add_argument("--dataset", default="adk-ca")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--keep", type=Path, help="write the simulation here and keep it")
    p.add_argument("--results", type=Path, default=HERE / "results" / "simulate_memory.json")
    a = p.parse_args(argv)

    tmp = None
    if a.keep is None:
        tmp = tempfile.mkdtemp(prefix="cryosip-simmem-")
        out = Path(tmp) / "sim"
    else:
        out = a.keep
    cmd = setup(a.n_images, a.dataset, a.box, a.pixel_size, out)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        cfg = json.loads((out / "config.json").read_text())
        disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    peak_mb = peak_kb / 1024.0
    result = {
        "benchmark": "simulate_memory",
        "command": " ".join(["cryosip", *cmd[3:-2], "--out", "DIR"]),
        "dataset": a.dataset,
        "n_images": a.n_images,
        "box_size": a.box,
        "pixel_size": a.pixel_size,
        "chunk_size": cfg["chunk_size"],
        "n_atoms": cfg["derived"]["n_atoms"],
        "peak_rss_mb": round(peak_mb, 1),
        "peak_rss_mb_before_run": round(before / 1024.0, 1),
        "target_mb": TARGET_MB,
        "below_target": peak_mb < TARGET_MB,
        "wall_seconds": round(wall, 1),
        "images_per_second": round(a.n_images / wall, 1),
        "written_bytes": disk,
        "stack_bytes_if_in_memory": a.n_images * a.box * a.box * 4,
        "sigma": cfg["derived"]["sigma"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": cfg["derived"]["jax_version"],
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["below_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
