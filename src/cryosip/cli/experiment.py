"""Run a named experiment: a reproducible study that writes a CSV, plots and config.json.

The common options (--out, --seed/--seeds, --quick) may come before or after the name; every
other option goes to the experiment, whose own help is `cryosip experiment NAME -h`.
Experiments are the modules of cryosip.experiments (`-` in the name is `_` in the module);
a new module there is a new experiment, with no change to this command.

examples:
  $ cryosip experiment dto-consistency --quick --out dto-quick/    # a few minutes on a CPU
  $ cryosip experiment dto-consistency --out dto/                  # the study of docs/dto.md
  $ cryosip experiment dto-consistency --seeds 0,1,2 --ks 2,8,32 --n-images 1000 --out dto-small/
  $ cryosip experiment dto-consistency -h                          # the study's own options
"""

from __future__ import annotations

import argparse
import logging

from ..data.errors import CryosipInputError
from ._args import nonnegative_int

logger = logging.getLogger(__name__)


def add_args(parser: argparse.ArgumentParser) -> None:
    from .. import experiments

    names = experiments.available()
    parser.add_argument("name", help="the experiment: " + ", ".join(names))
    _add_common(parser)
    parser.add_argument(
        "options", nargs=argparse.REMAINDER, help="options passed to the experiment"
    )
    parser.epilog = "available experiments: " + ", ".join(names)


def _add_common(parser: argparse.ArgumentParser) -> None:
    from ..experiments import parse_seeds

    parser.add_argument("--out", default=None, help="output folder (default: ./NAME)")
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help="one seed (CLI default: the experiment's)",
    )
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="seeds, e.g. 0,1,2 or 0-4")
    parser.add_argument("--quick", action="store_true", help="a small version that runs in minutes")


def experiment_argv(args: argparse.Namespace) -> list[str]:
    """The argv an experiment's ``main`` receives: common options first, then the rest unchanged."""
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
    return int(module.main(argv) or 0)
