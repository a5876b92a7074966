"""Calibration finds what the files do not say: the envelope, the contrast sign, the noise,
and a working box that keeps the CV's signal."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from cryojax_sets import ForeignSpec, make_foreign_set

from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.data.adk import adk_model
from cryosip.data.distributions import make_distribution
from cryosip.data.models import load_model
from cryosip.data.particles import read_particles
from cryosip.pipeline.calibrate import calibrate
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.pipeline.simulate import simulate_dataset


def test_envelope_contrast_and_noise_of_cryojax_images(tmp_path):
    """cryojax images with a B = 60 A^2 envelope and exact written poses (no other blur),
    white protein, white noise at SNR 0.2: B is found on its 10 A^2 grid within 20 A^2 (the
    per-shell fit pools 200 images), the contrast is flipped, the noise sd is within 3%.

    A constant offset on every image (here 30 noise sds, as a normalisation that does not
    subtract the background mean leaves) changes nothing: the offset is a free per-image
    nuisance. Before the DC shell left the envelope fit, such an offset (0.5 on cryojax's
    contrast-unit images) drove B to 1000 A^2 and the W1 of tests/cli/test_cryojax_data.py from
    0.008 to 0.033."""
    model = adk_model(ca_only=True)
    spec = ForeignSpec(
        n_images=200, box=64, pixel_size=2.0, snr=0.2, bfactor=60.0, coloured=False,
        angle_error_deg=0.0, shift_error_A=0.0, defocus_error_A=0.0, seed=5,
    )  # fmt: skip
    data = make_foreign_set(tmp_path, model, spec)
    stack = read_particles(tmp_path / "particles.star")
    _, cal = calibrate(stack, model, box_size=64)
    assert cal.inverted
    np.testing.assert_allclose(cal.bfactor_in_angstroms2, 60.0, atol=20.0)
    np.testing.assert_allclose(cal.input_noise_sigma[0], data["sigma"], rtol=0.03)

    shifted = dataclasses.replace(stack, images=np.asarray(stack.images) + 30.0 * data["sigma"])
    _, cal_shifted = calibrate(shifted, model, box_size=64)
    assert cal_shifted.inverted
    np.testing.assert_allclose(
        cal_shifted.bfactor_in_angstroms2, cal.bfactor_in_angstroms2, atol=10.0
    )
    np.testing.assert_allclose(
        cal_shifted.input_noise_sigma[0], cal.input_noise_sigma[0], rtol=0.01
    )


def test_working_box_keeps_the_cv_signal_and_crops_smooth_models():
    """A coarse toy (dumbbell: two blobs) in a 96-px box at 1.5 A/px: 98% of the signal its CV
    changes lies below 0.1 1/A, so the rule crops to a box whose 3/4-Nyquist holds it (measured
    38 px); C-alpha AdK has CV signal up to 0.37 1/A and keeps its box. The field of view is
    the same after cropping (box x pixel)."""
    got = {}
    for name in ("dumbbell", "adk-ca"):
        m = load_model(name)
        op = CryoEMOperator(
            m, ImageModel.for_atoms(96, 1.5, m.atoms), 1.0, NuisancePrior(shift_sd_in_angstroms=1.0)
        )
        dist = make_distribution("bimodal", m.lower, m.upper)
        sim = simulate_dataset(jax.random.key(0), op, dist, 96, snr=0.1)
        working, cal = calibrate(sim.stack, m, envelope=False)
        np.testing.assert_allclose(cal.box_size * cal.pixel_size, 96 * 1.5, rtol=1e-6)
        assert working.box_size == cal.box_size
        assert cal.information_kept >= 0.98
        shell = cal.noise.cutoff_shell
        if cal.box_size < 96:
            assert shell / (cal.box_size * cal.pixel_size) >= cal.information_cutoff_per_A - 1e-9
        got[name] = cal.box_size
    assert got["dumbbell"] < 64, got
    assert got["adk-ca"] > got["dumbbell"], got


def test_pose_error_estimate_separates_consensus_errors_from_large_ones(tmp_path):
    """Local search on the pilot against a noise-only replicate. Written Euler angles off by
    N(0, 3 degrees) each (an rms rotation of ~5 degrees) and shifts by N(0, 1.5 A) per axis
    (rms length 2.1 A): the estimate is large and significant, so the default averages the
    likelihood over it. Exact poses: the estimate stays below the 3-degree threshold (measured
    ~1 degree: the search's own resolution and the coarse conformation), and nothing is averaged.
    """
    model = adk_model(ca_only=True)
    common = dict(n_images=160, box=64, pixel_size=2.0, snr=0.5, coloured=False, bfactor=0.0)
    off = ForeignSpec(angle_error_deg=3.0, shift_error_A=1.5, seed=7, **common)
    exact = ForeignSpec(
        angle_error_deg=0.0, shift_error_A=0.0, defocus_error_A=0.0, seed=8, **common
    )
    got = {}
    for name, spec in (("off", off), ("exact", exact)):
        make_foreign_set(tmp_path / name, model, spec)
        _, cal = calibrate(read_particles(tmp_path / name / "particles.star"), model, box_size=64)
        got[name] = cal
    e = got["off"].pose_error
    assert got["off"].pose_error_matters is not None, e
    assert 3.0 <= e["rotation_deg"] <= 9.0 and e["rotation_deg_z"] > 4, e
    np.testing.assert_allclose(e["shift_A"], 2.1, atol=0.8)
    assert got["exact"].pose_error_matters is None, got["exact"].pose_error
