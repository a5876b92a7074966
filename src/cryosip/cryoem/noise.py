"""Coloured Gaussian noise of cryo-EM images: a radially averaged power spectrum per optics group.

Detector and ice noise is not white: it has more power at low spatial frequencies, and each
optics group (microscope session, detector mode) has its own. The model here is a stationary
Gaussian whose Fourier modes are independent with variance

    E |Y(k)|^2 = D^2 P_g(|k|),       P_g tabulated on integer shells r = round(|k| D p)

(``D`` the box, ``p`` the pixel size, ``g`` the image's optics group). With this normalisation a
white noise of pixel sd ``sigma`` has ``P = sigma^2``, and the pixel variance of any spectrum is
the mean of ``P`` over the full Fourier grid.

The same object samples and scores, so the simulator and the likelihood cannot drift apart:
:meth:`RadialNoiseSpectrum.sample` colours white noise by ``sqrt(P)``, and
:meth:`RadialNoiseSpectrum.whitening` is the filter ``1 / sqrt(P)`` that maps the noise to unit
white noise. The reconstruction applies it to the observed images once and to the forward model
inside the CTF (``ImageModel.fourier_filter``), so every likelihood and kernel score downstream
is the white-noise one with ``sigma = 1`` (``docs/noise.md``).

``cutoff_shell`` (optional) zeroes the filter above a shell: those modes leave the likelihood
(the working band chosen by :func:`cryosip.pipeline.calibrate.calibrate`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..sip._dtypes import promote


def shell_index(box_size: int) -> np.ndarray:
    """Integer radius (Fourier index units) of every rfft2 mode of a ``box_size`` image: (D, D//2+1)."""
    ky = np.fft.fftfreq(box_size) * box_size
    kx = np.fft.rfftfreq(box_size) * box_size
    return np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int32)


def n_shells(box_size: int) -> int:
    return int(shell_index(box_size).max()) + 1


def rfft_mode_counts(box_size: int) -> np.ndarray:
    """How many full-grid Fourier modes each rfft2 mode stands for (1 or 2): Parseval weights."""
    D = box_size
    w = np.full((D, D // 2 + 1), 2.0)
    w[:, 0] = 1.0
    w[:, D // 2] = 1.0
    return w


def radial_average(power: np.ndarray, box_size: int) -> np.ndarray:
    """Mean of ``power`` (..., D, D//2+1) over each shell, weighted by mode counts: (..., n_shells)."""
    idx = shell_index(box_size).ravel()
    w = rfft_mode_counts(box_size).ravel()
    flat = power.reshape(power.shape[:-2] + (-1,))
    num = np.zeros(power.shape[:-2] + (n_shells(box_size),))
    den = np.bincount(idx, weights=w, minlength=n_shells(box_size))
    for s in np.ndindex(*power.shape[:-2]):
        num[s] = np.bincount(idx, weights=w * flat[s], minlength=n_shells(box_size))
    return num / np.maximum(den, 1e-30)


class RadialNoiseSpectrum(eqx.Module):
    """Noise power ``P_g`` per integer shell for each optics group ``g``, on one image grid."""

    power: Float[Array, "n_groups n_shells"]
    box_size: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    cutoff_shell: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.power.ndim != 2 or self.power.shape[1] != n_shells(self.box_size):
            raise ValueError(
                f"power must be (n_groups, {n_shells(self.box_size)}) for a {self.box_size}-pixel "
                f"box, got {self.power.shape}"
            )

    @classmethod
    def white(cls, sigma, box_size: int, pixel_size: float, n_groups: int = 1):
        """White noise of pixel sd ``sigma`` (a number or one per group)."""
        s = np.broadcast_to(np.asarray(sigma, np.float64), (n_groups,))
        p = np.repeat((s**2)[:, None], n_shells(box_size), axis=1)
        return cls(jnp.asarray(p, jnp.float32), int(box_size), float(pixel_size))

    @property
    def n_groups(self) -> int:
        return int(self.power.shape[0])

    def frequencies(self) -> np.ndarray:
        """Shell centres in 1/Angstrom."""
        return np.arange(n_shells(self.box_size)) / (self.box_size * self.pixel_size)

    def grid(self) -> Float[Array, "n_groups y_dim x_half"]:
        """``P_g`` on every rfft2 mode."""
        return self.power[:, jnp.asarray(shell_index(self.box_size))]

    def whitening(self) -> Float[Array, "n_groups y_dim x_half"]:
        """The filter ``1 / sqrt(P_g)`` (zero above ``cutoff_shell``)."""
        w = jax.lax.rsqrt(jnp.maximum(self.grid(), 1e-30))
        if self.cutoff_shell is not None:
            keep = jnp.asarray(shell_index(self.box_size) <= self.cutoff_shell, w.dtype)
            w = w * keep
        return w

    def pixel_sigma(self) -> np.ndarray:
        """Pixel-domain noise sd of each group (Parseval: the mean of ``P`` over the full grid)."""
        g = np.asarray(self.grid(), np.float64)
        w = rfft_mode_counts(self.box_size)
        return np.sqrt((g * w).sum(axis=(1, 2)) / self.box_size**2)

    def n_modes(self) -> int:
        """Real degrees of freedom the whitened likelihood sees (all pixels, or the kept band)."""
        if self.cutoff_shell is None:
            return self.box_size**2
        w = rfft_mode_counts(self.box_size)
        return int(round(float((w * (shell_index(self.box_size) <= self.cutoff_shell)).sum())))

    def with_cutoff(self, shell: int | None) -> RadialNoiseSpectrum:
        return RadialNoiseSpectrum(self.power, self.box_size, self.pixel_size, shell)

    def colour(self, white, group=None) -> Float[Array, "n y_dim x_dim"]:
        """Unit white noise images (n, D, D) filtered by ``sqrt(P_g)``: noise with this spectrum."""
        D = self.box_size
        n = white.shape[0]
        g = jnp.zeros((n,), jnp.int32) if group is None else jnp.asarray(group, jnp.int32)
        f, filt = promote(jnp.fft.rfft2(white), jnp.sqrt(jnp.maximum(self.grid(), 0.0))[g])
        f = f * filt  # the real filter cast to complex
        return jnp.fft.irfft2(f, s=(D, D)).astype(white.dtype)

    def sample(
        self, key, shape: tuple[int, ...], group: Int[Array, " n"] | None = None
    ) -> Float[Array, "n y_dim x_dim"]:
        """Noise images (n, D, D) with this spectrum (group 0 when ``group`` is None)."""
        white = jax.random.normal(key, (shape[0], self.box_size, self.box_size), jnp.float32)
        return self.colour(white, group)

    def normalised(self) -> RadialNoiseSpectrum:
        """The same shape scaled to unit pixel variance in every group."""
        s = self.pixel_sigma()
        return RadialNoiseSpectrum(
            self.power / jnp.asarray(s**2, jnp.float32)[:, None],
            self.box_size,
            self.pixel_size,
            self.cutoff_shell,
        )

    @classmethod
    def from_profile(cls, frequency, power, box_size: int, pixel_size: float):
        """A one-group spectrum from a radial profile (frequency in 1/A, power), interpolated
        onto the shells of this grid (held constant beyond the profile's ends)."""
        k = np.arange(n_shells(box_size)) / (box_size * pixel_size)
        p = np.interp(k, np.asarray(frequency, np.float64), np.asarray(power, np.float64))
        if not np.all(p > 0):
            raise ValueError("a noise power spectrum must be positive at every frequency")
        return cls(jnp.asarray(p[None], jnp.float32), int(box_size), float(pixel_size))

    @classmethod
    def detector_like(cls, box_size: int, pixel_size: float) -> RadialNoiseSpectrum:
        """A typical shape (unit pixel variance): a low-frequency excess 3.9x over a flat floor,
        ``0.35 + 1 / (1 + (60 A k)^2)``, the shape the foreign-data tests give cryojax."""
        k = np.arange(n_shells(box_size)) / (box_size * pixel_size)
        return cls.from_profile(
            k, 0.35 + 1.0 / (1.0 + (60.0 * k) ** 2), box_size, pixel_size
        ).normalised()

    def whiten(self, images, group=None) -> np.ndarray:
        """Apply ``1 / sqrt(P_g)`` (and the cutoff) to images (n, D, D): NumPy in, NumPy out."""
        x = np.asarray(images, np.float32)
        n, D = x.shape[0], self.box_size
        if x.shape[1:] != (D, D):
            raise ValueError(f"images are {x.shape[1:]}, the noise model is for a {D}-pixel box")
        g = np.zeros(n, np.int64) if group is None else np.asarray(group, np.int64)
        w = np.asarray(self.whitening())
        f = np.fft.rfft2(x.astype(np.float64)) * w[g]
        return np.fft.irfft2(f, s=(D, D)).astype(np.float32)

    @classmethod
    def estimate(
        cls,
        residuals,
        group,
        n_groups: int,
        pixel_size: float,
        *,
        floor_fraction: float = 1e-3,
    ) -> RadialNoiseSpectrum:
        """The radially averaged power of residual images (n, D, D) (data minus the model's fit),
        per optics group. The DC shell (removed by a per-image offset) copies shell 1; a group
        with no images takes the pooled spectrum."""
        r = np.asarray(residuals, np.float64)
        D = r.shape[-1]
        g = np.asarray(group, np.int64)
        pw = np.abs(np.fft.rfft2(r)) ** 2 / D**2
        pooled = radial_average(pw.mean(axis=0), D)
        out = np.empty((n_groups, n_shells(D)))
        for k in range(n_groups):
            sel = g == k
            out[k] = radial_average(pw[sel].mean(axis=0), D) if sel.any() else pooled
        out[:, 0] = out[:, 1]
        out = np.maximum(out, floor_fraction * out.max(axis=1, keepdims=True))
        return cls(jnp.asarray(out, jnp.float32), int(D), float(pixel_size))

    def to_table(self) -> dict[str, np.ndarray]:
        """Columns for a CSV: shell, frequency (1/A), power of each group."""
        cols = {"shell": np.arange(n_shells(self.box_size)), "frequency_per_A": self.frequencies()}
        for k in range(self.n_groups):
            cols[f"power_group{k + 1}"] = np.asarray(self.power[k], np.float64)
        return cols
