"""Foreign data (issue 11): images simulated by cryojax and written by cryospax (cryojax's RELION
writer) reconstruct as well as images from cryosip's own simulator.

The cryojax set is C-alpha AdK at a bimodal truth (the same law as ``cryosip simulate
--distribution bimodal``), rendered by cryojax's ``GaussianMixtureVolume`` +
``GaussianMixtureProjection`` in ``quantity_mode="contrast"`` (its own amplitude scale),
multiplied by an arbitrary 3.7 plus an offset of 0.5 as real data arrive with an unknown
normalisation, with cryojax's white noise at SNR 0.1, uniform poses, ~2 A shifts and
per-particle defocus 1-2.5 um with astigmatism (sd 400 A, uniform azimuth). cryospax's
``simulate_particle_stack`` writes the STAR + MRC with its own RELION conventions (poses
through its Euler conversion, ``rlnOrigin = -offset``). cryosip then reads the files, estimates
sigma from the particle background and profiles the scale and offset (``--fit-scale``).

Convention finding pinned below: cryospax 0.2.1 copies cryojax's astigmatism azimuth verbatim
into ``rlnDefocusAngle`` (and back when reading). cryojax measures that azimuth from the y axis
(``atan2(kx, ky)``, ``cryojax.ndimage.cartesian_to_polar``); RELION measures ``rlnDefocusAngle``
from the x axis (``CTF::getDeltaF``: ``atan2(Y, X)`` with X the column frequency), as cryosip
does. So cryospax's files carry ``rlnDefocusAngle = 90 - (RELION's angle)``: the bug is
cryospax's (the needed fix: write ``(90 - astigmatism_angle) mod 180`` and read
``90 - rlnDefocusAngle``). Rotation, shift, defocus U/V, amplitude scale and sign all agree.
The reconstruction below runs on the files exactly as cryospax wrote them (the wrong azimuth is
a small high-frequency CTF error at this resolution), so nothing is corrected for it.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from cli_helpers import simulate_adk

from cryosip.cli.main import main
from cryosip.cryoem.image_model import ImageModel
from cryosip.data.adk import adk_model
from cryosip.data.distributions import make_distribution
from cryosip.data.particles import read_particles

N_IMAGES, BOX, PIXEL, SNR = 300, 32, 3.5, 0.1
SCALE, OFFSET = 3.7, 0.5  # arbitrary normalisation of the cryojax images
SHIFT_SD, ASTIG_SD = 2.0, 400.0  # also passed to `cryosip simulate` so both sets share nuisances
RECONSTRUCT = [
    "--model",
    "adk-ca",
    "--objective",
    "kl",
    "--n-particles",
    "32",
    "--steps",
    "100",
    "--bootstrap",
    "0",
    "--nodes",
    "25",
    "--fit-scale",
    "--seed",
    "0",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cryojax_set(tmp_path_factory):
    """Simulate with cryojax, write with cryospax; return the folder, truth and the clean images."""
    import cryojax.simulator as cxs
    import cryospax as spx

    root = tmp_path_factory.mktemp("cryojax")
    model = adk_model(ca_only=True)
    s = np.asarray(make_distribution("bimodal", model.lower, model.upper).sample(0, N_IMAGES))[:, 0]
    coords = np.asarray(jax.jit(jax.vmap(lambda x: model(x[None])))(jnp.asarray(s, jnp.float32)))
    rng = np.random.default_rng(0)
    n = N_IMAGES
    # uniform SO(3) in cryojax's ZYZ Euler angles, shifts, defocus and astigmatism (cryojax's own)
    phi, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    theta = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    offset = rng.normal(0.0, SHIFT_SD, (n, 2))
    defocus, astig = rng.uniform(10000.0, 25000.0, n), rng.normal(0.0, ASTIG_SD, n)
    azimuth = rng.uniform(0.0, 180.0, n)
    pose = cxs.EulerAnglePose(offset[:, 0], offset[:, 1], phi, theta, psi)
    ctf = cxs.AstigmaticCTF(
        defocus_in_angstroms=defocus,
        astigmatism_in_angstroms=astig,
        astigmatism_angle=azimuth,
        spherical_aberration_in_mm=np.full(n, 2.7),
    )
    transfer = cxs.ContrastTransferTheory(
        ctf, amplitude_contrast_ratio=np.full(n, 0.1), phase_shift=np.zeros(n)
    )
    config = cxs.BasicImageConfig((BOX, BOX), PIXEL, voltage_in_kilovolts=300.0)

    params = spx.RelionParticleParameterFile(root / "particles.star", mode="w")
    params.append(dict(pose=pose, transfer_theory=transfer, image_config=config))
    dataset = spx.RelionParticleDataset(
        params, root, mode="w", mrcfile_options=dict(prefix="cryojax")
    )
    amplitudes, variances = np.asarray(model.atoms.amplitudes), np.asarray(model.atoms.variances)

    def image_model(info, xyz):
        volume = cxs.GaussianMixtureVolume(xyz, amplitudes, variances)
        return cxs.make_image_model(
            volume,
            info["image_config"],
            info["pose"],
            info["transfer_theory"],
            cxs.GaussianMixtureProjection(),
            quantity_mode="contrast",
        )

    # noise-free pass (cryojax's amplitude scale) fixes sigma: SNR = mean var(signal) / sigma^2
    def simulate(info, xyz):
        # cryojax relies on implicit dtype promotion (complex64 * float32), which the strict
        # promotion of the test session (tests/conftest.py, issue 16) refuses: standard for it
        with jax.numpy_dtype_promotion("standard"):
            return image_model(info, xyz).simulate()

    render = eqx.filter_vmap(simulate, in_axes=(spx.get_in_axes(params), 0))
    clean = eqx.filter_jit(render)(params[np.arange(n)], coords)
    clean = np.asarray(clean, np.float64)
    sigma = float(np.sqrt(np.mean(np.var(SCALE * clean.reshape(n, -1), axis=1)) / SNR))

    def simulate_fn(info, _, per_particle):
        xyz, key = per_particle
        with jax.numpy_dtype_promotion("standard"):  # cryojax: implicit promotion (issue 16)
            noisy = cxs.GaussianWhiteNoiseModel(
                image_model(info, xyz),
                variance=sigma**2,
                signal_scale_factor=SCALE,
                signal_offset=OFFSET,
            )
            return noisy.sample(key)

    keys = jax.random.split(jax.random.key(1), n)
    spx.simulate_particle_stack(
        dataset, simulate_fn, per_particle_args=(coords, keys), batch_size=n
    )
    pd.DataFrame({"s": s}).to_csv(root / "truth.csv", index=False)
    return dict(root=root, s=s, clean=clean, sigma=sigma, azimuth=azimuth, model=model)


@pytest.fixture(scope="module")
def cryosip_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("cryosip") / "sim"
    simulate_adk(
        out,
        N_IMAGES,
        box=BOX,
        pixel_size=PIXEL,
        snr=SNR,
        extra=["--shift-sd", SHIFT_SD, "--astigmatism-sd", ASTIG_SD],
    )
    return out


def _render(model, s, nuisance, idx):
    """cryosip's noise-free images of particles ``idx`` at CV ``s`` (one compiled vmap)."""
    im = ImageModel.for_atoms(BOX, PIXEL, model.atoms)
    nu = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[idx]), nuisance)
    one = lambda x, n: im.render(model(x[None]), model.atoms, n)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(s[idx], jnp.float32), nu), np.float64)


def _rel(a, b):
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(
        b.reshape(len(b), -1), axis=1
    )


def test_cryospax_files_read_by_cryosip_reproduce_cryojax_images(cryojax_set):
    """cryosip's reader on cryospax's STAR + MRC: poses, shifts, defocus, scale and sign agree with
    cryojax exactly; the astigmatism azimuth is cryojax's (from y), not RELION's (from x)."""
    d = cryojax_set
    stack = read_particles(d["root"] / "particles.star")
    assert stack.images.shape == (N_IMAGES, BOX, BOX)
    np.testing.assert_allclose(stack.pixel_size, PIXEL, rtol=1e-6)
    idx = np.arange(24)
    ctf = stack.nuisance.ctf
    # cryospax 0.2.1 stores cryojax's azimuth verbatim as rlnDefocusAngle (RELION's is 90 - it)
    np.testing.assert_allclose(np.asarray(ctf.defocus_angle_in_degrees), d["azimuth"], atol=1e-3)

    as_written = _render(d["model"], d["s"], stack.nuisance, idx)
    relion_angle = (90.0 - np.asarray(ctf.defocus_angle_in_degrees)) % 180.0
    mapped = eqx.tree_at(lambda nu: nu.ctf.defocus_angle_in_degrees, stack.nuisance, relion_angle)
    corrected = _render(d["model"], d["s"], mapped, idx)
    clean = d["clean"][idx]
    # with RELION's azimuth every pixel agrees (rotation, shift, defocus U/V, amplitude scale, sign)
    assert _rel(corrected, clean).max() < 1e-4, _rel(corrected, clean)
    # as written, the swapped azimuth is a CTF error of a few per cent (the cryospax bug)
    assert np.median(_rel(as_written, clean)) > 1e-2

    # the images: pooled least-squares scale/offset against cryosip's model recovers 3.7 and 0.5
    # (positive: protein is dark in both, so --fit-scale's a >= 0 clip is not hit)
    y = np.asarray(stack.images[idx], np.float64).reshape(len(idx), -1)
    m = corrected.reshape(len(idx), -1)
    yc, mc = y - y.mean(1, keepdims=True), m - m.mean(1, keepdims=True)
    a = float(np.sum(yc * mc) / np.sum(mc * mc))
    se = d["sigma"] / np.sqrt(np.sum(mc * mc))
    assert abs(a - SCALE) < 5 * se, (a, se)
    np.testing.assert_allclose(np.mean(y - a * m), OFFSET, atol=5 * d["sigma"] / np.sqrt(y.size))


def _reconstruct_w1(star, out, truth, capsys):
    assert main(["reconstruct", str(star), *RECONSTRUCT, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", str(truth), "--json"]) == 0
    w1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["w1"]
    return w1, json.loads((out / "summary.json").read_text())


def test_cryojax_data_reconstruct_as_well_as_cryosip_data(
    cryojax_set, cryosip_set, tmp_path, capsys
):
    """Same reconstruct settings on both sets.

    Bounds: the truth is 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2) on s in [0, 1]. Against it a
    moment-matched single Gaussian has W1 = 0.082 and the uniform 0.092, and moving 10% of the
    mass between the modes (0.47 apart) costs 0.047; so W1 < 0.05 says both modes and their
    weights were recovered. Measured (2026-12-03, 32 particles, 100 steps): cryosip's images
    0.0099, cryojax's 0.0082. Before the envelope fit left out the DC shell, the cryojax set's
    constant offset of 0.5 drove the fitted envelope to B = 1000 A^2 (working box 28 px) and its
    W1 to 0.0331; the bounds below fail on that (and the envelope is checked directly).
    """
    d = cryojax_set
    w1_cryojax, summary = _reconstruct_w1(
        d["root"] / "particles.star", tmp_path / "rec-cryojax", d["root"] / "truth.csv", capsys
    )
    w1_cryosip, _ = _reconstruct_w1(
        cryosip_set / "particles.star", tmp_path / "rec-cryosip", cryosip_set / "truth.csv", capsys
    )
    assert summary["n_images"] == N_IMAGES
    # sigma from the particle background, in the data's own (3.7x, offset) units
    np.testing.assert_allclose(summary["noise_sigma"], d["sigma"], rtol=0.05)
    w1 = {"cryojax": w1_cryojax, "cryosip": w1_cryosip}
    # cryojax renders the model's Gaussians exactly as cryosip does (no envelope): B stays small
    assert summary["calibration"]["envelope_bfactor_A2"] <= 50.0, summary["calibration"]
    assert w1_cryosip < 0.015, w1
    assert w1_cryojax < 0.015, w1
