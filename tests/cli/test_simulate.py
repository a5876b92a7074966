"""`cryosip simulate`: files round-trip exactly, conventions round-trip, seeds reproduce."""

from __future__ import annotations

import json

import jax
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosip.cli.main import main
from cryosip.cli.simulate import SimulateConfig, build_distribution, build_operator
from cryosip.cryoem.pose import euler_to_matrix
from cryosip.data.star import read_star
from cryosip.pipeline.simulate import render_clean, simulate_dataset

ARGS = [
    "simulate",
    "--dataset",
    "dumbbell",
    "--distribution",
    "bimodal",
    "--n-images",
    "40",
    "--box",
    "32",
    "--pixel-size",
    "2",
    "--snr",
    "0.1",
    "--seed",
    "0",
    "--chunk",
    "16",
    "--images-per-file",
    "25",
    "--no-progress",
]
FILES = [
    "particles.star",
    "particles_000.mrcs",
    "particles_001.mrcs",
    "truth.csv",
    "config.json",
    "montage.png",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    assert main(ARGS + ["--out", str(root / "a")]) == 0
    # the same settings through --config (same seed), and a different seed
    assert (
        main(
            [
                "simulate",
                "--config",
                str(root / "a" / "config.json"),
                "--no-progress",
                "--out",
                str(root / "b"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "simulate",
                "--config",
                str(root / "a" / "config.json"),
                "--seed",
                "1",
                "--no-progress",
                "--out",
                str(root / "c"),
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def in_memory(runs):
    cfg = SimulateConfig.from_dict(json.loads((runs / "a" / "config.json").read_text()))
    op = build_operator(cfg)
    dist = build_distribution(cfg, op.conformation)
    # default chunking (1000) differs from the CLI's 16: the result must not depend on it
    return op, simulate_dataset(jax.random.key(cfg.seed), op, dist, cfg.n_images, snr=cfg.snr)


def test_files_and_numbers(runs):
    out = runs / "a"
    for f in FILES:
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["dataset"] == "dumbbell" and cfg["distribution"] == "bimodal"
    d = cfg["derived"]
    # the pilot is the whole (40-image) data set here, so the measured SNR is the requested one
    np.testing.assert_allclose(d["snr_measured_on_pilot"], 0.1, rtol=1e-5)
    assert d["sigma"] > 0 and d["cv_names"] == ["separation"]
    assert d["files"]["stacks"] == ["particles_000.mrcs", "particles_001.mrcs"]
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.columns) == ["separation"] and len(truth) == 40
    assert truth["separation"].between(10.0, 40.0).all()
    with mrcfile.open(out / "particles_000.mrcs", permissive=True) as m:
        assert m.data.shape == (25, 32, 32) and m.data.dtype == np.float32
        np.testing.assert_allclose(float(m.voxel_size.x), 2.0, rtol=1e-6)
        assert m.header.ispg == 0


def test_read_back_equals_in_memory(runs, in_memory):
    _, sim = in_memory
    out = runs / "a"
    stack = read_star(out / "particles.star")
    assert len(stack) == 40 and stack.box_size == 32
    np.testing.assert_allclose(stack.pixel_size, 2.0, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(stack.images), sim.stack.images)  # bit for bit
    np.testing.assert_allclose(stack.nuisance.rotation, sim.stack.nuisance.rotation, atol=2e-6)
    np.testing.assert_allclose(
        stack.nuisance.shift_in_angstroms, sim.stack.nuisance.shift_in_angstroms, atol=1e-6
    )
    for field in (
        "defocus_u_in_angstroms",
        "defocus_v_in_angstroms",
        "defocus_angle_in_degrees",
        "voltage_in_kilovolts",
        "spherical_aberration_in_mm",
        "amplitude_contrast",
        "phase_shift_in_degrees",
        "bfactor_in_angstroms2",
        "scale",
    ):
        np.testing.assert_allclose(
            getattr(stack.nuisance.ctf, field),
            getattr(sim.stack.nuisance.ctf, field),
            rtol=1e-7,
            atol=0,
            err_msg=field,
        )
    truth = pd.read_csv(out / "truth.csv").to_numpy(np.float32)
    np.testing.assert_array_equal(truth, sim.theta)
    # the defocus is per particle, in the requested range, with astigmatism
    dfu = np.asarray(stack.nuisance.ctf.defocus_u_in_angstroms)
    dfv = np.asarray(stack.nuisance.ctf.defocus_v_in_angstroms)
    assert np.unique(dfu).size == 40 and np.all(dfu >= dfv) and np.any(dfu > dfv)
    assert 9000 < dfv.min() and dfu.max() < 26000


def test_files_read_directly_with_starfile_and_mrcfile(runs, in_memory):
    """Independent of our reader: the RELION 3.1 tables and the 1-based image names."""
    _, sim = in_memory
    out = runs / "a"
    blocks = starfile.read(out / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], 2.0)
    assert int(optics["rlnImageSize"].iloc[0]) == 32
    np.testing.assert_allclose(optics["rlnVoltage"], 300.0)
    stacks = {}
    for i, name in enumerate(parts["rlnImageName"]):
        idx, fname = name.split("@")
        if fname not in stacks:
            with mrcfile.open(out / fname, permissive=True) as m:
                stacks[fname] = np.array(m.data)
        np.testing.assert_array_equal(stacks[fname][int(idx) - 1], sim.stack.images[i])
    A = np.asarray(
        euler_to_matrix(
            parts["rlnAngleRot"].to_numpy(np.float32),
            parts["rlnAngleTilt"].to_numpy(np.float32),
            parts["rlnAnglePsi"].to_numpy(np.float32),
        )
    )
    np.testing.assert_allclose(A, sim.stack.nuisance.rotation, atol=2e-5)
    # rlnOriginX/YAngst = -(the particle's displacement from the box centre), in Angstrom
    origin = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(
        origin, -np.asarray(sim.stack.nuisance.shift_in_angstroms), atol=1e-6
    )
    np.testing.assert_allclose(
        parts["rlnDefocusU"], sim.stack.nuisance.ctf.defocus_u_in_angstroms, rtol=1e-7
    )
    assert set(parts["rlnRandomSubset"]) == {1, 2}


def test_resimulated_clean_images_match(runs, in_memory):
    """Render each particle again from the *parsed* pose, shift, CTF and truth CV."""
    op, sim = in_memory
    out = runs / "a"
    stack = read_star(out / "particles.star")
    truth = pd.read_csv(out / "truth.csv").to_numpy(np.float32)
    clean = render_clean(
        op, truth, jax.tree_util.tree_map(np.asarray, stack.nuisance), batch_size=64
    )
    scale = np.abs(sim.clean).max()
    np.testing.assert_allclose(clean, sim.clean, atol=2e-4 * scale)
    # and what is left in the written images is white noise of the recorded sigma
    sigma = json.loads((out / "config.json").read_text())["derived"]["sigma"]
    resid = np.asarray(stack.images) - clean
    np.testing.assert_allclose(resid.std(), sigma, rtol=0.02)
    np.testing.assert_allclose(resid.mean(), 0.0, atol=0.02 * sigma)


def test_same_seed_identical_bytes_different_seed_different_noise(runs):
    a, b, c = runs / "a", runs / "b", runs / "c"
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for f in ("particles_000.mrcs", "truth.csv"):
        assert (a / f).read_bytes() != (c / f).read_bytes(), f
    with mrcfile.open(a / "particles_000.mrcs") as ma, mrcfile.open(c / "particles_000.mrcs") as mc:
        corr = np.corrcoef(ma.data.ravel(), mc.data.ravel())[0, 1]
    assert abs(corr) < 0.1  # at SNR 0.1 with new poses and noise the images are unrelated
    assert json.loads((c / "config.json").read_text())["seed"] == 1


def test_refuses_to_overwrite_and_two_d_toy_with_sigma(runs, tmp_path, capsys):
    assert main(ARGS + ["--out", str(runs / "a")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    out = tmp_path / "two"
    assert (
        main(
            [
                "simulate",
                "--dataset",
                "two-hinge",
                "--distribution",
                "ring",
                "--n-images",
                "6",
                "--box",
                "32",
                "--pixel-size",
                "2.5",
                "--sigma",
                "0.5",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.columns) == ["angle1", "angle2"] and len(truth) == 6
    assert truth.ge(30.0).all().all() and truth.le(150.0).all().all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["snr"] is None and cfg["sigma"] == 0.5 and cfg["derived"]["sigma"] == 0.5
    assert read_star(out / "particles.star").box_size == 32
