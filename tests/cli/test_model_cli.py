"""`cryosip reconstruct --model A.pdb B.pdb ...`: the user's own structures, end to end.

The images are simulated from the built-in C-alpha AdK path (`--dataset adk-ca`); the user
model is the straight line between that path's end structures, written to PDB files. The two
CVs differ (the built-in path is curved), so the truth is mapped onto the line first: each
true structure is projected onto the segment A -> B (the least-squares line coordinate).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from cli_helpers import simulate_adk, write_adk_ca_ends

from cryosip.cli.main import main
from cryosip.conformations.path import kabsch_superpose
from cryosip.data.adk import adk_model

N_IMAGES = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(particles.star, truth.csv, A.pdb, B.pdb): 300 images and the path's end structures."""
    root = tmp_path_factory.mktemp("model_cli")
    sim = simulate_adk(root / "sim", N_IMAGES)
    ends = write_adk_ca_ends(root)
    return str(sim / "particles.star"), sim / "truth.csv", *ends


def _line_coordinate(s: np.ndarray) -> np.ndarray:
    """The built-in path's s mapped onto the straight line between its ends (after Kabsch)."""
    model = adk_model(ca_only=True)
    grid = np.linspace(0.0, 1.0, 101)
    xs = [np.asarray(model(jnp.array([g])), np.float64) for g in grid]
    a, b = xs[0], kabsch_superpose(xs[-1], xs[0])
    d = (b - a).ravel()
    t = [float((kabsch_superpose(x, a) - a).ravel() @ d / (d @ d)) for x in xs]
    return np.interp(s, grid, t)


def _reconstruct(star, model_args, out, *extra):
    argv = [
        "reconstruct", star, "--model", *model_args, "--objective", "kl", "--n-particles", "32",
        "--steps", "100", "--bootstrap", "0", "--nodes", "25", "--seed", "0", *extra,
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    return main(argv)


def test_reconstruct_with_two_pdb_files(data, tmp_path, caplog):
    """Two end structures as the model recover the truth's mean on the line within 0.1.

    The truth (bimodal in the built-in s: modes 0.25 and 0.72, mean 0.44) maps onto the line
    to modes 0.33 and 0.90, mean 0.56 (the line coordinate runs ahead of s: s = 0.5 is at
    0.64). At SNR 0.1 every image pins its CV to a few hundredths, and the images lying off
    the line (the built-in path is curved) cost a few more: measured error 0.02, so 0.1 is a
    safe bound. A mean alone could be met by a shapeless answer, so the share of weight below
    the dip between the modes (truth 0.61, measured 0.60) must match within 0.1 as well,
    which a one-mode answer fails.
    """
    star, truth_csv, a, b = data
    out = tmp_path / "rec"
    with caplog.at_level(logging.INFO):
        assert _reconstruct(star, [a, b], out, "--atoms", "ca") == 0
    assert any(
        "path through 2 structures (A.pdb -> B.pdb), 214 atoms (ca), CV 0 = A.pdb, 1 = B.pdb"
        in r.getMessage()
        for r in caplog.records
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == N_IMAGES
    parts = pd.read_csv(out / "distribution_particles.csv")
    cv, w = parts.iloc[:, 0].to_numpy(), parts["weight"].to_numpy()
    truth = _line_coordinate(pd.read_csv(truth_csv).iloc[:, 0].to_numpy())
    np.testing.assert_allclose(np.average(cv, weights=w), truth.mean(), atol=0.1)
    dip = float(_line_coordinate(np.array([0.5]))[0])
    np.testing.assert_allclose(w[cv < dip].sum() / w.sum(), np.mean(truth < dip), atol=0.1)


def test_mismatched_files_exit_2_with_one_line(data, tmp_path, capsys):
    star, _, a, b = data
    lines = Path(b).read_text().splitlines(keepends=True)
    atom_lines = [i for i, line in enumerate(lines) if line.startswith("ATOM")]
    short = tmp_path / "short.pdb"
    short.write_text("".join(line for i, line in enumerate(lines) if i != atom_lines[5]))
    renamed = tmp_path / "renamed.pdb"
    k = atom_lines[5]
    renamed.write_text("".join(lines[:k] + [lines[k].replace(" CA ", " CB ", 1)] + lines[k + 1 :]))
    for bad, atoms, problem in (
        (short, "ca", "213 atoms (ca) but"),
        (renamed, "all", "has atom name 'CB' but 'CA'"),
    ):
        capsys.readouterr()
        assert _reconstruct(star, [a, str(bad)], tmp_path / "x", "--atoms", atoms) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and problem in err[0], err
    # a trajectory without its topology, and --modes with too few frames
    capsys.readouterr()
    traj = tmp_path / "t.dcd"
    traj.write_bytes(b"\0" * 64)
    assert _reconstruct(star, [str(traj)], tmp_path / "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.dcd" in err[0] and "--topology" in err[0], err
    assert _reconstruct(star, [a, b], tmp_path / "x", "--modes", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--modes 2 needs at least 3 frames" in err[0], err
