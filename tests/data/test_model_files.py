"""User structure files as conformation models: paths through files/frames, PCA modes, checks.

The structures are the first residues of the built-in AdK (all atoms, with hydrogens), written
here with gemmi as PDB/mmCIF; superposition is checked against scipy's independent Kabsch
(``Rotation.align_vectors``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from MDAnalysisTests.datafiles import DCD, PSF
from scipy.spatial.transform import Rotation

from cryosip.data.adk import adk_model, load_adk_arrays
from cryosip.data.errors import CryosipInputError
from cryosip.data.models import load_model, load_model_with_description
from cryosip.data.outputs import write_ensemble_pdb

N_RES = 6  # residues of the AdK fragment
ATOL = 2e-3  # Angstrom: float32 model coefficients and 3-decimal PDB coordinates


@pytest.fixture(scope="module")
def fragment():
    """Labels and two conformations (DIMS frames 0 and 97) of AdK residues 1-6, all atoms."""
    a = load_adk_arrays()
    sel = a["resids"] <= N_RES
    labels = {k: a[k][sel] for k in ("elements", "names", "resnames", "resids")}
    return labels, a["frames"][0][sel], a["frames"][97][sel]


def _write(path, coords, labels, **overrides):
    lab = {**labels, **overrides}
    coords = np.asarray(coords, np.float64)
    k = 1 if coords.ndim == 2 else coords.shape[0]
    write_ensemble_pdb(
        path, coords, np.full(k, 1.0 / k), lab["elements"], lab["names"], lab["resnames"],
        lab["resids"],
    )  # fmt: skip
    return str(path)


def _rigid(x, seed):
    """``x`` rotated by a random rotation (about the origin) and moved by a random shift."""
    rng = np.random.default_rng(seed)
    r = Rotation.random(random_state=seed).as_matrix()
    return x @ r.T + rng.normal(scale=20.0, size=3)


def _superposed(mobile, target):
    """scipy's Kabsch: ``mobile`` rigidly moved onto ``target`` (independent of cryosip)."""
    mc, tc = mobile.mean(0), target.mean(0)
    rot, _ = Rotation.align_vectors(target - tc, mobile - mc)
    return rot.apply(mobile - mc) + tc


def _at(model, s):
    return np.asarray(model(jnp.atleast_1d(jnp.asarray(s, jnp.float32))), np.float64)


def _rmsd(a, b):
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, -1))))


def _mask(labels, atoms):
    el, names = labels["elements"], labels["names"]
    return {
        "all": np.ones(len(el), bool),
        "heavy": el != "H",
        "backbone": np.isin(names, ["N", "CA", "C", "O"]),
        "ca": names == "CA",
    }[atoms]


@pytest.mark.parametrize("atoms", ["all", "heavy", "backbone", "ca"])
def test_two_files_path_end_points_and_atom_selection(tmp_path, fragment, atoms):
    labels, x0, x1 = fragment
    a = _write(tmp_path / "A.pdb", x0, labels)
    b = _write(tmp_path / "B.pdb", _rigid(x1, 1), labels)  # far away and rotated
    model, desc = load_model_with_description([a, b], atoms=atoms)
    m = _mask(labels, atoms)
    expected = {"all": 119, "heavy": 51, "backbone": 24, "ca": 6}[atoms]
    assert model.atoms.n_atoms == m.sum() == expected
    # CV 0 = A centred on its centroid; CV 1 = B superposed on A over the selected atoms
    ref = x0[m] - x0[m].mean(0)
    np.testing.assert_allclose(_at(model, 0.0), ref, atol=ATOL)
    b_sup = _superposed(_rigid(x1, 1)[m], x0[m]) - x0[m].mean(0)
    np.testing.assert_allclose(_at(model, 1.0), b_sup, atol=ATOL)
    np.testing.assert_allclose(_at(model, 0.25), 0.75 * ref + 0.25 * b_sup, atol=ATOL)  # line
    rmsd = _rmsd(ref, b_sup)
    assert desc.startswith(f"path through 2 structures (A.pdb -> B.pdb), {expected:,} atoms")
    assert f"({atoms}), CV 0 = A.pdb, 1 = B.pdb, end-to-end RMSD {rmsd:.1f} A" in desc, desc


def test_rigid_copy_superposes_to_zero_rmsd_three_files(tmp_path, fragment):
    """A -> B -> (A rotated and moved): the third file lands back on the first after Kabsch."""
    labels, x0, x1 = fragment
    paths = [
        _write(tmp_path / "A.pdb", x0, labels),
        _write(tmp_path / "B.pdb", x1, labels),
        _write(tmp_path / "C.pdb", _rigid(x0, 7), labels),
    ]
    model, desc = load_model_with_description(paths, atoms="heavy")
    np.testing.assert_allclose(_at(model, 1.0), _at(model, 0.0), atol=ATOL)
    assert _rmsd(_at(model, 1.0), _at(model, 0.0)) < 1e-3
    heavy = labels["elements"] != "H"
    np.testing.assert_allclose(
        _at(model, 0.5), _superposed(x1[heavy], x0[heavy]) - x0[heavy].mean(0), atol=ATOL
    )
    assert "path through 3 structures (A.pdb -> B.pdb -> C.pdb)" in desc
    assert "CV 0 = A.pdb, 0.5 = B.pdb, 1 = C.pdb" in desc and "path length" in desc, desc
    # a rigid copy alone is no conformational change: refused
    with pytest.raises(CryosipInputError, match="C.pdb: every frame is the same structure"):
        load_model_with_description([paths[0], paths[2]])


@pytest.mark.parametrize("suffix", ["pdb", "cif"])
def test_one_multimodel_file_is_the_path_through_its_frames(tmp_path, fragment, suffix):
    labels, x0, x1 = fragment
    w = np.linspace(0.0, 1.0, 5)[:, None, None]
    frames = np.stack(
        [_rigid((1 - t) * x0 + t * x1 + 0.3 * np.sin(7 * t), i) for i, t in enumerate(w)]
    )
    path = _write(tmp_path / f"m.{suffix}", frames, labels)
    model, desc = load_model_with_description(path, atoms="backbone")
    m = _mask(labels, "backbone")
    c0 = frames[0][m].mean(0)
    for k in range(5):
        expected = _superposed(frames[k][m], frames[0][m]) - c0
        np.testing.assert_allclose(_at(model, k / 4), expected, atol=ATOL)
    assert desc.startswith(f"path through 5 frames of m.{suffix}, 24 atoms (backbone)")
    assert "CV s = (frame - 1)/4: 0 = frame 1, 1 = frame 5" in desc, desc
    # load_model (used by other code) gives the same model from a single file
    np.testing.assert_allclose(
        _at(load_model(path, atoms="backbone"), 0.3), _at(model, 0.3), atol=1e-6
    )


def test_trajectory_with_topology_matches_the_unsmoothed_builtin_path():
    """DIMS DCD + PSF, C-alpha: the same frames as the built-in adk-ca path without smoothing."""
    model, desc = load_model_with_description([DCD], topology=PSF, atoms="ca")
    builtin = adk_model(ca_only=True, smooth=False)
    assert model.atoms.n_atoms == 214 and model.n_frames == 98
    for s in (0.0, 10 / 97, 0.5, 1.0):
        np.testing.assert_allclose(_at(model, s), _at(builtin, s), atol=ATOL)
    assert desc.startswith("path through 98 frames of adk_dims.dcd (topology adk.psf), 214 atoms")
    with pytest.raises(CryosipInputError, match=r"adk_dims.dcd: .*--topology"):
        load_model_with_description([DCD])


@pytest.fixture(scope="module")
def dcd_ca_frames():
    """The 98 DIMS C-alpha frames superposed on the first (the path's nodes)."""
    path = load_model([DCD], topology=PSF, atoms="ca")
    return np.asarray(path.frames(), np.float64)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_modes_are_k_dimensional_with_one_angstrom_rms_units(k, dcd_ca_frames):
    model, desc = load_model_with_description([DCD], topology=PSF, atoms="ca", modes=k)
    n = 214
    assert model.dim == k and model.atoms.n_atoms == n
    np.testing.assert_allclose(np.asarray(model.rms_per_unit), 1.0, rtol=1e-5)
    lo, hi = np.asarray(model.lower, np.float64), np.asarray(model.upper, np.float64)
    start = lo + 0.25 * (hi - lo)
    for j in range(k):
        step = np.eye(k)[j] * 0.5 * (hi[j] - lo[j])  # stays inside the box
        # a step of length t along mode j moves the atoms by t Angstrom RMS
        moved = _rmsd(_at(model, start + step), _at(model, start))
        np.testing.assert_allclose(moved, 0.5 * (hi[j] - lo[j]), rtol=1e-4)
    modes = np.asarray(model.modes).reshape(k, -1)
    np.testing.assert_allclose(modes @ modes.T, n * np.eye(k), atol=1e-3 * n)  # orthogonal
    # the box holds every (superposed) frame with a 10% margin of the frames' range
    frames = dcd_ca_frames
    scores = np.asarray(model.scores(jnp.asarray(frames - frames.mean((0, 1)), jnp.float32)))
    span = scores.max(0) - scores.min(0)
    np.testing.assert_allclose(np.asarray(model.lower), scores.min(0) - 0.1 * span, atol=1e-2)
    np.testing.assert_allclose(np.asarray(model.upper), scores.max(0) + 0.1 * span, atol=1e-2)
    assert "Angstrom RMS over these atoms" in desc and desc.count("%") == k, desc


def test_modes_from_files_and_too_few_frames(tmp_path, fragment):
    labels, x0, x1 = fragment
    paths = [
        _write(tmp_path / f"{i}.pdb", (1 - t) * x0 + t * x1 + 0.2 * (i == 1), labels)
        for i, t in enumerate([0.0, 0.4, 1.0])
    ]
    model, desc = load_model_with_description(paths, atoms="ca", modes=2)
    assert model.dim == 2 and desc.startswith("2 linear modes by PCA of 3 structures")
    with pytest.raises(CryosipInputError, match="--modes 3 needs at least 4 frames"):
        load_model_with_description(paths, atoms="ca", modes=3)
    with pytest.raises(CryosipInputError, match="--modes must be 1 to 4"):
        load_model_with_description([DCD], topology=PSF, modes=5)


def test_mismatches_and_bad_input_raise_one_clear_line(tmp_path, fragment):
    labels, x0, x1 = fragment
    a = _write(tmp_path / "A.pdb", x0, labels)

    def err(paths, match, **kw):
        with pytest.raises(CryosipInputError, match=match) as e:
            load_model_with_description(paths, **kw)
        assert "\n" not in str(e.value)

    keep = np.arange(len(x0)) != 3
    fewer = {k: v[keep] for k, v in labels.items()}
    err([a, _write(tmp_path / "B.pdb", x1[keep], fewer)], r"B.pdb: 118 atoms but .*A.pdb has 119")
    names = labels["names"].astype("U4")
    names[5] = "XX"
    err([a, _write(tmp_path / "C.pdb", x1, labels, names=names)], r"C.pdb: atom 6 .*atom name")
    resn = labels["resnames"].astype("U4")
    resn[labels["resids"] == 2] = "ALA"
    err([a, _write(tmp_path / "D.pdb", x1, labels, resnames=resn)], r"D.pdb: .*residue 'ALA'")
    el = labels["elements"].astype("U2")
    el[0] = "O"
    err([a, _write(tmp_path / "E.pdb", x1, labels, elements=el)], r"E.pdb: atom 1 .*element 'O'")
    # a selection that agrees is fine even if other atoms differ (hydrogens dropped)
    hless = {k: v[labels["elements"] != "H"] for k, v in labels.items()}
    h = _write(tmp_path / "H.pdb", x1[labels["elements"] != "H"], hless)
    assert load_model_with_description([a, h], atoms="heavy")[0].atoms.n_atoms == 51
    err([a, h], r"H.pdb: 51 atoms but")
    water = {"elements": np.array(["O"]), "names": np.array(["O"]),
             "resnames": np.array(["HOH"]), "resids": np.array([1])}  # fmt: skip
    w = _write(tmp_path / "W.pdb", np.zeros((1, 3)), water)
    err([w, w], r"W.pdb: no atoms left after --atoms ca", atoms="ca")
    (tmp_path / "junk.pdb").write_text("this is not a structure\n")
    err([str(tmp_path / "junk.pdb"), a], r"junk.pdb: ")
    err([a], r"A.pdb: holds a single structure")
    err([a, str(tmp_path / "nope.pdb")], r"nope.pdb: not a built-in model .* no such file")
    err([_write(tmp_path / "M.pdb", np.stack([x0, x1]), labels), a], r"M.pdb: holds 2 models")
    err([a, h], r"--topology is for trajectories", topology=PSF)
    err("adk-ca", r"adk-ca: --atoms apply to structure files", atoms="ca")
    se = labels["elements"].astype("U2")
    se[labels["names"] == "SD"] = "Se"
    sem = _write(tmp_path / "S.pdb", np.stack([x0, x1]), labels, elements=se)
    err([sem], r"S.pdb: atom \d+ \(A MET 1 SD\) is element 'Se'")
    assert load_model_with_description([sem], atoms="backbone")[0].atoms.n_atoms == 24
