"""`cryosip simulate --noise-spectrum` makes coloured noise with the same object the
reconstruction estimates and whitens with, and the estimate finds the colour back."""

from __future__ import annotations

import numpy as np
import pandas as pd
from cli_helpers import simulate_adk

from cryosip.cryoem.noise import RadialNoiseSpectrum
from cryosip.data.adk import adk_model
from cryosip.data.particles import read_particles
from cryosip.pipeline.calibrate import calibrate


def _shape(spec: RadialNoiseSpectrum) -> np.ndarray:
    p = np.asarray(spec.power, np.float64)[0]
    return p / p[-4:].mean()


def test_detector_noise_is_estimated_back_and_round_trips_through_csv(tmp_path):
    """400 images at SNR 0.05: the residual spectrum per shell averages >= 6 modes x 400
    images (a few per cent); the signal left in the residuals at SNR 0.05 adds a few per cent
    at low frequency. Tolerance 15%."""
    sim = simulate_adk(tmp_path / "sim", 400, snr=0.05, extra=["--noise-spectrum", "detector"])
    stack = read_particles(sim / "particles.star")
    _, cal = calibrate(stack, adk_model(ca_only=True), box_size=stack.box_size, envelope=False)
    want = _shape(RadialNoiseSpectrum.detector_like(32, 3.0))
    got = _shape(cal.noise)
    np.testing.assert_allclose(got[1:], want[1:], rtol=0.15)
    assert got[1] > 2.5  # coloured: the low-frequency excess is found
    # the estimate, written as a reconstruction writes it, drives the simulator again
    pd.DataFrame(cal.noise.to_table()).to_csv(tmp_path / "noise_spectrum.csv", index=False)
    sim2 = simulate_adk(
        tmp_path / "sim2",
        400,
        snr=0.05,
        extra=["--noise-spectrum", tmp_path / "noise_spectrum.csv"],
    )
    _, cal2 = calibrate(read_particles(sim2 / "particles.star"), adk_model(ca_only=True),
                        box_size=32, envelope=False)  # fmt: skip
    np.testing.assert_allclose(_shape(cal2.noise)[1:], got[1:], rtol=0.15)
