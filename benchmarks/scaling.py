"""Scaling: streaming memory, the cost model of one WGF step, and cryosip vs a cryojax-backed operator.

Questions and what each part compares against:

* ``memory``: does streaming keep the peak RSS flat in the number of images? Random noise
  stacks of 10^4, 10^5 and 10^6 images at 64 px (0.16, 1.6 and 16 GB) are written to disk with
  ``MrcsWriter``; a child process per stack streams the same number of random 256-image
  minibatches (``MinibatchStream``: prefetch thread, ``os.preadv`` reads) and reports its peak
  RSS (``VmHWM``), against (i) the stack's size (holding it in memory) and (ii) naive
  ``memmap[idx]`` minibatches (``release_pages=False``), whose mapped file pages stay in the RSS.
* ``cost``: seconds of one WGF step (the engine's compiled step, ``flow.run``) on the direct
  ``CryoEMOperator`` against images per step, particles, box size and atom count (AdK all-atom
  vs C-alpha), for ``kl`` and ``mmd`` (paired, noise-averaged); log-log exponents fitted per
  sweep; at the base configuration the step is broken down into simulate (the B x P noise-free
  images), gradient (value_and_grad minus the forward objective), kernel/likelihood (the
  objective from precomputed images), flow update/host, and I/O (reading B images from a
  memory-mapped stack, overlapped by the prefetch thread when streaming).
* ``e2e``: one WGF step of the AdK ``kl`` and ``mmd`` objectives (64 px, 2 A/px, all-atom,
  direct operator), same engine and settings, with ``CryoEMOperator`` vs ``CryojaxOperator``
  (``default`` and ``fastest`` integrators), timed in interleaved rounds in one process; the
  issue's target is cryosip >= 10x faster.
* ``w1``: a short identical reconstruction (AdK C-alpha, 32 px, bimodal truth, WGF-KL, same
  data, init, keys and flow) with both operators: W1 between the two answers against W1 between
  two cryosip runs on independent data sets (the noise scale).

    python benchmarks/scaling.py                        # every part (the 10^6 stack needs ~17 GB of disk)
    python benchmarks/scaling.py --part memory --sizes 10000,100000
    python benchmarks/scaling.py --part cost --quick
    python benchmarks/scaling.py --report               # figure + markdown table from the JSON

Writes ``benchmarks/results/scaling.json`` (atomic replace; a run of some parts keeps the others)
and ``docs/figures/scaling/scaling.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "scaling.json"
FIGURE = ROOT / "docs" / "figures" / "scaling" / "scaling.png"
PARTS = ("memory", "cost", "e2e", "w1")
SIGMA = 0.05  # image noise sd (the contrast images are ~0.01-0.1)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _log(*a):
    print(*a, flush=True)


def _proc_status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def _fit_exponent(x, t) -> float:
    x, t = np.log(np.asarray(x, float)), np.log(np.asarray(t, float))
    return float(np.polyfit(x, t, 1)[0])


def _machine() -> dict:
    import jax

    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_average=list(os.getloadavg()),
        jax_devices=[str(d) for d in jax.devices()],
    )


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def write_noise_stack(path: Path, n: int, box: int = 64, chunk: int = 4096) -> float:
    """A stack of ``n`` noise images (one random chunk, shifted per chunk: not realistic, not needed)."""
    from cryosip.data.mrc import MrcsWriter

    t0 = time.perf_counter()
    base = np.random.default_rng(0).standard_normal((chunk, box, box), dtype=np.float32)
    with MrcsWriter(path, n, box, 2.0) as w:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            w.write(base[:m] + np.float32((s // chunk) % 11))
    return time.perf_counter() - t0


def _rss_child(path: str, batch: int, n_batches: int, mode: str) -> None:
    """Child process: stream ``n_batches`` minibatches and print the memory it used (JSON)."""
    import jax

    from cryosip.data.mrc import read_mrcs
    from cryosip.data.streaming import MinibatchStream

    mm = read_mrcs(path)
    jax.block_until_ready(jax.numpy.zeros(1))
    base = _proc_status()
    peak_anon = peak_file = 0.0
    t0 = time.perf_counter()
    stream = MinibatchStream(
        mm, batch, jax.random.key(0), prefetch=2, release_pages=(mode == "stream")
    )
    checksum = 0.0
    with stream:
        for _, b in zip(range(n_batches), stream):
            checksum += float(b.values[0, 0, 0])
            st = _proc_status()
            peak_anon, peak_file = max(peak_anon, st["RssAnon"]), max(peak_file, st["RssFile"])
    seconds = time.perf_counter() - t0
    end = _proc_status()
    print(
        json.dumps(
            dict(
                baseline_rss_mb=base["VmRSS"],
                peak_rss_mb=end["VmHWM"],
                peak_anon_mb=peak_anon,
                peak_file_mb=peak_file,
                seconds=seconds,
                read_seconds=stream.read_seconds,
                wait_seconds=stream.wait_seconds,
                images=n_batches * batch,
            )
        )
    )


def run_memory(
    sizes, batch: int, n_batches: int, workdir: Path | None, keep: bool, naive_max: int
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="cryosip-scaling-", dir=workdir))
    rows = []
    try:
        for n in sizes:
            path = tmp / f"noise_{n}.mrcs"
            gen = write_noise_stack(path, n)
            _log(f"memory: wrote {n} images ({path.stat().st_size / 2**30:.2f} GiB) in {gen:.1f} s")
            row = dict(
                n_images=n,
                box_size=64,
                stack_gib=path.stat().st_size / 2**30,
                write_seconds=gen,
                batch_size=batch,
                n_batches=n_batches,
            )
            for mode in ("stream", "naive"):
                if mode == "naive" and n > naive_max:
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--_rss-child",
                    str(path),
                    str(batch),
                    str(n_batches),
                    mode,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                _log(
                    f"memory: n={n:>8d} {mode:6s} peak RSS {row[mode]['peak_rss_mb']:.0f} MB "
                    f"(baseline {row[mode]['baseline_rss_mb']:.0f}), {row[mode]['seconds']:.1f} s"
                )
            rows.append(row)
            if not keep:
                path.unlink()
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    inc = [r["stream"]["peak_rss_mb"] - r["stream"]["baseline_rss_mb"] for r in rows]
    return dict(
        rows=rows,
        stream_rss_increase_mb=inc,
        description="peak RSS (VmHWM) of a child streaming the same number of random minibatches "
        "from each stack; 'naive' = memmap[idx] without releasing mapped pages",
    )


# ---------------------------------------------------------------------------------------------
# problems shared by cost / e2e / w1
# ---------------------------------------------------------------------------------------------
_MODELS: dict = {}


def _model(structure: str):
    from cryosip.data.adk import adk_model

    if structure not in _MODELS:
        _MODELS[structure] = adk_model(ca_only=(structure == "adk_ca"))
    return _MODELS[structure]


def make_problem(
    structure: str,
    box: int,
    n_images: int,
    seed: int = 0,
    field_of_view: float = 128.0,
    truth=None,
    sigma: float = SIGMA,
):
    """(CryoEMOperator, Observations, true CVs) of AdK images at ``box`` px over ``field_of_view`` A."""
    import equinox as eqx
    import jax

    from cryosip.cryoem.image_model import ImageModel, NuisancePrior
    from cryosip.pipeline.operator import CryoEMOperator
    from cryosip.sip.operator import Observations

    model = _model(structure)
    pixel = field_of_view / box
    prior = NuisancePrior(shift_sd_in_angstroms=3.0)
    op = CryoEMOperator(model, ImageModel.for_atoms(box, pixel, model.atoms), sigma, prior)

    @eqx.filter_jit
    def draw(op, key):
        k1, k2, k3 = jax.random.split(key, 3)
        nu = op.sample_nuisance(k1, n_images)
        if truth is None:
            th = jax.random.uniform(k2, (n_images, 1))
        else:
            th = truth(k2, n_images)
        return th, nu, op.sample(k3, th, nu)

    th, nu, y = draw(op, jax.random.key(seed))
    return op, Observations(y, nu), th, prior, pixel


def _disc(objective: str):
    from cryosip.sip.discrepancies import KL, GaussianKernel, PairedMMD

    # bandwidth ~ the noise norm (sigma * D): the paired kernel score's natural scale
    return KL() if objective == "kl" else PairedMMD(GaussianKernel(1.0))


def step_timer(op, obs, objective: str, n_particles: int, n_steps: int = 2):
    """A function running ``n_steps`` WGF steps (warm: compiled on first call); returns seconds per step."""
    import jax
    import jax.numpy as jnp

    from cryosip.sip.flow import WassersteinGradientFlow
    from cryosip.sip.measure import ParticleMeasure

    disc = _disc(objective)
    init = ParticleMeasure(jnp.linspace(0.05, 0.95, n_particles)[:, None])
    flow = WassersteinGradientFlow(
        step_size=1e-4, n_steps=n_steps, chunk_size=n_steps, schedule="constant"
    )

    def run():
        t0 = time.perf_counter()
        res = flow.run(disc, op, obs, init, key=jax.random.key(1))
        jax.block_until_ready(res.measure.positions)
        return (time.perf_counter() - t0) / n_steps

    return run


# ---------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------
def breakdown(op, obs, objective: str, n_particles: int, reps: int) -> dict:
    """Seconds of the pieces of one step at one configuration."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from cryosip.sip.discrepancies import kl, paired_kernel_score
    from cryosip.sip.measure import ParticleMeasure

    disc = _disc(objective)
    pos = jnp.linspace(0.05, 0.95, n_particles)[:, None]
    logw = jnp.full((n_particles,), -jnp.log(n_particles))

    @eqx.filter_jit
    def simulate(op, pos, obs):
        return op.paired_means(pos, obs)  # (B, P, D, D)

    @eqx.filter_jit
    def objective_value(op, pos, obs):
        return disc(jax.random.key(0), op, ParticleMeasure(pos), obs)

    @eqx.filter_jit
    def value_and_grad(op, pos, obs):
        return jax.value_and_grad(lambda p: disc(jax.random.key(0), op, ParticleMeasure(p), obs))(
            pos
        )

    @eqx.filter_jit
    def from_images(op, ms, obs):
        if objective == "kl":
            ll = jax.vmap(lambda y, m: jax.vmap(lambda mi: op.noise.log_likelihood(y, mi))(m))(
                obs.values, ms
            )
            return kl(ll, logw, obs.weight)
        B, P = ms.shape[:2]
        mv = ms.reshape(B, P, -1)
        yv = obs.values.reshape(B, -1)
        dy = jnp.sum((mv - yv[:, None]) ** 2, -1)
        sq = jnp.sum(mv * mv, -1)
        dmm = jnp.maximum(
            sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum("bpd,bqd->bpq", mv, mv), 0.0
        )
        return paired_kernel_score(
            dy, dmm, logw, op.noise.sigma, op.obs_size, disc.kernel.bandwidth, obs.weight
        )

    ms = jax.block_until_ready(simulate(op, pos, obs))
    fns = {
        "simulate": lambda: jax.block_until_ready(simulate(op, pos, obs)),
        "objective": lambda: jax.block_until_ready(objective_value(op, pos, obs)),
        "value_and_grad": lambda: jax.block_until_ready(value_and_grad(op, pos, obs)),
        "kernel_likelihood": lambda: jax.block_until_ready(from_images(op, ms, obs)),
    }
    step = step_timer(op, obs, objective, n_particles)
    for f in fns.values():
        f()
    step()
    t = {k: [] for k in (*fns, "step")}
    for _ in range(reps):  # interleaved rounds
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - t0)
        t["step"].append(step())
    med = {k: statistics.median(v) for k, v in t.items()}
    return dict(
        seconds=med,
        gradient=max(med["value_and_grad"] - med["objective"], 0.0),
        update_and_host=max(med["step"] - med["value_and_grad"], 0.0),
    )


def io_seconds(batch: int, reps: int = 20) -> float:
    """Median seconds to read ``batch`` random 64 px images from a 4096-image memory-mapped stack."""
    import jax

    from cryosip.data.mrc import read_mrcs
    from cryosip.data.streaming import MinibatchStream, epoch_batches

    with tempfile.TemporaryDirectory(prefix="cryosip-io-") as d:
        path = Path(d) / "io.mrcs"
        write_noise_stack(path, 4096)
        stream = MinibatchStream(read_mrcs(path), batch, jax.random.key(0))
        idx, w = epoch_batches(jax.random.key(1), 4096, batch)
        ts = []
        for r in range(min(reps, idx.shape[0])):
            t0 = time.perf_counter()
            jax.block_until_ready(stream.read(idx[r], w[r]))
            ts.append(time.perf_counter() - t0)
        stream.close()
    return statistics.median(ts)


def run_cost(quick: bool, reps: int) -> dict:
    base = dict(structure="adk_all", box=64, images=16, particles=8)
    sweeps = {
        "images": [8, 16, 32, 64] if not quick else [8, 16, 32],
        "particles": [4, 8, 16] if not quick else [4, 8],
        "box": [32, 64, 128] if not quick else [32, 64],
        "atoms": ["adk_ca", "adk_all"],
    }
    configs = []
    for var, values in sweeps.items():
        for v in values:
            c = dict(base)
            c[
                {"images": "images", "particles": "particles", "box": "box", "atoms": "structure"}[
                    var
                ]
            ] = v
            configs.append(c)
    unique = []
    for c in configs:
        if c not in unique:
            unique.append(c)
    rows = []
    problems = {}
    for c in unique:
        key = (c["structure"], c["box"], c["images"])
        if key not in problems:
            problems[key] = make_problem(c["structure"], c["box"], c["images"])
        op, obs = problems[key][:2]
        for objective in ("kl", "mmd"):
            run = step_timer(op, obs, objective, c["particles"])
            t0 = time.perf_counter()
            run()
            compile_s = time.perf_counter() - t0
            ts = [run() for _ in range(reps)]
            row = dict(
                c,
                objective=objective,
                n_atoms=int(op.conformation.atoms.n_atoms),
                step_seconds=statistics.median(ts),
                step_seconds_min=min(ts),
                step_seconds_all=ts,
                first_call_seconds=compile_s,
            )
            rows.append(row)
            _log(
                f"cost: {objective:3s} {c['structure']:7s} {c['box']:4d} px B={c['images']:3d} P={c['particles']:3d}"
                f"  {row['step_seconds']:.3f} s/step"
            )
    exps = {}
    for objective in ("kl", "mmd"):
        sel = [r for r in rows if r["objective"] == objective]
        for var, field in (("images", "images"), ("particles", "particles"), ("box", "box")):
            pts = [
                (r[field], r["step_seconds"])
                for r in sel
                if all(
                    r[k] == base[k]
                    for k in ("structure", "box", "images", "particles")
                    if k != field
                )
            ]
            pts.sort()
            exps[f"{objective}_{var}"] = _fit_exponent(*zip(*pts))
        pts = sorted(
            (r["n_atoms"], r["step_seconds"])
            for r in sel
            if r["box"] == base["box"]
            and r["images"] == base["images"]
            and r["particles"] == base["particles"]
        )
        exps[f"{objective}_atoms"] = _fit_exponent(*zip(*pts))
    _log("cost: exponents " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items()))
    # breakdown at the base configuration
    op, obs = problems[(base["structure"], base["box"], base["images"])][:2]
    io = io_seconds(base["images"])
    bd = {}
    for objective in ("kl", "mmd"):
        b = breakdown(op, obs, objective, base["particles"], reps)
        b["io_read"] = io
        bd[objective] = b
        s = b["seconds"]
        _log(
            f"cost: breakdown {objective}: step {s['step']:.3f} s = simulate {s['simulate']:.3f} + gradient "
            f"{b['gradient']:.3f} + kernel/likelihood {s['kernel_likelihood']:.4f} + ...; io {io * 1e3:.2f} ms"
        )
    return dict(
        base=base,
        sweeps=sweeps,
        rows=rows,
        exponents=exps,
        breakdown=bd,
        description="seconds per WGF step (median of warm calls of flow.run with 2 steps) on "
        "CryoEMOperator; AdK, 128 A field of view",
    )


# ---------------------------------------------------------------------------------------------
# end to end: cryosip vs cryojax-backed operator
# ---------------------------------------------------------------------------------------------
def run_e2e(images: int, particles: int, rounds: int) -> dict:
    from cryosip.pipeline.cryojax_operator import CryojaxOperator

    op, obs, _, prior, pixel = make_problem("adk_all", 64, images)
    ops = {"cryosip": op}
    for integ in ("fastest", "default"):
        ops[f"cryojax_{integ}"] = CryojaxOperator(
            op.conformation, 64, pixel, op.noise, prior, integrator=integ
        )
    out = {}
    for objective in ("kl", "mmd"):
        runs, first = {}, {}
        for name, o in ops.items():
            runs[name] = step_timer(o, obs, objective, particles)
            t0 = time.perf_counter()
            runs[name]()
            first[name] = time.perf_counter() - t0
            _log(f"e2e: {objective} {name} compiled + 2 steps in {first[name]:.1f} s")
        ts = {n: [] for n in ops}
        for _ in range(rounds):
            for n in ops:
                ts[n].append(runs[n]())
        med = {n: statistics.median(v) for n, v in ts.items()}
        best = {
            n: min(v) for n, v in ts.items()
        }  # least disturbed by other load on a shared machine
        out[objective] = dict(
            step_seconds=med,
            step_seconds_min=best,
            step_seconds_all=ts,
            first_call_seconds=first,
            speedup_vs_cryojax_default=med["cryojax_default"] / med["cryosip"],
            speedup_vs_cryojax_fastest=med["cryojax_fastest"] / med["cryosip"],
            speedup_vs_cryojax_default_min=best["cryojax_default"] / best["cryosip"],
            speedup_vs_cryojax_fastest_min=best["cryojax_fastest"] / best["cryosip"],
        )
        _log(
            f"e2e: {objective}: "
            + ", ".join(f"{n} {v:.3f} s" for n, v in med.items())
            + f"; cryosip x{out[objective]['speedup_vs_cryojax_default']:.1f} vs default, "
            f"x{out[objective]['speedup_vs_cryojax_fastest']:.1f} vs fastest"
        )
    return dict(
        structure="adk_all",
        n_atoms=int(op.conformation.atoms.n_atoms),
        box=64,
        pixel_size=pixel,
        images_per_step=images,
        particles=particles,
        rounds=rounds,
        n_spread_fastest=ops["cryojax_fastest"].n_spread,
        objectives=out,
        target="cryosip >= 10x faster than the cryojax-backed operator",
    )


# ---------------------------------------------------------------------------------------------
# same answer: W1 of a short reconstruction with both operators
# ---------------------------------------------------------------------------------------------
def run_w1(n_images: int, particles: int, n_steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from cryosip.analysis.metrics import w1
    from cryosip.pipeline.cryojax_operator import CryojaxOperator
    from cryosip.sip.discrepancies import KL
    from cryosip.sip.flow import WassersteinGradientFlow
    from cryosip.sip.measure import ParticleMeasure

    def truth(key, n):
        k1, k2 = jax.random.split(key)
        c = jax.random.bernoulli(k1, 0.4, (n, 1))
        return jnp.clip(jnp.where(c, 0.25, 0.75) + 0.05 * jax.random.normal(k2, (n, 1)), 0.0, 1.0)

    sigma = 0.02
    op, obs, th, prior, pixel = make_problem(
        "adk_ca", 32, n_images, seed=0, truth=truth, sigma=sigma
    )
    op_b, obs_b, th_b, _, _ = make_problem("adk_ca", 32, n_images, seed=1, truth=truth, sigma=sigma)
    cj = CryojaxOperator(op.conformation, 32, pixel, op.noise, prior)
    init = ParticleMeasure(jnp.linspace(0.05, 0.95, particles)[:, None])
    disc = KL()
    g = jax.grad(lambda p: disc(None, op, ParticleMeasure(p), obs))(init.positions)
    v = particles * np.linalg.norm(np.asarray(g), axis=-1)
    step = 0.01 / float(np.median(v[v > 0]))
    flow = WassersteinGradientFlow(
        step_size=step,
        n_steps=n_steps,
        chunk_size=n_steps,
        max_displacement=0.03,
        schedule="constant",
    )
    key = jax.random.key(3)
    res = {}
    t = {}
    for name, o, ob in (
        ("cryosip", op, obs),
        ("cryojax_default", cj, obs),
        ("cryosip_other_data", op_b, obs_b),
    ):
        t0 = time.perf_counter()
        r = flow.run(disc, o, ob, init, key=key)
        t[name] = time.perf_counter() - t0
        res[name] = np.asarray(r.measure.positions)[:, 0]
        _log(f"w1: {name} done in {t[name]:.1f} s: {np.round(np.sort(res[name]), 3)}")
    truth_sample = np.asarray(th)[:, 0]
    out = dict(
        structure="adk_ca",
        box=32,
        pixel_size=pixel,
        n_images=n_images,
        particles=particles,
        n_steps=n_steps,
        sigma=sigma,
        step_size=step,
        seconds=t,
        positions={k: v.tolist() for k, v in res.items()},
        w1_cryosip_vs_cryojax=w1(res["cryosip"], res["cryojax_default"]),
        w1_noise_scale_two_datasets=w1(res["cryosip"], res["cryosip_other_data"]),
        w1_to_truth={k: w1(v, truth_sample) for k, v in res.items()},
        w1_init_to_truth=w1(np.asarray(init.positions)[:, 0], truth_sample),
    )
    _log(
        f"w1: cryosip vs cryojax {out['w1_cryosip_vs_cryojax']:.2e}; two data sets {out['w1_noise_scale_two_datasets']:.2e}"
    )
    return out


# ---------------------------------------------------------------------------------------------
# report: figure and markdown
# ---------------------------------------------------------------------------------------------
def report(result: dict, figure: Path = FIGURE) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from cryosip._atomic import savefig

    lines = []
    cost = result.get("cost")
    mem = result.get("memory")
    n_panels = 4 + (mem is not None)
    fig, axes = plt.subplots(1, n_panels, figsize=(3.6 * n_panels, 3.4))
    if cost:
        base = cost["base"]
        spec = [
            ("images", "images", "images per step B"),
            ("particles", "particles", "particles P"),
            ("box", "box", "box size D (px)"),
            ("atoms", "n_atoms", "atoms"),
        ]
        for ax, (var, field, label) in zip(axes, spec):
            for objective, marker in (("kl", "o"), ("mmd", "s")):
                if var == "atoms":
                    pts = sorted(
                        (r["n_atoms"], r["step_seconds"])
                        for r in cost["rows"]
                        if r["objective"] == objective
                        and r["box"] == base["box"]
                        and r["images"] == base["images"]
                        and r["particles"] == base["particles"]
                    )
                else:
                    pts = sorted(
                        (r[field], r["step_seconds"])
                        for r in cost["rows"]
                        if r["objective"] == objective
                        and all(
                            r[k] == base[k]
                            for k in ("structure", "box", "images", "particles")
                            if k != field
                        )
                    )
                x, y = zip(*pts)
                e = cost["exponents"][f"{objective}_{var}"]
                ax.loglog(x, y, marker=marker, label=f"{objective}: slope {e:.2f}")
            ax.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))])  # the measured points
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("seconds per WGF step")
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_title(
            f"base: B={base['images']}, P={base['particles']}, {base['box']} px, AdK all-atom",
            fontsize=8,
        )
    if mem:
        ax = axes[-1]
        n = [r["n_images"] for r in mem["rows"]]
        ax.loglog(
            n, [r["stream"]["peak_rss_mb"] for r in mem["rows"]], "o-", label="streamed: peak RSS"
        )
        nv = [(r["n_images"], r["naive"]["peak_rss_mb"]) for r in mem["rows"] if "naive" in r]
        if nv:
            ax.loglog(*zip(*nv), "s--", label="memmap[idx]: peak RSS")
        ax.loglog(
            n, [r["stack_gib"] * 1024 for r in mem["rows"]], "k:", label="stack size (in memory)"
        )
        ax.set_xlabel("images in the stack (64 px)")
        ax.set_ylabel("MB")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(
            f"{mem['rows'][0]['n_batches']} minibatches of {mem['rows'][0]['batch_size']}",
            fontsize=8,
        )
    fig.tight_layout()
    savefig(fig, figure, dpi=110)
    plt.close(fig)

    if mem:
        lines += [
            "| images | stack (GiB) | streamed peak RSS (MB) | RSS over baseline (MB) | memmap[idx] peak RSS (MB) | read (s) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mem["rows"]:
            s = r["stream"]
            naive = f"{r['naive']['peak_rss_mb']:.0f}" if "naive" in r else "not run"
            lines.append(
                f"| {r['n_images']:,} | {r['stack_gib']:.2f} | {s['peak_rss_mb']:.0f} | "
                f"{s['peak_rss_mb'] - s['baseline_rss_mb']:.0f} | {naive} | {s['seconds']:.1f} |"
            )
        lines.append("")
    if cost:
        lines += [
            "| objective | B (images/step) | P | D | atoms | s/step | exponent |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in cost["rows"]:
            lines.append(
                f"| {r['objective']} | {r['images']} | {r['particles']} | {r['box']} | {r['n_atoms']} | "
                f"{r['step_seconds']:.3f} | |"
            )
        lines.append("")
        lines += ["| objective | images | particles | box | atoms |", "|---|---:|---:|---:|---:|"]
        for o in ("kl", "mmd"):
            e = cost["exponents"]
            lines.append(
                f"| {o} | {e[f'{o}_images']:.2f} | {e[f'{o}_particles']:.2f} | {e[f'{o}_box']:.2f} | {e[f'{o}_atoms']:.2f} |"
            )
        lines.append("")
        lines += [
            "| objective | step (s) | simulate | gradient | kernel/likelihood | update+host | I/O read (overlapped) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for o, b in cost["breakdown"].items():
            s = b["seconds"]
            lines.append(
                f"| {o} | {s['step']:.3f} | {s['simulate']:.3f} | {b['gradient']:.3f} | "
                f"{s['kernel_likelihood']:.4f} | {b['update_and_host']:.3f} | {b['io_read']:.4f} |"
            )
        lines.append("")
    e2e = result.get("e2e")
    if e2e:
        lines += [
            "| objective | cryosip (s/step) | cryojax fastest | cryojax default | x vs fastest | x vs default |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for o, r in e2e["objectives"].items():
            s = r["step_seconds"]
            lines.append(
                f"| {o} | {s['cryosip']:.3f} | {s['cryojax_fastest']:.3f} | {s['cryojax_default']:.2f} | "
                f"{r['speedup_vs_cryojax_fastest']:.1f} | {r['speedup_vs_cryojax_default']:.1f} |"
            )
        lines.append("")
    w = result.get("w1")
    if w:
        lines += [
            f"W1(cryosip, cryojax) = {w['w1_cryosip_vs_cryojax']:.2e}; W1 between two cryosip runs on "
            f"independent data = {w['w1_noise_scale_two_datasets']:.2e}; W1 to the truth: "
            + ", ".join(f"{k} {v:.3f}" for k, v in w["w1_to_truth"].items())
            + f" (initial particles {w['w1_init_to_truth']:.3f}).",
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", help=f"comma-separated parts of {PARTS}, or 'all'")
    p.add_argument("--quick", action="store_true", help="fewer sweep points and repeats")
    p.add_argument(
        "--sizes", default="10000,100000,1000000", help="stack sizes for the memory part"
    )
    p.add_argument("--batch", type=int, default=256, help="minibatch size for the memory part")
    p.add_argument("--n-batches", type=int, default=400, help="minibatches streamed per stack")
    p.add_argument(
        "--naive-max", type=int, default=100_000, help="largest stack read naively (memmap[idx])"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to write the stacks (default: system temp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated stacks")
    p.add_argument("--reps", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--e2e-images", type=int, default=16)
    p.add_argument("--e2e-particles", type=int, default=4)
    p.add_argument(
        "--e2e-rounds", type=int, default=5, help="interleaved timing rounds of the e2e part"
    )
    p.add_argument(
        "--report", action="store_true", help="only redraw the figure and print the tables"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_rss-child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._rss_child:
        path, batch, nb, mode = a._rss_child
        _rss_child(path, int(batch), int(nb), mode)
        return 0
    result = json.loads(a.out.read_text()) if a.out.exists() else {}
    if not a.report:
        import cryojax
        import jax

        import cryosip

        parts = PARTS if a.part == "all" else tuple(s.strip() for s in a.part.split(","))
        for part in parts:
            t0 = time.time()
            if part == "memory":
                sizes = [int(float(s)) for s in a.sizes.split(",")]
                out = run_memory(sizes, a.batch, a.n_batches, a.workdir, a.keep, a.naive_max)
            elif part == "cost":
                out = run_cost(a.quick, max(1, a.reps - (1 if a.quick else 0)))
            elif part == "e2e":
                out = run_e2e(a.e2e_images, a.e2e_particles, rounds=2 if a.quick else a.e2e_rounds)
            elif part == "w1":
                out = run_w1(n_images=64 if a.quick else 96, particles=8, n_steps=30)
            else:
                raise SystemExit(f"unknown part {part!r}; choose from {PARTS}")
            out["wall_seconds"] = time.time() - t0
            out["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            out["machine"] = _machine()
            out["quick"] = a.quick
            result[part] = out
            result["versions"] = dict(
                cryosip=cryosip.__version__,
                jax=jax.__version__,
                cryojax=cryojax.__version__,
                numpy=np.__version__,
            )
            result["benchmark"] = "scaling"
            from cryosip._atomic import write_json

            write_json(a.out, result)
            _log(f"wrote {a.out} ({part}: {out['wall_seconds']:.0f} s)")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
