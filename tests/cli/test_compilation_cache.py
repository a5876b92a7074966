"""JAX's persistent compilation cache: on by default in $CRYOSIP_CACHE/jax, off with
CRYOSIP_JAX_CACHE=off, and a command's output is the same with a warm cache (subprocesses: the
cache is process-global)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd

CMD = [
    sys.executable,
    "-c",
    "import sys; from cryosip.cli.main import main; sys.exit(main(sys.argv[1:]))",
]


def _simulate(out, cache, jax_cache="on"):
    env = {**os.environ, "CRYOSIP_CACHE": str(cache), "CRYOSIP_JAX_CACHE": jax_cache}
    argv = ["simulate", "--dataset", "hinge", "--n-images", "40", "--box", "24", "--out", str(out),
            "--no-progress"]  # fmt: skip
    subprocess.run([*CMD, *argv], check=True, env=env, capture_output=True, cwd=out.parent)
    return pd.read_csv(out / "truth.csv"), np.fromfile(next(out.glob("*.mrcs")), np.uint8)


def test_cache_is_filled_reused_and_can_be_turned_off(tmp_path):
    cache = tmp_path / "cache"
    truth1, stack1 = _simulate(tmp_path / "a", cache)
    entries = set(os.listdir(cache / "jax"))
    assert len(entries) > 3  # compiled programs were written
    truth2, stack2 = _simulate(tmp_path / "b", cache)  # warm: the same bytes
    pd.testing.assert_frame_equal(truth1, truth2)
    np.testing.assert_array_equal(stack1, stack2)
    assert set(os.listdir(cache / "jax")) >= entries
    _simulate(tmp_path / "c", tmp_path / "other", jax_cache="off")
    assert not (tmp_path / "other" / "jax").exists()
