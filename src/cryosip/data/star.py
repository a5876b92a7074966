"""RELION STAR particle files (3.0, 3.1, 4 and 5): read into a ParticleStack, write back.

Versions
    * 3.0 and earlier: one table (``data_`` or ``data_images``) with per-particle optics
      (``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``), pixel size from
      ``rlnImagePixelSize``/``rlnPixelSize`` or ``rlnDetectorPixelSize`` [um] * 1e4 /
      ``rlnMagnification``, shifts ``rlnOriginX/Y`` in pixels.
    * 3.1, 4 and 5 (``# version 30001`` / ``50001``): ``data_optics`` + ``data_particles`` joined
      on ``rlnOpticsGroup``; shifts ``rlnOriginXAngst/YAngst`` in Angstrom.

Conventions (verified against the sources, see ``docs``):
    * Rotations: ``rlnAngleRot/Tilt/Psi`` are ZYZ Euler angles in degrees and
      ``A = Euler_angles2matrix(rot, tilt, psi)`` rotates the reference into the particle frame
      (RELION docs, "Conventions: Orientations"); this is
      :func:`cryosip.cryoem.pose.euler_to_matrix`.
    * Shifts: ``rlnOriginXAngst/YAngst = -shift_in_angstroms``. RELION's documentation says the
      origin offsets "translate the image to its center" / "shift observations into the reference
      projection", and ``ObservationModel::predictObservation`` (``src/jaz/obs_model.cpp``) builds
      the predicted image by ``shiftImageInFourierTransform(dest, dest, s, s/2 - xoff, s/2 - yoff)``
      with ``xoff = rlnOriginXAngst / angpix``: the projection is displaced by ``-origin``. In
      cryosip the particle sits at ``+shift`` from the box centre, hence ``shift = -origin``.
      RELION 3.0's ``rlnOriginX/Y`` are the same quantity in pixels.
    * Image names ``000123@stacks/x.mrcs`` are 1-based; paths are relative to the project folder
      (tried: ``datadir``, the STAR file's folder and its parents, the working directory).
    * CTF defaults where a column is absent, as in RELION's ``CTF::read``: ``rlnDefocusV =
      rlnDefocusU``, ``rlnDefocusAngle = 0``, ``rlnPhaseShift = 0``, ``rlnCtfBfactor = 0``,
      ``rlnCtfScalefactor = 1``; voltage 300 kV, Cs 2.7 mm, amplitude contrast 0.1 (RELION's
      defaults, ``RELION_DEFAULTS``), each with one warning naming the missing columns.
      Defocus is required.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .._atomic import atomic_path
from ..cryoem.pose import euler_to_matrix_np, matrix_to_euler
from .errors import CryosipInputError, existing_file
from .mrc import LazyImageStack, TransformedImages, _is_compressed, mrc_layout, read_mrc_header
from .particles import (
    MissingStackImages,
    ParticleStack,
    checked_stack,
    grouped_images,
    working_grid,
)

logger = logging.getLogger(__name__)

__all__ = [
    "read_star",
    "write_star",
    "parse_image_names",
    "format_image_names",
    "star_version",
]

# columns recomputed by write_star from the nuisance (everything else is kept as it was)
_POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
_SHIFT_COLUMNS = ["rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst"]
_CTF_COLUMNS = [
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
]
_OPTICS_PER_PARTICLE = [
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnImagePixelSize",
    "rlnPixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnCtfDataArePhaseFlipped",
]
_OPTICS_RECOMPUTED = [
    "rlnOpticsGroup",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
]
_KNOWN_VERSIONS = (30000, 30001, 40000, 40001, 50000, 50001)
# RELION's defaults for optional optics/CTF columns (docs/formats.md)
RELION_DEFAULTS = {
    "rlnVoltage": 300.0,
    "rlnSphericalAberration": 2.7,
    "rlnAmplitudeContrast": 0.1,
    "rlnDefocusAngle": 0.0,
    "rlnPhaseShift": 0.0,
    "rlnCtfBfactor": 0.0,
    "rlnCtfScalefactor": 1.0,
}


def _rotations_f32(rot, tilt, psi, chunk: int = 1 << 16) -> np.ndarray:
    """:func:`euler_to_matrix_np` cast to float32 (the nuisance's dtype), computed in chunks so
    that no (n, 3, 3) float64 array and its temporaries are ever held whole."""
    n = len(rot)
    out = np.empty((n, 3, 3), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, n, chunk):
            e = s + chunk
            out[s:e] = euler_to_matrix_np(rot[s:e], tilt[s:e], psi[s:e])
    return out


# ----------------------------------------------------------------------------------------------
# parsing helpers


def star_version(path: str | os.PathLike) -> int | None:
    """The number in a ``# version NNNNN`` comment before the first data block (None if absent)."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    m = re.search(
        r"^#\s*version\s+(\S+)", head.split("data_", 1)[0] if "data_" in head else head, re.M
    )
    if m is None:
        return None
    try:
        return int(m.group(1))
    except ValueError:
        return -1


def release_freed_memory() -> None:
    """Give the heap that freed Python/NumPy objects leave behind back to the OS (glibc's
    ``malloc_trim``; nothing elsewhere). Parsing a 10^6-row STAR file frees hundreds of MB of
    small objects that the allocator would otherwise keep for the rest of the process; pandas'
    Arrow-backed string columns are freed into Arrow's own pool, released here too."""
    import sys

    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        try:
            pa.default_memory_pool().release_unused()
        except Exception:  # an Arrow build without it: nothing to release
            pass


def _releasing_memory(read):
    """``read`` followed by :func:`release_freed_memory` (once its intermediates are freed)."""

    @functools.wraps(read)
    def wrapper(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        finally:
            release_freed_memory()

    return wrapper


class _Region(io.RawIOBase):
    """Bytes ``start:end`` of an open binary file, read on demand (nothing loaded whole)."""

    def __init__(self, f, start: int, end: int):
        self._f, self._left = f, end - start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self._left)
        if k <= 0:
            return 0
        data = self._f.read(k)
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _loop_layout(path: Path):
    """The loop tables of a STAR file as ``[(name, columns, start, end)]`` (data byte range),
    found in one streamed pass; ``None`` when the file has anything ``starfile`` parses in a way
    this reader does not reproduce (simple key-value blocks, quotes, non-ASCII text, lone
    carriage returns, empty or headerless tables, duplicate columns)."""
    layout = []
    state, name, cols, start, rows = "out", None, [], 0, 0
    pos = 0

    def close(end):
        if state == "data":
            if not rows or len(set(cols)) != len(cols):
                return False
            layout.append((name, list(cols), start, end))
        elif state != "out":
            return False
        return True

    with open(path, "rb") as f:
        for raw in f:
            here, pos = pos, pos + len(raw)
            body = raw[:-2] if raw.endswith(b"\r\n") else raw
            if not body.isascii() or b"\r" in body or b"'" in body or b'"' in body:
                return None
            line = body.strip()
            if line.startswith(b"data_"):
                if state == "header" or not close(here):
                    return None
                state, name = "header", line[5:].decode()
            elif state == "header":
                if line.startswith(b"loop_"):
                    state, cols = "columns", []
                elif line.startswith(b"_"):
                    return None  # a simple (key-value) block
            elif state == "columns":
                if line.startswith(b"_"):
                    cols.append(line.split()[0][1:].decode())
                elif line and cols:
                    state, start, rows = "data", here, int(not line.startswith(b"#"))
                elif not cols:
                    return None
            elif state == "data" and line and not line.startswith(b"#"):
                rows += 1
        if not close(pos):
            return None
    return layout


def _read_loops(path: Path, layout) -> dict[str, pd.DataFrame]:
    """Each loop table parsed straight from its bytes in the file with the same ``read_csv``
    call and numeric conversion as ``starfile`` (the same frames), one column at a time: no
    copy of the file's text and no second copy of the table while parsing."""
    out = {}
    with open(path, "rb") as f:
        for name, cols, start, end in layout:
            as_string = {i for i, c in enumerate(cols) if c == "rlnImageName"}
            text = io.TextIOWrapper(io.BufferedReader(_Region(f, start, end)), encoding="utf-8")
            df = pd.read_csv(
                text,
                delimiter=r"\s+",
                header=None,
                comment="#",
                dtype={i: str for i in as_string},
                keep_default_na=False,
                na_values=["nan", "NaN", "<NA>"],
                engine="c",
            )
            df.columns = cols
            for i, c in enumerate(cols):
                if i in as_string:
                    continue
                try:
                    num = pd.to_numeric(df[c])
                except ValueError:
                    continue
                if not num.isna().all():
                    df[c] = num
            out[name] = df
    return out


def _parse_star(path: Path) -> dict:
    """The blocks of a STAR file as ``starfile.read(path, always_dict=True,
    parse_as_string=["rlnImageName"])`` returns them; loop-only files (every particle file
    RELION writes) are parsed in a streamed pass (:func:`_read_loops`) in a fraction of the
    memory (issue 18), anything else by ``starfile``."""
    import starfile

    layout = _loop_layout(path)
    if layout:
        try:
            return _read_loops(path, layout)
        except Exception:  # starfile raises its own error for what the fast path rejects
            pass
    return starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])


def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = _parse_star(path)
    except Exception as e:  # starfile/pandas raise many types on malformed text
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CryosipInputError(path, f"not a readable STAR file ({msg[:200]})") from None
    if not isinstance(blocks, dict):
        raise CryosipInputError(path, "not a readable STAR file")
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):
            block = pd.DataFrame({k: [v] for k, v in block.items()})
        if not isinstance(block, pd.DataFrame):
            raise CryosipInputError(path, f"data_{name}: not a table")
        out[str(name)] = block
    release_freed_memory()
    return out


_NAME_CHUNK = 1 << 16  # image names parsed per chunk: no per-row temporaries for the whole table


def parse_image_names(names, path=None) -> tuple[np.ndarray, np.ndarray]:
    """``"000123@stacks/x.mrcs"`` -> (stack path strings, 0-based indices).

    A name without ``@`` is a single-image file (index 0). Parsed in chunks; equal paths share
    one string object (a 10^6-particle file names a few thousand stacks).
    """
    if not isinstance(names, pd.Series):  # a table's column is converted chunk by chunk
        names = np.asarray(names, dtype=object)
    n = len(names)
    paths = np.empty(n, dtype=object)
    indices = np.empty(n, np.int64)
    shared: dict[str, str] = {}
    first_empty = None
    for start in range(0, n, _NAME_CHUNK):
        stop = start + _NAME_CHUNK
        chunk = names.iloc[start:stop] if isinstance(names, pd.Series) else names[start:stop]
        # a name the STAR parser read as a float "nan" stays missing under pandas >= 3's
        # astype(str): it is the text "nan" again
        s = pd.Series(np.asarray(chunk, dtype=object)).astype(str).fillna("nan")
        has_at = s.str.contains("@", regex=False)
        parts = s.str.split("@", n=1)
        idx_str = np.where(has_at, parts.str[0], "1")
        chunk_paths = np.where(has_at, parts.str[1], s).astype(object)
        idx = pd.to_numeric(pd.Series(idx_str), errors="coerce")
        bad = idx.isna() | (idx < 1) | (idx != np.floor(idx))
        if bad.any():  # the first bad index of the file (earlier chunks had none)
            i = int(np.nonzero(bad.to_numpy())[0][0])
            raise CryosipInputError(
                path,
                f"row {start + i + 1}: bad rlnImageName {s.iloc[i]!r} "
                "(expected N@stack.mrcs, N >= 1)",
            )
        empty = pd.Series(chunk_paths).str.strip() == ""
        if first_empty is None and empty.any():
            i = int(np.nonzero(empty.to_numpy())[0][0])
            first_empty = (start + i, s.iloc[i])
        codes, uniq = pd.factorize(chunk_paths, use_na_sentinel=False)
        uniq = np.array([shared.setdefault(u, u) for u in uniq], dtype=object)
        paths[start : start + len(s)] = uniq[codes]
        indices[start : start + len(s)] = idx.to_numpy(np.int64) - 1
    if first_empty is not None:
        i, name = first_empty
        raise CryosipInputError(path, f"row {i + 1}: rlnImageName {name!r} has no file name")
    return paths, indices


def format_image_names(paths, indices) -> list[str]:
    """(stack paths, 0-based indices) -> RELION ``"000123@path"`` names (1-based)."""
    return [f"{int(i) + 1:06d}@{p}" for p, i in zip(paths, indices)]


def resolve_stack_path(
    name: str, star_dir: Path, datadir: str | os.PathLike | None, origin: Path
) -> Path:
    """Find a stack file referenced from a metadata file.

    Tried in order: ``datadir/name``, ``datadir/basename``, the metadata file's folder and up to
    three of its parents joined with ``name`` (RELION paths are relative to the project folder),
    then ``name`` as given (absolute or relative to the working directory).
    """
    p = Path(name)
    candidates = []
    if datadir is not None:
        d = Path(datadir)
        candidates += [d / p, d / p.name]
    if p.is_absolute():
        candidates.append(p)
    else:
        folder = star_dir
        for _ in range(4):
            candidates.append(folder / p)
            if folder.parent == folder:
                break
            folder = folder.parent
        candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c
    where = (
        f" (looked in {datadir})"
        if datadir is not None
        else f" (relative to {star_dir} and its parents)"
    )
    raise CryosipInputError(
        name, f"stack file not found, referenced by {origin}{where}; use --datadir"
    )


@dataclasses.dataclass
class StackFiles:
    """The stack files of a particle table: ``files[k]`` (``None`` when not found), each
    particle's file ``file_of[i]`` and 0-based ``index[i]``, each file's box (0 when missing)
    and header pixel size (NaN when missing or unset)."""

    files: list
    names: list
    file_of: np.ndarray
    index: np.ndarray
    boxes: np.ndarray
    header_pixel_sizes: np.ndarray
    missing: list

    @property
    def complete(self) -> bool:
        return not self.missing


def locate_stacks(
    path: Path,
    stack_names,
    indices,
    datadir,
    *,
    expected_boxes=None,
    require_images: bool = True,
) -> StackFiles:
    """Find and check the stack files referenced by a metadata file.

    Checks: files exist and are MRC, square, index within range, and each particle's box agrees
    with ``expected_boxes`` (from the metadata) when given. With ``require_images=False`` files
    that are not found are listed in ``missing`` instead of raising.
    """
    names = np.asarray(stack_names, dtype=object)
    # np.unique(names.astype(str), return_inverse=True) without a fixed-width copy of every name
    codes, first = pd.factorize(names, use_na_sentinel=False)
    uniq, inv_first = np.unique(np.array([str(u) for u in first], dtype=str), return_inverse=True)
    inv = inv_first.reshape(-1)[codes].astype(np.int64)
    indices = np.asarray(indices, np.int64)
    tops = np.full(len(uniq), -1, np.int64)
    np.maximum.at(tops, inv, indices)
    files, boxes, hpx, missing = [], [], [], []
    for k, name in enumerate(uniq):
        try:
            f = resolve_stack_path(name, path.parent, datadir, path)
        except CryosipInputError:
            if require_images:
                raise
            files.append(None)
            boxes.append(0)
            hpx.append(np.nan)
            missing.append(str(name))
            continue
        h = read_mrc_header(f)
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        if not _is_compressed(f):
            mrc_layout(f, h)  # truncated files fail here, before anything is written
        if nx != ny:
            raise CryosipInputError(f, f"images are not square ({ny}x{nx})")
        top = int(tops[k])
        if top >= nz:
            raise CryosipInputError(
                f,
                f"image index {top + 1} out of range (stack has {nz} images), referenced by {path}",
            )
        mx = max(int(h.mx), 1)
        p = float(h.cella.x) / mx
        files.append(f)
        boxes.append(nx)
        hpx.append(p if p > 0 else np.nan)
    boxes = np.asarray(boxes, np.int64)
    if expected_boxes is not None:
        exp = np.asarray(expected_boxes)
        file_boxes = boxes[inv]
        bad = np.nonzero((exp != file_boxes) & (file_boxes > 0))[0]
        if bad.size:
            i = int(bad[0])
            raise CryosipInputError(
                path,
                f"particle {i + 1}: metadata box size {int(exp[i])} but stack "
                f"{files[inv[i]]} has {int(file_boxes[i])}-pixel images",
            )
    return StackFiles(
        files, [str(u) for u in uniq], inv, indices, boxes, np.asarray(hpx, np.float64), missing
    )


def native_images(source, stacks: StackFiles, grids: np.ndarray):
    """The images of ``stacks`` with each particle on its native grid (``grids``: (n, 2) box,
    pixel size), brought onto the default working grid (:func:`working_grid`).

    Returns ``(images, box, pixel_size)``: a :class:`LazyImageStack` for a single grid, a
    :class:`GroupedImages` for several, a :class:`MissingStackImages` when files are missing.
    """
    n = len(stacks.file_of)
    known = np.isfinite(grids[:, 1]).all() and (grids[:, 0] > 0).all()
    if known:
        try:
            box, px = working_grid(grids[:, 0], grids[:, 1])
        except ValueError as e:  # e.g. one pixel size far below the others: no common grid
            raise CryosipInputError(
                source,
                f"no common working grid for particles with boxes {int(grids[:, 0].min())}-"
                f"{int(grids[:, 0].max())} px and pixel sizes {grids[:, 1].min():.4g}-"
                f"{grids[:, 1].max():.4g} A ({e})",
            ) from None
    else:  # files missing and no box/pixel size in the metadata: reported as unknown
        box = int(grids[0, 0]) if (grids[:, 0] == grids[0, 0]).all() else 0
        px = float(grids[0, 1]) if np.allclose(grids[:, 1], grids[0, 1], equal_nan=True) else np.nan
    if not stacks.complete:
        images = MissingStackImages(n, box, source, stacks.missing, len(stacks.names))
        return images, box, px
    single = len({(int(b), round(float(p), 6)) for b, p in grids}) == 1
    if single:
        return (
            LazyImageStack(
                stacks.files, stacks.file_of, stacks.index, box, file_boxes=stacks.boxes
            ),
            box,
            px,
        )

    def source_of(members):
        b = int(stacks.boxes[stacks.file_of[members[0]]])
        return LazyImageStack(
            stacks.files, stacks.file_of[members], stacks.index[members], b, file_boxes=stacks.boxes
        )

    return grouped_images(source_of, grids, box, px), box, px


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _numeric(
    df: pd.DataFrame, col: str, path: Path, block: str = "particles", *, integer: bool = False
) -> np.ndarray:
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(vals) | (np.abs(np.nan_to_num(vals)) > 1e30)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise CryosipInputError(
            path,
            f"data_{block} row {i + 1}: {col} = {df[col].iloc[i]!r} is not a finite number "
            "in range",
        )
    if integer:
        bad = (vals != np.round(vals)) | (np.abs(vals) > 2**31)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise CryosipInputError(
                path, f"data_{block} row {i + 1}: {col} = {df[col].iloc[i]!r} is not an integer"
            )
    return vals


# RELION labels cryosip reads or commonly meets (others are kept but never suggested)
_KNOWN_LABELS = {
    *_POSE_COLUMNS,
    *_SHIFT_COLUMNS,
    *_CTF_COLUMNS,
    *_OPTICS_PER_PARTICLE,
    "rlnImageName",
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnMicrographName",
    "rlnMicrographOriginalPixelSize",
    "rlnMicrographPixelSize",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnClassNumber",
    "rlnRandomSubset",
    "rlnGroupNumber",
    "rlnGroupName",
    "rlnNormCorrection",
    "rlnImageOriginalName",
    "rlnAutopickFigureOfMerit",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
    "rlnLogLikeliContribution",
    "rlnMaxValueProbDistribution",
    "rlnNrOfSignificantSamples",
    "rlnMtfFileName",
    "rlnOriginZ",
    "rlnOriginZAngst",
    "rlnAngleRotPrior",
    "rlnAngleTiltPrior",
    "rlnAnglePsiPrior",
    "rlnHelicalTubeID",
}
# the labels a typo is checked against (what cryosip reads)
_READ_LABELS = sorted(
    {
        *_POSE_COLUMNS,
        *_SHIFT_COLUMNS,
        *_CTF_COLUMNS,
        *_OPTICS_PER_PARTICLE,
        "rlnImageName",
        "rlnOpticsGroup",
    }
)


def _unknown_labels(df: pd.DataFrame | None) -> list[str]:
    if df is None:
        return []
    return [str(c) for c in df.columns if str(c) not in _KNOWN_LABELS]


def _suggest(missing: str, present: list[str]) -> str | None:
    """A present unknown column that looks like a typo of ``missing`` (difflib), if any."""
    close = difflib.get_close_matches(missing, present, n=1, cutoff=0.8)
    return close[0] if close else None


def _typo_hints(missing, *tables) -> str:
    unknown = [c for t in tables for c in _unknown_labels(t)]
    hints = []
    for m in missing:
        c = _suggest(m, unknown)
        if c is not None:
            hints.append(f"_{c} is not a RELION label: did you mean _{m}?")
    return ("; " + "; ".join(hints)) if hints else ""


def _warn_unknown_labels(path: Path, *tables) -> None:
    """One warning for unknown columns that look like typos of labels cryosip reads."""
    notes = []
    for t in tables:
        for c in _unknown_labels(t):
            close = difflib.get_close_matches(c, _READ_LABELS, n=1, cutoff=0.8)
            if close and close[0] not in t.columns:
                notes.append(f"_{c} (did you mean _{close[0]}?)")
    if notes:
        logger.warning("%s: unknown column(s) ignored: %s", path, ", ".join(notes))


def _require(df: pd.DataFrame, cols, path: Path, block: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CryosipInputError(
            path,
            f"data_{block} is missing required column(s) "
            + ", ".join("_" + c for c in missing)
            + _typo_hints(missing, df),
        )


def _flag(df: pd.DataFrame | None, col: str, path: Path, block: str) -> np.ndarray | None:
    if df is None or col not in df.columns:
        return None
    return _numeric(df, col, path, block) != 0


# ----------------------------------------------------------------------------------------------
# reading


@_releasing_memory
def read_star(
    path: str | os.PathLike,
    *,
    datadir: str | os.PathLike | None = None,
    box_size: int | None = None,
    require_poses: bool = False,
    require_images: bool = True,
    allow_unsupported_contrast: bool = False,
) -> ParticleStack:
    """Read a RELION particle STAR file (3.0, 3.1, 4 or 5) into a :class:`ParticleStack`.

    Images are memory-mapped and read on demand (``stack.images`` is a
    :class:`~cryosip.data.mrc.LazyImageStack`). Optics groups with different pixel sizes or
    boxes are brought onto one working grid (:func:`cryosip.data.particles.to_working_grid`:
    the largest pixel size, or the one ``box_size`` implies, and a box covering the smallest
    field of view) by exact band-limited resampling as the images are read; each particle keeps
    its optics group (:meth:`ParticleStack.group_ids`).

    Missing optional CTF columns take RELION's defaults (``RELION_DEFAULTS``) with one warning.
    ``require_poses``: no angles is an error naming the missing columns (and a likely typo).
    ``require_images=False``: stack files that are not found give a
    :class:`~cryosip.data.particles.MissingStackImages` instead of an error (metadata only).

    CTF-premultiplied (``rlnCtfDataAreCtfPremultiplied = 1``) or phase-flipped
    (``rlnCtfDataArePhaseFlipped = 1``) data raise :class:`CryosipInputError` (the forward model
    describes raw images) unless ``allow_unsupported_contrast`` (used by ``cryosip inspect``), in
    which case the stack carries the flags.
    """
    path = existing_file(path, "a STAR file")
    try:
        version = star_version(path)
    except OSError as e:
        raise CryosipInputError(path, f"cannot read ({e})") from None
    if version is not None and version not in _KNOWN_VERSIONS:
        raise CryosipInputError(
            path,
            f"unknown STAR version '# version {version}' (supported: RELION 3.0, "
            "3.1/4 (30001) and 5 (50001))",
        )
    blocks = _read_blocks(path)
    if not blocks:
        raise CryosipInputError(path, "no data_ blocks (empty or not a STAR file)")

    optics = blocks.get("optics")
    if "particles" in blocks:
        particles = blocks["particles"]
        if optics is None:
            raise CryosipInputError(
                path,
                "data_particles without data_optics: unknown STAR version "
                "(RELION 3.1+ files need both)",
            )
        style = "3.1"
    elif optics is not None:
        raise CryosipInputError(
            path,
            "data_optics but no data_particles table (not a particle STAR file, "
            "or an unknown STAR version)",
        )
    else:
        if version is not None and version >= 30001:
            raise CryosipInputError(
                path, f"'# version {version}' but no data_optics/data_particles tables"
            )
        cands = [b for b in blocks.values() if "rlnImageName" in b.columns]
        if len(cands) != 1:
            raise CryosipInputError(
                path,
                "no particle table with _rlnImageName (unknown STAR version or not a particle file)"
                if not cands
                else "several tables with _rlnImageName",
            )
        particles = cands[0]
        style = "3.0"
    if len(particles) == 0:
        raise CryosipInputError(path, "the particle table is empty")
    if not particles.index.equals(pd.RangeIndex(len(particles))):
        particles = particles.reset_index(drop=True)  # (no copy of a table parsed as it is)
    _require(particles, ["rlnImageName", "rlnDefocusU"], path, "particles")
    n = len(particles)

    # ---- optics per particle (RELION's defaults for the optional CTF optics, with one warning)
    defaults_used: dict[str, float] = {}

    def optional(df, col, block, default, rows=None):
        if col in df.columns:
            v = _numeric(df, col, path, block)
            return v if rows is None else v[rows]
        defaults_used[col] = default
        return np.full(n, float(default))

    if style == "3.1":
        _require(particles, ["rlnOpticsGroup"], path, "particles")
        _require(optics, ["rlnOpticsGroup", "rlnImagePixelSize"], path, "optics")
        optics = optics.reset_index(drop=True)
        og = _numeric(optics, "rlnOpticsGroup", path, "optics", integer=True).astype(np.int64)
        if len(set(og.tolist())) != len(og):
            raise CryosipInputError(path, "data_optics has duplicate rlnOpticsGroup numbers")
        pg = _numeric(particles, "rlnOpticsGroup", path, integer=True).astype(np.int64)
        prow = pd.Index(og).get_indexer(pg)  # each particle's row of data_optics (-1: none)
        missing = sorted(set(pg[prow < 0].tolist()))
        if missing:
            raise CryosipInputError(
                path, f"particles refer to optics group(s) {missing} not in data_optics"
            )
        prow = prow.astype(np.int64)
        voltage = optional(optics, "rlnVoltage", "optics", RELION_DEFAULTS["rlnVoltage"], prow)
        cs = optional(
            optics,
            "rlnSphericalAberration",
            "optics",
            RELION_DEFAULTS["rlnSphericalAberration"],
            prow,
        )
        w = optional(
            optics, "rlnAmplitudeContrast", "optics", RELION_DEFAULTS["rlnAmplitudeContrast"], prow
        )
        px = _numeric(optics, "rlnImagePixelSize", path, "optics")[prow]
        meta_box = (
            _numeric(optics, "rlnImageSize", path, "optics", integer=True)[prow].astype(np.int64)
            if "rlnImageSize" in optics.columns
            else None
        )
        premult = _flag(optics, "rlnCtfDataAreCtfPremultiplied", path, "optics")
        flipped = _flag(optics, "rlnCtfDataArePhaseFlipped", path, "optics")
        premult = None if premult is None else premult[prow]
        flipped = None if flipped is None else flipped[prow]
        optics_group = np.unique(prow, return_inverse=True)[1].astype(np.int64)
    else:
        voltage = optional(particles, "rlnVoltage", "particles", RELION_DEFAULTS["rlnVoltage"])
        cs = optional(
            particles,
            "rlnSphericalAberration",
            "particles",
            RELION_DEFAULTS["rlnSphericalAberration"],
        )
        w = optional(
            particles, "rlnAmplitudeContrast", "particles", RELION_DEFAULTS["rlnAmplitudeContrast"]
        )
        if "rlnImagePixelSize" in particles.columns:
            px = _numeric(particles, "rlnImagePixelSize", path)
        elif "rlnPixelSize" in particles.columns:
            px = _numeric(particles, "rlnPixelSize", path)
        elif (
            "rlnDetectorPixelSize" in particles.columns and "rlnMagnification" in particles.columns
        ):
            mag = _numeric(particles, "rlnMagnification", path)
            if (mag <= 0).any():
                raise CryosipInputError(path, "rlnMagnification must be positive")
            px = _numeric(particles, "rlnDetectorPixelSize", path) * 1e4 / mag
        else:
            px = None  # from the MRC header below
        meta_box = (
            _numeric(particles, "rlnImageSize", path, integer=True).astype(np.int64)
            if "rlnImageSize" in particles.columns
            else None
        )
        premult = _flag(particles, "rlnCtfDataAreCtfPremultiplied", path, "particles")
        flipped = _flag(particles, "rlnCtfDataArePhaseFlipped", path, "particles")
        optics_group = None
    _warn_unknown_labels(path, particles, optics)

    # ---- images: each particle on its native grid, then one working grid
    names, indices = parse_image_names(particles["rlnImageName"], path)
    stacks = locate_stacks(
        path,
        names,
        indices,
        datadir,
        expected_boxes=meta_box,
        require_images=require_images,
    )
    release_freed_memory()  # the names' temporaries, before the pose arrays are made
    file_box = stacks.boxes[stacks.file_of]
    boxes = np.where(file_box > 0, file_box, meta_box if meta_box is not None else 0)
    if px is None:
        px = stacks.header_pixel_sizes[stacks.file_of]
        if stacks.complete and not (np.isfinite(px) & (px > 0)).all():
            raise CryosipInputError(
                path,
                "no pixel size: add _rlnImagePixelSize (or _rlnDetectorPixelSize and "
                "_rlnMagnification), or set the voxel size in the stack header",
            )
        if stacks.complete:
            logger.info("%s: pixel size %.4f A taken from the MRC header", path, px[0])
    if (px <= 0).any():
        raise CryosipInputError(path, "pixel size must be positive")
    grids = np.stack([boxes.astype(np.float64), np.asarray(px, np.float64)], -1)
    images, box, pixel_size = native_images(os.fspath(path), stacks, grids)
    n_grids = len({(int(b), round(float(p), 6)) for b, p in grids if np.isfinite(p)})
    if n_grids > 1:
        desc = ", ".join(
            f"{b} px at {p:g} A/px"
            for b, p in sorted({(int(b), round(float(p), 6)) for b, p in grids})
        )
        logger.info(
            "%s: optics groups on %d grids (%s) resampled to %d px at %.4f A/px",
            path,
            n_grids,
            desc,
            box,
            pixel_size,
        )

    # ---- contrast flags
    is_premult = bool(premult is not None and premult.any())
    is_flipped = bool(flipped is not None and flipped.any())
    if (is_premult or is_flipped) and not allow_unsupported_contrast:
        what = (
            "CTF-premultiplied (rlnCtfDataAreCtfPremultiplied = 1)"
            if is_premult
            else "phase-flipped (rlnCtfDataArePhaseFlipped = 1)"
        )
        raise CryosipInputError(
            path,
            f"images are {what}; the forward model describes raw images: re-extract "
            "without CTF premultiplication/phase flipping",
        )

    # ---- CTF
    dfu = _numeric(particles, "rlnDefocusU", path)
    if "rlnDefocusV" in particles.columns:
        dfv = _numeric(particles, "rlnDefocusV", path)
    else:
        dfv = dfu
        defaults_used["rlnDefocusV"] = "rlnDefocusU"
    ctf = dict(
        defocus_u_in_angstroms=dfu,
        defocus_v_in_angstroms=dfv,
        defocus_angle_in_degrees=optional(particles, "rlnDefocusAngle", "particles", 0.0),
        voltage_in_kilovolts=voltage,
        spherical_aberration_in_mm=cs,
        amplitude_contrast=w,
        phase_shift_in_degrees=optional(particles, "rlnPhaseShift", "particles", 0.0),
        bfactor_in_angstroms2=optional(particles, "rlnCtfBfactor", "particles", 0.0),
        scale=optional(particles, "rlnCtfScalefactor", "particles", 1.0),
    )
    if defaults_used:
        logger.warning(
            "%s: optional CTF column(s) missing, RELION defaults used: %s",
            path,
            ", ".join(
                f"_{c} = " + (f"_{v}" if isinstance(v, str) else f"{v:g}")
                for c, v in defaults_used.items()
            ),
        )

    # ---- poses and shifts
    has_poses = all(c in particles.columns for c in _POSE_COLUMNS)
    if has_poses:
        rot = _rotations_f32(*(_numeric(particles, c, path) for c in _POSE_COLUMNS))
    else:
        missing_pose = [c for c in _POSE_COLUMNS if c not in particles.columns]
        if require_poses:
            raise CryosipInputError(
                path,
                "no poses: data_particles lacks "
                + ", ".join("_" + c for c in missing_pose)
                + " (reconstruction needs the angles of a consensus refinement)"
                + _typo_hints(missing_pose, particles),
            )
        rot = np.broadcast_to(np.eye(3), (n, 3, 3))
        present = [c for c in _POSE_COLUMNS if c in particles.columns]
        if present:
            logger.warning(
                "%s: only %s present; poses treated as unknown", path, ", ".join(present)
            )
    cols = set(particles.columns)
    for pair in (("rlnOriginXAngst", "rlnOriginYAngst"), ("rlnOriginX", "rlnOriginY")):
        if len(cols & set(pair)) == 1:
            (have,) = cols & set(pair)
            (lack,) = set(pair) - cols
            raise CryosipInputError(
                path, f"_{have} without _{lack}" + _typo_hints([lack], particles)
            )
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= cols:
        origin_a = np.stack(
            [
                _numeric(particles, "rlnOriginXAngst", path),
                _numeric(particles, "rlnOriginYAngst", path),
            ],
            -1,
        )
        has_shifts = True
    elif {"rlnOriginX", "rlnOriginY"} <= cols:
        origin_px = np.stack(
            [_numeric(particles, "rlnOriginX", path), _numeric(particles, "rlnOriginY", path)], -1
        )
        if style == "3.1":
            logger.warning(
                "%s: _rlnOriginX/_rlnOriginY are in pixels (RELION 3.0 labels in a 3.1 file): "
                "converted to Angstrom with each optics group's pixel size",
                path,
            )
        if not np.isfinite(px).all():
            raise CryosipInputError(
                path, "_rlnOriginX/Y are in pixels but the pixel size is unknown (stacks missing)"
            )
        origin_a = origin_px * np.asarray(px, np.float64)[:, None]
        has_shifts = True
    else:
        origin_a = np.zeros((n, 2))
        has_shifts = False
    return checked_stack(
        path,
        box_size,
        rot,
        -origin_a,
        ctf,
        images=images,
        pixel_size=pixel_size,
        metadata=particles,
        optics=optics,
        has_poses=has_poses,
        has_shifts=has_shifts,
        ctf_premultiplied=is_premult,
        phase_flipped=is_flipped,
        optics_group=optics_group,
        native_grid=grids,
    )


# ----------------------------------------------------------------------------------------------
# writing


def _f32_column(values) -> np.ndarray:
    """float32 values as float64 with their shortest decimal repr (so 1.1f is written as 1.1)."""
    v = np.asarray(values)
    if v.dtype == np.float32:
        return v.astype(str).astype(np.float64)
    return v.astype(np.float64)


def stack_image_names(stack: ParticleStack, out_dir: Path) -> list[str] | None:
    """RELION image names for ``stack`` (None when its images are not stored as they are).

    The original names are kept when the metadata has them (``rlnImageName``, or cryoSPARC's
    ``blob/path`` + ``blob/idx``): RELION resolves them against the project folder, not the STAR
    file's folder. Otherwise the files the images were read from are named relative to ``out_dir``.
    """
    images = stack.images
    if isinstance(images, TransformedImages):
        return None
    if isinstance(images, LazyImageStack) and any(
        b != images.box_size for b in (images.file_boxes or [])
    ):
        return None  # the files hold a different box than the stack
    meta = stack.metadata
    if meta is not None and len(meta) == len(stack):
        if "rlnImageName" in meta.columns:
            return [str(s) for s in meta["rlnImageName"]]
        if {"blob/path", "blob/idx"} <= set(meta.columns):
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in meta["blob/path"]]
            paths = [p[1:] if p.startswith(">") else p for p in paths]
            return format_image_names(paths, meta["blob/idx"].to_numpy())
    if isinstance(images, LazyImageStack):
        paths, idx = images.locations()
        rel = {p: os.path.relpath(os.path.abspath(p), os.path.abspath(out_dir)) for p in set(paths)}
        return format_image_names([rel[p] for p in paths], idx)
    return None


def _star_text(tmp: Path, blocks: dict[str, pd.DataFrame], version_line: str | None) -> None:
    import starfile

    body = tmp.with_name(tmp.name + ".body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            starfile.write(blocks, body, float_format="%.9g", overwrite=True)
        with open(body, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            first = src.readline()
            if version_line is not None:
                dst.write(f"\n{version_line}\n")
            if not first.startswith("# Created by the starfile"):
                dst.write(first)
            shutil.copyfileobj(src, dst)
    finally:
        body.unlink(missing_ok=True)


def _optics_groups(stack: ParticleStack, voltage, cs, w, grids) -> tuple[np.ndarray, pd.DataFrame]:
    """Group particles by (original optics group, voltage, Cs, amplitude contrast, grid)."""
    n = len(stack)
    meta = stack.metadata
    orig = np.ones(n, np.int64)
    if meta is not None and "rlnOpticsGroup" in meta.columns:
        orig = (
            pd.to_numeric(meta["rlnOpticsGroup"], errors="coerce")
            .fillna(1)
            .astype(np.int64)
            .to_numpy()
        )
    key = pd.DataFrame(
        {"g": orig, "v": voltage, "c": cs, "w": w, "b": grids[:, 0], "p": grids[:, 1]}
    )
    combos = key.drop_duplicates().reset_index(drop=True)
    keep_numbers = combos["g"].is_unique and (combos["g"] > 0).all()
    combos["new"] = combos["g"] if keep_numbers else np.arange(1, len(combos) + 1)
    merged = key.merge(combos, on=["g", "v", "c", "w", "b", "p"], how="left")
    group = merged["new"].to_numpy(np.int64)
    rows = []
    old_optics = (
        stack.optics
        if (stack.optics is not None and "rlnOpticsGroup" in stack.optics.columns)
        else None
    )
    for _, c in combos.iterrows():
        row = {}
        if old_optics is not None:
            match = old_optics[
                pd.to_numeric(old_optics["rlnOpticsGroup"], errors="coerce") == c["g"]
            ]
            if len(match):
                row.update({k: v for k, v in match.iloc[0].items() if k not in _OPTICS_RECOMPUTED})
        row.setdefault("rlnOpticsGroupName", f"opticsGroup{int(c['new'])}")
        if not keep_numbers and old_optics is not None:
            row["rlnOpticsGroupName"] = f"{row['rlnOpticsGroupName']}_{int(c['new'])}"
        row["rlnOpticsGroup"] = int(c["new"])
        row["rlnVoltage"] = float(c["v"])
        row["rlnSphericalAberration"] = float(c["c"])
        row["rlnAmplitudeContrast"] = float(c["w"])
        row["rlnImagePixelSize"] = float(c["p"])
        row["rlnImageSize"] = int(c["b"])
        row["rlnImageDimensionality"] = 2
        if stack.ctf_premultiplied:
            row["rlnCtfDataAreCtfPremultiplied"] = 1
        if stack.phase_flipped:
            row["rlnCtfDataArePhaseFlipped"] = 1
        rows.append(row)
    optics = pd.DataFrame(rows)
    first = ["rlnOpticsGroupName", "rlnOpticsGroup"]
    optics = optics[first + [c for c in optics.columns if c not in first]]
    return group, optics


def write_star(
    path: str | os.PathLike,
    stack: ParticleStack,
    *,
    version: str = "3.1",
    image_names: list[str] | None = None,
) -> Path:
    """Write ``stack`` as a RELION particle STAR file, atomically (temporary file + rename).

    ``version="3.1"`` writes ``data_optics`` + ``data_particles`` (shifts ``rlnOriginX/YAngst``,
    readable by RELION 3.1, 4 and 5); ``version="3.0"`` one table with per-particle optics and
    ``rlnOriginX/Y`` in pixels. Poses, shifts, CTF and optics are recomputed from the stack's
    nuisance; every other column of ``stack.metadata`` (RELION labels) is kept as it was.
    ``image_names`` (``"000001@particles.mrcs"``, 1-based) replace the stack's own image names;
    without them, names are derived from where the images were read (relative to ``path``'s
    folder) or taken from the metadata. Angles are written only when ``stack.has_poses`` and
    origins only when ``stack.has_shifts``.
    """
    path = Path(path)
    blocks, version_line = star_blocks(
        stack, version=version, image_names=image_names, out_dir=path.parent
    )
    write_star_blocks(path, blocks, version_line)
    return path


def write_star_blocks(
    path: str | os.PathLike, blocks: dict[str, pd.DataFrame], version_line: str | None
) -> Path:
    """Write STAR tables (``{"optics": df, "particles": df}`` or ``{"": df}``) atomically."""
    path = Path(path)
    with atomic_path(path, ".tmp") as tmp:
        _star_text(Path(tmp), blocks, version_line)
    return path


def star_blocks(
    stack: ParticleStack,
    *,
    version: str = "3.1",
    image_names=None,
    out_dir: str | os.PathLike = ".",
) -> tuple[dict[str, pd.DataFrame], str | None]:
    """The tables :func:`write_star` writes (and the ``# version`` line), without writing them."""
    path = Path(out_dir) / "_"
    if version not in ("3.0", "3.1"):
        raise ValueError(f"version must be '3.0' or '3.1', got {version!r}")
    n = len(stack)
    # names of the original files: each particle keeps its native grid (optics groups at
    # different pixel sizes stay as they are); new images are on the stack's working grid
    grids = stack.grids(native=image_names is None)
    if image_names is None:
        image_names = stack_image_names(stack, path.parent)
        if image_names is None:
            raise ValueError(
                "the stack's images are not in a file as they are (new or downsampled images): "
                "write them with MrcsWriter and pass image_names"
            )
    image_names = [str(s) for s in image_names]
    if len(image_names) != n:
        raise ValueError(f"{len(image_names)} image names for {n} particles")

    nu = stack.nuisance
    ctf = nu.ctf
    meta = stack.metadata
    if meta is not None and len(meta) == n:
        keep = [c for c in meta.columns if str(c).startswith("rln")]
        base = meta[keep].reset_index(drop=True).copy()
    else:
        base = pd.DataFrame(index=range(n))
    drop = [
        "rlnImageName",
        *_POSE_COLUMNS,
        *_SHIFT_COLUMNS,
        *_CTF_COLUMNS,
        *_OPTICS_PER_PARTICLE,
        "rlnOpticsGroup",
    ]
    base = base.drop(columns=[c for c in drop if c in base.columns])

    cols: dict[str, object] = {"rlnImageName": image_names}
    if stack.has_poses:
        r, t, p = matrix_to_euler(np.asarray(nu.rotation, np.float64))
        cols.update(rlnAngleRot=r, rlnAngleTilt=t, rlnAnglePsi=p)
    shift = np.asarray(nu.shift_in_angstroms)
    if stack.has_shifts:
        origin = -_f32_column(shift)
        if version == "3.1":
            cols.update(rlnOriginXAngst=origin[:, 0], rlnOriginYAngst=origin[:, 1])
        else:
            cols.update(
                rlnOriginX=origin[:, 0] / grids[:, 1], rlnOriginY=origin[:, 1] / grids[:, 1]
            )
    cols.update(
        rlnDefocusU=_f32_column(ctf.defocus_u_in_angstroms),
        rlnDefocusV=_f32_column(ctf.defocus_v_in_angstroms),
        rlnDefocusAngle=_f32_column(ctf.defocus_angle_in_degrees),
        rlnPhaseShift=_f32_column(ctf.phase_shift_in_degrees),
        rlnCtfBfactor=_f32_column(ctf.bfactor_in_angstroms2),
        rlnCtfScalefactor=_f32_column(ctf.scale),
    )
    voltage = _f32_column(ctf.voltage_in_kilovolts)
    cs = _f32_column(ctf.spherical_aberration_in_mm)
    w = _f32_column(ctf.amplitude_contrast)
    if version == "3.0":
        cols.update(
            rlnVoltage=voltage,
            rlnSphericalAberration=cs,
            rlnAmplitudeContrast=w,
            rlnDetectorPixelSize=grids[:, 1].copy(),
            rlnMagnification=np.full(n, 10000.0),
        )
    new = pd.DataFrame(cols)
    if version == "3.1":
        group, optics = _optics_groups(stack, voltage, cs, w, grids)
        new["rlnOpticsGroup"] = group
        blocks = {"optics": optics, "particles": pd.concat([new, base], axis=1)}
        version_line = "# version 30001"
    else:
        blocks = {"": pd.concat([new, base], axis=1)}
        version_line = None
    return blocks, version_line
