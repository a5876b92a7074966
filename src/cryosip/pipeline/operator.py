"""The cryo-EM random forward operator: one plug-in for the generic SIP engine."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..conformations.base import AbstractConformationModel
from ..cryoem.image_model import CryoNuisance, ImageModel, NuisancePrior
from ..sip.noise import GaussianNoise
from ..sip.operator import AbstractRandomOperator


class AbstractConformationOperator(AbstractRandomOperator):
    """An operator on a conformation model's CVs, with nuisances drawn from a NuisancePrior."""

    conformation: eqx.AbstractVar[AbstractConformationModel]
    prior: eqx.AbstractVar[NuisancePrior]

    def sample_nuisance(self, key, n: int) -> CryoNuisance:
        return self.prior.sample(key, n)

    @property
    def domain(self):
        return self.conformation.lower, self.conformation.upper


class CryoEMOperator(AbstractConformationOperator):
    """F(theta, xi) = CTF * shift * project(X(theta) rotated) + noise."""

    conformation: AbstractConformationModel
    image_model: ImageModel
    noise: GaussianNoise
    prior: NuisancePrior
    fit_scale: bool

    def __init__(
        self, conformation, image_model, noise_sigma=1.0, prior=None, fit_scale: bool = False
    ):
        self.conformation = conformation
        self.image_model = image_model
        self.noise = (
            noise_sigma if isinstance(noise_sigma, GaussianNoise) else GaussianNoise(noise_sigma)
        )
        self.prior = NuisancePrior() if prior is None else prior
        self.fit_scale = bool(fit_scale)

    def mean(
        self, theta: Float[Array, " dim"], nuisance: CryoNuisance
    ) -> Float[Array, "y_dim x_dim"]:
        coords = self.conformation(theta)
        return self.image_model.render(coords, self.conformation.atoms, nuisance)

    def node_means(self, nodes, nuisance: CryoNuisance):
        """:meth:`pair_means` with nothing computed twice: each node's structure once (not per
        (row, node) pair) and each row's Fourier transfer (CTF, shift, filter) once; the same
        images (``tests/pipeline/test_tabulation_kernel.py``), 1.4-1.6x faster tabulation of
        AdK at 64 px."""
        im, atoms = self.image_model, self.conformation.atoms
        b, g, d = nuisance.rotation.shape[0], nodes.shape[0], im.box_size
        coords = jnp.tile(jax.vmap(self.conformation)(nodes), (b, 1, 1))  # pair n * G + g: node g
        rot = jnp.repeat(nuisance.rotation, g, axis=0)
        proj = jax.vmap(lambda c, r: im.project(c, atoms, r))(coords, rot)  # one flat batch
        f = (
            jnp.fft.rfft2(proj).reshape(b, g, d, d // 2 + 1)
            * jax.vmap(im.transfer)(nuisance)[:, None]
        )
        return jnp.fft.irfft2(f, s=(d, d))

    @property
    def obs_size(self) -> int:
        return self.image_model.box_size**2 - int(self.fit_scale)

    def with_sigma(self, sigma) -> CryoEMOperator:
        """The same operator with white noise of standard deviation ``sigma``."""
        return CryoEMOperator(
            self.conformation,
            self.image_model,
            GaussianNoise(jnp.asarray(sigma)),
            self.prior,
            self.fit_scale,
        )
