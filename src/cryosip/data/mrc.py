"""MRC2014 image stacks and volumes: memory-mapped reading, chunked atomic writing.

NumPy order is ``[n, y, x]``. Stacks are written in mode 2 (float32) with ``ispg = 0`` (image
stack) and the pixel size as voxel size (``cella / m``); volumes with ``ispg = 1``. Every writer
goes through a temporary file in the destination folder that is renamed into place only when
it is complete, so a failure never leaves a partial ``.mrcs`` behind.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "p.mrcs")
>>> with MrcsWriter(path, n_images=3, box_size=8, pixel_size=2.5) as w:
...     w.write(np.zeros((2, 8, 8), np.float32))
...     w.write(np.ones((1, 8, 8), np.float32))
>>> read_mrcs(path).shape, mrc_pixel_size(path)
((3, 8, 8), 2.5)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from .._atomic import atomic_path, publish, temp_path
from .errors import CryosipInputError, existing_file

logger = logging.getLogger(__name__)

__all__ = [
    "MrcsWriter",
    "read_mrcs",
    "write_mrcs",
    "read_mrc_header",
    "mrc_pixel_size",
    "fourier_crop",
    "LazyImageStack",
    "TransformedImages",
    "MissingImages",
    "AbstractImages",
    "write_volume_mrc",
    "read_volume_mrc",
]

_HEADER_BYTES = 1024


#: Largest image/volume edge accepted from a header (pixels). Headers are untrusted input:
#: anything larger is refused before anything is allocated.
MAX_BOX = 4096
#: Most sections (images) accepted in one MRC header.
MAX_IMAGES = 10**8
#: Most bytes a gzip/bzip2-compressed stack may announce (it is decompressed into memory).
MAX_DECOMPRESSED_BYTES = 8 << 30
#: deflate cannot compress better than 1032:1, so a gzip file announcing more is lying.
_GZIP_MAX_RATIO = 1032


def _open_raw(path: Path):
    """A binary stream of ``path``'s MRC bytes (decompressing gzip/bzip2 as it is read)."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if magic[:2] == b"\x1f\x8b":
        import gzip

        return gzip.open(path, "rb")
    if magic == b"BZh":
        import bz2

        return bz2.open(path, "rb")
    return open(path, "rb")


def _parse_header(raw: bytes):
    """The 1024-byte header as a NumPy record in the file's byte order (as mrcfile's permissive
    reader does: byte order from the machine stamp, swapped when the mode only makes sense so)."""
    header = np.frombuffer(raw, dtype=mrcfile.dtypes.HEADER_DTYPE).reshape(()).view(np.recarray)
    try:
        order = mrcfile.utils.byte_order_from_machine_stamp(header.machst)
    except ValueError:
        order = "<"
    header = header.copy()
    header.dtype = header.dtype.newbyteorder(order)
    try:
        mrcfile.utils.dtype_from_mode(header.mode)
    except ValueError:
        swapped = header.copy()
        swapped.dtype = swapped.dtype.newbyteorder()
        try:
            mrcfile.utils.dtype_from_mode(swapped.mode)
            header = swapped
        except ValueError:
            pass
    return header


def _data_nbytes(header, dtype: np.dtype) -> int:
    return int(header.nx) * int(header.ny) * int(header.nz) * dtype.itemsize


def read_mrc_header(path: str | os.PathLike, *, expected_box: int | None = None):
    """The validated MRC header (a NumPy record) of ``path``; errors are CryosipInputError.

    Headers are untrusted: only the first 1024 bytes are read (an extended header is skipped,
    never loaded), and a header is refused, in O(1), when its sizes are negative or absurd
    (an edge above :data:`MAX_BOX`, more than :data:`MAX_IMAGES` sections, a negative extended
    header), when the file is shorter than the header announces (uncompressed files: 1024 +
    extended header + ``nx * ny * nz * itemsize`` bytes), when a gzip file announces more than
    deflate can hold, or when ``expected_box`` is given and the images are not that size.
    """
    path = existing_file(path, "an MRC file")
    size = path.stat().st_size
    try:
        with _open_raw(path) as f:
            raw = f.read(_HEADER_BYTES)
    except Exception as e:  # OSError, EOFError, gzip/bz2 errors on corrupt streams
        raise CryosipInputError(
            path, f"not a readable MRC file ({type(e).__name__}: {e})"
        ) from None
    if len(raw) < _HEADER_BYTES:
        raise CryosipInputError(path, "not an MRC file (truncated header)")
    header = _parse_header(raw)
    nx, ny, nz, mode = int(header.nx), int(header.ny), int(header.nz), int(header.mode)
    if bytes(header.map)[:3] != b"MAP":
        # old (pre-2014) files may lack the MAP id; accept them only with a sane mode and size
        if mode not in (0, 1, 2, 6, 12) or min(nx, ny, nz) < 1:
            raise CryosipInputError(
                path, "not an MRC file (no 'MAP ' id and an implausible header)"
            )
    if min(nx, ny, nz) < 1:
        raise CryosipInputError(path, f"invalid dimensions nx={nx} ny={ny} nz={nz}")
    if max(nx, ny) > MAX_BOX:
        raise CryosipInputError(
            path, f"header announces {ny}x{nx}-pixel images (more than {MAX_BOX}): refused"
        )
    if nz > MAX_IMAGES:
        raise CryosipInputError(
            path, f"header announces {nz} images (more than {MAX_IMAGES}): refused"
        )
    nsymbt = int(header.nsymbt)
    if nsymbt < 0:
        raise CryosipInputError(path, f"negative extended header size {nsymbt}")
    if expected_box is not None and (nx != int(expected_box) or ny != int(expected_box)):
        raise CryosipInputError(
            path, f"has {ny}x{nx}-pixel images but the metadata says {int(expected_box)}"
        )
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except Exception:
        return header  # unsupported mode: reported by mrc_layout/read_mrcs when data is read
    if _is_compressed(path):
        expected = _HEADER_BYTES + nsymbt + _data_nbytes(header, dtype)
        if _is_gzip(path) and expected > _GZIP_MAX_RATIO * size + _HEADER_BYTES:
            raise CryosipInputError(
                path,
                f"header announces {expected} bytes but a {size}-byte gzip file cannot hold them",
            )
    else:
        _check_size(path, header, dtype, size)
    return header


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_size(path: Path, header, dtype: np.dtype, size: int) -> None:
    """Refuse an uncompressed file shorter than its header announces (a truncated stack, or a
    header that lies about the number or size of the images)."""
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    offset = _HEADER_BYTES + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        n_full = max(0, (size - offset) // (nx * ny * dtype.itemsize))
        raise CryosipInputError(
            path,
            f"truncated MRC file: header says {nz} images of {ny}x{nx} ({expected} bytes) but the "
            f"file has {size} bytes ({n_full} complete images)",
        )


def mrc_pixel_size(path: str | os.PathLike) -> float:
    """The x voxel size in Angstrom from the header (``cella.x / mx``); 0 when unset."""
    h = read_mrc_header(path)
    mx = int(h.mx)
    return float(h.cella.x) / mx if mx > 0 else 0.0


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh"


def read_mrcs(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an image stack (or a single image/volume) read-only as ``(n, y, x)``.

    Works for every mode mrcfile supports (int8, int16, uint16, float16, float32) and for
    extended headers. A truncated file or an unsupported mode raises :class:`CryosipInputError`.
    Gzip/bzip2-compressed files cannot be memory-mapped; they are decompressed into memory.
    """
    path = Path(path)
    if path.exists() and path.is_file() and path.stat().st_size > 0 and _is_compressed(path):
        return _read_compressed(path)
    dtype, offset, shape = mrc_layout(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _data_dtype(path: Path, header) -> np.dtype:
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except Exception as e:
        raise CryosipInputError(path, f"unsupported MRC mode {int(header.mode)} ({e})") from None
    if dtype.kind == "c":
        raise CryosipInputError(path, f"complex MRC mode {int(header.mode)} is not an image stack")
    return dtype


def _read_compressed(path: Path, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """Decompress a gzip/bzip2 stack into memory, chunk by chunk: memory grows with the data
    actually present (a header announcing more is a truncated file), never beyond what the
    header announces (trailing data is not decompressed), and never beyond
    :data:`MAX_DECOMPRESSED_BYTES`."""
    header = read_mrc_header(path)
    dtype = _data_dtype(path, header)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    nbytes = _data_nbytes(header, dtype)
    if nbytes > MAX_DECOMPRESSED_BYTES:
        raise CryosipInputError(
            path,
            f"compressed stack announces {nbytes / 2**30:.1f} GiB (more than "
            f"{MAX_DECOMPRESSED_BYTES / 2**30:.0f} GiB in memory): decompress it first",
        )
    skip = _HEADER_BYTES + int(header.nsymbt)
    chunks: list[bytes] = []
    got = 0
    try:
        with _open_raw(path) as f:
            while skip > 0:  # header and extended header, read and dropped in chunks
                b = f.read(min(skip, chunk_bytes))
                if not b:
                    break
                skip -= len(b)
            while got < nbytes and skip <= 0:
                b = f.read(min(nbytes - got, chunk_bytes))
                if not b:
                    break
                chunks.append(b)
                got += len(b)
    except Exception as e:  # corrupt gzip/bzip2 stream
        raise CryosipInputError(
            path, f"cannot read compressed MRC ({type(e).__name__}: {e})"
        ) from None
    if got < nbytes:
        n_full = got // (nx * ny * dtype.itemsize)
        raise CryosipInputError(
            path,
            f"truncated MRC file: header says {nz} images of {ny}x{nx} ({nbytes} data bytes) but "
            f"the compressed file holds {got} ({n_full} complete images)",
        )
    data = np.frombuffer(b"".join(chunks) if len(chunks) != 1 else chunks[0], dtype=dtype)
    return data.reshape(nz, ny, nx)


def mrc_layout(path: str | os.PathLike, header=None) -> tuple[np.dtype, int, tuple[int, int, int]]:
    """(dtype, data offset, (nz, ny, nx)) of an uncompressed MRC file, checking that the file holds
    all the data its header announces (a truncated file raises :class:`CryosipInputError`)."""
    path = Path(path)
    if header is None:
        header = read_mrc_header(path)
    dtype = _data_dtype(path, header)
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx < 1 or ny < 1 or nz < 1:
        raise CryosipInputError(path, f"invalid dimensions nx={nx} ny={ny} nz={nz}")
    _check_size(path, header, dtype, path.stat().st_size)
    return dtype, _HEADER_BYTES + int(header.nsymbt), (nz, ny, nx)


class MrcsWriter:
    """Write an ``(n_images, box_size, box_size)`` float32 stack chunk by chunk, atomically.

    Use as a context manager; call :meth:`write` with ``(m, D, D)`` chunks (or one ``(D, D)``
    image) until ``n_images`` have been written. On a clean exit the header (voxel size =
    ``pixel_size``, ``ispg = 0``, statistics) is finalised and the temporary file is renamed to
    ``path``; on an exception, or if fewer images were written than announced, the temporary
    file is deleted and ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, n_images: int, box_size: int, pixel_size: float):
        if int(n_images) < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        if int(box_size) < 1:
            raise ValueError(f"box_size must be >= 1, got {box_size}")
        if not float(pixel_size) > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        self.path = Path(path)
        self.n_images = int(n_images)
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self._tmp: Path | None = None
        self._mrc = None
        self._n = 0
        self._min = np.inf
        self._max = -np.inf
        self._sum = 0.0
        self._sumsq = 0.0

    @property
    def n_written(self) -> int:
        return self._n

    def open(self) -> MrcsWriter:
        self._tmp = Path(temp_path(self.path, ".tmp"))
        try:
            self._mrc = mrcfile.new_mmap(
                self._tmp,
                shape=(self.n_images, self.box_size, self.box_size),
                mrc_mode=2,
                overwrite=True,
            )
            self._mrc.set_image_stack()
        except BaseException:
            self.abort()
            raise
        return self

    def __enter__(self) -> MrcsWriter:
        return self.open()

    def write(self, chunk) -> None:
        """Append images ``(m, D, D)`` (or one ``(D, D)`` image)."""
        if self._mrc is None:
            raise RuntimeError("MrcsWriter is not open (use it as a context manager)")
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim == 2:
            chunk = chunk[None]
        if chunk.ndim != 3 or chunk.shape[1:] != (self.box_size, self.box_size):
            raise ValueError(
                f"chunk must be (m, {self.box_size}, {self.box_size}), got {chunk.shape}"
            )
        m = chunk.shape[0]
        if self._n + m > self.n_images:
            raise ValueError(f"writing {self._n + m} images into a stack of {self.n_images}")
        if m == 0:
            return
        if not np.isfinite(chunk).all():
            raise ValueError("chunk contains NaN or Inf pixels")
        self._mrc.data[self._n : self._n + m] = chunk
        self._n += m
        self._min = min(self._min, float(chunk.min()))
        self._max = max(self._max, float(chunk.max()))
        c64 = chunk.astype(np.float64)
        self._sum += float(c64.sum())
        self._sumsq += float((c64 * c64).sum())

    def close(self) -> Path:
        """Finalise the header and move the file into place (raises if images are missing)."""
        if self._mrc is None:
            raise RuntimeError("MrcsWriter is not open")
        if self._n != self.n_images:
            n = self._n
            self.abort()
            raise ValueError(
                f"{self.path}: {n} of {self.n_images} images written; nothing was saved"
            )
        try:
            h = self._mrc.header
            self._mrc.voxel_size = self.pixel_size
            npix = self.n_images * self.box_size * self.box_size
            mean = self._sum / npix
            h.dmin, h.dmax, h.dmean = self._min, self._max, mean
            h.rms = np.sqrt(max(self._sumsq / npix - mean * mean, 0.0))
            self._mrc.flush()
            self._mrc.close()
            self._mrc = None
            publish(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (the destination is not touched)."""
        if self._mrc is not None:
            try:
                self._mrc.close()
            except Exception:  # pragma: no cover - closing a broken mmap
                pass
            self._mrc = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
            self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.close()


def write_mrcs(
    path: str | os.PathLike, array, pixel_size: float, *, chunk_size: int = 4096
) -> Path:
    """Write an ``(n, D, D)`` array (or array-like accessor) as a float32 stack, atomically."""
    shape = tuple(array.shape)
    if len(shape) == 2:
        array = np.asarray(array)[None]
        shape = array.shape
    if len(shape) != 3:
        raise ValueError(f"expected (n, D, D) images, got shape {shape}")
    if shape[1] != shape[2]:
        raise ValueError(f"images must be square, got {shape[1:]}")
    with MrcsWriter(path, shape[0], shape[1], pixel_size) as w:
        for i in range(0, shape[0], chunk_size):
            w.write(np.asarray(array[i : i + chunk_size], np.float32))
    return Path(path)


def write_volume_mrc(
    path: str | os.PathLike,
    volume,
    voxel_size: float,
    origin_in_angstroms: tuple[float, float, float] | None = None,
) -> Path:
    """Write a cubic ``(z, y, x)`` volume (float32, ``ispg = 1``), atomically.

    The voxel size goes into ``cella``. ``origin_in_angstroms`` defaults to ``(0, 0, 0)`` with
    ``nxstart = nystart = nzstart = 0`` (the RELION/cryoSPARC convention: the map's centre is
    voxel ``D // 2``).
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise ValueError("volume contains NaN or Inf")
    path = Path(path)
    with atomic_path(path, ".tmp") as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.set_volume()
        mrc.voxel_size = float(voxel_size)
        o = (0.0, 0.0, 0.0) if origin_in_angstroms is None else origin_in_angstroms
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = (float(v) for v in o)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
        mrc.update_header_stats()
    return path


def read_volume_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A volume as a float32 array ``(z, y, x)`` and its voxel size."""
    data = np.asarray(read_mrcs(path), dtype=np.float32)
    return data, mrc_pixel_size(path)


# ----------------------------------------------------------------------------------------------
# Fourier cropping and lazy image access


def fourier_crop(images, box_size: int) -> np.ndarray:
    """Fourier-crop ``(n, D, D)`` images to ``(n, D', D')`` (``D' <= D``, both even or ``D' = D``).

    Keeps the centred ``D' x D'`` block of the centred DFT (DC at ``D // 2``) and rescales so
    that pixel values (e.g. a constant background) are unchanged; the pixel size grows by
    ``D / D'``. A shift in Angstrom is the same before and after.
    """
    images = np.asarray(images, dtype=np.float32)
    single = images.ndim == 2
    if single:
        images = images[None]
    D = images.shape[-1]
    if box_size == D:
        return images[0] if single else images
    if box_size > D or box_size < 2:
        raise ValueError(f"cannot Fourier-crop a {D}-pixel box to {box_size} pixels")
    if box_size % 2 or D % 2:
        raise ValueError(f"Fourier cropping needs even boxes, got {D} -> {box_size}")
    f = np.fft.fftshift(np.fft.fft2(images.astype(np.float64)), axes=(-2, -1))
    lo = D // 2 - box_size // 2
    f = f[..., lo : lo + box_size, lo : lo + box_size]
    out = np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1))).real * (box_size / D) ** 2
    out = out.astype(np.float32)
    return out[0] if single else out


def _normalise_index(key, n: int) -> tuple[np.ndarray, bool]:
    """Particle index (int, slice, int/bool array) -> (int64 array, was_scalar)."""
    if isinstance(key, (int, np.integer)):
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return np.array([i % n]), True
    if isinstance(key, slice):
        return np.arange(n)[key], False
    arr = np.asarray(key)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean index of shape {arr.shape} for {n} images")
        return np.nonzero(arr)[0], False
    if arr.dtype.kind not in "iu":
        raise IndexError(f"images can be indexed by integers, slices or masks, not {arr.dtype}")
    arr = arr.astype(np.int64).ravel()
    if arr.size and (arr.max() >= n or arr.min() < -n):
        raise IndexError(f"index out of range for {n} images")
    return arr % n if arr.size else arr, False


class AbstractImages:
    """An ``(n, D, D)`` float32 array-like read on demand: ``images[idx]`` with an int, slice,
    integer array or mask loads only those images; ``np.asarray(images)`` loads everything."""

    dtype = np.dtype(np.float32)
    ndim = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def _read(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def _take_index(self, idx) -> np.ndarray:
        """The particle indices of ``take(idx)`` (an int gives a one-image view)."""
        return _normalise_index(
            idx if not isinstance(idx, (int, np.integer)) else [idx], len(self)
        )[0]

    def _read_by_group(self, idx: np.ndarray, groups: np.ndarray, read_group) -> np.ndarray:
        """The images ``idx``, read one group at a time (``groups[i]``: the stack file or optics
        group of ``idx[i]``): ``read_group(k, idx[sel])`` for the positions ``sel`` of group ``k``
        returns ``(order, images)``, the images of ``idx[sel[order]]``."""
        D = self.box_size
        out = np.empty((idx.shape[0], D, D), np.float32)
        for k in np.unique(groups):
            sel = np.nonzero(groups == k)[0]
            order, chunk = read_group(int(k), idx[sel])
            out[sel[order]] = chunk
        return out

    @property
    def size(self) -> int:
        n, y, x = self.shape
        return n * y * x

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        idx, scalar = _normalise_index(key, self.shape[0])
        out = self._read(idx)
        if scalar:
            return out[0][rest] if rest else out[0]
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self):
        for i in range(self.shape[0]):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"


class LazyImageStack(AbstractImages):
    """Particle images spread over many MRC stacks, memory-mapped and read in chunks on demand.

    ``files[k]`` is a stack path, and particle ``i`` is image ``image_index[i]`` (0-based) of
    ``files[file_index[i]]``. Files whose box differs from ``box_size`` are Fourier-cropped to it
    as they are read. Every chunk is checked for NaN/Inf pixels (a
    :class:`CryosipInputError` naming the file and the 1-based image number).

    The constructor checks the indices against the files' headers, O(1) per file (one header
    read and a vectorised max per file, never per image): every referenced file must be a
    square MRC stack holding all the data its header announces, with at least
    ``max(image_index) + 1`` images, whose box equals ``file_boxes[k]`` (when given) and the
    box the metadata announces for its particles (``expected_boxes``: one int, or one per
    particle, e.g. a ``.cs`` file's ``blob/shape``). ``validate=False`` skips this (views of an
    already checked stack).
    """

    def __init__(
        self,
        files,
        file_index,
        image_index,
        box_size: int,
        *,
        file_boxes=None,
        check_finite: bool = True,
        max_open: int = 256,
        expected_boxes=None,
        validate: bool = True,
    ):
        self.files = [Path(f) for f in files]
        self.file_index = np.asarray(file_index, dtype=np.int32)
        self.image_index = np.asarray(image_index, dtype=np.int32)
        if self.file_index.shape != self.image_index.shape or self.file_index.ndim != 1:
            raise ValueError("file_index and image_index must be 1-D arrays of equal length")
        if self.file_index.size and (
            self.file_index.min() < 0 or self.file_index.max() >= len(self.files)
        ):
            raise ValueError(f"file_index out of range for {len(self.files)} files")
        self.box_size = int(box_size)
        if not 1 <= self.box_size <= MAX_BOX:
            raise ValueError(f"box_size must be in [1, {MAX_BOX}], got {self.box_size}")
        self.file_boxes = None if file_boxes is None else [int(b) for b in file_boxes]
        self.check_finite = check_finite
        self.max_open = max_open
        self._maps: dict[int, np.ndarray] = {}
        if validate:
            self._validate(expected_boxes)

    def _validate(self, expected_boxes) -> None:
        """Indices and boxes against the headers, one header read per referenced file."""
        n_files = len(self.files)
        top = np.full(n_files, -1, np.int64)
        low = np.zeros(n_files, np.int64)
        np.maximum.at(top, self.file_index, self.image_index)
        np.minimum.at(low, self.file_index, self.image_index)
        exp_lo = exp_hi = None
        if expected_boxes is not None:
            exp = np.asarray(expected_boxes, np.int64)
            if exp.ndim == 0:
                exp = np.broadcast_to(exp, self.file_index.shape)
            if exp.shape != self.file_index.shape:
                raise ValueError("expected_boxes must be one int or one per particle")
            exp_lo = np.full(n_files, np.iinfo(np.int64).max, np.int64)
            exp_hi = np.full(n_files, np.iinfo(np.int64).min, np.int64)
            np.minimum.at(exp_lo, self.file_index, exp)
            np.maximum.at(exp_hi, self.file_index, exp)
        for k in np.unique(self.file_index):
            f = self.files[k]
            if low[k] < 0:
                raise CryosipInputError(f, f"negative image index {int(low[k])} (0-based)")
            h = read_mrc_header(f)
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            if not _is_compressed(f):
                mrc_layout(f, h)  # unsupported modes and short files, before any read
            if nx != ny:
                raise CryosipInputError(f, f"images are not square ({ny}x{nx})")
            if top[k] >= nz:
                raise CryosipInputError(
                    f, f"image index {int(top[k]) + 1} out of range (stack has {nz} images)"
                )
            D = self.box_size
            if nx != D and (nx < D or nx % 2 or D % 2):
                raise CryosipInputError(
                    f, f"has {nx}-pixel images, which cannot be Fourier-cropped to {D} pixels"
                )
            if self.file_boxes is not None and self.file_boxes[k] > 0 and self.file_boxes[k] != nx:
                raise CryosipInputError(
                    f, f"has {nx}-pixel images but {self.file_boxes[k]} were expected"
                )
            if exp_lo is not None and not exp_lo[k] == exp_hi[k] == nx:
                bad = int(exp_lo[k]) if exp_lo[k] != nx else int(exp_hi[k])
                raise CryosipInputError(
                    f, f"has {nx}-pixel images but the metadata says {bad} for its particles"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.file_index.shape[0]), self.box_size, self.box_size)

    def _map(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is None:
            if len(self._maps) >= self.max_open:
                self._maps.pop(next(iter(self._maps)))
            m = self._maps[k] = read_mrcs(self.files[k])
        return m

    def locations(self) -> tuple[list[Path], np.ndarray]:
        """(stack path of each particle, 0-based image index of each particle)."""
        return [self.files[k] for k in self.file_index], self.image_index.copy()

    def take(self, idx) -> LazyImageStack:
        """A lazy view of a subset of the particles."""
        idx = self._take_index(idx)
        return LazyImageStack(
            self.files,
            self.file_index[idx],
            self.image_index[idx],
            self.box_size,
            file_boxes=self.file_boxes,
            check_finite=self.check_finite,
            max_open=self.max_open,
            validate=False,
        )

    def _read(self, idx: np.ndarray) -> np.ndarray:
        return self._read_by_group(idx, self.file_index[idx], self._read_file)

    def _read_file(self, k: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images ``idx`` (all in file ``k``) in file order, and where they go in ``idx``."""
        rows = self.image_index[idx]
        mm = self._map(k)
        if mm.shape[1] != mm.shape[2]:
            raise CryosipInputError(
                self.files[k], f"images are not square ({mm.shape[1]}x{mm.shape[2]})"
            )
        if rows.size and rows.max() >= mm.shape[0]:
            bad = int(rows.max())
            raise CryosipInputError(
                self.files[k],
                f"image index {bad + 1} out of range (stack has {mm.shape[0]} images)",
            )
        order = np.argsort(rows, kind="stable")
        chunk = np.asarray(mm[rows[order]], dtype=np.float32)
        if self.check_finite and not np.isfinite(chunk).all():
            bad = int(rows[order][np.nonzero(~np.isfinite(chunk).all(axis=(1, 2)))[0][0]])
            raise CryosipInputError(self.files[k], f"image {bad + 1} contains NaN or Inf pixels")
        if chunk.shape[-1] != self.box_size:
            chunk = fourier_crop(chunk, self.box_size)
        return order, chunk


class TransformedImages(AbstractImages):
    """``fn`` applied chunk by chunk to another image source (e.g. Fourier cropping)."""

    def __init__(self, base, fn, box_size: int):
        self.base = base
        self.fn = fn
        self.box_size = int(box_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.base.shape[0]), self.box_size, self.box_size)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(np.asarray(self.base[idx], np.float32)), np.float32)


class MissingImages(AbstractImages):
    """Stand-in for metadata without images (e.g. cryoDRGN pickles alone): reading raises."""

    def __init__(self, n: int, box_size: int, source: str | None = None):
        self.n = int(n)
        self.box_size = int(box_size)
        self.source = source

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.box_size, self.box_size)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        raise CryosipInputError(self.source, "no particle images were given with this metadata")
