"""Conformation models by name (built-in) or from the user's own structure files.

:func:`load_model_with_description` (the CLI's ``--model FILE [FILE ...]``) takes

- a built-in name: ``adk``, ``adk-ca``, ``dumbbell``, ``hinge``, ``square``, ``two-hinge``;
- one multi-frame file (multi-model PDB/mmCIF, or a trajectory: DCD/XTC/... with
  ``topology``, multi-frame XYZ, ...): the path through its frames (:class:`PathModel`,
  CV ``s = (frame - 1) / (F - 1)`` in [0, 1]);
- two or more single-structure files: the path through them in the order given (a straight
  line for two; file k, counted from 0, sits at ``s = k / (F - 1)``);
- with ``modes=K`` (1-4): K linear modes by PCA of the frames (one multi-frame file, or
  several files) instead of the path (:class:`LinearModes`); each mode is normalised so that
  one CV unit is a displacement of **1 Angstrom RMS** over the selected atoms, the CV is 0 at
  the mean structure and the box is the frames' range of each score plus 10% on either side.

``atoms`` selects ``all`` atoms in the files (the default), the ``heavy`` atoms, the
``backbone`` or the C-alphas (``ca``) first; the files must then list the same atoms in the
same order (names, residues, elements), and every frame is Kabsch-superposed on the first
over those atoms and centred on the first's centroid. Every problem with the input raises
:class:`CryosipInputError` naming the file (the CLI prints it as one line, exit code 2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CryosipInputError

__all__ = [
    "BUILTIN",
    "MAX_MODES",
    "builtin_model",
    "load_model",
    "load_model_with_description",
    "model_from_files",
]

BUILTIN = ("adk", "adk-ca", "dumbbell", "hinge", "square", "two-hinge")
MAX_MODES = 4
RANGE_MARGIN = 0.1  # LinearModes box: the frames' score range plus this fraction on each side

_TOY_MEANING = {
    "dumbbell": "separation of two blobs (Angstrom)",
    "hinge": "opening angle (degrees)",
    "square": "side length (Angstrom)",
    "two-hinge": "two hinge angles (degrees)",
}


def load_model(name: str | os.PathLike, **kw):
    """``adk`` (all atoms), ``adk-ca`` (C-alpha), the toys, or a path to a multi-frame file.

    Keywords go to the built-in model (e.g. ``bfactor_in_angstroms2``) or to
    :func:`model_from_files` (``topology``, ``atoms``, ``modes``).
    """
    return load_model_with_description(name, **kw)[0]


def load_model_with_description(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    topology: str | os.PathLike | None = None,
    atoms: str | None = None,
    modes: int | None = None,
    **kw,
):
    """``(model, description)`` for a built-in name or one or more structure files.

    ``description`` is one line saying what the CV means (see the module docstring). The
    structure options (``topology``, ``atoms``, ``modes``) are refused for built-in names.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise CryosipInputError(None, "--model needs a built-in name or structure files")
    names = [os.fspath(s) for s in specs]
    builtin = [n for n in names if n in BUILTIN and not os.path.exists(n)]
    if builtin:
        if len(names) > 1:
            raise CryosipInputError(
                builtin[0], "a built-in model cannot be combined with other --model values"
            )
        given = [
            flag
            for flag, v in (("--topology", topology), ("--atoms", atoms), ("--modes", modes))
            if v is not None
        ]
        if given:
            raise CryosipInputError(
                names[0],
                f"{'/'.join(given)} apply to structure files, not to the built-in model "
                "(use adk-ca for C-alpha AdK)",
            )
        model = builtin_model(names[0], **kw)
        return model, _describe_builtin(names[0], model)
    for n in names:
        if not os.path.exists(n):
            raise CryosipInputError(
                n, f"not a built-in model ({', '.join(BUILTIN)}) and no such file"
            )
    return model_from_files(names, topology=topology, atoms=atoms or "all", modes=modes, **kw)


def builtin_model(name: str, **kw):
    """The built-in conformation model ``name`` (one of :data:`BUILTIN`)."""
    if name not in BUILTIN:
        raise CryosipInputError(None, f"unknown model {name!r}; choose from {', '.join(BUILTIN)}")
    if name in ("adk", "adk-ca"):
        from .adk import adk_model

        return adk_model(ca_only=name == "adk-ca", **kw)
    from ..conformations.toys import TOYS

    return TOYS[name](**kw)


def _describe_builtin(name: str, model) -> str:
    lo, hi = np.asarray(model.lower), np.asarray(model.upper)
    box = ", ".join(f"{c} in [{a:g}, {b:g}]" for c, a, b in zip(model.cv_names, lo, hi))
    n = model.atoms.n_atoms
    if name in ("adk", "adk-ca"):
        what = "C-alpha" if name == "adk-ca" else "all"
        return (
            f"built-in {name}: AdK closed -> open path (98 DIMS frames, smoothed), {n:,} atoms "
            f"({what}), CV s = 0 closed, 1 open ({box})"
        )
    return f"built-in toy {name}: {n} pseudo-atoms, CV = {_TOY_MEANING[name]}, {box}"


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=-1))))


def _atom_parameters(s, bfactor_in_angstroms2: float):
    from ..cryoem.atoms import ELEMENT_TO_Z, AtomParameters
    from .structures import _atom_label

    try:
        return AtomParameters.from_elements(s.elements, bfactor_in_angstroms2)
    except ValueError:
        i = next(i for i, e in enumerate(s.elements) if str(e).strip().upper() not in ELEMENT_TO_Z)
        raise CryosipInputError(
            s.source,
            f"{_atom_label(s, i)} is element {s.elements[i]!r}, which has no tabulated "
            f"scattering factor (known: {', '.join(k.capitalize() for k in ELEMENT_TO_Z)}); "
            "remove it or choose atoms with --atoms",
        ) from None


def _arrow(names: list[str], limit: int = 5) -> str:
    if len(names) > limit:
        names = [*names[:2], "...", *names[-2:]]
    return " -> ".join(names)


def model_from_files(
    paths: Sequence[str | os.PathLike],
    *,
    topology: str | os.PathLike | None = None,
    atoms: str = "all",
    modes: int | None = None,
    bfactor_in_angstroms2: float = 0.0,
):
    """``(model, description)`` from structure files (see the module docstring for the forms).

    ``topology`` is used for the files that are not PDB/mmCIF (trajectories, XYZ, ...);
    ``atoms`` is one of ``all``, ``heavy``, ``backbone``, ``ca``; ``modes`` (1-4) builds
    :class:`LinearModes` by PCA instead of the path.
    """
    from ..conformations.modes import LinearModes, superpose_frames
    from ..conformations.path import PathModel
    from .structures import check_same_atoms, is_structure_file, read_structures, select_atoms

    paths = [Path(p) for p in paths]
    if not paths:
        raise CryosipInputError(None, "no structure files given")
    if modes is not None and not 1 <= int(modes) <= MAX_MODES:
        raise CryosipInputError(paths[0], f"--modes must be 1 to {MAX_MODES}, got {modes}")
    if topology is not None and all(is_structure_file(p) for p in paths):
        raise CryosipInputError(
            topology,
            "--topology is for trajectories/coordinate files (DCD, XTC, ...); PDB/mmCIF files "
            "carry their own atoms",
        )
    structs = [
        select_atoms(read_structures(p, topology=None if is_structure_file(p) else topology), atoms)
        for p in paths
    ]
    labels = [p.name for p in paths]
    if len(structs) == 1:
        ref = structs[0]
        if ref.n_frames < 2:
            raise CryosipInputError(
                paths[0],
                "holds a single structure; give two or more files (--model A.pdb B.pdb) or "
                "one multi-frame file (multi-model PDB/mmCIF, or a trajectory)",
            )
        frames = ref.coords
        source = f"{ref.n_frames} frames of {labels[0]}"
        if topology is not None and not is_structure_file(paths[0]):
            source += f" (topology {Path(topology).name})"
    else:
        for p, s in zip(paths, structs):
            if s.n_frames != 1:
                raise CryosipInputError(
                    p,
                    f"holds {s.n_frames} models/frames; give either one multi-frame file or "
                    "several single-structure files",
                )
        ref = structs[0]
        for s in structs[1:]:
            check_same_atoms(ref, s, selection=atoms)
        frames = np.concatenate([s.coords for s in structs])
        source = f"{len(structs)} structures ({_arrow(labels)})"
    atom_params = _atom_parameters(ref, bfactor_in_angstroms2)
    aligned = superpose_frames(frames)  # Kabsch on frame 0 over the selected atoms, centred
    n_frames, n = aligned.shape[:2]
    what = f"{n:,} atoms ({atoms})"
    steps = [_rmsd(aligned[i], aligned[i + 1]) for i in range(n_frames - 1)]
    if max(steps) < 1e-2:
        raise CryosipInputError(
            paths[-1],
            "every frame is the same structure after superposition (RMSD < 0.01 A): the CV "
            "would not change anything",
        )
    end_to_end = _rmsd(aligned[0], aligned[-1])

    if modes is not None:
        k = int(modes)
        if n_frames < k + 1:
            raise CryosipInputError(
                paths[0],
                f"--modes {k} needs at least {k + 1} frames for the PCA, got {n_frames}",
            )
        try:
            model = LinearModes.from_trajectory(
                aligned, atom_params, k, superpose=False, units="rms", margin=RANGE_MARGIN
            )
        except ValueError as e:
            raise CryosipInputError(paths[0], f"--modes {k}: {e}") from None
        centred = aligned - aligned.mean(0)
        total = float(np.sum(centred**2))
        scores = np.asarray(model.scores(aligned))  # Angstrom RMS
        explained = n * np.sum(scores**2, axis=0) / total
        lo, hi = np.asarray(model.lower), np.asarray(model.upper)
        box = ", ".join(f"z{i + 1} in [{a:.2f}, {b:.2f}]" for i, (a, b) in enumerate(zip(lo, hi)))
        var = " / ".join(f"{100 * v:.0f}%" for v in explained)
        description = (
            f"{k} linear mode{'s' if k > 1 else ''} by PCA of {source}, {what}, "
            f"CV z_k = displacement along PC k in Angstrom RMS over these atoms (0 = mean "
            f"structure), variance explained {var}, {box}"
        )
        return model, description

    model = PathModel(aligned, atom_params, superpose_on=None)
    if len(structs) == 1:
        cv = f"CV s = (frame - 1)/{n_frames - 1}: 0 = frame 1, 1 = frame {n_frames}"
    elif n_frames == 2:
        cv = f"CV 0 = {labels[0]}, 1 = {labels[1]}"
    else:
        pos = [f"{i / (n_frames - 1):.3g} = {lab}" for i, lab in enumerate(labels)]
        cv = "CV " + ", ".join(pos if n_frames <= 5 else [*pos[:2], "...", pos[-1]])
    description = f"path through {source}, {what}, {cv}, end-to-end RMSD {end_to_end:.1f} A"
    if n_frames > 2:
        description += f", path length {sum(steps):.1f} A"
    return model, description
