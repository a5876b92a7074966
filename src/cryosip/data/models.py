"""Conformation models by name (built-in) or from user structure files."""

from __future__ import annotations

import os

from .errors import CryosipInputError

BUILTIN = ("adk", "adk-ca", "dumbbell", "hinge", "square", "two-hinge")


def load_model(name: str, **kw):
    """``adk`` (all atoms), ``adk-ca`` (C-alpha), the toys, or a path to a multi-model PDB/mmCIF or trajectory."""
    if name == "adk":
        from .adk import adk_model

        return adk_model(ca_only=False, **kw)
    if name == "adk-ca":
        from .adk import adk_model

        return adk_model(ca_only=True, **kw)
    from ..conformations.toys import TOYS

    if name in TOYS:
        return TOYS[name](**kw)
    if os.path.exists(name):
        from ..conformations.path import PathModel
        from ..cryoem.atoms import AtomParameters
        from .structures import read_frames

        frames, elements = read_frames(name)[:2]
        return PathModel(frames, AtomParameters.from_elements(elements))
    raise CryosipInputError(name, f"not a built-in model ({', '.join(BUILTIN)}) and no such file")
