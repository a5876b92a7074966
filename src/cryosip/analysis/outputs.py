"""Write a reconstruction's results: CSV tables, plots and a summary."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import _atomic
from . import plots
from .density import bands, free_energy, kde


def density_table(result, lower: float, upper: float, n_grid: int = 201):
    grid = np.linspace(lower, upper, n_grid)
    d = kde(result.positions[:, 0], result.weights, grid, lower=lower, upper=upper)
    reps = [kde(p[:, 0], w, grid, lower=lower, upper=upper) for p, w in result.replicates]
    out = {"grid": grid, "density": d, "free_energy": free_energy(d)}
    if reps:
        R = np.stack(reps)
        out["density_lo"], out["density_hi"] = bands(R)
        F = np.stack([free_energy(r) for r in R])
        out["free_energy_lo"], out["free_energy_hi"] = bands(F)
    return out


def write_reconstruction(
    out_dir, problem, result, cv_names, settings: dict, summary_extra: dict | None = None
) -> dict:
    """particles.csv, distribution.csv, free_energy.csv, history.csv, density/objective/trajectory PNGs, summary.json."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    pos = result.positions
    cols = {name: pos[:, i] for i, name in enumerate(cv_names)}
    _atomic.write_csv(
        os.path.join(out_dir, "particles.csv"), pd.DataFrame({**cols, "weight": result.weights})
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
    if result.trajectory is not None:
        plots.plot_trajectories(
            os.path.join(out_dir, "trajectories.png"), result.trajectory, xlabel=cv_names[0]
        )
    if summary_extra:
        summary.update(summary_extra)
    _atomic.write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary
