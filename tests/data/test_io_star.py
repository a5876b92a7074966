"""RELION STAR 3.0 / 3.1: round trips, hand-written RELION text, starfile agreement, bad input."""

# ruff: noqa: E501  (the STAR texts below are kept exactly as RELION writes them)

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
from io_helpers import assert_same_particles, random_stack, save_images

from cryosip.cryoem.pose import euler_to_matrix
from cryosip.data.errors import CryosipInputError
from cryosip.data.mrc import LazyImageStack, write_mrcs
from cryosip.data.particles import ParticleStack, read_particles
from cryosip.data.star import read_star, write_star

# -- RELION 3.0 as relion_refine 3.0 writes it (trailing blanks, fixed-width columns) -------------
STAR30 = """
data_

loop_ 
_rlnMicrographName #1 
_rlnCoordinateX #2 
_rlnCoordinateY #3 
_rlnImageName #4 
_rlnDefocusU #5 
_rlnDefocusV #6 
_rlnDefocusAngle #7 
_rlnVoltage #8 
_rlnSphericalAberration #9 
_rlnAmplitudeContrast #10 
_rlnMagnification #11 
_rlnDetectorPixelSize #12 
_rlnCtfFigureOfMerit #13 
_rlnGroupNumber #14 
_rlnAngleRot #15 
_rlnAngleTilt #16 
_rlnAnglePsi #17 
_rlnOriginX #18 
_rlnOriginY #19 
_rlnClassNumber #20 
_rlnNormCorrection #21 
_rlnRandomSubset #22 
Micrographs/mic1.mrc  1043.000000   873.000000 000001@Particles/Micrographs/mic1_particles.mrcs 10864.146484 10575.793945    77.995003   300.000000     2.700000     0.100000 56000.000000    14.000000     0.131144            1   -34.522630    77.139490   132.496860     1.213800    -2.786200            1     0.793810            1 
Micrographs/mic1.mrc   512.000000   211.000000 000003@Particles/Micrographs/mic1_particles.mrcs 15021.500000 14800.250000   -12.500000   300.000000     2.700000     0.100000 56000.000000    14.000000     0.131144            1   170.000000   110.000000   -20.000000    -0.500000     3.000000            1     1.021000            2 
"""

# -- RELION 3.1 (relion_refine 3.1 / 4.0): two optics groups with the same box and pixel size --------
STAR31 = """
# version 30001

data_optics

loop_ 
_rlnOpticsGroupName #1 
_rlnOpticsGroup #2 
_rlnMicrographOriginalPixelSize #3 
_rlnVoltage #4 
_rlnSphericalAberration #5 
_rlnAmplitudeContrast #6 
_rlnImagePixelSize #7 
_rlnImageSize #8 
_rlnImageDimensionality #9 
opticsGroup1            1     0.885000   200.000000     1.400000     0.100000     2.500000           16            2 
opticsGroup2            2     0.885000   300.000000     2.700000     0.070000     2.500000           16            2 
 

# version 30001

data_particles

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnAutopickFigureOfMerit #3 
_rlnClassNumber #4 
_rlnAnglePsi #5 
_rlnImageName #6 
_rlnMicrographName #7 
_rlnOpticsGroup #8 
_rlnCtfMaxResolution #9 
_rlnCtfFigureOfMerit #10 
_rlnDefocusU #11 
_rlnDefocusV #12 
_rlnDefocusAngle #13 
_rlnCtfBfactor #14 
_rlnCtfScalefactor #15 
_rlnPhaseShift #16 
_rlnAngleRot #17 
_rlnAngleTilt #18 
_rlnOriginXAngst #19 
_rlnOriginYAngst #20 
_rlnRandomSubset #21 
  1043.000000   873.000000     0.033098            1   132.496860 000002@Particles/Micrographs/mic1_particles.mrcs MotionCorr/job002/mic1.mrc            1     4.874623     0.131140 10864.146484 10575.793945    77.995003     0.000000     1.000000     0.000000   -34.522630    77.139490     3.034500    -6.965500            1 
  2336.664720   512.000000     0.051200            1   -20.000000 000004@Particles/Micrographs/mic1_particles.mrcs MotionCorr/job002/mic1.mrc            2     5.100000     0.120000 15021.500000 14800.250000   -12.500000    25.000000     0.800000    12.000000   170.000000   110.000000    -1.250000     7.500000            2 
"""


def _stack_file(root, n=4, box=16, pixel=2.5, seed=0):
    imgs = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    path = root / "Particles" / "Micrographs" / "mic1_particles.mrcs"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mrcs(path, imgs, pixel)
    return imgs


@pytest.mark.parametrize("version", ["3.0", "3.1"])
def test_round_trip(tmp_path, stack_on_disk, version):
    stack, names = stack_on_disk
    write_star(tmp_path / f"p{version}.star", stack, version=version, image_names=names)
    back = read_star(tmp_path / f"p{version}.star")
    assert isinstance(back.images, LazyImageStack) and back.has_poses and back.has_shifts
    assert_same_particles(stack, back)
    # and again, from the read stack (names derived from the metadata)
    write_star(tmp_path / "again.star", back, version="3.1" if version == "3.0" else "3.0")
    assert_same_particles(stack, read_star(tmp_path / "again.star"))


def test_reader_agrees_with_starfile_and_mrcfile(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    write_star(tmp_path / "p.star", stack, image_names=names)
    ours = read_star(tmp_path / "p.star")
    ref = starfile.read(tmp_path / "p.star")
    parts, optics = ref["particles"], ref["optics"]
    np.testing.assert_allclose(
        np.asarray(ours.nuisance.ctf.defocus_u_in_angstroms), parts["rlnDefocusU"], rtol=1e-6
    )
    np.testing.assert_allclose(ours.pixel_size, optics["rlnImagePixelSize"][0], rtol=1e-7)
    A = np.asarray(
        euler_to_matrix(
            parts["rlnAngleRot"].to_numpy(),
            parts["rlnAngleTilt"].to_numpy(),
            parts["rlnAnglePsi"].to_numpy(),
        )
    )
    np.testing.assert_allclose(np.asarray(ours.nuisance.rotation), A, atol=2e-6)
    np.testing.assert_allclose(
        np.asarray(ours.nuisance.shift_in_angstroms),
        -parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
        rtol=1e-6,
    )
    with mrcfile.open(tmp_path / "particles.mrcs") as m:
        idx = [int(s.split("@")[0]) - 1 for s in parts["rlnImageName"]]
        np.testing.assert_allclose(np.asarray(ours.images), m.data[idx], rtol=0, atol=0)


def test_handwritten_relion30(tmp_path):
    imgs = _stack_file(tmp_path)
    (tmp_path / "run_data.star").write_text(STAR30)
    s = read_star(tmp_path / "run_data.star")
    assert len(s) == 2 and s.box_size == 16 and s.optics is None
    np.testing.assert_allclose(s.pixel_size, 14.0 * 1e4 / 56000.0, rtol=1e-12)  # 2.5 A
    A = np.asarray(
        euler_to_matrix(
            np.array([-34.52263, 170.0]), np.array([77.13949, 110.0]), np.array([132.49686, -20.0])
        )
    )
    np.testing.assert_allclose(np.asarray(s.nuisance.rotation), A, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(s.nuisance.shift_in_angstroms),
        -2.5 * np.array([[1.2138, -2.7862], [-0.5, 3.0]]),
        rtol=1e-6,
    )
    c = s.nuisance.ctf
    np.testing.assert_allclose(
        np.asarray(c.defocus_u_in_angstroms), [10864.146484, 15021.5], rtol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(c.defocus_angle_in_degrees), [77.995003, -12.5], rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(c.voltage_in_kilovolts), [300, 300])
    np.testing.assert_allclose(np.asarray(c.phase_shift_in_degrees), [0, 0])  # RELION default
    np.testing.assert_allclose(np.asarray(c.scale), [1, 1])
    np.testing.assert_allclose(np.asarray(s.images), imgs[[0, 2]], rtol=0, atol=0)  # 1-based names


def test_handwritten_relion31_two_optics_groups(tmp_path):
    imgs = _stack_file(tmp_path)
    (tmp_path / "run_data.star").write_text(STAR31)
    s = read_star(tmp_path / "run_data.star")
    assert len(s) == 2 and s.pixel_size == 2.5 and s.box_size == 16
    c = s.nuisance.ctf
    np.testing.assert_allclose(
        np.asarray(c.voltage_in_kilovolts), [200, 300]
    )  # joined on rlnOpticsGroup
    np.testing.assert_allclose(np.asarray(c.spherical_aberration_in_mm), [1.4, 2.7], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.amplitude_contrast), [0.1, 0.07], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.bfactor_in_angstroms2), [0, 25])
    np.testing.assert_allclose(np.asarray(c.scale), [1.0, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.phase_shift_in_degrees), [0, 12])
    np.testing.assert_allclose(
        np.asarray(s.nuisance.shift_in_angstroms), [[-3.0345, 6.9655], [1.25, -7.5]], rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(s.images), imgs[[1, 3]], rtol=0, atol=0)

    # write back: every column that is not recomputed is kept, optics groups survive
    write_star(tmp_path / "out.star", s)
    out = starfile.read(tmp_path / "out.star")
    orig = starfile.read(tmp_path / "run_data.star")
    for col in [
        "rlnCoordinateX",
        "rlnAutopickFigureOfMerit",
        "rlnClassNumber",
        "rlnMicrographName",
        "rlnCtfMaxResolution",
        "rlnRandomSubset",
        "rlnImageName",
    ]:
        assert (
            out["particles"][col].tolist() == pytest.approx(orig["particles"][col].tolist())
            if out["particles"][col].dtype.kind == "f"
            else out["particles"][col].tolist() == orig["particles"][col].tolist()
        )
    assert out["optics"]["rlnOpticsGroupName"].tolist() == ["opticsGroup1", "opticsGroup2"]
    np.testing.assert_allclose(out["optics"]["rlnMicrographOriginalPixelSize"], [0.885, 0.885])
    np.testing.assert_allclose(out["optics"]["rlnVoltage"], [200, 300])
    assert_same_particles(s, read_star(tmp_path / "out.star"))

    # 3.1 -> 3.0: per-particle optics, origins in pixels
    write_star(tmp_path / "old.star", s, version="3.0")
    old = starfile.read(tmp_path / "old.star")
    assert "rlnOpticsGroup" not in old.columns and "rlnOriginXAngst" not in old.columns
    np.testing.assert_allclose(old["rlnOriginX"], np.array([3.0345, -1.25]) / 2.5, rtol=1e-6)
    np.testing.assert_allclose(old["rlnVoltage"], [200, 300])


def _below_nyquist(img):
    f = np.fft.fft2(np.asarray(img, np.float64))
    D = f.shape[-1]
    f[D // 2, :] = 0
    f[:, D // 2] = 0
    return np.fft.ifft2(f).real


def test_optics_groups_with_different_boxes(tmp_path):
    rng = np.random.default_rng(1)
    big = rng.normal(size=(2, 32, 32)).astype(np.float32)
    small = rng.normal(size=(2, 16, 16)).astype(np.float32)
    write_mrcs(tmp_path / "g1.mrcs", big, 1.0)
    write_mrcs(tmp_path / "g2.mrcs", small, 2.0)
    text = STAR31.replace(
        "2.500000           16            2 \nopticsGroup2",
        "1.000000           32            2 \nopticsGroup2",
    )
    text = text.replace("2.500000           16", "2.000000           16")
    text = text.replace("000002@Particles/Micrographs/mic1_particles.mrcs", "000001@g1.mrcs")
    text = text.replace("000004@Particles/Micrographs/mic1_particles.mrcs", "000002@g2.mrcs")
    (tmp_path / "mixed.star").write_text(text)
    from cryosip.data.mrc import fourier_crop

    # 32 px x 1 A and 16 px x 2 A: the same 32 A field; the working grid is the coarser one
    for s in (read_star(tmp_path / "mixed.star"), read_star(tmp_path / "mixed.star", box_size=16)):
        assert s.box_size == 16 and s.pixel_size == pytest.approx(2.0)
        np.testing.assert_array_equal(s.group_ids(), [0, 1])
        # band-limited resampling by an integer ratio is the Fourier crop (up to the Nyquist
        # row/column, which the separable resampler keeps as a cosine)
        np.testing.assert_allclose(
            _below_nyquist(s.images[0]), _below_nyquist(fourier_crop(big[0], 16)), rtol=0, atol=2e-6
        )
        np.testing.assert_allclose(s.images[1], small[1], rtol=0, atol=0)


def test_missing_poses_and_defaults(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    write_star(tmp_path / "p.star", stack, image_names=names)
    t = starfile.read(tmp_path / "p.star")
    t["particles"] = t["particles"].drop(
        columns=[
            "rlnAngleRot",
            "rlnAngleTilt",
            "rlnAnglePsi",
            "rlnOriginXAngst",
            "rlnOriginYAngst",
            "rlnPhaseShift",
            "rlnCtfBfactor",
            "rlnCtfScalefactor",
            "rlnDefocusV",
            "rlnDefocusAngle",
        ]
    )
    starfile.write(t, tmp_path / "nopose.star", overwrite=True)
    s = read_star(tmp_path / "nopose.star")
    assert not s.has_poses and not s.has_shifts
    np.testing.assert_allclose(
        np.asarray(s.nuisance.rotation), np.broadcast_to(np.eye(3), (len(s), 3, 3))
    )
    np.testing.assert_allclose(
        np.asarray(s.nuisance.ctf.defocus_v_in_angstroms),
        np.asarray(s.nuisance.ctf.defocus_u_in_angstroms),
    )
    np.testing.assert_allclose(np.asarray(s.nuisance.ctf.scale), 1.0)
    write_star(tmp_path / "back.star", s)
    assert (
        "rlnAngleRot" not in starfile.read(tmp_path / "back.star")["particles"].columns
    )  # no invented poses


def test_premultiplied_and_phase_flipped_are_flagged(tmp_path):
    _stack_file(tmp_path)
    text = STAR31.replace(
        "_rlnImageDimensionality #9 \n",
        "_rlnImageDimensionality #9 \n_rlnCtfDataAreCtfPremultiplied #10 \n",
    )
    text = text.replace(
        "16            2 \nopticsGroup2", "16            2 1\nopticsGroup2"
    ).replace("16            2 \n \n", "16            2 0\n \n")
    (tmp_path / "pre.star").write_text(text)
    with pytest.raises(CryosipInputError, match="CTF-premultiplied"):
        read_star(tmp_path / "pre.star")
    s = read_star(tmp_path / "pre.star", allow_unsupported_contrast=True)
    assert s.ctf_premultiplied and not s.phase_flipped
    flipped = STAR30.replace(
        "_rlnRandomSubset #22 \n", "_rlnRandomSubset #22 \n_rlnCtfDataArePhaseFlipped #23 \n"
    )
    flipped = flipped.replace("            1 \nMicro", "            1 1\nMicro").replace(
        "            2 \n", "            2 1\n"
    )
    (tmp_path / "flip.star").write_text(flipped)
    with pytest.raises(CryosipInputError, match="phase-flipped"):
        read_star(tmp_path / "flip.star")


def test_datadir(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    (tmp_path / "meta").mkdir()
    write_star(
        tmp_path / "meta" / "p.star",
        stack,
        image_names=[n.replace("@", "@elsewhere/") for n in names],
    )
    with pytest.raises(CryosipInputError, match="stack file not found.*--datadir"):
        read_star(tmp_path / "meta" / "p.star")
    s = read_particles(tmp_path / "meta" / "p.star", datadir=tmp_path)
    assert_same_particles(stack, s)


# ---------------------------------------------------------------------------------------------------
# bad input: one line naming the file and the fault, nothing written


def _bad(tmp_path, text, name="bad.star"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda t: t.replace("_rlnDefocusU #5 \n", "_rlnDefocusUU #5 \n"),
            "missing required column.*_rlnDefocusU",
        ),
        (
            lambda t: t.replace("_rlnDefocusU #5 \n", "_rlnDefocusUx #5 \n"),
            "missing required column.*_rlnDefocusU; _rlnDefocusUx is not a RELION label: did you "
            "mean _rlnDefocusU",
        ),
        (lambda t: "# version 20000\n" + t, "unknown STAR version"),
        (lambda t: t.replace("data_\n", "data_optics\n"), "data_optics but no data_particles"),
        (
            lambda t: t.replace("mic1_particles.mrcs", "nothere.mrcs"),
            "nothere.mrcs: stack file not found",
        ),
        (
            lambda t: t.replace("000003@", "000009@"),
            "mic1_particles.mrcs: image index 9 out of range .stack has 4",
        ),
        (lambda t: t.replace("000003@", "000000@"), "bad rlnImageName"),
        (lambda t: t.replace("10864.146484", "nan"), "rlnDefocusU = .* is not a finite number"),
        (lambda t: "", "empty file"),
        (lambda t: "just some text\nwithout any blocks\n", "no data_ blocks|not a readable STAR"),
    ],
)
def test_bad_star30(tmp_path, mutate, match):
    _stack_file(tmp_path)
    p = _bad(tmp_path, mutate(STAR30))
    with pytest.raises(CryosipInputError, match=match) as e:
        read_star(p)
    assert "\n" not in str(e.value)


def test_bad_box_and_pixels(tmp_path):
    imgs = _stack_file(tmp_path)
    p = _bad(tmp_path, STAR31.replace("2.500000           16", "2.500000           24"))
    with pytest.raises(
        CryosipInputError, match="metadata box size 24 but stack .* has 16-pixel images"
    ):
        read_star(p)
    # two stacks with different boxes in one 3.0 file
    write_mrcs(tmp_path / "other.mrcs", np.zeros((3, 8, 8), np.float32), 2.5)
    p = _bad(
        tmp_path,
        STAR30.replace("000003@Particles/Micrographs/mic1_particles.mrcs", "000003@other.mrcs"),
    )
    # 8 px and 16 px at 2.5 A/px: brought to one grid covering the smaller field (8 px)
    s = read_star(p)
    assert s.box_size == 8 and s.pixel_size == pytest.approx(2.5)
    np.testing.assert_allclose(s.images[0], imgs[0][4:12, 4:12], rtol=0, atol=2e-5)
    # NaN pixels are found when the images are read
    raw = np.memmap(
        tmp_path / "Particles/Micrographs/mic1_particles.mrcs",
        dtype="<f4",
        mode="r+",
        offset=1024,
        shape=imgs.shape,
    )
    raw[2, 0, 0] = np.nan
    raw.flush()
    del raw
    s = read_star(_bad(tmp_path, STAR30))
    with pytest.raises(CryosipInputError, match="mic1_particles.mrcs: image 3 contains NaN or Inf"):
        np.asarray(s.images)


def test_write_is_atomic(tmp_path, stack_on_disk):
    stack, names = stack_on_disk
    with pytest.raises(ValueError, match="image names"):
        write_star(tmp_path / "x.star", stack, image_names=names[:-1])
    with pytest.raises(ValueError, match="MrcsWriter"):
        write_star(tmp_path / "y.star", stack)  # in-memory images, no names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["particles.mrcs"]


def test_many_stacks_lazy(tmp_path):
    stacks = [random_stack(seed=s, n=3) for s in range(3)]
    names = []
    for k, st in enumerate(stacks):
        names += save_images(tmp_path / f"s{k}.mrcs", st)
    import dataclasses

    import jax

    nu = jax.tree_util.tree_map(lambda *x: np.concatenate(x), *[s.nuisance for s in stacks])
    allst = dataclasses.replace(
        stacks[0], images=np.concatenate([np.asarray(s.images) for s in stacks]), nuisance=nu
    )
    order = np.random.default_rng(0).permutation(9)
    sub = allst.subset(order)
    write_star(tmp_path / "m.star", sub, image_names=[names[i] for i in order])
    back = read_star(tmp_path / "m.star")
    assert len(back.images.files) == 3
    assert_same_particles(sub, back)
    np.testing.assert_allclose(
        back.images[np.array([8, 0, 4])], np.asarray(sub.images)[[8, 0, 4]], rtol=0, atol=0
    )
    part = back.take([5, 1])
    assert isinstance(part.images, LazyImageStack)
    np.testing.assert_allclose(
        np.asarray(part.images), np.asarray(sub.images)[[5, 1]], rtol=0, atol=0
    )


def test_origin_sign_matches_the_forward_model(tmp_path):
    """A particle rendered at +t from the box centre gets rlnOriginXAngst/YAngst = -t, and moving the
    image by the origin (RELION: origins "translate the image to its center") centres it."""
    import jax.numpy as jnp

    from cryosip.cryoem.atoms import AtomParameters
    from cryosip.cryoem.image_model import ImageModel

    D, px = 32, 2.0
    t = np.array([[6.0, -4.0]])
    stack_nu = ParticleStack.make_nuisance(
        np.eye(3)[None], t, defocus_u_in_angstroms=1.0, amplitude_contrast=1.0
    )
    model = ImageModel(D, px)
    atoms = AtomParameters.single_gaussian(1, sigma_in_angstroms=2.0)
    import jax

    img = -np.asarray(
        model.render(
            jnp.zeros((1, 3)), atoms, jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), stack_nu)
        )
    )
    yy, xx = np.mgrid[:D, :D] - D // 2
    w = np.clip(img, 0, None)
    centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum() * px
    np.testing.assert_allclose(
        centroid, t[0], atol=0.5
    )  # the forward model puts the particle at +t (2 A pixels)

    write_mrcs(tmp_path / "one.mrcs", img[None].astype(np.float32), px)
    write_star(
        tmp_path / "one.star",
        ParticleStack(img[None].astype(np.float32), stack_nu, px),
        image_names=["000001@one.mrcs"],
    )
    origin = starfile.read(tmp_path / "one.star")["particles"][
        ["rlnOriginXAngst", "rlnOriginYAngst"]
    ].to_numpy()[0]
    np.testing.assert_allclose(origin, -t[0], rtol=1e-6)
    # RELION applies the origin to the observation to bring it onto the reference projection
    ky = np.fft.fftfreq(D)[:, None]
    kx = np.fft.fftfreq(D)[None, :]
    moved = np.fft.ifft2(
        np.fft.fft2(img) * np.exp(-2j * np.pi * (kx * origin[0] + ky * origin[1]) / px)
    ).real
    w = np.clip(moved, 0, None)
    np.testing.assert_allclose(
        np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum() * px, [0.0, 0.0], atol=0.5
    )
    np.testing.assert_allclose(
        np.asarray(read_star(tmp_path / "one.star").nuisance.shift_in_angstroms), t, rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------------
# real files as they come: RELION defaults, missing angles and typos, pixel origins, missing stacks


def _drop_columns(text, *labels):
    """Remove columns from the one-table STAR30 text (header and values)."""
    lines = text.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("_rln")]
    names = [lines[i].split()[0][1:] for i in header]
    drop = [names.index(lb) for lb in labels]
    out = []
    for i, ln in enumerate(lines):
        if i in header:
            if names[header.index(i)] in labels:
                continue
            out.append(ln)
        elif ln.startswith("Micrographs/"):
            vals = ln.split()
            out.append("  ".join(v for k, v in enumerate(vals) if k not in drop))
        else:
            out.append(ln)
    return "\n".join(out) + "\n"


def test_relion30_without_optional_ctf_columns_takes_relion_defaults(tmp_path, caplog):
    _stack_file(tmp_path)
    text = _drop_columns(STAR30, "rlnAmplitudeContrast", "rlnSphericalAberration", "rlnVoltage")
    p = _bad(tmp_path, text, "old.star")
    with caplog.at_level("WARNING", logger="cryosip.data.star"):
        s = read_star(p)
    c = s.nuisance.ctf
    np.testing.assert_allclose(np.asarray(c.amplitude_contrast), [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.spherical_aberration_in_mm), [2.7, 2.7], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.voltage_in_kilovolts), [300, 300], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c.phase_shift_in_degrees), [0, 0], atol=0)
    np.testing.assert_allclose(np.asarray(c.bfactor_in_angstroms2), [0, 0], atol=0)
    np.testing.assert_allclose(np.asarray(c.scale), [1, 1], atol=0)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1, warnings_
    for part in (
        "_rlnAmplitudeContrast = 0.1",
        "_rlnSphericalAberration = 2.7",
        "_rlnVoltage = 300",
        "_rlnPhaseShift = 0",
        "_rlnCtfBfactor = 0",
        "_rlnCtfScalefactor = 1",
    ):
        assert part in warnings_[0]
    # the same in a 3.1 optics table
    _stack_file(tmp_path)
    t31 = STAR31.replace("_rlnAmplitudeContrast #6 \n", "")
    t31 = t31.replace("     0.100000     2.500000", "     2.500000").replace(
        "     0.070000     2.500000", "     2.500000"
    )
    t31 = t31.replace("_rlnImagePixelSize #7", "_rlnImagePixelSize #6")
    s31 = read_star(_bad(tmp_path, t31, "new.star"))
    np.testing.assert_allclose(
        np.asarray(s31.nuisance.ctf.amplitude_contrast), [0.1, 0.1], rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(s31.nuisance.ctf.voltage_in_kilovolts), [200, 300])


def test_no_angles_is_an_error_for_reconstruction_and_typos_are_named(tmp_path):
    _stack_file(tmp_path)
    p = _bad(tmp_path, _drop_columns(STAR30, "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    s = read_star(p)  # reading alone (inspect) works
    assert not s.has_poses
    with pytest.raises(
        CryosipInputError, match="no poses.*_rlnAngleRot, _rlnAngleTilt, _rlnAnglePsi"
    ) as e:
        read_particles(p)  # what reconstruct calls
    assert "\n" not in str(e.value)
    typo = _bad(tmp_path, STAR30.replace("_rlnAngleRot #15", "_rlnAngelRot #15"), "typo.star")
    with pytest.raises(
        CryosipInputError,
        match="lacks _rlnAngleRot .*_rlnAngelRot is not a RELION label: did you mean _rlnAngleRot",
    ):
        read_particles(typo)
    assert not read_star(typo).has_poses


def test_pixel_origins_in_a_relion31_file_are_converted(tmp_path, caplog):
    _stack_file(tmp_path)
    text = STAR31.replace("_rlnOriginXAngst #19", "_rlnOriginX #19").replace(
        "_rlnOriginYAngst #20", "_rlnOriginY #20"
    )
    with caplog.at_level("WARNING", logger="cryosip.data.star"):
        s = read_star(_bad(tmp_path, text))
    # pixels x 2.5 A/px, sign: shift = -origin
    np.testing.assert_allclose(
        np.asarray(s.nuisance.shift_in_angstroms),
        -2.5 * np.array([[3.0345, -6.9655], [-1.25, 7.5]]),
        rtol=1e-6,
    )
    assert s.has_shifts
    assert any("in pixels" in r.getMessage() for r in caplog.records)
    half = STAR31.replace("_rlnOriginYAngst #20", "_rlnOriginYAngts #20")
    with pytest.raises(
        CryosipInputError, match="_rlnOriginXAngst without _rlnOriginYAngst.*did you mean"
    ):
        read_star(_bad(tmp_path, half, "half.star"))


def test_missing_stacks_metadata_only(tmp_path):
    _stack_file(tmp_path)
    p = _bad(tmp_path, STAR31)
    (tmp_path / "Particles" / "Micrographs" / "mic1_particles.mrcs").unlink()
    with pytest.raises(CryosipInputError, match="stack file not found"):
        read_star(p)
    s = read_star(p, require_images=False)
    assert len(s) == 2 and s.box_size == 16 and s.pixel_size == 2.5 and s.has_poses
    assert s.images.missing_files == ["Particles/Micrographs/mic1_particles.mrcs"]
    with pytest.raises(CryosipInputError, match="1 of 1 stack file.*not found"):
        np.asarray(s.images)
    np.testing.assert_allclose(
        np.asarray(s.nuisance.ctf.defocus_u_in_angstroms), [10864.146484, 15021.5], rtol=1e-7
    )
