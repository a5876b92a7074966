"""Convert particle metadata between RELION STAR (3.0/3.1), cryoSPARC .cs and cryoDRGN pickles.

Poses, shifts and CTF are carried exactly (float32); other STAR columns are kept. The output
format comes from OUT's extension (.star -> STAR 3.1, .cs, .pkl or a folder -> cryoDRGN) or
--to. Images are not copied unless --box asks for a Fourier-cropped stack, which is written next
to OUT as OUT_STEM.mrcs. Metadata converts without the image stacks (image paths are carried
over as they are); optics groups with different pixel sizes or boxes are written on one common
working grid only with --box (which resamples the images).

  $ cryosip convert run_data.star particles.cs
  $ cryosip convert J42_particles.cs particles.star --datadir /data/cryosparc_project
  $ cryosip convert run_data.star old_style.star --to star3.0
  $ cryosip convert run_data.star drgn/ --to cryodrgn          # drgn/pose.pkl, drgn/ctf.pkl
  $ cryosip convert particles.mrcs particles.star --ctf ctf.pkl --pose pose.pkl
  $ cryosip convert run_data.star small.star --box 64           # also writes small.mrcs
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..data.errors import CryosipInputError
from ._args import add_cryodrgn_args, positive_int, prepare_output_dir, prepare_output_file

logger = logging.getLogger(__name__)

FORMATS = ("star", "star3.1", "star3.0", "cs", "cryodrgn")


def add_args(parser) -> None:
    parser.add_argument("input", help=".star, .cs, .mrcs/.txt (with --ctf) or a cryoDRGN .pkl")
    parser.add_argument("output", help="output file (.star, .cs) or cryoDRGN folder/prefix")
    parser.add_argument(
        "--to", choices=FORMATS, help="output format (default: from the output extension)"
    )
    parser.add_argument("--datadir", help="folder holding the image stacks")
    add_cryodrgn_args(parser, "cryoDRGN ctf.pkl (override, or the optics of an .mrcs input)")
    parser.add_argument(
        "--box",
        type=positive_int,
        help="Fourier-crop the images to this box and write them as a new stack",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def output_format(output: str, to: str | None) -> str:
    if to is not None:
        return {"star": "star3.1"}.get(to, to)
    low = output.lower()
    if low.endswith(".star"):
        return "star3.1"
    if low.endswith(".cs"):
        return "cs"
    if low.endswith(".pkl") or output.endswith(os.sep) or Path(output).is_dir():
        return "cryodrgn"
    raise CryosipInputError(
        output,
        "cannot tell the output format from the extension: use .star, .cs, a folder "
        "(cryoDRGN) or --to",
    )


def _cryodrgn_prefix(output: str) -> str:
    p = Path(output)
    if p.name in ("pose.pkl", "ctf.pkl", "ind.pkl"):
        return os.fspath(p.parent) + os.sep
    if output.endswith(".pkl"):
        return output[:-4]
    if output.endswith(os.sep) or p.is_dir():
        p.mkdir(parents=True, exist_ok=True)
        return output if output.endswith(os.sep) else output + os.sep
    return output


def main(args) -> int:
    from ..data.cryodrgn import write_cryodrgn
    from ..data.cryosparc import write_cs
    from ..data.mrc import write_mrcs
    from ..data.star import write_star
    from ._args import read_particles_from_args

    fmt = output_format(args.output, args.to)
    overwrite = getattr(args, "overwrite", False)
    if fmt == "cryodrgn" and (args.output.endswith(os.sep) or Path(args.output).is_dir()):
        prepare_output_dir(args.output, overwrite=overwrite, command="convert", inputs=[args.input])
    elif fmt != "cryodrgn":
        prepare_output_file(args.output, overwrite=overwrite, command="convert")
    stack = read_particles_from_args(
        args.input,
        args,
        require_poses=fmt != "cryodrgn",
        require_images=args.box is not None,
        allow_unsupported_contrast=True,
    )
    missing = getattr(stack.images, "missing_files", None)
    if missing:
        logger.warning(
            "%s: %s; converting the metadata only (image paths carried over as they are)",
            args.input,
            stack.images.describe(),
        )
    if stack.box_size <= 0 or not np.isfinite(stack.pixel_size):
        raise CryosipInputError(
            args.input,
            "box or pixel size unknown (not in the metadata and the stacks are missing): "
            "use --datadir",
        )
    out = Path(args.output)
    image_names = None
    new_stack = None
    if args.box is not None and fmt != "cryodrgn":
        new_stack = out.with_name(out.name.split(".")[0] + ".mrcs")
        write_mrcs(new_stack, stack.images, stack.pixel_size, chunk_size=512)
        image_names = [f"{i + 1:06d}@{new_stack.name}" for i in range(len(stack))]
    try:
        if fmt in ("star3.1", "star3.0"):
            write_star(out, stack, version=fmt[4:], image_names=image_names)
            written = [out]
        elif fmt == "cs":
            if not stack.has_poses:
                raise CryosipInputError(args.input, "no poses to write into a .cs file")
            write_cs(out, stack, image_names=image_names)
            written = [out]
        else:
            written = list(write_cryodrgn(_cryodrgn_prefix(args.output), stack).values())
    except ValueError as e:
        if new_stack is not None:
            new_stack.unlink(missing_ok=True)
        if isinstance(e, CryosipInputError):
            raise
        raise CryosipInputError(args.input, str(e)) from None
    except BaseException:
        if new_stack is not None:
            new_stack.unlink(missing_ok=True)
        raise
    if new_stack is not None:
        written.append(new_stack)
    shifts = np.asarray(stack.nuisance.shift_in_angstroms)
    sys.stdout.write(
        f"wrote {len(stack)} particles ({stack.box_size} px, {stack.pixel_size:.4f} A/px, "
        f"poses: {'yes' if stack.has_poses else 'no'}, max |shift| "
        f"{float(np.abs(shifts).max()) if len(shifts) else 0.0:.2f} A) to "
        + ", ".join(str(w) for w in written)
        + "\n"
    )
    return 0
