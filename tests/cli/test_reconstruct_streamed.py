"""`cryosip reconstruct --stream`: minibatches read from disk per step, on one and on two devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_helpers import simulate_adk, streamed_args

from cryosip.cli.main import main

STEPS = "60"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "sim"
    simulate_adk(out, 400)
    return out


def _reconstruct(sim, rec, *extra):
    return streamed_args(sim / "particles.star", rec, *extra, steps=STEPS, pilot_images=128)


def test_streamed_reconstruction_recovers_the_truth(sim, tmp_path, capsys):
    rec = tmp_path / "rec"
    assert main(_reconstruct(sim, rec)) == 0
    for f in [
        "distribution_particles.csv",
        "distribution.csv",
        "free_energy.csv",
        "history.csv",
        "summary.json",
        "density.png",
        "objective.png",
        "trajectories.png",
    ]:
        assert (rec / f).stat().st_size > 0, f
    summary = json.loads((rec / "summary.json").read_text())
    assert (
        summary["streamed"] is True and summary["n_images"] == 400 and summary["batch_size"] == 64
    )
    assert summary["step_size"] > 0  # chosen on the pilot, as the in-memory flow chooses it
    hist = pd.read_csv(rec / "history.csv")["objective"].to_numpy()
    assert hist.size == int(STEPS) and np.isfinite(hist).all()  # one record per streamed minibatch
    capsys.readouterr()
    assert main(["evaluate", str(rec), "--truth", str(sim / "truth.csv"), "--json"]) == 0
    w1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["w1"]
    # measured 0.019 (400 images at SNR 0.1, 60 steps of 64 images, 16 particles)
    assert w1 < 0.04, w1


def test_stream_refuses_baselines_and_devices_without_stream(sim, tmp_path, capsys):
    assert main(_reconstruct(sim, tmp_path / "a", "--method", "em-grid")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stream" in err[0] and "particles.star" in err[0]
    args = [a for a in _reconstruct(sim, tmp_path / "b", "--devices", "2") if a != "--stream"]
    assert main(args) == 2
    assert "--devices needs --stream" in capsys.readouterr().err


@pytest.mark.slow  # the library-level sharding test (tests/sip/test_sharding.py) runs by default
@pytest.mark.parametrize("n_dev", [2])
def test_two_devices_give_the_same_particles(sim, tmp_path, n_dev):
    one, two = tmp_path / "one", tmp_path / "two"
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}", JAX_PLATFORMS="cpu"
    )
    code = "import sys; from cryosip.cli.main import main; sys.exit(main(sys.argv[1:]))"
    for rec, dev in ((one, "1"), (two, str(n_dev))):
        r = subprocess.run(
            [sys.executable, "-c", code, *_reconstruct(sim, rec, "--devices", dev)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((two / "summary.json").read_text())["devices"] == n_dev
    a, b = (pd.read_csv(d / "distribution_particles.csv") for d in (one, two))
    # the same minibatches and keys; only the order of the cross-device sums differs (float32)
    np.testing.assert_allclose(b["s"], a["s"], atol=2e-4)
    np.testing.assert_allclose(b["weight"], a["weight"], atol=2e-4)
