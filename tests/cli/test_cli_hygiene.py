"""CLI hygiene: bad numbers refused by argparse, --out rules, Ctrl-C, file modes, strict JSON,
the backend line."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest

from cryosip import _atomic
from cryosip.cli import _args
from cryosip.cli.main import main


def _usage_error(capsys, argv, what):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cryosip ") and "error: argument" in err and what in err, err


@pytest.mark.parametrize(
    "argv, what",
    [
        (["reconstruct", "p.star", "--model", "adk-ca", "--steps", "-5"], "--steps"),
        (["reconstruct", "p.star", "--model", "adk-ca", "--n-particles", "0"], "--n-particles"),
        (["reconstruct", "p.star", "--model", "adk-ca", "--sigma", "-1"], "--sigma"),
        (["reconstruct", "p.star", "--model", "adk-ca", "--bootstrap", "-1"], "--bootstrap"),
        (["reconstruct", "p.star", "--model", "adk-ca", "--heldout", "1"], "--heldout"),
        (["reconstruct", "p.star", "--model", "adk-ca", "--steps", "abc"], "--steps"),
        (["simulate", "--n-images", "0"], "--n-images"),
        (["simulate", "--snr", "nan"], "--snr"),
        (["simulate", "--amplitude-contrast", "1.5"], "--amplitude-contrast"),
        (["demo", "--steps", "-1"], "--steps"),
        (["inspect", "p.star", "--box", "-8"], "--box"),
        (["convert", "a.star", "b.cs", "--box", "0"], "--box"),
        (["experiment", "toys", "--seed", "-2"], "--seed"),
    ],
)
def test_bad_numbers_are_one_line_usage_errors(capsys, argv, what):
    if "--out" not in argv and argv[0] in ("reconstruct", "simulate"):
        argv = [*argv, "--out", "o"]
    _usage_error(capsys, argv, what)


def test_argument_types():
    assert _args.positive_int("3") == 3 and _args.positive_int("1e2") == 100
    assert _args.nonnegative_int("0") == 0
    assert _args.fraction("0") == 0.0 and _args.fraction("0.25") == 0.25
    assert _args.nonnegative_float("0") == 0.0 and _args.positive_float("2.5") == 2.5
    for fn, bad in [
        (_args.positive_int, "0"),
        (_args.positive_int, "2.5"),
        (_args.nonnegative_int, "-1"),
        (_args.positive_float, "0"),
        (_args.positive_float, "inf"),
        (_args.nonnegative_float, "-0.1"),
        (_args.fraction, "1"),
        (_args.fraction, "-0.1"),
    ]:
        with pytest.raises(Exception, match="must be"):
            fn(bad)


def test_prepare_output_dir(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(_args.CryosipInputError, match="existing file"):
        _args.prepare_output_dir(f, overwrite=True, command="reconstruct")
    out = tmp_path / "rec"
    assert _args.prepare_output_dir(out, overwrite=False, command="reconstruct").is_dir()
    _args.prepare_output_dir(out, overwrite=False, command="reconstruct")  # empty: fine
    for name in ("summary.json", "particles.csv", "density.png", "notes.txt", "input.star"):
        (out / name).write_text("old")
    with pytest.raises(_args.CryosipInputError, match="not empty.*--overwrite") as e:
        _args.prepare_output_dir(out, overwrite=False, command="reconstruct")
    assert "\n" not in str(e.value)
    _args.prepare_output_dir(out, overwrite=False, command="reconstruct", resume=True)
    assert (out / "summary.json").exists()  # --resume continues in place
    _args.prepare_output_dir(
        out, overwrite=True, command="reconstruct", inputs=[out / "input.star"]
    )
    # earlier outputs removed, the user's own files and the inputs kept
    assert sorted(p.name for p in out.iterdir()) == ["input.star", "notes.txt"]


def test_out_rules_through_the_commands(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    argv = ["simulate", "--dataset", "adk-ca", "--n-images", "4", "--box", "16", "--no-progress"]
    assert main([*argv, "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "existing file" in err
    out = tmp_path / "sim"
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main([*argv, "--n-images", "2", "--images-per-file", "1", "--out", str(out), "--overwrite"])
        == 0
    )
    # a new run never mixes with the old one
    assert sorted(p.name for p in out.glob("*.mrcs")) == [
        "particles_000.mrcs",
        "particles_001.mrcs",
    ]
    # file modes: 0666 minus the umask, not mkstemp's 0600
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    f2 = tmp_path / "f.json"
    _atomic.write_json(f2, {"a": 1})
    assert stat.S_IMODE(f2.stat().st_mode) == 0o666 & ~mask


def test_strict_json(tmp_path):
    obj = {
        "nan": float("nan"),
        "inf": float("inf"),
        "arr": np.array([1.0, np.nan, -np.inf]),
        "f32": np.float32("inf"),
        "nested": [{"x": np.float64(2.5)}, (np.int64(3), float("-inf"))],
    }
    _atomic.write_json(tmp_path / "s.json", obj)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    back = json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse)
    assert back == {
        "nan": None,
        "inf": None,
        "arr": [1.0, None, None],
        "f32": None,
        "nested": [{"x": 2.5}, [3, None]],
    }


def test_keyboard_interrupt_is_one_line_and_130(monkeypatch, capsys):
    import cryosip.cli.inspect as insp

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(insp, "main", interrupted)
    assert main(["inspect", "whatever.star"]) == 130
    err = capsys.readouterr().err
    assert err == "cryosip inspect: interrupted\n"


def test_backend_is_named_once(caplog, capsys, tmp_path):
    with caplog.at_level(logging.INFO):
        assert main(["inspect", str(tmp_path / "none.star")]) == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("running on")]
    assert lines == ["running on cpu (1 device)"]
    assert not [r for r in caplog.records if r.name.startswith("jax._src.xla_bridge")]
