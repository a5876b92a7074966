"""User conformation models: multi-model PDB/mmCIF, MD trajectories, or two end structures.

PDB and mmCIF files are read with gemmi (every MODEL is a frame; the first alternative location
is kept). Anything else goes through MDAnalysis (``topology`` + trajectory, e.g. PSF + DCD,
GRO + XTC, or a single multi-frame file). Elements come from the file when it has them (the
PDB element column, mmCIF ``type_symbol``, the topology's ``elements``); when the column is
empty they are guessed from the atom names with MDAnalysis' guesser, never from gemmi's
name-alignment rule (which reads a misaligned ``CA`` as calcium and ``HG`` as mercury).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import CryosipInputError

logger = logging.getLogger(__name__)

__all__ = ["Structures", "read_structures", "read_end_structures", "guess_elements"]

_GEMMI_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


@dataclasses.dataclass(frozen=True)
class Structures:
    """Frames of one molecule: ``coords`` (F, n_atoms, 3) float32 Angstrom plus per-atom labels."""

    coords: np.ndarray
    elements: tuple[str, ...]
    names: tuple[str, ...]
    resnames: tuple[str, ...]
    resids: np.ndarray
    chains: tuple[str, ...]
    source: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.coords.shape[1])

    def select(self, mask) -> Structures:
        """Keep the atoms where ``mask`` is true (``s.select(np.array(s.elements) != "H")``)."""
        m = np.asarray(mask, bool)
        pick = lambda t: tuple(np.asarray(t, dtype=object)[m].tolist())  # noqa: E731
        return dataclasses.replace(
            self,
            coords=self.coords[:, m],
            elements=pick(self.elements),
            names=pick(self.names),
            resnames=pick(self.resnames),
            resids=self.resids[m],
            chains=pick(self.chains),
        )


def guess_elements(names, resnames=None) -> list[str]:
    """Element symbols from atom names with MDAnalysis' guesser (``CA`` -> C, ``HG1`` -> H)."""
    try:
        from MDAnalysis.guesser.default_guesser import DefaultGuesser

        guess = DefaultGuesser(None).guess_atom_element
    except ImportError:  # MDAnalysis < 2.8
        from MDAnalysis.topology.guessers import guess_atom_element as guess
    out = []
    for name in names:
        e = str(guess(str(name).strip())).strip().upper()
        out.append(e.capitalize() if len(e) > 1 else e)
    return out


def _pdb_has_elements(path: Path) -> bool:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            if line.startswith(("ATOM  ", "HETATM")):
                return len(line.rstrip("\n")) >= 78 and line[76:78].strip() != ""
    return False


def _read_gemmi(path: Path) -> Structures:
    import gemmi

    try:
        st = gemmi.read_structure(os.fspath(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError on malformed files
        raise CryosipInputError(
            path, f"cannot read structure ({str(e).splitlines()[0][:200] if str(e) else e})"
        ) from None
    st.remove_alternative_conformations()
    is_pdb = path.name.lower().split(".gz")[0].endswith((".pdb", ".ent"))
    trust_elements = not is_pdb or _pdb_has_elements(path)
    frames, labels = [], None
    for m, model in enumerate(st):
        xyz, lab = [], []
        for chain in model:
            for res in chain:
                for atom in res:
                    xyz.append(atom.pos.tolist())
                    lab.append(
                        (
                            atom.element.name if trust_elements else "",
                            atom.name,
                            res.name,
                            res.seqid.num,
                            chain.name,
                        )
                    )
        if not xyz:
            continue
        if labels is None:
            labels = lab
        elif len(lab) != len(labels):
            raise CryosipInputError(
                path, f"model {m + 1} has {len(lab)} atoms but model 1 has {len(labels)}"
            )
        elif [x[1] for x in lab] != [x[1] for x in labels]:
            raise CryosipInputError(
                path, f"model {m + 1} lists its atoms in a different order than model 1"
            )
        frames.append(xyz)
    if not frames:
        raise CryosipInputError(path, "no atoms")
    elements, names, resnames, resids, chains = (list(t) for t in zip(*labels))
    if not trust_elements or any(e in ("", "X") for e in elements):
        guessed = guess_elements(names)
        elements = [
            g if not trust_elements or e in ("", "X") else e for e, g in zip(elements, guessed)
        ]
        logger.info("%s: no element column; elements guessed from atom names", path)
    return Structures(
        np.asarray(frames, np.float32),
        tuple(_norm_el(e) for e in elements),
        tuple(names),
        tuple(resnames),
        np.asarray(resids, np.int64),
        tuple(chains),
        os.fspath(path),
    )


def _norm_el(e: str) -> str:
    e = str(e).strip()
    return e[:1].upper() + e[1:].lower()


def _read_mdanalysis(path: Path, topology) -> Structures:
    import MDAnalysis as mda

    args = [os.fspath(topology), os.fspath(path)] if topology is not None else [os.fspath(path)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u = mda.Universe(*args)
    except Exception as e:  # ValueError for atom-count mismatch, OSError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = path if topology is None else f"{topology} + {path}"
        if "atoms" in msg.lower() and (
            "same number" in msg.lower() or "mismatch" in msg.lower() or "n_atoms" in msg
        ):
            raise CryosipInputError(
                where, f"atom count of the topology does not match the trajectory ({msg[:200]})"
            ) from None
        raise CryosipInputError(where, f"cannot read structure/trajectory ({msg[:200]})") from None
    atoms = u.atoms
    if len(atoms) == 0:
        raise CryosipInputError(path, "no atoms")
    names = [str(n) for n in atoms.names]
    if hasattr(atoms, "elements") and all(str(e).strip() for e in atoms.elements):
        elements = [_norm_el(e) for e in atoms.elements]
    else:
        elements = guess_elements(names)
    frames = np.empty((len(u.trajectory), len(atoms), 3), np.float32)
    for i, ts in enumerate(u.trajectory):
        frames[i] = atoms.positions
    resnames = (
        [str(r) for r in atoms.resnames] if hasattr(atoms, "resnames") else ["UNK"] * len(atoms)
    )
    resids = (
        np.asarray(atoms.resids, np.int64)
        if hasattr(atoms, "resids")
        else np.ones(len(atoms), np.int64)
    )
    chains = [str(c) for c in atoms.segids] if hasattr(atoms, "segids") else ["A"] * len(atoms)
    return Structures(
        frames,
        tuple(elements),
        tuple(names),
        tuple(resnames),
        resids,
        tuple(chains),
        os.fspath(path),
    )


def read_structures(
    path: str | os.PathLike, *, topology: str | os.PathLike | None = None
) -> Structures:
    """Frames ``(F, n_atoms, 3)`` from a multi-model PDB/mmCIF or a trajectory.

    With ``topology`` the file is read by MDAnalysis as ``Universe(topology, path)``; a topology
    whose atom count differs from the trajectory raises :class:`CryosipInputError`.
    """
    path = Path(path)
    for p in (path, topology):
        if p is not None and not Path(p).exists():
            raise CryosipInputError(p, "file not found")
        if p is not None and Path(p).stat().st_size == 0:
            raise CryosipInputError(p, "empty file")
    if topology is None and path.name.lower().endswith(_GEMMI_SUFFIXES):
        s = _read_gemmi(path)
    else:
        s = _read_mdanalysis(path, topology)
    if not np.isfinite(s.coords).all():
        raise CryosipInputError(path, "coordinates contain NaN or Inf")
    logger.info("%s: %d frame(s) of %d atoms", path, s.n_frames, s.n_atoms)
    return s


def read_end_structures(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    topology: str | os.PathLike | None = None,
) -> Structures:
    """Two end structures (first frame of each) as a 2-frame :class:`Structures`.

    The atom counts and names must match (same atoms in the same order).
    """
    a = read_structures(
        path_a,
        topology=topology
        if topology is not None and not str(path_a).lower().endswith(_GEMMI_SUFFIXES)
        else None,
    )
    b = read_structures(
        path_b,
        topology=topology
        if topology is not None and not str(path_b).lower().endswith(_GEMMI_SUFFIXES)
        else None,
    )
    if a.n_atoms != b.n_atoms:
        raise CryosipInputError(
            path_b,
            f"{b.n_atoms} atoms but {path_a} has {a.n_atoms}: the end structures must "
            "have the same atoms",
        )
    if list(a.names) != list(b.names):
        i = next(i for i, (x, y) in enumerate(zip(a.names, b.names)) if x != y)
        raise CryosipInputError(
            path_b,
            f"atom {i + 1} is {b.names[i]!r} but {a.names[i]!r} in {path_a}: atoms must "
            "be in the same order",
        )
    return dataclasses.replace(a, coords=np.stack([a.coords[0], b.coords[0]]))
