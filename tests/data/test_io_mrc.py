"""MRC stacks: chunked atomic writing, memory-mapped reading, lazy access, Fourier cropping."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryosip.data.errors import CryosipInputError
from cryosip.data.mrc import (
    LazyImageStack,
    MrcsWriter,
    fourier_crop,
    read_mrcs,
    read_volume_mrc,
    write_mrcs,
    write_volume_mrc,
)
from cryosip.data.particles import downsample, estimate_noise_sigma


def test_writer_chunks_header_and_mrcfile_agree(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(5, 16, 16)).astype(np.float32)
    path = tmp_path / "a.mrcs"
    with MrcsWriter(path, 5, 16, 1.25) as w:
        w.write(imgs[:2])
        w.write(imgs[2])
        w.write(imgs[3:])
    assert [p.name for p in tmp_path.iterdir()] == ["a.mrcs"]
    with mrcfile.open(path, permissive=False) as m:
        np.testing.assert_allclose(m.data, imgs, rtol=0, atol=0)
        np.testing.assert_allclose(float(m.voxel_size.x), 1.25, rtol=1e-6)
        assert int(m.header.ispg) == 0 and int(m.header.mz) == 1
        np.testing.assert_allclose(float(m.header.dmean), imgs.mean(), rtol=1e-5, atol=1e-6)
    mm = read_mrcs(path)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    np.testing.assert_allclose(np.asarray(mm), imgs, rtol=0, atol=0)


def test_writer_leaves_nothing_on_error_or_missing_images(tmp_path):
    path = tmp_path / "b.mrcs"
    with pytest.raises(RuntimeError):
        with MrcsWriter(path, 4, 8, 1.0) as w:
            w.write(np.zeros((2, 8, 8)))
            raise RuntimeError("simulated failure")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="2 of 4 images"):
        with MrcsWriter(path, 4, 8, 1.0) as w:
            w.write(np.zeros((2, 8, 8)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        with MrcsWriter(path, 2, 8, 1.0) as w:
            w.write(np.zeros((2, 6, 6)))
    with pytest.raises(ValueError, match="NaN"):
        with MrcsWriter(path, 1, 8, 1.0) as w:
            w.write(np.full((1, 8, 8), np.nan))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_read_any_mode(tmp_path, dtype):
    data = (np.arange(3 * 8 * 8) % 100).reshape(3, 8, 8).astype(dtype)
    path = tmp_path / "m.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 2.0
    np.testing.assert_allclose(
        np.asarray(read_mrcs(path), np.float64), data.astype(np.float64), rtol=0, atol=0
    )


def test_extended_header_is_skipped(tmp_path):
    data = np.random.default_rng(1).normal(size=(2, 8, 8)).astype(np.float32)
    path = tmp_path / "e.mrcs"
    with mrcfile.new(path) as m:
        m.set_extended_header(np.zeros(10, dtype=[("x", "<f4", (32,))]))
        m.set_data(data)
    np.testing.assert_allclose(read_mrcs(path), data, rtol=0, atol=0)


def test_truncated_and_empty_files(tmp_path):
    path = tmp_path / "t.mrcs"
    write_mrcs(path, np.zeros((4, 8, 8), np.float32), 1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CryosipInputError, match="truncated MRC file.*3 complete images") as e:
        read_mrcs(path)
    assert str(e.value).startswith(str(path))
    (tmp_path / "empty.mrcs").write_bytes(b"")
    with pytest.raises(CryosipInputError, match="empty file"):
        read_mrcs(tmp_path / "empty.mrcs")
    (tmp_path / "junk.mrcs").write_bytes(b"hello" * 10)
    with pytest.raises(CryosipInputError):
        read_mrcs(tmp_path / "junk.mrcs")


def test_lazy_stack_fancy_indexing_and_nan_check(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 8, 8)).astype(np.float32)
    b = rng.normal(size=(3, 8, 8)).astype(np.float32)
    write_mrcs(tmp_path / "a.mrcs", a, 1.0)
    write_mrcs(tmp_path / "b.mrcs", b, 1.0)
    raw = np.memmap(
        tmp_path / "b.mrcs", dtype="<f4", mode="r+", offset=1024, shape=b.shape
    )  # corrupt one pixel
    raw[1, 2, 3] = b[1, 2, 3] = np.inf
    raw.flush()
    del raw
    lazy = LazyImageStack(
        [tmp_path / "a.mrcs", tmp_path / "b.mrcs"], [1, 0, 0, 1, 0], [0, 3, 1, 2, 0], 8
    )
    assert lazy.shape == (5, 8, 8) and lazy.ndim == 3 and len(lazy) == 5
    np.testing.assert_allclose(lazy[1], a[3], rtol=0, atol=0)
    np.testing.assert_allclose(lazy[np.array([4, 1, 2])], a[[0, 3, 1]], rtol=0, atol=0)
    np.testing.assert_allclose(lazy[[True, False, False, True, False]], b[[0, 2]], rtol=0, atol=0)
    np.testing.assert_allclose(lazy[1:3, 0, :2], a[[3, 1], 0, :2], rtol=0, atol=0)
    bad = LazyImageStack([tmp_path / "b.mrcs"], [0, 0], [0, 1], 8)
    np.testing.assert_allclose(bad[0], b[0], rtol=0, atol=0)
    with pytest.raises(CryosipInputError, match="b.mrcs: image 2 contains NaN or Inf"):
        bad[np.arange(2)]
    with pytest.raises(IndexError):
        lazy[7]


def test_fourier_crop_keeps_values_and_low_frequencies():
    rng = np.random.default_rng(3)
    D, d = 32, 16
    const = np.full((1, D, D), 2.5, np.float32)
    np.testing.assert_allclose(fourier_crop(const, d), np.full((1, d, d), 2.5), rtol=1e-6)
    # a band-limited image: cropping then comparing on the coarse grid is exact
    yy, xx = np.mgrid[:D, :D]
    img = np.cos(2 * np.pi * 3 * xx / D) + 0.5 * np.sin(2 * np.pi * 2 * yy / D)
    small = fourier_crop(img[None], d)[0]
    np.testing.assert_allclose(small, img[::2, ::2], atol=1e-5)
    x = rng.normal(size=(2, D, D))
    np.testing.assert_allclose(fourier_crop(x, D), x.astype(np.float32), rtol=0, atol=0)
    with pytest.raises(ValueError):
        fourier_crop(x, 40)


def test_downsample_is_lazy_and_scales_pixel_size():
    from io_helpers import random_stack

    stack = random_stack(n=4, box=32, pixel_size=1.0)
    small = downsample(stack, 16)
    assert small.box_size == 16 and small.pixel_size == pytest.approx(2.0)
    assert not isinstance(small.images, np.ndarray)
    np.testing.assert_allclose(
        small.images[[2, 0]], fourier_crop(np.asarray(stack.images)[[2, 0]], 16), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(small.nuisance.shift_in_angstroms), np.asarray(stack.nuisance.shift_in_angstroms)
    )


def test_noise_sigma_from_background():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 2.0, (200, 32, 32)) + rng.normal(0, 5, (200, 1, 1))  # per-image offsets
    x[:, 10:22, 10:22] += 50.0  # a bright particle inside the mask
    np.testing.assert_allclose(estimate_noise_sigma(x, 0.45), 2.0, rtol=0.02)


def test_volume_mrc_voxel_size_and_origin(tmp_path):
    vol = np.random.default_rng(5).normal(size=(8, 8, 8)).astype(np.float32)
    write_volume_mrc(tmp_path / "v.mrc", vol, 1.75, origin_in_angstroms=(-7.0, -7.0, -7.0))
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert int(m.header.ispg) == 1
        np.testing.assert_allclose(float(m.voxel_size.z), 1.75, rtol=1e-6)
        np.testing.assert_allclose(
            [m.header.origin.x, m.header.origin.y, m.header.origin.z], [-7.0] * 3
        )
    data, vs = read_volume_mrc(tmp_path / "v.mrc")
    np.testing.assert_allclose(data, vol, rtol=0, atol=0)
    np.testing.assert_allclose(vs, 1.75, rtol=1e-6)


@pytest.mark.parametrize("compress", [None, "gzip", "bz2"])
def test_big_endian_and_compressed_stacks_read_like_mrcfile(tmp_path, compress):
    """Headers are parsed by cryosip (first 1024 bytes only): byte order from the machine
    stamp, and compressed stacks decompressed chunk by chunk, agree with mrcfile."""
    import bz2
    import gzip

    from cryosip.data.mrc import read_mrc_header

    data = np.random.default_rng(6).normal(size=(3, 8, 8)).astype(">f4")
    path = tmp_path / "be.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 1.5
    if compress is not None:
        raw = path.read_bytes()
        path = tmp_path / f"be.mrcs.{compress}"
        path.write_bytes(gzip.compress(raw) if compress == "gzip" else bz2.compress(raw))
    h = read_mrc_header(path)
    assert (int(h.nx), int(h.ny), int(h.nz), int(h.mode)) == (8, 8, 3, 2)
    np.testing.assert_allclose(float(h.cella.x) / int(h.mx), 1.5, rtol=1e-6)
    with mrcfile.open(path, permissive=True) as m:
        ref = np.asarray(m.data, np.float64)
    np.testing.assert_allclose(np.asarray(read_mrcs(path), np.float64), ref, rtol=0, atol=0)
    lazy = LazyImageStack([path], [0, 0], [2, 0], 8)
    np.testing.assert_allclose(lazy[:], ref[[2, 0]], rtol=0, atol=0)
