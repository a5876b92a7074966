"""Assemble ``report.html`` of a reconstruction from what :func:`write_reconstruction` computed."""

from __future__ import annotations

import os

import numpy as np

from .density import free_energy, kde
from .interactive import write_interactive_report

__all__ = ["write_reconstruction_report"]

FREE_ENERGY_CAP_KT = 8.0  # the plot's y range stops here (the tails of -ln rho are noise)


def _curves(problem, result, cv_names, landscape) -> tuple[dict, dict, tuple, str]:
    from .outputs import density_table

    pos = np.asarray(result.positions, np.float64)
    w = np.asarray(result.weights, np.float64)
    w = w / w.sum()
    if pos.shape[1] == 1:
        lo, hi = float(np.ravel(problem.lower)[0]), float(np.ravel(problem.upper)[0])
        dens = density_table(result, lo, hi)
        x = dens["grid"]
        density = {
            "x": x,
            "y": dens["density"],
            "ylabel": "density",
            "color": "#1f77b4",
            "ymin": 0.0,
        }
        fe = {
            "x": x,
            "y": dens["free_energy"],
            "ylabel": "free energy (kT)",
            "color": "#2ca02c",
            "ymax": FREE_ENERGY_CAP_KT,
        }
        if "density_lo" in dens:
            density.update(lo=dens["density_lo"], hi=dens["density_hi"])
            fe.update(lo=dens["free_energy_lo"], hi=dens["free_energy_hi"])
        return density, fe, (lo, hi), cv_names[0]
    # d > 1: the distribution of the coordinate along the viewer's line (first principal axis)
    t = landscape["viewer_t"]
    pts = landscape["viewer_points"]
    direction = pts[-1] - pts[0]
    direction = direction / max(np.linalg.norm(direction), 1e-300)
    proj = (pos - pts[len(pts) // 2]) @ direction + t[len(t) // 2]
    span = float(t[-1] - t[0]) or 1.0
    lo, hi = float(t[0]) - 0.1 * span, float(t[-1]) + 0.1 * span
    x = np.linspace(lo, hi, 201)
    y = kde(proj, w, x)
    density = {
        "x": x,
        "y": y,
        "ylabel": "density along the axis",
        "color": "#1f77b4",
        "ymin": 0.0,
    }
    fe = {
        "x": x,
        "y": free_energy(y),
        "ylabel": "free energy (kT)",
        "color": "#2ca02c",
        "ymax": FREE_ENERGY_CAP_KT,
    }
    return density, fe, (lo, hi), "position along the first principal axis of the CVs"


def write_reconstruction_report(
    out_dir, problem, result, cv_names, summary, model, landscape, files, settings
) -> None:
    pos = np.asarray(result.positions, np.float64)
    if landscape is None:
        from .structures import cv_line

        pts, t = cv_line(pos, result.weights, problem.lower, problem.upper, 21)
        landscape = {
            "viewer_pdb": "",
            "viewer_points": pts,
            "viewer_t": t,
            "viewer_populations": np.full(len(t), np.nan),
            "representation": "backbone",
            "ensemble_rows": None,
        }
    density, fe, xrange, xlabel = _curves(problem, result, cv_names, landscape)
    frames = []
    for p, t, q in zip(
        landscape["viewer_points"], landscape["viewer_t"], landscape["viewer_populations"]
    ):
        cv = ", ".join(f"{c} = {v:.3f}" for c, v in zip(cv_names, np.ravel(p)))
        dens = float(np.interp(t, density["x"], density["y"]))
        text = f"{cv}   population {q:.3f}   density {dens:.3g}"
        frames.append({"t": float(t), "cv": [float(v) for v in np.ravel(p)], "text": text})
    pops = np.asarray(landscape["viewer_populations"], np.float64)
    start = int(np.nanargmax(pops)) if np.isfinite(pops).any() else len(frames) // 2
    rows = [
        ("method", summary.get("label")),
        ("images", summary.get("n_images")),
        ("particles of the measure", summary.get("n_particles")),
        ("noise sd", summary.get("noise_sigma")),
        ("final objective", summary.get("final_objective")),
        ("converged", summary.get("converged")),
        ("steps taken", summary.get("n_steps_taken")),
        ("bootstrap replicates", summary.get("n_bootstrap")),
        ("flow seconds", summary.get("seconds")),
        ("set-up seconds", summary.get("setup_seconds")),
    ]
    for c in cv_names:
        rows.append((f"mean {c}", summary.get("cv_mean", {}).get(c)))
        q = summary.get("cv_percentiles", {}).get(c, {})
        if q:
            rows.append(
                (f"{c} 1/50/99 percentiles", f"{q['1']:.3g} / {q['50']:.3g} / {q['99']:.3g}")
            )
    for c, v in (summary.get("per_image_cv_sd_median") or {}).items():
        rows.append((f"median per-image posterior sd of {c}", v))
    cal = summary.get("calibration") or {}
    if cal:
        box = f"{cal['input_box']} px at {cal['input_pixel_size_A']:.3g} A/px"
        work = f"{cal['working_box']} px at {cal['working_pixel_size_A']:.3g} A/px"
        rows += [
            ("contrast", cal.get("contrast")),
            ("noise model", cal.get("noise_model")),
            ("envelope B (A^2, estimated)", cal.get("envelope_bfactor_A2")),
            ("per-image scale and offset", "profiled" if summary.get("fit_scale") else "fixed"),
            ("input box", box),
            (f"working box ({cal.get('working_box_rule')})", work),
        ]
    rows += _regularisation_rows(summary)
    rows = [(k, v) for k, v in rows if v is not None]
    figs = [
        (os.path.join(out_dir, "density.png"), "recovered density (static)"),
        (os.path.join(out_dir, "objective.png"), "objective per step"),
        (os.path.join(out_dir, "trajectories.png"), "particle trajectories of the flow"),
    ]
    fit_png = os.path.join(out_dir, "fit_check.png")
    notes = []
    if not landscape["viewer_pdb"]:
        notes.append("No conformation model was given: no structures or maps were written.")
    write_interactive_report(
        os.path.join(out_dir, "report.html"),
        title=f"cryosip reconstruction: {summary.get('label')}",
        summary=summary,
        frames_pdb=landscape["viewer_pdb"],
        frames=frames,
        start=start,
        xlabel=xlabel,
        xrange=xrange,
        density=density,
        free_energy=fe,
        representation=landscape["representation"],
        radius_scale=1.0,
        summary_rows=rows,
        ensemble_rows=landscape["ensemble_rows"],
        figures=figs,
        files=sorted(files.items()),
        fit_check_png=fit_png if os.path.exists(fit_png) else None,
        notes=notes,
    )


def _regularisation_rows(summary: dict) -> list[tuple[str, str]]:
    """The chosen kernel and the held-out evidence for it; in d > 1 the table's nodes per CV."""
    rows = []
    reg = summary.get("regularisation")
    if reg:
        width = ", ".join(f"{v:.3g}" for v in reg["bandwidth"])
        rows.append(
            (
                "regularisation: kernel sd",
                f"{reg['bandwidth_relative']:g} of each CV's range ({width} in CV units; "
                f"{reg['rule']})",
            )
        )
        if reg.get("heldout_loglik_minus_best"):
            scores = zip(reg["candidates_relative"], reg["heldout_loglik_minus_best"])
            rows.append(
                (
                    "held-out log-likelihood minus the best (nats), per kernel sd",
                    ", ".join(f"{h:g}: {v:.1f}" for h, v in scores),
                )
            )
    table = summary.get("likelihood_table")
    if table:
        err = ", ".join(f"{e:.2g}" for e in table["expected_interpolation_error_nats"])
        rows.append(
            (
                "likelihood table: nodes per CV",
                f"{' x '.join(map(str, table['nodes_per_cv']))} (interpolation error {err} nats)",
            )
        )
    return rows
