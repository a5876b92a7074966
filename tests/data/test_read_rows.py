"""read_rows: the rows of an image source, equal to plain indexing, without the file's pages."""

from __future__ import annotations

import numpy as np

from cryosip.data.streaming import read_rows


def test_read_rows_equals_indexing(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8, 8)).astype(np.float32)
    path = tmp_path / "stack.bin"
    a.tofile(path)
    mm = np.memmap(path, np.float32, mode="r", shape=a.shape)
    idx = np.array([7, 3, 3, 49, 0, 12, 13, 14])  # unsorted, repeated, consecutive runs
    for source in (mm, a):
        got = read_rows(source, idx, chunk=3)
        assert got.dtype == np.float32 and got.flags.owndata
        np.testing.assert_array_equal(got, a[idx])
    assert read_rows(mm, np.array([], np.int64)).shape == (0, 8, 8)
