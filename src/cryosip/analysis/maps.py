"""Maps along the CV and a ChimeraX script that plays them with the structures.

:func:`write_volume_series` renders the model at each frame of the CV line into a map
(:func:`cryosip.cryoem.volume.render_volume`, voxel-averaged Gaussian atoms) and writes
``volumes/cv_000.mrc`` ... (float32, voxel size in the header, origin at ``-(D // 2) *
voxel`` so that the maps overlay the PDB coordinates, which are relative to the box centre).
:func:`write_chimerax_script` writes a ``.cxc`` that opens the maps as a volume series
(``open ... vseries true``), the trajectory as coordinate sets and the weighted ensemble as a
model series, each with its slider, and the populations as 2-D labels. ChimeraX runs a
``.cxc`` from the script's folder, so the relative paths resolve wherever the folder is moved.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .. import _atomic

logger = logging.getLogger(__name__)

__all__ = ["map_grid", "write_volume_series", "write_chimerax_script"]

MAX_MAP_BOX = 128


def map_grid(box_size: int, pixel_size: float, max_box: int = MAX_MAP_BOX) -> tuple[int, float]:
    """(box, voxel size) of the maps: the images' field of view, at most ``max_box`` voxels a side."""
    box = int(box_size)
    if box <= max_box:
        return box, float(pixel_size)
    return int(max_box), float(pixel_size) * box / max_box


def write_volume_series(
    folder, coords, atoms, box_size: int, voxel_size: float, prefix: str = "cv"
) -> list[str]:
    """One MRC per frame of ``coords`` (F, n_atoms, 3); returns the file names (in ``folder``)."""
    from ..cryoem.volume import render_volume
    from ..data.outputs import write_volume_mrc

    os.makedirs(folder, exist_ok=True)
    names = []
    for i, c in enumerate(np.asarray(coords)):
        vol = render_volume(c, atoms, box_size, voxel_size)
        name = f"{prefix}_{i:03d}.mrc"
        write_volume_mrc(os.path.join(folder, name), vol, voxel_size)
        names.append(name)
    return names


def surface_level(first_map, fraction: float = 0.15) -> float:
    """A contour level for display: ``fraction`` of the map's maximum."""
    return float(fraction * np.max(first_map))


def _lines(items: list[str], width: int = 100) -> list[str]:
    """Join ``items`` with ``"; "`` into lines of at most about ``width`` characters."""
    lines, cur = [], ""
    for it in items:
        if cur and len(cur) + len(it) + 2 > width:
            lines.append(cur)
            cur = ""
        cur = f"{cur}; {it}" if cur and not cur.endswith(":") else (f"{cur} {it}" if cur else it)
    if cur:
        lines.append(cur)
    return lines


def _q(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def write_chimerax_script(
    path,
    *,
    volume_glob: str | None,
    level: float | None,
    trajectory: str,
    ensemble: str | None,
    frame_labels: list[str],
    ensemble_labels: list[str],
    cv_name: str,
    cv_range: tuple[float, float],
    protein: bool,
) -> None:
    """Write the ``.cxc``: volume series #1 (if any), trajectory #2, ensemble #3, sliders, labels."""
    n = len(frame_labels)
    lines = [
        "# ChimeraX script written by cryosip: maps and structures along the recovered CV.",
        "# Open it in ChimeraX (File > Open, or `open chimerax_series.cxc`); paths are relative",
        "# to this file. Move the sliders to walk along the CV; the labels list each frame's",
        "# population (the recovered probability of the CV segment nearest to that frame).",
        "close session",
    ]
    model = 1
    vol = None
    if volume_glob:
        vol = f"#{model}"
        lines += [
            f"open {volume_glob} vseries true",
            f"volume {vol} style surface"
            + (f" level {level:.6g}" if level is not None else "")
            + " color #8fb3d9 transparency 0.55",
        ]
        model += 1
    traj = f"#{model}"
    model += 1
    lines += [f"open {trajectory} coordsets true"]
    lines += (
        [f"cartoon {traj}", f"color {traj} bychain"]
        if protein
        else [f"style {traj} sphere", f"color {traj} tan"]
    )
    ens = None
    if ensemble:
        ens = f"#{model}"
        lines += [f"open {ensemble}", f"hide {ens} models"]
    lines += [f"view {traj}"]
    if vol:
        lines += [f"vseries slider {vol}"]
    lines += [f"coordset slider {traj}"]
    if ens:
        lines += [f"mseries slider {ens}"]
    lo, hi = cv_range
    lines += [
        f"2dlabels create cryosip_title text {_q(f'cryosip: {n} frames along {cv_name} from {lo:.3g} to {hi:.3g}')}"
        " xpos 0.02 ypos 0.95 size 16 color black",
    ]
    # 2dlabels are one line each: the legends go over several labels
    chunks = _lines(["frames:", *frame_labels])
    for j, ch in enumerate(chunks):
        lines.append(
            f"2dlabels create cryosip_frames{j} text {_q(ch)} xpos 0.02 ypos {0.90 - 0.035 * j:.3f}"
            " size 11 color dimgray"
        )
    if ensemble_labels:
        chunks = _lines([f"ensemble {ens} ({ensemble}):", *ensemble_labels])
        for j, ch in enumerate(chunks):
            lines.append(
                f"2dlabels create cryosip_ensemble{j} text {_q(ch)} xpos 0.02 ypos {0.06 + 0.035 * (len(chunks) - 1 - j):.3f}"
                " size 11 color dimgray"
            )
    lines += [
        "# a movie along the CV (uncomment): the label shows the CV of the current frame",
        f"# perframe \"2dlabels create cryosip_cv text '{cv_name} = $1' xpos 0.8 ypos 0.95 size 16\""
        f" range {lo:.6g},{hi:.6g} frames {n} interval 10",
        f"# movie record; coordset {traj} 1,{n} pauseFrames 10"
        + (f"; vseries play {vol} loop false maxFrameRate 6" if vol else "")
        + f"; wait {10 * n}; movie encode cryosip_cv.mp4",
    ]
    _atomic.write_text(path, "\n".join(lines) + "\n")
