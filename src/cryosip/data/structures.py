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

__all__ = [
    "ATOM_SELECTIONS",
    "Structures",
    "check_same_atoms",
    "guess_elements",
    "read_end_structures",
    "read_structures",
    "select_atoms",
]

_GEMMI_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
# coordinate-only formats: no atom names or elements without a topology
_NEEDS_TOPOLOGY = (
    ".dcd", ".xtc", ".trr", ".tng", ".nc", ".ncdf", ".netcdf", ".mdcrd", ".crdbox", ".trj",
    ".inpcrd", ".restrt", ".ncrst", ".trz", ".h5md", ".dtr",
)  # fmt: skip


def is_structure_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PDB/mmCIF file (read by gemmi, carries its own atom names)."""
    return os.fspath(path).lower().endswith(_GEMMI_SUFFIXES)


def needs_topology(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a coordinate-only trajectory (DCD, XTC, ...) that needs a topology."""
    return os.fspath(path).lower().endswith(_NEEDS_TOPOLOGY)


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
    if topology is None and needs_topology(path):
        raise CryosipInputError(
            path,
            "a coordinate-only trajectory has no atom names or elements: give its topology "
            "with --topology (PSF, PDB, GRO, PRMTOP, TPR, ...)",
        )
    if topology is None and is_structure_file(path):
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

    The atoms must match (:func:`check_same_atoms`: same atoms in the same order).
    """
    a = read_structures(
        path_a,
        topology=topology if topology is not None and not is_structure_file(path_a) else None,
    )
    b = read_structures(
        path_b,
        topology=topology if topology is not None and not is_structure_file(path_b) else None,
    )
    check_same_atoms(a, b)
    return dataclasses.replace(a, coords=np.stack([a.coords[0], b.coords[0]]))


# ------------------------------------------------------------------ atom selections and checks

ATOM_SELECTIONS = ("all", "heavy", "backbone", "ca")
_BACKBONE_NAMES = frozenset(
    # protein N-CA-C-O, and the nucleic-acid sugar-phosphate backbone
    {"N", "CA", "C", "O", "P", "OP1", "OP2", "O1P", "O2P", "O5'", "C5'", "C4'", "C3'", "O3'"}
)
_HYDROGENS = frozenset({"H", "D"})


def select_atoms(s: Structures, atoms: str = "all") -> Structures:
    """Keep ``all`` atoms, the ``heavy`` ones (no H/D), the ``backbone`` or the C-alphas (``ca``).

    ``backbone`` is protein N, CA, C, O plus the nucleic-acid sugar-phosphate atoms (P, OP1,
    OP2, O5', C5', C4', C3', O3'); ``ca`` keeps atoms named CA that are carbon (a calcium ion
    named CA is not a C-alpha). Hydrogens are kept only by ``all``. An empty selection raises
    :class:`CryosipInputError`.
    """
    if atoms not in ATOM_SELECTIONS:
        raise CryosipInputError(
            s.source, f"unknown atom selection {atoms!r} (one of {', '.join(ATOM_SELECTIONS)})"
        )
    if atoms == "all":
        return s
    elements = np.asarray([e.upper() for e in s.elements], dtype=object)
    names = np.asarray([n.strip().upper() for n in s.names], dtype=object)
    heavy = ~np.isin(elements, list(_HYDROGENS))
    if atoms == "heavy":
        mask = heavy
    elif atoms == "backbone":
        mask = heavy & np.isin(names, list(_BACKBONE_NAMES))
    else:
        mask = (names == "CA") & (elements == "C")
    if not mask.any():
        raise CryosipInputError(
            s.source, f"no atoms left after --atoms {atoms} (of {s.n_atoms:,} atoms in the file)"
        )
    return s.select(mask)


def _atom_label(s: Structures, i: int) -> str:
    return f"atom {i + 1} ({s.chains[i]} {s.resnames[i]} {int(s.resids[i])} {s.names[i]})"


def check_same_atoms(ref: Structures, other: Structures, *, selection: str = "all") -> None:
    """Raise :class:`CryosipInputError` (naming ``other``'s file) unless both list the same atoms.

    Same atom count, and atom by atom the same atom name, residue name (so the same residue
    order) and element. Different residue numbers or chain ids alone are accepted (renumbered
    models of the same molecule), with a warning in the log.
    """
    where = f" ({selection})" if selection != "all" else ""
    n = min(ref.n_atoms, other.n_atoms)
    first = next(
        (
            i
            for i in range(n)
            if (ref.names[i], ref.resnames[i], ref.elements[i])
            != (other.names[i], other.resnames[i], other.elements[i])
        ),
        None,
    )
    if ref.n_atoms != other.n_atoms:
        diff = (
            f"; first difference at {_atom_label(other, first)} vs {_atom_label(ref, first)}"
            if first is not None
            else ""
        )
        raise CryosipInputError(
            other.source,
            f"{other.n_atoms:,} atoms{where} but {ref.source} has {ref.n_atoms:,}{diff}; "
            "the structures must list the same atoms (remove waters/ligands, or select "
            "with --atoms)",
        )
    if first is not None:
        i = first
        for what, a, b in (
            ("atom name", ref.names[i], other.names[i]),
            ("residue", ref.resnames[i], other.resnames[i]),
            ("element", ref.elements[i], other.elements[i]),
        ):
            if a != b:
                raise CryosipInputError(
                    other.source,
                    f"{_atom_label(other, i)} has {what} {b!r} but {a!r} in {ref.source}: "
                    "atoms must be the same and in the same order",
                )
    if not np.array_equal(ref.resids, other.resids) or ref.chains != other.chains:
        logger.warning(
            "%s: residue numbers or chain ids differ from %s (atoms and residues match)",
            other.source,
            ref.source,
        )
