"""cryosip command line: ``cryosip <command> [options]``; ``cryosip <command> -h`` for each."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..data.errors import CryosipInputError

# subcommand -> module in cryosip.cli; each module has a docstring (help), add_args(parser), main(args) -> int
COMMANDS = {
    "simulate": "simulate",
    "reconstruct": "reconstruct",
    "evaluate": "evaluate",
    "demo": "demo",
    "inspect": "inspect",
    "convert": "convert",
    "experiment": "experiment",
    "select": "select",
}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="cryosip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cryosip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(f"cryosip.cli.{modname}")
        except ModuleNotFoundError as e:
            if e.name == f"cryosip.cli.{modname}":
                continue  # command not built in this version
            raise
        doc = (mod.__doc__ or name).strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(_main=mod.main)
    return parser


def quiet_jax_backend_probe() -> None:
    """Silence JAX's probe warnings (``Unable to initialize backend 'tpu'``, ``An NVIDIA GPU may
    be present ... Falling back to cpu``): the command says itself what it runs on."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def log_backend(logger: logging.Logger) -> str:
    """Log once which backend JAX computes on, e.g. ``running on cpu (1 device)``."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform if devices else "unknown"
    n = len(devices)
    line = f"running on {platform} ({n} device{'s' if n != 1 else ''})"
    logger.info(line)
    return line


def enable_compilation_cache(logger: logging.Logger) -> str | None:
    """JAX's persistent compilation cache in ``$CRYOSIP_CACHE/jax`` (the package's cache folder,
    default ``~/.cache/cryosip``; ``CRYOSIP_JAX_CACHE=off`` disables it): a second run of a
    command compiles almost
    nothing (82.7 -> 4.9 s of compilation measured on the default reconstruct,
    ``benchmarks/README.md``). Results do not change: the cache holds compiled programs only."""
    import os

    import jax

    if os.environ.get("CRYOSIP_JAX_CACHE", "").strip().lower() in ("off", "0", "none"):
        return None
    root = os.environ.get("CRYOSIP_CACHE", os.path.join("~", ".cache", "cryosip"))
    where = os.path.join(os.path.expanduser(root), "jax")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:  # an unwritable home: run without the cache, say so once
        logger.info("no compilation cache (%s): every run compiles from scratch", e)
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    quiet_jax_backend_probe()
    logger = logging.getLogger("cryosip")
    try:
        enable_compilation_cache(logger)
        log_backend(logger)
        return int(args._main(args) or 0)
    except CryosipInputError as e:
        sys.stderr.write(f"cryosip {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"cryosip {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
