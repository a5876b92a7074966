"""The DTO consistency study: its truths, its command line at a tiny size, the dispatcher."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from cryosip import experiments
from cryosip.cli import experiment as cli_experiment
from cryosip.experiments import dto_consistency as study


def test_truths_sample_their_pdf():
    rng = np.random.default_rng(0)
    for truth in study.TRUTHS.values():
        x = truth.sample(rng, 20000)
        assert x.min() >= 0 and x.max() <= 1
        hist, edges = np.histogram(x, bins=20, range=(0, 1), density=True)
        mid = 0.5 * (edges[1:] + edges[:-1])
        grid = np.linspace(0, 1, 2001)
        np.testing.assert_allclose(np.trapezoid(truth.pdf(grid), grid), 1.0, atol=2e-3)
        # bin averages of the pdf vs the histogram: 20,000 draws, ~1,000 per bin -> ~3% noise
        avg = np.array(
            [truth.pdf(np.linspace(a, b, 51)).mean() for a, b in zip(edges[:-1], edges[1:])]
        )
        np.testing.assert_allclose(
            hist, avg, atol=0.15 * max(1.0, avg.max()) / 2, err_msg=truth.name
        )
        assert np.isfinite(mid).all()


def _parser():
    p = argparse.ArgumentParser()
    cli_experiment.add_args(p)
    return p


TINY = [
    "--seed",
    "0",
    "--n-images",
    "96",
    "--box",
    "32",
    "--pixel-size",
    "4",
    "--n-particles",
    "16",
    "--n-flow-steps",
    "30",
    "--n-class-steps",
    "80",
    "--n-nodes",
    "9",
    "--n-boot",
    "2",
    "--snr",
    "0.1",
]


def _rows(path):
    with open(path, newline="") as f:
        return {(r["case"], r["method"], int(r["K"])): r for r in csv.DictReader(f)}


def test_cli_tiny_study_writes_csv_and_plots(tmp_path):
    out = tmp_path / "dto"
    args = _parser().parse_args(
        ["dto-consistency", "--out", str(out), "--ks", "2,8", "--cases", "consistency", *TINY]
    )
    assert cli_experiment.main(args) == 0
    for name in (
        "dto_consistency.csv",
        "dto_summary.csv",
        "dto_consistency.png",
        "dto_family.png",
        "dto_densities.png",
        "config.json",
    ):
        assert (out / name).stat().st_size > 0, name
    get = _rows(out / "dto_consistency.csv")
    em2 = float(get["consistency", "em-grid", 2]["w1_truth"])
    em8 = float(get["consistency", "em-grid", 8]["w1_truth"])
    mc8 = float(get["consistency", "map-classes", 8]["w1_truth"])
    # nodes at 0 and 1 cannot be near a bimodal truth at 0.25 / 0.72 (W1 >= 0.25 for any weights)
    assert em2 > 0.25
    # 8 nodes (spacing 1/7) or 8 free classes: within a few hundredths (96 images at SNR 0.1)
    assert em8 < 0.06 and mc8 < 0.06
    gap = {K: float(get["consistency", "em-grid", K]["loglik_gap"]) for K in (2, 8)}
    assert 0 < gap[8] < gap[2]
    assert float(get["consistency", "wfr", 16]["loglik_gap"]) < 0.05


@pytest.mark.slow
def test_cli_tiny_study_both_cases(tmp_path):
    out = tmp_path / "dto"
    args = _parser().parse_args(["dto-consistency", "--out", str(out), "--ks", "2,8", *TINY])
    assert cli_experiment.main(args) == 0
    get = _rows(out / "dto_consistency.csv")
    methods = {m for (c, m, _) in get if c == "mismatch"}
    assert methods >= {
        "wgf",
        "wfr",
        "gmm-1",
        "gmm-2",
        "gmm-1-best",
        "gmm-2-best",
        "per-image",
        "oracle",
    }
    # a flat truth on [0.1, 0.9]: the best single truncated Gaussian misses it by W1 ~0.02
    np.testing.assert_allclose(
        float(get["mismatch", "gmm-1-best", 1]["w1_truth"]), 0.0226, atol=2e-3
    )


def test_dispatcher_passes_common_options_after_the_name():
    args = _parser().parse_args(["dto-consistency", "--quick", "--ks", "2,4", "--seeds", "1-3"])
    assert cli_experiment.experiment_argv(args) == [
        "--out",
        "dto-consistency",
        "--seeds",
        "1,2,3",
        "--quick",
        "--ks",
        "2,4",
    ]


def test_unknown_experiment_is_a_one_line_error(capsys):
    from cryosip.cli.main import main

    assert main(["experiment", "no-such-study"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no-such-study" in err and "dto-consistency" in err
    assert "dto-consistency" in experiments.available()


def test_experiment_help_is_the_module_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        cli_experiment.run_study("dto-consistency", study, ["-h"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "W1(rho_K, rho*)" in help_text
    # flags generated from the Settings dataclass, with the default and the --quick value
    assert "--n-class-steps" in help_text and "default 500; --quick 300" in help_text
