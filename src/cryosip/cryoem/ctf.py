"""Contrast transfer function (the RELION / cryoDRGN formula).

    lambda = 12.2639 / sqrt(V + 0.97845e-6 V^2)       (Angstrom, V in volts)
    defocus(alpha) = (dfU + dfV)/2 + (dfU - dfV)/2 cos 2(alpha - dfAng)
    gamma = 2 pi (-1/2 defocus lambda k^2 + 1/4 Cs lambda^3 k^4) - phase_shift
    CTF = sqrt(1 - w^2) sin(gamma) - w cos(gamma),  times exp(-B k^2 / 4) and a scale.

``alpha = atan2(ky, kx)`` is measured from the image x axis (RELION). Positive defocus is
underfocus, so ``CTF(0) = -w``: with a positive projected potential, protein is dark.

cryojax (``AstigmaticCTF``) measures its azimuth from the y axis, ``atan2(kx, ky)``, so
``astigmatism_angle = 90 - defocus_angle_in_degrees`` (mod 180) gives the same CTF, with
``defocus_in_angstroms = (dfU + dfV) / 2`` and ``astigmatism_in_angstroms = dfU - dfV``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..sip._dtypes import promoted_dtype


def wavelength_in_angstroms(voltage_in_kilovolts: Float[Array, "*batch"]) -> Float[Array, "*batch"]:
    """Relativistic electron wavelength (Angstrom)."""
    v = jnp.asarray(voltage_in_kilovolts) * 1e3
    return 12.2639 / jnp.sqrt(v + 0.97845e-6 * v * v)


# electron rest energy m_e c^2 in eV (CODATA 2018)
_ELECTRON_REST_ENERGY_IN_EV = 510998.95


def interaction_constant_in_angstroms(
    voltage_in_kilovolts: Float[Array, "*batch"],
) -> Float[Array, "*batch"]:
    """Electron interaction constant ``sigma_e = lambda * gamma`` (relativistic wavelength times
    the Lorentz factor), in the convention where the potential of an atom is the sum of its
    Peng Gaussians with amplitudes in Angstrom (cryojax's
    ``interaction_constant_from_kilovolts``). The weak-phase object is
    ``sigma_e * projected potential``: 0.03124 at 300 kV, 0.02545 at 200 kV.
    """
    v = jnp.asarray(voltage_in_kilovolts)
    return wavelength_in_angstroms(v) * (1.0 + v * 1e3 / _ELECTRON_REST_ENERGY_IN_EV)


class CTFParams(eqx.Module):
    """Per-particle CTF parameters. Every field is an array whose leading axes batch particles."""

    defocus_u_in_angstroms: Float[Array, "*batch"]
    defocus_v_in_angstroms: Float[Array, "*batch"]
    defocus_angle_in_degrees: Float[Array, "*batch"]
    voltage_in_kilovolts: Float[Array, "*batch"]
    spherical_aberration_in_mm: Float[Array, "*batch"]
    amplitude_contrast: Float[Array, "*batch"]
    phase_shift_in_degrees: Float[Array, "*batch"]
    bfactor_in_angstroms2: Float[Array, "*batch"]
    scale: Float[Array, "*batch"]

    @classmethod
    def make(
        cls,
        defocus_u_in_angstroms,
        defocus_v_in_angstroms=None,
        defocus_angle_in_degrees=0.0,
        voltage_in_kilovolts=300.0,
        spherical_aberration_in_mm=2.7,
        amplitude_contrast=0.1,
        phase_shift_in_degrees=0.0,
        bfactor_in_angstroms2=0.0,
        scale=1.0,
    ) -> CTFParams:
        """Broadcast scalars/arrays to a common batch shape (float32)."""
        if defocus_v_in_angstroms is None:
            defocus_v_in_angstroms = defocus_u_in_angstroms
        vals = [
            defocus_u_in_angstroms,
            defocus_v_in_angstroms,
            defocus_angle_in_degrees,
            voltage_in_kilovolts,
            spherical_aberration_in_mm,
            amplitude_contrast,
            phase_shift_in_degrees,
            bfactor_in_angstroms2,
            scale,
        ]
        arrs = np.broadcast_arrays(*[np.asarray(v, dtype=np.float32) for v in vals])
        return cls(*[jnp.asarray(a) for a in arrs])


def rfft_frequencies(box_size: int, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(ky, kx) in 1/Angstrom on the rfft2 grid of a ``box_size`` image; shapes (D, 1), (1, D//2+1)."""
    ky = np.fft.fftfreq(box_size, d=pixel_size)[:, None]
    kx = np.fft.rfftfreq(box_size, d=pixel_size)[None, :]
    return ky.astype(np.float32), kx.astype(np.float32)


def sin_cos(x: Float[Array, "*shape"]) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """(sin x, cos x). float32: Cody-Waite reduction by pi/2 and Cephes' single-precision
    polynomials (|error| < 1e-7 for |x| < 2e4; XLA:CPU's sin/cos are several times slower);
    other dtypes: ``jnp.sin``, ``jnp.cos``."""
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        return jnp.sin(x), jnp.cos(x)
    n = jnp.round(x * (2.0 / np.pi))
    r = ((x - n * 1.5703125) - n * 4.837512969970703125e-4) - n * 7.54978995489188216e-8
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = (
        1.0
        - 0.5 * r2
        + r2
        * r2
        * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    )
    q = n.astype(jnp.int32) & 3
    sin = jnp.where(q == 0, s, jnp.where(q == 1, c, jnp.where(q == 2, -s, -c)))
    cos = jnp.where(q == 0, c, jnp.where(q == 1, -s, jnp.where(q == 2, -c, s)))
    return sin, cos


def compute_ctf(
    ctf: CTFParams, ky: Float[Array, "y x"], kx: Float[Array, "y x"]
) -> Float[Array, "y x"]:
    """Evaluate one particle's CTF on a frequency grid (scalar fields; vmap for batches).

    Written for speed: ``cos 2(alpha - dfAng)`` is expanded with ``cos 2 alpha = (kx^2 - ky^2)/k^2``
    and ``sin 2 alpha = 2 kx ky / k^2`` (no arctan2),
    ``sqrt(1 - w^2) sin(gamma) - w cos(gamma) = sin(gamma - arcsin(w))`` (one sine per
    frequency, :func:`sin_cos`) and the B-factor envelope is ``exp(-B ky^2/4) exp(-B kx^2/4)``
    (separable: D + D//2 + 1 exponentials on the rfft grid).
    """
    lam = wavelength_in_angstroms(ctf.voltage_in_kilovolts)
    k2 = kx * kx + ky * ky
    nonzero = k2 > 0
    safe = jnp.where(nonzero, k2, 1.0)
    cos2a = jnp.where(nonzero, (kx * kx - ky * ky) / safe, 1.0)
    sin2a = jnp.where(nonzero, 2.0 * kx * ky / safe, 0.0)
    # the grid is float32: where it meets float64 parameters (x64), cast it (as promotion would)
    dtype = promoted_dtype(ky, kx, *jax.tree_util.tree_leaves(ctf))
    ky, kx, k2, cos2a, sin2a = (jnp.asarray(a, dtype) for a in (ky, kx, k2, cos2a, sin2a))
    ang = 2.0 * jnp.deg2rad(ctf.defocus_angle_in_degrees)
    mean = 0.5 * (ctf.defocus_u_in_angstroms + ctf.defocus_v_in_angstroms)
    half = 0.5 * (ctf.defocus_u_in_angstroms - ctf.defocus_v_in_angstroms)
    df = mean + half * (cos2a * jnp.cos(ang) + sin2a * jnp.sin(ang))
    cs = ctf.spherical_aberration_in_mm * 1e7
    w = ctf.amplitude_contrast
    gamma = jnp.pi * lam * k2 * (-df + 0.5 * cs * lam * lam * k2)
    shift = jnp.deg2rad(ctf.phase_shift_in_degrees) + jnp.arcsin(w)
    value = sin_cos(gamma - shift)[0]
    b = -0.25 * ctf.bfactor_in_angstroms2
    # barrier: keep XLA from fusing (and so repeating) the small exponentials into the grid
    ey, ex = jax.lax.optimization_barrier((jnp.exp(b * ky * ky), jnp.exp(b * kx * kx)))
    return ctf.scale * value * (ey * ex)
