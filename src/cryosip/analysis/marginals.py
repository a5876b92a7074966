"""Densities of a recovered distribution in any number of CVs: 1-D marginals with bootstrap
bands and free energies, and the 2-D density / free-energy map of the first two CVs.

A regularised flow's distribution is a kernel mixture (``result.particles`` with
``result.bandwidth``: :mod:`cryosip.sip.smoothing`), so its densities are exact: each particle
contributes a Gaussian of the chosen width (reflected at the domain walls). Other results are
(and a flow whose chosen bandwidth is 0) are smoothed by the package's default KDE width (2.5%
of each CV's range).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .. import _atomic
from .density import bands, free_energy, kde

N_GRID_1D = 201
N_GRID_2D = 81


def _points(result):
    """(positions, weights, replicates, per-CV kernel width or None) to build densities from."""
    bw = getattr(result, "bandwidth", None)
    if bw is not None and bw.relative > 0 and result.particles is not None:
        x, w = result.particles
        return x, w, result.particle_replicates, np.asarray(result.bandwidth.absolute)
    return result.positions, result.weights, result.replicates, None


def marginal(result, axis: int, lower: float, upper: float, n_grid: int = N_GRID_1D) -> dict:
    """The density of CV ``axis`` on a grid, its 90% bootstrap band and free energy (kT)."""
    x, w, reps, h = _points(result)
    bw = None if h is None else float(h[axis])
    grid = np.linspace(lower, upper, n_grid)
    d = kde(np.asarray(x)[:, axis], w, grid, bandwidth=bw, lower=lower, upper=upper)
    out = {"grid": grid, "density": d, "free_energy": free_energy(d)}
    if reps:
        R = np.stack(
            [kde(np.asarray(p)[:, axis], q, grid, bandwidth=bw, lower=lower, upper=upper)
             for p, q in reps]
        )  # fmt: skip
        out["density_lo"], out["density_hi"] = bands(R)
        out["free_energy_lo"], out["free_energy_hi"] = bands(np.stack([free_energy(r) for r in R]))
    return out


def density_2d(result, lower, upper, axes=(0, 1), n_grid: int = N_GRID_2D) -> dict:
    """The joint density of two CVs on an n_grid x n_grid grid (integrates to 1), with the free
    energy -ln rho (kT, minimum 0)."""
    x, w, _, h = _points(result)
    x = np.asarray(x, np.float64)[:, list(axes)]
    w = np.asarray(w, np.float64) / np.sum(w)
    lo, hi = np.asarray(lower, np.float64)[list(axes)], np.asarray(upper, np.float64)[list(axes)]
    bw = 0.025 * (hi - lo) if h is None else np.asarray(h)[list(axes)]
    g = [np.linspace(lo[a], hi[a], n_grid) for a in range(2)]
    k = []
    for a in range(2):  # per-axis Gaussian factors, reflected at both walls
        c = [x[:, a], 2 * lo[a] - x[:, a], 2 * hi[a] - x[:, a]]
        k.append(sum(np.exp(-0.5 * ((g[a][:, None] - ci[None, :]) / bw[a]) ** 2) for ci in c))
    dens = np.einsum("ik,jk,k->ij", k[0], k[1], w)
    dens /= dens.sum() * (g[0][1] - g[0][0]) * (g[1][1] - g[1][0])
    return {"grid": g, "density": dens, "free_energy": free_energy(dens)}


def write_marginals(out_dir, result, lower, upper, cv_names) -> dict:
    """marginals.csv (every CV), landscape_2d.csv (first two CVs) and landscape.png; returns
    what summary.json records about them."""
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    rows = []
    for a, name in enumerate(cv_names):
        m = marginal(result, a, float(lower[a]), float(upper[a]))
        frame = pd.DataFrame({"cv": name, "value": m["grid"], "density": m["density"],
                              "free_energy": m["free_energy"]})  # fmt: skip
        for col in ("density_lo", "density_hi", "free_energy_lo", "free_energy_hi"):
            if col in m:
                frame[col] = m[col]
        rows.append(frame)
    _atomic.write_csv(os.path.join(out_dir, "marginals.csv"), pd.concat(rows, ignore_index=True))
    j = density_2d(result, lower, upper)
    a, b = np.meshgrid(j["grid"][0], j["grid"][1], indexing="ij")
    _atomic.write_csv(
        os.path.join(out_dir, "landscape_2d.csv"),
        pd.DataFrame({cv_names[0]: a.ravel(), cv_names[1]: b.ravel(),
                      "density": j["density"].ravel(), "free_energy": j["free_energy"].ravel()}),
    )  # fmt: skip
    plot_landscape(os.path.join(out_dir, "landscape.png"), result, lower, upper, cv_names, j)
    return {"marginals": "marginals.csv", "landscape_2d": "landscape_2d.csv"}


def plot_landscape(path, result, lower, upper, cv_names, joint=None):
    """The free-energy map of the first two CVs with the particles, and every CV's marginal
    density with its bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    joint = joint or density_2d(result, lower, upper)
    d = len(cv_names)
    fig, ax = plt.subplots(1, 1 + d, figsize=(4.2 * (1 + d), 3.8))
    fe = np.minimum(joint["free_energy"], 8.0)
    im = ax[0].contourf(joint["grid"][0], joint["grid"][1], fe.T, levels=np.arange(0, 8.5, 0.5),
                        cmap="viridis")  # fmt: skip
    fig.colorbar(im, ax=ax[0], label="free energy (kT, capped at 8)")
    x, w, _, _ = _points(result)
    x = np.asarray(x)
    ax[0].scatter(x[:, 0], x[:, 1], s=3 + 120 * np.asarray(w) / np.max(w), c="w",
                  edgecolors="k", linewidths=0.3)  # fmt: skip
    ax[0].set_xlabel(cv_names[0])
    ax[0].set_ylabel(cv_names[1])
    ax[0].set_title("free energy of the first two CVs\n(dots: particles, size = weight)")
    for a in range(d):
        m = marginal(result, a, float(lower[a]), float(upper[a]))
        ax[1 + a].plot(m["grid"], m["density"], "C0")
        if "density_lo" in m:
            ax[1 + a].fill_between(m["grid"], m["density_lo"], m["density_hi"], color="C0",
                                   alpha=0.3, label="90% bootstrap band")  # fmt: skip
            ax[1 + a].legend(fontsize=8)
        ax[1 + a].set_ylim(bottom=0)
        ax[1 + a].set_xlabel(cv_names[a])
        ax[1 + a].set_title(f"marginal density of {cv_names[a]}")
    fig.tight_layout()
    _atomic.savefig(fig, path, dpi=110)
    plt.close(fig)
