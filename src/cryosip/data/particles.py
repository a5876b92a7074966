"""ParticleStack: one type for real and simulated particle images with their nuisances."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..cryoem.ctf import CTFParams
from ..cryoem.image_model import CryoNuisance
from ..sip.operator import Observations


def nuisance_to_numpy(nu: CryoNuisance) -> CryoNuisance:
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), nu)


def take_nuisance(nu: CryoNuisance, idx) -> CryoNuisance:
    return jax.tree_util.tree_map(lambda a: a[idx], nu)


@dataclasses.dataclass
class ParticleStack:
    """Images (N, D, D) -- an array or a read-only memory map -- with per-particle nuisances.

    ``nuisance`` holds NumPy arrays (rotations in the RELION convention, shifts in Angstrom as
    the particle's displacement from the box centre, CTF parameters). ``metadata`` keeps the
    original per-particle table (e.g. the STAR rows) so that writers can preserve every column.
    """

    images: np.ndarray
    nuisance: CryoNuisance
    pixel_size: float
    metadata: pd.DataFrame | None = None
    optics: pd.DataFrame | None = None
    source: str | None = None

    def __post_init__(self):
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (n, D, D), got {self.images.shape}")
        if len(self.nuisance.rotation) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {len(self.nuisance.rotation)} nuisance rows")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def box_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, idx) -> ParticleStack:
        idx = np.asarray(idx)
        meta = None if self.metadata is None else self.metadata.iloc[idx].reset_index(drop=True)
        return dataclasses.replace(self, images=np.asarray(self.images[idx]), nuisance=take_nuisance(self.nuisance, idx), metadata=meta)

    def observations(self, idx=None) -> Observations:
        """The engine's view (JAX arrays): images with their known nuisances."""
        if idx is None:
            idx = np.arange(len(self))
        idx = np.asarray(idx)
        imgs = jnp.asarray(np.asarray(self.images[idx], np.float32))
        nu = jax.tree_util.tree_map(jnp.asarray, take_nuisance(self.nuisance, idx))
        return Observations(imgs, nu, jnp.asarray(idx, jnp.int32))

    @staticmethod
    def make_nuisance(rotation, shift_in_angstroms, **ctf_kwargs) -> CryoNuisance:
        """Build a NumPy-backed CryoNuisance from arrays (CTF keywords as in :meth:`CTFParams.make`)."""
        ctf = CTFParams.make(**ctf_kwargs)
        n = np.asarray(rotation).shape[0]
        ctf = jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a, np.float32), (n,)).copy(), ctf)
        return CryoNuisance(np.asarray(rotation, np.float32), np.asarray(shift_in_angstroms, np.float32), ctf)
