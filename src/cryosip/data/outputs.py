"""Results in forms other tools read: STAR with CV columns, CV subsets, latents, ensembles, maps.

* ``particles_cv.star``: the input particle table unchanged plus custom columns
  ``_cryosipCvMean`` / ``_cryosipCvSd`` (one CV) or ``_cryosipCvMean_<name>`` /
  ``_cryosipCvSd_<name>`` (several). The ``cryosip`` prefix keeps them apart from RELION's
  ``rln`` labels; RELION 3.1+ carries unknown labels along.
* CV subsets: one STAR file per CV bin with the original rows, ready for RELION re-refinement.
* ``z.pkl``: cryoDRGN-style per-particle latents, float32 (N, zdim).
* Ensembles: a multi-model PDB (weights in ``REMARK 250`` lines) or mmCIF (a
  ``_cryosip_model_weight`` loop), via gemmi.
* Maps: float32 MRC with the voxel size in the header and, by default, the origin at
  ``-(D // 2) * voxel_size`` so that the map overlays coordinates given relative to the box
  centre (the frame of :func:`cryosip.cryoem.volume.render_volume`).
* Heterogeneity-challenge submissions: K maps plus ``populations.txt`` (sums to 1).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from . import mrc
from .cryodrgn import write_pickle
from .particles import ParticleStack
from .star import star_blocks, write_star_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "write_particles_cv_star",
    "write_cv_subsets",
    "write_latent_pkl",
    "write_ensemble_pdb",
    "write_volume_mrc",
    "write_challenge",
    "cv_column_names",
]


def cv_column_names(cv_names=None, n_cv: int = 1) -> tuple[list[str], list[str]]:
    """STAR labels (without the underscore) of the CV mean and sd columns."""
    if n_cv == 1 and (cv_names is None or len(cv_names) == 1):
        return ["cryosipCvMean"], ["cryosipCvSd"]
    names = list(cv_names) if cv_names is not None else [str(i + 1) for i in range(n_cv)]
    if len(names) != n_cv:
        raise ValueError(f"{len(names)} CV names for {n_cv} CVs")
    clean = ["".join(c if (c.isalnum() or c == "_") else "_" for c in str(nm)) for nm in names]
    return [f"cryosipCvMean_{c}" for c in clean], [f"cryosipCvSd_{c}" for c in clean]


def _input_blocks(stack: ParticleStack) -> tuple[dict[str, pd.DataFrame], str | None]:
    """The particle table as it was read (STAR input), or as write_star would write it."""
    meta = stack.metadata
    if meta is not None and "rlnImageName" in meta.columns and len(meta) == len(stack):
        parts = meta.reset_index(drop=True).copy()
        if stack.optics is not None:
            return {"optics": stack.optics.copy(), "particles": parts}, "# version 30001"
        return {"": parts}, None
    return star_blocks(stack, version="3.1")


def _particle_key(blocks: dict) -> str:
    return "particles" if "particles" in blocks else next(iter(blocks))


def write_particles_cv_star(
    path: str | os.PathLike, stack: ParticleStack, cv_mean, cv_sd, cv_names=None
) -> Path:
    """The input STAR with per-particle CV posterior mean and sd as extra columns (atomic)."""
    cv_mean = np.asarray(cv_mean, np.float64)
    cv_sd = np.asarray(cv_sd, np.float64)
    if cv_mean.ndim == 1:
        cv_mean = cv_mean[:, None]
    if cv_sd.ndim == 1:
        cv_sd = cv_sd[:, None]
    n = len(stack)
    if cv_mean.shape[0] != n or cv_sd.shape != cv_mean.shape:
        raise ValueError(f"cv_mean {cv_mean.shape} and cv_sd {cv_sd.shape} must be ({n}, n_cv)")
    blocks, version_line = _input_blocks(stack)
    key = _particle_key(blocks)
    mean_cols, sd_cols = cv_column_names(cv_names, cv_mean.shape[1])
    table = blocks[key].drop(columns=[c for c in mean_cols + sd_cols if c in blocks[key].columns])
    for j, (m, s) in enumerate(zip(mean_cols, sd_cols)):
        table[m] = cv_mean[:, j]
        table[s] = cv_sd[:, j]
    blocks[key] = table
    return write_star_blocks(path, blocks, version_line)


def write_cv_subsets(
    prefix: str | os.PathLike, stack: ParticleStack, cv_mean, edges
) -> dict[int, Path]:
    """One STAR file per CV bin ``[edges[i], edges[i+1])`` (last bin closed) with the original rows.

    Files are ``{prefix}_cv{i:02d}.star``; empty bins are skipped. Returns ``{bin: path}``.
    """
    cv = np.asarray(cv_mean, np.float64)
    if cv.ndim == 2 and cv.shape[1] == 1:
        cv = cv[:, 0]
    if cv.shape != (len(stack),):
        raise ValueError(f"cv_mean must have one value per particle, got {cv.shape}")
    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or len(edges) < 2 or (np.diff(edges) <= 0).any():
        raise ValueError("edges must be an increasing 1-D array of at least two values")
    blocks, version_line = _input_blocks(stack)
    key = _particle_key(blocks)
    table = blocks[key]
    out = {}
    for i in range(len(edges) - 1):
        hi_ok = cv <= edges[i + 1] if i == len(edges) - 2 else cv < edges[i + 1]
        sel = (cv >= edges[i]) & hi_ok
        if not sel.any():
            logger.info("CV bin %d [%g, %g) is empty: no file written", i, edges[i], edges[i + 1])
            continue
        sub = dict(blocks)
        sub[key] = table[sel].reset_index(drop=True)
        out[i] = write_star_blocks(Path(f"{os.fspath(prefix)}_cv{i:02d}.star"), sub, version_line)
    return out


def write_latent_pkl(path: str | os.PathLike, z) -> Path:
    """cryoDRGN-style latents: a pickled float32 array (N, zdim)."""
    z = np.asarray(z, np.float32)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2:
        raise ValueError(f"latents must be (N, zdim), got {z.shape}")
    return write_pickle(path, z)


def _check_weights(weights, k: int) -> np.ndarray:
    w = np.asarray(weights, np.float64).ravel()
    if w.shape != (k,):
        raise ValueError(f"{w.shape[0]} weights for {k} models")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    if abs(w.sum() - 1.0) > 1e-3:
        raise ValueError(f"weights sum to {w.sum():.6f}, not 1")
    return w / w.sum()


def write_ensemble_pdb(
    path: str | os.PathLike, coords_list, weights, elements, names, resnames, resids, chains=None
) -> Path:
    """Multi-model PDB (mmCIF for ``.cif``) of K conformations with their weights (gemmi), atomic.

    ``coords_list`` is (K, n_atoms, 3) Angstrom; per-atom labels are shared by all models.
    Weights go into ``REMARK 250 MODEL k WEIGHT w`` lines (PDB) or a ``_cryosip_model_weight``
    loop (mmCIF).
    """
    import gemmi

    coords = np.asarray(coords_list, np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    k, n = coords.shape[:2]
    w = _check_weights(weights, k)
    labels = [list(elements), list(names), list(resnames), list(np.asarray(resids).tolist())]
    if any(len(x) != n for x in labels):
        raise ValueError(f"per-atom labels must have {n} entries")
    chains = ["A"] * n if chains is None else [str(c)[:4] or "A" for c in chains]
    st = gemmi.Structure()
    st.name = "cryosip_ensemble"
    for m in range(k):
        model = gemmi.Model(m + 1) if _model_takes_int() else gemmi.Model(str(m + 1))
        chain = None
        res = None
        for i in range(n):
            if chain is None or chain.name != chains[i]:
                model.add_chain(gemmi.Chain(chains[i]))
                chain = model[len(model) - 1]
                res = None
            if res is None or res.seqid.num != int(labels[3][i]) or res.name != str(labels[2][i]):
                r = gemmi.Residue()
                r.name = str(labels[2][i])
                r.seqid = gemmi.SeqId(int(labels[3][i]), " ")
                r.het_flag = "A"
                chain.add_residue(r)
                res = chain[len(chain) - 1]
            a = gemmi.Atom()
            a.name = str(labels[1][i])
            a.element = gemmi.Element(str(labels[0][i]))
            a.pos = gemmi.Position(*coords[m, i])
            a.occ = 1.0
            a.b_iso = 0.0
            res.add_atom(a)
        st.add_model(model)
    st.setup_entities()
    path = Path(path)
    if path.suffix.lower() in (".cif", ".mmcif"):
        doc = st.make_mmcif_document()
        block = doc.sole_block()
        loop = block.init_loop("_cryosip_model_weight.", ["model_id", "weight"])
        for m in range(k):
            loop.add_row([str(m + 1), f"{w[m]:.8f}"])
        text = doc.as_string()
    else:
        remarks = [f"REMARK 250 CRYOSIP ENSEMBLE OF {k} MODELS; WEIGHTS SUM TO 1"]
        remarks += [f"REMARK 250 MODEL {m + 1:6d} WEIGHT {w[m]:.8f}" for m in range(k)]
        opts = gemmi.PdbWriteOptions()
        opts.cryst1_record = False  # no unit cell: a 1 A P1 cell would mislead viewers
        opts.seqres_records = False
        text = "\n".join(remarks) + "\n" + st.make_pdb_string(opts)
    _atomic_text(path, text)
    return path


def _model_takes_int() -> bool:
    import gemmi

    try:
        gemmi.Model(1)
        return True
    except TypeError:
        return False


def read_ensemble_weights(path: str | os.PathLike) -> np.ndarray:
    """Weights written by :func:`write_ensemble_pdb` (PDB REMARK 250 lines or the mmCIF loop)."""
    path = Path(path)
    if path.suffix.lower() in (".cif", ".mmcif"):
        import gemmi

        block = gemmi.cif.read(os.fspath(path)).sole_block()
        return np.asarray([float(x) for x in block.find_loop("_cryosip_model_weight.weight")])
    w = []
    for line in path.read_text().splitlines():
        if line.startswith("REMARK 250 MODEL"):
            w.append(float(line.split("WEIGHT")[1]))
    return np.asarray(w)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_volume_mrc(
    path: str | os.PathLike, vol, voxel_size: float, *, origin_in_angstroms=None
) -> Path:
    """A float32 map with ``voxel_size`` in the header; origin ``-(D // 2) * voxel_size`` by default
    (voxel ``D // 2`` at 0 A, matching :func:`cryosip.cryoem.volume.render_volume`)."""
    vol = np.asarray(vol, np.float32)
    if origin_in_angstroms is None:
        origin_in_angstroms = tuple(-(d // 2) * float(voxel_size) for d in vol.shape[::-1])
    return mrc.write_volume_mrc(path, vol, voxel_size, origin_in_angstroms=origin_in_angstroms)


def write_challenge(
    out_dir: str | os.PathLike, volumes, populations, voxel_size: float
) -> list[Path]:
    """Heterogeneity-challenge submission: ``map_001.mrc`` ... and ``populations.txt``.

    ``populations`` must be non-negative and sum to 1 (within 1e-3; renormalised exactly). All
    files are written to a temporary folder first and moved into ``out_dir`` at the end.
    """
    vols = [np.asarray(v, np.float32) for v in volumes]
    p = _check_weights(populations, len(vols))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".challenge.", dir=out_dir))
    try:
        names = []
        for k, v in enumerate(vols):
            name = f"map_{k + 1:03d}.mrc"
            write_volume_mrc(tmpdir / name, v, voxel_size)
            names.append(name)
        (tmpdir / "populations.txt").write_text("".join(f"{x:.10f}\n" for x in p))
        names.append("populations.txt")
        out = []
        for name in names:
            os.replace(tmpdir / name, out_dir / name)
            out.append(out_dir / name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out
