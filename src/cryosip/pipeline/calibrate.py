"""Calibration: what the files do not say, estimated from the images before any reconstruction.

Real particle stacks carry nuisances a STAR file does not state: the contrast sign (RELION
extracts with white protein), the noise colour of each optics group, an envelope (B-factor,
detector MTF, the blur left by small pose errors), and a box far larger than the signal the CV
changes. :func:`calibrate` estimates each from a *pilot* of at most ``n_pilot`` evenly spaced
images, in this order (``docs/noise.md`` states the rules and their measured effect):

1. **Best coarse conformation per image.** Every pilot image is compared with the model at a
   few CV points (the centre and +-0.2/+-0.4 of the range along each CV) under its own pose and
   CTF; each image keeps the point whose least-squares fit (scale and offset profiled) explains
   most of its power. This keeps the CV's own signal out of the residuals below.
2. **Contrast sign**: the pooled least-squares scale of the images on those model images
   (negative: white protein; the images are then inverted).
3. **Noise spectrum**, per optics group: the radially averaged power of the residuals
   ``y - a m - b`` (:meth:`~cryosip.cryoem.noise.RadialNoiseSpectrum.estimate`), as RELION
   estimates its noise model; ``noise="white"`` keeps only its mean.
4. **Envelope** ``exp(-B k^2 / 4)``: the B (0-500 A^2, on a grid) that maximises the pooled
   whitened fit ``(sum_k e_k c_k)^2 / sum_k e_k^2 g_k`` of the model to the images over
   frequency shells except DC, which holds each image's free offset (with it, the constant
   offset of 0.5 on the cryojax images of ``tests/cli/test_cryojax_data.py`` outweighed every
   other shell and drove B to the top of the grid); it is added to every particle's CTF
   B-factor. Steps 3-4 run twice.
5. **Working box**: the CV's signal per shell is the variance, across the coarse CV points, of
   the whitened model images; the *information cutoff* is the shell below which 98% of it lies.
   The images are Fourier-cropped to the smallest even box whose 3/4-Nyquist holds that shell
   (at least 24 pixels, at most the input box); modes above the cutoff leave the likelihood.
   ``box_size`` given: that box, cutoff at its 3/4-Nyquist.

The result is the working stack and a :class:`Calibration` that maps observed images to the
whitened, sign-corrected working units (:meth:`Calibration.transform`) and holds the image model
that renders in the same units (:meth:`Calibration.image_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..conformations.base import AbstractConformationModel
from ..cryoem.image_model import ImageModel
from ..cryoem.noise import (
    RadialNoiseSpectrum,
    n_shells,
    radial_average,
    rfft_mode_counts,
    shell_index,
)
from ..data.particles import ParticleStack, downsample, working_pixel_size
from ..data.streaming import read_rows
from ..sip.operator import Observations, imap_ordered

logger = logging.getLogger(__name__)

INFORMATION_FRACTION = 0.98
NYQUIST_FRACTION = 0.75
MIN_WORKING_BOX = 24
BFACTOR_GRID = np.arange(0.0, 501.0, 10.0)
# a rotation error this large (rms, degrees) is averaged over in the likelihood by default: at
# 25-30 A radius it moves atoms by ~1.5 A per image, beyond what a mean blur (the envelope)
# describes; typical consensus refinements (1-2 degrees) stay below it
POSE_ERROR_MATTERS_DEG = 3.0


def group_ids(stack: ParticleStack) -> np.ndarray:
    """Each particle's optics group, 0-based (0 when the input has none)."""
    f = getattr(stack, "group_ids", None)
    if callable(f):
        return np.asarray(f(), np.int32)
    meta = stack.metadata
    if meta is not None and "rlnOpticsGroup" in meta:
        g = np.asarray(meta["rlnOpticsGroup"])
        _, inv = np.unique(g, return_inverse=True)
        return inv.astype(np.int32)
    return np.zeros(len(stack), np.int32)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found; maps data into the working units of the likelihood."""

    inverted: bool
    pooled_scale: float
    noise: RadialNoiseSpectrum  # on the working grid, with its cutoff
    noise_kind: str
    bfactor_in_angstroms2: float
    native_box: int
    native_pixel_size: float
    box_size: int
    pixel_size: float
    box_rule: str
    information_cutoff_per_A: float | None
    information_kept: float | None
    n_pilot: int
    input_noise_sigma: tuple[float, ...]  # pixel sd of each group's noise in the input images
    pose_error: dict | None = None  # estimate_pose_error's result (None: not estimated)

    @property
    def pose_error_matters(self) -> tuple[float, float] | None:
        """(rms degrees, rms Angstrom) when the estimated pose error is large enough that the
        envelope no longer stands for it (see POSE_ERROR_MATTERS_DEG), else None."""
        e = self.pose_error
        if e is None or not (
            e["rotation_deg"] >= POSE_ERROR_MATTERS_DEG and e["rotation_deg_z"] > 4
        ):
            return None
        return e["rotation_deg"], e["shift_A"]

    def image_model(self, atoms) -> ImageModel:
        """Renders on the working grid, anti-aliased when cropped, whitened like the data."""
        return ImageModel.for_atoms(
            self.box_size,
            self.pixel_size,
            atoms,
            native_pixel_size=self.native_pixel_size,
            fourier_filter=self.noise.whitening(),
        )

    def transform_values(self, values, group):
        """Sign-correct and whiten images (n, D, D) on the working grid (JAX arrays)."""
        return _transform_values(
            values, group, self.noise.whitening(), inverted=self.inverted, box=self.box_size
        )

    def transform(self, obs: Observations) -> Observations:
        """Observations in working units (their nuisance carries the group)."""
        g = obs.nuisance.group
        g = np.zeros((len(obs),), np.int32) if g is None else g
        return Observations(
            self.transform_values(obs.values, g), obs.nuisance, obs.index, obs.weight
        )

    def summary(self) -> dict:
        return {
            "contrast": "inverted (white protein), flipped" if self.inverted else "as is",
            "pooled_scale": self.pooled_scale,
            "noise_model": self.noise_kind,
            "noise_sigma_per_group": list(self.input_noise_sigma),
            "envelope_bfactor_A2": self.bfactor_in_angstroms2,
            "input_box": self.native_box,
            "input_pixel_size_A": self.native_pixel_size,
            "working_box": self.box_size,
            "working_pixel_size_A": self.pixel_size,
            "working_box_rule": self.box_rule,
            "likelihood_cutoff_per_A": (
                None
                if self.noise.cutoff_shell is None
                else self.noise.cutoff_shell / (self.box_size * self.pixel_size)
            ),
            "information_cutoff_per_A": self.information_cutoff_per_A,
            "information_kept": self.information_kept,
            "n_pilot_images": self.n_pilot,
            "pose_error_estimate": self.pose_error,
        }


def _host(a) -> np.ndarray:
    """``a`` as the NumPy array ``jnp.asarray`` would make of it (float64 -> float32, ...): host
    bookkeeping without an eager device copy (a compiled program per shape and dtype)."""
    a = np.asarray(a)
    return a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)


@functools.partial(jax.jit, static_argnames=("inverted", "box"))
def _transform_values(values, group, whitening, *, inverted: bool, box: int):
    """:meth:`Calibration.transform_values` as one compiled program (op by op: ~15 programs)."""
    y = -values if inverted else values
    w = whitening[jnp.asarray(group, jnp.int32)]
    f = jnp.fft.rfft2(y)
    f = f * w.astype(f.dtype)  # explicit: what standard promotion does (tests run strict)
    return jnp.fft.irfft2(f, s=(box, box)).astype(jnp.float32)


def probe_points(conformation: AbstractConformationModel) -> np.ndarray:
    """CV points for the coarse fit: the centre and +-0.2/+-0.4 of the range along each CV."""
    lo, hi = (np.asarray(b, np.float64) for b in (conformation.lower, conformation.upper))
    finite = np.isfinite(lo) & np.isfinite(hi)
    centre = np.where(finite, 0.5 * (lo + hi), 0.0)
    width = np.where(finite, hi - lo, 2.0)
    pts = [centre]
    for i in range(conformation.dim):
        for f in (-0.4, -0.2, 0.2, 0.4):
            p = centre.copy()
            p[i] += f * width[i]
            pts.append(p)
    return np.asarray(pts, np.float32)


def _ls_fit(y, m):
    """Per row least-squares scale and offset of y on m (flattened): (a, b, explained power)."""
    yc = y - y.mean(-1, keepdims=True)
    mc = m - m.mean(-1, keepdims=True)
    mm = np.maximum((mc * mc).sum(-1), 1e-30)
    ym = (yc * mc).sum(-1)
    a = ym / mm
    b = y.mean(-1) - a * m.mean(-1)
    return a, b, ym * ym / mm


@eqx.filter_jit
def _pair_means(op, points, nuisance):
    return op.node_means(points, nuisance)  # the probe points are shared by every image


class _Pilot:
    """Pilot images (float32, input grid) and their nuisances; renders the model at the probe
    points chunk by chunk, so memory stays at ``chunk x points`` images whatever the box."""

    def __init__(self, stack, conformation, idx, *, chunk=32):
        self.D, self.p = stack.box_size, float(stack.pixel_size)
        self.groups = group_ids(stack)[idx]
        self.images = read_rows(stack.images, idx)  # no file pages left in the RSS
        self.nuisance = jax.tree_util.tree_map(lambda a: np.asarray(a[idx]), stack.nuisance)
        self.points = probe_points(conformation)
        self.conformation = conformation
        self.chunk = chunk

    def chunks(self, bfactor: float, n: int | None = None):
        """(start, model images (c, K, D, D) at the probe points) with an added envelope B."""
        from .operator import CryoEMOperator

        op = CryoEMOperator(
            self.conformation, ImageModel.for_atoms(self.D, self.p, self.conformation.atoms), 1.0
        )
        nu = self.nuisance
        ctf = dataclasses.replace(
            nu.ctf, bfactor_in_angstroms2=nu.ctf.bfactor_in_angstroms2 + bfactor
        )
        nu = dataclasses.replace(nu, ctf=ctf)
        pts = self.points  # NumPy: handed to the compiled program as is (no eager copies)
        n = len(self.images) if n is None else min(n, len(self.images))

        def render(s):
            sub = jax.tree_util.tree_map(lambda a: _host(a[s : min(n, s + self.chunk)]), nu)
            return s, np.asarray(_pair_means(op, pts, sub), np.float64)

        yield from imap_ordered(render, range(0, n, self.chunk))


def _residual_pass(pilot: _Pilot, bfactor: float):
    """Best probe per image, its LS scale and offset, the residual images, and the per-shell
    cross and Gram statistics of the best model image for the envelope fit."""
    n, D = len(pilot.images), pilot.D
    a_b, b_b = np.empty(n), np.empty(n)
    best = np.empty(n, np.int64)
    resid = np.empty((n, D, D), np.float32)
    cross, gram = np.empty((n, n_shells(D))), np.empty((n, n_shells(D)))
    for s, M in pilot.chunks(bfactor):
        c, K = M.shape[0], M.shape[1]
        y = pilot.images[s : s + c].reshape(c, -1).astype(np.float64)
        m = M.reshape(c, K, -1)
        a, b, gain = _ls_fit(y[:, None, :], m)  # (c, K)
        k = np.argmax(gain, axis=1)
        rows = np.arange(c)
        best[s : s + c], a_b[s : s + c], b_b[s : s + c] = k, a[rows, k], b[rows, k]
        mb = m[rows, k]
        resid[s : s + c] = (y - a[rows, k][:, None] * mb - b[rows, k][:, None]).reshape(c, D, D)
        Y = np.fft.rfft2(y.reshape(c, D, D))
        Mb = np.fft.rfft2(mb.reshape(c, D, D))
        cross[s : s + c] = radial_average((Y * np.conj(Mb)).real, D)  # per-mode shell means
        gram[s : s + c] = radial_average(np.abs(Mb) ** 2, D)
    return dict(a=a_b, b=b_b, best=best, resid=resid, cross=cross, gram=gram)


def _fit_bfactor(stats, noise: RadialNoiseSpectrum, groups, box: int, pixel: float) -> float:
    """The envelope B maximising the pooled whitened fit over shells (see the module doc)."""
    counts = np.bincount(
        shell_index(box).ravel(), weights=rfft_mode_counts(box).ravel(), minlength=n_shells(box)
    )
    counts[0] = 0.0  # the DC shell is the per-image offset, a free nuisance: it says nothing of B
    P = np.asarray(noise.power, np.float64)[groups]  # (n, shells)
    c = (stats["cross"] * counts / P).sum(0)
    g = (stats["gram"] * counts / P).sum(0)
    k2 = (np.arange(n_shells(box)) / (box * pixel)) ** 2
    best, best_val = 0.0, -np.inf
    for B in BFACTOR_GRID:
        e = np.exp(-0.25 * B * k2)
        val = (e @ c) ** 2 / max(float((e * e) @ g), 1e-300)
        if val > best_val:
            best, best_val = float(B), val
    return best


def _information(
    pilot: _Pilot, stats, bfactor: float, noise: RadialNoiseSpectrum, n_images: int = 64
) -> np.ndarray:
    """CV signal per shell: the variance across probe points of the whitened model images
    (scaled by each image's fitted amplitude), summed over modes, averaged over images."""
    D = pilot.D
    P = np.asarray(noise.grid(), np.float64) * D**2
    total, count = np.zeros((D, D // 2 + 1)), 0
    for s, M in pilot.chunks(bfactor, n_images):
        c = M.shape[0]
        F = np.fft.rfft2(M)  # (c, K, D, D/2+1)
        var = (np.abs(F - F.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)
        var *= (stats["a"][s : s + c] ** 2)[:, None, None]
        total += (var / P[pilot.groups[s : s + c]]).sum(axis=0)
        count += c
    per_mode = total / max(count, 1) * rfft_mode_counts(D)
    return np.bincount(shell_index(D).ravel(), weights=per_mode.ravel(), minlength=n_shells(D))


def _candidate_perturbations():
    """Local-search candidates: 48 rotations (16 Fibonacci axes x 1.5/3/4.5 degrees) and 48
    in-plane shifts (7 x 7 grid of 0.5 A steps), each with the identity first."""
    from ..cryoem.pose import axis_angle_to_matrix

    i = np.arange(16) + 0.5
    z = 1 - 2 * i / 16
    r, phi = np.sqrt(1 - z * z), np.pi * (1 + 5**0.5) * i
    axes = np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)
    vecs = np.concatenate([np.zeros((1, 3))] + [axes * np.deg2rad(a) for a in (1.5, 3.0, 4.5)])
    g = np.arange(-3, 4) * 0.5
    shifts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    shifts = shifts[np.argsort(np.hypot(*shifts.T), kind="stable")]  # identity first
    # one compiled program (op by op it compiled ~20 small ones)
    rots = np.asarray(jax.jit(axis_angle_to_matrix)(vecs.astype(np.float32)))
    return rots, np.degrees(np.linalg.norm(vecs, axis=1)), shifts


@eqx.filter_jit
def _perturbed_fits(op, theta, nuisance, y, rots, shifts, replicate=None):
    """LS fit gain of images on their model under each candidate perturbation: (k, c, R + S)
    for ``y`` (k, c, D, D), k images per row fitted on row c's model (the data and its
    replicate share the renders), the R rotations ``rots`` (shift as given), then the S shifts
    ``shifts`` (rotation as given). ``replicate`` (a (c,), noise (c, D, D)): one more image per
    row, ``a`` times the row's model at its given pose plus ``noise`` (k + 1 in all).

    Nothing is rendered twice: each image's structure once, R projections per image (all c x R
    of them one flat batch, as in :meth:`~cryosip.pipeline.operator.CryoEMOperator.node_means`:
    a vmap over images of a vmap over candidates would hide the projector's batching rule and
    run ~5x slower) and one at the given rotation, whose Fourier transform times each shifted
    transfer (CTF, shift phase, filter) gives the S shift candidates. The same images as
    rendering every (image, candidate) pair with ``op.mean`` (``tests/pipeline/
    test_pose_search_kernel.py``), at (R + 1) / (R + S) of the projections, shared by the k."""
    from .pose_marginal import perturb_nuisance

    im, atoms = op.image_model, op.conformation.atoms
    c, r, s, d = theta.shape[0], rots.shape[0], shifts.shape[0], im.box_size
    coords = jax.vmap(op.conformation)(theta)  # (c, atoms, 3)
    # rotation candidates: rows i * R + j; each image's transfer (its own shift) once
    rot = perturb_nuisance(
        jax.tree_util.tree_map(lambda a: jnp.repeat(a, r, axis=0), nuisance),
        jnp.tile(rots, (c, 1, 1)),
        jnp.zeros((c * r, 2), rots.dtype),
    ).rotation
    proj = jax.vmap(lambda x, q: im.project(x, atoms, q))(jnp.repeat(coords, r, axis=0), rot)
    own = jax.vmap(im.transfer)(nuisance)  # (c, D, D/2+1)
    f_rot = jnp.fft.rfft2(proj).reshape(c, r, d, d // 2 + 1) * own[:, None]
    # shift candidates: the projection at the given rotation, each shift's transfer
    proj0 = jax.vmap(lambda x, q: im.project(x, atoms, q))(coords, nuisance.rotation)
    moved = perturb_nuisance(
        jax.tree_util.tree_map(lambda a: jnp.repeat(a, s, axis=0), nuisance),
        jnp.broadcast_to(jnp.eye(3, dtype=rots.dtype), (c * s, 3, 3)),
        jnp.tile(shifts, (c, 1)),
    )
    f0 = jnp.fft.rfft2(proj0)
    f_shift = f0[:, None] * jax.vmap(im.transfer)(moved).reshape(c, s, d, d // 2 + 1)
    if replicate is not None:  # the model at the given pose: op.mean's render, from f0
        a, noise = replicate
        clean = jnp.fft.irfft2(f0 * own, s=(d, d))
        y = jnp.concatenate([y, (a[:, None, None] * clean + noise)[None]])
    ms = jnp.fft.irfft2(jnp.concatenate([f_rot, f_shift], axis=1), s=(d, d)).reshape(c, r + s, -1)
    yc = y.reshape(y.shape[0], c, -1)
    yc = yc - yc.mean(axis=2, keepdims=True)
    mc = ms - ms.mean(axis=2, keepdims=True)
    norm = jnp.maximum(jnp.sum(mc * mc, axis=2), 1e-30)
    return jnp.einsum("crp,kcp->kcr", mc, yc) ** 2 / norm


def estimate_pose_error(pilot, stats, bfactor, spec, n_images: int = 64, key=None, chunk: int = 16):
    """Rms rotation (degrees) and shift (Angstrom) errors of the given poses, by local search.

    Each of ``n_images`` pilot images (whitened) is fitted at its best coarse conformation under
    every candidate rotation (then shift) perturbation, and the best candidate's size is kept.
    Noise alone moves the best candidate too, so the same search runs on a replicate: each
    image's model at its given pose, scaled as fitted, plus noise from the noise model. The
    estimate is ``sqrt(max(0, rms_data^2 - rms_replicate^2))`` with its standard error.
    """
    from .operator import CryoEMOperator

    m = min(n_images, len(pilot.images))
    op = CryoEMOperator(
        pilot.conformation,
        ImageModel.for_atoms(
            pilot.D, pilot.p, pilot.conformation.atoms, fourier_filter=spec.whitening()
        ),
        1.0,
    )
    # host-side bookkeeping in NumPy (as float32, what the compiled program is handed)
    nu = jax.tree_util.tree_map(lambda a: _host(a[:m]), pilot.nuisance)
    ctf = dataclasses.replace(
        nu.ctf, bfactor_in_angstroms2=nu.ctf.bfactor_in_angstroms2 + np.float32(bfactor)
    )
    nu = dataclasses.replace(nu, ctf=ctf, group=np.asarray(pilot.groups[:m], np.int32))
    theta = np.asarray(pilot.points[stats["best"][:m]], np.float32)
    y = np.asarray(spec.whiten(pilot.images[:m], pilot.groups[:m]), np.float32)
    a = np.asarray(stats["a"][:m], np.float32)
    key = jax.random.key(0) if key is None else key
    noise = np.asarray(jax.random.normal(key, y.shape, jnp.float32))  # whitened: unit noise
    rots, angles, shifts = _candidate_perturbations()
    # every candidate (rotations, then shifts) on the data and on its replicate (each image's
    # model at its given pose, scaled as fitted, plus the noise; one set of renders for both):
    # one compiled program, run on chunks of images so that memory stays at chunk x candidates
    all_rots = np.asarray(rots, np.float32)
    all_shifts = np.asarray(shifts, np.float32)
    y = y[None]

    def fits(s):
        idx = np.minimum(np.arange(s, s + chunk), m - 1)  # one compiled shape
        sub = jax.tree_util.tree_map(lambda a: a[idx], nu)
        rep = (a[idx], noise[idx])
        g = _perturbed_fits(op, theta[idx], sub, y[:, idx], all_rots, all_shifts, rep)
        return np.asarray(g)[:, : min(chunk, m - s)]

    gains = list(imap_ordered(fits, range(0, m, chunk)))
    gains = np.concatenate(gains, axis=1).reshape(2 * m, -1)  # rows [data; replicate]
    out = {}
    nr = len(rots)
    for name, cols, size in (
        ("rotation_deg", slice(0, nr), angles),
        ("shift_A", slice(nr, None), np.hypot(*shifts.T)),
    ):
        best = {
            "data": size[np.argmax(gains[:m, cols], axis=1)],
            "replicate": size[np.argmax(gains[m:, cols], axis=1)],
        }
        ms_d, ms_r = np.mean(best["data"] ** 2), np.mean(best["replicate"] ** 2)
        se = np.sqrt((np.var(best["data"] ** 2) + np.var(best["replicate"] ** 2)) / m)
        out[name] = float(np.sqrt(max(ms_d - ms_r, 0.0)))
        out[name + "_z"] = float((ms_d - ms_r) / max(se, 1e-30))
    return out


def calibrate(
    stack: ParticleStack,
    conformation: AbstractConformationModel,
    *,
    contrast: str = "auto",
    box_size: int | None = None,
    noise: str = "coloured",
    sigma: float | None = None,
    envelope: bool = True,
    n_pilot: int = 512,
    estimate_pose: bool = True,
) -> tuple[ParticleStack, Calibration]:
    """Estimate the nuisances the files do not state; return the working stack and calibration.

    ``contrast``: auto | as-is | invert. ``box_size``: working box (None: the rule in the module
    doc). ``noise``: coloured | white. ``sigma``: the input images' pixel noise sd (white noise,
    not estimated). ``envelope``: estimate the B-factor envelope (else none is added).
    ``estimate_pose``: estimate the rms pose error by a local search (:func:`estimate_pose_error`).
    """
    if contrast not in ("auto", "as-is", "invert"):
        raise ValueError(f"contrast must be auto, as-is or invert, got {contrast!r}")
    if noise not in ("coloured", "white"):
        raise ValueError(f"noise must be coloured or white, got {noise!r}")
    D, p = stack.box_size, float(stack.pixel_size)
    n = len(stack)
    n_pilot = min(n_pilot, max(64, 2**26 // (D * D)))  # pilot images in memory: <= 256 MB
    idx = np.unique(np.linspace(0, n - 1, min(n, n_pilot)).round().astype(np.int64))
    pilot = _Pilot(stack, conformation, idx)
    n_groups = int(group_ids(stack).max()) + 1 if n else 1

    stats = _residual_pass(pilot, 0.0)
    pooled = float(
        np.sum(stats["a"] * stats["gram"].sum(1)) / max(np.sum(stats["gram"].sum(1)), 1e-300)
    )
    inverted = contrast == "invert" or (contrast == "auto" and pooled < 0)
    if contrast == "auto" and pooled < 0:
        logger.warning(
            "the images correlate negatively with the model (pooled scale %.3g): the data have "
            "inverted contrast (white protein); inverting them (use --contrast as-is to keep)",
            pooled,
        )

    def spectrum(st):
        if sigma is not None:
            return RadialNoiseSpectrum.white(sigma, D, p, n_groups)
        est = RadialNoiseSpectrum.estimate(st["resid"], pilot.groups, n_groups, p)
        if noise == "white":
            return RadialNoiseSpectrum.white(est.pixel_sigma(), D, p, n_groups)
        return est

    spec = spectrum(stats)
    bfactor = 0.0
    if envelope:
        bfactor = _fit_bfactor(stats, spec, pilot.groups, D, p)
        if bfactor > 0:
            stats = _residual_pass(pilot, bfactor)
            spec = spectrum(stats)
            bfactor += _fit_bfactor(stats, spec, pilot.groups, D, p)  # what the first missed
    pose = estimate_pose_error(pilot, stats, bfactor, spec) if estimate_pose else None
    info = _information(pilot, stats, bfactor, spec)
    total = float(info.sum())
    if total > 0:
        cum = np.cumsum(info) / total
        cutoff = int(np.searchsorted(cum, INFORMATION_FRACTION)) + 1
    else:
        cutoff = D // 2
    info_freq = cutoff / (D * p)
    if box_size is None:
        rule = "auto"
        work = int(2 * np.ceil(cutoff / NYQUIST_FRACTION - 1e-9))
        work = int(min(D, max(MIN_WORKING_BOX, work)))
    else:
        rule = "given"
        work = int(box_size)
        if work > D:
            raise ValueError(f"--box {work} is larger than the images ({D} pixels)")
    if work < D:
        shell = int(np.floor(NYQUIST_FRACTION * work / 2))
        working_px = working_pixel_size(D, p, work)
        power = np.asarray(spec.power)[:, : n_shells(work)] * (work / D) ** 2
        spec_w = RadialNoiseSpectrum(jnp.asarray(power, jnp.float32), work, working_px, shell)
        kept = float(info[: shell + 1].sum() / total) if total > 0 else None
    else:
        working_px, spec_w, kept = p, spec, 1.0
    native = p if work < D else None
    cal = Calibration(
        inverted=inverted,
        pooled_scale=pooled,
        noise=spec_w,
        noise_kind="white (given sigma)" if sigma is not None else noise,
        bfactor_in_angstroms2=bfactor,
        native_box=D,
        native_pixel_size=p if native is None else native,
        box_size=work,
        pixel_size=float(working_px),
        box_rule=rule,
        information_cutoff_per_A=info_freq,
        information_kept=kept,
        n_pilot=len(idx),
        input_noise_sigma=tuple(float(x) for x in spec.pixel_sigma()),
        pose_error=pose,
    )
    logger.info(
        "calibration: %s noise (pixel sd %s), envelope B %.0f A^2, %d-px box at %.3g A/px -> "
        "working %d px at %.3g A/px (98%% of the CV signal below %.3g 1/A)",
        cal.noise_kind,
        ", ".join(f"{s:.4g}" for s in spec.pixel_sigma()),
        bfactor,
        D,
        p,
        work,
        cal.pixel_size,
        info_freq,
    )
    return calibrated_stack(stack, cal), cal


def calibrated_stack(stack: ParticleStack, cal: Calibration) -> ParticleStack:
    """``stack`` as ``cal`` says to use it: on the working grid (Fourier-cropped when the
    working box is smaller), each particle carrying its noise group and the envelope in its CTF.
    What :func:`calibrate` returns; a process of a multi-process run that receives process 0's
    calibration builds its stack with it."""
    working = downsample(stack, cal.box_size) if cal.box_size < stack.box_size else stack
    nu = working.nuisance
    b = np.asarray(nu.ctf.bfactor_in_angstroms2) + np.float32(cal.bfactor_in_angstroms2)
    ctf = dataclasses.replace(nu.ctf, bfactor_in_angstroms2=b)
    nu = dataclasses.replace(nu, ctf=ctf, group=group_ids(stack).astype(np.int32))
    return dataclasses.replace(working, nuisance=nu)
