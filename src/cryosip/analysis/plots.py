"""Figures: densities against truth, objective curves, particle trajectories, free energy, montages."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .._atomic import savefig  # noqa: E402

COLORS = {
    "truth": "k",
    "wgf-kl": "C0",
    "wgf-mmd": "C1",
    "wgf-kl+mmd": "C2",
    "em-grid": "C3",
    "per-image": "C7",
    "map-classes": "C4",
    "gmm": "C5",
    "wgf-mmd-unconditional": "C6",
}


def _curves(ax, grid, curves: dict, bands, truth, xlabel: str, ylabel: str) -> None:
    """The truth (dashed), one line per label with its band (``bands[label] = (lo, hi)``)."""
    if truth is not None:
        ax.plot(grid, truth, "k--", lw=2, label="truth")
    for lab, y in curves.items():
        c = COLORS.get(lab)
        ax.plot(grid, y, lw=1.8, label=lab, color=c)
        if bands and lab in bands:
            ax.fill_between(grid, *bands[lab], color=c, alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _save(fig, ax, path) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path, dpi=110)
    plt.close(fig)


def plot_densities(
    path, grid, curves: dict, truth_pdf=None, truth_hist=None, xlabel="CV", title=None, bands=None
):
    """curves: label -> density on grid; bands: label -> (lo, hi)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if truth_hist is not None:
        ax.hist(truth_hist, bins=40, density=True, color="0.85", label="true CVs (histogram)")
    _curves(ax, grid, curves, bands, truth_pdf, xlabel, "density")
    if title:
        ax.set_title(title)
    _save(fig, ax, path)


def plot_free_energy(path, grid, curves: dict, bands=None, truth=None, xlabel="CV"):
    fig, ax = plt.subplots(figsize=(7, 4))
    _curves(ax, grid, curves, bands, truth, xlabel, "free energy (kT)")
    ax.set_ylim(0, 8)
    _save(fig, ax, path)


def plot_objectives(path, histories: dict):
    fig, axes = plt.subplots(
        1, max(1, len(histories)), figsize=(4 * max(1, len(histories)), 3.2), squeeze=False
    )
    for ax, (lab, h) in zip(axes[0], histories.items()):
        h = np.asarray(h)
        ok = np.isfinite(h)
        ax.plot(np.arange(h.size)[ok], h[ok], color=COLORS.get(lab, "C0"))
        ax.set_title(lab)
        ax.set_xlabel("step")
        ax.set_ylabel("objective")
    fig.tight_layout()
    savefig(fig, path, dpi=100)
    plt.close(fig)


def plot_trajectories(path, trajectory, xlabel="CV", title="particle trajectories"):
    """trajectory: (n_records, n_particles, dim); plots dim 0 against step."""
    t = np.asarray(trajectory)[..., 0]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, color="C0", lw=0.6, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    savefig(fig, path, dpi=100)
    plt.close(fig)


def plot_montage(path, noisy, clean, n: int = 8, title=None):
    n = min(n, len(noisy))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4))
    for i in range(n):
        for r, img in enumerate((noisy[i], clean[i])):
            axes[r, i].imshow(img, cmap="gray")
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    axes[0, 0].set_ylabel("noisy")
    axes[1, 0].set_ylabel("noise-free")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    savefig(fig, path, dpi=90)
    plt.close(fig)
