"""LinearModes: a mean structure plus a linear combination of k displacement modes.

    X(theta) = mean + sum_k theta_k * modes[k],   theta in the box [lower, upper] subset R^k

Built from given modes (normal modes, difference vectors, ...) or by PCA of a trajectory
(:meth:`LinearModes.from_trajectory`). **Units of theta** with PCA, two choices:

- ``units="sd"`` (default): each mode is the unit principal direction scaled by the standard
  deviation of the trajectory along it, so ``theta_k`` is measured in **standard deviations**
  of principal component k (theta = 1 moves the structure by one sd along PC k; the RMS
  displacement per atom of that move is ``sd_k / sqrt(n_atoms)`` Angstrom, available as
  :attr:`LinearModes.rms_per_unit`).
- ``units="rms"``: each mode is the unit principal direction times ``sqrt(n_atoms)``, so
  ``theta_k = 1`` moves the atoms by **1 Angstrom RMS** (root mean square over the atoms of the
  displacement); ``rms_per_unit`` is 1 for every mode. This is what ``cryosip reconstruct
  --modes K`` uses.

With given modes theta is in whatever units the modes carry.

Domain rule (as every conformation model): ``__call__`` clamps theta into the box.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..cryoem.atoms import AtomParameters
from .base import AbstractConformationModel
from .path import kabsch_superpose


class LinearModes(AbstractConformationModel):
    """theta in R^k -> mean + sum_k theta_k modes[k]; box domain [lower, upper]."""

    atoms: AtomParameters
    mean: Float[Array, "n_atoms 3"]
    modes: Float[Array, "n_modes n_atoms 3"]
    bounds: Float[Array, "2 n_modes"]

    def __init__(self, mean, modes, atoms: AtomParameters, bounds=(-3.0, 3.0)):
        """``mean`` (n, 3), ``modes`` (k, n, 3) (or (n, 3) for k = 1), ``bounds`` = (lower, upper),
        each a scalar or a length-k array (finite: the domain must be a box)."""
        mean = np.asarray(mean, np.float64)
        modes = np.asarray(modes, np.float64)
        if modes.ndim == 2:
            modes = modes[None]
        if mean.ndim != 2 or mean.shape[1] != 3:
            raise ValueError(f"mean must be (n_atoms, 3), got {mean.shape}")
        if modes.ndim != 3 or modes.shape[1:] != mean.shape or modes.shape[0] < 1:
            raise ValueError(f"modes must be (n_modes >= 1, {mean.shape[0]}, 3), got {modes.shape}")
        if mean.shape[0] != atoms.n_atoms:
            raise ValueError(
                f"mean has {mean.shape[0]} atoms but the atom parameters {atoms.n_atoms}"
            )
        k = modes.shape[0]
        lo, hi = (np.broadcast_to(np.asarray(b, np.float64), (k,)) for b in bounds)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
            raise ValueError(f"bounds must be finite with lower < upper, got {lo}, {hi}")
        self.atoms = atoms
        self.mean = jnp.asarray(mean, jnp.float32)
        self.modes = jnp.asarray(modes, jnp.float32)
        self.bounds = jnp.asarray(np.stack([lo, hi]), jnp.float32)

    @classmethod
    def from_trajectory(
        cls,
        frames,
        atoms: AtomParameters,
        n_modes: int,
        *,
        superpose_on=None,
        superpose: bool = True,
        n_sd: float = 3.0,
        units: str = "sd",
        margin: float = 0.1,
    ) -> LinearModes:
        """PCA of a trajectory ``frames`` (F, n_atoms, 3).

        Frames are superposed on frame 0 (Kabsch, on the atoms in ``superpose_on``; default all)
        and centred on frame 0's centroid, as :class:`~cryosip.conformations.path.PathModel`
        does (``superpose=False``: the frames are used as given, e.g. already aligned or
        synthetic). The mean is the average (superposed) frame; mode k is the k-th principal
        direction times its standard deviation, so theta is in sd units (see the module
        docstring). With ``units="sd"`` the box is ``[-b_k, b_k]`` with ``b_k`` the larger of
        ``n_sd`` and the largest |score| of any frame on mode k; with ``units="rms"`` it is the
        frames' range of scores on mode k widened by ``margin`` times that range on each side.
        Either way every frame of the trajectory lies inside.
        """
        if units not in ("sd", "rms"):
            raise ValueError(f"units must be 'sd' or 'rms', got {units!r}")
        frames = np.asarray(frames, np.float64)
        if frames.ndim != 3 or frames.shape[2] != 3 or frames.shape[0] < 2:
            raise ValueError(f"frames must be (n_frames >= 2, n_atoms, 3), got {frames.shape}")
        F, n = frames.shape[:2]
        if not 1 <= n_modes <= min(F - 1, 3 * n):
            raise ValueError(f"n_modes must be in [1, {min(F - 1, 3 * n)}], got {n_modes}")
        aligned = superpose_frames(frames, superpose_on) if superpose else frames
        mean = aligned.mean(0)
        X = (aligned - mean).reshape(F, -1)
        _, svals, vt = np.linalg.svd(X, full_matrices=False)
        sd = svals[:n_modes] / np.sqrt(F - 1)
        if np.any(sd <= 0):
            raise ValueError("the trajectory has fewer than n_modes directions of variation")
        # fix the sign of each direction: the last frame has a positive score (reproducible)
        signs = np.where(X[-1] @ vt[:n_modes].T < 0, -1.0, 1.0)
        unit = vt[:n_modes] * signs[:, None]
        if units == "rms":
            scale = np.full(n_modes, np.sqrt(n))  # theta = 1: 1 Angstrom RMS over the n atoms
            scores = X @ unit.T / scale
            lo, hi = scores.min(0), scores.max(0)
            span = hi - lo
            bounds = (lo - margin * span - 1e-6 * span, hi + margin * span + 1e-6 * span)
        else:
            scale = sd
            scores = X @ unit.T / sd  # (F, k), in sd units
            b = np.maximum(n_sd, np.abs(scores).max(0) * (1 + 1e-6))
            bounds = (-b, b)
        modes = (unit * scale[:, None]).reshape(n_modes, n, 3)
        return cls(mean, modes, atoms, bounds=bounds)

    @property
    def lower(self):
        """Lower end of each mode's range (the ``bounds`` given or fitted)."""
        return self.bounds[0]

    @property
    def upper(self):
        """Upper end of each mode's range."""
        return self.bounds[1]

    @property
    def n_modes(self) -> int:
        """Number of linear modes (= CVs)."""
        return int(self.modes.shape[0])

    @property
    def cv_names(self):
        """``z1``, ``z2``, ...: one name per mode."""
        return tuple(f"z{i + 1}" for i in range(self.n_modes))

    @property
    def rms_per_unit(self) -> Float[Array, " n_modes"]:
        """RMS displacement per atom (Angstrom) of a unit step along each mode."""
        return jnp.sqrt(jnp.mean(jnp.sum(self.modes**2, axis=-1), axis=-1))

    def coordinates(self, theta):
        return self.mean + jnp.tensordot(theta, self.modes, axes=1)

    def scores(self, coords: Float[Array, "*batch n_atoms 3"]) -> Float[Array, "*batch n_modes"]:
        """Least-squares theta for (already superposed) coordinates, batched; not clamped."""
        M = self.modes.reshape(self.n_modes, -1)
        coords = jnp.asarray(coords)
        d = (coords - self.mean).reshape(coords.shape[:-2] + (-1,))
        return jnp.linalg.solve(M @ M.T, (d @ M.T)[..., None])[..., 0]


def superpose_frames(frames: np.ndarray, superpose_on=None) -> np.ndarray:
    """Kabsch-superpose every frame on frame 0 (atoms in ``superpose_on``) and centre on frame 0."""
    frames = np.asarray(frames, np.float64)
    ref = frames[0]
    aligned = np.stack([kabsch_superpose(f, ref, superpose_on) for f in frames])
    return aligned - aligned[0].mean(0)
