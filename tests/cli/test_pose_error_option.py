"""`reconstruct --pose-error DEG,A`: the likelihood averaged over pose errors around the given
poses (the pose-marginalised table) runs end to end and recovers the truth."""

from __future__ import annotations

import json

from cli_helpers import simulate_adk

from cryosip.cli.main import main


def test_pose_error_option_reconstructs_and_is_refused_for_mmd(tmp_path, capsys):
    """150 images of 32 px at SNR 0.1 with exact poses: averaging over 1.5 degree / 0.7 A
    errors blurs the likelihood a little; the bimodal truth (W1 0.082 from its moment-matched
    Gaussian) is still recovered to W1 < 0.05."""
    sim = simulate_adk(tmp_path / "sim", 150)
    out = tmp_path / "rec"
    argv = ["reconstruct", str(sim / "particles.star"), "--model", "adk-ca", "--pose-error",
            "1.5,0.7", "--steps", "40", "--bootstrap", "0", "--nodes", "13", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", str(sim / "truth.csv"), "--json"]) == 0
    w1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["w1"]
    assert w1 < 0.05, w1
    bad = argv[:-1] + [str(tmp_path / "rec2"), "--objective", "mmd"]
    assert main(bad) == 2
    assert "--pose-error needs --objective kl" in capsys.readouterr().err
