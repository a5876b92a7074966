"""Forward-model speed: cryosip's image simulator against cryojax 0.6, in one process.

What is timed (images per second, jit warm-up excluded, median of ``--repeats`` timed calls;
the methods of one configuration are timed in interleaved rounds so that load changes on a
shared machine hit all of them alike):

* ``simulate``: per-image CV theta_i -> PathModel coordinates -> pose, shift, astigmatic CTF
  -> noise-free image -> plus Gaussian white noise (one batch of images).
* ``value_and_grad``: sum_i ||image(theta_i, nuisance_i) - y_i||^2 and its gradient w.r.t.
  the per-image CVs theta (through the PathModel), for fixed observed images y.

Methods: ``cryosip`` (``ImageModel.render``), ``cryojax_default``
(``GaussianMixtureProjection()``: exact erf pixel integrals over the whole grid) and
``cryojax_fastest`` (``GaussianMixtureProjection(n_spread=suggest_n_spread(volume, pixel))``),
all through ``ContrastImageModel`` + ``WeakPhaseScatteringTheory`` semantics
(``make_image_model(..., quantity_mode="contrast")``) with the same poses, shifts and CTFs
(the Euler/shift/azimuth mapping is the one checked in tests/cryoem/test_vs_cryojax.py).
Every method is batched the same way (``jax.vmap`` over the images of a batch).

The accuracy block reports, for each configuration, the relative L2 distance of the
noise-free cryosip images (and of cryojax's fastest) to cryojax's default, and the cosine
between the theta-gradients.

    python benchmarks/forward.py            # AdK all-atom and C-alpha, 64 and 128 px
    python benchmarks/forward.py --quick    # AdK all-atom and C-alpha at 64 px only

Writes ``benchmarks/results/forward.json`` (atomic replace).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import cryosip
from cryosip.cryoem.image_model import CryoNuisance, ImageModel, NuisancePrior
from cryosip.cryoem.pose import matrix_to_euler
from cryosip.data.adk import adk_model
from cryosip.pipeline.operator import CryoEMOperator

FIELD_OF_VIEW_IN_ANGSTROMS = 128.0
SIGMA = 0.05  # noise standard deviation (the images' contrast is ~0.01-0.1 in these units)


def _atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cryojax_pieces(nuisance: CryoNuisance):
    """Per-image cryojax inputs from our nuisances: Euler angles = -(RELION angles), offset =
    our shift (= -RELION origin), azimuth = 90 deg - ours (cryojax measures it from y)."""
    rot, tilt, psi = matrix_to_euler(np.asarray(nuisance.rotation))
    euler = jnp.asarray(np.stack([-rot, -tilt, -psi], axis=-1), jnp.float32)
    return euler, nuisance.shift_in_angstroms, nuisance.ctf


def _cryojax_image_model(cxs, integrator, coords, atoms, box, pixel, euler, shift, ctf):
    volume = cxs.GaussianMixtureVolume(coords, atoms.amplitudes, atoms.variances)
    config = cxs.BasicImageConfig((box, box), pixel, voltage_in_kilovolts=ctf.voltage_in_kilovolts)
    pose = cxs.EulerAnglePose(shift[0], shift[1], euler[0], euler[1], euler[2])
    transfer = cxs.ContrastTransferTheory(
        cxs.AstigmaticCTF(
            defocus_in_angstroms=0.5 * (ctf.defocus_u_in_angstroms + ctf.defocus_v_in_angstroms),
            astigmatism_in_angstroms=ctf.defocus_u_in_angstroms - ctf.defocus_v_in_angstroms,
            astigmatism_angle=90.0 - ctf.defocus_angle_in_degrees,
            spherical_aberration_in_mm=ctf.spherical_aberration_in_mm,
        ),
        amplitude_contrast_ratio=ctf.amplitude_contrast,
        phase_shift=ctf.phase_shift_in_degrees,
    )
    return cxs.make_image_model(
        volume, config, pose, transfer, integrator, quantity_mode="contrast"
    )


def setup(structure: str, box: int, batch: int, seed: int = 0):
    """Jitted (simulate, value_and_grad, clean) functions and their arguments for every method."""
    import cryojax.simulator as cxs

    pixel = FIELD_OF_VIEW_IN_ANGSTROMS / box
    model = adk_model(ca_only=(structure == "adk_ca"))
    atoms = model.atoms
    image_model = ImageModel.for_atoms(box, pixel, atoms)
    operator = CryoEMOperator(model, image_model, SIGMA)
    key = jax.random.key(seed)
    k_theta, k_nu, k_obs, k_sim = jax.random.split(key, 4)
    theta = jax.random.uniform(k_theta, (batch, 1))
    nuisance = NuisancePrior(shift_sd_in_angstroms=5.0).sample(k_nu, batch)
    euler, shift, ctf = _cryojax_pieces(nuisance)

    # --- cryosip -------------------------------------------------------------------------
    clean_ours = jax.jit(jax.vmap(operator.mean))

    @jax.jit
    def simulate_ours(key, theta, nuisance):
        return operator.noise.sample(key, jax.vmap(operator.mean)(theta, nuisance))

    observed = simulate_ours(k_obs, theta, nuisance)

    @jax.jit
    def grad_ours(theta, nuisance, observed):
        def loss(th):
            return jnp.sum((jax.vmap(operator.mean)(th, nuisance) - observed) ** 2)

        return jax.value_and_grad(loss)(theta)

    methods = {
        "cryosip": dict(
            simulate=(simulate_ours, (k_sim, theta, nuisance)),
            value_and_grad=(grad_ours, (theta, nuisance, observed)),
            clean=(clean_ours, (theta, nuisance)),
        )
    }

    # --- cryojax -------------------------------------------------------------------------
    coords0 = model(jnp.array([0.5]))
    n_spread = cxs.suggest_n_spread(
        cxs.GaussianMixtureVolume(coords0, atoms.amplitudes, atoms.variances), pixel
    )
    integrators = {
        "cryojax_default": cxs.GaussianMixtureProjection(),
        "cryojax_fastest": cxs.GaussianMixtureProjection(n_spread=n_spread),
    }
    for name, integrator in integrators.items():

        def cj_model(t, e, s, c, integrator=integrator):
            return _cryojax_image_model(cxs, integrator, model(t), atoms, box, pixel, e, s, c)

        @jax.jit
        def simulate_cj(key, theta, euler, shift, ctf, cj_model=cj_model):
            keys = jax.random.split(key, theta.shape[0])

            def one(k, t, e, s, c):
                return cxs.GaussianWhiteNoiseModel(cj_model(t, e, s, c), variance=SIGMA**2).sample(
                    k
                )

            return jax.vmap(one)(keys, theta, euler, shift, ctf)

        @jax.jit
        def grad_cj(theta, euler, shift, ctf, observed, cj_model=cj_model):
            def loss(th):
                images = jax.vmap(lambda t, e, s, c: cj_model(t, e, s, c).simulate())(
                    th, euler, shift, ctf
                )
                return jnp.sum((images - observed) ** 2)

            return jax.value_and_grad(loss)(theta)

        clean_cj = jax.jit(
            jax.vmap(lambda t, e, s, c, cj_model=cj_model: cj_model(t, e, s, c).simulate())
        )
        methods[name] = dict(
            simulate=(simulate_cj, (k_sim, theta, euler, shift, ctf)),
            value_and_grad=(grad_cj, (theta, euler, shift, ctf, observed)),
            clean=(clean_cj, (theta, euler, shift, ctf)),
        )
    info = dict(
        structure=structure,
        n_atoms=int(atoms.n_atoms),
        box_size=box,
        pixel_size_in_angstroms=pixel,
        batch=batch,
        cryosip_window=f"{2 * image_model.half_width + 1}x{2 * image_model.half_width + 1}",
        cryojax_fastest_n_spread=list(n_spread) if isinstance(n_spread, tuple) else n_spread,
    )
    return methods, info


def _time(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run_config(structure: str, box: int, batch: int, repeats: int, log) -> list[dict]:
    methods, info = setup(structure, box, batch)
    names = list(methods)
    # accuracy (and warm-up of the clean renderers)
    clean = {m: np.asarray(methods[m]["clean"][0](*methods[m]["clean"][1])) for m in names}
    ref = clean["cryojax_default"]

    def rel(x):
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))

    rows = []
    for task in ("simulate", "value_and_grad"):
        outputs = {
            m: jax.block_until_ready(methods[m][task][0](*methods[m][task][1])) for m in names
        }  # warm-up
        times = {m: [] for m in names}
        for _ in range(repeats):
            for m in names:  # interleaved rounds
                fn, args = methods[m][task]
                times[m].append(_time(fn, args))
        ips = {m: batch / statistics.median(times[m]) for m in names}
        row = dict(
            info,
            task=task,
            images_per_second=ips,
            seconds_per_batch={m: times[m] for m in names},
            ratio_vs_cryojax_default=ips["cryosip"] / ips["cryojax_default"],
            ratio_vs_cryojax_fastest=ips["cryosip"] / ips["cryojax_fastest"],
        )
        if task == "value_and_grad":
            g_ref = np.asarray(outputs["cryojax_default"][1]).ravel()
            row["gradient_cosine_vs_cryojax_default"] = {
                m: float(
                    np.dot(np.asarray(outputs[m][1]).ravel(), g_ref)
                    / (np.linalg.norm(np.asarray(outputs[m][1])) * np.linalg.norm(g_ref))
                )
                for m in ("cryosip", "cryojax_fastest")
            }
        else:
            row["relative_l2_vs_cryojax_default"] = {
                m: rel(clean[m]) for m in ("cryosip", "cryojax_fastest")
            }
        rows.append(row)
        log(
            f"{structure:7s} {box:4d} px {task:15s} "
            + "  ".join(f"{m} {ips[m]:9.1f}" for m in names)
            + f"   x{row['ratio_vs_cryojax_default']:.1f} default, x{row['ratio_vs_cryojax_fastest']:.1f} fastest"
        )
    return rows


# ------------------------------------------------------------------------------------------
# Bounds: what this machine could do at best for the algorithm cryosip uses (all measured here)
# ------------------------------------------------------------------------------------------


def _best_seconds(fn, args, reps: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    return min(_time(fn, args) for _ in range(reps))


def forward_flops_per_image(n_atoms: int, n_gauss: int, half_width: int, box: int) -> dict:
    """Arithmetic of cryosip's forward model for one image, counted from the algorithm.

    Per atom: rotation 10; edge arguments 2 axes x 2h edges x K x 2; erf 2 x 2h x K x 27
    (12 FMAs = 24, a division, two clamps); profiles 2 x (2h+1) x K; footprint
    (2h+1)^2 x K x 2 plus amplitude products (2h+1) x K; scatter (2h+1)^2 adds; window index 8.
    Per image: rfft2 + irfft2 2 x 2.5 N log2 N (N = D^2); CTF + phase ~60 per rfft frequency;
    complex products 6 per frequency; noise ~50 per pixel (threefry + inverse erf).
    """
    K, h, w = n_gauss, half_width, 2 * half_width + 1
    per_atom = (
        10 + 2 * 2 * h * K * 2 + 2 * 2 * h * K * 27 + 2 * w * K + w * w * K * 2 + w * K + w * w + 8
    )
    N = box * box
    nf = box * (box // 2 + 1)
    optics = 2 * 2.5 * N * np.log2(N) + 60 * nf + 6 * nf
    noise = 50 * N
    return dict(
        per_atom=per_atom,
        projection=per_atom * n_atoms,
        optics=float(optics),
        noise=noise,
        total=float(per_atom * n_atoms + optics + noise),
    )


def measure_bounds(box: int = 64, pixel: float = 2.0, chunk: int | None = None) -> dict:
    """Peak matmul rate, the rates of the XLA primitives the simulator is built from, and the
    two resulting bounds on simulated images/s (AdK all-atom at ``box`` px)."""
    from cryosip.cryoem import projection as P

    model = adk_model(ca_only=False)
    atoms = model.atoms
    n, K = atoms.amplitudes.shape
    h = ImageModel.for_atoms(box, pixel, atoms).half_width
    w = 2 * h + 1
    c = chunk or P.chunk_size(n, h)
    n_chunks = 16
    images = n_chunks * c
    key = jax.random.key(0)
    # peak: a large float32 matmul (XLA's best-tuned kernel, all cores)
    a = jax.random.normal(key, (2048, 2048), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    peak = 2 * 2048**3 / _best_seconds(mm, (a,))
    # primitives, each in the chunked loop cryosip uses, per image
    z = jax.random.normal(key, (n_chunks, c, 2, K, 2 * h * n), jnp.float32)
    t_erf = _best_seconds(jax.jit(lambda z: jax.lax.map(P._erf, z)), (z,)) / images
    Pc = box + 2 * w
    foot = jax.random.uniform(key, (n_chunks, c * n, w, w), jnp.float32)
    idx = jnp.stack(
        [
            jax.random.randint(jax.random.key(1), (n_chunks, c * n), 0, c * Pc - w),
            jax.random.randint(jax.random.key(2), (n_chunks, c * n), 0, Pc - w),
        ],
        -1,
    )

    def scatter(f, i):
        return jax.lax.scatter_add(
            jnp.zeros((c * Pc, Pc), f.dtype), i, f, P._SCATTER_DNUMS, mode="promise_in_bounds"
        )

    t_scatter = (
        _best_seconds(
            jax.jit(lambda f, i: jax.lax.map(lambda fi: scatter(*fi), (f, i))), (foot, idx)
        )
        / images
    )

    def gather(g, i):
        return jax.lax.gather(g, i, P._GATHER_DNUMS, slice_sizes=(w, w), mode="promise_in_bounds")

    canv = jax.random.normal(key, (n_chunks, c * Pc, Pc), jnp.float32)
    t_gather = (
        _best_seconds(
            jax.jit(lambda g, i: jax.lax.map(lambda gi: gather(*gi), (g, i))), (canv, idx)
        )
        / images
    )
    t_exp = (
        _best_seconds(jax.jit(lambda z: jax.lax.map(lambda x: jnp.exp(-x * x), z)), (z,)) / images
    )
    batch = 128
    img = jax.random.normal(key, (batch, box, box), jnp.float32)
    t_fft = (
        _best_seconds(jax.jit(lambda x: jnp.fft.irfft2(jnp.fft.rfft2(x), s=(box, box))), (img,))
        / batch
    )
    nu = NuisancePrior(shift_sd_in_angstroms=5.0).sample(key, batch)
    im = ImageModel.for_atoms(box, pixel, atoms)
    t_transfer = _best_seconds(jax.jit(jax.vmap(im.transfer)), (nu,)) / batch
    t_noise = (
        _best_seconds(jax.jit(lambda k: jax.random.normal(k, (batch, box, box))), (key,)) / batch
    )
    flops = forward_flops_per_image(n, K, h, box)
    simulate_primitives = t_erf + t_scatter + t_fft + t_transfer + t_noise
    # value + grad: forward (erf, scatter, optics) + backward (erf again, exp, gather, optics^T)
    grad_primitives = 2 * t_erf + t_exp + t_scatter + t_gather + 2 * (t_fft + t_transfer)
    return dict(
        box_size=box,
        pixel_size_in_angstroms=pixel,
        n_atoms=int(n),
        window=f"{w}x{w}",
        chunk=c,
        peak_matmul_gflops=peak / 1e9,
        flops_per_image=flops,
        primitive_microseconds_per_image=dict(
            erf=1e6 * t_erf,
            window_scatter=1e6 * t_scatter,
            window_gather=1e6 * t_gather,
            exp=1e6 * t_exp,
            fft_pair=1e6 * t_fft,
            ctf_and_phase=1e6 * t_transfer,
            noise=1e6 * t_noise,
        ),
        simulate_bound_flop_roofline_images_per_second=peak / flops["total"],
        simulate_bound_xla_primitives_images_per_second=1.0 / simulate_primitives,
        value_and_grad_bound_xla_primitives_images_per_second=1.0 / grad_primitives,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 px only (all-atom and C-alpha)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size (smoke tests)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forward.json")
    args = p.parse_args(argv)
    configs = [("adk_all", 64, 128), ("adk_ca", 64, 128)]
    if not args.quick:
        configs += [("adk_all", 128, 64), ("adk_ca", 128, 64)]
    rows = []
    t0 = time.time()
    for structure, box, batch in configs:
        batch = args.batch or batch
        rows += run_config(structure, box, batch, args.repeats, lambda s: print(s, flush=True))
    bounds = measure_bounds()
    for row in rows:
        if row["structure"] == "adk_all" and row["box_size"] == bounds["box_size"]:
            key = "simulate" if row["task"] == "simulate" else "value_and_grad"
            ours = row["images_per_second"]["cryosip"]
            if key == "simulate":
                bounds["simulate_fraction_of_flop_roofline"] = (
                    ours / bounds["simulate_bound_flop_roofline_images_per_second"]
                )
                bounds["simulate_fraction_of_xla_primitive_bound"] = (
                    ours / bounds["simulate_bound_xla_primitives_images_per_second"]
                )
            else:
                bounds["value_and_grad_fraction_of_xla_primitive_bound"] = (
                    ours / bounds["value_and_grad_bound_xla_primitives_images_per_second"]
                )
    print(
        "bounds:",
        json.dumps(
            {
                k: v
                for k, v in bounds.items()
                if "bound" in k or "fraction" in k or k == "peak_matmul_gflops"
            },
            indent=1,
        ),
    )
    import cryojax

    result = dict(
        benchmark="forward",
        description="images/s of the forward model, cryosip vs cryojax (same process, interleaved, "
        "median of repeats after warm-up); per-image CV through the AdK PathModel",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            load_average_at_end=list(os.getloadavg()),
            jax_devices=[str(d) for d in jax.devices()],
        ),
        versions=dict(
            cryosip=cryosip.__version__,
            jax=jax.__version__,
            cryojax=cryojax.__version__,
            numpy=np.__version__,
        ),
        field_of_view_in_angstroms=FIELD_OF_VIEW_IN_ANGSTROMS,
        noise_sigma=SIGMA,
        repeats=args.repeats,
        quick=args.quick,
        wall_seconds=time.time() - t0,
        rows=rows,
        bounds=bounds,
    )
    _atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
