"""Recover the distribution of a conformation CV from particle images with known poses and CTF.

Reads a RELION STAR (3.0/3.1/5), a cryoSPARC .cs or a cryoDRGN set, builds the cryo-EM
operator for a conformation model, and runs the chosen method. Writes what the next tool
needs (cryosip.analysis.outputs): the recovered distribution (distribution_particles.csv,
distribution.csv and free_energy.csv with bootstrap bands), per-image results
(particles_cv.star or particles_cv.cs: the input table with absolute image paths plus each
particle's CV posterior mean/sd; z.pkl; posterior.npz for `cryosip select`), a weighted
ensemble (ensemble.pdb/.cif), a trajectory along the CV (trajectory.pdb), maps along it
(volumes/*.mrc) with chimerax_series.cxc, history.csv, PNG plots, summary.json and report.html.

Examples:
  $ cryosip reconstruct sim/particles.star --model adk --objective kl --n-particles 64 --steps 300 --seed 0 --out rec/
  $ cryosip reconstruct sim/particles.star --model adk --method em-grid --out rec-em/
  $ cryosip reconstruct job/particles.cs --datadir job/ --model traj.pdb --objective kl+mmd --out rec/
  $ cryosip reconstruct big/particles.star --model adk --stream --batch-size 256 --steps 2000 --out rec-big/
  $ cryosip reconstruct big/particles.star --model adk --stream --devices 4 --out rec-4gpu/
  $ cryosip reconstruct big/particles.star --model adk --stream --checkpoint-every 100 --out rec-big/   # then --resume
  $ cryosip reconstruct big/particles.star --model adk --stream --coordinator node1:61234 --num-processes 2 --process-id 0 --out rec/   # and --process-id 1 elsewhere

--stream reads one random minibatch of images from disk per step (prefetched in a background
thread) and runs the flow on the direct operator, so memory does not grow with the number of
images; a random pilot subset (--pilot-images) is tabulated to choose the contrast sign, the
initial particles, the kernel bandwidth and the step size. --devices N splits each minibatch
over N devices (GPUs, or CPU devices forced with
XLA_FLAGS=--xla_force_host_platform_device_count=N). Streamed runs write no bootstrap bands
and no per-image results (both need passes over every image). --checkpoint-every K saves the
streamed flow (particles, weights, step sizes, stream position) every K steps to
out/checkpoint.npz; --resume continues from it with the same result as an uninterrupted run.
Several cooperating processes (hosts): --coordinator HOST:PORT --num-processes N --process-id I
in each, or under srun (SLURM) nothing: each process reads only its own rows of every minibatch,
the particles are replicated, gradients are summed across processes, and process 0 writes the
outputs (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
import numpy as np

from . import _distributed
from ._args import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    prepare_output_dir,
)
from ._model_args import add_model_args, model_from_args

logger = logging.getLogger(__name__)


def add_args(p):
    p.add_argument("particles", help="particles: .star, .cs, or a cryoDRGN pickle")
    add_model_args(p)
    p.add_argument("--datadir", default=None, help="folder that stack paths are relative to")
    p.add_argument(
        "--method", default="wgf", choices=["wgf", "em-grid", "per-image", "map-classes", "gmm"]
    )
    p.add_argument(
        "--objective", default="kl", choices=["kl", "mmd", "kl+mmd", "mmd-unconditional"]
    )
    p.add_argument("--n-particles", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="observations per step (default: all for kl)",
    )
    p.add_argument(
        "--entropy", type=nonnegative_float, default=0.0, help="entropy weight (Euler-Maruyama)"
    )
    p.add_argument(
        "--fisher-rao",
        type=nonnegative_float,
        default=None,
        help="Wasserstein-Fisher-Rao weight step per flow step (default: 0.3 for kl, 0 otherwise); 0 gives "
        "the pure Wasserstein flow with equal weights, which measured biased at high SNR",
    )
    p.add_argument(
        "--bootstrap", type=nonnegative_int, default=8, help="bootstrap replicates for the bands"
    )
    p.add_argument(
        "--heldout",
        type=fraction,
        default=0.0,
        help="fraction of images held out to track the objective on unseen data",
    )
    p.add_argument(
        "--nodes",
        type=positive_int,
        default=None,
        help="grid nodes per CV of the likelihood table, which every method uses: default 33 "
        "for one CV; above, nodes per CV chosen by a pilot from the measured interpolation error "
        "(at most 640 in all; summary.json 'likelihood_table'); K: K on every CV",
    )
    p.add_argument(
        "--bandwidth",
        type=_bandwidth,
        default="auto",
        help="regularisation of the KL flow: the recovered measure is its particles spread by a "
        "kernel of this width, a fraction of each CV's range; auto (default) chooses it by "
        "cross-validation over images (written to summary.json), 0 turns it off",
    )
    p.add_argument(
        "--sigma",
        type=positive_float,
        default=None,
        help="pixel noise sd of the input images: white noise of this sd (default: a noise "
        "spectrum estimated from the images)",
    )
    p.add_argument(
        "--contrast",
        default="auto",
        choices=["auto", "as-is", "invert"],
        help="image contrast: auto detects inverted (white-protein) data and flips it",
    )
    p.add_argument(
        "--fit-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile a per-image contrast scale and offset (default on: real images carry both; "
        "--no-fit-scale holds them fixed)",
    )
    p.add_argument(
        "--noise",
        default="coloured",
        choices=["coloured", "white"],
        help="noise model: a power spectrum per optics group estimated from the residuals "
        "(default), or white",
    )
    p.add_argument(
        "--pose-error",
        type=_pose_error,
        default="auto",
        metavar="auto|off|DEG,A",
        help="average the likelihood over pose errors of this rms angle (degrees) and shift "
        "(Angstrom) around the given poses, e.g. 1.5,0.7 (kl with a 1-D CV; 16x the tabulation "
        "time). auto (default): when a local search on the pilot finds the poses off by 3 "
        "degrees or more; off: never",
    )
    p.add_argument(
        "--no-envelope",
        action="store_true",
        help="do not estimate a B-factor envelope (by default one is fitted to the images)",
    )
    p.add_argument(
        "--box",
        type=positive_int,
        default=None,
        help="working box (default: chosen from the CV's signal, docs/noise.md)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=0,
        help="steps between checkpoints (multiple of 25)",
    )
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.npz")
    p.add_argument(
        "--stream",
        action="store_true",
        help="stream minibatches from disk (memory flat in the number of images); wgf only",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        default=None,
        help="with --stream: split each minibatch over N devices ('all': every device)",
    )
    p.add_argument(
        "--pilot-images",
        type=positive_int,
        default=512,
        help="with --stream: images tabulated to choose contrast, start, bandwidth and step size",
    )
    _distributed.add_args(p)  # --coordinator, --num-processes, --process-id (with --stream)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (its cryosip outputs are removed first)",
    )
    p.add_argument("--no-progress", action="store_true")


def _print_result(res, out: str) -> None:
    """The one line the command prints: the method, its particles and the mean CV."""
    mean_cv = float(np.average(res.positions[:, 0], weights=res.weights))
    n = res.positions.shape[0] if res.particles is None else res.particles[0].shape[0]
    kernel = "" if res.bandwidth is None else f" (kernel {res.bandwidth.relative:g} of the range)"
    line = f"{res.label}: {n} particles{kernel}, mean CV {mean_cv:.4f}; outputs in {out}"
    print(line)  # noqa: T201


def _problem_summary(problem, res, out: str, check) -> dict:
    """What the calibration found and the fit check ``check`` (summary.json, fit_check.png)."""
    import pandas as pd

    from .. import _atomic
    from ..pipeline.fitcheck import plot_fit_check

    cal = problem.calibration
    os.makedirs(out, exist_ok=True)
    plot_fit_check(os.path.join(out, "fit_check.png"), check)
    _atomic.write_csv(os.path.join(out, "noise_spectrum.csv"), pd.DataFrame(cal.noise.to_table()))
    out = {
        "calibration": cal.summary(),
        "noise_sigma": float(np.mean(cal.input_noise_sigma)),
        "fit_scale": bool(problem.operator.fit_scale),
        "fit_check": check.summary(),
    }
    if res.bandwidth is not None:
        out["regularisation"] = res.bandwidth.to_dict()
    if problem.resolution is not None:
        out["likelihood_table"] = problem.resolution.to_dict()
    return out


def _bandwidth(text: str):
    if text == "auto":
        return text
    h = nonnegative_float(text)
    if h >= 0.5:
        raise argparse.ArgumentTypeError(
            f"--bandwidth is a fraction of the CV range < 0.5, got {text!r}"
        )
    return h


def _pose_error(text: str):
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        rot, shift = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--pose-error takes DEG,A (e.g. 1.5,0.7), got {text!r}"
        ) from None
    if not (rot >= 0 and shift >= 0):
        raise argparse.ArgumentTypeError(f"--pose-error values must be >= 0, got {text!r}")
    return rot, shift


def _devices(text: str):
    if text == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--devices takes a positive integer or 'all', got {text!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--devices must be >= 1, got {n}")
    return n


def _start(args, dist=None):
    """``(stack, model, settings)`` of a run; the writing process (the only one without ``dist``)
    checks the output folder and writes config.json."""
    from .. import _atomic
    from ..data.particles import read_particles

    stack = read_particles(args.particles, datadir=args.datadir)
    model, model_description = model_from_args(args)
    if dist is None:
        logger.info("model: %s", model_description)
    else:
        logger.info("model: %s (%s)", model_description, dist.describe())
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if dist is None or dist.is_writer:
        prepare_output_dir(
            args.out,
            overwrite=args.overwrite,
            command="reconstruct",
            resume=args.resume,
            inputs=[args.particles],
        )
        _atomic.write_json(os.path.join(args.out, "config.json"), settings)
    return stack, model, settings


def _flow_options(args) -> dict:
    """The method's settings from the flags (:func:`~cryosip.pipeline.methods.method_from_name`
    takes those it uses)."""
    ck = (
        os.path.join(args.out, "checkpoint.npz") if (args.checkpoint_every or args.resume) else None
    )
    return dict(
        n_particles=args.n_particles,
        n_steps=args.steps,
        entropy=args.entropy,
        fisher_rao=args.fisher_rao,
        progress=not args.no_progress,
        objective=args.objective,
        batch_size=args.batch_size,
        checkpoint=ck,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        heldout_fraction=args.heldout,
        nodes=args.nodes,
        bandwidth=args.bandwidth,
    )


def _calibration_options(args) -> dict:
    """The calibration options that ``prepare`` and ``run_streamed`` take alike from the flags."""
    return dict(
        sigma=args.sigma,
        contrast=args.contrast,
        fit_scale=args.fit_scale,
        box_size=args.box,
        noise=args.noise,
        envelope=not args.no_envelope,
    )


def _write_outputs(args, settings, stack, model, problem, res, extra: dict, posterior) -> int:
    """Write the run's outputs (cryosip.analysis.outputs), log and print the result."""
    from concurrent.futures import ThreadPoolExecutor

    from ..analysis.outputs import write_reconstruction
    from ..pipeline.fitcheck import fit_check

    key = jax.random.fold_in(jax.random.key(args.seed), 99)
    with ThreadPoolExecutor(1) as pool:  # the fit check computes while the outputs are written
        checking = pool.submit(fit_check, problem, res, key=key)
        summary = write_reconstruction(
            args.out,
            problem,
            res,
            model.cv_names,
            settings,
            summary_extra=lambda: {
                **extra,
                **_problem_summary(problem, res, args.out, checking.result()),
            },
            stack=stack,
            model=model,
            posterior=posterior,
        )
    logger.info(
        "done: %s%s in %.1f s (final objective %s)",
        res.label,
        " (streamed)" if extra.get("streamed") else "",
        res.seconds,
        summary.get("final_objective"),
    )
    _print_result(res, args.out)
    return 0


def _main_distributed(args, dist) -> int:
    """One process of a multi-process streamed run: reads what ``main`` reads; only process 0
    checks and writes the output folder."""
    stack, model, settings = _start(args, dist)
    stack = _without_table(stack)
    return _main_streamed(args, stack, model, settings, dist=dist)


def _without_table(stack):
    """The stack without its per-particle input table (O(N) strings), the table's memory given
    back, and its per-particle nuisances read from a temporary file on demand
    (:func:`~cryosip.data.streaming.spill_rows`): a streamed run writes no per-image outputs,
    and its memory must stay flat in N. The caller rebinds its name to the result so that the
    table and the arrays have no reference left."""
    import dataclasses

    from ..data.star import release_freed_memory
    from ..data.streaming import spill_rows

    lean = dataclasses.replace(
        stack,
        metadata=None,
        nuisance=spill_rows(stack.nuisance),
        optics_group=spill_rows(stack.optics_group),
    )
    del stack
    release_freed_memory()
    return lean


def _main_streamed(args, stack, model, settings, dist=None) -> int:
    from ..data.errors import CryosipInputError
    from ..pipeline.methods import method_from_name, run_streamed

    if args.method != "wgf":
        raise CryosipInputError(
            args.particles, f"--stream runs the particle flow (wgf), not {args.method}"
        )
    writer = dist is None or dist.is_writer
    n_proc = 1 if dist is None else dist.num_processes
    if dist is not None:
        devices = len(jax.devices())
    else:
        devices = len(jax.devices()) if args.devices == "all" else args.devices
    batch = args.batch_size or 256
    options = _flow_options(args)
    resumed = bool(
        args.resume and options["checkpoint"] is not None and os.path.exists(options["checkpoint"])
    )
    try:
        problem, res = run_streamed(
            stack,
            model,
            method_from_name(args.method, **options),
            key=jax.random.key(args.seed),
            **_calibration_options(args),
            batch_size=batch,
            devices=devices,
            n_nodes=args.nodes or 33,
            pilot_images=args.pilot_images,
        )
    except CryosipInputError:
        raise
    except ValueError as e:
        raise CryosipInputError(args.particles, str(e)) from None
    if not writer:
        logger.info(
            "%s done: %s (streamed); process 0 writes the outputs", dist.describe(), res.label
        )
        return 0
    extra = {
        "n_images": len(stack),
        "streamed": True,
        "processes": n_proc,
        "devices": devices or 1,
        "batch_size": batch,
        "images_read_per_step_per_process": min(batch, len(stack)) // n_proc,
        "pilot_images": min(args.pilot_images, len(stack)),
        "checkpoint_every": args.checkpoint_every,
        "resumed": resumed,
    }
    return _write_outputs(args, settings, stack, model, problem, res, extra, posterior=None)


def main(args) -> int:
    from ..pipeline.methods import Bootstrap, method_from_name, posterior_cv
    from ..pipeline.problem import prepare

    dist = _distributed.from_args(args)  # several processes: --coordinator ... or srun
    if dist is not None:
        _distributed.initialize(dist)
        return _distributed.run(dist, lambda: _main_distributed(args, dist))
    stack, model, settings = _start(args)
    if args.stream:
        stack = _without_table(stack)
        return _main_streamed(args, stack, model, settings)
    from ..data.errors import CryosipInputError

    if args.devices not in (None, 1):
        raise CryosipInputError(
            args.particles, "--devices needs --stream (the tabulated path runs on one device)"
        )
    tabulated_kl = args.objective == "kl" and model.dim == 1
    if args.pose_error == "auto" and not tabulated_kl:
        args.pose_error = (
            None  # averaging needs a tabulated KL likelihood; the estimate is reported
        )
    if args.pose_error is not None and not tabulated_kl:
        raise CryosipInputError(
            args.particles,
            "--pose-error needs --objective kl and a 1-D CV (a tabulated likelihood)",
        )
    options = _flow_options(args)
    problem = prepare(
        stack,
        model,
        **_calibration_options(args),
        n_nodes=args.nodes,
        progress=options["progress"],
        pose_error=args.pose_error,
    )
    method = method_from_name(args.method, **options)
    if args.bootstrap and method.resamples:
        method = Bootstrap(method, args.bootstrap)
    res = method.run(problem, jax.random.key(args.seed))
    posterior = posterior_cv(problem, res) if problem.table is not None else None
    return _write_outputs(args, settings, stack, model, problem, res, {}, posterior)
