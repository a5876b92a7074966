"""Peak and retained memory of reading a large RELION STAR file (issue 18: flat memory per process).

Question: how much of a streamed reconstruction's memory grows with the number of images because
of the particle metadata? A streamed run holds no images, so what grows from 10^4 to 10^6 images
is what ``read_particles`` keeps (the STAR table, the per-particle pose/CTF arrays, the image
locations) and what parsing leaves in the heap. This benchmark writes a synthetic RELION 3.1 STAR
file (poses, shifts in Angstrom, defocus U/V/angle, micrograph names, optics group; image names
spread over 100 small real stacks of 10^4 4-pixel images) and, in a fresh child process per size,
records the resident set size (RSS) after importing cryosip and starting JAX, the peak RSS
during ``read_particles`` (``ru_maxrss``), the RSS it keeps afterwards with the stack alive, and
the RSS kept once the particle table is dropped (as ``run_streamed`` does: a streamed run writes
no per-image table). ``PYTHONPATH=<other checkout>/src`` measures another version's reader.

    $ python benchmarks/star_memory.py                     # 10^4 and 10^6 rows
    $ python benchmarks/star_memory.py --rows 10000 100000
    $ python benchmarks/star_memory.py --reconstruct 1 --label after_reconstruct   # + a short
          # streamed `cryosip reconstruct` per size (32-px stacks, 400 MB), its peak RSS

Writes ``benchmarks/results/star_memory.json`` (``--label`` names the run, e.g. before/after a
change; earlier labels in the file are kept).
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

import numpy as np

HERE = Path(__file__).resolve().parent
N_STACKS = 100
PER_STACK = 10_000
BOX = 4

CHILD = r"""
import json, os, resource, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import cryosip.data.star, cryosip.data.particles, jax.numpy
from cryosip.data.particles import read_particles
jax.numpy.zeros(1).block_until_ready()  # the JAX runtime every run starts
base = rss_mb()
t0 = time.perf_counter()
stack = read_particles(sys.argv[1], require_poses=True)
dt = time.perf_counter() - t0
meta = stack.metadata
meta_mb = None if meta is None else float(meta.memory_usage(deep=True).sum()) / 2**20
kept = rss_mb()
# what a streamed run keeps: run_streamed drops the particle table (no per-image outputs)
stack.metadata = meta = None
try:
    from cryosip.data.star import release_freed_memory
    release_freed_memory()
except ImportError:  # before issue 18's change
    pass
print(json.dumps({
    "rss_after_imports_mb": base,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_after_read_mb": kept,
    "rss_without_table_mb": rss_mb(),
    "read_seconds": dt,
    "n": len(stack),
    "metadata_mb": meta_mb,
}))
"""


def write_stacks(folder: Path, n_stacks: int = N_STACKS, box: int = BOX) -> None:
    import mrcfile

    (folder / "Particles").mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).normal(size=(PER_STACK, box, box)).astype(np.float32)
    for k in range(n_stacks):
        with mrcfile.new(folder / "Particles" / f"stack_{k:03d}.mrcs", overwrite=True) as m:
            m.set_data(data)
            m.set_image_stack()
            m.voxel_size = 1.5


def write_star(path: Path, n: int, n_stacks: int = N_STACKS, box: int = BOX) -> None:
    """A RELION 3.1 particle file with ``n`` rows (written line by line: small memory)."""
    rng = np.random.default_rng(1)
    labels = [
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnCtfBfactor",
        "rlnCtfScalefactor",
        "rlnPhaseShift",
        "rlnImageName",
        "rlnMicrographName",
        "rlnOpticsGroup",
        "rlnClassNumber",
        "rlnRandomSubset",
    ]
    with open(path, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n")
        optics = "OpticsGroupName OpticsGroup MicrographOriginalPixelSize Voltage "
        optics += (
            "SphericalAberration AmplitudeContrast ImagePixelSize ImageSize ImageDimensionality"
        )
        for i, c in enumerate("rln" + w for w in optics.split()):
            f.write(f"_{c} #{i + 1}\n")
        f.write(f"opticsGroup1 1 0.75 300.0 2.7 0.1 1.5 {box} 2\n\n\n")
        f.write("# version 30001\n\ndata_particles\n\nloop_\n")
        for i, c in enumerate(labels):
            f.write(f"_{c} #{i + 1}\n")
        chunk = 100_000
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            i = np.arange(s, s + m)
            cx, cy = rng.uniform(0, 4000, (2, m))
            rot, psi = rng.uniform(-180, 180, (2, m))
            tilt = rng.uniform(0, 180, m)
            ox, oy = rng.normal(0, 3, (2, m))
            du = rng.uniform(5000, 25000, m)
            dv = du - rng.uniform(0, 500, m)
            da = rng.uniform(0, 180, m)
            cls = rng.integers(1, 4, m)
            half = i % 2 + 1
            lines = [
                f"{cx[j]:12.6f} {cy[j]:12.6f} {rot[j]:12.6f} {tilt[j]:12.6f} {psi[j]:12.6f} "
                f"{ox[j]:12.6f} {oy[j]:12.6f} {du[j]:12.6f} {dv[j]:12.6f} {da[j]:12.6f} "
                f"0.000000 1.000000 0.000000 "
                f"{(i[j] % PER_STACK) + 1:06d}@Particles/stack_{i[j] // PER_STACK % n_stacks:03d}.mrcs "
                f"MotionCorr/job002/Movies/mic_{i[j] // 200:06d}.mrc 1 {cls[j]} {half[j]}\n"
                for j in range(m)
            ]
            f.write("".join(lines))
        f.write("\n")


def reconstruct_peak(star: Path, out: Path) -> dict:
    """Peak RSS of a short streamed ``cryosip reconstruct`` on ``star`` (its own child)."""
    cmd = [sys.executable, "-m", "cryosip.cli.main", "reconstruct", str(star), "--model", "adk"]
    cmd += ["--stream", "--steps", "3", "--batch-size", "64", "--pilot-images", "128"]
    cmd += ["--no-progress", "--seed", "0", "--overwrite", "--out", str(out)]
    t0 = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": time.perf_counter() - t0}


def measure(star: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(star)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--label", default="current")
    p.add_argument("--keep", type=Path, help="write the STAR files and stacks here and keep them")
    p.add_argument("--results", type=Path, default=HERE / "results" / "star_memory.json")
    p.add_argument(
        "--reconstruct",
        type=int,
        default=0,
        metavar="K",
        help="also run K short streamed reconstructions per size (32-px stacks) for their peak RSS",
    )
    a = p.parse_args(argv)

    sys.path.insert(0, str(HERE.parent / "src"))
    from cryosip import _atomic

    folder = a.keep or Path(tempfile.mkdtemp(prefix="cryosip-starmem-"))
    # a reconstruction needs a box that holds the model: 10 stacks of 10^4 32-px images (400 MB),
    # each image named 10 times at 10^6 rows
    n_stacks, box = (10, 32) if a.reconstruct else (N_STACKS, BOX)
    root, folder = folder, folder / f"{n_stacks}x{box}px"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "Particles" / f"stack_{n_stacks - 1:03d}.mrcs").exists():
        write_stacks(folder, n_stacks, box)
    runs = []
    for n in a.rows:
        star = folder / f"particles_{n}.star"
        if not star.exists():
            write_star(star, n, n_stacks, box)
        r = measure(star)
        if a.reconstruct:
            runs_e2e = [reconstruct_peak(star, folder / f"out_{n}") for _ in range(a.reconstruct)]
            r["reconstruct"] = runs_e2e
            r["reconstruct_median_peak_rss_mb"] = float(
                np.median([x["peak_rss_mb"] for x in runs_e2e])
            )
            print(f"  streamed reconstruct peak RSS {r['reconstruct_median_peak_rss_mb']:.0f} MB")
        r.update(rows=n, star_mb=star.stat().st_size / 2**20)
        r["peak_over_imports_mb"] = r["peak_rss_mb"] - r["rss_after_imports_mb"]
        r["kept_over_imports_mb"] = r["rss_after_read_mb"] - r["rss_after_imports_mb"]
        r["kept_streamed_over_imports_mb"] = r["rss_without_table_mb"] - r["rss_after_imports_mb"]
        print(
            f"{n:>9,} rows ({r['star_mb']:.0f} MB STAR): peak {r['peak_rss_mb']:.0f} MB "
            f"(+{r['peak_over_imports_mb']:.0f} over imports), kept {r['rss_after_read_mb']:.0f} MB "
            f"(+{r['kept_over_imports_mb']:.0f}; +{r['kept_streamed_over_imports_mb']:.0f} without "
            f"the table, as a streamed run), read {r['read_seconds']:.1f} s",
            flush=True,
        )
        runs.append(r)
    if a.keep is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    results = {}
    if a.results.exists():
        try:
            results = json.loads(a.results.read_text())
        except ValueError:
            results = {}
    results.setdefault("runs", {})[a.label] = {
        "rows": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip(),
    }
    results["question"] = (
        "peak and kept RSS of read_particles on a synthetic RELION 3.1 STAR file, 10^4 vs 10^6 rows"
    )
    results["machine"] = platform.platform()
    _atomic.write_json(a.results, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
