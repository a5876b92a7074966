"""Shared set-up of the CLI tests: a small AdK data set written by `cryosip simulate`."""

from __future__ import annotations

from cryosip.cli.main import main


def simulate_adk(
    out,
    n_images: int,
    *,
    box: int = 32,
    pixel_size: float = 3.0,
    snr: float = 0.1,
    seed: int = 0,
    extra=(),
):
    """Run `cryosip simulate` (C-alpha AdK, bimodal truth) into ``out``; returns ``out``."""
    argv = [
        "simulate",
        "--dataset",
        "adk-ca",
        "--distribution",
        "bimodal",
        "--n-images",
        str(n_images),
        "--box",
        str(box),
        "--pixel-size",
        str(pixel_size),
        "--snr",
        str(snr),
        *map(str, extra),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    return out
