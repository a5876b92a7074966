"""Does the model explain the images? A posterior-predictive fit check of a reconstruction.

For up to ``n_images`` evenly spaced images (whitened working units, the likelihood's band):

- each image's most probable recovered particle (posterior over the recovered measure), its
  model image ``m_n`` and the free least-squares scale ``a_n`` and offset ``b_n`` of the image on
  it (computed whether or not the reconstruction profiled them);
- the residual ``y_n - (a_n m_n + b_n)`` (``y_n - m_n`` when the scale was not fitted): its
  power per mode (``chi2``, 1 for pure noise) and its power spectrum by shell.

The *same statistics* are computed on a posterior-predictive replicate: for each image a
conformation drawn from the recovered distribution, rendered with that image's pose and CTF,
scaled as the model says (the image's fitted ``a_n``, ``b_n`` when the scale is profiled, else
1 and 0) plus noise drawn from the noise model. A statistic whose data value is far from the
replicate's (``|z| > 4`` and a material size) is a misfit the noise cannot explain, and a
warning names its likely cause:

==========================================  ====================================================
statistic                                   likely cause
==========================================  ====================================================
spread of ``a_n`` above the replicate's      per-image amplitude (ice, dose) held fixed
most ``a_n`` negative                        contrast sign
residual power above the noise at shells     pose or CTF errors, an envelope, a structure
where the model has signal                   that does not match
residual power off the noise model where     noise colour
there is no signal
MAP conformations piled at the domain ends   the path does not reach the data
==========================================  ====================================================
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..cryoem.noise import n_shells, radial_average, rfft_mode_counts, shell_index
from ..sip.operator import imap_ordered, take_rows

logger = logging.getLogger(__name__)

Z_LIMIT = 4.0
SHELL_TOLERANCE = 0.1  # a shell's residual power off the predicted by more than 10%
CHI2_TOLERANCE = 0.005  # residual power per mode 0.5% above the predicted
# points of the recovered measure scored per image: all of them on a table (a lookup each), a
# resample of the measure on the direct path (one rendering per image and point)
MAX_POINTS_TABLE = 8192
MAX_POINTS_DIRECT = 256
CHUNK = 128  # images rendered and reduced at once


@dataclasses.dataclass
class FitCheck:
    ok: bool
    warnings: list[str]
    statistics: dict
    curves: dict  # arrays for the figure

    def summary(self) -> dict:
        return {"ok": self.ok, "warnings": list(self.warnings), "statistics": self.statistics}


@eqx.filter_jit
def _means(op, theta, nuisance):
    return jax.vmap(op.mean)(theta, nuisance)


@eqx.filter_jit
def _table_loglik(table, pos, idx):
    """The table's (n, P) log-likelihood of rows ``idx`` at ``pos``: one compiled program (op by
    op it compiled ~50 small ones)."""
    return table.log_likelihood_matrix(pos, table.observations().take(idx))


@jax.jit
def log_prior(w):
    """log(max(w, 1e-30)) of float32 weights, as one compiled program."""
    return jnp.log(jnp.clip(w, 1e-30))


@functools.partial(jax.jit, static_argnames=("shape",))
def _replicate_draws(key, w, shape):
    """The replicate's particle per image (drawn from the weights ``w``) and its unit noise
    (``shape``: the images'), from ``key``: one compiled program."""
    k_draw, k_noise = jax.random.split(key)
    draw = jax.random.choice(k_draw, w.shape[0], (shape[0],), p=w)
    return draw, jax.random.normal(k_noise, shape, jnp.float32)


def _stats(y, m, keep, fit_scale: bool):
    """Per-image free scale/offset and chi2 per mode, and the residual power per rfft2 mode
    summed over the images (in the band)."""
    n, D = y.shape[0], y.shape[-1]
    yf, mf = y.reshape(n, -1), m.reshape(n, -1)
    yc, mc = yf - yf.mean(1, keepdims=True), mf - mf.mean(1, keepdims=True)
    a = (yc * mc).sum(1) / np.maximum((mc * mc).sum(1), 1e-30)
    b = yf.mean(1) - a * mf.mean(1)
    if fit_scale:
        r = y - (np.maximum(a, 0.0)[:, None, None] * m + b[:, None, None])
    else:
        r = y - m
    R = np.fft.rfft2(r.astype(np.float64)) * keep
    w = rfft_mode_counts(D) * keep
    pw = np.abs(R) ** 2 / D**2
    chi2 = (pw * w).sum(axis=(1, 2)) / max(w.sum(), 1.0)
    return a, b, chi2, pw.sum(0)


def _support(w: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The points that carry the measure (indices, weights summing to 1): those with mass (a
    grid's empty nodes cost renders and carry none), and above ``max_points`` a systematic
    resample of the measure (equal-weight quantiles of its mass, repeats merged). Never the
    heaviest ``max_points`` alone: a smoothed measure's points have equal weights, and a
    cut-off drops whole particles (on a 300-image cryojax set the 256 heaviest of 1,088 points
    held 25 % of the mass, and the check saw the missing conformations as misfit)."""
    keep = np.flatnonzero(w > 1e-4 * w.max())
    if len(keep) <= max_points:
        return keep, w[keep] / w[keep].sum()
    c = np.cumsum(w[keep])
    pick = np.searchsorted(c, (np.arange(max_points) + 0.5) / max_points * c[-1])
    idx, counts = np.unique(np.minimum(pick, len(keep) - 1), return_counts=True)
    return keep[idx], counts / counts.sum()


def fit_check(problem, result, *, key, n_images: int = 1024) -> FitCheck:
    """Run the check on ``problem`` (a prepared :class:`~cryosip.pipeline.problem.Problem`) and a
    method's ``result`` (positions, weights)."""
    op = problem.operator
    cal = problem.calibration
    obs_all = problem.observations
    n_all = len(obs_all)
    idx = np.unique(np.linspace(0, n_all - 1, min(n_all, n_images)).round().astype(np.int64))
    # host-side bookkeeping in NumPy or compiled programs (eager jnp compiles a program per
    # operation and shape)
    obs = take_rows(obs_all, idx.astype(np.int32))
    keep_p, w = _support(
        np.asarray(result.weights, np.float64),
        MAX_POINTS_TABLE if problem.table is not None else MAX_POINTS_DIRECT,
    )
    pos = np.asarray(np.asarray(result.positions)[keep_p], np.float32)
    logw = np.asarray(log_prior(w.astype(np.float32)))
    if problem.table is not None:
        ll = np.asarray(_table_loglik(problem.table, pos, idx.astype(np.int32)))
    else:
        ll = np.asarray(op.log_likelihood_matrix(pos, obs, batch_size=64))
    best = np.argmax(ll + logw[None, :], axis=1)
    D = cal.box_size
    keep = np.asarray(np.asarray(cal.noise.whitening())[0] > 0, np.float64)  # likelihood's band
    fit_scale = bool(op.fit_scale)

    # posterior-predictive replicate: same nuisances, conformations from the recovered law.
    # Both sets of images are rendered and reduced CHUNK images at a time, chunks on two threads
    # (:func:`~cryosip.sip.operator.imap_ordered`): memory stays at a few chunks, not 1,024
    # images x 8 arrays (a whole-set pass allocated ~400 MB, and fresh memory is not free)
    draw, noise = _replicate_draws(key, w.astype(np.float32), tuple(obs.values.shape))
    draw, noise = np.asarray(draw), np.asarray(noise)
    n = len(idx)

    def chunk(s: int):
        rows = np.minimum(np.arange(s, s + CHUNK), n - 1).astype(np.int32)
        part = take_rows(obs, rows)
        m = np.asarray(_means(op, pos[best[rows]], part.nuisance), np.float64)
        m_rep = np.asarray(_means(op, pos[draw[rows]], part.nuisance), np.float64)
        c = min(CHUNK, n - s)
        y = np.asarray(part.values, np.float64)[:c]
        m, m_rep = m[:c], m_rep[:c]
        data = _stats(y, m, keep, fit_scale)
        e = np.fft.irfft2(np.fft.rfft2(noise[s : s + c].astype(np.float64)) * keep, s=(D, D))
        if fit_scale:
            y_rep = np.maximum(data[0], 0.0)[:, None, None] * m_rep + data[1][:, None, None] + e
        else:
            y_rep = m_rep + e
        sig = (np.abs(np.fft.rfft2(m)) ** 2).sum(0)
        return data, _stats(y_rep, m_rep, keep, fit_scale), sig

    parts = list(imap_ordered(chunk, range(0, n, CHUNK)))

    def pooled(j: int):  # scales and chi2 per image, residual power averaged over the images
        a_, _, chi2_, pw_sum = zip(*(p[j] for p in parts))
        return np.concatenate(a_), np.concatenate(chi2_), radial_average(sum(pw_sum) / n, D)

    (a, chi2, spec), (a_r, chi2_r, spec_r) = pooled(0), pooled(1)
    sig = radial_average(sum(p[2] for p in parts) / n / D**2, D)

    se = lambda v: np.sqrt(np.var(v) / n)  # noqa: E731
    stats = {"n_images": int(n), "fit_scale": fit_scale}
    warnings = []

    # 1. per-image amplitude
    var_d, var_r = float(np.var(a)), float(np.var(a_r))
    se_var = np.sqrt(2.0 / max(n - 1, 1)) * np.sqrt(var_d**2 + var_r**2)
    z_scale = (var_d - var_r) / max(se_var, 1e-30)
    stats.update(
        scale_mean=float(np.mean(a)),
        scale_sd=float(np.sqrt(var_d)),
        scale_sd_predicted=float(np.sqrt(var_r)),
        scale_spread_z=float(z_scale),
    )
    if not fit_scale and z_scale > Z_LIMIT:
        extra = np.sqrt(max(var_d - var_r, 0.0)) / max(abs(float(np.mean(a))), 1e-30)
        warnings.append(
            f"per-image amplitude: the images' fitted scales spread {np.sqrt(var_d):.3g} against "
            f"{np.sqrt(var_r):.3g} expected from noise (z = {z_scale:.1f}; about {100 * extra:.0f}% "
            "amplitude variation) while the model holds it fixed: run with --fit-scale"
        )

    # 2. contrast sign
    neg_d, neg_r = float(np.mean(a < 0)), float(np.mean(a_r < 0))
    stats.update(negative_scale_fraction=neg_d, negative_scale_fraction_predicted=neg_r)
    if neg_d > neg_r + 0.2 and neg_d > 0.5:
        warnings.append(
            f"contrast sign: {100 * neg_d:.0f}% of the images fit the model with a negative scale "
            f"(expected {100 * neg_r:.0f}%): check --contrast"
        )

    # 3. residual power per mode
    z_chi2 = (chi2.mean() - chi2_r.mean()) / max(np.hypot(se(chi2), se(chi2_r)), 1e-30)
    rel = chi2.mean() / max(chi2_r.mean(), 1e-30) - 1.0
    stats.update(
        chi2_per_mode=float(chi2.mean()),
        chi2_per_mode_predicted=float(chi2_r.mean()),
        chi2_excess=float(rel),
        chi2_z=float(z_chi2),
    )

    # 4. residual spectrum by shell, split by where the model has signal
    D_sh = n_shells(D)
    counts = np.bincount(
        shell_index(D).ravel(), weights=(rfft_mode_counts(D) * keep).ravel(), minlength=D_sh
    )
    valid = counts > 0
    valid[0] = False  # the DC mode: taken by the offset, not noise
    ratio = np.where(valid, spec / np.maximum(spec_r, 1e-30), np.nan)
    # sampling error of a shell's mean power, for the data and for the noise model's own
    # estimate (from as many pilot images): twice the variance of one
    se_shell = np.where(valid, np.sqrt(4.0 / np.maximum(n * counts, 1.0)), np.nan)
    signal_shells = valid & (sig > 0.05 * np.nanmax(np.where(valid, sig, np.nan)))
    dev = np.where(valid, (ratio - 1.0) / se_shell, 0.0)
    bad = valid & (np.abs(dev) > Z_LIMIT) & (np.abs(ratio - 1.0) > SHELL_TOLERANCE)
    freq = np.arange(D_sh) / (D * cal.pixel_size)
    dev_max = np.nanmax(np.abs(np.where(valid, ratio - 1.0, np.nan)))
    stats.update(
        residual_spectrum_max_deviation=float(dev_max),
        residual_spectrum_bad_shells=int(bad.sum()),
    )
    excess = bad & signal_shells & (ratio > 1.0)
    colour = bad & ~excess
    if colour.sum() >= 2:  # one stray shell among dozens is not a colour
        f = freq[bad]
        warnings.append(
            f"noise colour: the residual power departs from the noise model at {f.min():.3g}-"
            f"{f.max():.3g} 1/A (try --noise coloured, or check the particle normalisation)"
        )
    # excess power where the model has signal is the model's only when the noise model holds
    # elsewhere (a wrong noise colour puts excess there too)
    if (excess.any() and colour.sum() < 2) or (z_chi2 > Z_LIMIT and rel > CHI2_TOLERANCE):
        f = freq[excess]
        where = f" at {f.min():.3g}-{f.max():.3g} 1/A" if f.size else ""
        warnings.append(
            f"signal left in the residuals{where} (residual power {100 * rel:+.1f}% against the "
            f"noise, z = {z_chi2:.1f}): pose or CTF errors, an envelope, or structures that do "
            "not match the particles"
        )

    # 5. MAP conformations at the ends of the domain
    lo, hi = np.asarray(problem.lower, np.float64), np.asarray(problem.upper, np.float64)
    if np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)):
        u = (np.asarray(pos, np.float64) - lo) / (hi - lo)
        edge = np.any((u < 0.02) | (u > 0.98), axis=1)
        end_mass = float(w[edge].sum())
        stats["mass_at_domain_ends"] = end_mass
        if end_mass > 0.2:
            warnings.append(
                f"{100 * end_mass:.0f}% of the recovered population sits at the ends of the CV "
                "range: the path (the model's structures) may not reach the conformations in the "
                "data"
            )
    ok = not warnings
    for msg in warnings:
        logger.warning("fit check: %s", msg)
    if ok:
        logger.info("fit check: the model explains the images within the noise")
    curves = dict(
        frequency=freq,
        residual_spectrum=spec,
        residual_spectrum_predicted=spec_r,
        valid=valid,
        chi2=chi2,
        chi2_predicted=chi2_r,
        scale=a,
        scale_predicted=a_r,
    )
    return FitCheck(ok, warnings, stats, curves)


def plot_fit_check(path, check: FitCheck) -> None:
    """Four panels: residual spectrum, chi2, fitted scales (data against the replicate), verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import _atomic

    c = check.curves
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    v = c["valid"]
    ax[0].plot(c["frequency"][v], c["residual_spectrum"][v], label="data")
    ax[0].plot(c["frequency"][v], c["residual_spectrum_predicted"][v], "--", label="predicted")
    ax[0].set_xlabel("spatial frequency (1/A)")
    ax[0].set_ylabel("residual power (whitened; noise = 1)")
    ax[0].set_title("residual spectrum")
    ax[0].legend()
    for axis, key, xlabel, title in (
        (ax[1], "chi2", "residual power per mode", "per-image residuals"),
        (ax[2], "scale", "fitted per-image scale", "per-image amplitude"),
    ):
        data, rep = c[key], c[f"{key}_predicted"]
        bins = np.linspace(min(data.min(), rep.min()), max(data.max(), rep.max()), 40)
        axis.hist(data, bins, alpha=0.6, label="data")
        axis.hist(rep, bins, alpha=0.6, label="predicted")
        axis.set_xlabel(xlabel)
        axis.set_title(title)
        axis.legend()
    verdict = (
        "fit check: OK"
        if check.ok
        else "fit check: " + "; ".join(w.split(":")[0] for w in check.warnings)
    )
    fig.suptitle(verdict, color="black" if check.ok else "firebrick")
    fig.tight_layout()
    _atomic.savefig(fig, path, dpi=110)
    plt.close(fig)
