"""Toy conformation models with a geometric meaning, made of Gaussian pseudo-atoms.

Every toy is planar (z = 0 in its reference frame) and centred on the centroid of its
pseudo-atoms for every theta, so that the CV changes the shape, never the position. All
pseudo-atoms are equal isotropic Gaussians (:meth:`AtomParameters.single_gaussian`); the
absolute amplitude is irrelevant once the noise is set from an SNR.

=============  ==========================  ==================  =================
model          CV (unit)                   default domain      pseudo-atoms
=============  ==========================  ==================  =================
Dumbbell       separation (Angstrom)       [10, 40]            2 (sigma 4 A)
Hinge          opening angle (degrees)     [30, 150]           1 + 2 x 3 (3 A)
Square         side length (Angstrom)      [10, 40]            4 (sigma 3 A)
TwoHinge       angle1, angle2 (degrees)    [30, 150]^2         body 4 + arms 2, 3
=============  ==========================  ==================  =================

The defaults change the image visibly over the domain at 32-64 px and 1.5-3 A/px (the
largest extent, about 50-60 Angstrom, fits a 32 px box at 2 A/px). Angles stop short of 0
(arms on top of each other) and of 180 degrees (where the geometry is flat in the angle);
mirror images are indistinguishable under uniform poses, and a planar object is its own
mirror image up to a rotation, so angles above 180 would duplicate angles below.

Each toy has ``measure(coords) -> theta``, the CV read back from coordinates (any rigid
motion of them): tests and rotation-invariant evaluation use it.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..cryoem.atoms import AtomParameters
from .base import AbstractConformationModel


def _center(xyz: Float[Array, "n 3"]) -> Float[Array, "n 3"]:
    return xyz - jnp.mean(xyz, axis=0)


def _planar(xy: Float[Array, "n 2"]) -> Float[Array, "n 3"]:
    return jnp.concatenate([xy, jnp.zeros_like(xy[:, :1])], axis=1)


def _angle_in_degrees(u, v):
    u, v = jnp.asarray(u), jnp.asarray(v)
    c = jnp.dot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v))
    return jnp.rad2deg(jnp.arccos(jnp.clip(c, -1.0, 1.0)))


class _BoxToy(AbstractConformationModel):
    """Shared plumbing: the pseudo-atoms and a box domain stored as static floats."""

    atoms: AtomParameters
    domain_lower: tuple[float, ...] = eqx.field(static=True)
    domain_upper: tuple[float, ...] = eqx.field(static=True)

    @property
    def lower(self):
        return jnp.asarray(self.domain_lower, jnp.float32)

    @property
    def upper(self):
        return jnp.asarray(self.domain_upper, jnp.float32)


class _BlobToy(_BoxToy):
    """``n_blobs`` equal Gaussian blobs (sigma ``blob_sigma_in_angstroms``, by default the
    class's ``default_sigma_in_angstroms``) whose one CV, a length, lies in ``domain``."""

    n_blobs = 0
    default_sigma_in_angstroms = 0.0

    def __init__(
        self,
        domain=(10.0, 40.0),
        blob_sigma_in_angstroms: float | None = None,
        amplitude: float = 1.0,
    ):
        lo, hi = map(float, domain)
        if not 0 <= lo < hi:
            raise ValueError(f"domain must satisfy 0 <= lower < upper, got {domain}")
        sigma = blob_sigma_in_angstroms
        if sigma is None:
            sigma = self.default_sigma_in_angstroms
        self.atoms = AtomParameters.single_gaussian(self.n_blobs, amplitude, sigma)
        self.domain_lower, self.domain_upper = (lo,), (hi,)


class Dumbbell(_BlobToy):
    """Two equal blobs on the x axis; CV = their separation in Angstrom."""

    cv_names = ("separation",)
    n_blobs = 2
    default_sigma_in_angstroms = 4.0

    def coordinates(self, theta):
        half = 0.5 * theta[0]
        z = jnp.zeros(())
        return jnp.stack([jnp.stack([-half, z, z]), jnp.stack([half, z, z])])

    @staticmethod
    def measure(coords) -> Float[Array, " 1"]:
        return jnp.linalg.norm(coords[1] - coords[0])[None]


def _arm(direction_in_radians, n: int, spacing: float, origin):
    """n blobs at distances spacing * (1..n) from ``origin`` along the in-plane direction."""
    d = jnp.stack([jnp.cos(direction_in_radians), jnp.sin(direction_in_radians)])
    r = spacing * jnp.arange(1, n + 1, dtype=jnp.float32)
    return origin[None, :] + r[:, None] * d[None, :]


class Hinge(_BoxToy):
    """A pivot blob with two arms of ``n_per_arm`` blobs; CV = the opening angle in degrees.

    Arm 1 points along +x from the pivot, arm 2 at the opening angle from it (in the xy plane).
    """

    cv_names = ("angle",)

    n_per_arm: int = eqx.field(static=True)
    spacing_in_angstroms: float = eqx.field(static=True)

    def __init__(
        self,
        domain=(30.0, 150.0),
        n_per_arm: int = 3,
        spacing_in_angstroms: float = 8.0,
        blob_sigma_in_angstroms: float = 3.0,
        amplitude: float = 1.0,
    ):
        lo, hi = map(float, domain)
        if not 0 <= lo < hi <= 180:
            raise ValueError(f"domain must satisfy 0 <= lower < upper <= 180 degrees, got {domain}")
        if n_per_arm < 1:
            raise ValueError(f"n_per_arm must be >= 1, got {n_per_arm}")
        self.atoms = AtomParameters.single_gaussian(
            1 + 2 * n_per_arm, amplitude, blob_sigma_in_angstroms
        )
        self.domain_lower, self.domain_upper = (lo,), (hi,)
        self.n_per_arm = int(n_per_arm)
        self.spacing_in_angstroms = float(spacing_in_angstroms)

    def coordinates(self, theta):
        o = jnp.zeros((2,))
        arm1 = _arm(jnp.zeros(()), self.n_per_arm, self.spacing_in_angstroms, o)
        arm2 = _arm(jnp.deg2rad(theta[0]), self.n_per_arm, self.spacing_in_angstroms, o)
        return _center(_planar(jnp.concatenate([o[None], arm1, arm2])))

    def measure(self, coords) -> Float[Array, " 1"]:
        """Angle between the arms' tips seen from the pivot (atom 0)."""
        n = self.n_per_arm
        return _angle_in_degrees(coords[n] - coords[0], coords[2 * n] - coords[0])[None]


class Square(_BlobToy):
    """Four blobs at the corners of a square; CV = the side length in Angstrom."""

    cv_names = ("side",)
    n_blobs = 4
    default_sigma_in_angstroms = 3.0

    def coordinates(self, theta):
        corners = jnp.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]], jnp.float32)
        return _planar(theta[0] * corners)

    @staticmethod
    def measure(coords) -> Float[Array, " 1"]:
        """Mean of the four sides (consecutive corners)."""
        d = jnp.linalg.norm(coords - jnp.roll(coords, -1, axis=0), axis=-1)
        return jnp.mean(d)[None]


class TwoHinge(_BoxToy):
    """A body (a row of blobs on the x axis) with an arm hinged at each end: two angles.

    Arm 1 (``n_arm1`` blobs) is hinged at the body's left end, arm 2 (``n_arm2`` blobs) at its
    right end; ``angle1``/``angle2`` are the angles in degrees between each arm and the body
    (0 = folded onto the body, 180 = straight on), both arms on the same side (a U at 90, 90).
    The arms have different lengths on purpose: with equal arms a 180-degree rotation would
    map (a, b) to (b, a) and the two angles could not be told apart from images.
    """

    cv_names = ("angle1", "angle2")

    n_body: int = eqx.field(static=True)
    n_arm1: int = eqx.field(static=True)
    n_arm2: int = eqx.field(static=True)
    spacing_in_angstroms: float = eqx.field(static=True)

    def __init__(
        self,
        domain=((30.0, 30.0), (150.0, 150.0)),
        n_body: int = 4,
        n_arm1: int = 2,
        n_arm2: int = 3,
        spacing_in_angstroms: float = 8.0,
        blob_sigma_in_angstroms: float = 3.0,
        amplitude: float = 1.0,
    ):
        lo, hi = (
            tuple(float(v) for v in np.broadcast_to(np.asarray(b, np.float64), (2,)))
            for b in domain
        )
        if not all(0 <= a < b <= 180 for a, b in zip(lo, hi)):
            raise ValueError(f"domain must satisfy 0 <= lower < upper <= 180 degrees, got {domain}")
        if n_body < 2 or n_arm1 < 1 or n_arm2 < 1 or n_arm1 == n_arm2:
            raise ValueError(
                "need n_body >= 2 and two arms of different lengths >= 1 (identifiability)"
            )
        self.atoms = AtomParameters.single_gaussian(
            n_body + n_arm1 + n_arm2, amplitude, blob_sigma_in_angstroms
        )
        self.domain_lower, self.domain_upper = lo, hi
        self.n_body, self.n_arm1, self.n_arm2 = int(n_body), int(n_arm1), int(n_arm2)
        self.spacing_in_angstroms = float(spacing_in_angstroms)

    def coordinates(self, theta):
        s = self.spacing_in_angstroms
        half = 0.5 * s * (self.n_body - 1)
        x = jnp.linspace(-half, half, self.n_body)
        body = jnp.stack([x, jnp.zeros_like(x)], axis=1)
        a1, a2 = jnp.deg2rad(theta[0]), jnp.deg2rad(theta[1])
        arm1 = _arm(a1, self.n_arm1, s, body[0])  # angle measured from the body direction (+x)
        arm2 = _arm(jnp.pi - a2, self.n_arm2, s, body[-1])  # from -x, turning the other way
        return _center(_planar(jnp.concatenate([body, arm1, arm2])))

    def measure(self, coords) -> Float[Array, " 2"]:
        nb, n1 = self.n_body, self.n_arm1
        left, right = coords[0], coords[nb - 1]
        tip1, tip2 = coords[nb + n1 - 1], coords[-1]
        return jnp.stack(
            [
                _angle_in_degrees(tip1 - left, right - left),
                _angle_in_degrees(tip2 - right, left - right),
            ]
        )


TOYS: dict[str, type[AbstractConformationModel]] = {
    "dumbbell": Dumbbell,
    "hinge": Hinge,
    "square": Square,
    "two-hinge": TwoHinge,
}
