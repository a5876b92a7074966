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
from jaxtyping import Array, Float

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
    """The nuisance variables of one (or a batch of) image(s): pose, shift and CTF."""

    rotation: Float[Array, "*batch 3 3"]
    shift_in_angstroms: Float[Array, "*batch 2"]
    ctf: CTFParams

    def __len__(self) -> int:
        return self.rotation.shape[0]


class ImageModel(eqx.Module):
    """Box, pixel size and projection settings: the conventions of one image stack, in one place.

    ``contrast_scale``: ``None`` (default) multiplies the projected potential by the electron
    interaction constant of each particle's voltage (absolute weak-phase contrast, as cryojax);
    a number multiplies it by that constant instead (``1.0`` gives CTF * projected potential).
    """

    box_size: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    half_width: int = eqx.field(static=True)
    contrast_scale: float | None = eqx.field(static=True)

    def __init__(
        self,
        box_size: int,
        pixel_size: float,
        *,
        max_variance_in_angstroms2: float = 50.3 / (8 * np.pi**2),
        contrast_scale: float | None = None,
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
        self.half_width = window_half_width(max_variance_in_angstroms2, pixel_size)
        self.contrast_scale = None if contrast_scale is None else float(contrast_scale)

    @classmethod
    def for_atoms(cls, box_size: int, pixel_size: float, atoms: AtomParameters, **kw) -> ImageModel:
        """An image model whose projection window fits the widest Gaussian of ``atoms``."""
        return cls(
            box_size, pixel_size, max_variance_in_angstroms2=float(jnp.max(atoms.variances)), **kw
        )

    def frequencies(self) -> tuple[np.ndarray, np.ndarray]:
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
        return project_gaussians(
            xy, atoms.amplitudes, atoms.variances, self.box_size, self.pixel_size, self.half_width
        )

    def transfer(self, nuisance: CryoNuisance) -> Array:
        """The complex Fourier multiplier (D, D//2+1): contrast scale * CTF * mask * shift phase."""
        ky, kx = self.frequencies()
        t = nuisance.shift_in_angstroms
        # separable shift phase: D + D//2 + 1 complex exponentials instead of D * (D//2 + 1);
        # the barrier keeps XLA from fusing (and so repeating) them into the grid
        sy, cy = sin_cos(-2.0 * jnp.pi * (ky * t[1]))
        sx, cx = sin_cos(-2.0 * jnp.pi * (kx * t[0]))
        ey, ex = jax.lax.optimization_barrier((jax.lax.complex(cy, sy), jax.lax.complex(cx, sx)))
        phase = ey * ex
        if self.contrast_scale is None:
            scale = interaction_constant_in_angstroms(nuisance.ctf.voltage_in_kilovolts)
        else:
            scale = self.contrast_scale
        ctf = compute_ctf(nuisance.ctf, ky, kx) * (scale * self._selfconjugate_mask())
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
