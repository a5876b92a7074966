"""Random minibatches read from an image stack on demand, prefetched in a background thread.

:class:`MinibatchStream` iterates over ``Observations`` of ``batch_size`` images drawn
*without replacement within an epoch*: each epoch is a fresh permutation (``fold_in(key,
epoch)``) cut into consecutive batches, so every image is read exactly once per epoch. Only the
rows of the current batches are ever read (``images[idx]`` on a memory map, a
:class:`~cryosip.data.mrc.LazyImageStack` or any array-like with integer-array indexing), so
resident memory is bounded by ``(prefetch + 2) * batch_size`` images whatever the size of the
stack (``benchmarks/scaling.py`` measures the peak RSS for 1e4..1e6 images).

The last batch of an epoch is padded to ``batch_size`` with copies of its first images carrying
weight 0, so every batch has the same shape (one compiled flow step) and weighted objectives
(``KL``, ``PairedMMD``) see each image once per epoch. Batch rows are in increasing stack order
(sequential reads from the memory map).

Memory maps keep every page they have touched mapped into the process (counted in its RSS) until
the kernel needs the memory, and a fault maps a whole page-cache folio (measured here: ~1.7 MB
per randomly read 16 KB image). Streaming one epoch of a 1.6 GB stack through ``mm[idx]``
grew the peak RSS to 1.9 GB. So the stream reads a whole-file ``np.memmap`` (what
:func:`~cryosip.data.mrc.read_mrcs` returns) with ``os.preadv`` straight into the batch buffer
(consecutive rows coalesced): the file's pages go to the shared page cache, not to the
process. Other sources (a :class:`~cryosip.data.mrc.LazyImageStack`, transformed images) are
indexed as usual, and afterwards the pages of the read-only memory maps behind them are
dropped from the process (``madvise(MADV_DONTNEED)``; they stay in the page cache, nothing is
lost for a read-only map), so the RSS is bounded by one batch's folios.
``release_pages=False`` turns both off (plain ``images[idx]``).

``start`` skips the first ``start`` batches (a resumed run continues where its checkpoint
left off: the batches are a deterministic function of ``key``, so the position is a count).
With a ``sharding`` that spans several processes (``jax.distributed``), each process reads
only its own rows of every batch (:func:`cryosip.sip.sharding.process_rows`) and the batch is
assembled as one global array (:func:`cryosip.sip.sharding.global_rows`); every process must
iterate the same stream (same ``key``, ``batch_size`` and ``start``).

A reader thread fills a bounded queue of ``prefetch`` batches (converted to device arrays, with
an optional ``sharding`` for data-parallel flows); the consumer blocks only when the reader falls
behind. ``wait_seconds`` (consumer blocked) and ``read_seconds`` (reader busy) give the I/O part
of a step's time. Use as a context manager, or call :meth:`close`, to stop the thread.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import tempfile
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from ..sip.operator import Observations

logger = logging.getLogger(__name__)

__all__ = [
    "DiskRows",
    "MinibatchStream",
    "epoch_batches",
    "read_rows",
    "release_pages",
    "spill_rows",
]

_DONE = object()


def _read_only_maps(images, depth: int = 0):
    """The ``mmap`` objects of read-only memory maps behind an image source (np.memmap,
    LazyImageStack, TransformedImages or a wrapper with ``base``)."""
    if depth > 8 or images is None:
        return
    if isinstance(images, np.memmap):
        m = getattr(images, "_mmap", None)
        base = images
        while m is None and isinstance(getattr(base, "base", None), np.memmap):
            base = base.base
            m = getattr(base, "_mmap", None)
        if m is not None and getattr(images, "mode", None) == "r":
            yield m
        return
    for mm in getattr(images, "_maps", {}).values():  # LazyImageStack's open files
        yield from _read_only_maps(mm, depth + 1)
    yield from _read_only_maps(getattr(images, "base", None), depth + 1)


def _whole_file_map(images):
    """(path, offset, row dtype, row shape) if ``images`` is an np.memmap of a whole file region."""
    if not isinstance(images, np.memmap) or not isinstance(images.base, mmap.mmap):
        return None
    if images.filename is None or not images.flags.c_contiguous or images.ndim < 2:
        return None
    return images.filename, int(images.offset), images.dtype, tuple(images.shape[1:])


def _pread_rows(fd: int, offset: int, dtype, row_shape, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted) of a C-ordered array stored at ``offset`` in the file ``fd``."""
    out = np.empty((idx.shape[0],) + row_shape, dtype)
    row = out.itemsize * int(np.prod(row_shape))
    buf = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    for run in np.split(np.arange(idx.shape[0]), breaks):
        if run.size == 0:
            continue
        a, b = int(run[0]), int(run[-1]) + 1
        dst, pos = buf[a * row : b * row], offset + int(idx[a]) * row
        while len(dst):
            n = os.preadv(fd, [dst], pos)
            if n <= 0:
                raise OSError(f"short read at byte {pos}")
            dst, pos = dst[n:], pos + n
    return out


def release_pages(images) -> int:
    """Drop the pages of the read-only memory maps behind ``images`` from this process's RSS
    (they stay in the page cache); returns the number of maps advised."""
    n = 0
    for m in _read_only_maps(images):
        try:
            m.madvise(mmap.MADV_DONTNEED)
            n += 1
        except (
            AttributeError,
            OSError,
            ValueError,
        ):  # pragma: no cover - platform without madvise / closed
            pass
    return n


def read_rows(images, idx, *, chunk: int = 64) -> np.ndarray:
    """Rows ``idx`` of an image source as a float32 array that owns its memory, without leaving
    the source's file pages in this process's RSS.

    A whole-file ``np.memmap`` is read with ``os.preadv`` (as :class:`MinibatchStream` does);
    any other source (a :class:`~cryosip.data.mrc.LazyImageStack`, an in-memory array) is
    indexed ``chunk`` rows at a time and the pages of the read-only memory maps behind it are
    dropped after each chunk (:func:`release_pages`), so a read of rows spread over a large
    stack (a calibration pilot) costs its own size in RSS, not one page-cache folio per row."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    n = int(idx.shape[0])
    file = _whole_file_map(images)
    if file is not None:
        order = np.argsort(idx, kind="stable")
        path, offset, dtype, row_shape = file
        fd = os.open(path, os.O_RDONLY)
        try:
            rows = _pread_rows(fd, offset, dtype, row_shape, idx[order])
        finally:
            os.close(fd)
        out = np.empty((n,) + row_shape, np.float32)
        out[order] = rows
        return out
    parts = []
    for s in range(0, n, chunk):
        parts.append(np.array(images[idx[s : s + chunk]], np.float32))
        release_pages(images)
    if not parts:
        return np.empty((0,) + tuple(images.shape[1:]), np.float32)
    return np.concatenate(parts)


class DiskRows:
    """An array kept in an unlinked temporary file (gone when the object is) whose rows are read
    on demand with ``os.preadv``: ``rows[idx]`` is an in-memory array, and no page of the file
    stays in the process's RSS. ``np.asarray(rows)`` reads it all."""

    def __init__(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        self.shape, self.dtype = a.shape, a.dtype
        self._file = tempfile.TemporaryFile(prefix="cryosip-rows-")
        self._closer = weakref.finalize(self, self._file.close)  # the file goes with the object
        a.tofile(self._file)
        self._file.flush()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.arange(self.shape[0])[idx] if not isinstance(idx, np.ndarray) else idx
        idx = np.nonzero(idx)[0] if idx.dtype == bool else np.asarray(idx, np.int64)
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        rows = _pread_rows(self._file.fileno(), 0, self.dtype, self.shape[1:], flat[order])
        out = np.empty_like(rows)
        out[order] = rows
        return out.reshape(idx.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(self.shape[0])]
        return out if dtype is None else out.astype(dtype, copy=False)


def spill_rows(tree, min_rows: int = 1 << 16):
    """``tree`` (a pytree of arrays whose leading axis is the particles, e.g. a ``CryoNuisance``)
    with every array of at least ``min_rows`` rows held out of memory: one value shared by every
    row as a read-only broadcast view, the others as :class:`DiskRows`. What a streamed run keeps
    for each of N images (pose, shift, CTF, noise group: ~70 bytes an image) then no longer grows
    its memory with N; values are unchanged."""

    from .particles import shared_once

    def one(a):
        if not isinstance(a, np.ndarray) or a.ndim == 0 or a.shape[0] < min_rows:
            return a
        a = shared_once(a)
        return a if a.strides[0] == 0 else DiskRows(a)

    return jax.tree_util.tree_map(one, tree)


def epoch_batches(key: PRNGKeyArray, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Index and weight arrays (n_batches, batch_size) of one epoch: a permutation of ``range(n)``
    cut into batches, the last one padded with weight-0 repeats; rows sorted within each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = np.asarray(jax.random.permutation(key, n))
    n_batches = -(-n // batch_size)
    pad = n_batches * batch_size - n
    weight = np.ones(n_batches * batch_size, np.float32)
    if pad:
        last = perm[(n_batches - 1) * batch_size :]
        perm = np.concatenate([perm, np.resize(last, pad)])  # repeats of the last batch's images
        weight[n:] = 0.0
    idx = perm.reshape(n_batches, batch_size)
    weight = weight.reshape(n_batches, batch_size)
    order = np.argsort(idx, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(weight, order, axis=1)


class MinibatchStream:
    """An iterator of ``Observations`` minibatches read from ``stack`` on demand.

    ``stack``: a :class:`~cryosip.data.particles.ParticleStack` (images with known nuisances)
    or an ``(n, ...)`` array-like of observations (a memory map, a lazy stack), with their
    ``nuisance`` (a pytree of in-memory arrays with leading axis n) if known.
    ``n_epochs``: None streams forever. ``prefetch``: batches read ahead (queue bound).
    ``sharding``: a ``jax.sharding.Sharding`` for the batch arrays (e.g.
    :func:`cryosip.sip.sharding.data_sharding`), default the default device.
    ``release_pages``: drop read pages of read-only memory maps after each batch (above).
    ``start``: batches to skip (the stream position of a checkpoint; :attr:`position`).
    """

    def __init__(
        self,
        stack,
        batch_size: int,
        key: PRNGKeyArray,
        *,
        nuisance=None,
        n_epochs: int | None = None,
        prefetch: int = 2,
        sharding=None,
        release_pages: bool = True,
        start: int = 0,
    ):
        from .particles import ParticleStack

        if isinstance(stack, ParticleStack):
            if nuisance is not None:
                raise ValueError("a ParticleStack carries its own nuisances")
            self.images, self.nuisance = stack.images, stack.nuisance
        else:
            self.images, self.nuisance = stack, nuisance
        self.n_images = int(self.images.shape[0])
        if not 1 <= batch_size:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.batch_size = int(batch_size)
        self.key = key
        self.n_epochs = n_epochs
        self.prefetch = int(prefetch)
        self.sharding = sharding
        self.release_pages = bool(release_pages)
        self._file = _whole_file_map(self.images) if self.release_pages else None
        self._fd: int | None = None
        self.batches_per_epoch = -(-self.n_images // self.batch_size)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start_batch = int(start)
        self._local = None  # this process's rows of a batch, when the sharding spans processes
        if sharding is not None and not sharding.is_fully_addressable:
            from ..sip.sharding import process_rows

            self._local = process_rows(sharding, self.batch_size)
        self.rows_per_batch = self.batch_size if self._local is None else int(self._local.size)
        self.rows_read = 0
        self.wait_seconds = 0.0
        self.read_seconds = 0.0
        self.n_batches = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading ------------------------------------------------------------------------------
    def read(self, idx: np.ndarray, weight: np.ndarray | None = None) -> Observations:
        """One batch: the images and nuisances of rows ``idx`` (sorted for sequential reads).

        With a sharding over several processes, only this process's part of ``idx`` is read."""
        n_batch = idx.shape[0]
        w = np.ones(n_batch, np.float32) if weight is None else weight
        if self._local is not None:
            from ..sip.sharding import global_rows

            idx, w = idx[self._local], w[self._local]

            def put(a):
                return global_rows(self.sharding, a, n_batch)
        elif self.sharding is not None:

            def put(a):
                return jax.device_put(a, self.sharding)
        else:
            put = jnp.asarray
        self.rows_read += int(idx.shape[0])
        if self._file is not None:
            path, offset, dtype, row_shape = self._file
            if self._fd is None:
                self._fd = os.open(path, os.O_RDONLY)
            values = _pread_rows(self._fd, offset, dtype, row_shape, idx).astype(
                np.float32, copy=False
            )
        else:
            values = np.array(self.images[idx], np.float32)  # a copy: owns its memory
            if self.release_pages:
                release_pages(self.images)
        nuisance = None
        if self.nuisance is not None:
            nuisance = jax.tree_util.tree_map(lambda a: put(np.asarray(a[idx])), self.nuisance)
        return Observations(put(values), nuisance, put(idx.astype(np.int32)), put(w))

    def _batches(self):
        epoch, first = divmod(self.start_batch, self.batches_per_epoch)
        while self.n_epochs is None or epoch < self.n_epochs:
            idx, w = epoch_batches(
                jax.random.fold_in(self.key, epoch), self.n_images, self.batch_size
            )
            for b in range(first, idx.shape[0]):
                yield idx[b], w[b]
            epoch, first = epoch + 1, 0

    def _reader(self):
        try:
            for idx, w in self._batches():
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                obs = self.read(idx, w)
                jax.block_until_ready(obs)
                self.read_seconds += time.perf_counter() - t0
                self._put(obs)
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item):
        """Queue ``item``, waiting while the queue is full, unless the stream is stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # ---- iteration ----------------------------------------------------------------------------
    def start(self) -> MinibatchStream:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._reader, name="cryosip-minibatch-reader", daemon=True
            )
            self._thread.start()
        return self

    def __iter__(self):
        return self.start()

    def __next__(self) -> Observations:
        if self._thread is None:
            self.start()
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.n_batches += 1
        return item

    @property
    def position(self) -> int:
        """Batches consumed since the start of the stream (``start`` included)."""
        return self.start_batch + self.n_batches

    @property
    def epoch(self) -> int:
        """Epochs completed by the consumer."""
        return self.position // self.batches_per_epoch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MinibatchStream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self._stop.set()
        except Exception:
            pass

    def __len__(self) -> int:
        if self.n_epochs is None:
            raise TypeError("an endless stream has no length")
        return max(0, self.n_epochs * self.batches_per_epoch - self.start_batch)
