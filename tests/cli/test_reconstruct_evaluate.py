"""End to end through the CLI: simulate (STAR + mrcs) -> reconstruct -> evaluate, checking numbers."""

import json

import numpy as np
import pandas as pd

from cryosip.cli.main import main


def test_simulate_reconstruct_evaluate(tmp_path, capsys):
    sim, rec = tmp_path / "sim", tmp_path / "rec"
    assert main(["simulate", "--dataset", "adk-ca", "--distribution", "bimodal", "--n-images", "300", "--box", "32",
                 "--pixel-size", "3.0", "--snr", "0.1", "--seed", "0", "--out", str(sim), "--no-progress"]) == 0
    assert main(["reconstruct", str(sim / "particles.star"), "--model", "adk-ca", "--objective", "kl",
                 "--n-particles", "32", "--steps", "100", "--bootstrap", "2", "--nodes", "25", "--seed", "0",
                 "--heldout", "0.1", "--out", str(rec), "--no-progress"]) == 0
    for f in ["particles.csv", "distribution.csv", "free_energy.csv", "history.csv", "summary.json",
              "density.png", "objective.png", "trajectories.png", "particles_cv.star", "config.json"]:
        assert (rec / f).exists(), f
    dist = pd.read_csv(rec / "distribution.csv")
    np.testing.assert_allclose(np.trapezoid(dist["density"], dist["s"]), 1.0, rtol=1e-3)
    assert (dist["density_lo"] <= dist["density_hi"] + 1e-12).all()
    hist = pd.read_csv(rec / "history.csv")
    held = hist["heldout_objective"].dropna()
    assert len(held) >= 3 and np.isfinite(held).all()
    capsys.readouterr()
    assert main(["evaluate", str(rec), "--truth", str(sim / "truth.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["w1"] < 0.05, out
    saved = json.loads((rec / "evaluation.json").read_text())
    np.testing.assert_allclose(saved["w1"], out["w1"], rtol=1e-12)
    summary = json.loads((rec / "summary.json").read_text())
    assert summary["n_images"] == 300 and np.isfinite(summary["final_objective"])


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--truth", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "particles.csv" in err[0]
