"""Run a named experiment: a reproducible study that writes a CSV, plots and config.json.

The common options (--out, --seed/--seeds, --quick) may come before or after the name; every
other option goes to the experiment, whose own help is `cryosip experiment NAME -h`.
Experiments are the modules of cryosip.experiments (`-` in the name is `_` in the module);
a new module there is a new experiment, with no change to this command. A study's flags are
generated from its `Settings` dataclass: `n_images` is `--n-images`, a tuple a comma-separated
list, a bool a switch; the help shows the default and the `--quick` value.

examples:
  $ cryosip experiment dto-consistency --quick --out dto-quick/    # a few minutes on a CPU
  $ cryosip experiment dto-consistency --out dto/                  # the study of docs/dto.md
  $ cryosip experiment dto-consistency --seeds 0,1,2 --ks 2,8,32 --n-images 1000 --out dto-small/
  $ cryosip experiment dto-consistency -h                          # the study's own options
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import types
import typing

from ..data.errors import CryosipInputError
from ._args import nonnegative_int

logger = logging.getLogger(__name__)


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


def _list_of(kind, what: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in str(text).split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from e

    parse.__name__ = f"parse_{what}"
    return parse


parse_ints = _list_of(int, "integers")  # "2,4,8" -> (2, 4, 8)
parse_floats = _list_of(float, "numbers")  # "0.1,0.01" -> (0.1, 0.01)
parse_names = _list_of(str, "names")  # "wgf-kl, em-grid" -> ("wgf-kl", "em-grid")
_LIST_PARSERS = {int: parse_ints, float: parse_floats, str: parse_names}


def add_args(parser: argparse.ArgumentParser) -> None:
    from .. import experiments

    names = experiments.available()
    parser.add_argument("name", help="the experiment: " + ", ".join(names))
    _add_common(parser)
    parser.add_argument(
        "options", nargs=argparse.REMAINDER, help="options passed to the experiment"
    )
    parser.epilog = "available experiments: " + ", ".join(names)


def _add_common(parser: argparse.ArgumentParser, out_help: str = "./NAME") -> None:
    parser.add_argument("--out", default=None, help=f"output folder (default: {out_help})")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--seed", type=nonnegative_int, default=None, help="one seed")
    g.add_argument("--seeds", type=parse_seeds, default=None, help="seeds, e.g. 0,1,2 or 0-4")
    parser.add_argument("--quick", action="store_true", help="a small version that runs in minutes")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_setting(parser, field: dataclasses.Field, kind, default, quick) -> None:
    """One flag for one settings field (its type, help, default and --quick value)."""
    meta = field.metadata
    name = field.name.replace("_", "-")
    shown = f"default {_show(default)}" + (f"; --quick {_show(quick)}" if quick != default else "")
    if kind is bool:
        flags = meta.get("flag") or (f"--no-{name}" if default else f"--{name}")
        parser.add_argument(
            *([flags] if isinstance(flags, str) else flags), dest=field.name, action="store_const", const=not default, default=None,
            help=meta["help"],
        )  # fmt: skip
        return
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    metavar = field.name.upper()
    if typing.get_origin(kind) is tuple:
        kind, metavar = _LIST_PARSERS[typing.get_args(kind)[0]], "A,B,..."
    flags = meta.get("flag") or f"--{name}"
    parser.add_argument(
        *([flags] if isinstance(flags, str) else flags),
        dest=field.name,
        type=kind,
        choices=meta.get("choices"),
        metavar=None if meta.get("choices") else metavar,
        default=None,
        help=f"{meta['help']} ({shown})",
    )


def settings_parser(name: str, module) -> argparse.ArgumentParser:
    """The command line of a study, generated from its ``Settings`` dataclass."""
    cls = module.Settings
    p = argparse.ArgumentParser(
        prog=f"cryosip experiment {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p, out_help=name)
    hints = typing.get_type_hints(cls)
    default, quick = cls(), cls.quick()
    for f in dataclasses.fields(cls):
        if f.name != "seeds":
            _add_setting(p, f, hints[f.name], getattr(default, f.name), getattr(quick, f.name))
    if hasattr(module, "replot"):
        p.add_argument(
            "--replot", action="store_true", help="only redraw the figures from --out's tables"
        )
    return p


def run_study(name: str, module, argv: list[str]) -> int:
    """Parse a study's options into its ``Settings`` and run it (or only redraw, ``--replot``)."""
    a = settings_parser(name, module).parse_args(argv)
    out = a.out or name
    if getattr(a, "replot", False):
        if not os.path.isdir(out):
            raise CryosipInputError(out, "no such folder: --replot redraws a finished run in --out")
        try:
            module.replot(out)
        except FileNotFoundError as e:
            raise CryosipInputError(
                e.filename, "not found: --replot redraws a finished run's tables in --out"
            ) from None
        return 0
    values = {f.name: getattr(a, f.name, None) for f in dataclasses.fields(module.Settings)}
    values["seeds"] = a.seeds if a.seeds is not None else (None if a.seed is None else (a.seed,))
    base = module.Settings.quick() if a.quick else module.Settings()
    module.run(out, base.given(**values))
    return 0


def experiment_argv(args: argparse.Namespace) -> list[str]:
    """The argv an experiment receives: common options first, then the rest unchanged."""
    rest = list(args.options or [])
    if rest[:1] == ["--"]:
        rest = rest[1:]
    # common options typed after the name end up in the remainder: pick them out
    common = argparse.ArgumentParser(prog="cryosip experiment", add_help=False)
    _add_common(common)
    late, rest = common.parse_known_args(rest)
    out = late.out if late.out is not None else args.out
    seeds = late.seeds if late.seeds is not None else args.seeds
    seed = late.seed if late.seed is not None else args.seed
    if seeds is None and seed is not None:
        seeds = (seed,)
    argv = ["--out", out if out is not None else args.name]
    if seeds is not None:
        argv += ["--seeds", ",".join(str(s) for s in seeds)]
    if args.quick or late.quick:
        argv.append("--quick")
    return argv + rest


def main(args: argparse.Namespace) -> int:
    from .. import experiments

    try:
        module = experiments.load(args.name)
    except KeyError:
        raise CryosipInputError(
            None,
            f"unknown experiment {args.name!r}; "
            f"available: {', '.join(experiments.available()) or '(none)'}",
        ) from None
    argv = experiment_argv(args)
    logger.info("experiment %s: %s", args.name, " ".join(argv))
    if hasattr(module, "Settings"):
        return run_study(args.name, module, argv)
    return int(module.main(argv) or 0)  # a study with a command line of its own
