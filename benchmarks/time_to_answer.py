"""Time to answer: a streamed reconstruction on 1 process vs 2 cooperating processes.

Question: how long does ``cryosip reconstruct --stream`` take from a particle stack on disk to
the recovered distribution, and what does a second process (``--coordinator ...
--num-processes 2``: each process reads its own half of every minibatch, gradients summed by
gloo collectives) buy? Compared against: the same command, data, seed and settings on one
process. Each process gets one CPU thread (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``) and, where ``taskset`` exists, its own core, so 2 processes
use 2 cores and 1 process uses 1.

Per size (AdK C-alpha, bimodal truth, 64 px, 1.5 A/px, SNR 0.1, ``cryosip simulate``):
simulate once, then reconstruct with 1 and with 2 processes, and score with
``cryosip evaluate --truth``. Reported per run: wall time of the command (start-up,
calibration and pilot, flow, outputs), the flow's own seconds, images/s through the flow
(steps x batch / flow seconds), peak RSS of each process (``ru_maxrss``), W1 to the truth, and
the load average around the run (other jobs on the machine slow every number down; the JSON
says so).

    python benchmarks/time_to_answer.py                              # 10^4 and 10^5 images
    python benchmarks/time_to_answer.py --sizes 10000 --steps 40     # quick
    python benchmarks/time_to_answer.py --sizes 1000000              # needs ~17 GB of disk

Writes ``benchmarks/results/time_to_answer.json`` (atomic replace; sizes not rerun are kept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "time_to_answer.json"
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_THREAD)
    return env


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rss_json: str, argv: list[str]) -> int:
    """Run ``cryosip`` in this process and record its peak RSS and wall time."""
    from cryosip.cli.main import main

    t0 = time.perf_counter()
    rc = main(argv)
    Path(rss_json).write_text(
        json.dumps(
            {
                "rc": rc,
                "wall_seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    return rc


def _launch(argv, rss_json, log, cpu):
    cmd = [sys.executable, __file__, "--child", str(rss_json), "--", *argv]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    f = open(log, "w")  # noqa: SIM115 - closed after wait
    p = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    return p, f


def simulate(n: int, out: Path, seed: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cryosip.cli.main",
            "simulate",
            "--dataset",
            "adk-ca",
            "--distribution",
            "bimodal",
            "--n-images",
            str(n),
            "--box",
            "64",
            "--pixel-size",
            "1.5",
            "--snr",
            "0.1",
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--no-progress",
        ],
        env={**_env(), "XLA_FLAGS": ""},  # simulation is not what is compared: all cores
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def reconstruct(sim: Path, out: Path, n_proc: int, args) -> dict:
    for stale in [out, *out.parent.glob(f"{out.name}-p*")]:  # a kept --workdir's earlier run
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    base = [
        "reconstruct",
        str(sim / "particles.star"),
        "--model",
        "adk-ca",
        "--objective",
        "kl",
        "--stream",
        "--batch-size",
        str(args.batch_size),
        "--n-particles",
        str(args.n_particles),
        "--steps",
        str(args.steps),
        "--seed",
        "0",
        "--no-progress",
    ]
    cpus = _cpus()
    port = _free_port()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    procs = []
    for i in range(n_proc):
        extra = ["--out", str(out if i == 0 else out.parent / f"{out.name}-p{i}")]
        if n_proc > 1:
            extra += [
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n_proc),
                "--process-id",
                str(i),
            ]
        cpu = cpus[i % len(cpus)] if len(cpus) >= n_proc else None
        procs.append(
            _launch(
                base + extra,
                out.parent / f"{out.name}-p{i}.rss.json",
                out.parent / f"{out.name}-p{i}.log",
                cpu,
            )
        )
    rcs = []
    for p, f in procs:
        rcs.append(p.wait())
        f.close()
    wall = time.perf_counter() - t0
    if any(rcs):
        log = (out.parent / f"{out.name}-p0.log").read_text()[-3000:]
        raise RuntimeError(f"reconstruct with {n_proc} processes failed ({rcs}):\n{log}")
    per = [
        json.loads((out.parent / f"{out.name}-p{i}.rss.json").read_text()) for i in range(n_proc)
    ]
    summary = json.loads((out / "summary.json").read_text())
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "cryosip.cli.main",
            "evaluate",
            str(out),
            "--truth",
            str(sim / "truth.csv"),
            "--json",
        ],
        env=_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    w1 = json.loads(ev.stdout.strip().splitlines()[-1])["w1"]
    flow_s = float(summary["seconds"])
    return {
        "processes": n_proc,
        "wall_seconds": round(wall, 2),
        "flow_seconds": round(flow_s, 2),
        "setup_seconds": round(float(summary.get("setup_seconds", float("nan"))), 2),
        "images_per_second_flow": round(args.steps * args.batch_size / flow_s, 1),
        "images_per_second_wall": round(args.steps * args.batch_size / wall, 1),
        "peak_rss_mb_per_process": [round(r["peak_rss_mb"], 1) for r in per],
        "w1_to_truth": round(float(w1), 5),
        "mean_cv": summary.get("cv_mean"),
        "pinned_cpus": bool(shutil.which("taskset")) and len(cpus) >= n_proc,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated numbers of images")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-particles", type=int, default=32)
    p.add_argument("--workdir", default=None, help="where stacks go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the simulated stacks")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    nprocs = [int(s) for s in args.processes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cryosip-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    import jax

    results.update(
        benchmark="time_to_answer",
        date=datetime.date.today().isoformat(),
        machine={
            "cpu_count": os.cpu_count(),
            "cpus_available": len(_cpus()),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        settings={
            "dataset": "adk-ca (214 atoms), bimodal truth",
            "box": 64,
            "pixel_size_A": 1.5,
            "snr": 0.1,
            "objective": "kl",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "n_particles": args.n_particles,
            "threads_per_process": 1,
            "xla_flags": ONE_THREAD,
        },
    )
    try:
        for n in sizes:
            sim = work / f"sim-{n}"
            entry = {"n_images": n}
            if not (sim / "particles.star").exists():
                entry["simulate_seconds_all_cores"] = round(simulate(n, sim, 0), 1)
            for k in nprocs:
                r = reconstruct(sim, work / f"rec-{n}-{k}p", k, args)
                entry[f"{k}_process" + ("es" if k > 1 else "")] = r
                print(json.dumps({"n_images": n, **r}), flush=True)  # noqa: T201
            runs = [entry[key] for key in entry if key.endswith(("process", "processes"))]
            if len(runs) == 2:
                entry["speedup_flow"] = round(runs[0]["flow_seconds"] / runs[1]["flow_seconds"], 2)
                entry["speedup_wall"] = round(runs[0]["wall_seconds"] / runs[1]["wall_seconds"], 2)
            # before each run only: the load after a run is the run's own processes
            loads = [x for r in runs for x in r["loadavg_before"][:1]]
            entry["under_load"] = max(loads) > 0.5 * len(_cpus()) + 0.5
            entry["note"] = (
                "other jobs ran on the same cores during these runs (load average above); "
                "timings are slower and noisier than on an idle machine"
                if entry["under_load"]
                else "machine otherwise idle"
            )
            results["runs"][str(n)] = entry
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            tmp = RESULTS.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(tmp, RESULTS)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
