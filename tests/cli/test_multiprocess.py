"""`cryosip reconstruct --stream` as several cooperating processes, checkpoints and resume.

Two real processes on 127.0.0.1 (``jax.distributed`` with gloo CPU collectives, one CPU
device each) give the particles of one process; a streamed run killed after its first
checkpoint and resumed ends where an uninterrupted run ends; a process that fails ends the
other one with a message, not a hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from cli_helpers import simulate_adk, streamed_args

from cryosip.cli import _distributed
from cryosip.cli.main import main
from cryosip.data.errors import CryosipInputError

STEPS = 12
CHECKPOINT_EVERY = 4
TIMEOUT = 300  # per subprocess run (seconds); runs take 20-60 s on 2 busy cores
FAILURE_DEADLINE = 120  # both processes must have exited this long after a failure


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "sim"
    simulate_adk(out, 256)
    return out


def _args(sim, out, *extra):
    return streamed_args(sim / "particles.star", out, *extra, steps=STEPS, pilot_images=96)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv, log):
    f = open(log, "w")  # noqa: SIM115 - closed by _finish
    p = subprocess.Popen(
        [sys.executable, "-m", "cryosip.cli.main", *argv],
        env=_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        text=True,
    )
    p.log_file, p.log_path = f, log
    return p


def _finish(p, timeout=TIMEOUT) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.log_file.close()
    with open(p.log_path) as f:
        return rc, f.read()


def _dist(i, port, n=2):
    return [
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(n),
        "--process-id",
        str(i),
        "--distributed-timeout",
        "60",
    ]


def _particles(out):
    return pd.read_csv(out / "distribution_particles.csv")


@pytest.fixture(scope="module")
def reference(sim, tmp_path_factory):
    """One uninterrupted single-process run (checkpointing every few steps)."""
    out = tmp_path_factory.mktemp("mp") / "one"
    assert main(_args(sim, out, "--checkpoint-every", str(CHECKPOINT_EVERY))) == 0
    return out


def test_two_processes_give_the_single_process_particles(sim, reference, tmp_path):
    port = _free_port()
    out0, out1 = tmp_path / "two", tmp_path / "never-written"
    # process 1 is told another --out: it must not create or write anything there
    procs = [
        _start(_args(sim, out0, *_dist(0, port)), tmp_path / "p0.log"),
        _start(_args(sim, out1, *_dist(1, port)), tmp_path / "p1.log"),
    ]
    (rc0, log0), (rc1, log1) = (_finish(p) for p in procs)
    assert rc0 == 0, log0[-3000:]
    assert rc1 == 0, log1[-3000:]
    assert not out1.exists(), "process 1 wrote outputs"
    assert "process 0 writes the outputs" in log1 and "outputs in" not in log1
    assert log0.count("outputs in") == 1
    # each process read only its half of every minibatch
    assert "(32 read here)" in log0 and "(32 read here)" in log1
    summary = json.loads((out0 / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 2
    assert summary["images_read_per_step_per_process"] == 32
    assert json.loads((out0 / "config.json").read_text())["process_id"] == 0
    assert not list(out0.glob("*.tmp*")) and not list(out0.glob("tmp*"))
    a, b = _particles(reference), _particles(out0)
    # the same minibatches, keys and step sizes; only the order of the cross-process sums differs
    # (float32): measured max difference 4e-6
    np.testing.assert_allclose(b["s"], a["s"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(b["weight"], a["weight"], atol=1e-4, rtol=0)
    ha = pd.read_csv(reference / "history.csv")["objective"]
    hb = pd.read_csv(out0 / "history.csv")["objective"]
    np.testing.assert_allclose(hb, ha, rtol=1e-4)


def test_killed_streamed_run_resumes_to_the_uninterrupted_particles(sim, reference, tmp_path):
    out = tmp_path / "killed"
    ck = out / "checkpoint.npz"
    p = _start(_args(sim, out, "--checkpoint-every", str(CHECKPOINT_EVERY)), tmp_path / "k.log")
    t0 = time.monotonic()
    while not ck.exists() and p.poll() is None and time.monotonic() - t0 < TIMEOUT:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    rc, log = _finish(p)
    assert rc == -signal.SIGKILL, log[-3000:]
    assert not (out / "summary.json").exists()
    with np.load(ck) as z:
        step = int(z["step"])
        assert int(z["stream_position"]) == step
        assert {"positions", "log_weights", "scale", "backoffs", "flow_key"} <= set(z.files)
    assert 0 < step < STEPS and step % CHECKPOINT_EVERY == 0
    assert main(_args(sim, out, "--checkpoint-every", str(CHECKPOINT_EVERY), "--resume")) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    a, b = _particles(reference), _particles(out)
    # the same batches and keys from the saved step on: equal to float32 rounding (measured 0)
    np.testing.assert_allclose(b["s"], a["s"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(b["weight"], a["weight"], atol=1e-5, rtol=0)
    ha = pd.read_csv(reference / "history.csv")["objective"]
    hb = pd.read_csv(out / "history.csv")["objective"]
    np.testing.assert_allclose(hb, ha, rtol=1e-5)


def test_resume_refuses_a_checkpoint_of_other_settings(sim, reference, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes((reference / "checkpoint.npz").read_bytes())
    assert main(_args(sim, out, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "flow_key" in err


def test_a_failing_process_ends_both_with_a_message(sim, tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    procs = [
        _start(_args(sim, tmp_path / "out", *_dist(0, port)), tmp_path / "p0.log"),
        _start(
            [
                a if a != str(sim / "particles.star") else str(sim / "missing.star")
                for a in _args(sim, tmp_path / "out", *_dist(1, port))
            ],
            tmp_path / "p1.log",
        ),
    ]
    (rc0, log0), (rc1, log1) = (_finish(p, FAILURE_DEADLINE) for p in procs)
    elapsed = time.monotonic() - t0
    assert rc0 != 0 and rc1 != 0, (log0[-2000:], log1[-2000:])
    assert elapsed < FAILURE_DEADLINE
    assert "process 1 of 2" in log1 and "missing.star" in log1
    # process 0 names the process that failed and why
    assert "process 1 of 2 failed" in log0 and "missing.star" in log0, log0[-2000:]


@pytest.mark.slow
def test_a_killed_process_ends_the_other(sim, tmp_path):
    port = _free_port()
    out = tmp_path / "out"
    procs = [
        _start(_args(sim, out, *_dist(0, port), "--checkpoint-every", "1"), tmp_path / "p0.log"),
        _start(_args(sim, tmp_path / "out1", *_dist(1, port)), tmp_path / "p1.log"),
    ]
    t0 = time.monotonic()
    while not (out / "checkpoint.npz").exists() and time.monotonic() - t0 < TIMEOUT:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    t1 = time.monotonic()
    rc0, log0 = _finish(procs[0], FAILURE_DEADLINE)
    _finish(procs[1])
    assert rc0 != 0 and time.monotonic() - t1 < FAILURE_DEADLINE
    assert "another process ended" in log0 or "heartbeat" in log0, log0[-2000:]


# ---- set-up of a multi-process run, without processes ------------------------------------------


def _ns(**kw):
    base = dict(coordinator=None, num_processes=None, process_id=None, stream=True)
    return SimpleNamespace(**{**base, **kw, "distributed_timeout": 30})


def test_flags_and_slurm_environment_give_the_process_layout():
    d = _distributed.from_args(_ns(coordinator="h:1234", num_processes=4, process_id=3), {})
    assert (d.coordinator, d.num_processes, d.process_id, d.source) == ("h:1234", 4, 3, "flags")
    assert not d.is_writer and d.timeout == 30
    assert _distributed.from_args(_ns(), {}) is None  # one process
    env = {
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "0",
        "SLURM_JOB_ID": "4097",
        "SLURM_STEP_NODELIST": "gpu[017-020,031],login1",
    }
    d = _distributed.from_args(_ns(), env)
    assert (d.coordinator, d.num_processes, d.process_id, d.source) == (
        "gpu017:61441",
        8,
        0,
        "slurm",
    )
    assert d.is_writer
    env1 = dict(env, SLURM_NTASKS="1")
    assert _distributed.from_args(_ns(), env1) is None
    d = _distributed.from_args(_ns(), dict(env, CRYOSIP_COORDINATOR_PORT="5000"))
    assert d.coordinator == "gpu017:5000"
    with pytest.raises(CryosipInputError, match="all of --coordinator"):
        _distributed.from_args(_ns(num_processes=2), {})
    with pytest.raises(CryosipInputError, match="--stream"):
        _distributed.from_args(
            _ns(coordinator="h:1", num_processes=2, process_id=0, stream=False), {}
        )
    with pytest.raises(CryosipInputError, match="0..1"):
        _distributed.from_args(_ns(coordinator="h:1", num_processes=2, process_id=2), {})
