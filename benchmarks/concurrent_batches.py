"""Concurrent batches (issue 18, item 4): the tabulation's batches one at a time against
``batch_workers()`` at a time, in the same process, on the same problem.

The eager loops that tabulate batch by batch (``cryosip.sip.operator.imap_ordered``: the
33-node Gram table, the d-CV log-likelihood table, the calibration's renders, the bootstrap
replicates) run their batches on threads: JAX's CPU client runs concurrent calls of a compiled
program in parallel, and the projector's loop over cache-sized chunks of images is
single-threaded. This times ``TabulatedOperator.build`` (the default 1-D path: every image
rendered at 33 CV nodes, Gram tables) on the calibrated problem of a ``cryosip simulate``
folder, alternating ``CRYOSIP_BATCH_WORKERS=1`` and the default rule, after one warm-up build
of each (compilation out of the timing), and checks that the tables are identical.

    python benchmarks/concurrent_batches.py --data SIM          # a cryosip simulate folder
    python benchmarks/concurrent_batches.py --data SIM --repeats 3 --workers 1 2 3 4
Writes benchmarks/results/concurrent_batches.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a cryosip simulate folder (particles.star)")
    ap.add_argument("--model", default="adk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--batch-size", type=int, default=16, help="images per call (reconstruct's 1-D table: 16)"
    )
    ap.add_argument(
        "--workers", type=int, nargs="+", default=None, help="default: 1 and batch_workers()"
    )
    ap.add_argument("--out", default=str(HERE / "results" / "concurrent_batches.json"))
    a = ap.parse_args(argv)

    import jax

    from cryosip import _atomic
    from cryosip.data.models import load_model_with_description
    from cryosip.data.particles import read_particles
    from cryosip.pipeline.problem import prepare
    from cryosip.sip.operator import batch_workers
    from cryosip.sip.table import TabulatedOperator

    stack = read_particles(Path(a.data) / "particles.star")
    model, _ = load_model_with_description([a.model])
    problem = prepare(stack, model, progress=False, use_table=False)  # the direct operator
    op, obs = problem.operator, problem.observations
    default = batch_workers()
    counts = a.workers or sorted({1, default})

    def build(workers: int):
        os.environ["CRYOSIP_BATCH_WORKERS"] = str(workers)
        t0 = time.perf_counter()
        tab = TabulatedOperator.build(op, obs, 33, batch_size=a.batch_size)
        jax.block_until_ready(tab.gram)
        return time.perf_counter() - t0, np.asarray(tab.gram)

    grams = {w: build(w)[1] for w in counts}  # warm-up: compiled programs out of the timing
    same = all(np.array_equal(grams[w], grams[counts[0]]) for w in counts)
    seconds = {w: [] for w in counts}
    for _ in range(a.repeats):  # alternating, so that the load hits every count alike
        for w in counts:
            seconds[w].append(round(build(w)[0], 2))
    os.environ.pop("CRYOSIP_BATCH_WORKERS", None)
    median = {w: float(np.median(seconds[w])) for w in counts}
    renders = len(obs) * 33
    result = {
        "benchmark": "concurrent_batches",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": jax.default_backend(),
        "data": str(a.data),
        "n_images": len(obs),
        "nodes": 33,
        "batch_size": a.batch_size,
        "renders": renders,
        "default_workers": default,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "tables_identical": bool(same),
        "seconds": {str(w): s for w, s in seconds.items()},
        "median_seconds": {str(w): m for w, m in median.items()},
        "renders_per_second": {str(w): round(renders / m) for w, m in median.items()},
        "speedup_over_one_worker": {str(w): round(median[1] / m, 2) for w, m in median.items()}
        if 1 in median
        else None,
    }
    _atomic.write_json(a.out, result)
    for w in counts:
        print(f"{w} worker(s): {median[w]:.2f} s ({renders / median[w]:.0f} renders/s)")
    print(f"tables identical: {same}")


if __name__ == "__main__":
    main()
