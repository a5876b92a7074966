"""Reproducible studies, one module per experiment, run by ``cryosip experiment NAME``.

Adding an experiment needs no edit anywhere else: create ``cryosip/experiments/<name>.py``
(the CLI name is the module name with ``_`` written as ``-``) with

- a module docstring, whose first line is the summary ``cryosip experiment -h`` lists and
  whose whole text is the study's ``-h``;
- ``Settings``: a frozen dataclass subclassing :class:`._common.Settings`, one field per
  setting made by :func:`._common.setting` (default, help, ``--quick`` value); the command line
  is generated from it (:mod:`cryosip.cli.experiment`);
- ``run(out_dir, settings) -> pandas.DataFrame``: the study, writing its tables, figures and
  ``config.json`` into ``out_dir``; optionally ``replot(out_dir)`` (``--replot``).

What the studies share (the AdK scene, noise-free tables, scores, result tables, figure
plumbing) is in :mod:`._common`. Modules whose name starts with ``_`` are helpers, not
experiments.
"""

from __future__ import annotations

import importlib
import pkgutil


def available() -> list[str]:
    """The CLI names of the experiments in this package (sorted), without importing them."""
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    )


def module_name(name: str) -> str:
    """The module of a CLI name: ``dto-consistency`` -> ``cryosip.experiments.dto_consistency``."""
    return f"{__name__}.{name.replace('-', '_')}"


def load(name: str):
    """Import an experiment module by its CLI name (KeyError if there is none)."""
    if name not in available():
        raise KeyError(name)
    return importlib.import_module(module_name(name))


def summary(name: str) -> str:
    """The first line of an experiment's docstring (or why it cannot be imported)."""
    try:
        doc = load(name).__doc__ or ""
    except Exception as e:  # a broken module must not hide the others from the listing
        return f"(cannot import: {type(e).__name__}: {e})"
    return doc.strip().splitlines()[0] if doc.strip() else ""
