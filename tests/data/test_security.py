"""Untrusted input files never run code and never make cryosip allocate what they only claim.

* Pickles (cryoDRGN pose/ctf/ind) go through a restricted unpickler: a pickle whose
  ``__reduce__`` calls ``os.system``/``open``/``eval`` is refused by every entry point (library
  readers and the ``inspect``/``convert``/``reconstruct`` commands, exit code 2 and one line
  naming the file and the global), and the command never runs. Genuine cryoDRGN pickles, in
  every protocol and with NumPy 1.x or 2.x module names, still load.
* Headers that lie (MRC, STAR, .cs, pickled array shapes) are refused with one line, before
  allocation: peak traced memory stays below :data:`BOUND`.
"""

from __future__ import annotations

import builtins
import bz2
import gzip
import io
import os
import pickle
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryosip.cli.main import main
from cryosip.data.cryodrgn import (
    RestrictedUnpickler,
    apply_cryodrgn,
    cryodrgn_pickle_kind,
    load_pickle_safely,
    read_cryodrgn,
    read_ctf_pkl,
    read_ind_pkl,
    read_pose_pkl,
    write_cryodrgn,
    write_pickle,
)
from cryosip.data.errors import CryosipInputError
from cryosip.data.mrc import (
    MAX_BOX,
    MAX_IMAGES,
    LazyImageStack,
    mrc_layout,
    read_mrc_header,
    read_mrcs,
    write_mrcs,
)
from cryosip.data.particles import read_particles

BOUND = 64 << 20  # bytes: the most any refused input may make cryosip allocate
N, D, PX = 4, 16, 2.0


# ----------------------------------------------------------------------------------------------
# helpers


def peak_bytes(fn) -> tuple[int, BaseException | None]:
    """(peak traced allocation while running ``fn``, the exception it raised or None)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    err = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - returned to the caller
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, err


def assert_refused(fn, *, match: str | None = None, path=None) -> CryosipInputError:
    """``fn()`` raises CryosipInputError (one line, naming ``path``) and allocates < BOUND."""
    peak, err = peak_bytes(fn)
    assert isinstance(err, CryosipInputError), f"expected CryosipInputError, got {err!r}"
    msg = str(err)
    assert "\n" not in msg
    if match is not None:
        assert match in msg, msg
    if path is not None:
        assert msg.startswith(os.fspath(path)), msg
    assert peak < BOUND, f"peak allocation {peak / 2**20:.1f} MiB"
    return err


class _Reduce:
    """An object that pickles as ``fn(*args)``: the class is not needed to load the pickle."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that would create ``marker`` (or run a command creating it) when loaded."""
    touch = _Reduce(os.system, (f"touch {marker}",))
    opener = _Reduce(builtins.open, (os.fspath(marker), "w"))
    ev = _Reduce(builtins.eval, (f"open({os.fspath(marker)!r}, 'w')",))
    out = {
        # the classic hand-written one: protocol 0, GLOBAL 'os system'
        "os_system_p0": f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
        # after a genuine array, so that the refusal comes mid-stream
        "tuple_p4": pickle.dumps((np.eye(3)[None].astype(np.float32), touch), protocol=4),
        "open_p2": pickle.dumps(opener, protocol=2),
        "eval_p5": pickle.dumps([np.arange(3), ev], protocol=5),
    }
    for p in range(6):
        out[f"system_p{p}"] = pickle.dumps(touch, protocol=p)
    # STACK_GLOBAL whose names come from the memo (not the two preceding opcodes)
    out["memo_stack_global"] = (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93"
        + b"\x8c"
        + bytes([len(f"touch {marker}")])
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    return out


def genuine_pose(n=N, seed=0):
    rot = Rotation.random(n, random_state=seed).as_matrix().astype(np.float32)
    trans = np.random.default_rng(seed).uniform(-0.05, 0.05, (n, 2)).astype(np.float32)
    return rot, trans


def genuine_ctf(n=N, box=D, px=PX):
    rng = np.random.default_rng(1)
    ctf = np.zeros((n, 9), np.float32)
    ctf[:, 0], ctf[:, 1] = box, px
    ctf[:, 2], ctf[:, 3] = rng.uniform(1e4, 2e4, n), rng.uniform(1e4, 2e4, n)
    ctf[:, 4] = rng.uniform(0, 180, n)
    ctf[:, 5], ctf[:, 6], ctf[:, 7], ctf[:, 8] = 300, 2.7, 0.1, 0
    return ctf


class _NumPy1Pickler(pickle._Pickler):
    """Writes NumPy's globals under NumPy 1.x names (``numpy.core.*``), as pickles made with
    NumPy < 2 (e.g. by older cryoDRGN installs) reference them."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core")
            name = name or obj.__name__
            if self.proto >= 4:
                self.save(module)
                self.save(name)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def numpy1_dumps(obj, protocol) -> bytes:
    buf = io.BytesIO()
    _NumPy1Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def mrc_bytes(n=3, box=8, *, nx=None, ny=None, nz=None, nsymbt=None, mode=None) -> bytes:
    """A valid float32 stack of ``n`` images, then header fields overwritten (lies)."""
    data = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    with tempfile.TemporaryDirectory() as td:
        path = Path(td) / "x.mrcs"
        write_mrcs(path, data, 2.0)
        raw = bytearray(path.read_bytes())
    for off, val in ((0, nx), (4, ny), (8, nz), (12, mode), (92, nsymbt)):
        if val is not None:
            raw[off : off + 4] = struct.pack("<i", val)
    return bytes(raw)


# ----------------------------------------------------------------------------------------------
# malicious pickles: refused everywhere, the command never runs


@pytest.fixture
def drgn(tmp_path):
    """Genuine stack + pickles, a marker path and the evil pickles written to files."""
    images = np.random.default_rng(2).normal(size=(N, D, D)).astype(np.float32)
    write_mrcs(tmp_path / "particles.mrcs", images, PX)
    with open(tmp_path / "ctf.pkl", "wb") as f:
        pickle.dump(genuine_ctf(), f)
    with open(tmp_path / "pose.pkl", "wb") as f:
        pickle.dump(genuine_pose(), f)
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(np.array([0, 2, 3]), f)
    marker = tmp_path / "PWNED"
    evil = {}
    for k, payload in evil_pickles(marker).items():
        evil[k] = tmp_path / f"evil_{k}.pkl"
        evil[k].write_bytes(payload)
    return tmp_path, marker, evil


def test_evil_pickles_are_refused_by_every_library_reader(drgn):
    d, marker, evil = drgn
    stack = read_cryodrgn(ctf=d / "ctf.pkl", pose=d / "pose.pkl", particles=d / "particles.mrcs")
    for name, path in evil.items():
        readers = [
            lambda p=path: load_pickle_safely(p),
            lambda p=path: cryodrgn_pickle_kind(p),
            lambda p=path: read_pose_pkl(p),
            lambda p=path: read_ctf_pkl(p),
            lambda p=path: read_ind_pkl(p, N),
            lambda p=path: read_cryodrgn(ctf=p),
            lambda p=path: read_cryodrgn(ctf=d / "ctf.pkl", pose=p),
            lambda p=path: read_cryodrgn(ctf=d / "ctf.pkl", ind=p, particles=d / "particles.mrcs"),
            lambda p=path: apply_cryodrgn(stack, pose=p),
            lambda p=path: apply_cryodrgn(stack, ctf=p),
            lambda p=path: apply_cryodrgn(stack, ind=p),
            lambda p=path: read_particles(p, require_poses=False),
            lambda p=path: read_particles(d / "particles.mrcs", ctf=p, require_poses=False),
            lambda p=path: read_particles(
                d / "particles.mrcs", ctf=d / "ctf.pkl", pose=p, require_poses=False
            ),
        ]
        for read in readers:
            err = assert_refused(read, match="refusing to load pickle: forbidden global", path=path)
            assert err.path == os.fspath(path)
        assert not marker.exists(), name
    err = assert_refused(lambda: load_pickle_safely(evil["os_system_p0"]))
    assert (
        str(err) == f"{evil['os_system_p0']}: refusing to load pickle: forbidden global os.system"
    )
    for k, glob in (("open_p2", "io.open"), ("eval_p5", "builtins.eval")):
        msg = str(assert_refused(lambda p=evil[k]: load_pickle_safely(p)))
        assert msg.endswith(f"forbidden global {glob}"), msg


def test_find_class_alone_refuses_before_building(drgn):
    """The second line of defence (find_class), without the opcode pre-scan."""
    _, marker, evil = drgn
    for path in evil.values():
        with pytest.raises(Exception, match="forbidden global"):
            RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{evil}"],
        ["inspect", "{evil}", "--json"],
        ["inspect", "{d}/ctf.pkl", "--pose", "{evil}"],
        ["inspect", "{d}/particles.mrcs", "--ctf", "{evil}"],
        ["inspect", "{d}/particles.mrcs", "--ctf", "{d}/ctf.pkl", "--ind", "{evil}"],
        ["convert", "{evil}", "{d}/out.star"],
        ["convert", "{d}/ctf.pkl", "{d}/drgn_out/", "--pose", "{evil}"],
        ["convert", "{d}/particles.mrcs", "{d}/o.star", "--ctf", "{d}/ctf.pkl", "--pose", "{evil}"],
        ["reconstruct", "{evil}", "--model", "adk-ca", "--out", "{d}/rec"],
    ],
)
def test_cli_refuses_evil_pickles(drgn, capsys, argv):
    d, marker, evil = drgn
    for key in ("system_p4", "os_system_p0", "memo_stack_global"):
        path = evil[key]
        args = [a.format(d=d, evil=path) for a in argv]
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        assert os.fspath(path) in err and "refusing to load pickle: forbidden global" in err, err
        assert not marker.exists()
    assert not (d / "out.star").exists() and not (d / "o.star").exists()


# ----------------------------------------------------------------------------------------------
# genuine cryoDRGN pickles still load


def test_installed_numpy_names_are_admitted():
    module = np.zeros(1).__reduce__()[0].__module__
    expected = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else None
    assert module in ("numpy._core.multiarray", "numpy.core.multiarray")
    if expected is not None:
        assert module == expected
    got = RestrictedUnpickler(io.BytesIO(pickle.dumps(np.arange(3)))).find_class(
        module, "_reconstruct"
    )
    assert callable(got)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("names", ["installed", "numpy1"])
def test_genuine_cryodrgn_pickles_load(tmp_path, protocol, names):
    rot, trans = genuine_pose()
    ctf = genuine_ctf()
    ind = np.array([3, 0, 2], np.int64)
    dumps = (
        (lambda o: pickle.dumps(o, protocol=protocol))
        if names == "installed"
        else (lambda o: numpy1_dumps(o, protocol))
    )
    (tmp_path / "pose.pkl").write_bytes(dumps((rot, trans)))
    (tmp_path / "rot.pkl").write_bytes(dumps(rot))
    (tmp_path / "ctf.pkl").write_bytes(dumps(ctf))
    (tmp_path / "ind.pkl").write_bytes(dumps(ind))
    (tmp_path / "ind32.pkl").write_bytes(dumps(ind.astype(np.int32)))
    if names == "numpy1" and protocol < 5:  # the file really names numpy.core
        assert b"numpy.core" in (tmp_path / "ctf.pkl").read_bytes()
    r, t = read_pose_pkl(tmp_path / "pose.pkl")
    np.testing.assert_allclose(r, rot, rtol=0, atol=0)
    np.testing.assert_allclose(t, trans, rtol=0, atol=0)
    r2, t2 = read_pose_pkl(tmp_path / "rot.pkl")
    np.testing.assert_allclose(r2, rot, rtol=0, atol=0)
    assert t2 is None
    np.testing.assert_allclose(read_ctf_pkl(tmp_path / "ctf.pkl"), ctf, rtol=0, atol=0)
    np.testing.assert_array_equal(read_ind_pkl(tmp_path / "ind.pkl", N), ind)
    np.testing.assert_array_equal(read_ind_pkl(tmp_path / "ind32.pkl", N), ind)
    kinds = [cryodrgn_pickle_kind(tmp_path / f"{k}.pkl") for k in ("pose", "rot", "ctf", "ind")]
    assert kinds == ["pose", "pose", "ctf", "ind"]
    obj = load_pickle_safely(tmp_path / "pose.pkl")
    assert type(obj) is tuple and all(type(a) is np.ndarray for a in obj)


def test_plain_pickle_dump_and_our_writers_round_trip(drgn):
    d, _, _ = drgn
    # cryoDRGN's utils.save_pkl: pickle.dump(data, f) with the default protocol
    stack = read_cryodrgn(
        ctf=d / "ctf.pkl", pose=d / "pose.pkl", ind=d / "ind.pkl", particles=d / "particles.mrcs"
    )
    assert len(stack) == 3
    rot, trans = genuine_pose()
    np.testing.assert_allclose(np.asarray(stack.nuisance.rotation), rot[[0, 2, 3]], atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(stack.nuisance.shift_in_angstroms), -trans[[0, 2, 3]] * D * PX, rtol=1e-6
    )
    paths = write_cryodrgn(d / "ours", stack, ind=np.arange(3))
    for k, p in paths.items():
        ref = pickle.loads(p.read_bytes())  # readable by plain pickle (cryoDRGN's reader)
        got = load_pickle_safely(p)
        for a, b in zip(
            ref if isinstance(ref, tuple) else (ref,), got if isinstance(got, tuple) else (got,)
        ):
            np.testing.assert_allclose(b, a, rtol=0, atol=0)
    back = read_cryodrgn(ctf=paths["ctf"], pose=paths["pose"], ind=paths["ind"])
    np.testing.assert_allclose(
        np.asarray(back.nuisance.rotation), np.asarray(stack.nuisance.rotation), atol=1e-7
    )
    z = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(load_pickle_safely(write_pickle(d / "z.pkl", z)), z, rtol=0, atol=0)
    scal = load_pickle_safely(write_pickle(d / "s.pkl", (np.float32(1.5), np.int64(7), 2.5, "x")))
    assert scal == (np.float32(1.5), np.int64(7), 2.5, "x")


# ----------------------------------------------------------------------------------------------
# pickles that lie about sizes, object arrays, forged dtypes


def _frame(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


LYING_PICKLES = {
    # BYTEARRAY8 / BINBYTES8 / BINUNICODE8 announcing 1 TiB
    "bytearray8": b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"abc.",
    "binbytes8": _frame(b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc"),
    "binunicode8": _frame(b"\x8d" + struct.pack("<Q", 1 << 40) + b"abc"),
    "frame": b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"K\x01.",
    # a memo index of 4e9 makes the C unpickler allocate a 64 GB memo table
    "memo": _frame(b"K\x01r" + struct.pack("<I", 0xFFFFFFF0)),
    # numpy's _reconstruct asked for 10^12 float64
    "reconstruct": _frame(
        b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93"
        b"\x8c\x05numpy\x8c\x07ndarray\x93\x8a\x05\x00\x10\xa5\xd4\xe8\x85C\x01b\x87R"
    ),
    # an array state announcing 10^9 float64 with 8 bytes of data
    "setstate": pickle.dumps(np.zeros(1), protocol=3).replace(
        b"(K\x01K\x01\x85", b"(K\x01J\x00\xca\x9a;\x85"
    ),
    # a float32 dtype state two entries short: NumPy's dtype.__setstate__ crashes the interpreter
    # on it (found by test_io_fuzz); it must be refused before NumPy sees it
    "short_dtype_state": pickle.dumps(np.zeros(1, np.float32), protocol=3).replace(b"NNNJ", b"NJ"),
    "object_array": pickle.dumps(np.array([1, None, "x"], dtype=object)),
    "torch_like": _frame(b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93)R"),
    "stack_global_non_str": _frame(b"K\x01K\x02\x93"),
    "ext": _frame(b"\x82\x01"),
    "persid": _frame(b"K\x01Q"),
}


def _forged_dtype_pickle() -> bytes:
    """A V8 dtype whose state claims the object flags, then an array of it with list data."""
    good = pickle.dumps(np.zeros(1, dtype="V8"), protocol=3)
    return good.replace(b"K\x08K\x01K\x00t", b"K\x08K\x01K?t")


@pytest.mark.parametrize("name", sorted(LYING_PICKLES) + ["forged_dtype"])
def test_lying_pickles_are_refused_without_allocating(tmp_path, name):
    payload = _forged_dtype_pickle() if name == "forged_dtype" else LYING_PICKLES[name]
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(payload)
    assert_refused(lambda: load_pickle_safely(path), path=path)
    assert_refused(lambda: read_ctf_pkl(path), path=path)


def test_forged_setstate_really_differs_from_the_genuine_pickle():
    """The crafted byte replacements above hit (else those tests would test nothing)."""
    assert LYING_PICKLES["setstate"] != pickle.dumps(np.zeros(1), protocol=3)
    assert _forged_dtype_pickle() != pickle.dumps(np.zeros(1, dtype="V8"), protocol=3)
    short = pickle.dumps(np.zeros(1, np.float32), protocol=3)
    assert LYING_PICKLES["short_dtype_state"] == short.replace(b"NNNJ", b"NJ", 1) != short


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("dtype", [">f8", "<f4", ">i4", "|i1", "<u2"])
def test_byte_order_from_the_dtype_state(tmp_path, protocol, dtype):
    """The dtype's pickled state may set only the byte order, and the values survive it."""
    a = (np.arange(6) - 2).astype(dtype).reshape(2, 3)
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps((a, a[0, 1]), protocol=protocol))
    got, scalar = load_pickle_safely(path)
    np.testing.assert_array_equal(got, a)
    assert got.dtype.newbyteorder("=") == a.dtype.newbyteorder("=")
    assert scalar == a[0, 1] and np.asarray(scalar).dtype.kind == a.dtype.kind


# ----------------------------------------------------------------------------------------------
# MRC headers that lie


@pytest.mark.parametrize(
    "lie, match",
    [
        (dict(nz=10**9), f"more than {MAX_IMAGES}"),
        (dict(nz=MAX_IMAGES), "truncated MRC file"),
        (dict(nz=4), "truncated MRC file"),
        (dict(nx=MAX_BOX + 1, ny=MAX_BOX + 1), f"more than {MAX_BOX}"),
        (dict(nx=4096, ny=4096), "truncated MRC file"),
        (dict(nx=-8), "invalid dimensions"),
        (dict(nz=0), "invalid dimensions"),
        (dict(nsymbt=-1), "negative extended header"),
        (dict(nsymbt=2**31 - 1), "truncated MRC file"),
        (dict(mode=4), ""),  # complex: twice the bytes (truncated), and not images
        (dict(mode=77), "unsupported MRC mode"),
    ],
)
def test_lying_mrc_headers_are_refused_in_o1(tmp_path, lie, match):
    path = tmp_path / "liar.mrcs"
    path.write_bytes(mrc_bytes(**lie))
    assert_refused(lambda: read_mrcs(path), match=match, path=path)
    assert_refused(lambda: LazyImageStack([path], [0], [0], 8), match=match, path=path)


def test_header_reading_never_loads_the_extended_header(tmp_path):
    path = tmp_path / "ext.mrcs"
    path.write_bytes(mrc_bytes(nsymbt=2**31 - 1))
    peak, err = peak_bytes(lambda: read_mrc_header(path))
    assert err is None or isinstance(err, CryosipInputError)
    assert peak < BOUND


def test_compressed_stacks_that_lie(tmp_path):
    good = mrc_bytes(n=3)
    data = np.frombuffer(good[1024:], "<f4").reshape(3, 8, 8)
    for opener, suffix in ((gzip.compress, ".mrcs.gz"), (bz2.compress, ".mrcs.bz2")):
        ok = tmp_path / f"ok{suffix}"
        ok.write_bytes(opener(good))
        np.testing.assert_allclose(read_mrcs(ok), data, rtol=0, atol=0)
        lazy = LazyImageStack([ok], [0, 0], [2, 0], 8)
        np.testing.assert_allclose(lazy[:], data[[2, 0]], rtol=0, atol=0)
        # more images claimed than compressed: truncated, with memory bounded by what is there
        short = tmp_path / f"short{suffix}"
        short.write_bytes(opener(mrc_bytes(n=3, nz=20)))
        assert_refused(lambda p=short: read_mrcs(p), match="truncated", path=short)
        # a bomb: the header is honest, but the data would not fit in memory
        big = tmp_path / f"big{suffix}"
        big.write_bytes(opener(mrc_bytes(n=1, box=8, nx=4096, ny=4096, nz=200)))
        assert_refused(lambda p=big: read_mrcs(p), path=big)
        # trailing garbage (a bomb after the announced data) is never decompressed
        tail = tmp_path / f"tail{suffix}"
        tail.write_bytes(opener(good + bytes(50 << 20)))
        peak, err = peak_bytes(lambda p=tail: read_mrcs(p))
        assert err is None and peak < BOUND
    lie = tmp_path / "ratio.mrcs.gz"
    lie.write_bytes(gzip.compress(mrc_bytes(n=1, nz=10**7, nx=4096, ny=4096)))
    assert_refused(lambda: read_mrc_header(lie), match="gzip file cannot hold", path=lie)


def test_lazy_stack_checks_indices_and_boxes_against_headers(tmp_path):
    a = tmp_path / "a.mrcs"
    write_mrcs(a, np.zeros((3, 8, 8), np.float32), 1.0)
    b = tmp_path / "b.mrcs"
    write_mrcs(b, np.zeros((2, 16, 16), np.float32), 1.0)
    ok = LazyImageStack([a, b], [0, 1, 0], [2, 1, 0], 8, file_boxes=[8, 16])
    assert ok.shape == (3, 8, 8)
    assert_refused(
        lambda: LazyImageStack([a, b], [0, 1], [3, 0], 8),
        match="image index 4 out of range",
        path=a,
    )
    assert_refused(lambda: LazyImageStack([a, b], [0, 1], [0, 2], 8), match="out of range", path=b)
    assert_refused(lambda: LazyImageStack([a], [0], [-1], 8), match="negative", path=a)
    assert_refused(
        lambda: LazyImageStack([a, b], [0, 1], [0, 0], 8, expected_boxes=[8, 12]),
        match="metadata says 12",
        path=b,
    )
    assert_refused(
        lambda: LazyImageStack([a, b], [0, 1], [0, 0], 8, file_boxes=[8, 8]),
        match="16-pixel images",
        path=b,
    )
    assert LazyImageStack([a, b], [0, 1], [0, 0], 8, expected_boxes=[8, 16]).shape == (2, 8, 8)
    # 10^7 particles: the check is vectorised (no per-image Python work, no per-image reads)
    n = 10**7
    big = LazyImageStack([a], np.zeros(n, np.int64), np.arange(n) % 3, 8)
    assert len(big) == n
    with pytest.raises(ValueError):
        LazyImageStack([a], [1], [0], 8)


def test_mrc_layout_agrees_with_header_checks(tmp_path):
    path = tmp_path / "a.mrcs"
    path.write_bytes(mrc_bytes(n=3))
    dtype, offset, shape = mrc_layout(path)
    assert (dtype, offset, shape) == (np.dtype("<f4"), 1024, (3, 8, 8))
    h = read_mrc_header(path, expected_box=8)
    assert int(h.nz) == 3
    assert_refused(lambda: read_mrc_header(path, expected_box=16), match="metadata says 16")


# ----------------------------------------------------------------------------------------------
# STAR, .cs and cryoDRGN inputs pointing at lying stacks


def _star(tmp_path, image_name: str) -> Path:
    text = (
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnVoltage\n_rlnSphericalAberration\n"
        f"_rlnAmplitudeContrast\n_rlnImagePixelSize\n{image_name} 15000 300 2.7 0.1 2.0\n"
    )
    path = tmp_path / "p.star"
    path.write_text(text)
    return path


def test_star_and_cs_pointing_at_lying_stacks(tmp_path):
    from cryosip.data.cryosparc import read_cs
    from cryosip.data.star import read_star

    (tmp_path / "ok.mrcs").write_bytes(mrc_bytes(n=3))
    (tmp_path / "liar.mrcs").write_bytes(mrc_bytes(n=3, nz=10**9))
    (tmp_path / "liar2.mrcs").write_bytes(mrc_bytes(n=3, nz=10**7))
    assert len(read_star(_star(tmp_path, "000003@ok.mrcs"))) == 1
    for name, match in (
        ("000004@ok.mrcs", "out of range"),
        ("000001@liar.mrcs", "more than"),
        ("000001@liar2.mrcs", "truncated"),
        ("9999999@ok.mrcs", "out of range"),
    ):
        assert_refused(lambda n=name: read_star(_star(tmp_path, n)), match=match)

    def cs(path_name: bytes, idx: int, shape: int) -> Path:
        arr = np.zeros(
            1,
            [("blob/path", "S16"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
             ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
             ("ctf/amp_contrast", "<f4")],
        )  # fmt: skip
        arr[0] = (path_name, idx, (shape, shape), 2.0, 15000, 14000, 0.1, 300, 2.7, 0.1)
        p = tmp_path / "p.cs"
        with open(p, "wb") as f:
            np.save(f, arr)
        return p

    assert len(read_cs(cs(b"ok.mrcs", 2, 8), require_poses=False)) == 1
    assert_refused(lambda: read_cs(cs(b"ok.mrcs", 3, 8), require_poses=False), match="out of range")
    assert_refused(lambda: read_cs(cs(b"ok.mrcs", 0, 16), require_poses=False), match="16")
    assert_refused(lambda: read_cs(cs(b"liar.mrcs", 0, 8), require_poses=False), match="more than")


def test_cs_npy_header_claiming_a_billion_rows(tmp_path):
    """A .cs (an .npy file) whose header announces 10^9 particles but holds one."""
    from cryosip.data.cryosparc import read_cs

    arr = np.zeros(1, [("blob/path", "S16"), ("blob/idx", "<u4")])
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    hlen = struct.unpack("<H", raw[8:10])[0]
    header = raw[10 : 10 + hlen].decode("latin1").replace("(1,)", "(1000000000,)")
    header = header.rstrip() + " " * (hlen - len(header.rstrip()) - 1) + "\n"
    assert len(header) == hlen
    path = tmp_path / "liar.cs"
    path.write_bytes(raw[:10] + header.encode("latin1") + raw[10 + hlen :])
    assert_refused(lambda: read_cs(path, require_poses=False), path=path)


def test_cryodrgn_inputs_with_lying_stacks_and_boxes(tmp_path):
    (tmp_path / "liar.mrcs").write_bytes(mrc_bytes(n=3, nz=10**9))
    (tmp_path / "ok.mrcs").write_bytes(mrc_bytes(n=3))
    ctf = genuine_ctf(3, box=8)
    write_pickle(tmp_path / "ctf.pkl", ctf)
    assert len(read_cryodrgn(ctf=tmp_path / "ctf.pkl", particles=tmp_path / "ok.mrcs")) == 3
    assert_refused(
        lambda: read_cryodrgn(ctf=tmp_path / "ctf.pkl", particles=tmp_path / "liar.mrcs"),
        match="more than",
    )
    (tmp_path / "list.txt").write_text("ok.mrcs\nliar.mrcs\n")
    assert_refused(
        lambda: read_cryodrgn(ctf=tmp_path / "ctf.pkl", particles=tmp_path / "list.txt"),
        match="more than",
    )
    huge = ctf.copy()
    huge[:, 0] = 10**9
    write_pickle(tmp_path / "huge.pkl", huge)
    assert_refused(lambda: read_cryodrgn(ctf=tmp_path / "huge.pkl"), match="above 4096")


def test_a_pickle_of_non_data_is_refused(tmp_path):
    """The restricted unpickler can still build a bare ``numpy.dtype`` (the fuzz test found one
    in a mutated pose pickle); what the loader returns must be data (containers, numbers,
    strings, numeric arrays), so it is refused with the file named, at any depth."""
    for name, obj in (
        ("dtype.pkl", np.dtype("int64")),
        ("nested.pkl", {"a": [1, (np.dtype("f4"),)]}),
    ):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(CryosipInputError, match=f"{name}.*holds a"):
            load_pickle_safely(path)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"rot": np.eye(3)[None], "ind": [1, 2]}, protocol=2))
    np.testing.assert_array_equal(load_pickle_safely(ok)["rot"], np.eye(3)[None])
