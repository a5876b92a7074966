"""A pose-marginalised likelihood around given (consensus) poses that are not exact.

The poses of real particles come from a consensus refinement and carry errors of a few degrees
and a few Angstrom. A likelihood that plugs the given pose in as if it were exact explains each
image with the wrong projection. If the errors are small and isotropic with a known scale, the
correct likelihood of the image is the average over them,

    p(y | theta) = E_{dR, dt} N(y; F0(theta; R_given dR, t_given + dt, CTF), sigma^2 I),

which :class:`PoseMarginalOperator` estimates with K draws per image (a log-mean-exp, in log
space):

    log p(y_n | theta) ~= logsumexp_k log N(y_n; F0(theta; R_n dR_nk, t_n + dt_nk)) - log K.

The perturbations: a rotation by a random angle about a uniformly random axis, whose rotation
vector is N(0, (a / sqrt 3)^2 I_3) so that the root-mean-square angle is ``a = rotation_sd_in_degrees``
(:func:`sample_pose_perturbations`), and an in-plane shift N(0, (s / sqrt 2)^2 I_2) with
root-mean-square length ``s = shift_sd_in_angstroms``. Draws are antithetic pairs (dR, dR^T) and
(dt, -dt) by default, which cancels the first-order term of the average. They are a fixed
function of (key, observation index), so repeated calls and every flow step see the same
draws, and the estimate is deterministic and differentiable in theta.

For a 1-D CV, :meth:`PoseMarginalOperator.tabulate` evaluates it once per (image, CV node) and
returns a :class:`~cryosip.sip.loglik_table.LogLikTableOperator` (cubic interpolation in
theta) on which the KL flow and the EM/MAP baselines run at table speed. With zero
perturbation scales the operator is the base operator (tested).

The marginal changes the likelihood (KL) only: ``mean``, ``paired_sq_distances`` and
``sample`` are the base operator's at the given poses.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..cryoem.image_model import CryoNuisance
from ..cryoem.pose import axis_angle_to_matrix
from ..sip.loglik_table import LogLikTableOperator
from ..sip.operator import AbstractWrappedOperator, Observations, _map_chunks
from .operator import CryoEMOperator


def sample_pose_perturbations(
    key: PRNGKeyArray,
    n: int,
    rotation_sd_in_degrees: float,
    shift_sd_in_angstroms: float,
    *,
    antithetic: bool = False,
) -> tuple[Float[Array, "n 3 3"], Float[Array, "n 2"]]:
    """n small pose perturbations: rotations (rms angle ``rotation_sd_in_degrees``) and shifts (rms ``shift_sd_in_angstroms``).

    The rotation vector is isotropic Gaussian with per-axis sd ``rotation_sd_in_degrees / sqrt(3)`` (radians
    inside), so the axis is uniform and E[angle^2] = rotation_sd_in_degrees^2; the shift is isotropic
    Gaussian in the image plane with per-axis sd ``shift_sd_in_angstroms / sqrt(2)``. With ``antithetic``,
    draw n // 2 (rounded up) and append their inverses (rotation vector and shift negated).
    """
    n = int(n)
    m = -(-n // 2) if antithetic else n
    kr, ks = jax.random.split(key)
    rotvec = jax.random.normal(kr, (m, 3)) * (jnp.deg2rad(rotation_sd_in_degrees) / jnp.sqrt(3.0))
    shift = jax.random.normal(ks, (m, 2)) * (shift_sd_in_angstroms / jnp.sqrt(2.0))
    if antithetic:
        rotvec = jnp.concatenate([rotvec, -rotvec])[:n]
        shift = jnp.concatenate([shift, -shift])[:n]
    return axis_angle_to_matrix(rotvec), shift


def perturb_nuisance(
    nuisance: CryoNuisance,
    d_rotation: Float[Array, "*batch 3 3"],
    d_shift: Float[Array, "*batch 2"],
) -> CryoNuisance:
    """The nuisance with rotation ``R dR`` and shift ``t + dt`` (CTF unchanged).

    Either one nuisance and a batch of perturbations (each applied to it), or a batch of
    nuisances and as many perturbations (paired)."""
    batch = d_rotation.shape[:-2]
    own = nuisance.rotation.shape[:-2]
    if own not in ((), batch):
        raise ValueError(f"nuisance batch {own} does not match the perturbations' {batch}")
    rot = jnp.broadcast_to(nuisance.rotation, batch + (3, 3)) @ d_rotation
    shift = jnp.broadcast_to(nuisance.shift_in_angstroms, batch + (2,)) + d_shift
    ctf = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, batch + jnp.shape(a)[len(own) :]), nuisance.ctf
    )
    group = None if nuisance.group is None else jnp.broadcast_to(nuisance.group, batch)
    return CryoNuisance(rot, shift, ctf, group)


class PoseMarginalOperator(AbstractWrappedOperator):
    """The base cryo-EM operator with its likelihood averaged over small errors of the given poses.

    ``n_draws`` perturbations per image (antithetic pairs by default), rotations with rms angle
    ``rotation_sd_in_degrees`` degrees, shifts with rms length ``shift_sd_in_angstroms`` Angstrom; image n uses
    ``fold_in(key, index_n)``, so its draws do not depend on batching.
    """

    base: CryoEMOperator
    key: PRNGKeyArray
    n_draws: int = eqx.field(static=True)
    rotation_sd_in_degrees: float = eqx.field(static=True)
    shift_sd_in_angstroms: float = eqx.field(static=True)
    antithetic: bool = eqx.field(static=True)

    def __init__(
        self,
        base: CryoEMOperator,
        n_draws: int = 16,
        rotation_sd_in_degrees: float = 0.0,
        shift_sd_in_angstroms: float = 0.0,
        key: PRNGKeyArray | None = None,
        *,
        antithetic: bool = True,
    ):
        if int(n_draws) < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        if rotation_sd_in_degrees < 0 or shift_sd_in_angstroms < 0:
            raise ValueError(
                f"perturbation scales must be >= 0, got {rotation_sd_in_degrees}, {shift_sd_in_angstroms}"
            )
        self.base = base
        self.key = jax.random.key(0) if key is None else key
        self.n_draws = int(n_draws)
        self.rotation_sd_in_degrees = float(rotation_sd_in_degrees)
        self.shift_sd_in_angstroms = float(shift_sd_in_angstroms)
        self.antithetic = bool(antithetic)

    @property
    def wrapped(self) -> CryoEMOperator:
        """The base operator: ``mean`` is its image at the given pose (the perturbations' centre)."""
        return self.base

    def perturbations(
        self, index: Int[Array, ""]
    ) -> tuple[Float[Array, "k 3 3"], Float[Array, "k 2"]]:
        """The ``n_draws`` perturbations used for observation ``index``."""
        return sample_pose_perturbations(
            jax.random.fold_in(self.key, index),
            self.n_draws,
            self.rotation_sd_in_degrees,
            self.shift_sd_in_angstroms,
            antithetic=self.antithetic,
        )

    def perturbed(self, nuisance: CryoNuisance, index: Int[Array, ""]) -> CryoNuisance:
        """Observation ``index``'s nuisance under each of its ``n_draws`` perturbations (leading axis K)."""
        return perturb_nuisance(nuisance, *self.perturbations(index))

    def log_likelihood_matrix(
        self,
        theta: Float[Array, "n_particles dim"],
        obs: Observations,
        *,
        key: PRNGKeyArray | None = None,
        n_nuisance: int = 0,
        batch_size: int | None = None,
    ) -> Float[Array, "n_obs n_particles"]:
        """log (1/K) sum_k N(y_n; F0(theta_i; perturbed pose k of image n), sigma^2 I)."""
        if obs.nuisance is None:
            raise ValueError("a pose-marginalised likelihood needs the given poses (obs.nuisance)")
        fs = self.base.fit_scale
        ll = lambda y, m: self.base.noise.log_likelihood(y, m, fit_scale=fs, fit_offset=fs)  # noqa: E731
        log_k = jnp.log(float(self.n_draws))

        k = self.n_draws

        def chunk(args):
            ys, nus, idx = args
            b = idx.shape[0]
            pert = jax.vmap(self.perturbed)(nus, idx)  # leaves (b, K, ...)
            flat = jax.tree_util.tree_map(lambda a: a.reshape((b * k,) + a.shape[2:]), pert)
            ms = self.base.pair_means(theta, flat)  # one flat batch of b * K * P images
            ms = ms.reshape((b, k) + ms.shape[1:])  # (b, K, P, ...)
            lls = jax.vmap(lambda y, m: jax.vmap(jax.vmap(lambda mi: ll(y, mi)))(m))(ys, ms)
            return logsumexp(lls, axis=1) - log_k  # (b, P)

        return _map_chunks(chunk, (obs.values, obs.nuisance, obs.index), batch_size)

    def tabulate(
        self, obs: Observations, n_nodes: int = 33, *, batch_size: int = 16, progress=None
    ) -> LogLikTableOperator:
        """The marginal log-likelihood on ``n_nodes`` CV nodes per image, as a cubic-interpolated table (1-D CV)."""
        return LogLikTableOperator.build(
            self, obs, n_nodes, batch_size=batch_size, progress=progress
        )
