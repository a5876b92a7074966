"""cryoSPARC ``.cs`` particle files (a NumPy structured array saved with ``np.save``).

Fields used: ``blob/path`` (stack, relative to the project folder; a leading ``>`` is dropped),
``blob/idx`` (**0-based**), ``blob/shape``, ``blob/psize_A``; ``ctf/df1_A``, ``ctf/df2_A``,
``ctf/df_angle_rad`` (radians), ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
``ctf/phase_shift_rad``, ``ctf/bfactor``, ``ctf/scale``; ``alignments3D/pose`` (rotation
vector, radians), ``alignments3D/shift`` (pixels of ``alignments3D/psize_A``).

Conventions (from cryoDRGN's ``parse_pose_csparc`` / ``parse_pose_star``, which map both formats
to the same ``pose.pkl``):
    * Rotation: cryoDRGN takes ``R = expmap(pose).T`` (Rodrigues) for ``.cs`` and
      ``R = R_from_relion(rot, tilt, psi)`` for STAR; ``R_from_relion`` equals RELION's
      ``Euler_angles2matrix`` (checked numerically in the tests). Hence the RELION matrix is
      ``A = axis_angle_to_matrix(pose).T`` and ``pose = matrix_to_axis_angle(A.T)``.
    * Shift: cryoDRGN divides ``alignments3D/shift`` and ``rlnOriginX`` (pixels) by ``D`` in the
      same way, so the ``.cs`` shift is RELION's origin in pixels:
      ``shift_in_angstroms = -alignments3D/shift * alignments3D/psize_A``.
    * ``ctf/df_angle_rad`` and ``ctf/phase_shift_rad`` are RELION's ``rlnDefocusAngle`` and
      ``rlnPhaseShift`` in radians.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..cryoem.pose import axis_angle_to_matrix_np, matrix_to_axis_angle
from .errors import CryosipInputError, existing_file
from .particles import ParticleStack, checked_stack
from .star import (
    locate_stacks,
    native_images,
    parse_image_names,
    stack_image_names,
)

logger = logging.getLogger(__name__)

__all__ = ["read_cs", "write_cs", "load_cs_array", "cs_to_dataframe", "dataframe_to_cs"]

_REQUIRED = [
    "blob/path",
    "blob/idx",
    "blob/psize_A",
    "ctf/df1_A",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
]
# the CTF fields read_cs reads and write_cs writes (``cryosip inspect`` reports which are present):
# each one's CTFParams keyword, and whether the field is in radians (the keyword in degrees)
CS_CTF_FIELDS = {
    "ctf/df1_A": ("defocus_u_in_angstroms", False),
    "ctf/df2_A": ("defocus_v_in_angstroms", False),
    "ctf/df_angle_rad": ("defocus_angle_in_degrees", True),
    "ctf/accel_kv": ("voltage_in_kilovolts", False),
    "ctf/cs_mm": ("spherical_aberration_in_mm", False),
    "ctf/amp_contrast": ("amplitude_contrast", False),
    "ctf/phase_shift_rad": ("phase_shift_in_degrees", True),
    "ctf/bfactor": ("bfactor_in_angstroms2", False),
    "ctf/scale": ("scale", False),
}
_RECOMPUTED = {
    "blob/path",
    "blob/idx",
    "blob/shape",
    "blob/psize_A",
    *CS_CTF_FIELDS,
    "alignments3D/pose",
    "alignments3D/shift",
    "alignments3D/psize_A",
}


def load_cs_array(path: str | os.PathLike) -> np.ndarray:
    """``np.load`` a ``.cs`` file as a 1-D structured array; else raise CryosipInputError."""
    path = existing_file(path, "a .cs file")
    try:
        # memory-mapped: NumPy checks the file holds the rows the header claims before reading
        data = np.load(path, allow_pickle=False, mmap_mode="r")
        data = np.array(data) if isinstance(data, np.memmap) else data
    except Exception as e:  # ValueError, OSError, EOFError, ... for non-.npy bytes
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CryosipInputError(
            path, f"not a cryoSPARC .cs file (a NumPy .npy array): {msg[:200]}"
        ) from None
    if not isinstance(data, np.ndarray):
        if hasattr(data, "close"):
            data.close()
        raise CryosipInputError(
            path, "not a cryoSPARC .cs file (an .npz archive, expected one structured array)"
        )
    if data.dtype.names is None or data.ndim != 1:
        raise CryosipInputError(
            path,
            f"not a cryoSPARC .cs file (array of dtype {data.dtype} and shape "
            f"{data.shape}, expected a 1-D structured array)",
        )
    return data


def cs_to_dataframe(data: np.ndarray) -> pd.DataFrame:
    """One column per field; vector fields become object columns holding small arrays."""
    cols = {}
    for name in data.dtype.names:
        col = data[name]
        cols[name] = list(col) if col.ndim > 1 else col
    return pd.DataFrame(cols)


def dataframe_to_cs(df: pd.DataFrame, dtypes: dict[str, tuple]) -> np.ndarray:
    """Inverse of :func:`cs_to_dataframe` for the given ``{field: (dtype, shape)}``."""
    descr = [(name, dt, shape) if shape else (name, dt) for name, (dt, shape) in dtypes.items()]
    out = np.zeros(len(df), dtype=descr)
    for name in dtypes:
        v = df[name].to_numpy()
        out[name] = np.stack(v) if out[name].ndim > 1 else v
    return out


def _field(data: np.ndarray, name: str, path: Path, *, shape: tuple = ()) -> np.ndarray:
    try:
        v = np.asarray(data[name], dtype=np.float64)
    except (ValueError, TypeError):
        raise CryosipInputError(path, f"field {name} is not numeric ({data.dtype[name]})") from None
    if v.shape[1:] != shape:
        raise CryosipInputError(
            path, f"field {name} has shape {v.shape[1:]} per particle, expected {shape}"
        )
    flat = v.reshape(len(v), -1)
    bad = ~(np.isfinite(flat) & (np.abs(np.nan_to_num(flat)) < 1e30)).all(axis=1)
    if bad.any():
        raise CryosipInputError(path, f"row {int(np.nonzero(bad)[0][0]) + 1}: {name} is not finite")
    return v


def read_cs(
    path: str | os.PathLike,
    *,
    datadir: str | os.PathLike | None = None,
    box_size: int | None = None,
    require_poses: bool = True,
    require_images: bool = True,
    allow_unsupported_contrast: bool = False,
) -> ParticleStack:
    """Read a cryoSPARC ``.cs`` file (e.g. a refinement's ``particles.cs``) into a ParticleStack.

    Stacks (``blob/path``) are resolved against ``datadir``, then the ``.cs`` file's folder and
    its parents. A file without ``alignments3D/pose``/``shift`` is an error unless
    ``require_poses=False`` (poses become identity with ``has_poses=False``). Particles on
    different grids (``blob/psize_A``, ``blob/shape``) are brought onto one working grid
    (:func:`cryosip.data.particles.to_working_grid`); ``ctf/exp_group_id`` gives the optics
    groups. ``require_images=False`` reads the metadata when stack files are missing.
    ``allow_unsupported_contrast`` is accepted for symmetry with :func:`read_star` (cryoSPARC
    stacks are raw data).
    """
    del allow_unsupported_contrast
    path = Path(path)
    data = load_cs_array(path)
    names = set(data.dtype.names)
    missing = [f for f in _REQUIRED if f not in names]
    if missing:
        raise CryosipInputError(path, "missing required field(s) " + ", ".join(missing))
    n = len(data)
    if n == 0:
        raise CryosipInputError(path, "no particles")
    has_poses = {"alignments3D/pose", "alignments3D/shift"} <= names
    if not has_poses and require_poses:
        raise CryosipInputError(
            path,
            "no poses (alignments3D/pose and alignments3D/shift missing): use the .cs "
            "of a refinement job, not of an extraction/import job",
        )

    raw_paths = data["blob/path"]
    try:
        stack_names = np.array(
            [(p.decode() if isinstance(p, bytes) else str(p)) for p in raw_paths], dtype=object
        )
    except (UnicodeDecodeError, AttributeError):
        raise CryosipInputError(path, "blob/path is not text") from None
    stack_names = np.array([s[1:] if s.startswith(">") else s for s in stack_names], dtype=object)
    idx = _field(data, "blob/idx", path)
    if (idx < 0).any() or (idx != np.floor(idx)).any():
        raise CryosipInputError(
            path,
            f"row {int(np.nonzero((idx < 0) | (idx != np.floor(idx)))[0][0]) + 1}: "
            "blob/idx must be a non-negative integer (0-based)",
        )
    idx = idx.astype(np.int64)
    if any(not s.strip() for s in stack_names):
        raise CryosipInputError(path, "blob/path is empty for some particles")
    meta_box = None
    if "blob/shape" in names:
        shp = _field(data, "blob/shape", path, shape=(2,))
        if (shp[:, 0] != shp[:, 1]).any():
            raise CryosipInputError(path, "blob/shape: images are not square")
        meta_box = shp[:, 0].astype(np.int64)
    px = _field(data, "blob/psize_A", path)
    if (
        data["blob/psize_A"].dtype == np.float32
    ):  # 1.7f is 1.70000005: keep the decimal the user typed
        px = np.asarray(data["blob/psize_A"]).astype(str).astype(np.float64)
    if (px <= 0).any():
        raise CryosipInputError(path, "blob/psize_A must be positive")

    stacks = locate_stacks(
        path, stack_names, idx, datadir, expected_boxes=meta_box, require_images=require_images
    )
    file_box = stacks.boxes[stacks.file_of]
    boxes = np.where(file_box > 0, file_box, meta_box if meta_box is not None else 0)
    grids = np.stack([boxes.astype(np.float64), px], -1)
    images, _, pixel_size = native_images(os.fspath(path), stacks, grids)
    optics_group = None
    if "ctf/exp_group_id" in names:
        optics_group = np.unique(np.asarray(data["ctf/exp_group_id"]), return_inverse=True)[1]

    if has_poses:
        pose = _field(data, "alignments3D/pose", path, shape=(3,))
        shift_px = _field(data, "alignments3D/shift", path, shape=(2,))
        apx = _field(data, "alignments3D/psize_A", path) if "alignments3D/psize_A" in names else px
        rot = np.swapaxes(axis_angle_to_matrix_np(pose), -1, -2)
        shift = -shift_px * apx[:, None]
    else:
        rot = np.broadcast_to(np.eye(3), (n, 3, 3))
        shift = np.zeros((n, 2))

    return checked_stack(
        path,
        box_size,
        rot,
        shift,
        _cs_ctf(data, names, path),
        images=images,
        pixel_size=pixel_size,
        metadata=cs_to_dataframe(data),
        optics=None,
        has_poses=has_poses,
        has_shifts=has_poses,
        optics_group=None if optics_group is None else optics_group.astype(np.int64),
        native_grid=grids,
    )


def _cs_ctf(data: np.ndarray, names: set, path: Path) -> dict:
    """The :meth:`CTFParams.make` keywords of the CTF fields present (the others: its defaults)."""
    ctf = {}
    for field, (keyword, radians) in CS_CTF_FIELDS.items():
        if field in names:
            v = _field(data, field, path)
            ctf[keyword] = np.rad2deg(v) if radians else v
    return ctf


def _cs_image_locations(
    stack: ParticleStack, out_dir: Path, image_names
) -> tuple[list[str], np.ndarray]:
    if image_names is None:
        image_names = stack_image_names(stack, out_dir)
    if image_names is None:
        raise ValueError(
            "the stack's images are not in a file as they are (new or downsampled images): write "
            "them with MrcsWriter and pass image_names"
        )
    paths, idx = parse_image_names(image_names)
    return list(paths), idx


def write_cs(
    path: str | os.PathLike, stack: ParticleStack, *, image_names: list[str] | None = None
) -> Path:
    """Write ``stack`` as a cryoSPARC ``.cs`` structured array, atomically.

    Poses/shifts (``alignments3D/*``) are written when ``stack.has_poses``; fields of an original
    ``.cs`` that are not recomputed (``uid``, ``blob/sign``, ...) are kept. ``image_names`` are
    RELION-style ``"000001@stack.mrcs"`` names (converted to 0-based ``blob/idx``).
    """
    path = Path(path)
    n = len(stack)
    # original files: each particle keeps its native grid; new images: the working grid
    grids = stack.grids(native=image_names is None)
    stack_paths, idx = _cs_image_locations(stack, path.parent, image_names)
    nu = stack.nuisance
    f4 = np.float32
    cols: dict[str, tuple[np.ndarray, str, tuple]] = {}
    meta = stack.metadata
    if meta is not None and "uid" in meta.columns and len(meta) == n:
        uid = meta["uid"].to_numpy().astype(np.uint64)
    else:
        uid = np.random.default_rng(zlib.crc32(os.fspath(path).encode())).integers(
            1, 2**63, n, dtype=np.uint64
        )
    cols["uid"] = (uid, "<u8", ())
    width = max(1, max(len(p.encode()) for p in stack_paths))
    cols["blob/path"] = (
        np.array([p.encode() for p in stack_paths], dtype=f"S{width}"),
        f"S{width}",
        (),
    )
    cols["blob/idx"] = (np.asarray(idx, np.uint32), "<u4", ())
    cols["blob/shape"] = (np.repeat(grids[:, :1], 2, axis=1).astype(np.uint32), "<u4", (2,))
    cols["blob/psize_A"] = (grids[:, 1].astype(f4), "<f4", ())
    for field, (keyword, radians) in CS_CTF_FIELDS.items():
        v = np.asarray(getattr(nu.ctf, keyword), np.float64)
        cols[field] = ((np.deg2rad(v) if radians else v).astype(f4), "<f4", ())
    if stack.has_poses:
        A = np.asarray(nu.rotation, np.float64)
        cols["alignments3D/pose"] = (
            matrix_to_axis_angle(np.swapaxes(A, -1, -2)).astype(f4),
            "<f4",
            (3,),
        )
        shift_px = -np.asarray(nu.shift_in_angstroms, np.float64) / grids[:, 1:2]
        cols["alignments3D/shift"] = (shift_px.astype(f4), "<f4", (2,))
        cols["alignments3D/psize_A"] = (grids[:, 1].astype(f4), "<f4", ())
    # keep other fields of an original .cs
    extra = {}
    if meta is not None and len(meta) == n and "blob/idx" in meta.columns:
        for name in meta.columns:
            if name in cols or name in _RECOMPUTED or not isinstance(name, str) or "/" not in name:
                continue
            v = meta[name].to_numpy()
            arr = (
                np.stack(v)
                if v.dtype == object and len(v) and isinstance(v[0], np.ndarray)
                else np.asarray(v)
            )
            if arr.dtype == object:
                continue
            extra[name] = (arr, arr.dtype.str, arr.shape[1:])
    cols.update(extra)
    descr = [(k, dt, shp) if shp else (k, dt) for k, (_, dt, shp) in cols.items()]
    out = np.zeros(n, dtype=descr)
    for k, (v, _, _) in cols.items():
        out[k] = v
    from .._atomic import atomic_path

    with atomic_path(path, ".tmp") as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    return path
