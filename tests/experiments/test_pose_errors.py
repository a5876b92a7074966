"""The pose-errors study: its pieces, its command line at a tiny size."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from cryosip.cli import experiment as cli_experiment
from cryosip.experiments import pose_errors as study


def _parser():
    p = argparse.ArgumentParser()
    cli_experiment.add_args(p)
    return p


def test_marginal_conditions():
    rots, shifts = (0.0, 5.0, 10.0), (0.0, 2.0)
    assert study.marginal_conditions(rots, shifts, "axes") == {
        (0.0, 0.0),
        (5.0, 0.0),
        (10.0, 0.0),
        (0.0, 2.0),
        (10.0, 2.0),
    }
    assert len(study.marginal_conditions(rots, shifts, "all")) == 6
    assert study.marginal_conditions(rots, shifts, "none") == set()
    with pytest.raises(ValueError, match="marginal mode"):
        study.marginal_conditions(rots, shifts, "some")


def test_draw_logliks_is_the_gaussian_loglik_of_the_noisy_image():
    rng = np.random.default_rng(0)
    N, K, G, D, sigma = 3, 4, 5, 50, 0.7
    c, e = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    m = rng.normal(size=(N, K, G, D))
    stats = (
        np.einsum("nkgd,nd->nkg", m, c).astype(np.float32),
        np.einsum("nkgd,nd->nkg", m, e).astype(np.float32),
        np.einsum("nkgd,nkgd->nkg", m, m).astype(np.float32),
    )
    got = study.draw_logliks(stats, np.sum(c * c, 1), np.sum(c * e, 1), np.sum(e * e, 1), sigma, D)
    y = c + sigma * e
    want = -0.5 * np.sum((y[:, None, None] - m) ** 2, -1) / sigma**2 - 0.5 * D * np.log(
        2 * np.pi * sigma**2
    )
    assert got.shape == (N, K, G) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5)


# one seed, 150 images (64 px, 2 A/px: the study's fixed scene), SNR 0.01, 9 CV nodes,
# 4 pose draws per image in the marginal
TINY = ["--seed", "0", "--n-images", "150", "--n-draws", "4", "--n-nodes", "9"]


def _w1(path):
    df = pd.read_csv(path)
    assert np.isfinite(df[["w1", "w2"]]).all().all()
    return df, {
        (r.rotation_error_in_degrees, r.shift_error_in_angstroms, r.variant, r.method): r.w1
        for r in df.itertuples()
    }


def test_cli_tiny_grid_methods_recover_with_the_marginal(tmp_path):
    out = tmp_path / "pose"
    args = _parser().parse_args(
        [
            "pose-errors",
            "--out",
            str(out),
            "--rotation-errors-in-degrees",
            "0,10",
            "--shift-errors-in-angstroms",
            "0",
            "--methods",
            "em-grid,per-image",
            *TINY,
        ]
    )
    assert cli_experiment.main(args) == 0
    for name in ("pose_errors.csv", "pose_errors_summary.csv", "pose_errors.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["marginal_conditions"] == [[0.0, 0.0], [10.0, 0.0]]
    df, w1 = _w1(out / "pose_errors.csv")
    # (0, 0) has no refine variant (nothing to refine); 10 degrees gets given, marginal, refine
    assert set(w1) == {
        *(
            (r, 0.0, v, m)
            for r in (0.0, 10.0)
            for v in ("given", "marginal")
            for m in ("em-grid", "per-image")
        ),
        *((10.0, 0.0, "refine", m) for m in ("em-grid", "per-image")),
        (0.0, 0.0, "oracle", "oracle"),
    }
    # at (0, 0) the marginal table is the given-pose log-likelihood at the nodes, and em-grid only
    # reads the nodes: the same weights (measured: the same W1 to all digits, 0.0352)
    np.testing.assert_allclose(
        w1[0.0, 0.0, "marginal", "em-grid"], w1[0.0, 0.0, "given", "em-grid"], rtol=1e-6
    )
    # the sampling floor (measured 0.0123) is below every estimate (lowest: per-image, 0.0205)
    oracle = w1.pop((0.0, 0.0, "oracle", "oracle"))
    assert all(oracle < 0.75 * v for v in w1.values())
    assert all(v < 0.1 for v in w1.values())
    # 10 degrees rms of pose error: em-grid 0.035 -> 0.070, per-image 0.021 -> 0.075
    assert w1[10.0, 0.0, "given", "em-grid"] > 1.5 * w1[0.0, 0.0, "given", "em-grid"]
    assert w1[10.0, 0.0, "given", "per-image"] > 2.5 * w1[0.0, 0.0, "given", "per-image"]
    # marginalising over 4 pose draws (or taking the best of them) recovers part of the loss:
    # measured ratios to the given poses 0.67 (marginal em-grid), 0.75 (marginal per-image),
    # 0.72 (refine em-grid), 0.77 (refine per-image)
    for variant in ("marginal", "refine"):
        for m in ("em-grid", "per-image"):
            assert w1[10.0, 0.0, variant, m] < 0.87 * w1[10.0, 0.0, "given", m], (variant, m)

    summary = pd.read_csv(out / "pose_errors_summary.csv")
    assert len(summary) == len(df) and (summary["n_seeds"] == 1).all()


@pytest.mark.slow
def test_cli_tiny_study_with_flows_and_shifts(tmp_path):
    out = tmp_path / "pose"
    args = _parser().parse_args(
        [
            "pose-errors",
            "--out",
            str(out),
            "--rot-errors",
            "0,10",
            "--shift-errors",
            "0,2",
            "--n-particles",
            "16",
            "--n-steps",
            "40",
            *TINY,
        ]
    )
    assert cli_experiment.main(args) == 0
    _, w1 = _w1(out / "pose_errors.csv")
    errors = ((0.0, 2.0), (10.0, 0.0), (10.0, 2.0))
    for m in study.GIVEN_METHODS:
        # both errors together: at least 2x worse with the given poses (measured 2.9x to 4.7x)
        assert w1[10.0, 2.0, "given", m] > 2 * w1[0.0, 0.0, "given", m], m
    for rot, shift in errors:
        for m in study.MARGINAL_METHODS:
            # the marginal beats the given poses everywhere (measured ratios 0.52 to 0.84)
            assert w1[rot, shift, "marginal", m] < w1[rot, shift, "given", m], (rot, shift, m)
    for rot, shift in errors[:2]:
        # with one error type, the KL flow on the marginal: measured ratios 0.52 and 0.68
        assert w1[rot, shift, "marginal", "wgf-kl"] < 0.8 * w1[rot, shift, "given", "wgf-kl"]
