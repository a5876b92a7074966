"""`cryosip inspect` and `cryosip convert`: run main([...]) and check the numbers in the output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryosip.cli.main import main
from cryosip.data.cryosparc import read_cs
from cryosip.data.mrc import read_mrcs, write_mrcs
from cryosip.data.particles import ParticleStack, read_particles
from cryosip.data.star import read_star, write_star

N, D, PX = 5, 16, 2.0


def _make(tmp_path, bfactor=True):
    rng = np.random.default_rng(3)
    nu = ParticleStack.make_nuisance(
        Rotation.random(N, random_state=3).as_matrix(),
        rng.normal(0, 2, (N, 2)),
        defocus_u_in_angstroms=rng.uniform(1e4, 2e4, N),
        defocus_v_in_angstroms=rng.uniform(1e4, 2e4, N),
        defocus_angle_in_degrees=rng.uniform(0, 180, N),
        phase_shift_in_degrees=0.0,
        bfactor_in_angstroms2=rng.uniform(0, 50, N) if bfactor else 0.0,
    )
    images = rng.normal(size=(N, D, D)).astype(np.float32)
    write_mrcs(tmp_path / "particles.mrcs", images, PX)
    stack = ParticleStack(images, nu, PX)
    write_star(
        tmp_path / "run_data.star",
        stack,
        image_names=[f"{i + 1:06d}@particles.mrcs" for i in range(N)],
    )
    return stack


def _close(a, b):
    np.testing.assert_allclose(
        np.asarray(b.nuisance.rotation), np.asarray(a.nuisance.rotation), atol=2e-6
    )
    np.testing.assert_allclose(
        np.asarray(b.nuisance.shift_in_angstroms),
        np.asarray(a.nuisance.shift_in_angstroms),
        rtol=1e-6,
        atol=2e-5,
    )
    for f in (
        "defocus_u_in_angstroms",
        "defocus_v_in_angstroms",
        "defocus_angle_in_degrees",
        "voltage_in_kilovolts",
        "spherical_aberration_in_mm",
        "amplitude_contrast",
        "phase_shift_in_degrees",
    ):
        np.testing.assert_allclose(
            np.asarray(getattr(b.nuisance.ctf, f)),
            np.asarray(getattr(a.nuisance.ctf, f)),
            rtol=1e-6,
            err_msg=f,
        )
    np.testing.assert_allclose(np.asarray(b.images), np.asarray(a.images), rtol=0, atol=0)


def test_inspect_json_star(tmp_path, capsys):
    stack = _make(tmp_path)
    assert main(["inspect", str(tmp_path / "run_data.star"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_particles"] == N and info["has_poses"] is True and info["has_shifts"] is True
    assert info["optics"][0]["box_size"] == D and info["optics"][0]["pixel_size"] == pytest.approx(
        PX
    )
    df = (
        np.asarray(stack.nuisance.ctf.defocus_u_in_angstroms),
        np.asarray(stack.nuisance.ctf.defocus_v_in_angstroms),
    )
    np.testing.assert_allclose(
        info["defocus_range_in_angstroms"], [min(map(np.min, df)), max(map(np.max, df))], rtol=1e-6
    )
    assert info["ctf_premultiplied"] is False and info["images_checked"] == N
    np.testing.assert_allclose(
        info["first_particle_ctf"]["defocus_u_in_angstroms"],
        float(stack.nuisance.ctf.defocus_u_in_angstroms[0]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        info["noise_sigma_estimate"], 1.0, rtol=0.2
    )  # unit-variance random images


def test_inspect_text_and_png(tmp_path, capsys):
    _make(tmp_path)
    png = tmp_path / "montage.png"
    assert (
        main(["inspect", str(tmp_path / "run_data.star"), "--png", str(png), "--n-montage", "4"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"particles      {N}" in out and f"{D} px, {PX:.4f} A/px" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convert_between_all_formats(tmp_path, capsys):
    stack = _make(tmp_path, bfactor=False)
    star = tmp_path / "run_data.star"
    assert main(["convert", str(star), str(tmp_path / "p.cs")]) == 0
    assert f"wrote {N} particles" in capsys.readouterr().out
    _close(stack, read_cs(tmp_path / "p.cs"))
    assert (
        main(["convert", str(tmp_path / "p.cs"), str(tmp_path / "p30.star"), "--to", "star3.0"])
        == 0
    )
    t30 = starfile.read(tmp_path / "p30.star")
    assert "rlnOriginX" in t30.columns and "rlnOpticsGroup" not in t30.columns
    _close(stack, read_star(tmp_path / "p30.star"))
    (tmp_path / "drgn").mkdir()
    assert main(["convert", str(tmp_path / "p30.star"), str(tmp_path / "drgn")]) == 0
    assert sorted(p.name for p in (tmp_path / "drgn").iterdir()) == ["ctf.pkl", "pose.pkl"]
    assert (
        main(
            [
                "convert",
                str(tmp_path / "particles.mrcs"),
                str(tmp_path / "from_drgn.star"),
                "--ctf",
                str(tmp_path / "drgn" / "ctf.pkl"),
                "--pose",
                str(tmp_path / "drgn" / "pose.pkl"),
            ]
        )
        == 0
    )
    _close(stack, read_star(tmp_path / "from_drgn.star"))
    capsys.readouterr()
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "drgn" / "ctf.pkl"),
                "--json",
                "--pose",
                str(tmp_path / "drgn" / "pose.pkl"),
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert (
        info["n_particles"] == N and info["has_poses"] is True and info["images_readable"] is False
    )
    assert info["optics"][0]["box_size"] == D


def test_convert_with_working_box(tmp_path, capsys):
    stack = _make(tmp_path)
    assert (
        main(
            ["convert", str(tmp_path / "run_data.star"), str(tmp_path / "small.star"), "--box", "8"]
        )
        == 0
    )
    assert read_mrcs(tmp_path / "small.mrcs").shape == (N, 8, 8)
    small = read_star(tmp_path / "small.star")
    assert small.box_size == 8 and small.pixel_size == pytest.approx(PX * D / 8)
    np.testing.assert_allclose(
        np.asarray(small.nuisance.shift_in_angstroms),
        np.asarray(stack.nuisance.shift_in_angstroms),
        rtol=1e-6,
        atol=2e-5,
    )
    np.testing.assert_allclose(
        np.asarray(small.images),
        np.asarray(read_particles(tmp_path / "run_data.star", box_size=8).images),
        atol=1e-6,
    )


def _assert_one_line_error(capsys, name):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err, err


def test_bad_input_exit_codes_and_no_output(tmp_path, capsys):
    _make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(tmp_path / "missing.star"), str(tmp_path / "o.cs")]) == 2
    _assert_one_line_error(capsys, "missing.star: file not found")
    (tmp_path / "empty.star").write_text("")
    assert main(["inspect", str(tmp_path / "empty.star")]) == 2
    _assert_one_line_error(capsys, "empty.star: empty file")
    # a truncated stack
    raw = (tmp_path / "particles.mrcs").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "particles.mrcs").write_bytes(raw[:-10])
    (tmp_path / "cut" / "run_data.star").write_text((tmp_path / "run_data.star").read_text())
    assert main(["convert", str(tmp_path / "cut" / "run_data.star"), str(tmp_path / "cut.cs")]) == 2
    _assert_one_line_error(capsys, "particles.mrcs: truncated MRC file")
    # .cs without poses cannot feed a pose-based conversion
    data = np.load(tmp_path / "p.cs") if (tmp_path / "p.cs").exists() else None
    assert data is None
    assert main(["convert", str(tmp_path / "run_data.star"), str(tmp_path / "p.cs")]) == 0
    data = np.load(tmp_path / "p.cs")
    with open(tmp_path / "nopose.cs", "wb") as f:
        np.save(f, data[[n for n in data.dtype.names if not n.startswith("alignments3D")]])
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "nopose.cs"), str(tmp_path / "x.star")]) == 2
    _assert_one_line_error(capsys, "nopose.cs: no poses")
    assert main(["inspect", str(tmp_path / "nopose.cs"), "--json"]) == 0  # inspect still reports it
    assert json.loads(capsys.readouterr().out)["has_poses"] is False
    after = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(set(after) - set(before)) == ["cut", "empty.star", "nopose.cs", "p.cs"]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "particles.mrcs",
        "run_data.star",
    ]
