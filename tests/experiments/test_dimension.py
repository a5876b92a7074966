"""The dimension study: its truths, its units, its grid rule and its command line at a tiny size."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cryosip.analysis.metrics import w2
from cryosip.cli import experiment as cli_experiment
from cryosip.data.errors import CryosipInputError
from cryosip.experiments import dimension as study


def _parser():
    p = argparse.ArgumentParser()
    cli_experiment.add_args(p)
    return p


def test_arc_truth_lies_in_the_box_with_its_two_parts():
    lo, hi = np.array([-4.0, -1.0, -0.5]), np.array([3.0, 1.0, 0.5])
    truth = study.ArcAndMode(lo, hi)
    x = truth.sample(np.random.default_rng(0), 20_000)
    assert x.shape == (20_000, 3) and np.all((x >= lo) & (x <= hi))
    u = (x - lo) / (hi - lo)
    r = np.linalg.norm(u[:, :2] - np.array(truth.center), axis=1)
    on_arc = np.abs(r - truth.radius) < 4 * truth.width
    assert 0.66 < on_arc.mean() < 0.74  # 70 % on the ridge (a few mode points fall near it)
    # reproducible from its generator's seed
    np.testing.assert_array_equal(x, truth.sample(np.random.default_rng(0), 20_000))
    json.dumps(truth.params(), allow_nan=False)


def test_modes_cv_unit_is_angstrom_rms():
    """For the AdK modes the RMS-atom W2 is the CV W2 (1 unit = 1 Angstrom RMS, orthogonal)."""
    model = study.case_model("adk-2")
    truth = study.case_truth(model)
    x, y = truth.sample(np.random.default_rng(1), 60), truth.sample(np.random.default_rng(2), 80)
    w = np.random.default_rng(3).random(60)
    w /= w.sum()
    np.testing.assert_allclose(study.w2_rms(model, x, w, y), w2(x, y, w), rtol=2e-3)


def test_grid_rule():
    # 1 us per entry, 1000 images, 8 s: 8000 nodes -> 20^3, 89^2
    assert study.grid_nodes_per_cv(3, 1000, 8.0, 1e-6, 1e12) == 20
    assert study.grid_nodes_per_cv(2, 1000, 8.0, 1e-6, 1e12) == 89
    assert study.grid_nodes_per_cv(2, 1000, 8.0, 1e-6, 1000 * 50**2) == 50  # the cap
    assert study.grid_nodes_per_cv(4, 1000, 0.01, 1e-6, 1e12) == 4  # at least 4 per CV


# one seed, 120 images of 32 px at 3 A/px, 32 particles, 40 flow steps; AdK 1-D and two-hinge
# (the 2-D AdK modes' unit: test_modes_cv_unit_is_angstrom_rms)
TINY = ["--seed", "0", "--cases", "adk-1,two-hinge", "--n-images", "120", "--box", "32",
        "--pixel-size", "3", "--n-particles", "32", "--n-steps", "40", "--n-reference", "1500"]  # fmt: skip


def test_cli_tiny_run_numbers(tmp_path):
    out = tmp_path / "dimension"
    args = _parser().parse_args(["dimension", "--out", str(out), *TINY])
    assert cli_experiment.main(args) == 0
    for name in ("dimension.csv", "dimension_summary.csv", "summary.json", "config.json",
                 "dimension_w2.png", "dimension_ratio.png", "dimension_maps.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    summary = json.loads(
        (out / "summary.json").read_text(), parse_constant=lambda c: pytest_fail(c)
    )
    assert len(summary["flow_over_grid"]) == 2 and summary["load_average_start"]

    df = pd.read_csv(out / "dimension.csv")
    # every method and the oracle per case, and for d > 1 grid EM on the flow's own table,
    # whose nodes per CV come from the measured interpolation error (sip.loglik_table)
    assert len(df) == 2 * (len(study.METHODS) + 1) + 1
    own = df[df["method"] == "em-table"].iloc[0]
    assert own["case"] == "two-hinge"
    assert own["grid_nodes"] == np.prod([int(k) for k in own["table_shape"].split("x")])
    assert np.isfinite(df[["w2", "w2_rms", "seconds"]]).all().all()
    # W2 below a fraction of the truth's spread (the W2 of a point mass at its mean); measured:
    # adk-1 0.26 (flow), 0.27 (grid), 0.30 (per-image) of 2.4 A; two-hinge 0.52, 0.55, 0.71 of 30 deg;
    # the paired-MMD flow (not regularised; direct operator in 2-D) between the KL flow and per-image
    bounds = {"adk-1": (0.4, 0.45), "two-hinge": (0.7, 0.9)}  # (KL flow and grid, the others)
    for case, d in (("adk-1", 1), ("two-hinge", 2)):
        rows = df[df["case"] == case].set_index("method")
        assert (rows["d"] == d).all()
        model = study.case_model(case)
        n_ref = study.N_REFERENCE_1D if d == 1 else 1500
        ref = study.case_truth(model).sample(np.random.default_rng(12345), n_ref)
        bound = study.spread(ref)  # W2 from the truth to a point mass at its mean
        for m in study.METHODS:
            frac = bounds[case][m in ("per-image", "wgf-mmd")]
            assert rows.loc[m, "w2"] < frac * bound, (case, m)
            assert rows.loc["oracle", "w2"] < rows.loc[m, "w2"], (case, m)
        if case == "two-hinge":  # Angstrom RMS, a different number than degrees
            assert 0 < rows.loc["wgf-kl", "w2_rms"] < 0.3 * rows.loc["wgf-kl", "w2"]
        else:
            np.testing.assert_array_equal(rows["w2_rms"], rows["w2"])
        # the grid rule, from the recorded measurements
        g = rows.loc["em-grid"]
        k = study.grid_nodes_per_cv(d, 120, g["flow_seconds"], g["seconds_per_entry"], 5e7)
        assert g["grid_rule_per_cv"] == k >= 4
        # then held to its budget by its own measured time (hold_to_budget, tested above; its
        # steady-state times are not recorded, the grid's whole time with compilation is)
        kg = int(g["grid_per_cv"])
        assert kg >= 4 and g["grid_nodes"] == kg**d and g["n_support"] <= kg**d

        def cost(k):
            return 120 * k**d * g["seconds_per_entry"]

        assert cost(k) <= g["flow_seconds"] or k == 4
        assert cost(k + 1) > g["flow_seconds"]
        assert 0 <= rows.loc["wgf-kl", "bandwidth_relative"] <= 0.13

    # --replot redraws from the tables; without estimates/ (docs/figures keeps only tables) the
    # maps are left as they are; a folder without the tables is one clear error
    maps = out / "dimension_maps.png"
    before = maps.stat().st_mtime_ns
    assert len(study.replot(out)) == 3 and maps.stat().st_mtime_ns > before
    shutil.rmtree(out / "estimates")
    before = (maps.stat().st_mtime_ns, (out / "dimension_w2.png").stat().st_mtime_ns)
    assert len(study.replot(out)) == 2
    assert maps.stat().st_mtime_ns == before[0] < (out / "dimension_w2.png").stat().st_mtime_ns
    for folder, missing in ((tmp_path / "empty", "dimension.csv"), (tmp_path / "none", "none")):
        if folder.name == "empty":
            folder.mkdir()
        replot = _parser().parse_args(["dimension", "--out", str(folder), "--replot"])
        with pytest.raises(CryosipInputError, match=f"{missing}: (not found|no such folder)"):
            cli_experiment.main(replot)
    assert not (tmp_path / "none").exists()


def pytest_fail(const):
    raise AssertionError(f"non-strict JSON constant {const}")


def test_hold_to_budget_steps_down_an_overrun_and_up_to_what_fits(monkeypatch):
    """The grid re-sized from its own measured time (2-D, 100 images, 1 ms per entry, a 10.5-s
    budget: 10 nodes per CV fit, 11 do not)."""

    class Problem:
        observations = range(100)
        lower = np.zeros(2)

    def table(cost):  # (table, steady seconds, seconds with 0.5 s of compilation)
        return lambda problem, k: (f"t{k}", 100 * k**2 * cost, 100 * k**2 * cost + 0.5)

    monkeypatch.setattr(study, "_table", table(1e-3))
    k, (t, sec, total) = study.hold_to_budget(Problem(), 12, ("t12", 14.4, 14.9), 10.5, 10**9)
    assert (k, t) == (10, "t10") and abs(sec - 10.0) < 1e-9 and abs(total - 10.5) < 1e-9
    k, (t, _, _) = study.hold_to_budget(Problem(), 8, ("t8", 6.4, 6.9), 10.5, 10**9)
    assert (k, t) == (10, "t10")  # undersized: stepped up
    right = ("t10", 10.0, 10.5)
    assert study.hold_to_budget(Problem(), 10, right, 10.5, 10**9) == (10, right)
    # the larger grid is run, but when it overruns the one that fit is kept
    monkeypatch.setattr(study, "_table", table(1.5e-3))
    small = ("t8", 6.4, 6.9)
    assert study.hold_to_budget(Problem(), 8, small, 10.5, 10**9) == (8, small)
