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
    EM on 300 images); so must the flow on the table whose nodes per CV the pilot chose (no
    ``--nodes``). The output holds one column per CV; the flow's summary records the bandwidth
    the cross-validation chose and, without ``--nodes``, the table's nodes per CV."""
    sim = tmp_path / "sim"
    assert main(["simulate", "--dataset", "two-hinge", "--distribution", "ring", "--n-images",
                 "200", "--box", "32", "--pixel-size", "2", "--snr", "0.1", "--out", str(sim),
                 "--no-progress"]) == 0  # fmt: skip
    for method in ("em-grid", "per-image", "wgf", "wgf-default"):
        out = tmp_path / method
        nodes = [] if method == "wgf-default" else ["--nodes", "9"]
        argv = ["reconstruct", str(sim / "particles.star"), "--model", "two-hinge", "--method",
                method.split("-default")[0], *nodes, "--bootstrap", "0", "--out", str(out),
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        parts = pd.read_csv(out / "distribution_particles.csv")
        assert list(parts.columns[:2]) == ["angle1", "angle2"]
        if method == "em-grid":
            assert len(parts) == 81
        np.testing.assert_allclose(parts["weight"].sum(), 1.0, rtol=1e-5)
        summary = json.loads((out / "summary.json").read_text())
        if method == "wgf-default":  # nodes per CV from the measured interpolation error
            tab = summary["likelihood_table"]
            assert len(tab["nodes_per_cv"]) == 2 and min(tab["nodes_per_cv"]) >= 4
            assert np.prod(tab["nodes_per_cv"]) <= tab["max_nodes"]
            assert max(tab["expected_interpolation_error_nats"]) <= tab["tolerance_nats"] or (
                tab["nodes_per_cv"] != tab["nodes_needed_per_cv"]
            )
        else:
            assert "likelihood_table" not in summary  # --nodes given: the user's grid
        if method.startswith("wgf"):
            reg = summary["regularisation"]
            assert 0.0 <= reg["bandwidth_relative"] <= 0.13
            np.testing.assert_allclose(
                reg["bandwidth"], [120.0 * reg["bandwidth_relative"]] * 2, rtol=1e-5
            )
        capsys.readouterr()
        assert main(["evaluate", str(out), "--truth", str(sim / "truth.csv"), "--json"]) == 0
        w2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["w2"]
        assert w2 < 10.0, (method, w2)
