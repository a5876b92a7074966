"""Sanity-check a particle set: counts, optics, defocus, poses/shifts, contrast flags, a montage.

Reads RELION STAR (3.0/3.1/5), cryoSPARC .cs, an .mrcs stack with cryoDRGN pickles, or cryoDRGN
pickles alone, and reports what cryosip will use (units after conversion: shifts in Angstrom,
rotations as RELION matrices).

  $ cryosip inspect Refine3D/job010/run_data.star
  $ cryosip inspect particles.star --json --datadir /data/project
  $ cryosip inspect J42_particles.cs --png first_particles.png
  $ cryosip inspect particles.mrcs --ctf ctf.pkl --pose pose.pkl
  $ cryosip inspect ctf.pkl --json
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from .. import _atomic
from ..data.cryosparc import CS_CTF_FIELDS
from ..data.errors import CryosipInputError
from ..data.mrc import MissingImages
from ._args import add_cryodrgn_args, positive_int, read_particles_from_args

logger = logging.getLogger(__name__)


def add_args(parser) -> None:
    parser.add_argument(
        "particles", help=".star, .cs, .mrcs/.mrc/.txt (with --ctf) or a cryoDRGN .pkl"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--datadir", help="folder holding the image stacks (if not found from the metadata path)"
    )
    parser.add_argument("--png", help="write a montage of the first particles to this PNG file")
    parser.add_argument(
        "--n-montage", type=positive_int, default=8, help="particles in the montage (default 8)"
    )
    parser.add_argument(
        "--box", type=positive_int, help="working box (Fourier crop) to report and show"
    )
    add_cryodrgn_args(parser, "cryoDRGN ctf.pkl (override, or the optics of an .mrcs)")
    parser.add_argument(
        "--check-all",
        action="store_true",
        help="read every image (finds NaN/Inf pixels and unreadable stacks; slow for big sets)",
    )


def _source_format(path: Path, stack) -> str:
    name = path.name.lower()
    if name.endswith(".star"):
        return "RELION STAR 3.1+" if stack.optics is not None else "RELION STAR 3.0"
    if name.endswith(".cs"):
        return "cryoSPARC .cs"
    if name.endswith(".pkl"):
        return "cryoDRGN pickles"
    return "MRC stack + cryoDRGN pickles"


def _shift_units(path: Path, stack) -> str:
    name = path.name.lower()
    meta = stack.metadata
    if not stack.has_shifts:
        return "none"
    if name.endswith(".star") and meta is not None:
        return (
            "A (rlnOriginX/YAngst)"
            if "rlnOriginXAngst" in meta.columns
            else "pixels (rlnOriginX/Y)"
        )
    if name.endswith(".cs"):
        return "pixels (alignments3D/shift)"
    return "fraction of the box (cryoDRGN trans)"


def _optics(stack) -> list[dict]:
    """One entry per optics group: its particles, native box and pixel size, optics, defocus."""
    ctf = stack.nuisance.ctf
    meta = stack.metadata
    n = len(stack)
    if meta is not None and "rlnOpticsGroup" in meta.columns:
        groups = np.asarray(meta["rlnOpticsGroup"]).astype(np.int64)
    elif stack.optics_group is not None:
        groups = stack.group_ids() + 1
    else:
        groups = np.ones(n, np.int64)
    names = {}
    if stack.optics is not None and {"rlnOpticsGroup", "rlnOpticsGroupName"} <= set(
        stack.optics.columns
    ):
        names = {
            int(g): str(nm)
            for g, nm in zip(stack.optics["rlnOpticsGroup"], stack.optics["rlnOpticsGroupName"])
        }
    grids = stack.grids()
    dfu = np.asarray(ctf.defocus_u_in_angstroms, np.float64)
    dfv = np.asarray(ctf.defocus_v_in_angstroms, np.float64)
    out = []
    for g in np.unique(groups):
        sel = groups == g
        i = int(np.nonzero(sel)[0][0])
        box = int(grids[i, 0])
        px = float(grids[i, 1])
        out.append(
            {
                "group": int(g),
                "name": names.get(int(g), f"opticsGroup{int(g)}"),
                "n_particles": int(sel.sum()),
                "box_size": box if box > 0 else None,
                "pixel_size": px if np.isfinite(px) else None,
                "voltage_in_kilovolts": float(np.asarray(ctf.voltage_in_kilovolts)[i]),
                "spherical_aberration_in_mm": float(np.asarray(ctf.spherical_aberration_in_mm)[i]),
                "amplitude_contrast": float(np.asarray(ctf.amplitude_contrast)[i]),
                "defocus_range_in_angstroms": [
                    float(min(dfu[sel].min(), dfv[sel].min())),
                    float(max(dfu[sel].max(), dfv[sel].max())),
                ],
            }
        )
    return out


_POSE_COLUMNS = {
    "star": ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"],
    "star_shift": ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY"],
    "star_ctf": [
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnCtfScalefactor",
    ],
    "cs": ["alignments3D/pose"],
    "cs_shift": ["alignments3D/shift"],
    "cs_ctf": list(CS_CTF_FIELDS),
}


def _columns_present(path: Path, stack) -> dict:
    """Which pose/shift/CTF columns the file has (RELION labels or .cs fields)."""
    cols = set()
    if stack.metadata is not None:
        cols |= {str(c) for c in stack.metadata.columns}
    if stack.optics is not None:
        cols |= {str(c) for c in stack.optics.columns}
    kind = "cs" if path.name.lower().endswith(".cs") else "star"
    if not path.name.lower().endswith((".star", ".cs")):
        return {}
    pre = "_" if kind == "star" else ""
    return {
        what: [pre + c for c in _POSE_COLUMNS[key] if c in cols]
        for what, key in (
            ("pose", kind),
            ("shift", f"{kind}_shift"),
            ("ctf", f"{kind}_ctf"),
        )
    }


def summarise(stack, path: Path, *, n_check: int | None = 256) -> dict:
    """The dictionary ``inspect`` prints (JSON-serialisable)."""
    from ..data.particles import estimate_noise_sigma

    nu = stack.nuisance
    ctf = nu.ctf
    dfu = np.asarray(ctf.defocus_u_in_angstroms, np.float64)
    dfv = np.asarray(ctf.defocus_v_in_angstroms, np.float64)
    shifts = np.asarray(nu.shift_in_angstroms, np.float64)
    first = {
        f: round(float(np.asarray(getattr(ctf, f))[0]), 6)
        for f in (
            "defocus_u_in_angstroms",
            "defocus_v_in_angstroms",
            "defocus_angle_in_degrees",
            "voltage_in_kilovolts",
            "spherical_aberration_in_mm",
            "amplitude_contrast",
            "phase_shift_in_degrees",
            "bfactor_in_angstroms2",
            "scale",
        )
    }
    missing = getattr(stack.images, "missing_files", None)
    info = {
        "source": str(path),
        "format": _source_format(path, stack),
        "n_particles": int(len(stack)),
        "box_size": int(stack.box_size) if stack.box_size > 0 else None,
        "pixel_size": float(stack.pixel_size) if np.isfinite(stack.pixel_size) else None,
        "n_optics_groups": int(len(np.unique(stack.group_ids()))),
        "optics": _optics(stack),
        "columns_present": _columns_present(path, stack),
        "defocus_range_in_angstroms": [
            float(min(dfu.min(), dfv.min())),
            float(max(dfu.max(), dfv.max())),
        ],
        "has_poses": bool(stack.has_poses),
        "has_shifts": bool(stack.has_shifts),
        "pose_convention": "RELION rotation matrices (ZYZ rot/tilt/psi, reference -> particle)",
        "shift_units_in_file": _shift_units(path, stack),
        "shift_units": "A (particle centre minus box centre)",
        "shift_range_in_angstroms": [float(shifts.min()), float(shifts.max())]
        if len(shifts)
        else [0.0, 0.0],
        "ctf_premultiplied": bool(stack.ctf_premultiplied),
        "phase_flipped": bool(stack.phase_flipped),
        "supported_by_forward_model": not (stack.ctf_premultiplied or stack.phase_flipped),
        "first_particle_ctf": first,
        "images_readable": not isinstance(stack.images, MissingImages),
    }
    if missing is not None:
        info["missing_stacks"] = {
            "n_missing": len(missing),
            "n_files": int(stack.images.n_files),
            "first": missing[:5],
        }
    if info["images_readable"]:
        n = len(stack) if n_check is None else min(len(stack), n_check)
        for s in range(0, n, 512):  # raises CryosipInputError for NaN/Inf or a bad stack
            np.asarray(stack.images[s : min(n, s + 512)])
        info["images_checked"] = int(n)
        info["noise_sigma_estimate"] = estimate_noise_sigma(stack.images, max_images=min(n, 512))
    return info


def write_montage(stack, png: str, n: int = 8) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._atomic import savefig

    n = max(1, min(n, len(stack)))
    imgs = np.asarray(stack.images[:n])
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(imgs[k], cmap="gray", origin="upper")
            ax.set_title(f"#{k + 1}", fontsize=8)
    fig.suptitle(
        f"{len(stack)} particles, {stack.box_size} px, {stack.pixel_size:.3g} A/px", fontsize=9
    )
    fig.tight_layout()
    path = Path(png)
    try:
        savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _px(box) -> str:
    return "unknown" if box is None else str(box)


def _apx(px) -> str:
    return "unknown" if px is None else f"{px:.4f}"


def _text(info: dict) -> str:
    lines = [
        f"{info['source']}: {info['format']}",
        f"  particles      {info['n_particles']}",
        f"  working grid   {_px(info['box_size'])} px, {_apx(info['pixel_size'])} A/px"
        + (
            " (optics groups resampled to one grid)"
            if len({(o["box_size"], o["pixel_size"]) for o in info["optics"]}) > 1
            else ""
        ),
    ]
    for o in info["optics"]:
        lo_g, hi_g = o["defocus_range_in_angstroms"]
        lines.append(
            f"  optics group {o['group']} ({o['name']}): {o['n_particles']} particles, "
            f"{_px(o['box_size'])} px, "
            f"{_apx(o['pixel_size'])} A/px, {o['voltage_in_kilovolts']:g} kV, "
            f"Cs {o['spherical_aberration_in_mm']:g}"
            f" mm, w {o['amplitude_contrast']:g}, defocus {lo_g:.1f} .. {hi_g:.1f} A"
        )
    for what, cols in info["columns_present"].items():
        lines.append(f"  {what + ' columns':<14} {', '.join(cols) if cols else 'none'}")
    lo, hi = info["defocus_range_in_angstroms"]
    lines.append(f"  defocus        {lo:.1f} .. {hi:.1f} A")
    lines.append(
        f"  poses          "
        f"{'yes' if info['has_poses'] else 'absent (no angles: reconstruct needs them)'}"
    )
    lines.append(
        f"  shifts         {'yes' if info['has_shifts'] else 'no'}; "
        f"in file: {info['shift_units_in_file']};"
        f" used as {info['shift_units']}, range {info['shift_range_in_angstroms'][0]:.2f} .. "
        f"{info['shift_range_in_angstroms'][1]:.2f} A"
    )
    lines.append(
        f"  CTF-premultiplied {info['ctf_premultiplied']}, phase-flipped {info['phase_flipped']}"
        + ("" if info["supported_by_forward_model"] else "  (NOT supported by the forward model)")
    )
    lines.append(
        "  first particle CTF: "
        + ", ".join(f"{k}={v:g}" for k, v in info["first_particle_ctf"].items())
    )
    if info["images_readable"]:
        lines.append(
            f"  images         {info['images_checked']} read and finite; background noise sigma "
            f"~ {info['noise_sigma_estimate']:.4g}"
        )
    elif "missing_stacks" in info:
        m = info["missing_stacks"]
        lines.append(
            f"  images         MISSING: {m['n_missing']} of {m['n_files']} stack file(s) not found"
            f" ({', '.join(m['first'][:3])}{', ...' if m['n_missing'] > 3 else ''}); "
            "use --datadir"
        )
    else:
        lines.append("  images         none given")
    if "png" in info:
        lines.append(f"  montage        {info['png']}")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    path = Path(args.particles)
    stack = read_particles_from_args(
        path,
        args,
        require_poses=False,
        require_images=False,
        allow_unsupported_contrast=True,
    )
    info = summarise(stack, path, n_check=None if args.check_all else 256)
    if args.png:
        if not info["images_readable"]:
            raise CryosipInputError(path, "no images to draw (pass --particles)")
        info["png"] = str(write_montage(stack, args.png, args.n_montage))
    sys.stdout.write(_atomic.json_text(info) + "\n" if args.json else _text(info))
    return 0
