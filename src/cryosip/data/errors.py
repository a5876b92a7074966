"""The project's own error type for bad input: one line naming the file and the problem."""

from __future__ import annotations

import os


class CryosipInputError(ValueError):
    """Bad input data. ``str(e)`` is ``"<path>: <problem>"``; the CLI prints it and exits with 2."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{self.path}: {problem}")
