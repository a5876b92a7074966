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


def write_adk_ca_ends(root) -> list[str]:
    """The C-alpha AdK path's closed (s = 0) and open (s = 1) structures as A.pdb and B.pdb
    in ``root`` (what a user brings as ``--model A.pdb B.pdb``); returns their paths."""
    import jax.numpy as jnp
    import numpy as np

    from cryosip.data.adk import adk_model, load_adk_arrays
    from cryosip.data.outputs import write_ensemble_pdb

    model, a = adk_model(ca_only=True), load_adk_arrays()
    ca = a["names"] == "CA"
    files = []
    for name, s in (("A.pdb", 0.0), ("B.pdb", 1.0)):
        xyz = np.asarray(model(jnp.array([s])), np.float64)
        write_ensemble_pdb(
            f"{root}/{name}", xyz, [1.0], ["C"] * int(ca.sum()), a["names"][ca],
            a["resnames"][ca], a["resids"][ca],
        )  # fmt: skip
        files.append(f"{root}/{name}")
    return files


def streamed_args(star, out, *extra, steps, pilot_images: int):
    """`cryosip reconstruct ... --stream` on the C-alpha AdK model at small test settings."""
    return [
        "reconstruct", str(star), "--model", "adk-ca", "--objective", "kl", "--stream",
        "--batch-size", "64", "--n-particles", "16", "--steps", str(steps), "--pilot-images",
        str(pilot_images), "--nodes", "17", "--seed", "0", "--out", str(out), "--no-progress",
        *map(str, extra),
    ]  # fmt: skip
