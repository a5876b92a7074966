"""The cryo-EM image model: atoms -> projected potential -> CTF and shift -> image.

    image = irfft2( sigma_e(V) * CTF_c(k) * exp(-2 pi i k.t) * M(k) * rfft2( P_z[ V_{A x} ] ) )

``A`` is the particle's rotation (RELION convention, see :mod:`cryosip.cryoem.pose`), ``t`` the
in-plane translation of the particle in Angstrom (the particle's centre sits at ``t`` from the
box centre; RELION's ``rlnOriginX/YAngst`` = ``-t``), ``P_z`` the pixel-averaged line integral
along the beam (z) and ``V`` the sum of per-atom Gaussians (Peng amplitudes in Angstrom).
``M`` zeroes the three self-conjugate rfft components before the shift (as cryojax does).

The image is the weak-phase *contrast* in cryojax's physical units: the projected potential
is multiplied by the electron interaction constant ``sigma_e = lambda * gamma_Lorentz``
(0.03124 A at 300 kV; :func:`cryosip.cryoem.ctf.interaction_constant_in_angstroms`, taken
per particle from its CTF voltage) unless ``contrast_scale`` is given. With the CTF's
``CTF(0) = -w`` a positive potential is dark, as in cryojax's ``ContrastImageModel`` with
``WeakPhaseScatteringTheory`` (tests/cryoem/test_vs_cryojax.py checks scale and sign).

Everything is one pure function of (coordinates, nuisance), so it jits, vmaps and
differentiates (reverse mode).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..sip._dtypes import promote, promoted_dtype
from .atoms import AtomParameters
from .ctf import (
    CTFParams,
    compute_ctf,
    interaction_constant_in_angstroms,
    rfft_frequencies,
    sin_cos,
)
from .projection import project_gaussians, window_half_width


class CryoNuisance(eqx.Module):
    """The nuisance variables of one (or a batch of) image(s): pose, shift and CTF, and the
    image's noise group (its optics group, 0-based; ``None`` means group 0), which selects its
    row of ``ImageModel.fourier_filter``."""

    rotation: Float[Array, "*batch 3 3"]
    shift_in_angstroms: Float[Array, "*batch 2"]
    ctf: CTFParams
    group: Int[Array, "*batch"] | None = None

    def __len__(self) -> int:
        return self.rotation.shape[0]


class ImageModel(eqx.Module):
    """Box, pixel size and projection settings: the conventions of one image stack, in one place.

    ``contrast_scale``: ``None`` (default) multiplies the projected potential by the electron
    interaction constant of each particle's voltage (absolute weak-phase contrast, as cryojax);
    a number multiplies it by that constant instead (``1.0`` gives CTF * projected potential).

    ``fourier_filter`` (n_groups, D, D//2+1): a real multiplier applied with the CTF, one row per
    noise group (``CryoNuisance.group``): the noise model's whitening filter
    (:meth:`cryosip.cryoem.noise.RadialNoiseSpectrum.whitening`), so that images come out in
    the whitened units of the data they are compared with.

    ``native_pixel_size``: the pixel size the images were recorded at, when the working grid is
    a Fourier crop of it (``pixel_size`` larger). Rendering straight at the coarse pixel would
    alias (atoms are nearly points at 4-6 A/px) and integrate over the wrong pixel, unlike the
    cropped data. So the atoms are pre-blurred by a Gaussian of variance
    ``antialias_variance_in_angstroms2`` (0.6 pixel^2: the aliased copies fall below 5% of the
    signal inside 3/4 of Nyquist), and the transfer divides the blur back out and swaps the
    coarse pixel's box filter for the native one. Above 3/4 of Nyquist the result is not
    trusted: the filter's cutoff (:class:`~cryosip.cryoem.noise.RadialNoiseSpectrum`) removes
    those modes from the likelihood. ``tests/cryoem/test_noise_crop.py`` checks it against
    rendering at the native pixel and cropping.
    """

    box_size: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    half_width: int = eqx.field(static=True)
    contrast_scale: float | None = eqx.field(static=True)
    native_pixel_size: float | None = eqx.field(static=True)
    antialias_variance_in_angstroms2: float = eqx.field(static=True)
    fourier_filter: Float[Array, "n_groups y_dim x_half"] | None

    def __init__(
        self,
        box_size: int,
        pixel_size: float,
        *,
        max_variance_in_angstroms2: float = 50.3 / (8 * np.pi**2),
        contrast_scale: float | None = None,
        native_pixel_size: float | None = None,
        fourier_filter=None,
    ):
        """``max_variance_in_angstroms2`` sets the projection window (default: carbon's widest Peng Gaussian)."""
        if box_size < 8 or box_size % 2:
            raise ValueError(f"box_size must be an even integer >= 8, got {box_size}")
        if not pixel_size > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        if not max_variance_in_angstroms2 > 0:
            raise ValueError(
                f"max_variance_in_angstroms2 must be positive, got {max_variance_in_angstroms2}"
            )
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.contrast_scale = None if contrast_scale is None else float(contrast_scale)
        if native_pixel_size is not None and not 0 < native_pixel_size < pixel_size * (1 - 1e-6):
            native_pixel_size = None  # not a crop: render at this pixel as it is
        self.native_pixel_size = None if native_pixel_size is None else float(native_pixel_size)
        self.antialias_variance_in_angstroms2 = (
            0.0 if self.native_pixel_size is None else 0.6 * self.pixel_size**2
        )
        self.half_width = window_half_width(
            max_variance_in_angstroms2 + self.antialias_variance_in_angstroms2, pixel_size
        )
        if fourier_filter is not None:
            fourier_filter = jnp.asarray(fourier_filter, jnp.float32)
            if fourier_filter.ndim == 2:
                fourier_filter = fourier_filter[None]
            if fourier_filter.shape[1:] != (self.box_size, self.box_size // 2 + 1):
                raise ValueError(
                    f"fourier_filter must be (n_groups, {self.box_size}, {self.box_size // 2 + 1}),"
                    f" got {fourier_filter.shape}"
                )
        self.fourier_filter = fourier_filter

    @classmethod
    def for_atoms(cls, box_size: int, pixel_size: float, atoms: AtomParameters, **kw) -> ImageModel:
        """An image model whose projection window fits the widest Gaussian of ``atoms``."""
        return cls(
            box_size, pixel_size, max_variance_in_angstroms2=float(jnp.max(atoms.variances)), **kw
        )

    def _pixel_correction(self) -> np.ndarray | None:
        """(D, D//2+1) multiplier for a cropped grid: undo the anti-alias blur and the coarse
        pixel's box filter, apply the native pixel's (see the class docstring)."""
        if self.native_pixel_size is None:
            return None
        ky, kx = (np.asarray(a, np.float64) for a in self.frequencies())
        p, q = self.native_pixel_size, self.pixel_size
        s2 = self.antialias_variance_in_angstroms2
        box = (np.sinc(p * ky) * np.sinc(p * kx)) / (np.sinc(q * ky) * np.sinc(q * kx))
        return (np.exp(2 * np.pi**2 * s2 * (ky**2 + kx**2)) * box).astype(np.float32)

    def frequencies(self) -> tuple[np.ndarray, np.ndarray]:
        """Spatial frequencies (1/Angstrom) of the rfft2 grid: ky (D, 1) and kx (1, D//2+1)."""
        return rfft_frequencies(self.box_size, self.pixel_size)

    def _selfconjugate_mask(self) -> np.ndarray:
        D = self.box_size
        mask = np.ones((D, D // 2 + 1), np.float32)
        mask[D // 2, 0] = mask[0, D // 2] = mask[D // 2, D // 2] = 0.0
        return mask

    def project(
        self, coords: Float[Array, "n_atoms 3"], atoms: AtomParameters, rotation
    ) -> Float[Array, "y_dim x_dim"]:
        """Pixel-averaged projection of the rotated atoms (no CTF, no shift, no contrast scale)."""
        r = rotation
        x, y, z = coords[:, 0], coords[:, 1], coords[:, 2]
        # (A r)[:2], unrolled: XLA:CPU runs a (n, 3) x (3, 2) dot far slower than 6 FMAs per atom
        xy = jnp.stack(
            [r[0, 0] * x + r[0, 1] * y + r[0, 2] * z, r[1, 0] * x + r[1, 1] * y + r[1, 2] * z],
            axis=-1,
        )
        variances = atoms.variances + self.antialias_variance_in_angstroms2
        return project_gaussians(
            xy, atoms.amplitudes, variances, self.box_size, self.pixel_size, self.half_width
        )

    def transfer(self, nuisance: CryoNuisance) -> Array:
        """The complex Fourier multiplier (D, D//2+1): contrast scale * CTF * mask * shift phase."""
        ky, kx = self.frequencies()
        t = nuisance.shift_in_angstroms
        # separable shift phase: D + D//2 + 1 complex exponentials instead of D * (D//2 + 1);
        # the barrier keeps XLA from fusing (and so repeating) them into the grid
        kt = promoted_dtype(ky, t)  # a float64 shift (x64): float64 phases
        sy, cy = sin_cos(-2.0 * jnp.pi * (ky.astype(kt, copy=False) * t[1]))
        sx, cx = sin_cos(-2.0 * jnp.pi * (kx.astype(kt, copy=False) * t[0]))
        ey, ex = jax.lax.optimization_barrier((jax.lax.complex(cy, sy), jax.lax.complex(cx, sx)))
        phase = ey * ex
        if self.contrast_scale is None:
            scale = interaction_constant_in_angstroms(nuisance.ctf.voltage_in_kilovolts)
        else:
            scale = self.contrast_scale
        fixed = self._selfconjugate_mask()
        corr = self._pixel_correction()
        if corr is not None:
            fixed = fixed * corr
        ctf, scale, fixed = promote(compute_ctf(nuisance.ctf, ky, kx), scale, fixed)
        ctf = ctf * (scale * fixed)
        if self.fourier_filter is not None:
            g = 0 if nuisance.group is None else nuisance.group
            ctf, filt = promote(ctf, self.fourier_filter[g])
            ctf = ctf * filt
        ctf, phase = promote(ctf, phase)  # real CTF -> complex
        return ctf * phase

    def apply_optics(
        self, projection: Float[Array, "y_dim x_dim"], nuisance: CryoNuisance
    ) -> Float[Array, "y_dim x_dim"]:
        """Contrast scale, CTF, shift and the self-conjugate mask applied in Fourier space."""
        f = jnp.fft.rfft2(projection) * self.transfer(nuisance)
        return jnp.fft.irfft2(f, s=(self.box_size, self.box_size))

    def render(
        self, coords: Float[Array, "n_atoms 3"], atoms: AtomParameters, nuisance: CryoNuisance
    ) -> Float[Array, "y_dim x_dim"]:
        """The noise-free image of one structure under one nuisance draw."""
        return self.apply_optics(self.project(coords, atoms, nuisance.rotation), nuisance)


class NuisancePrior(eqx.Module):
    """A distribution of nuisances to draw from when they are unknown: uniform SO(3) poses,
    Gaussian in-plane shifts, uniform defocus with astigmatism, fixed optics."""

    shift_sd_in_angstroms: float = 0.0
    defocus_range_in_angstroms: tuple[float, float] = (10000.0, 25000.0)
    astigmatism_sd_in_angstroms: float = 200.0
    voltage_in_kilovolts: float = 300.0
    spherical_aberration_in_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_in_angstroms2: float = 0.0

    def sample(self, key, n: int) -> CryoNuisance:
        """``n`` independent nuisance draws (poses, shifts, CTFs)."""
        from .pose import sample_uniform_rotations

        kr, ks, kd, ka, kang = jax.random.split(key, 5)
        rot = sample_uniform_rotations(kr, n)
        shift = self.shift_sd_in_angstroms * jax.random.normal(ks, (n, 2))
        lo, hi = self.defocus_range_in_angstroms
        mean_df = jax.random.uniform(kd, (n,), minval=lo, maxval=hi)
        astig = self.astigmatism_sd_in_angstroms * jnp.abs(jax.random.normal(ka, (n,)))
        ang = jax.random.uniform(kang, (n,), minval=0.0, maxval=180.0)
        ones = jnp.ones((n,))
        ctf = CTFParams(
            defocus_u_in_angstroms=mean_df + 0.5 * astig,
            defocus_v_in_angstroms=mean_df - 0.5 * astig,
            defocus_angle_in_degrees=ang,
            voltage_in_kilovolts=self.voltage_in_kilovolts * ones,
            spherical_aberration_in_mm=self.spherical_aberration_in_mm * ones,
            amplitude_contrast=self.amplitude_contrast * ones,
            phase_shift_in_degrees=0.0 * ones,
            bfactor_in_angstroms2=self.bfactor_in_angstroms2 * ones,
            scale=ones,
        )
        return CryoNuisance(rot, shift, ctf)
