"""The ``--model`` options shared by commands that take a conformation model.

  --model NAME                 a built-in model: adk, adk-ca, dumbbell, hinge, square, two-hinge
  --model TRAJ [--topology T]  one multi-frame file: the path through its frames
  --model A.pdb B.pdb [C.pdb]  several single structures: the path through them, in order
  --atoms all|heavy|backbone|ca   atoms used (default all atoms in the files)
  --modes K                    K linear PCA modes (1 CV unit = 1 Angstrom RMS) instead of a path

See :mod:`cryosip.data.models` for what the CV means in each case.
"""

from __future__ import annotations

import argparse

from ..data.models import BUILTIN, MAX_MODES
from ..data.structures import ATOM_SELECTIONS


def _modes(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--modes takes an integer, got {text!r}") from None
    if not 1 <= k <= MAX_MODES:
        raise argparse.ArgumentTypeError(f"--modes must be 1 to {MAX_MODES}, got {k}")
    return k


def add_model_args(parser) -> None:
    """Add ``--model`` (required), ``--topology``, ``--atoms`` and ``--modes`` to ``parser``."""
    g = parser.add_argument_group("conformation model")
    g.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="NAME_OR_FILE",
        help=f"a built-in model ({', '.join(BUILTIN)}); or one multi-frame file (multi-model "
        "PDB/mmCIF, or a trajectory with --topology): the path through its frames; or two or "
        "more single-structure PDB/mmCIF files: the path through them in the order given "
        "(put --model after the particles file)",
    )
    g.add_argument(
        "--topology",
        default=None,
        metavar="FILE",
        help="topology (PSF, PDB, GRO, PRMTOP, TPR, ...) for a trajectory given to --model "
        "(DCD, XTC, TRR, ...)",
    )
    g.add_argument(
        "--atoms",
        choices=ATOM_SELECTIONS,
        default=None,
        help="atoms of the structure files to use (default all; hydrogens only with all); "
        "frames are superposed (Kabsch) on the first over these atoms",
    )
    g.add_argument(
        "--modes",
        type=_modes,
        default=None,
        metavar="K",
        help=f"K = 1..{MAX_MODES} linear modes by PCA of the frames (needs >= K+1 frames) "
        "instead of the path; one CV unit = 1 Angstrom RMS displacement over the atoms",
    )


def model_from_args(args):
    """``(model, description)`` from the parsed ``--model/--topology/--atoms/--modes``."""
    from ..data.models import load_model_with_description

    return load_model_with_description(
        args.model, topology=args.topology, atoms=args.atoms, modes=args.modes
    )
