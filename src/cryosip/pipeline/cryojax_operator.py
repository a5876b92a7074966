"""A cryojax-backed cryo-EM operator: the engine running on cryojax's image model.

:class:`CryojaxOperator` is an :class:`~cryosip.sip.operator.AbstractRandomOperator` whose
noise-free image ``mean(theta, nuisance)`` is built by cryojax (0.6) rather than by
:class:`~cryosip.cryoem.image_model.ImageModel`: for users who want cryojax's physics, and as
the peer of :class:`~cryosip.pipeline.operator.CryoEMOperator` in the benchmarks
(``benchmarks/scaling.py``). Everything else -- nuisances, prior, noise, the derived
likelihoods and paired distances -- is inherited, so both operators plug into the same
discrepancies and flows unchanged.

One image is ``make_image_model(GaussianMixtureVolume(conformation(theta), amplitudes,
variances), BasicImageConfig, pose, ContrastTransferTheory(AstigmaticCTF, envelope),
integrator, quantity_mode="contrast").simulate()``, with the conventions pinned in
``tests/cryoem/test_vs_cryojax.py``:

* pose: ``QuaternionPose(t_x, t_y, SO3.from_matrix(A).wxyz)``; our RELION matrix ``A`` is
  cryojax's ``pose.rotation.as_matrix()`` (equivalently ``EulerAnglePose`` with negated
  RELION angles) and the offset is our ``shift_in_angstroms`` ``t``;
* CTF: ``defocus = (dfU + dfV) / 2``, ``astigmatism = dfU - dfV``,
  ``astigmatism_angle = 90 - defocus_angle_in_degrees`` (cryojax measures it from y);
* envelope: ``FourierGaussian(amplitude=ctf.scale, b_factor=max(B, 1e-6))`` (cryojax
  refuses a zero or negative B-factor, so B is clipped at 1e-6 A^2, which changes nothing);
* scale: ``quantity_mode="contrast"`` multiplies the projection by the interaction constant of
  the particle's voltage, which is ``ImageModel``'s default ``contrast_scale`` (None).

``integrator="default"`` is ``GaussianMixtureProjection()`` (exact erf pixel integrals over the
whole grid); ``"fastest"`` is ``GaussianMixtureProjection(n_spread=suggest_n_spread(...))``
(real-space spreading on a window, sized at construction from the atoms' variances).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..conformations.base import AbstractConformationModel
from ..cryoem.image_model import CryoNuisance, NuisancePrior
from ..sip.noise import GaussianNoise
from .operator import AbstractConformationOperator

__all__ = ["CryojaxOperator", "INTEGRATORS"]

INTEGRATORS = ("default", "fastest")


def _n_spread(conformation: AbstractConformationModel, pixel_size: float):
    """cryojax's suggested spreading window for these atoms (needs a concrete volume)."""
    import cryojax.simulator as cxs

    atoms = conformation.atoms
    coords = jnp.zeros(
        (atoms.n_atoms, 3), atoms.amplitudes.dtype
    )  # the window depends on variances only
    n = cxs.suggest_n_spread(
        cxs.GaussianMixtureVolume(coords, atoms.amplitudes, atoms.variances), pixel_size
    )
    return tuple(int(v) for v in n) if isinstance(n, tuple) else int(n)


class CryojaxOperator(AbstractConformationOperator):
    """F(theta, xi) = cryojax image of conformation(theta) under nuisance xi, + Gaussian noise.

    ``integrator``: ``"default"`` (exact pixel integrals) or ``"fastest"`` (spreading with
    ``suggest_n_spread``). The other arguments are those of
    :class:`~cryosip.pipeline.operator.CryoEMOperator`, with the box and pixel size given
    directly.
    """

    conformation: AbstractConformationModel
    noise: GaussianNoise
    prior: NuisancePrior
    fit_scale: bool
    box_size: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    integrator: str = eqx.field(static=True)
    n_spread: int | tuple[int, ...] | None = eqx.field(static=True)

    def __init__(
        self,
        conformation: AbstractConformationModel,
        box_size: int,
        pixel_size: float,
        noise_sigma=1.0,
        prior: NuisancePrior | None = None,
        integrator: str = "default",
        fit_scale: bool = False,
    ):
        if integrator not in INTEGRATORS:
            raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
        if box_size < 8 or box_size % 2:
            raise ValueError(f"box_size must be an even integer >= 8, got {box_size}")
        if not pixel_size > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        self.conformation = conformation
        self.noise = (
            noise_sigma if isinstance(noise_sigma, GaussianNoise) else GaussianNoise(noise_sigma)
        )
        self.prior = NuisancePrior() if prior is None else prior
        self.fit_scale = bool(fit_scale)
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.integrator = integrator
        self.n_spread = (
            _n_spread(conformation, self.pixel_size) if integrator == "fastest" else None
        )

    def image_model(self, theta: Float[Array, " dim"], nuisance: CryoNuisance):
        """The cryojax image model of one conformation under one nuisance draw."""
        import cryojax.ndimage as cxn
        import cryojax.simulator as cxs
        from cryojax.rotations import SO3

        atoms = self.conformation.atoms
        ctf = nuisance.ctf
        volume = cxs.GaussianMixtureVolume(
            self.conformation(theta), atoms.amplitudes, atoms.variances
        )
        config = cxs.BasicImageConfig(
            (self.box_size, self.box_size),
            self.pixel_size,
            voltage_in_kilovolts=ctf.voltage_in_kilovolts,
        )
        t = nuisance.shift_in_angstroms
        pose = cxs.QuaternionPose(t[0], t[1], SO3.from_matrix(nuisance.rotation).wxyz)
        transfer = cxs.ContrastTransferTheory(
            cxs.AstigmaticCTF(
                defocus_in_angstroms=0.5
                * (ctf.defocus_u_in_angstroms + ctf.defocus_v_in_angstroms),
                astigmatism_in_angstroms=ctf.defocus_u_in_angstroms - ctf.defocus_v_in_angstroms,
                astigmatism_angle=90.0 - ctf.defocus_angle_in_degrees,
                spherical_aberration_in_mm=ctf.spherical_aberration_in_mm,
            ),
            envelope=cxn.FourierGaussian(
                amplitude=ctf.scale, b_factor=jnp.maximum(ctf.bfactor_in_angstroms2, 1e-6)
            ),
            amplitude_contrast_ratio=ctf.amplitude_contrast,
            phase_shift=ctf.phase_shift_in_degrees,
        )
        if self.integrator == "fastest":
            integrator = cxs.GaussianMixtureProjection(n_spread=self.n_spread)
        else:
            integrator = cxs.GaussianMixtureProjection()
        return cxs.make_image_model(
            volume, config, pose, transfer, integrator, quantity_mode="contrast"
        )

    def mean(
        self, theta: Float[Array, " dim"], nuisance: CryoNuisance
    ) -> Float[Array, "y_dim x_dim"]:
        # cryojax relies on implicit dtype promotion (complex64 * float32): standard promotion
        # for it, also where the caller asks for strict (the tests, issue 16)
        with jax.numpy_dtype_promotion("standard"):
            return self.image_model(theta, nuisance).simulate()

    @property
    def obs_size(self) -> int:
        return self.box_size**2 - int(self.fit_scale)
