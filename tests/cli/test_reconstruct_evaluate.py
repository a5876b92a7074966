"""End to end through the CLI: simulate (STAR + mrcs) -> reconstruct -> evaluate, checking numbers."""

import json

import numpy as np
import pandas as pd
from cli_helpers import simulate_adk

from cryosip.cli.main import main


def test_simulate_reconstruct_evaluate(tmp_path, capsys):
    sim, rec = tmp_path / "sim", tmp_path / "rec"
    simulate_adk(sim, 300)
    assert (
        main(
            [
                "reconstruct",
                str(sim / "particles.star"),
                "--model",
                "adk-ca",
                "--objective",
                "kl",
                "--n-particles",
                "32",
                "--steps",
                "100",
                "--bootstrap",
                "2",
                "--nodes",
                "25",
                "--seed",
                "0",
                "--heldout",
                "0.1",
                "--out",
                str(rec),
                "--no-progress",
            ]
        )
        == 0
    )
    for f in [
        "distribution_particles.csv",
        "distribution.csv",
        "free_energy.csv",
        "history.csv",
        "summary.json",
        "density.png",
        "objective.png",
        "trajectories.png",
        "particles_cv.star",
        "config.json",
    ]:
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
    assert summary["step_size"] > 0  # the flow's step size, as its policy resolved it


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--truth", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distribution_particles.csv" in err[0]


def test_inverted_contrast_is_detected_and_flipped(tmp_path, caplog):
    import jax

    from cryosip import prepare, run_method
    from cryosip.cryoem.image_model import ImageModel, NuisancePrior
    from cryosip.data.adk import adk_model
    from cryosip.data.distributions import make_distribution
    from cryosip.pipeline.calibrate import calibrate
    from cryosip.pipeline.operator import CryoEMOperator
    from cryosip.pipeline.simulate import simulate_dataset

    model = adk_model(ca_only=True)
    op = CryoEMOperator(
        model,
        ImageModel.for_atoms(32, 3.0, model.atoms),
        1.0,
        NuisancePrior(shift_sd_in_angstroms=1.0),
    )
    sim = simulate_dataset(
        jax.random.key(2), op, make_distribution("bimodal", model.lower, model.upper), 200, snr=0.1
    )
    a = calibrate(sim.stack, model, sigma=sim.sigma)[1].pooled_scale
    assert 0.5 < a < 1.5, a
    sim.stack.images = -sim.stack.images  # RELION-style white protein
    from cryosip.analysis.metrics import w1

    got = {}
    for mode in ["auto", "as-is"]:
        pr = prepare(sim.stack, model, sigma=sim.sigma, contrast=mode, progress=False, n_nodes=25)
        r = run_method(pr, "em-grid", key=jax.random.key(0))
        got[mode] = w1(r.positions[:, 0], sim.theta[:, 0], r.weights)
    assert got["auto"] < 0.05 < got["as-is"], got  # flipped back: recovered; kept inverted: wrong
    assert "inverted contrast" in caplog.text
