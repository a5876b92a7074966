"""Reproducible studies, one module per experiment, run by ``cryosip experiment NAME``.

Adding an experiment needs no edit anywhere else: create ``cryosip/experiments/<name>.py``
(the CLI name is the module name with ``_`` written as ``-``) with

- a module docstring, whose first line is the summary ``cryosip experiment -h`` lists;
- ``main(argv: list[str]) -> int``, the command line of the experiment.

The dispatcher (:mod:`cryosip.cli.experiment`) calls ``main`` with the common options first,
``--out DIR``, ``--seeds 0,1,2`` (only if given) and ``--quick`` (only if given), then every other
option the user typed, unchanged. :func:`common_parser` returns an ``argparse`` parser that
already accepts the common options; add the experiment's own options to it. Modules whose
name starts with ``_`` are helpers, not experiments.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re


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


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) -> (0, 1, 2[, 3, 4])."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            out.extend(range(int(m[1]), int(m[2]) + 1) if m else [int(part)])
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad seed {part!r} in {text!r}") from e
    if not out:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return tuple(out)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> (2, 4, 8)."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def common_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser with the options every experiment accepts: --out, --seed/--seeds, --quick."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=None, help="output folder (default: the experiment's name)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seed", type=int, default=None, help="one seed")
    g.add_argument("--seeds", type=parse_seeds, default=None, help="seeds, e.g. 0,1,2 or 0-4")
    p.add_argument(
        "--quick", action="store_true", help="a small version that runs in minutes on a CPU"
    )
    return p


def resolve(defaults: dict, **given) -> dict:
    """Every setting of ``defaults``, replaced by the given value where one is given (not None)."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(defaults)}")
    return {k: (v if given.get(k) is None else given[k]) for k, v in defaults.items()}


def seeds_from(args: argparse.Namespace) -> tuple[int, ...] | None:
    """The seeds chosen by ``--seed``/``--seeds`` (None: the experiment's default)."""
    if getattr(args, "seeds", None) is not None:
        return tuple(args.seeds)
    if getattr(args, "seed", None) is not None:
        return (int(args.seed),)
    return None
