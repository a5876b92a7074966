"""Shared argument checks of the ``cryosip`` commands.

The ``type=`` functions give argparse's one-line usage error (``cryosip reconstruct: error:
argument --steps: must be a positive integer, got -5``, exit status 2) instead of a traceback
or a silently odd run. :func:`prepare_output_dir` is the one rule for ``--out`` folders;
:func:`add_cryodrgn_args` and :func:`read_particles_from_args` are the particle-input flags of
``inspect`` and ``convert``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

from ..data.errors import CryosipInputError

__all__ = [
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "fraction",
    "add_cryodrgn_args",
    "read_particles_from_args",
    "prepare_output_dir",
    "prepare_output_file",
    "CRYOSIP_OUTPUTS",
]


def _int(text: str, what: str) -> int:
    try:
        value = float(text) if any(c in str(text) for c in ".eE") else int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value == int(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        value = int(value)
    return value


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _checked(parse, text: str, what: str, ok):
    """``parse(text, what)``, or argparse's error (``must be <what>, got <text>``) unless ``ok``."""
    value = parse(text, what)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(_int, text, "a positive integer", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _checked(_int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(_float, text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(_float, text, "a number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    return _checked(_float, text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def add_cryodrgn_args(parser, ctf_help: str) -> None:
    """Add ``--ctf`` (with ``ctf_help``), ``--pose``, ``--ind`` and ``--particles`` (cryoDRGN inputs)."""
    parser.add_argument("--ctf", help=ctf_help)
    parser.add_argument("--pose", help="cryoDRGN pose.pkl (override)")
    parser.add_argument("--ind", help="cryoDRGN ind.pkl (particle selection)")
    parser.add_argument(
        "--particles", dest="images", help="images for a cryoDRGN .pkl input (.mrcs/.txt)"
    )


def read_particles_from_args(path, args, **kwargs):
    """:func:`~cryosip.data.particles.read_particles` of ``path`` with ``--datadir``, ``--box``
    and the flags of :func:`add_cryodrgn_args`; ``kwargs`` are passed on."""
    from ..data.particles import read_particles

    cryodrgn = dict(pose=args.pose, ctf=args.ctf, ind=args.ind, particles=args.images)
    return read_particles(path, datadir=args.datadir, box_size=args.box, **cryodrgn, **kwargs)


# the files each command writes into --out (what --overwrite removes before a new run)
CRYOSIP_OUTPUTS = {
    "reconstruct": (
        "*.json",
        "*.csv",
        "*.png",
        "*.html",
        "*.pdb",
        "*.cif",
        "*.cxc",
        "*.npz",
        "*.pkl",
        "particles_cv.star",
        "particles_cv.cs",
        "volumes/",
    ),
    "simulate": ("config.json", "particles.star", "particles_*.mrcs", "truth.csv", "montage.png"),
    "demo": ("*.json", "*.csv", "*.png", "report.html", "structure_*.pdb"),
    "convert": ("pose.pkl", "ctf.pkl", "ind.pkl"),
}


def prepare_output_dir(
    out, *, overwrite: bool, command: str, resume: bool = False, inputs=()
) -> Path:
    """Check and create the results folder ``out`` of ``cryosip <command>``.

    ``out`` may not be an existing file. An existing folder that is not empty is refused unless
    ``overwrite`` (or ``resume``, which continues a run in place and removes nothing); with
    ``overwrite`` the files ``command`` writes (``CRYOSIP_OUTPUTS[command]``; a trailing
    ``/`` names an output folder) are removed
    first, so that a new run never mixes with an old one. Other files, and the command's
    ``inputs``, are left alone. Errors are :class:`CryosipInputError` (one line).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CryosipInputError(
            out, f"--out must be a folder for cryosip {command}, but this is an existing file"
        )
    if out.is_dir() and not resume:
        entries = list(out.iterdir())
        if entries and not overwrite:
            raise CryosipInputError(
                out,
                "the output folder is not empty (earlier results?): choose a new --out or "
                f"pass --overwrite to replace the {command} outputs in it",
            )
        patterns = CRYOSIP_OUTPUTS.get(command, ())
        protected = {os.path.realpath(os.fspath(p)) for p in inputs if p is not None}
        folders = {pat[:-1] for pat in patterns if pat.endswith("/")}
        for p in entries:
            if os.path.realpath(p) in protected:
                continue
            if p.is_dir() and not p.is_symlink() and p.name in folders:
                shutil.rmtree(p)
            elif p.is_file() and any(p.match(pat) for pat in patterns if not pat.endswith("/")):
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CryosipInputError(
            out, f"cannot create the output folder ({e.strerror or e})"
        ) from None
    return out


def prepare_output_file(path, *, overwrite: bool, command: str) -> Path:
    """An output file of ``cryosip <command>``: not a folder, and not replaced without ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise CryosipInputError(path, f"is a folder; cryosip {command} writes a file here")
    if path.exists() and not overwrite:
        raise CryosipInputError(path, "exists already: choose a new name or pass --overwrite")
    if path.parent.exists() and not path.parent.is_dir():
        raise CryosipInputError(path.parent, "is a file, not a folder")
    return path
