"""`cryosip select`: subsets by CV range, state probability and cluster, round-tripped through
RELION STAR (3.0, 3.1, 5), cryoSPARC .cs and cryoDRGN ind.pkl with every input column kept."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import starfile
from reconstructed_runs import N_IMAGES, reconstructed_runs

from cryosip.analysis.posterior import read_posterior_npz
from cryosip.cli.main import main
from cryosip.data.star import read_star, star_version


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return reconstructed_runs(tmp_path_factory)


def _ind(path) -> np.ndarray:
    with open(path, "rb") as f:
        return pickle.load(f)


def test_cv_range_star_relion31_and_5(runs, tmp_path, capsys):
    rec = runs["star"]
    full = starfile.read(rec / "particles_cv.star", always_dict=True)
    mean = full["particles"]["cryosipCvMean"].to_numpy()
    expected = np.nonzero((mean >= 0.55) & (mean <= 1.0))[0]
    assert 0 < len(expected) < N_IMAGES
    for relion, version in (("3.1", 30001), ("5", 50001)):
        out = tmp_path / f"open{relion}"
        assert (
            main(
                ["select", str(rec), "--cv-range", "0.55", "1.0"]
                + ["--relion", relion, "--out", str(out)]
            )
            == 0
        )
        assert f"{len(expected)} of {N_IMAGES} images" in capsys.readouterr().out
        sub = starfile.read(f"{out}.star", always_dict=True)
        assert star_version(f"{out}.star") == version
        pd.testing.assert_frame_equal(sub["optics"], full["optics"])
        pd.testing.assert_frame_equal(
            sub["particles"], full["particles"].iloc[expected].reset_index(drop=True)
        )
        np.testing.assert_array_equal(_ind(f"{out}_ind.pkl"), expected)
        stack = read_star(f"{out}.star")  # RELION-readable: stacks resolve (absolute paths)
        assert len(stack) == len(expected) and stack.has_poses
        np.testing.assert_allclose(np.asarray(stack.images[:2]).std(), 0.01, rtol=0.5)
    sel = json.loads((tmp_path / "open5_selection.json").read_text())
    assert sel[0]["n_selected"] == len(expected) and sel[0]["cv_range"] == {"s": [0.55, 1.0]}


def test_star_relion30_output_is_one_table(runs, tmp_path):
    rec = runs["star"]
    out = tmp_path / "old"
    assert (
        main(
            ["select", str(rec), "--cv-range", "0", "0.5", "--relion", "3.0"] + ["--out", str(out)]
        )
        == 0
    )
    rows = _ind(f"{out}_ind.pkl")
    table = starfile.read(f"{out}.star")
    assert isinstance(table, pd.DataFrame) and len(table) == len(rows)
    full = starfile.read(rec / "particles_cv.star", always_dict=True)["particles"]
    np.testing.assert_allclose(table["cryosipCvMean"], full["cryosipCvMean"].iloc[rows], rtol=1e-7)
    assert "rlnOriginX" in table.columns and "rlnVoltage" in table.columns
    a, b = read_star(f"{out}.star"), read_star(rec / "particles_cv.star").take(rows)
    np.testing.assert_allclose(a.nuisance.rotation, b.nuisance.rotation, atol=1e-5)
    np.testing.assert_allclose(
        a.nuisance.shift_in_angstroms, b.nuisance.shift_in_angstroms, atol=1e-4
    )


def test_state_probability_cs_roundtrip(runs, tmp_path):
    rec = runs["cs"]
    post = read_posterior_npz(rec / "posterior.npz")
    inside = (post["positions"][:, 0] >= 0.0) & (post["positions"][:, 0] <= 0.4)
    prob = post["responsibilities"] @ inside
    expected = np.nonzero(prob >= 0.9 - 1e-6)[0]
    assert 0 < len(expected) < N_IMAGES
    out = tmp_path / "closed"
    argv = ["select", str(rec), "--state", "0", "0.4", "--min-prob", "0.9"]
    assert main(argv + ["--formats", "cs", "star", "ind", "--out", str(out)]) == 0
    src = np.load(rec / "particles_cv.cs")
    sub = np.load(f"{out}.cs")
    assert sub.dtype == src.dtype  # every field, same types
    for name in src.dtype.names:
        np.testing.assert_array_equal(sub[name], src[name][expected])
    np.testing.assert_array_equal(_ind(f"{out}_ind.pkl"), expected)
    # the STAR written from the .cs holds the same particles
    star = read_star(f"{out}.star")
    assert len(star) == len(expected)
    np.testing.assert_allclose(
        star.nuisance.ctf.defocus_u_in_angstroms, src["ctf/df1_A"][expected], rtol=1e-6
    )


def test_clusters_split_every_image_once(runs, tmp_path):
    rec = runs["star"]
    out = tmp_path / "states"
    assert main(["select", str(rec), "--cluster", "2", "--out", str(out)]) == 0
    rows = [_ind(f"{out}_cluster{c}_ind.pkl") for c in (1, 2)]
    assert len(np.intersect1d(*rows)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(N_IMAGES))
    full = starfile.read(rec / "particles_cv.star", always_dict=True)["particles"]
    m = [full["cryosipCvMean"].iloc[r].mean() for r in rows]
    assert m[0] < 0.5 < m[1]  # closed and open states of the bimodal truth
    for c, r in zip((1, 2), rows):
        sub = starfile.read(f"{out}_cluster{c}.star", always_dict=True)["particles"]
        pd.testing.assert_frame_equal(sub, full.iloc[r].reset_index(drop=True))
    sel = json.loads((tmp_path / "states_selection.json").read_text())
    np.testing.assert_allclose(sum(s["population"] for s in sel), 1.0, atol=1e-9)


def test_select_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["select", str(tmp_path), "--cluster", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "posterior.npz" in err[0]
    argv = ["select", str(runs["star"]), "--cv-range", "s2", "0", "1", "--out", str(tmp_path / "y")]
    assert main(argv) == 2
    assert "unknown CV 's2'" in capsys.readouterr().err
