"""The built-in AdK dataset: adenylate kinase along its closed -> open transition.

Source: the 98-frame DIMS trajectory shipped with MDAnalysisTests (CHARMM PSF + DCD,
3,341 atoms including hydrogens). Frame 0 is closed (1AKE-like), frame 97 open (4AKE-like);
frames are superposed on frame 0 by C-alpha and centred. The CV is the path coordinate
s = frame / 97 in [0, 1]. Elements come from the atom names (the PDB copies in
MDAnalysisTests have no element column; reading "CA" as calcium is a known trap).
Prepared once and cached as ``$CRYOSIP_CACHE/adk_v1.npz`` (default ``~/.cache/cryosip``).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

from .._atomic import atomic_path
from ..conformations.path import PathModel
from ..cryoem.atoms import AtomParameters

_NAME_TO_ELEMENT = {"C": "C", "H": "H", "N": "N", "O": "O", "S": "S", "P": "P"}


def cache_dir() -> Path:
    d = Path(os.environ.get("CRYOSIP_CACHE", Path.home() / ".cache" / "cryosip"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _prepare() -> dict[str, np.ndarray]:
    import MDAnalysis as mda
    from MDAnalysisTests.datafiles import DCD, PSF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u = mda.Universe(PSF, DCD)
        frames = np.stack([u.atoms.positions.copy() for _ in u.trajectory]).astype(np.float64)
    names = np.asarray(u.atoms.names).astype(str)
    elements = np.array([_NAME_TO_ELEMENT[n[0]] for n in names])
    resnames = np.asarray(u.atoms.resnames).astype(str)
    resids = np.asarray(u.atoms.resids)
    return {
        "frames": frames,
        "names": names,
        "elements": elements,
        "resnames": resnames,
        "resids": resids,
    }


@functools.cache
def load_adk_arrays() -> dict[str, np.ndarray]:
    """Frames (98, 3341, 3) in Angstrom with atom names, elements, residue names and ids (cached)."""
    path = cache_dir() / "adk_v1.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = _prepare()
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)
    return arrays


N_KNOTS = 8


def adk_model(
    ca_only: bool = False, bfactor_in_angstroms2: float = 0.0, smooth: bool = True
) -> PathModel:
    """The AdK closed->open path as a :class:`PathModel` (all atoms, or C-alpha only).

    The DIMS frames jitter: consecutive frames differ by 0.31-0.45 A C-alpha RMSD although the
    closed->open change is only 6.8 A, so the path through every frame is 37 A long and the
    images change by ~15% between CV nodes 1/32 apart. By default (``smooth=True``) the path is
    a least-squares cubic spline with 8 interior knots through the superposed frames (residual
    0.30 A RMSD, about the jitter; end-to-end change kept), which is smooth enough for the
    tabulated likelihood to interpolate between nodes. ``smooth=False`` passes through every frame.
    """
    a = load_adk_arrays()
    ca = a["names"] == "CA"
    sel = ca if ca_only else np.ones_like(ca)
    atoms = AtomParameters.from_elements(a["elements"][sel], bfactor_in_angstroms2)
    frames = a["frames"][:, sel]
    return PathModel(frames, atoms, superpose_on=ca[sel], n_knots=N_KNOTS if smooth else None)
