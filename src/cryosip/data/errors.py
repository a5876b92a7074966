"""The project's own error type for bad input: one line naming the file and the problem."""

from __future__ import annotations

import os
from pathlib import Path


class CryosipInputError(ValueError):
    """Bad input data. ``str(e)`` is ``"<path>: <problem>"``; the CLI prints it and exits with 2."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")


def existing_file(path: str | os.PathLike, kind: str) -> Path:
    """``path`` as a Path if it is a non-empty file; else a :class:`CryosipInputError` saying
    that it is missing, a folder (not ``kind``, e.g. "a STAR file") or empty."""
    path = Path(path)
    if not path.exists():
        raise CryosipInputError(path, "file not found")
    if path.is_dir():
        raise CryosipInputError(path, f"is a folder, not {kind}")
    if path.stat().st_size == 0:
        raise CryosipInputError(path, "empty file")
    return path
