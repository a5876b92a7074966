"""Fixtures for the I/O tests (helpers live in io_helpers.py)."""

from __future__ import annotations

import pytest
from io_helpers import random_stack, save_images


@pytest.fixture
def stack_on_disk(tmp_path):
    """(in-memory stack, image names) with the images in tmp_path/particles.mrcs."""
    stack = random_stack()
    names = save_images(tmp_path / "particles.mrcs", stack)
    return stack, names
