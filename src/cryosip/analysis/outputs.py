"""Write a reconstruction's results: what the next tool needs, from one call.

:func:`write_reconstruction` writes into ``out_dir``

* the recovered distribution: ``distribution_particles.csv`` (the weighted particles of the
  measure), ``distribution.csv`` / ``free_energy.csv`` (1-D: density and -ln density on a
  grid, with bootstrap bands), ``history.csv``, PNG plots, ``summary.json``;
* per image (given the posterior and the input stack): ``particles_cv.star`` or
  ``particles_cv.cs`` (the input table with every column, image paths made absolute, plus the
  CV posterior mean/sd), ``z.pkl`` (cryoDRGN latents) and ``posterior.npz`` (each image's
  posterior over the recovered particles, read by ``cryosip select``);
* structures (given the model): ``ensemble.pdb``/``ensemble.cif``/``ensemble.csv`` (weighted
  ensemble, populations sum to 1), ``trajectory.pdb``/``trajectory.csv`` (11 frames between
  the 1st and 99th weighted percentile), ``volumes/cv_000.mrc`` ... (maps of those frames) and
  ``chimerax_series.cxc``;
* ``report.html``: the interactive page (:mod:`cryosip.analysis.report_page`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from .. import _atomic
from . import plots
from .marginals import marginal, write_marginals

logger = logging.getLogger(__name__)

PARTICLES_CSV = "distribution_particles.csv"

# every name write_reconstruction may create in out_dir (for tools that clean or list a run)
RECONSTRUCT_OUTPUTS = (
    PARTICLES_CSV,
    "distribution.csv",
    "free_energy.csv",
    "history.csv",
    "summary.json",
    "*.png",
    "particles_cv.star",
    "particles_cv.cs",
    "z.pkl",
    "posterior.npz",
    "ensemble.pdb",
    "ensemble.cif",
    "ensemble.csv",
    "trajectory.pdb",
    "trajectory.csv",
    "volumes",
    "chimerax_series.cxc",
    "report.html",
)

CORE_FILES = {
    PARTICLES_CSV: "the recovered distribution: weighted points (CV columns, weight); for the "
    "regularised KL flow its particles each spread over the kernel (flow_particles.csv: the "
    "particles themselves)",
    "distribution.csv": "density of the CV on a grid (1-D), with bootstrap bands",
    "free_energy.csv": "free energy -ln density in kT (1-D), with bands",
    "history.csv": "objective per flow step",
    "summary.json": "settings and summary numbers",
    "config.json": "the command's settings",
    "density.png": "density plot",
    "objective.png": "objective per step",
    "trajectories.png": "particle trajectories of the flow",
    "fit_check.png": "fit check figure",
    "noise_spectrum.csv": "the estimated noise power per shell and optics group (working grid)",
}


def density_table(result, lower: float, upper: float, n_grid: int = 201):
    """The 1-D density on a grid with bands and free energy (:func:`.marginals.marginal`: exact
    for a regularised flow's kernel mixture)."""
    return marginal(result, 0, lower, upper, n_grid)


def write_reconstruction(
    out_dir,
    problem,
    result,
    cv_names,
    settings: dict,
    summary_extra: dict | Callable[[], dict] | None = None,
    *,
    stack=None,
    model=None,
    posterior=None,
) -> dict:
    """Write everything a reconstruction produces (see the module docstring); returns the summary.

    ``stack``: the input ParticleStack (per-image tables keep its columns); ``model``: the
    conformation model (structures, maps, report viewer); ``posterior``: ``(mean, sd, responsibilities)``
    per image, or None (e.g. streamed runs: no per-image outputs). ``summary_extra``: more
    summary entries, or a function that gives them, called once, after the other outputs and
    before the report (the caller can compute them meanwhile, e.g. on another thread).
    """
    os.makedirs(out_dir, exist_ok=True)
    pos = np.asarray(result.positions)
    cols = {name: pos[:, i] for i, name in enumerate(cv_names)}
    _atomic.write_csv(
        os.path.join(out_dir, PARTICLES_CSV), pd.DataFrame({**cols, "weight": result.weights})
    )
    if getattr(result, "particles", None) is not None:  # a regularised flow: its particles too
        px, pw = (np.asarray(a) for a in result.particles)
        _atomic.write_csv(
            os.path.join(out_dir, "flow_particles.csv"),
            pd.DataFrame({**{n: px[:, i] for i, n in enumerate(cv_names)}, "weight": pw}),
        )
    summary = {
        "method": result.method,
        "objective": result.objective,
        "label": result.label,
        "n_particles": int(pos.shape[0]),
        "seconds": round(result.seconds, 3),
        "setup_seconds": round(problem.setup_seconds, 3),
        "settings": settings,
        "noise_sigma": float(problem.operator.noise.sigma),
        "n_images": len(problem.observations),
    }
    if pos.shape[1] > 1:
        summary.update(write_marginals(out_dir, result, problem.lower, problem.upper, cv_names))
    if pos.shape[1] == 1:
        dens = density_table(result, float(problem.lower[0]), float(problem.upper[0]))
        _atomic.write_csv(
            os.path.join(out_dir, "distribution.csv"),
            pd.DataFrame(
                {
                    cv_names[0]: dens["grid"],
                    "density": dens["density"],
                    **(
                        {"density_lo": dens["density_lo"], "density_hi": dens["density_hi"]}
                        if "density_lo" in dens
                        else {}
                    ),
                }
            ),
        )
        _atomic.write_csv(
            os.path.join(out_dir, "free_energy.csv"),
            pd.DataFrame(
                {
                    cv_names[0]: dens["grid"],
                    "free_energy_kT": dens["free_energy"],
                    **(
                        {
                            "free_energy_lo": dens["free_energy_lo"],
                            "free_energy_hi": dens["free_energy_hi"],
                        }
                        if "free_energy_lo" in dens
                        else {}
                    ),
                }
            ),
        )
        b = (
            {result.label: (dens["density_lo"], dens["density_hi"])}
            if "density_lo" in dens
            else None
        )
        plots.plot_densities(
            os.path.join(out_dir, "density.png"),
            dens["grid"],
            {result.label: dens["density"]},
            xlabel=cv_names[0],
            bands=b,
            title=f"recovered distribution ({result.label})",
        )
        summary["n_bootstrap"] = len(result.replicates)
    if result.losses is not None:
        h = np.asarray(result.losses)
        hist = {"step": np.arange(h.size), "objective": h}
        if result.flow is not None and np.isfinite(np.asarray(result.flow.heldout)).any():
            hist["heldout_objective"] = np.asarray(result.flow.heldout)
        _atomic.write_csv(os.path.join(out_dir, "history.csv"), pd.DataFrame(hist))
        plots.plot_objectives(os.path.join(out_dir, "objective.png"), {result.label: h})
        finite = h[np.isfinite(h)]
        summary["final_objective"] = float(finite[-1]) if finite.size else None
        summary["converged"] = bool(result.flow.converged) if result.flow is not None else None
        summary["n_steps_taken"] = (
            int(result.flow.n_steps_taken) if result.flow is not None else None
        )
        summary["step_size"] = getattr(result, "step_size", None)  # the flow's, as resolved
    if result.trajectory is not None:
        plots.plot_trajectories(
            os.path.join(out_dir, "trajectories.png"), result.trajectory, xlabel=cv_names[0]
        )
    if isinstance(summary_extra, dict):
        summary.update(summary_extra)
    _atomic.write_json(os.path.join(out_dir, "summary.json"), summary)
    # everything below needs only what is on disk already; summary.json is rewritten at the end
    summary.update(_weighted_cv_summary(pos, result.weights, cv_names))
    files = dict(CORE_FILES)
    if getattr(result, "particles", None) is not None:
        files["flow_particles.csv"] = "the flow's particles and weights (the kernel's centres)"
    if pos.shape[1] > 1:
        files["marginals.csv"] = "density and free energy of every CV, with bootstrap bands"
        files["landscape_2d.csv"] = "density and free energy of the first two CVs on a grid"
        files["landscape.png"] = "free-energy map of the first two CVs and the marginals"
    if posterior is not None and stack is not None:
        summary.update(
            _write_per_image(out_dir, problem, result, cv_names, stack, posterior, files)
        )
    landscape = None
    if model is not None:
        landscape = _write_structures_and_maps(
            out_dir, problem, result, cv_names, settings, stack, model, files
        )
        summary.update(landscape["summary"])
    if callable(summary_extra):
        summary.update(summary_extra())
    files["report.html"] = "this page: interactive structures along the CV, plots, summary"
    present = {f: d for f, d in files.items() if os.path.exists(os.path.join(out_dir, f))}
    present["report.html"] = files["report.html"]
    summary["outputs"] = sorted(present)
    _atomic.write_json(os.path.join(out_dir, "summary.json"), summary)
    from .report_page import write_reconstruction_report

    write_reconstruction_report(
        out_dir, problem, result, cv_names, summary, model, landscape, present, settings
    )
    return summary


def _weighted_cv_summary(pos, weights, cv_names) -> dict:
    from .structures import weighted_quantile

    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    out = {"cv_names": list(cv_names), "cv_mean": {}, "cv_percentiles": {}}
    for i, name in enumerate(cv_names):
        out["cv_mean"][name] = float(w @ pos[:, i])
        q = weighted_quantile(pos[:, i], w, [0.01, 0.25, 0.5, 0.75, 0.99])
        out["cv_percentiles"][name] = dict(zip(["1", "25", "50", "75", "99"], map(float, q)))
    return out


def _table_kind(stack) -> str | None:
    """``"star"`` or ``"cs"`` for a per-image copy of the input table, None when there is none."""
    meta = stack.metadata
    if meta is None or len(meta) != len(stack):
        return None
    if "rlnImageName" in meta.columns:
        return "star"
    if {"blob/path", "blob/idx"} <= set(meta.columns):
        return "cs"
    return None


def _write_per_image(out_dir, problem, result, cv_names, stack, posterior, files) -> dict:
    from ..data.outputs import (
        absolute_image_locations,
        absolute_image_names,
        write_latent_pkl,
        write_particles_cv_cs,
        write_particles_cv_star,
    )
    from .posterior import write_posterior_npz

    mean, sd, resp = posterior
    mean, sd = np.asarray(mean, np.float64), np.asarray(sd, np.float64)
    mean = mean.reshape(mean.shape[0], -1)
    sd = sd.reshape(sd.shape[0], -1)
    n = len(stack)
    if mean.shape[0] != n:
        logger.warning(
            "per-image posterior has %d rows for %d particles: per-image files not written",
            mean.shape[0],
            n,
        )
        return {}
    kind = _table_kind(stack)
    table = ""
    out = {}
    if kind == "star":
        names = absolute_image_names(stack)
        if names is None:
            logger.warning("images not read from files: particles_cv.star keeps the input names")
        table = "particles_cv.star"
        write_particles_cv_star(
            os.path.join(out_dir, table), stack, mean, sd, cv_names, image_names=names
        )
    elif kind == "cs":
        loc = absolute_image_locations(stack)
        table = "particles_cv.cs"
        write_particles_cv_cs(
            os.path.join(out_dir, table),
            stack,
            mean,
            sd,
            cv_names,
            image_paths=None if loc is None else loc[0],
        )
    if table:
        files[table] = (
            "the input particle table, every column kept, image paths absolute, plus the CV "
            "posterior mean/sd per particle"
        )
    write_latent_pkl(os.path.join(out_dir, "z.pkl"), mean)
    files["z.pkl"] = "cryoDRGN-style latents: float32 (N, d) CV posterior means"
    write_posterior_npz(
        os.path.join(out_dir, "posterior.npz"),
        positions=result.positions,
        weights=result.weights,
        responsibilities=resp,
        mean=mean,
        sd=sd,
        cv_names=cv_names,
        lower=problem.lower,
        upper=problem.upper,
        table=table,
    )
    files["posterior.npz"] = (
        "per-image posterior over the recovered particles (for `cryosip select`)"
    )
    out["per_image_table"] = table or None
    out["per_image_cv_sd_median"] = {
        name: float(np.median(sd[:, i])) for i, name in enumerate(cv_names)
    }
    return out


N_TRAJECTORY = 11
N_VIEWER = 21
MAX_ENSEMBLE = 16
VIEWER_MAX_ATOMS = 2000


def _nearest_frame_populations(pos, weights, line_t, line_pts) -> np.ndarray:
    """Mass of the particles nearest (along the line coordinate) to each frame; sums to 1."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    if pos.shape[1] == 1:
        t = pos[:, 0]
    else:
        center = line_pts[len(line_pts) // 2]
        direction = line_pts[-1] - line_pts[0]
        norm = np.linalg.norm(direction)
        direction = direction / norm if norm > 0 else direction
        t = (pos - center) @ direction + line_t[len(line_t) // 2]
    k = np.argmin(np.abs(t[:, None] - np.asarray(line_t)[None, :]), axis=1)
    return np.bincount(k, weights=w, minlength=len(line_t))


def _write_structures_and_maps(
    out_dir, problem, result, cv_names, settings, stack, model, files
) -> dict:
    from ..data.outputs import ensemble_text, write_ensemble_pdb
    from .maps import map_grid, surface_level, write_chimerax_script, write_volume_series
    from .structures import atom_labels, conformations, cv_line, ensemble_members

    pos = np.asarray(result.positions, np.float64)
    w = np.asarray(result.weights, np.float64)
    w = w / w.sum()
    lower = np.asarray(problem.lower, np.float64).ravel()
    upper = np.asarray(problem.upper, np.float64).ravel()
    labels = atom_labels(model, settings)
    label_args = labels.writer_args()
    d = pos.shape[1]

    def cv_text(theta) -> str:
        return ", ".join(f"{c}={v:.3g}" for c, v in zip(cv_names, np.ravel(theta)))

    # weighted ensemble
    thetas, pops = ensemble_members(pos, w, lower, upper, MAX_ENSEMBLE)
    coords = conformations(model, thetas)
    write_ensemble_pdb(os.path.join(out_dir, "ensemble.pdb"), coords, pops, *label_args)
    write_ensemble_pdb(os.path.join(out_dir, "ensemble.cif"), coords, pops, *label_args)
    _atomic.write_csv(
        os.path.join(out_dir, "ensemble.csv"),
        pd.DataFrame(
            {
                "model": np.arange(1, len(pops) + 1),
                **{c: thetas[:, i] for i, c in enumerate(cv_names)},
                "population": pops,
            }
        ),
    )
    files["ensemble.pdb"] = "weighted ensemble, multi-model PDB (populations in REMARK 250)"
    files["ensemble.cif"] = "weighted ensemble, multi-model mmCIF (_cryosip_model_weight)"
    files["ensemble.csv"] = "CV and population of each ensemble model"

    # trajectory along the CV (1st to 99th weighted percentile) and its maps
    pts, t = cv_line(pos, w, lower, upper, N_TRAJECTORY)
    tpops = _nearest_frame_populations(pos, w, t, pts)
    tcoords = conformations(model, pts)
    write_ensemble_pdb(os.path.join(out_dir, "trajectory.pdb"), tcoords, tpops, *label_args)
    _atomic.write_csv(
        os.path.join(out_dir, "trajectory.csv"),
        pd.DataFrame(
            {
                "frame": np.arange(1, N_TRAJECTORY + 1),
                **{c: pts[:, i] for i, c in enumerate(cv_names)},
                "population": tpops,
            }
        ),
    )
    files["trajectory.pdb"] = (
        f"{N_TRAJECTORY} structures along the CV (1st to 99th weighted percentile), for animation"
    )
    files["trajectory.csv"] = "CV and population (nearest-frame mass) of each trajectory frame"
    box = stack.box_size if stack is not None else problem.operator.image_model.box_size
    px = stack.pixel_size if stack is not None else problem.operator.image_model.pixel_size
    map_box, voxel = map_grid(box, px)
    names = write_volume_series(
        os.path.join(out_dir, "volumes"), tcoords, model.atoms, map_box, voxel
    )
    from ..data.mrc import read_volume_mrc

    first, _ = read_volume_mrc(os.path.join(out_dir, "volumes", names[len(names) // 2]))
    protein = not labels.pseudo
    write_chimerax_script(
        os.path.join(out_dir, "chimerax_series.cxc"),
        volume_glob="volumes/cv_*.mrc",
        level=surface_level(first),
        trajectory="trajectory.pdb",
        ensemble="ensemble.cif",
        frame_labels=[
            f"{i + 1} {cv_text(p)} pop {q:.3f}" for i, (p, q) in enumerate(zip(pts, tpops))
        ],
        ensemble_labels=[
            f"#{i + 1} {cv_text(th)} pop {p:.3f}" for i, (th, p) in enumerate(zip(thetas, pops))
        ],
        cv_name=cv_names[0] if d == 1 else "the first principal axis of the CV",
        cv_range=(float(t[0]), float(t[-1])),
        protein=protein,
    )
    files["volumes/"] = (
        f"{len(names)} maps along the CV (MRC, {map_box}^3 voxels of {voxel:.4g} A), "
        "same frames as trajectory.pdb"
    )
    files["chimerax_series.cxc"] = (
        "ChimeraX script: the maps as a volume series, the trajectory and the ensemble with "
        "sliders and population labels"
    )

    # frames for the report's viewer
    vpts, vt = cv_line(pos, w, lower, upper, N_VIEWER)
    vpops = _nearest_frame_populations(pos, w, vt, vpts)
    vcoords = conformations(model, vpts)
    vlabels = labels
    if labels.n_atoms > VIEWER_MAX_ATOMS and labels.ca_mask().any():
        m = labels.ca_mask()
        vlabels = labels.select(m)
        vcoords = vcoords[:, m]
    viewer_pdb = ensemble_text(vcoords, vpops, *vlabels.writer_args(), fmt="pdb")
    ca_only = bool(vlabels.ca_mask().all())
    return {
        "summary": {
            "ensemble": [
                {**{c: float(th[i]) for i, c in enumerate(cv_names)}, "population": float(p)}
                for th, p in zip(thetas, pops)
            ],
            "map_box": int(map_box),
            "map_voxel_size": float(voxel),
        },
        "viewer_pdb": viewer_pdb,
        "viewer_points": vpts,
        "viewer_t": vt,
        "viewer_populations": vpops,
        "representation": "spacefill" if labels.pseudo else ("backbone" if ca_only else "cartoon"),
        "ensemble_rows": [(cv_text(th), p) for th, p in zip(thetas, pops)],
        "line_t": t,
    }
