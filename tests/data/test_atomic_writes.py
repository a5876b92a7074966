"""Every writer goes through ``cryosip._atomic``: files appear whole, with the permissions a plain
``open(path, "w")`` gives (0666 minus the umask, not ``mkstemp``'s 0600), and leave no temporary
file behind; a failed write leaves nothing."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from io_helpers import random_stack, save_images

from cryosip.data.cryodrgn import write_cryodrgn, write_pickle
from cryosip.data.cryosparc import write_cs
from cryosip.data.mrc import MrcsWriter, write_mrcs, write_volume_mrc
from cryosip.data.star import write_star
from cryosip.sip.flow import _Records, _State, save_checkpoint


def _usual_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_all(folder) -> list:
    stack = random_stack(n=4, box=8)
    names = save_images(folder / "stack.mrcs", stack)
    write_star(folder / "p.star", stack, image_names=names)
    write_cs(folder / "p.cs", stack, image_names=names)
    write_cryodrgn(folder / "drgn_", stack, ind=np.arange(4))
    write_pickle(folder / "obj.pkl", {"a": 1})
    write_mrcs(folder / "more.mrcs", np.zeros((2, 8, 8), np.float32), 1.5)
    write_volume_mrc(folder / "v.mrc", np.zeros((4, 4, 4), np.float32), 2.0)
    state = _State(np.zeros((3, 1), np.float32), np.zeros(3, np.float32), 5, 1.0, 0)
    records = _Records(np.zeros(2), np.zeros(2), np.zeros((2, 3, 1)), np.zeros((2, 3)))
    save_checkpoint(folder / "ck.npz", state, records)
    return sorted(p.name for p in folder.iterdir())


def test_every_writer_publishes_whole_files_with_the_usual_permissions(tmp_path):
    names = _write_all(tmp_path)
    assert names == sorted(
        [
            "stack.mrcs",
            "p.star",
            "p.cs",
            "drgn__ctf.pkl",
            "drgn__pose.pkl",
            "drgn__ind.pkl",
            "obj.pkl",
            "more.mrcs",
            "v.mrc",
            "ck.npz",
        ]
    )  # no temporary file left
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == _usual_mode(), name


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_volume_mrc(tmp_path / "v.mrc", np.full((4, 4, 4), np.nan, np.float32), 2.0)
    with pytest.raises(ValueError, match="1 of 2 images"):
        with MrcsWriter(tmp_path / "s.mrcs", 2, 8, 1.0) as w:
            w.write(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(AttributeError, match="pickle"):
        write_pickle(tmp_path / "f.pkl", lambda: 0)  # not picklable
    assert list(tmp_path.iterdir()) == []
