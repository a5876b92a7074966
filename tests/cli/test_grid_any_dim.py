"""em-grid and per-image MAP in any CV dimension: a product grid of ``--nodes`` per CV on the
likelihood table (issue 17: users and the study compare methods on the same data in d > 1)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cryosip.cli.main import main


def test_every_method_on_a_two_cv_model(tmp_path, capsys):
    """The two-hinge toy (two angles in [30, 150] degrees) with a ring distribution, 200 images
    of 32 px at SNR 0.1. Against the truth a uniform answer has W2 15.7 and a moment-matched
    Gaussian 12.9 (the ring's hole); on a 9 x 9 likelihood table grid EM, per-image MAP and the
    default (regularised) KL flow must beat both clearly (W2 < 10; 6.3 measured for 20 x 20 grid
    EM on 300 images). The output holds one column per CV; the flow's summary records the
    bandwidth the cross-validation chose."""
    sim = tmp_path / "sim"
    assert main(["simulate", "--dataset", "two-hinge", "--distribution", "ring", "--n-images",
                 "200", "--box", "32", "--pixel-size", "2", "--snr", "0.1", "--out", str(sim),
                 "--no-progress"]) == 0  # fmt: skip
    for method in ("em-grid", "per-image", "wgf"):
        out = tmp_path / method
        argv = ["reconstruct", str(sim / "particles.star"), "--model", "two-hinge", "--method",
                method, "--nodes", "9", "--bootstrap", "0", "--out", str(out), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        parts = pd.read_csv(out / "distribution_particles.csv")
        assert list(parts.columns[:2]) == ["angle1", "angle2"]
        if method == "em-grid":
            assert len(parts) == 81
        np.testing.assert_allclose(parts["weight"].sum(), 1.0, rtol=1e-5)
        if method == "wgf":
            reg = json.loads((out / "summary.json").read_text())["regularisation"]
            assert 0.0 <= reg["bandwidth_relative"] <= 0.13
            np.testing.assert_allclose(
                reg["bandwidth"], [120.0 * reg["bandwidth_relative"]] * 2, rtol=1e-5
            )
        capsys.readouterr()
        assert main(["evaluate", str(out), "--truth", str(sim / "truth.csv"), "--json"]) == 0
        w2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["w2"]
        assert w2 < 10.0, (method, w2)
