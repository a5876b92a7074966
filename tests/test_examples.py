"""The examples run as a user runs them: a fresh interpreter, the script's own command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_general_sip_example_recovers_the_rates(tmp_path):
    png = tmp_path / "densities.png"
    # 500 curves, 32 particles, 150 steps (the defaults are 1000, 64, 300): ~20 s on 2 CPU cores
    text = _run(
        "general_sip.py",
        "--n-curves",
        "500",
        "--n-particles",
        "32",
        "--n-steps",
        "150",
        "--plot",
        str(png),
        cwd=tmp_path,
    )
    assert "(500 curves, noise sd 0.1)" in text
    w1 = {
        m[1].strip(): float(m[2])
        for m in re.finditer(r"^  (\S.*?)\s+(\d+\.\d{4})\b", text, flags=re.MULTILINE)
    }
    assert set(w1) == {
        "start (uniform)",
        "true rates",
        "wgf-kl",
        "wgf-mmd",
        "em-grid",
        "per-curve fit",
    }, text
    assert png.stat().st_size > 0
    estimators = ("wgf-kl", "wgf-mmd", "em-grid", "per-curve fit")
    # measured (seed 0): start 0.330, true rates 0.045, wgf-kl 0.063, wgf-mmd 0.074,
    # em-grid 0.052, per-curve fit 0.077
    assert w1["wgf-kl"] < 0.09
    assert w1["wgf-mmd"] < 0.11
    assert w1["em-grid"] < 0.08
    for m in estimators:
        assert w1["true rates"] < w1[m] < w1["start (uniform)"] / 3, (m, text)
