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

import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..data.errors import CryosipInputError
from ..data.mrc import MissingImages

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
        "--n-montage", type=int, default=8, help="particles in the montage (default 8)"
    )
    parser.add_argument("--box", type=int, help="working box (Fourier crop) to report and show")
    parser.add_argument("--ctf", help="cryoDRGN ctf.pkl (override, or the optics of an .mrcs)")
    parser.add_argument("--pose", help="cryoDRGN pose.pkl (override)")
    parser.add_argument("--ind", help="cryoDRGN ind.pkl (particle selection)")
    parser.add_argument(
        "--particles", dest="images", help="images for a cryoDRGN .pkl input (.mrcs/.txt)"
    )
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
    nu = stack.nuisance
    ctf = nu.ctf
    meta = stack.metadata
    n = len(stack)
    if meta is not None and "rlnOpticsGroup" in meta.columns:
        groups = np.asarray(meta["rlnOpticsGroup"]).astype(np.int64)
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
    out = []
    for g in np.unique(groups):
        sel = groups == g
        i = int(np.nonzero(sel)[0][0])
        out.append(
            {
                "group": int(g),
                "name": names.get(int(g), f"opticsGroup{int(g)}"),
                "n_particles": int(sel.sum()),
                "box_size": int(stack.box_size),
                "pixel_size": float(stack.pixel_size),
                "voltage_in_kilovolts": float(np.asarray(ctf.voltage_in_kilovolts)[i]),
                "spherical_aberration_in_mm": float(np.asarray(ctf.spherical_aberration_in_mm)[i]),
                "amplitude_contrast": float(np.asarray(ctf.amplitude_contrast)[i]),
            }
        )
    return out


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
    info = {
        "source": str(path),
        "format": _source_format(path, stack),
        "n_particles": int(len(stack)),
        "box_size": int(stack.box_size),
        "pixel_size": float(stack.pixel_size),
        "optics": _optics(stack),
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

    from ..data.star import _atomic_write_text

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
        _atomic_write_text(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _text(info: dict) -> str:
    lines = [
        f"{info['source']}: {info['format']}",
        f"  particles      {info['n_particles']}",
        f"  box, pixel     {info['box_size']} px, {info['pixel_size']:.4f} A/px",
    ]
    for o in info["optics"]:
        lines.append(
            f"  optics group {o['group']} ({o['name']}): {o['n_particles']} particles, "
            f"{o['box_size']} px, "
            f"{o['pixel_size']:.4f} A/px, {o['voltage_in_kilovolts']:g} kV, "
            f"Cs {o['spherical_aberration_in_mm']:g}"
            f" mm, w {o['amplitude_contrast']:g}"
        )
    lo, hi = info["defocus_range_in_angstroms"]
    lines.append(f"  defocus        {lo:.1f} .. {hi:.1f} A")
    lines.append(f"  poses          {'yes' if info['has_poses'] else 'no (identity placeholders)'}")
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
    else:
        lines.append("  images         none given")
    if "png" in info:
        lines.append(f"  montage        {info['png']}")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    from ..data.particles import read_particles

    path = Path(args.particles)
    stack = read_particles(
        path,
        datadir=args.datadir,
        box_size=args.box,
        pose=args.pose,
        ctf=args.ctf,
        ind=args.ind,
        particles=args.images,
        require_poses=False,
        allow_unsupported_contrast=True,
    )
    info = summarise(stack, path, n_check=None if args.check_all else 256)
    if args.png:
        if not info["images_readable"]:
            raise CryosipInputError(path, "no images to draw (pass --particles)")
        info["png"] = str(write_montage(stack, args.png, args.n_montage))
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if args.json else _text(info))
    return 0
