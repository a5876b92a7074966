"""PathModel: theta = s in [0, 1] moves along an ordered set of superposed frames.

The coordinates are a natural cubic spline through the frames in the frame parameter
u = s (F - 1) (C^2, passes through every frame; with two frames it is the straight line).
This is the PLUMED path-CV convention s = frame index / (F - 1).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from scipy.interpolate import CubicSpline

from ..cryoem.atoms import AtomParameters
from ..sip._dtypes import promoted_dtype
from .base import AbstractConformationModel


def kabsch_superpose(
    mobile: np.ndarray, target: np.ndarray, select: np.ndarray | None = None
) -> np.ndarray:
    """Rigidly superpose ``mobile`` (n, 3) on ``target`` using the atoms in ``select``."""
    sel = slice(None) if select is None else select
    mc, tc = mobile[sel].mean(0), target[sel].mean(0)
    H = (mobile[sel] - mc).T @ (target[sel] - tc)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return (mobile - mc) @ R.T + tc


class PathModel(AbstractConformationModel):
    atoms: AtomParameters
    coeffs: Float[Array, "4 n_seg n_atoms 3"]
    n_frames: int = eqx.field(static=True)

    def __init__(
        self,
        frames: np.ndarray,
        atoms: AtomParameters,
        *,
        superpose_on: np.ndarray | None = None,
        center: bool = True,
        n_knots: int | None = None,
    ):
        """``frames``: (F, n_atoms, 3); superposed on frame 0 using the atoms in ``superpose_on``
        (a boolean mask or index array; default all atoms) and centred on frame 0's centroid.

        ``n_knots``: if given, the path is first smoothed by a least-squares cubic B-spline in the
        frame index with that many interior knots (removes frame-to-frame jitter of MD/DIMS paths;
        the curve then no longer passes exactly through the frames). Default: interpolate the frames.
        """
        frames = np.asarray(frames, np.float64)
        if frames.ndim != 3 or frames.shape[0] < 2 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (n_frames >= 2, n_atoms, 3), got {frames.shape}")
        if frames.shape[1] != atoms.n_atoms:
            raise ValueError(
                f"frames have {frames.shape[1]} atoms but the atom parameters {atoms.n_atoms}"
            )
        ref = frames[0]
        frames = np.stack([kabsch_superpose(f, ref, superpose_on) for f in frames])
        if n_knots is not None and frames.shape[0] > 4:
            from scipy.interpolate import make_lsq_spline

            F = frames.shape[0]
            x = np.arange(F, dtype=np.float64)
            knots = np.r_[[0.0] * 4, np.linspace(0, F - 1, int(n_knots) + 2)[1:-1], [F - 1.0] * 4]
            frames = make_lsq_spline(x, frames.reshape(F, -1), knots, k=3)(x).reshape(frames.shape)
        if center:
            frames = frames - frames[0].mean(0)
        F = frames.shape[0]
        if F == 2:
            c = np.zeros((4, 1) + frames.shape[1:])
            c[3, 0], c[2, 0] = frames[0], frames[1] - frames[0]
        else:
            c = CubicSpline(np.arange(F), frames, axis=0, bc_type="natural").c  # (4, F-1, n, 3)
        self.coeffs = jnp.asarray(c, jnp.float32)
        self.atoms = atoms
        self.n_frames = F

    @property
    def lower(self):
        """The path starts at s = 0."""
        return jnp.zeros((1,))

    @property
    def upper(self):
        """The path ends at s = 1."""
        return jnp.ones((1,))

    @property
    def cv_names(self):
        """One CV, ``s``: the fraction of the path."""
        return ("s",)

    def coordinates(self, theta):
        u = theta[0] * (self.n_frames - 1)
        k = jnp.clip(jnp.floor(u), 0, self.n_frames - 2).astype(jnp.int32)
        t = u - k.astype(u.dtype)
        c = self.coeffs[:, k].astype(promoted_dtype(self.coeffs, t))  # float64 theta: float64
        return ((c[0] * t + c[1]) * t + c[2]) * t + c[3]

    def frames(self) -> np.ndarray:
        """The (superposed, centred) frames the spline passes through."""
        return np.stack(
            [
                np.asarray(self.coordinates(jnp.array([i / (self.n_frames - 1)])))
                for i in range(self.n_frames)
            ]
        )
