"""Atomic file writes: write to a temporary file in the same folder, then rename.

Files are published with the permissions a plain ``open(path, "w")`` would give them (0666
minus the umask, usually 0644), not the 0600 of :func:`tempfile.mkstemp`. JSON is strict:
NaN and infinities (also inside NumPy arrays and scalars) are written as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp, path) -> None:
    """Give a finished temporary file the usual permissions (0666 & ~umask) and move it to ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def temp_path(path, suffix: str = "") -> str:
    """A new empty temporary file next to ``path`` (the caller publishes or removes it)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(
        dir=d, prefix=f".{name}.", suffix=suffix or os.path.splitext(path)[1] or ".tmp"
    )
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path; on success it is published as ``path``, on error removed."""
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        publish(tmp, os.fspath(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def json_safe(obj):
    """``obj`` with NumPy values as Python ones and every non-finite float as ``None``."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, complex):
        raise TypeError(f"not JSON serialisable: {type(obj)}")
    return obj


def json_text(obj, *, indent: int | None = 2) -> str:
    """Strict JSON text (``allow_nan=False``) of ``obj`` after :func:`json_safe`."""
    return json.dumps(json_safe(obj), indent=indent, default=_default, allow_nan=False)


def write_json(path, obj) -> None:
    write_text(path, json_text(obj) + "\n")


def write_csv(path, df) -> None:
    with atomic_path(path, ".csv") as tmp:
        df.to_csv(tmp, index=False)


def savefig(fig, path, **kw) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", **kw)


def _default(o):
    import os as _os
    import pathlib

    if isinstance(o, (pathlib.PurePath,)):
        return _os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
