"""Results in forms other tools read: STAR with CV columns, CV subsets, latents, ensembles, maps.

* ``particles_cv.star``: the input particle table unchanged plus custom columns
  ``_cryosipCvMean`` / ``_cryosipCvSd`` (one CV) or ``_cryosipCvMean_<name>`` /
  ``_cryosipCvSd_<name>`` (several). The ``cryosip`` prefix keeps them apart from RELION's
  ``rln`` labels; RELION 3.1+ carries unknown labels along. ``image_names`` replace
  ``rlnImageName`` (e.g. absolute paths, so the file opens from any folder:
  :func:`absolute_image_names`).
* ``particles_cv.cs``: the input ``.cs`` array with every field kept plus ``cryosip/cv_mean``
  / ``cryosip/cv_sd`` (or ``cryosip/cv_mean_<name>`` ...) float32 fields; ``blob/path`` may be
  replaced (absolute paths).
* Subsets of such tables (``cryosip select``): :func:`write_star_subset` (RELION 3.0, 3.1 or
  5 style), :func:`write_cs_subset` and :func:`write_ind_pkl` (cryoDRGN index filter).
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

from .. import _atomic
from . import mrc
from .cryodrgn import write_pickle
from .particles import ParticleStack
from .star import star_blocks, write_star_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "write_particles_cv_star",
    "write_particles_cv_cs",
    "absolute_image_locations",
    "absolute_image_names",
    "cv_cs_field_names",
    "write_star_subset",
    "write_cs_subset",
    "write_ind_pkl",
    "write_cv_subsets",
    "write_latent_pkl",
    "write_ensemble_pdb",
    "ensemble_text",
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


def cv_cs_field_names(cv_names=None, n_cv: int = 1) -> tuple[list[str], list[str]]:
    """``.cs`` field names of the CV mean and sd (``cryosip/cv_mean`` or ``cryosip/cv_mean_<name>``)."""
    mean_cols, sd_cols = cv_column_names(cv_names, n_cv)
    conv = lambda c: (
        "cryosip/"
        + c.replace("cryosipCvMean", "cv_mean").replace(  # noqa: E731
            "cryosipCvSd", "cv_sd"
        )
    )
    return [conv(c) for c in mean_cols], [conv(c) for c in sd_cols]


def absolute_image_locations(stack: ParticleStack) -> tuple[list[str], np.ndarray] | None:
    """(absolute stack path, 0-based index) of every particle, or None when the images were not
    read from files (in-memory arrays)."""
    from .mrc import LazyImageStack, TransformedImages

    images = stack.images
    while isinstance(images, TransformedImages):
        images = images.base
    if not isinstance(images, LazyImageStack) or len(images) != len(stack):
        return None
    files, idx = images.locations()
    absolute = {f: os.path.abspath(f) for f in set(files)}
    return [absolute[f] for f in files], idx


def absolute_image_names(stack: ParticleStack) -> list[str] | None:
    """RELION ``000001@/abs/path/stack.mrcs`` names of the files the images were read from."""
    loc = absolute_image_locations(stack)
    if loc is None:
        return None
    return [f"{int(i) + 1:06d}@{p}" for p, i in zip(*loc)]


def _cv_arrays(stack_len: int, cv_mean, cv_sd) -> tuple[np.ndarray, np.ndarray]:
    cv_mean = np.asarray(cv_mean, np.float64)
    cv_sd = np.asarray(cv_sd, np.float64)
    if cv_mean.ndim == 1:
        cv_mean = cv_mean[:, None]
    if cv_sd.ndim == 1:
        cv_sd = cv_sd[:, None]
    if cv_mean.shape[0] != stack_len or cv_sd.shape != cv_mean.shape:
        raise ValueError(
            f"cv_mean {cv_mean.shape} and cv_sd {cv_sd.shape} must be ({stack_len}, n_cv)"
        )
    return cv_mean, cv_sd


def write_particles_cv_star(
    path: str | os.PathLike,
    stack: ParticleStack,
    cv_mean,
    cv_sd,
    cv_names=None,
    *,
    image_names: list[str] | None = None,
) -> Path:
    """The input STAR with per-particle CV posterior mean and sd as extra columns (atomic).

    ``image_names`` (one per particle) replace ``rlnImageName``.
    """
    n = len(stack)
    cv_mean, cv_sd = _cv_arrays(n, cv_mean, cv_sd)
    blocks, version_line = _input_blocks(stack)
    key = _particle_key(blocks)
    mean_cols, sd_cols = cv_column_names(cv_names, cv_mean.shape[1])
    table = blocks[key].drop(columns=[c for c in mean_cols + sd_cols if c in blocks[key].columns])
    if image_names is not None:
        if len(image_names) != n:
            raise ValueError(f"{len(image_names)} image names for {n} particles")
        table["rlnImageName"] = [str(s) for s in image_names]
    for j, (m, s) in enumerate(zip(mean_cols, sd_cols)):
        table[m] = cv_mean[:, j]
        table[s] = cv_sd[:, j]
    blocks[key] = table
    return write_star_blocks(path, blocks, version_line)


def _input_cs_array(stack: ParticleStack) -> np.ndarray:
    """The ``.cs`` array the stack was read from (every field as stored), else as write_cs writes it."""
    from .cryosparc import load_cs_array, write_cs

    n = len(stack)
    meta = stack.metadata
    src = stack.source
    if src is not None and str(src).lower().endswith(".cs") and os.path.isfile(src):
        arr = load_cs_array(src)
        same = (
            len(arr) == n
            and meta is not None
            and "blob/idx" in meta.columns
            and "blob/idx" in arr.dtype.names
            and np.array_equal(np.asarray(arr["blob/idx"]), meta["blob/idx"].to_numpy())
        )
        if same:
            return arr
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "particles.cs"
        write_cs(tmp, stack)
        return np.load(tmp, allow_pickle=False)


def _save_npy(path: Path, arr: np.ndarray) -> Path:
    with _atomic.atomic_path(path, ".tmp") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return path


def write_particles_cv_cs(
    path: str | os.PathLike,
    stack: ParticleStack,
    cv_mean,
    cv_sd,
    cv_names=None,
    *,
    image_paths: list[str] | None = None,
) -> Path:
    """The input ``.cs`` with every field kept plus float32 CV mean/sd fields (atomic).

    ``image_paths`` (one per particle) replace ``blob/path`` (``blob/idx`` is unchanged).
    """
    n = len(stack)
    cv_mean, cv_sd = _cv_arrays(n, cv_mean, cv_sd)
    base = _input_cs_array(stack)
    mean_f, sd_f = cv_cs_field_names(cv_names, cv_mean.shape[1])
    new_fields = set(mean_f + sd_f)
    descr = []
    for name in base.dtype.names:
        if name in new_fields:
            continue
        dt, shape = base.dtype.fields[name][0].base, base.dtype.fields[name][0].shape
        if name == "blob/path" and image_paths is not None:
            width = max(1, max(len(str(p).encode()) for p in image_paths))
            dt = np.dtype(f"S{width}")
        descr.append((name, dt, shape) if shape else (name, dt))
    for m, s in zip(mean_f, sd_f):
        descr += [(m, "<f4"), (s, "<f4")]
    out = np.zeros(n, dtype=descr)
    for name in base.dtype.names:
        if name not in new_fields:
            out[name] = base[name]
    if image_paths is not None:
        if len(image_paths) != n:
            raise ValueError(f"{len(image_paths)} image paths for {n} particles")
        out["blob/path"] = [str(p).encode() for p in image_paths]
    for j, (m, s) in enumerate(zip(mean_f, sd_f)):
        out[m] = cv_mean[:, j]
        out[s] = cv_sd[:, j]
    return _save_npy(Path(path), out)


RELION_VERSION_LINES = {"3.1": "# version 30001", "5": "# version 50001"}


def write_star_subset(
    path: str | os.PathLike, star_path: str | os.PathLike, rows, *, relion: str = "3.1"
) -> Path:
    """Rows ``rows`` (0-based) of the particle table of ``star_path``, every column kept.

    ``relion="3.1"`` or ``"5"``: ``data_optics`` + ``data_particles`` with a ``# version 30001``
    / ``50001`` line (a one-table 3.0 input is converted: optics groups, origins in Angstrom);
    ``"3.0"``: one table with per-particle optics (a 3.1 input is converted). Converting reads
    the input's stacks' headers, so its image names must resolve.
    """
    from .star import _read_blocks, read_star, star_blocks

    if relion not in ("3.0", "3.1", "5"):
        raise ValueError(f"relion must be '3.0', '3.1' or '5', got {relion!r}")
    star_path = Path(star_path)
    rows = np.asarray(rows, np.int64)
    blocks = _read_blocks(star_path)
    key = _particle_key(blocks)
    table = blocks[key]
    if rows.size and (rows.min() < 0 or rows.max() >= len(table)):
        raise ValueError(f"row indices out of range for {len(table)} particles")
    sub = table.iloc[rows].reset_index(drop=True)
    two_tables = "optics" in blocks and key == "particles"
    if two_tables == (relion != "3.0"):
        out = dict(blocks)
        out[key] = sub
        return write_star_blocks(path, out, RELION_VERSION_LINES.get(relion))
    # convert between the one-table (3.0) and the optics + particles (3.1+) layouts
    stack = read_star(star_path).take(rows)
    conv, _ = star_blocks(
        stack, version="3.0" if relion == "3.0" else "3.1", image_names=list(sub["rlnImageName"])
    )
    ckey = _particle_key(conv)
    extra = [c for c in sub.columns if not str(c).startswith("rln")]
    conv[ckey] = pd.concat([conv[ckey], sub[extra]], axis=1)
    return write_star_blocks(path, conv, RELION_VERSION_LINES.get(relion))


def write_cs_subset(path: str | os.PathLike, cs_path: str | os.PathLike, rows) -> Path:
    """Rows ``rows`` (0-based) of the ``.cs`` array ``cs_path``, every field kept (atomic)."""
    from .cryosparc import load_cs_array

    arr = load_cs_array(cs_path)
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(arr)):
        raise ValueError(f"row indices out of range for {len(arr)} particles")
    return _save_npy(Path(path), arr[rows])


def write_ind_pkl(path: str | os.PathLike, rows) -> Path:
    """cryoDRGN index filter: a pickled int64 array of 0-based particle indices."""
    return write_pickle(path, np.asarray(rows, np.int64))


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
    path = Path(path)
    fmt = "cif" if path.suffix.lower() in (".cif", ".mmcif") else "pdb"
    text = ensemble_text(coords_list, weights, elements, names, resnames, resids, chains, fmt=fmt)
    _atomic.write_text(path, text)
    return path


def ensemble_text(
    coords_list, weights, elements, names, resnames, resids, chains=None, *, fmt: str = "pdb"
) -> str:
    """The text :func:`write_ensemble_pdb` writes (``fmt`` ``"pdb"`` or ``"cif"``)."""
    import gemmi

    if fmt not in ("pdb", "cif"):
        raise ValueError(f"fmt must be 'pdb' or 'cif', got {fmt!r}")

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
    takes_int = _model_takes_int()  # gemmi >= 0.7 numbers models, older versions name them
    first = gemmi.Model(1) if takes_int else gemmi.Model("1")
    chain = None
    res = None
    for i in range(n):  # the hierarchy once; the other models are copies with their coordinates
        if chain is None or chain.name != chains[i]:
            first.add_chain(gemmi.Chain(chains[i]))
            chain = first[len(first) - 1]
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
        a.occ = 1.0
        a.b_iso = 0.0
        res.add_atom(a)
    for m in range(k):
        model = first.clone()
        if takes_int:
            model.num = m + 1
        else:  # pragma: no cover - gemmi < 0.7
            model.name = str(m + 1)
        xyz = coords[m].tolist()
        atoms = (a for ch in model for r in ch for a in r)  # the order they were added in
        for a, p in zip(atoms, xyz):
            a.pos = gemmi.Position(*p)
        st.add_model(model)
    st.setup_entities()
    if fmt == "cif":
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
    return text


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
