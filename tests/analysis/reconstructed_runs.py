"""One small simulated data set reconstructed from its STAR and from its .cs, shared by the
output, select and report tests (made once per test session, under pytest's base temp)."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import simulate_adk

from cryosip.cli.main import main

N_IMAGES = 200
_RUNS: dict[str, Path] = {}


def _reconstruct(particles: Path, out: Path) -> None:
    argv = [
        "reconstruct",
        str(particles),
        "--model",
        "adk-ca",
        "--n-particles",
        "32",
        "--steps",
        "30",
        "--bootstrap",
        "0",
        "--seed",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0


def reconstructed_runs(tmp_path_factory) -> dict[str, Path]:
    """``{"sim": folder, "star": rec folder, "cs": rec folder}``."""
    if not _RUNS:
        base = tmp_path_factory.mktemp("shared_runs")
        sim = simulate_adk(base / "sim", N_IMAGES, box=32, pixel_size=3.0, snr=0.1, seed=0)
        assert main(["convert", str(sim / "particles.star"), str(sim / "particles.cs")]) == 0
        _reconstruct(sim / "particles.star", base / "rec_star")
        _reconstruct(sim / "particles.cs", base / "rec_cs")
        _RUNS.update(sim=sim, star=base / "rec_star", cs=base / "rec_cs")
    return dict(_RUNS)
