"""The fit check: quiet when the recovered measure explains the images, loud when it does not.

cryojax images with exact written poses at SNR 0.1 (the easiest data, where a false alarm is
most visible), and a recovered measure written as the regularised flow writes it: 64
particles, each spread over 17 kernel points (1,088 equal-weight points, particle after
particle; :func:`cryosip.sip.smoothing.expand_particles`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from cli_helpers import write_adk_ca_ends
from cryojax_sets import ForeignSpec, make_foreign_set

from cryosip.data.models import load_model
from cryosip.data.particles import read_particles
from cryosip.pipeline.fitcheck import _support, fit_check
from cryosip.pipeline.methods import MethodResult
from cryosip.pipeline.problem import prepare
from cryosip.sip.smoothing import expand_particles


@pytest.fixture(scope="module")
def problem_and_truth(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitcheck")
    model = load_model(write_adk_ca_ends(root / "ends"), atoms="ca")
    spec = ForeignSpec(
        n_images=300, box=64, pixel_size=2.0, snr=0.1,
        angle_error_deg=0.0, shift_error_A=0.0, defocus_error_A=0.0, seed=3,
    )  # fmt: skip
    data = make_foreign_set(root / "data", model, spec)
    problem = prepare(read_particles(root / "data" / "particles.star"), model, progress=False)
    return problem, np.asarray(data["s"])[:, 0]


def _rho_h(s: np.ndarray, lo: float, hi: float) -> MethodResult:
    """64 particles at the true CVs' quantiles, each spread by a kernel of 0.065 of the range."""
    centres = np.quantile(s, (np.arange(64) + 0.5) / 64)
    x, w = expand_particles(centres, np.full(64, 1 / 64), 0.065 * (hi - lo), [lo], [hi])
    return MethodResult("wgf", "kl", x, w, 0.0)


def test_no_false_alarm_on_exact_poses(problem_and_truth):
    """Before: the check scored only the 256 heaviest points, which for equal weights are the
    first 15 particles (25 % of the mass): the images of the missing conformations left signal
    in the residuals (+1.7 %, z = 9.5 on the 300-image set of benchmarks/foreign_stress.py).
    Now every point is scored: no warning, residual power within 0.5 % of the noise."""
    problem, s = problem_and_truth
    res = _rho_h(s, float(problem.lower[0]), float(problem.upper[0]))
    assert len(res.weights) == 1088
    check = fit_check(problem, res, key=jax.random.key(0))
    assert check.ok, check.warnings
    assert abs(check.statistics["chi2_excess"]) < 0.005


def test_warns_when_the_measure_misses_conformations(problem_and_truth):
    """The same images against a measure on the lowest fifth of the true CVs only: the other
    images are not explained, and the check says so. (A measure on the lower half, 0.35 of the
    range short of the upper mode, is a +1.0 % excess at z = 3.9 with 300 images of 64 px: just
    under the check's z = 4, the limit of its power at this size.)"""
    problem, s = problem_and_truth
    res = _rho_h(s[s < np.quantile(s, 0.2)], float(problem.lower[0]), float(problem.upper[0]))
    check = fit_check(problem, res, key=jax.random.key(0))
    assert not check.ok
    assert any("signal left in the residuals" in w for w in check.warnings), check.warnings
    assert check.statistics["chi2_excess"] > 0.005


def test_support_resamples_instead_of_cutting():
    """Equal weights above the cap: a systematic resample that keeps every part of the measure
    (each of 64 particles' 17 points -> 4 of them), not the first ``max_points``."""
    w = np.full(1088, 1 / 1088)
    idx, wk = _support(w, 256)
    np.testing.assert_allclose(wk.sum(), 1.0, rtol=1e-12)
    per_particle = np.bincount(idx // 17, weights=wk, minlength=64)
    np.testing.assert_allclose(per_particle, 1 / 64, atol=1 / 256)
    # points without mass are left out; below the cap nothing else changes
    w2 = np.r_[np.full(10, 0.1), np.zeros(5)]
    idx2, wk2 = _support(w2, 256)
    np.testing.assert_array_equal(idx2, np.arange(10))
    np.testing.assert_allclose(wk2, 0.1, rtol=1e-12)


def test_posteriors_do_not_depend_on_the_chunking(problem_and_truth):
    """posterior_responsibilities pads its last chunk (one compiled shape for every chunk): the
    same numbers whatever the chunk size, rows summing to one."""
    from cryosip.pipeline.methods import posterior_responsibilities

    problem, s = problem_and_truth
    res = _rho_h(s, float(problem.lower[0]), float(problem.upper[0]))
    whole = posterior_responsibilities(problem, res)
    chunked = posterior_responsibilities(problem, res, chunk=64)  # 300 = 4 x 64 + 44
    assert whole.shape == (300, 1088)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(whole.sum(1), 1.0, rtol=1e-5)


def test_fit_check_does_not_depend_on_the_chunking(problem_and_truth, monkeypatch):
    """The check renders and reduces its images CHUNK at a time (the last chunk padded, chunks
    on threads): the statistics and curves are those of one pass over all 300 images."""
    import cryosip.pipeline.fitcheck as fc

    problem, s = problem_and_truth
    res = _rho_h(s, float(problem.lower[0]), float(problem.upper[0]))
    monkeypatch.setattr(fc, "CHUNK", 512)
    whole = fit_check(problem, res, key=jax.random.key(0))
    monkeypatch.setattr(fc, "CHUNK", 64)  # 300 = 4 x 64 + 44
    chunked = fit_check(problem, res, key=jax.random.key(0))
    assert whole.curves["chi2"].shape == (300,)
    for name in ("chi2", "chi2_predicted", "scale", "scale_predicted"):
        np.testing.assert_allclose(chunked.curves[name], whole.curves[name], rtol=1e-5, atol=0)
    for name in ("residual_spectrum", "residual_spectrum_predicted"):
        np.testing.assert_allclose(chunked.curves[name], whole.curves[name], rtol=1e-9)
    for name in ("chi2_per_mode", "chi2_per_mode_predicted", "scale_sd", "scale_sd_predicted"):
        np.testing.assert_allclose(chunked.statistics[name], whole.statistics[name], rtol=1e-6)
