"""cryoDRGN pickles: ``pose.pkl``, ``ctf.pkl``, ``ind.pkl`` (read, apply as overrides, write).

* ``pose.pkl`` = ``(rot, trans)``: ``rot`` (N, 3, 3) and ``trans`` (N, 2) as a fraction of the box
  (a bare ``rot`` array is accepted too). ``rot`` is RELION's ``Euler_angles2matrix``: cryoDRGN's
  ``parse_pose_star`` builds it with ``utils.R_from_relion(rot, tilt, psi)``, which equals
  :func:`cryosip.cryoem.pose.euler_to_matrix` (checked in the tests). ``trans`` is RELION's origin
  in pixels divided by ``D`` (``parse_pose_star``: ``trans = rlnOriginX[Angst / apix] / D``), so
  ``shift_in_angstroms = -trans * D * pixel_size`` (invariant under Fourier cropping).
* ``ctf.pkl`` = float32 (N, 9): ``[D, A/px, dfU A, dfV A, dfAng deg, kV, Cs mm, w, phase deg]``.
* ``ind.pkl`` = integer indices of the particles to keep (applied after the overrides when the
  overrides cover the full stack, as cryoDRGN's ``--ind`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
from pathlib import Path

import jax
import numpy as np

from .._atomic import atomic_path
from .errors import CryosipInputError, existing_file
from .mrc import (
    MAX_BOX,
    LazyImageStack,
    MissingImages,
    _is_compressed,
    mrc_layout,
    read_mrc_header,
)
from .particles import ParticleStack, take_nuisance

logger = logging.getLogger(__name__)

__all__ = [
    "read_pose_pkl",
    "read_ctf_pkl",
    "read_ind_pkl",
    "apply_cryodrgn",
    "write_cryodrgn",
    "read_cryodrgn",
    "cryodrgn_pickle_kind",
    "write_pickle",
    "load_pickle_safely",
    "RestrictedUnpickler",
]


# ----------------------------------------------------------------------------------------------
# Restricted unpickling: a pickle is a program, so only what NumPy arrays need may run.
#
# cryoDRGN's pickles hold NumPy arrays (and tuples of them). Pickling them references, depending
# on the protocol and the NumPy major version (checked with pickletools):
#   numpy(._core|.core).multiarray._reconstruct, numpy.ndarray, numpy.dtype   (protocols 0-5)
#   numpy(._core|.core).numeric._frombuffer                  (protocol 5, contiguous arrays)
#   numpy(._core|.core).multiarray.scalar                   (NumPy scalars)
#   _codecs.encode(str, "latin1")                           (protocols 0-2: bytes as text)
#   builtins.bytes / __builtin__.bytes, no arguments        (protocols 0-2: empty bytes)
# Tuples, lists, dicts, numbers and strings are opcodes, not globals. Each admitted global is
# replaced by a checking stand-in, so that no pickle can call NumPy with arbitrary arguments
# (e.g. allocate an array of 10^12 elements, or build an object array); every other global is
# refused. A first pass over the opcodes (pickletools.genops on the bytes, bounded by the file
# size) refuses forbidden globals, counted lengths past the end and absurd memo indices before
# any object is built; find_class refuses the same globals again during the real load.


class _Refused(Exception):
    """A pickle that is refused (the message names why, e.g. ``forbidden global os.system``)."""


def _printable(s) -> str:
    return str(s).encode("unicode_escape", "replace").decode("ascii")[:120]


_NDARRAY = object()  # stand-in for numpy.ndarray: only _reconstruct accepts it, nothing calls it
_FORBIDDEN_DTYPE_FLAGS = 0x01 | 0x02 | 0x04 | 0x20 | 0x40  # object refs, list pickle, getitem...
_MAX_NDIM = 32


def _checked_dtype(dt) -> np.dtype:
    if isinstance(dt, _PickledDtype):
        dt = dt.dtype
    if not isinstance(dt, np.dtype):
        raise _Refused(f"array dtype is a {type(dt).__name__}, not a NumPy dtype")
    if dt.hasobject or dt.flags & _FORBIDDEN_DTYPE_FLAGS or dt.kind == "O":
        raise _Refused("object arrays are not allowed")
    return dt


def _checked_nbytes(shape, dt: np.dtype) -> int:
    if not isinstance(shape, tuple) or len(shape) > _MAX_NDIM:
        raise _Refused("array shape is not a tuple of at most 32 sizes")
    n = dt.itemsize
    for s in shape:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise _Refused(f"array shape {_printable(shape)} is not made of sizes >= 0")
        n *= s
    return n


class _PickledDtype:
    """numpy.dtype as pickles build it: ``dtype('f4', False, True)``, then a state that only
    sets the byte order. NumPy's own ``dtype.__setstate__`` is never called: it crashes the
    interpreter on some malformed states (e.g. two entries short), so the state must be the type
    code's own state but for the byte order, or the pickle is refused."""

    def __init__(self, code, align=False, copy=False):
        if not isinstance(code, str) or len(code) > 64:
            raise _Refused("numpy.dtype called with something other than a type code")
        try:
            dt = np.dtype(code, align=bool(align), copy=bool(copy))
        except Exception as e:
            raise _Refused(f"invalid dtype {_printable(code)} ({type(e).__name__})") from None
        self.dtype = _checked_dtype(dt)

    def __setstate__(self, state):
        own = self.dtype.__reduce__()[2]
        if (
            not isinstance(state, tuple)
            or len(state) != len(own)
            or state[1] not in ("<", ">", "|", "=")
            or any(type(a) is not type(b) or a != b for a, b in zip(state[2:], own[2:]))
            or state[0] != own[0]
        ):
            raise _Refused(f"malformed dtype state {_printable(state)}")
        if state[1] != own[1] and own[1] != "|":
            self.dtype = self.dtype.newbyteorder(state[1])


class _GuardedArray(np.ndarray):
    """An array being unpickled: its state (shape, dtype, raw bytes) is checked before NumPy
    sees it, so that the bytes must really be in the file (no allocation from a claimed size)."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("malformed array state")
        shape, dt, _fortran, raw = state[-4:]
        dt = _checked_dtype(dt)
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused("array data is not raw bytes")
        if _checked_nbytes(shape, dt) != len(raw):
            raise _Refused("array data size does not match its shape")
        super().__setstate__((*state[:-3], dt, *state[-2:]))


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array whose state follows."""
    if subtype is not _NDARRAY:
        raise _Refused("_reconstruct of something other than numpy.ndarray")
    if isinstance(dtype, (bytes, str)) and dtype in (b"b", "b"):
        dt = np.dtype("b")
    else:
        dt = _checked_dtype(dtype)
    if _checked_nbytes(shape, dt) > 1 << 16:
        raise _Refused("_reconstruct asks for a large array")
    return np.ndarray.__new__(_GuardedArray, shape, dt)


def _safe_frombuffer(buf, dtype, shape, order):
    """numpy's ``_frombuffer`` (protocol 5): an array over bytes that are in the file."""
    if isinstance(buf, pickle.PickleBuffer):
        buf = buf.raw()
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise _Refused("_frombuffer of something other than bytes")
    dt = _checked_dtype(dtype)
    if order not in ("C", "F") or _checked_nbytes(shape, dt) != memoryview(buf).nbytes:
        raise _Refused("array data size does not match its shape")
    try:
        return np.frombuffer(buf, dtype=dt).reshape(shape, order=order)
    except Exception as e:
        raise _Refused(f"invalid array ({type(e).__name__})") from None


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy(._core|.core).multiarray.scalar


def _safe_scalar(dtype, data=None):
    """numpy's ``scalar(dtype, bytes)``: a NumPy scalar from exactly ``itemsize`` bytes."""
    dt = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _Refused("NumPy scalar data does not match its dtype")
    return _NUMPY_SCALAR(dt, data)


def _safe_encode(text, encoding="latin1"):
    """``_codecs.encode(text, 'latin1')``: bytes in protocol 0-2 pickles."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin-1")


def _safe_empty_bytes(*args):
    """``bytes()``: how protocols 0-2 write the empty data of an empty array."""
    if args:
        raise _Refused("bytes() is only allowed without arguments")
    return b""


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("builtins", "bytes"): _safe_empty_bytes,
    ("__builtin__", "bytes"): _safe_empty_bytes,
    ("numpy", "dtype"): _PickledDtype,
    ("_codecs", "encode"): _safe_encode,
}
for _core in ("numpy.core", "numpy._core"):  # NumPy 1.x and 2.x module names
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _safe_reconstruct
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _safe_scalar
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _safe_frombuffer
del _core


def _check_global(module, name) -> None:
    if (module, name) not in _ALLOWED_GLOBALS:
        raise _Refused(f"forbidden global {_printable(module)}.{_printable(name)}")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads NumPy arrays, dtypes, scalars and plain containers; refuses every other global."""

    def find_class(self, module, name):
        _check_global(module, name)
        return _ALLOWED_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise _Refused("persistent ids are not allowed")


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_REFUSED_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


def _prescan(data: bytes) -> None:
    """Walk the opcodes without building anything: refuse forbidden globals (including the
    names STACK_GLOBAL takes from the stack), persistent ids, extension codes, counted lengths
    past the end of the data and memo indices larger than the pickle (which would make the
    unpickler allocate a huge memo)."""
    import pickletools

    mark = pickletools.markobject
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    n_ops = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            n_ops += 1
            name = op.name
            if name in _REFUSED_OPS:
                if name == "INST":
                    _check_global(*str(arg).split(" ", 1))
                raise _Refused(f"opcode {name} is not allowed")
            if name == "FRAME" and arg > len(data) - pos:
                raise _Refused("frame longer than the file")
            if name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= n_ops:
                raise _Refused(f"memo index {int(arg)} out of range")
            before, after = op.stack_before, op.stack_after
            if name == "GLOBAL":
                _check_global(*str(arg).split(" ", 1))
            if name == "STACK_GLOBAL":
                if len(stack) < 2 or not all(isinstance(v, str) for v in stack[-2:]):
                    raise _Refused("STACK_GLOBAL with names that are not plain strings")
                _check_global(stack[-2], stack[-1])
            if name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise _Refused(f"memo index {int(arg)} read before it is set")
                stack.append(memo[int(arg)])
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not stack or stack[-1] is mark:
                    raise _Refused("memo store with an empty stack")
                memo[int(arg) if name != "MEMOIZE" else len(memo)] = stack[-1]
                continue
            n_pop = len(before)
            if mark in before or (name == "POP" and stack and stack[-1] is mark):
                if not marks:
                    raise _Refused("opcode needs a MARK")
                del stack[marks.pop() :]
                n_pop = before.index(mark) if mark in before else 0
            if len(stack) < n_pop:
                raise _Refused(f"opcode {name} pops an empty stack")
            if n_pop:
                del stack[-n_pop:]
            if mark in after:
                marks.append(len(stack))
                stack.append(mark)
                continue
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else None)
            else:
                stack.extend([None] * len(after))
    except _Refused:
        raise
    except Exception as e:  # ValueError from genops: truncated data, unknown opcode, ...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Refused(f"not a valid pickle ({_printable(why)})") from None


# what a loaded pickle may hold (containers of numbers, strings and numeric arrays): anything
# else the restricted unpickler can still build (a bare ``numpy.dtype``) is refused
_DATA_TYPES = (tuple, list, dict, set, frozenset, int, float, complex, str, bytes, bytearray,
               bool, type(None), np.ndarray, np.generic)  # fmt: skip


def _check_data(obj) -> None:
    """Refuse (``_Refused``) a loaded object that is not plain data, at any depth."""
    stack, seen = [obj], set()
    while stack:
        v = stack.pop()
        if not isinstance(v, _DATA_TYPES):
            raise _Refused(f"the pickle holds a {type(v).__name__}, not data")
        if isinstance(v, (tuple, list, set, frozenset, dict)) and id(v) not in seen:
            seen.add(id(v))
            stack.extend(v.items() if isinstance(v, dict) else v)


def _unguard(obj, depth: int = 0):
    if isinstance(obj, _GuardedArray):
        return obj.view(np.ndarray)
    if depth < 4 and isinstance(obj, (tuple, list)):
        return type(obj)(_unguard(v, depth + 1) for v in obj)
    return obj


def load_pickle_safely(path: str | os.PathLike):
    """Unpickle a cryoDRGN-style pickle (NumPy arrays, tuples, lists, dicts, numbers, strings)
    without running any code from it. A pickle that references any other global (``os.system``,
    ``builtins.eval``, a torch tensor, ...) is refused with a :class:`CryosipInputError` naming
    the file and the global, before any object is built; so are object arrays and arrays whose
    declared size does not match the bytes in the file."""
    path = existing_file(path, "a pickle")
    data = path.read_bytes()
    try:
        _prescan(data)
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
        _check_data(obj)
        return _unguard(obj)
    except _Refused as e:
        raise CryosipInputError(path, f"refusing to load pickle: {e}") from None
    except CryosipInputError:
        raise
    except (Exception, RecursionError) as e:  # UnpicklingError, EOFError, ValueError, ...
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CryosipInputError(
            path, f"not a readable pickle ({type(e).__name__}: {_printable(msg)})"
        ) from None


_load_pickle = load_pickle_safely


def _as_array(obj, path: Path, what: str) -> np.ndarray:
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise CryosipInputError(path, f"{what} is not a numeric array") from None
    if not np.isfinite(arr).all():
        raise CryosipInputError(path, f"{what} contains NaN or Inf")
    return arr


def cryodrgn_pickle_kind(path: str | os.PathLike) -> str:
    """'pose', 'ctf' or 'ind' from the content of a cryoDRGN pickle."""
    path = Path(path)
    obj = _load_pickle(path)
    if isinstance(obj, tuple):
        return "pose"
    arr = np.asarray(obj) if not hasattr(obj, "detach") else obj.detach().cpu().numpy()
    if arr.ndim == 3 and arr.shape[1:] == (3, 3):
        return "pose"
    if arr.ndim == 2 and arr.shape[1] == 9:
        return "ctf"
    if arr.ndim == 1 and arr.dtype.kind in "iu":
        return "ind"
    raise CryosipInputError(
        path, f"not a cryoDRGN pose/ctf/ind pickle (array of shape {arr.shape})"
    )


def read_pose_pkl(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(rot (N,3,3), trans (N,2) fraction of the box, or None when only rotations are stored)."""
    path = Path(path)
    obj = _load_pickle(path)
    trans = None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        rot, trans = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 1:
        rot = obj[0]
    else:
        rot = obj
    rot = _as_array(rot, path, "rotations")
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise CryosipInputError(path, f"rotations must be (N, 3, 3), got {rot.shape}")
    err = (
        np.abs(rot @ np.swapaxes(rot, 1, 2) - np.eye(3)).max(axis=(1, 2))
        if len(rot)
        else np.zeros(0)
    )
    det = np.linalg.det(rot) if len(rot) else np.zeros(0)
    bad = (err > 1e-3) | (det < 0)
    if bad.any():
        raise CryosipInputError(
            path, f"pose {int(np.nonzero(bad)[0][0]) + 1} is not a rotation matrix"
        )
    if trans is not None:
        trans = _as_array(trans, path, "translations")
        if trans.shape != (len(rot), 2):
            raise CryosipInputError(
                path, f"translations must be ({len(rot)}, 2), got {trans.shape}"
            )
    return rot, trans


def read_ctf_pkl(path) -> np.ndarray:
    """float64 (N, 9): D, A/px, dfU, dfV, dfAng (deg), kV, Cs (mm), w, phase (deg)."""
    path = Path(path)
    arr = _as_array(_load_pickle(path), path, "CTF table")
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise CryosipInputError(path, f"ctf.pkl must be an (N, 9) array, got shape {arr.shape}")
    if len(arr) and ((arr[:, 0] < 2).any() or (arr[:, 1] <= 0).any()):
        raise CryosipInputError(
            path, "ctf.pkl: box size (column 0) and pixel size (column 1) must be positive"
        )
    if len(arr) and (arr[:, 0] > MAX_BOX).any():
        raise CryosipInputError(
            path, f"ctf.pkl: box size {arr[:, 0].max():g} (column 0) is above {MAX_BOX}: refused"
        )
    return arr


def read_ind_pkl(path, n: int | None = None) -> np.ndarray:
    path = Path(path)
    obj = _load_pickle(path)
    arr = np.asarray(obj.detach().cpu().numpy() if hasattr(obj, "detach") else obj)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise CryosipInputError(
            path, f"ind.pkl must be a 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if n is not None and arr.size and (arr.min() < 0 or arr.max() >= n):
        raise CryosipInputError(
            path,
            f"index {int(arr.max()) if arr.max() >= n else int(arr.min())} out of range "
            f"for {n} particles",
        )
    return arr


def _ctf_fields(ctf: np.ndarray) -> dict:
    return dict(
        defocus_u_in_angstroms=ctf[:, 2],
        defocus_v_in_angstroms=ctf[:, 3],
        defocus_angle_in_degrees=ctf[:, 4],
        voltage_in_kilovolts=ctf[:, 5],
        spherical_aberration_in_mm=ctf[:, 6],
        amplitude_contrast=ctf[:, 7],
        phase_shift_in_degrees=ctf[:, 8],
    )


def apply_cryodrgn(stack: ParticleStack, *, pose=None, ctf=None, ind=None) -> ParticleStack:
    """Override poses/shifts (``pose``) and CTF (``ctf``) of ``stack``; select particles (``ind``).

    Each argument is a path to the pickle or the already loaded object. Overrides may cover
    all of ``stack`` (then ``ind`` selects afterwards) or, when ``ind`` is given, only the
    selected particles.
    """
    src = {}
    ind_arr = None
    if ind is not None:
        ind_arr = (
            read_ind_pkl(ind, len(stack))
            if isinstance(ind, (str, os.PathLike))
            else np.asarray(ind, np.int64)
        )
        if ind_arr.size and (ind_arr.min() < 0 or ind_arr.max() >= len(stack)):
            raise CryosipInputError(
                ind if isinstance(ind, (str, os.PathLike)) else None,
                f"index out of range for {len(stack)} particles",
            )
    if pose is not None:
        src["pose"] = pose
        pose = (
            read_pose_pkl(pose)
            if isinstance(pose, (str, os.PathLike))
            else (
                (np.asarray(pose[0]), None if pose[1] is None else np.asarray(pose[1]))
                if isinstance(pose, tuple)
                else (np.asarray(pose), None)
            )
        )
    if ctf is not None:
        src["ctf"] = ctf
        ctf = (
            read_ctf_pkl(ctf)
            if isinstance(ctf, (str, os.PathLike))
            else np.asarray(ctf, np.float64)
        )

    lengths = {
        k: len(v[0] if k == "pose" else v)
        for k, v in (("pose", pose), ("ctf", ctf))
        if v is not None
    }
    n = len(stack)
    if (
        ind_arr is not None
        and lengths
        and all(m == len(ind_arr) for m in lengths.values())
        and len(ind_arr) != n
    ):
        stack = _select(stack, ind_arr)
        ind_arr = None
        n = len(stack)
    for k, m in lengths.items():
        if m != n:
            where = src[k] if isinstance(src[k], (str, os.PathLike)) else None
            raise CryosipInputError(where, f"{k} table has {m} rows but the particle stack has {n}")

    nu = stack.nuisance
    extent = stack.box_size * stack.pixel_size
    changes = {}
    if ctf is not None:
        cext = ctf[:, 0] * ctf[:, 1]
        if np.abs(cext - extent).max() > 1e-3 * extent and not isinstance(
            stack.images, MissingImages
        ):
            where = src["ctf"] if isinstance(src["ctf"], (str, os.PathLike)) else None
            raise CryosipInputError(
                where,
                f"ctf.pkl box {ctf[0, 0]:g} px x {ctf[0, 1]:g} A/px does not match the "
                f"images ({stack.box_size} px x {stack.pixel_size:g} A/px)",
            )
        new = ParticleStack.make_nuisance(
            nu.rotation,
            nu.shift_in_angstroms,
            **_ctf_fields(ctf),
            bfactor_in_angstroms2=nu.ctf.bfactor_in_angstroms2,
            scale=nu.ctf.scale,
        )
        nu = new
    if pose is not None:
        rot, trans = pose
        shift = nu.shift_in_angstroms if trans is None else -np.asarray(trans, np.float64) * extent
        nu = dataclasses.replace(
            nu,
            rotation=np.asarray(rot, np.float32),
            shift_in_angstroms=np.asarray(shift, np.float32),
        )
        changes.update(has_poses=True, has_shifts=trans is not None or stack.has_shifts)
    stack = dataclasses.replace(stack, nuisance=nu, **changes)
    if ind_arr is not None:
        stack = _select(stack, ind_arr)
    return stack


def _select(stack: ParticleStack, idx: np.ndarray) -> ParticleStack:
    if isinstance(stack.images, MissingImages):
        meta = None if stack.metadata is None else stack.metadata.iloc[idx].reset_index(drop=True)
        return dataclasses.replace(
            stack,
            images=MissingImages(len(idx), stack.box_size, stack.images.source),
            nuisance=take_nuisance(stack.nuisance, idx),
            metadata=meta,
        )
    return stack.take(idx)


def read_cryodrgn(*, ctf, pose=None, ind=None, particles=None, datadir=None) -> ParticleStack:
    """A ParticleStack from cryoDRGN pickles, with images from ``particles`` (an ``.mrcs``/``.mrc``
    stack, or a ``.txt`` list of stacks) or without images (``particles=None``)."""
    ctf_path = ctf if isinstance(ctf, (str, os.PathLike)) else None
    ctf_arr = read_ctf_pkl(ctf) if ctf_path is not None else np.asarray(ctf, np.float64)
    if len(ctf_arr) == 0:
        raise CryosipInputError(ctf_path, "no particles in ctf.pkl")
    D = int(round(ctf_arr[0, 0]))
    px = float(ctf_arr[0, 1])
    if np.ptp(ctf_arr[:, 0]) > 0 or np.ptp(ctf_arr[:, 1]) > 1e-6 * px:
        raise CryosipInputError(ctf_path, "ctf.pkl has several box/pixel sizes")
    if particles is None:
        n = len(ctf_arr)
        images = MissingImages(n, D, None if ctf_path is None else os.fspath(ctf_path))
        source = ctf_path
    else:
        particles = Path(particles)
        if particles.suffix == ".txt":
            if not particles.exists():
                raise CryosipInputError(particles, "file not found")
            lines = [ln.strip() for ln in particles.read_text().splitlines() if ln.strip()]
            if not lines:
                raise CryosipInputError(particles, "empty list of stacks")
            files = [_resolve(ln, particles.parent, datadir) for ln in lines]
        else:
            files = [particles]
        counts, boxes = [], []
        for f in files:
            h = read_mrc_header(f)
            if not _is_compressed(Path(f)):
                mrc_layout(f, h)  # a truncated stack fails here
            counts.append(int(h.nz))
            boxes.append(int(h.nx))
            if int(h.nx) != int(h.ny):
                raise CryosipInputError(f, "images are not square")
        if len(set(boxes)) > 1:
            raise CryosipInputError(
                particles, f"stacks have different box sizes {sorted(set(boxes))}"
            )
        fi = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
        ii = np.concatenate([np.arange(c) for c in counts])
        images = LazyImageStack(files, fi, ii, boxes[0], file_boxes=boxes)
        if boxes[0] != D:
            px = D * px / boxes[0]  # ctf.pkl written for another box: keep the physical size
        source = particles
    n_img = images.shape[0]
    if ind is None and len(ctf_arr) != n_img:
        where = particles if particles is not None else ctf_path
        raise CryosipInputError(where, f"{n_img} images but ctf.pkl has {len(ctf_arr)} rows")
    rot = np.broadcast_to(np.eye(3), (n_img, 3, 3))
    base_ctf = ctf_arr if len(ctf_arr) == n_img else np.tile(ctf_arr[:1], (n_img, 1))
    nu = ParticleStack.make_nuisance(rot, np.zeros((n_img, 2)), **_ctf_fields(base_ctf))
    stack = ParticleStack(
        images=images,
        nuisance=nu,
        pixel_size=px,
        source=None if source is None else os.fspath(source),
        has_poses=False,
        has_shifts=False,
    )
    return apply_cryodrgn(stack, pose=pose, ctf=ctf_arr if len(ctf_arr) != n_img else None, ind=ind)


def _resolve(name: str, folder: Path, datadir) -> Path:
    from .star import resolve_stack_path

    return resolve_stack_path(name, folder, datadir, folder)


def write_pickle(path: str | os.PathLike, obj) -> Path:
    """Pickle ``obj`` atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path, ".tmp") as tmp:
        _dump_pickle(tmp, obj)
    return path


def _dump_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def cryodrgn_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """``prefix`` a folder (existing, or ending in ``/``) -> ``folder/pose.pkl``...; else
    ``prefix_pose.pkl``, ``prefix_ctf.pkl``."""
    s = os.fspath(prefix)
    if s.endswith(os.sep) or Path(s).is_dir():
        d = Path(s)
        return {"pose": d / "pose.pkl", "ctf": d / "ctf.pkl", "ind": d / "ind.pkl"}
    return {k: Path(f"{s}_{k}.pkl") for k in ("pose", "ctf", "ind")}


def write_cryodrgn(prefix: str | os.PathLike, stack: ParticleStack, *, ind=None) -> dict[str, Path]:
    """Write ``pose.pkl`` (when the stack has poses), ``ctf.pkl`` and optionally ``ind.pkl``.

    All files are written to temporary names first and renamed together at the end.
    """
    paths = cryodrgn_paths(prefix)
    nu = jax.tree_util.tree_map(np.asarray, stack.nuisance)
    c = nu.ctf
    n = len(stack)
    ctf = np.stack(
        [
            np.full(n, stack.box_size, np.float64),
            np.full(n, stack.pixel_size, np.float64),
            c.defocus_u_in_angstroms,
            c.defocus_v_in_angstroms,
            c.defocus_angle_in_degrees,
            c.voltage_in_kilovolts,
            c.spherical_aberration_in_mm,
            c.amplitude_contrast,
            c.phase_shift_in_degrees,
        ],
        axis=1,
    ).astype(np.float32)
    if (np.abs(np.asarray(c.bfactor_in_angstroms2)) > 0).any() or (
        np.abs(np.asarray(c.scale) - 1) > 1e-6
    ).any():
        logger.warning(
            "ctf.pkl has no B-factor/scale columns: those CTF parameters are not written"
        )
    objs = {"ctf": ctf}
    if stack.has_poses:
        trans = -np.asarray(nu.shift_in_angstroms, np.float64) / (stack.box_size * stack.pixel_size)
        objs["pose"] = (np.asarray(nu.rotation, np.float32), trans.astype(np.float32))
    if ind is not None:
        objs["ind"] = np.asarray(ind, np.int64)
    # every file is published when all are written; on an error none is (atomic_path removes
    # each temporary file)
    with contextlib.ExitStack() as files:
        for k, obj in objs.items():
            _dump_pickle(files.enter_context(atomic_path(paths[k], ".tmp")), obj)
    return {k: paths[k] for k in objs}
