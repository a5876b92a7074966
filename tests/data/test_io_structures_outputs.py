"""Structures in (PDB, mmCIF, trajectories); results out (CV STAR, subsets, ensembles, maps)."""

from __future__ import annotations

import pickle

import gemmi
import jax.numpy as jnp
import mrcfile
import numpy as np
import pytest
import starfile
from io_helpers import random_stack

from cryosip.cryoem.atoms import AtomParameters
from cryosip.cryoem.projection import project_gaussians_dense
from cryosip.cryoem.volume import render_volume
from cryosip.data.errors import CryosipInputError
from cryosip.data.outputs import (
    read_ensemble_weights,
    write_challenge,
    write_cv_subsets,
    write_ensemble_pdb,
    write_latent_pkl,
    write_particles_cv_star,
    write_volume_mrc,
)
from cryosip.data.star import read_star, write_star
from cryosip.data.structures import read_end_structures, read_structures

# no element column, names starting in column 13 as in the MDAnalysisTests AdK files
PDB_NO_ELEMENTS = """\
MODEL        1
ATOM      1  N   MET A   1      -0.677  -1.230  -0.491  1.00  0.00
ATOM      2  CA  MET A   1      -0.001   0.064  -0.491  1.00  0.00
ATOM      3 HG1  MET A   1       1.499  -0.110  -0.491  1.00  0.00
ATOM      4  SD  MET A   1       2.030  -1.090  -0.491  1.00  0.00
ATOM      5  OXT MET A   1      -0.501   0.820   0.727  1.00  0.00
ENDMDL
MODEL        2
ATOM      1  N   MET A   1      -0.577  -1.130  -0.391  1.00  0.00
ATOM      2  CA  MET A   1       0.099   0.164  -0.391  1.00  0.00
ATOM      3 HG1  MET A   1       1.599  -0.010  -0.391  1.00  0.00
ATOM      4  SD  MET A   1       2.130  -0.990  -0.391  1.00  0.00
ATOM      5  OXT MET A   1      -0.401   0.920   0.827  1.00  0.00
ENDMDL
END
"""


def test_multimodel_pdb_without_elements(tmp_path):
    (tmp_path / "m.pdb").write_text(PDB_NO_ELEMENTS)
    s = read_structures(tmp_path / "m.pdb")
    assert s.coords.shape == (2, 5, 3) and s.coords.dtype == np.float32
    assert list(s.elements) == ["N", "C", "H", "S", "O"]  # CA is carbon, HG1 hydrogen (not Ca, Hg)
    np.testing.assert_allclose(s.coords[1] - s.coords[0], 0.1, atol=1e-5)
    AtomParameters.from_elements(s.elements)  # every element has scattering factors


def test_mmcif_and_model_mismatch(tmp_path):
    (tmp_path / "m.pdb").write_text(PDB_NO_ELEMENTS)
    st = gemmi.read_structure(str(tmp_path / "m.pdb"))
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tmp_path / "m.cif"))
    s = read_structures(tmp_path / "m.cif")
    assert s.coords.shape == (2, 5, 3)
    bad = PDB_NO_ELEMENTS.replace(
        "ATOM      5  OXT MET A   1      -0.401   0.920   0.827  1.00  0.00\n", ""
    )
    (tmp_path / "bad.pdb").write_text(bad)
    with pytest.raises(CryosipInputError, match="bad.pdb: model 2 has 4 atoms but model 1 has 5"):
        read_structures(tmp_path / "bad.pdb")


def test_end_structures_and_trajectory(tmp_path):
    one = PDB_NO_ELEMENTS.split("ENDMDL")[0] + "ENDMDL\nEND\n"
    (tmp_path / "a.pdb").write_text(one)
    (tmp_path / "b.pdb").write_text(one.replace("-0.677", "-0.777"))
    s = read_end_structures(tmp_path / "a.pdb", tmp_path / "b.pdb")
    assert s.coords.shape == (2, 5, 3)
    np.testing.assert_allclose(s.coords[1, 0, 0] - s.coords[0, 0, 0], -0.1, atol=1e-5)
    (tmp_path / "c.pdb").write_text(
        one.replace("ATOM      5  OXT MET A   1      -0.501   0.820   0.727  1.00  0.00\n", "")
    )
    with pytest.raises(CryosipInputError, match="c.pdb: 4 atoms but .*a.pdb has 5"):
        read_end_structures(tmp_path / "a.pdb", tmp_path / "c.pdb")
    # a trajectory any format MDAnalysis reads: multi-frame XYZ written here; topology mismatch
    xyz = "".join(
        f"5\nframe {f}\n" + "".join(f"{e} {f + i:.3f} 0.000 0.000\n" for i, e in enumerate("NCHSO"))
        for f in range(3)
    )
    (tmp_path / "t.xyz").write_text(xyz)
    t = read_structures(tmp_path / "t.xyz")
    assert t.coords.shape == (3, 5, 3) and list(t.elements) == ["N", "C", "H", "S", "O"]
    np.testing.assert_allclose(t.coords[2, 4, 0], 6.0, atol=1e-5)
    (tmp_path / "top4.xyz").write_text("4\ntop\n" + "".join(f"C {i}.0 0 0\n" for i in range(4)))
    with pytest.raises(CryosipInputError, match="atom"):
        read_structures(tmp_path / "t.xyz", topology=tmp_path / "top4.xyz")
    with pytest.raises(CryosipInputError, match="file not found"):
        read_structures(tmp_path / "missing.dcd", topology=tmp_path / "top4.xyz")


def test_particles_cv_star_and_subsets(tmp_path):
    stack = random_stack(n=6)
    from io_helpers import save_images

    names = save_images(tmp_path / "particles.mrcs", stack)
    write_star(tmp_path / "in.star", stack, image_names=names)
    s = read_star(tmp_path / "in.star")
    cv = np.linspace(-1, 1, 6)
    write_particles_cv_star(tmp_path / "particles_cv.star", s, cv, 0.1 + cv**2)
    orig = starfile.read(tmp_path / "in.star")
    out = starfile.read(tmp_path / "particles_cv.star")
    assert out["particles"].columns.tolist() == orig["particles"].columns.tolist() + [
        "cryosipCvMean",
        "cryosipCvSd",
    ]
    np.testing.assert_allclose(out["particles"]["cryosipCvMean"], cv, rtol=1e-8)
    np.testing.assert_allclose(out["particles"]["cryosipCvSd"], 0.1 + cv**2, rtol=1e-8)
    for col in orig["particles"].columns:
        assert out["particles"][col].tolist() == orig["particles"][col].tolist()
    assert read_star(tmp_path / "particles_cv.star").has_poses  # RELION-readable as before
    write_particles_cv_star(
        tmp_path / "two.star",
        s,
        np.stack([cv, -cv], 1),
        np.ones((6, 2)),
        cv_names=["open", "twist"],
    )
    assert "cryosipCvMean_twist" in starfile.read(tmp_path / "two.star")["particles"].columns

    files = write_cv_subsets(tmp_path / "sub", s, cv, [-1.0, 0.0, 0.5, 1.0])
    sizes = {k: len(starfile.read(p)["particles"]) for k, p in files.items()}
    assert sizes == {0: 3, 1: 1, 2: 2}
    sub = read_star(files[2])
    np.testing.assert_allclose(np.asarray(sub.images), np.asarray(stack.images)[4:], rtol=0, atol=0)


def test_latent_pickle(tmp_path):
    z = np.random.default_rng(0).normal(size=(5, 2))
    write_latent_pkl(tmp_path / "z.pkl", z)
    with open(tmp_path / "z.pkl", "rb") as f:
        back = pickle.load(f)
    assert back.dtype == np.float32 and back.shape == (5, 2)
    np.testing.assert_allclose(back, z, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_ensemble_with_weights(tmp_path, suffix):
    rng = np.random.default_rng(1)
    coords = rng.normal(0, 10, (3, 5, 3))
    w = [0.2, 0.3, 0.5]
    path = tmp_path / f"ens{suffix}"
    write_ensemble_pdb(
        path,
        coords,
        w,
        ["N", "C", "H", "S", "O"],
        ["N", "CA", "HG1", "SD", "OXT"],
        ["MET"] * 5,
        [1] * 5,
    )
    st = gemmi.read_structure(str(path))
    assert len(st) == 3
    for m in range(3):
        got = np.array([cra.atom.pos.tolist() for cra in st[m].all()])
        np.testing.assert_allclose(got, coords[m], atol=1e-3)
    assert [cra.atom.element.name for cra in st[0].all()] == ["N", "C", "H", "S", "O"]
    np.testing.assert_allclose(read_ensemble_weights(path), w, rtol=1e-7)
    with pytest.raises(ValueError, match="sum"):
        write_ensemble_pdb(
            tmp_path / "x.pdb", coords, [0.2, 0.2, 0.2], ["C"] * 5, ["CA"] * 5, ["ALA"] * 5, [1] * 5
        )
    assert not (tmp_path / "x.pdb").exists()


def test_render_volume_projects_to_the_image_model(tmp_path):
    rng = np.random.default_rng(2)
    xyz = rng.normal(0, 6, (40, 3))
    atoms = AtomParameters.from_elements(["C"] * 25 + ["N"] * 10 + ["O"] * 5)
    vol = render_volume(xyz, atoms, 32, 1.5)
    proj = np.asarray(
        project_gaussians_dense(
            jnp.asarray(xyz[:, :2], jnp.float32), atoms.amplitudes, atoms.variances, 32, 1.5
        )
    )
    np.testing.assert_allclose(vol.sum(axis=0) * 1.5, proj, atol=1e-4 * np.abs(proj).max())
    np.testing.assert_allclose(
        vol.sum() * 1.5**3, float(np.asarray(atoms.amplitudes).sum()), rtol=1e-4
    )
    write_volume_mrc(tmp_path / "v.mrc", vol, 1.5)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        np.testing.assert_allclose(float(m.voxel_size.x), 1.5, rtol=1e-6)
        np.testing.assert_allclose(float(m.header.origin.x), -16 * 1.5)
        np.testing.assert_allclose(m.data, vol, rtol=0, atol=0)


def test_challenge_submission(tmp_path):
    vols = [np.full((8, 8, 8), k, np.float32) for k in range(3)]
    files = write_challenge(tmp_path / "sub", vols, [0.5, 0.25, 0.25], 2.0)
    assert [f.name for f in files] == [
        "map_001.mrc",
        "map_002.mrc",
        "map_003.mrc",
        "populations.txt",
    ]
    pops = np.loadtxt(tmp_path / "sub" / "populations.txt")
    np.testing.assert_allclose(pops.sum(), 1.0, rtol=1e-9)
    np.testing.assert_allclose(pops, [0.5, 0.25, 0.25])
    with mrcfile.open(tmp_path / "sub" / "map_003.mrc") as m:
        np.testing.assert_allclose(m.data, 2.0)
        np.testing.assert_allclose(float(m.voxel_size.x), 2.0)
    with pytest.raises(ValueError):
        write_challenge(tmp_path / "bad", vols, [0.5, 0.5, 0.5], 2.0)
    assert not (tmp_path / "bad").exists()
