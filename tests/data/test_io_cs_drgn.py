"""cryoSPARC .cs and cryoDRGN pickles: round trips and the sign conventions of each format.

The references below re-implement, for the test only, the conversions cryoDRGN uses
(``utils.R_from_relion``, ``lie_tools.expmap``, ``parse_pose_star``, ``parse_pose_csparc``) so
that cryosip's readers are checked against the convention of the tool that consumes the files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from io_helpers import assert_same_particles, random_stack, save_images

from cryosip.cryoem.pose import euler_to_matrix, matrix_to_euler
from cryosip.data.cryodrgn import apply_cryodrgn, read_cryodrgn, write_cryodrgn
from cryosip.data.cryosparc import read_cs, write_cs
from cryosip.data.errors import CryosipInputError
from cryosip.data.mrc import MissingImages
from cryosip.data.particles import read_particles
from cryosip.data.star import read_star, write_star


def cryodrgn_R_from_relion(a, b, y):
    """cryoDRGN utils.R_from_relion (degrees)."""
    a, b, y = np.deg2rad([a, b, y])
    ca, sa, cb, sb, cy, sy = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(y), np.sin(y)
    Ra = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    Rb = np.array([[cb, 0, -sb], [0, 1, 0], [sb, 0, cb]])
    Ry = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    R = Ry @ Rb @ Ra
    R[0, 1] *= -1
    R[1, 0] *= -1
    R[1, 2] *= -1
    R[2, 1] *= -1
    return R


def cryodrgn_expmap(v):
    """cryoDRGN lie_tools.expmap (Rodrigues)."""
    theta = np.linalg.norm(v)
    k = v / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def test_cryodrgn_R_from_relion_is_relion_matrix():
    rng = np.random.default_rng(0)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], (10, 3)):
        np.testing.assert_allclose(
            cryodrgn_R_from_relion(rot, tilt, psi),
            np.asarray(euler_to_matrix(rot, tilt, psi), np.float64),
            atol=1e-6,
        )


def test_cs_round_trip_and_cryodrgn_convention(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    write_cs(tmp_path / "p.cs", stack, image_names=names)
    back = read_cs(tmp_path / "p.cs")
    assert_same_particles(stack, back)

    data = np.load(tmp_path / "p.cs")
    assert data["blob/idx"].tolist() == list(range(len(stack)))  # 0-based
    D, px = stack.box_size, stack.pixel_size
    # what cryoDRGN's parse_pose_csparc would produce ...
    rot_cs = np.stack([cryodrgn_expmap(v.astype(np.float64)).T for v in data["alignments3D/pose"]])
    trans_cs = data["alignments3D/shift"] / D
    # ... equals what its parse_pose_star produces from the STAR of the same particles
    write_star(tmp_path / "p.star", stack, image_names=names)
    import starfile

    t = starfile.read(tmp_path / "p.star")["particles"]
    rot_star = np.stack(
        [
            cryodrgn_R_from_relion(*r)
            for r in t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
        ]
    )
    trans_star = t[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / px / D
    np.testing.assert_allclose(rot_cs, rot_star, atol=2e-6)
    np.testing.assert_allclose(trans_cs, trans_star, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        np.rad2deg(data["ctf/df_angle_rad"]), t["rlnDefocusAngle"], rtol=1e-6
    )

    # .cs -> STAR -> .cs keeps everything, including fields cryosip does not use
    write_star(tmp_path / "from_cs.star", back)
    assert_same_particles(stack, read_star(tmp_path / "from_cs.star"))
    write_cs(tmp_path / "again.cs", back)
    again = np.load(tmp_path / "again.cs")
    assert again["uid"].tolist() == data["uid"].tolist()


def test_cs_bad_input(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    write_cs(tmp_path / "p.cs", stack, image_names=names)
    data = np.load(tmp_path / "p.cs")
    keep = [n for n in data.dtype.names if not n.startswith("alignments3D")]
    with open(tmp_path / "nopose.cs", "wb") as f:
        np.save(f, data[keep])
    with pytest.raises(CryosipInputError, match="nopose.cs: no poses"):
        read_cs(tmp_path / "nopose.cs")
    s = read_cs(tmp_path / "nopose.cs", require_poses=False)
    assert not s.has_poses
    keep = [n for n in data.dtype.names if n != "ctf/df1_A"]
    with open(tmp_path / "noctf.cs", "wb") as f:
        np.save(f, data[keep])
    with pytest.raises(CryosipInputError, match="missing required field.*ctf/df1_A"):
        read_cs(tmp_path / "noctf.cs")
    data2 = data.copy()
    data2["blob/idx"][2] = 99
    with open(tmp_path / "range.cs", "wb") as f:
        np.save(f, data2)
    with pytest.raises(CryosipInputError, match="particles.mrcs: image index 100 out of range"):
        read_cs(tmp_path / "range.cs")
    (tmp_path / "empty.cs").write_bytes(b"")
    with pytest.raises(CryosipInputError, match="empty file"):
        read_cs(tmp_path / "empty.cs")
    with open(tmp_path / "plain.cs", "wb") as f:
        np.save(f, np.zeros((3, 3)))
    with pytest.raises(CryosipInputError, match="not a cryoSPARC .cs file"):
        read_cs(tmp_path / "plain.cs")


def test_cryodrgn_round_trip(tmp_path, stack_on_disk):
    stack0, _ = stack_on_disk
    stack = random_stack(bfactor=False)  # ctf.pkl has no B-factor or scale columns
    save_images(tmp_path / "particles.mrcs", stack)
    paths = write_cryodrgn(tmp_path / "drgn", stack)
    assert sorted(p.name for p in paths.values()) == ["drgn_ctf.pkl", "drgn_pose.pkl"]
    with open(paths["pose"], "rb") as f:
        rot, trans = pickle.load(f)
    with open(paths["ctf"], "rb") as f:
        ctf = pickle.load(f)
    assert ctf.shape == (len(stack), 9) and ctf.dtype == np.float32
    np.testing.assert_allclose(ctf[:, 0], stack.box_size)
    np.testing.assert_allclose(ctf[:, 1], stack.pixel_size, rtol=1e-6)
    # cryoDRGN's parse_pose_star convention: rot = R_from_relion(angles), trans = origin_px / D
    r, t, p = matrix_to_euler(np.asarray(stack.nuisance.rotation))
    np.testing.assert_allclose(
        rot, np.stack([cryodrgn_R_from_relion(*x) for x in zip(r, t, p)]), atol=2e-6
    )
    origin_px = -np.asarray(stack.nuisance.shift_in_angstroms) / stack.pixel_size
    np.testing.assert_allclose(trans, origin_px / stack.box_size, rtol=1e-5, atol=1e-7)

    back = read_particles(tmp_path / "particles.mrcs", ctf=paths["ctf"], pose=paths["pose"])
    assert_same_particles(stack, back)
    meta_only = read_particles(paths["ctf"], pose=paths["pose"])
    assert isinstance(meta_only.images, MissingImages) and meta_only.has_poses
    assert_same_particles(stack, meta_only, images=False)
    with pytest.raises(CryosipInputError, match="no particle images"):
        meta_only.images[0]
    del stack0


def test_cryodrgn_ind_and_overrides(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    write_star(tmp_path / "p.star", stack, image_names=names)
    s = read_star(tmp_path / "p.star")
    ind = np.array([4, 1, 2])
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(ind, f)
    sub = read_particles(tmp_path / "p.star", ind=tmp_path / "ind.pkl")
    assert_same_particles(stack.subset(ind), sub)
    # a pose.pkl for the selected particles only
    other = random_stack(seed=7, n=3)
    rot = np.asarray(other.nuisance.rotation)
    trans = np.full((3, 2), 0.01)
    with open(tmp_path / "pose.pkl", "wb") as f:
        pickle.dump((rot, trans), f)
    sub2 = apply_cryodrgn(s, pose=tmp_path / "pose.pkl", ind=tmp_path / "ind.pkl")
    np.testing.assert_allclose(np.asarray(sub2.nuisance.rotation), rot, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(sub2.nuisance.shift_in_angstroms), -0.01 * s.box_size * s.pixel_size, rtol=1e-6
    )
    with pytest.raises(
        CryosipInputError, match="pose table has 3 rows but the particle stack has 6"
    ):
        apply_cryodrgn(s, pose=tmp_path / "pose.pkl")
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(np.ones((6, 3, 3)), f)
    with pytest.raises(CryosipInputError, match="bad.pkl: pose 1 is not a rotation matrix"):
        apply_cryodrgn(s, pose=tmp_path / "bad.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(
        CryosipInputError, match="junk.pkl: (not a readable pickle|refusing to load pickle)"
    ):
        read_cryodrgn(ctf=tmp_path / "junk.pkl")
