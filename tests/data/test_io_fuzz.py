"""Fuzzing: any input to the STAR, .cs, MRC and pickle readers either parses or raises
CryosipInputError, and never makes cryosip allocate more than it holds (lying headers)."""

from __future__ import annotations

import atexit
import gzip
import io
import pickle
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cryosip.data.cryodrgn import load_pickle_safely, read_pose_pkl
from cryosip.data.cryosparc import read_cs
from cryosip.data.errors import CryosipInputError
from cryosip.data.mrc import LazyImageStack, read_mrcs, write_mrcs
from cryosip.data.star import read_star

_DIR = Path(tempfile.mkdtemp(prefix="cryosip_fuzz_"))
atexit.register(shutil.rmtree, _DIR, True)
write_mrcs(
    _DIR / "particles.mrcs", np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32), 2.0
)
_GOOD_MRC = (_DIR / "particles.mrcs").read_bytes()
BOUND = 64 << 20  # bytes: the most a lying input may make cryosip allocate


def _lie(raw: bytes, **fields) -> bytes:
    """``raw`` with MRC header int32 fields overwritten (nx, ny, nz, mode, mx, nsymbt)."""
    offsets = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "mx": 28, "nsymbt": 92}
    out = bytearray(raw)
    for k, v in fields.items():
        out[offsets[k] : offsets[k] + 4] = struct.pack("<i", v)
    return bytes(out)


# stacks whose headers lie: 10^9 images, 10^6 images in a 3-image file, a 4096-pixel box
(_DIR / "liar.mrcs").write_bytes(_lie(_GOOD_MRC, nz=10**9))
(_DIR / "liar2.mrcs").write_bytes(_lie(_GOOD_MRC, nz=10**6))
(_DIR / "liar3.mrcs").write_bytes(_lie(_GOOD_MRC, nx=4096, ny=4096))


def _bounded(fn):
    """Run ``fn``: only CryosipInputError (one line) may escape; peak allocation < BOUND."""
    tracemalloc.start()
    try:
        fn()
    except CryosipInputError as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < BOUND, f"peak allocation {peak / 2**20:.1f} MiB"


LABELS = [
    "rlnImageName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnOpticsGroup",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    "rlnCtfDataAreCtfPremultiplied",
    "rlnPhaseShift",
    "rlnClassNumber",
    "rlnFoo",
]
TOKENS = st.one_of(
    st.sampled_from(
        [
            "000001@particles.mrcs",
            "000003@particles.mrcs",
            "000004@particles.mrcs",
            "1@missing.mrcs",
            "000001@liar.mrcs",
            "000002@liar2.mrcs",
            "000001@liar3.mrcs",
            "@",
            "x@particles.mrcs",
            "0@particles.mrcs",
            "particles.mrcs",
            "nan",
            "inf",
            "-inf",
            '""',
            '"a b"',
            "1",
            "2",
            "0",
            "-1",
            "16",
            "8",
            "300",
            "2.7",
            "0.1",
            "1e308",
            "-1e308",
            "15000.5",
            "opticsGroup1",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 100).map(str),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6),
)


@st.composite
def star_texts(draw):
    parts = []
    if draw(st.booleans()):
        parts.append(f"# version {draw(st.sampled_from(['30001', '50001', '20000', 'abc', '']))}\n")
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["", "optics", "particles", "images", "micrographs", "x y"]))
        labels = draw(st.lists(st.sampled_from(LABELS), min_size=0, max_size=10, unique=True))
        parts.append(f"\ndata_{name}\n\n")
        if draw(st.booleans()):
            parts.append("loop_\n" + "".join(f"_{lab} #{i + 1}\n" for i, lab in enumerate(labels)))
            n_rows = draw(st.integers(0, 4))
            for _ in range(n_rows):
                width = len(labels) + draw(st.sampled_from([0, 0, 0, -1, 1]))
                parts.append(" ".join(draw(TOKENS) or "x" for _ in range(max(width, 0))) + "\n")
        else:
            for lab in labels:
                parts.append(f"_{lab} {draw(TOKENS) or 'x'}\n")
    return "".join(parts)


VALID31 = {
    "optics": {
        "rlnOpticsGroup": "1",
        "rlnVoltage": "300",
        "rlnSphericalAberration": "2.7",
        "rlnAmplitudeContrast": "0.1",
        "rlnImagePixelSize": "2.0",
        "rlnImageSize": "8",
        "rlnCtfDataAreCtfPremultiplied": "0",
    },
    "particles": {
        "rlnImageName": "000002@particles.mrcs",
        "rlnOpticsGroup": "1",
        "rlnDefocusU": "15000",
        "rlnDefocusV": "14000",
        "rlnDefocusAngle": "30",
        "rlnAngleRot": "10",
        "rlnAngleTilt": "20",
        "rlnAnglePsi": "30",
        "rlnOriginXAngst": "1.5",
        "rlnOriginYAngst": "-2",
    },
}


@st.composite
def mutated_star31(draw):
    """A valid RELION 3.1 file in which a few values/labels/lines are replaced or dropped."""
    out = ["# version 30001\n"] if draw(st.booleans()) else []
    for block, cols in VALID31.items():
        labels = [k for k in cols if draw(st.integers(0, 39)) > 0]  # sometimes drop a column
        out.append(
            f"\ndata_{block}\n\nloop_\n" + "".join(f"_{k} #{i + 1}\n" for i, k in enumerate(labels))
        )
        n_rows = (
            draw(st.integers(1, 3)) if block == "particles" else 1 + (draw(st.integers(0, 9)) == 0)
        )
        for _ in range(n_rows):
            vals = [
                draw(TOKENS) or "x" if draw(st.integers(0, 12)) == 0 else cols[k] for k in labels
            ]
            out.append("  ".join(vals) + "\n")
    return "".join(out)


def _check_star(text: str | bytes):
    with tempfile.NamedTemporaryFile(dir=_DIR, suffix=".star", delete=False) as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass"))
        path = Path(f.name)
    try:
        stack = read_star(path)
        np.asarray(
            stack.images[: min(2, len(stack))]
        )  # reading images also fails only with our error
    except CryosipInputError as e:
        assert "\n" not in str(e)
    finally:
        path.unlink()


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(star_texts())
def test_fuzz_star_structured(text):
    _check_star(text)


# found by this test: an image name the STAR parser reads as a float ("nan") was a traceback
_NAN_NAME = (
    "\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnSphericalAberration #2\n"
    "_rlnAmplitudeContrast #3\n_rlnImagePixelSize #4\n_rlnImageSize #5\n"
    "_rlnCtfDataAreCtfPremultiplied #6\n1  2.7  0.1  2.0  8  0\n\ndata_particles\n\nloop_\n"
    "_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnDefocusU #3\nnan  1  15000\n"
)


@_FUZZ
@example(_NAN_NAME)
@given(mutated_star31())
def test_fuzz_star_mutated(text):
    _check_star(text)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_star_bytes(data):
    _check_star(data)


def test_fuzz_star_valid_example_parses():
    text = (
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "_rlnImagePixelSize\n000002@particles.mrcs 15000 300 2.7 0.1 2.0\n"
    )
    path = _DIR / "valid.star"
    path.write_text(text)
    s = read_star(path)
    assert len(s) == 1 and s.box_size == 8 and not s.has_poses


CS_FIELDS = {
    "blob/path": st.sampled_from(
        [
            b"particles.mrcs",
            b">particles.mrcs",
            b"missing.mrcs",
            b"",
            b"\xff\xfe",
            b"liar.mrcs",
            b"liar2.mrcs",
            b"liar3.mrcs",
        ]
    ),
    "blob/idx": st.integers(-2, 5),
    "blob/shape": st.sampled_from([(8, 8), (16, 16), (8, 6), (4096, 4096), (0, 0)]),
    "blob/psize_A": st.one_of(st.floats(-1, 5), st.just(float("nan"))),
    "ctf/df1_A": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "ctf/df2_A": st.floats(0, 32768, width=32),
    "ctf/df_angle_rad": st.floats(-8, 8, width=32),
    "ctf/accel_kv": st.sampled_from([300.0, 200.0, np.nan]),
    "ctf/cs_mm": st.floats(0, 3, width=32),
    "ctf/amp_contrast": st.floats(0, 0.25, width=32),
    "alignments3D/pose": st.tuples(
        *[st.one_of(st.floats(-4, 4, width=32), st.just(float("nan")))] * 3
    ),
    "alignments3D/shift": st.tuples(*[st.floats(-10, 10, width=32)] * 2),
}
CS_VALID = {
    "blob/path": b">particles.mrcs",
    "blob/idx": 1,
    "blob/shape": (8, 8),
    "blob/psize_A": 2.0,
    "ctf/df1_A": 15000.0,
    "ctf/df2_A": 14000.0,
    "ctf/df_angle_rad": 0.5,
    "ctf/accel_kv": 300.0,
    "ctf/cs_mm": 2.7,
    "ctf/amp_contrast": 0.1,
    "alignments3D/pose": (0.1, 0.2, 0.3),
    "alignments3D/shift": (1.0, -1.0),
}
CS_DTYPES = {
    "blob/path": "S16",
    "blob/idx": "<i8",
    "blob/shape": ("<u4", (2,)),
    "blob/psize_A": "<f4",
    "ctf/df1_A": "<f4",
    "ctf/df2_A": "<f4",
    "ctf/df_angle_rad": "<f4",
    "ctf/accel_kv": "<f4",
    "ctf/cs_mm": "<f4",
    "ctf/amp_contrast": "<f4",
    "alignments3D/pose": ("<f4", (3,)),
    "alignments3D/shift": ("<f4", (2,)),
}


def _cs_dtype(names):
    """The structured dtype of a .cs file with the fields ``names``."""
    return [
        (k, *CS_DTYPES[k]) if isinstance(CS_DTYPES[k], tuple) else (k, CS_DTYPES[k]) for k in names
    ]


@st.composite
def cs_arrays(draw):
    names = draw(
        st.lists(
            st.sampled_from(sorted(CS_FIELDS)), unique=True, min_size=0, max_size=len(CS_FIELDS)
        )
    )
    complete = draw(st.booleans())
    if complete:
        names = sorted(CS_FIELDS)  # often a complete file, so that the value checks are reached
    n = draw(st.integers(0, 3))
    arr = np.zeros(n, dtype=_cs_dtype(names))
    for k in names:
        for i in range(n):
            # complete files: mostly valid values, sometimes a fuzzed one
            arr[k][i] = (
                draw(CS_FIELDS[k]) if not complete or draw(st.integers(0, 5)) == 0 else CS_VALID[k]
            )
    return arr


def _check_cs(payload: bytes):
    with tempfile.NamedTemporaryFile(dir=_DIR, suffix=".cs", delete=False) as f:
        f.write(payload)
        path = Path(f.name)
    try:
        stack = read_cs(path)
        np.asarray(stack.images[: min(2, len(stack))])
    except CryosipInputError as e:
        assert "\n" not in str(e)
    finally:
        path.unlink()


@_FUZZ
@given(cs_arrays())
def test_fuzz_cs_structured(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    _check_cs(buf.getvalue())


def test_cs_with_a_vanishing_pixel_size_is_one_clear_line():
    """Found by the fuzzer: two particles of 8 px at 2 A and 2.35e-14 A/px have no common
    working grid (a box of 0 px); that was a bare ValueError from the grid rule."""
    arr = np.zeros(2, dtype=_cs_dtype(sorted(CS_FIELDS)))
    for k in CS_FIELDS:
        arr[k] = CS_VALID[k]
    arr["blob/psize_A"] = [2.0, 2.3507499e-14]
    path = _DIR / "vanishing_pixel.cs"
    with open(path, "wb") as f:
        np.save(f, arr)
    try:
        read_cs(path)
    except CryosipInputError as e:
        assert "\n" not in str(e) and "vanishing_pixel.cs" in str(e)
        assert "no common working grid" in str(e)
    else:
        raise AssertionError("read_cs accepted particles with no common working grid")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_cs_bytes(data):
    _check_cs(b"\x93NUMPY" + data if data[:1] == b"\x00" else data)


# ----------------------------------------------------------------------------------------------
# lying STAR / .cs inputs under a memory bound


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["liar.mrcs", "liar2.mrcs", "liar3.mrcs", "particles.mrcs"]),
    st.integers(1, 2 * 10**9),
)
def test_fuzz_star_lying_stacks_bounded(stack, index):
    _bounded(lambda: _check_star(_STAR_ONE.format(name=f"{index:06d}@{stack}")))


_STAR_ONE = (
    "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnVoltage\n_rlnSphericalAberration\n"
    "_rlnAmplitudeContrast\n_rlnImagePixelSize\n{name} 15000 300 2.7 0.1 2.0\n"
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs_arrays())
def test_fuzz_cs_lying_stacks_bounded(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    _bounded(lambda: _check_cs(buf.getvalue()))


# ----------------------------------------------------------------------------------------------
# MRC headers: any int32 in the size fields


_INT32 = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 9, 4096, 4097, 10**8, 10**8 + 1, 10**9, -1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["nx", "ny", "nz", "mode", "mx", "nsymbt"]), _INT32, max_size=4
    ),
    st.sampled_from(["plain", "gzip", "truncated"]),
)
def test_fuzz_mrc_lying_headers(fields, variant):
    raw = _lie(_GOOD_MRC, **fields)
    if variant == "gzip":
        raw = gzip.compress(raw)
    elif variant == "truncated":
        raw = raw[: len(raw) - 100]
    suffix = ".mrcs.gz" if variant == "gzip" else ".mrcs"
    with tempfile.NamedTemporaryFile(dir=_DIR, suffix=suffix, delete=False) as f:
        f.write(raw)
        path = Path(f.name)

    def read():
        np.asarray(read_mrcs(path)[:2], np.float32)
        lazy = LazyImageStack([path], [0], [0], 8)
        np.asarray(lazy[0])

    try:
        _bounded(read)
    finally:
        path.unlink()


# ----------------------------------------------------------------------------------------------
# pickles: random bytes and mutated genuine cryoDRGN pickles


_ROT = np.stack([np.eye(3, dtype=np.float32)] * 2)
_GENUINE = [
    pickle.dumps(obj, protocol=p)
    for obj in (
        (_ROT, np.zeros((2, 2), np.float32)),
        np.ones((2, 9), np.float32),
        np.arange(3),
        np.float32(1.5),
    )
    for p in range(pickle.HIGHEST_PROTOCOL + 1)
]
_SAFE_TYPES = (tuple, list, dict, set, frozenset, int, float, complex, str, bytes, bytearray,
               bool, type(None), np.ndarray, np.generic)  # fmt: skip


def _check_loaded(obj, depth=0):
    assert isinstance(obj, _SAFE_TYPES), type(obj)
    if isinstance(obj, np.ndarray):
        assert not obj.dtype.hasobject
    if depth < 50 and isinstance(obj, (tuple, list, set, frozenset)):
        for v in obj:
            _check_loaded(v, depth + 1)
    if depth < 50 and isinstance(obj, dict):
        for k, v in obj.items():
            _check_loaded(k, depth + 1)
            _check_loaded(v, depth + 1)


def _check_pickle(payload: bytes):
    with tempfile.NamedTemporaryFile(dir=_DIR, suffix=".pkl", delete=False) as f:
        f.write(payload)
        path = Path(f.name)
    try:

        def load():
            _check_loaded(load_pickle_safely(path))
            read_pose_pkl(path)

        _bounded(load)
    finally:
        path.unlink()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"]))
def test_fuzz_pickle_bytes(data, proto):
    _check_pickle(proto + data)


@st.composite
def mutated_pickles(draw):
    raw = bytearray(draw(st.sampled_from(_GENUINE)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate", "big"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "set" and raw:
            raw[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=9))
        elif kind == "delete" and raw:
            del raw[i : i + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del raw[i:]
        elif kind == "big" and len(raw) >= i + 4:  # a huge length or shape where one was
            raw[i : i + 4] = struct.pack("<I", draw(st.sampled_from([2**31 - 1, 2**32 - 1, 10**9])))
    return bytes(raw)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_pickles())
def test_fuzz_pickle_mutated(payload):
    _check_pickle(payload)
