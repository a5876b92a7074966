"""Export particle subsets from a reconstruction: by CV range, by state probability, or by cluster.

Reads REC/posterior.npz and REC/particles_cv.star (or .cs), written by `cryosip reconstruct`,
and writes the selected rows with every input column kept (image paths are absolute, as in
particles_cv.*): a RELION STAR (--relion 3.1 or 5: optics + particles tables; 3.0: one table)
for a STAR input, a cryoSPARC .cs for a .cs input (--formats adds the other one), and a
cryoDRGN ind.pkl (0-based indices into the particle file given to reconstruct).

  --cv-range LO HI            images whose CV posterior mean lies in [LO, HI]
  --cv-range NAME LO HI       the same for one named CV (repeat for several; all must hold)
  --state LO HI --min-prob P  images whose posterior probability of LO <= CV <= HI is >= P
                              (NAME LO HI for several CVs: the box they span)
  --cluster K                 split the recovered distribution into K states (1-D: at the
                              density's deepest minima; d-D: weighted k-means) and write one
                              subset per state, each image to its most probable state
                              (--min-prob drops images less sure than that)

Examples:
  $ cryosip select rec/ --cv-range 0.6 1.0 --out open
  $ cryosip select rec/ --state 0 0.3 --min-prob 0.9 --relion 5 --out closed
  $ cryosip select rec/ --cluster 2 --out states        # states_cluster1.star, states_cluster2.star
  $ cryosip select rec_cs/ --cv-range 0 0.5 --formats cs star ind --out half
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..data.errors import CryosipInputError

logger = logging.getLogger(__name__)

FORMATS = ("star", "cs", "ind")


def add_args(p) -> None:
    p.add_argument("reconstruction", help="a folder written by `cryosip reconstruct`")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--cv-range",
        nargs="+",
        action="append",
        metavar="[NAME] LO HI",
        help="keep images whose CV posterior mean is in [LO, HI] (NAME for several CVs)",
    )
    mode.add_argument(
        "--state",
        nargs="+",
        action="append",
        metavar="[NAME] LO HI",
        help="keep images whose posterior probability of LO <= CV <= HI is >= --min-prob",
    )
    mode.add_argument(
        "--cluster", type=int, metavar="K", help="one subset per state of K found in the density"
    )
    p.add_argument(
        "--min-prob",
        type=float,
        default=None,
        help="with --state: minimum posterior probability (default 0.9); with --cluster: "
        "minimum probability of the assigned state (default 0: every image)",
    )
    p.add_argument(
        "--relion",
        choices=["3.0", "3.1", "5"],
        default="3.1",
        help="STAR style: 3.1 or 5 (optics + particles, `# version 30001/50001`) or 3.0",
    )
    p.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=None,
        help="what to write (default: the input's own format and ind)",
    )
    p.add_argument("--out", required=True, help="output prefix: OUT.star, OUT.cs, OUT_ind.pkl")


def _ranges(specs, cv_names, flag: str) -> dict[int, tuple[float, float]]:
    """``[[LO, HI]]`` or ``[[NAME, LO, HI], ...]`` -> {cv index: (lo, hi)}."""
    out = {}
    for spec in specs:
        if len(spec) == 2:
            if len(cv_names) != 1:
                raise CryosipInputError(
                    None, f"{flag} needs a CV name for {len(cv_names)} CVs: one of {cv_names}"
                )
            name, lo, hi = cv_names[0], *spec
        elif len(spec) == 3:
            name, lo, hi = spec
        else:
            raise CryosipInputError(None, f"{flag} takes LO HI or NAME LO HI, got {spec}")
        if name not in cv_names:
            raise CryosipInputError(None, f"{flag}: unknown CV {name!r} (one of {cv_names})")
        try:
            lo, hi = float(lo), float(hi)
        except ValueError:
            raise CryosipInputError(
                None, f"{flag}: LO and HI must be numbers, got {spec}"
            ) from None
        if not lo <= hi:
            raise CryosipInputError(None, f"{flag}: LO {lo} is above HI {hi}")
        out[cv_names.index(name)] = (lo, hi)
    return out


def _inside(x: np.ndarray, ranges: dict) -> np.ndarray:
    ok = np.ones(x.shape[0], bool)
    for j, (lo, hi) in ranges.items():
        ok &= (x[:, j] >= lo) & (x[:, j] <= hi)
    return ok


def _write_subset(rec: str, table: str, rows, prefix: str, formats, relion: str) -> list[str]:
    from ..data.outputs import (
        RELION_VERSION_LINES,
        write_cs_subset,
        write_ind_pkl,
        write_star_subset,
    )

    written = []
    src = os.path.join(rec, table) if table else None
    kind = "star" if table.endswith(".star") else ("cs" if table.endswith(".cs") else None)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for fmt in formats:
        if fmt == "ind":
            written.append(os.fspath(write_ind_pkl(f"{prefix}_ind.pkl", rows)))
            continue
        if kind is None:
            raise CryosipInputError(
                rec, f"no per-image particle table in this folder: cannot write .{fmt}"
            )
        path = f"{prefix}.{fmt}"
        if fmt == kind == "star":
            write_star_subset(path, src, rows, relion=relion)
        elif fmt == kind == "cs":
            write_cs_subset(path, src, rows)
        else:  # the other format, through the particle reader (cryosip columns are dropped)
            from ..data.cryosparc import write_cs
            from ..data.particles import read_particles
            from ..data.star import star_blocks, write_star_blocks

            sub = read_particles(src).take(np.asarray(rows, np.int64))
            if fmt == "cs":
                write_cs(path, sub)
            else:
                blocks, _ = star_blocks(
                    sub, version="3.0" if relion == "3.0" else "3.1", out_dir=os.path.dirname(path)
                )
                write_star_blocks(path, blocks, RELION_VERSION_LINES.get(relion))
        written.append(path)
    return written


def main(args) -> int:
    from .. import _atomic
    from ..analysis.posterior import read_posterior_npz

    rec = args.reconstruction
    npz = os.path.join(rec, "posterior.npz")
    if not os.path.isdir(rec):
        raise CryosipInputError(rec, "not a folder")
    if not os.path.exists(npz):
        raise CryosipInputError(
            npz,
            "missing: select needs the per-image posterior written by `cryosip reconstruct` "
            "(streamed runs do not write one)",
        )
    post = read_posterior_npz(npz)
    cv_names = post["cv_names"]
    table = post["table"]
    r = post["responsibilities"]
    r = r / np.maximum(r.sum(1, keepdims=True), 1e-30)
    pos = post["positions"]
    n = r.shape[0]
    kind = "star" if table.endswith(".star") else ("cs" if table.endswith(".cs") else None)
    formats = args.formats or ([kind] if kind else []) + ["ind"]
    formats = list(dict.fromkeys(formats))
    if args.min_prob is not None and not 0.0 <= args.min_prob <= 1.0:
        raise CryosipInputError(None, f"--min-prob must be in [0, 1], got {args.min_prob}")

    selections: list[tuple[str, np.ndarray, dict]] = []
    if args.cv_range:
        ranges = _ranges(args.cv_range, cv_names, "--cv-range")
        rows = np.nonzero(_inside(post["mean"], ranges))[0]
        crit = {"cv_range": {cv_names[j]: list(v) for j, v in ranges.items()}}
        selections.append((args.out, rows, crit))
    elif args.state:
        ranges = _ranges(args.state, cv_names, "--state")
        pmin = 0.9 if args.min_prob is None else args.min_prob
        prob = r @ _inside(pos, ranges).astype(np.float64)
        rows = np.nonzero(prob >= pmin - 1e-6)[0]
        crit = {"state": {cv_names[j]: list(v) for j, v in ranges.items()}, "min_prob": pmin}
        selections.append((args.out, rows, crit))
    else:
        from ..analysis.clusters import cluster_particles

        if args.cluster < 1:
            raise CryosipInputError(None, f"--cluster must be >= 1, got {args.cluster}")
        labels, cuts = cluster_particles(
            pos, post["weights"], args.cluster, post["lower"], post["upper"]
        )
        k = int(labels.max()) + 1
        if k < args.cluster:
            logger.warning("the distribution supports %d states, not %d", k, args.cluster)
        pc = r @ np.eye(k)[labels]  # (N, k): posterior probability of each state
        best = np.argmax(pc, axis=1)
        pmin = 0.0 if args.min_prob is None else args.min_prob
        sure = pc[np.arange(n), best] >= pmin - 1e-6
        w = post["weights"] / post["weights"].sum()
        for c in range(k):
            rows = np.nonzero((best == c) & sure)[0]
            m = labels == c
            crit = {
                "cluster": c + 1,
                "of": k,
                "population": float(w[m].sum()),
                "cv_mean": {
                    name: float(np.average(pos[m, j], weights=w[m] + 1e-300))
                    for j, name in enumerate(cv_names)
                },
                "min_prob": pmin,
            }
            if cuts is not None:
                crit["cuts"] = [float(x) for x in cuts]
            selections.append((f"{args.out}_cluster{c + 1}", rows, crit))

    report = []
    for prefix, rows, crit in selections:
        files = _write_subset(rec, table, rows, prefix, formats, args.relion)
        report.append({"prefix": prefix, "n_selected": int(len(rows)), "n_images": n, **crit})
        line = f"{prefix}: {len(rows)} of {n} images -> " + ", ".join(files)
        print(line)  # noqa: T201
    _atomic.write_json(f"{args.out}_selection.json", report)
    return 0
