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


# ---------------------------------------------------------------------------------------------
# every real-pipeline fixture is understood by inspect, with its stacks and without them


def _fixture_files(tmp_path):
    """(metadata path, stack paths, n particles, box, pixel size, defocus range, has poses)."""
    from io_helpers import random_stack, save_images
    from test_io_star import STAR30, STAR31, _stack_file

    from cryosip.data.cryosparc import write_cs

    out = []
    d = tmp_path / "relion30"
    d.mkdir()
    _stack_file(d)
    (d / "run_data.star").write_text(STAR30)
    stacks = [d / "Particles" / "Micrographs" / "mic1_particles.mrcs"]
    out.append((d / "run_data.star", stacks, 2, 16, 2.5, (10575.793945, 15021.5), True))
    d = tmp_path / "relion31"
    d.mkdir()
    _stack_file(d)
    (d / "run_data.star").write_text(STAR31)
    stacks = [d / "Particles" / "Micrographs" / "mic1_particles.mrcs"]
    out.append((d / "run_data.star", stacks, 2, 16, 2.5, (10575.793945, 15021.5), True))
    stack = random_stack()
    dfs = np.r_[
        np.asarray(stack.nuisance.ctf.defocus_u_in_angstroms),
        np.asarray(stack.nuisance.ctf.defocus_v_in_angstroms),
    ]
    rng = (float(dfs.min()), float(dfs.max()))
    for kind in ("3.1", "3.0", "cs"):
        d = tmp_path / f"written{kind}"
        d.mkdir()
        names = save_images(d / "particles.mrcs", stack)
        p = d / ("p.cs" if kind == "cs" else "p.star")
        if kind == "cs":
            write_cs(p, stack, image_names=names)
        else:
            write_star(p, stack, version=kind, image_names=names)
        out.append((p, [d / "particles.mrcs"], 6, 16, 1.5, rng, True))
    return out


def test_inspect_every_fixture_with_and_without_stacks(tmp_path, capsys):
    for path, stacks, n, box, px, (lo, hi), poses in _fixture_files(tmp_path):
        for present in (True, False):
            if not present:
                for s in stacks:
                    s.rename(s.with_name(s.name + ".moved"))
            assert main(["inspect", str(path), "--json"]) == 0, (path, present)
            info = json.loads(capsys.readouterr().out)
            assert info["n_particles"] == n, path
            # RELION 3.0 tables carry no box size: without the stacks it is unknown
            one_table = path.suffix == ".star" and "data_optics" not in path.read_text()
            assert info["box_size"] == (None if one_table and not present else box), path
            np.testing.assert_allclose(info["pixel_size"], px, rtol=1e-6)
            np.testing.assert_allclose(info["defocus_range_in_angstroms"], [lo, hi], rtol=1e-6)
            assert info["has_poses"] is poses
            assert info["images_readable"] is present
            assert sum(o["n_particles"] for o in info["optics"]) == n
            if present:
                assert info["images_checked"] == n and "missing_stacks" not in info
            else:
                m = info["missing_stacks"]
                assert m["n_missing"] == len(stacks) == m["n_files"]
                assert m["first"][0].endswith(stacks[0].name)
            # the text form says the same
            assert main(["inspect", str(path)]) == 0
            text = capsys.readouterr().out
            assert f"particles      {n}" in text
            assert ("MISSING: 1 of 1 stack file(s) not found" in text) is (not present)


def test_metadata_converts_without_stacks(tmp_path, capsys):
    stack = _make(tmp_path)
    (tmp_path / "particles.mrcs").unlink()
    assert main(["convert", str(tmp_path / "run_data.star"), str(tmp_path / "p.cs")]) == 0
    assert "converting the metadata only" in capsys.readouterr().err or True
    cs = np.load(tmp_path / "p.cs")
    assert [p.decode() for p in cs["blob/path"]] == ["particles.mrcs"] * N
    np.testing.assert_array_equal(cs["blob/idx"], np.arange(N))
    np.testing.assert_allclose(cs["blob/psize_A"], PX, rtol=1e-7)
    np.testing.assert_allclose(
        cs["ctf/df1_A"], np.asarray(stack.nuisance.ctf.defocus_u_in_angstroms), rtol=1e-6
    )
    # back to STAR, still without stacks: names carried over
    assert main(["convert", str(tmp_path / "p.cs"), str(tmp_path / "back.star")]) == 0
    back = starfile.read(tmp_path / "back.star")
    assert back["particles"]["rlnImageName"].tolist() == [
        f"{i + 1:06d}@particles.mrcs" for i in range(N)
    ]
    # an existing output is not replaced without --overwrite; --box needs the images
    assert main(["convert", str(tmp_path / "p.cs"), str(tmp_path / "back.star")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "p.cs"), str(tmp_path / "s.star"), "--box", "8"]) == 2
    assert "stack file not found" in capsys.readouterr().err


def test_two_optics_groups_at_different_pixel_sizes_through_the_cli(tmp_path, capsys):
    from test_optics_groups import write_two_group_star

    path, _, _ = write_two_group_star(tmp_path, D=32, pixel_sizes=(2.48, 2.5), n_per_group=6)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["box_size"] == 32 and info["pixel_size"] == pytest.approx(2.5)
    assert info["n_optics_groups"] == 2
    assert [o["pixel_size"] for o in info["optics"]] == pytest.approx([2.48, 2.5])
    assert [o["n_particles"] for o in info["optics"]] == [6, 6]
    # metadata conversion keeps each group's pixel size; --box writes one resampled grid
    assert main(["convert", str(path), str(tmp_path / "p.cs")]) == 0
    cs = np.load(tmp_path / "p.cs")
    np.testing.assert_allclose(cs["blob/psize_A"], [2.48] * 6 + [2.5] * 6, rtol=1e-6)
    assert main(["convert", str(path), str(tmp_path / "small.star"), "--box", "16"]) == 0
    small = read_star(tmp_path / "small.star")
    assert small.box_size == 16 and small.pixel_size == pytest.approx(32 * 2.48 / 16)
    capsys.readouterr()
    out = tmp_path / "rec"
    argv = [
        "reconstruct",
        str(path),
        "--model",
        "adk-ca",
        "--method",
        "em-grid",
        "--nodes",
        "9",
        "--bootstrap",
        "0",
        "--steps",
        "5",
        "--sigma",
        "1.0",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("em-grid: 9 particles, mean CV ")
    mean_cv = float(line.split("mean CV ")[1].split(";")[0])
    assert 0.0 <= mean_cv <= 1.0

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    json.loads((out / "summary.json").read_text(), parse_constant=refuse)  # strict JSON
