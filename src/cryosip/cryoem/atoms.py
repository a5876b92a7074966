"""Per-atom scattering parameters (Peng et al. 1996 five-Gaussian form factors)."""

from __future__ import annotations

import functools
import json
from importlib import resources

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

ELEMENT_TO_Z = {
    "H": 1,
    "C": 6,
    "N": 7,
    "O": 8,
    "F": 9,
    "NA": 11,
    "MG": 12,
    "P": 15,
    "S": 16,
    "CL": 17,
    "K": 19,
    "CA": 20,
    "MN": 25,
    "FE": 26,
    "CO": 27,
    "CU": 29,
    "ZN": 30,
}


@functools.cache
def _peng_table() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    text = resources.files("cryosip.data").joinpath("peng1996.json").read_text()
    raw = json.loads(text)["parameters"]
    return {int(z): (np.asarray(v["a"]), np.asarray(v["b"])) for z, v in raw.items()}


class AtomParameters(eqx.Module):
    """Gaussian amplitudes (Angstrom) and variances (Angstrom^2) of each atom's potential.

    The projected potential of one atom at in-plane offset r is
    ``sum_k amplitudes[k] * N(r; 0, variances[k] I_2)`` (as in cryojax's
    ``GaussianMixtureVolume``: variance = (b + B) / (8 pi^2)).
    """

    amplitudes: Float[Array, "n_atoms n_gauss"]
    variances: Float[Array, "n_atoms n_gauss"]

    @classmethod
    def from_elements(
        cls, elements, bfactor_in_angstroms2: float | np.ndarray = 0.0
    ) -> AtomParameters:
        """Peng parameters for element symbols (e.g. ``["C", "N", "H"]``) plus an optional B-factor blur."""
        table = _peng_table()
        zs = []
        for e in elements:
            key = str(e).strip().upper()
            if key not in ELEMENT_TO_Z or ELEMENT_TO_Z[key] not in table:
                raise ValueError(f"element {e!r} has no tabulated scattering factor")
            zs.append(ELEMENT_TO_Z[key])
        a = np.stack([table[z][0] for z in zs])
        b = np.stack([table[z][1] for z in zs]) + np.asarray(
            bfactor_in_angstroms2, dtype=np.float64
        ).reshape(-1, 1)
        return cls(jnp.asarray(a, jnp.float32), jnp.asarray(b / (8 * np.pi**2), jnp.float32))

    @classmethod
    def single_gaussian(
        cls, n_atoms: int, amplitude: float = 1.0, sigma_in_angstroms: float = 2.0
    ) -> AtomParameters:
        """Pseudo-atoms: one isotropic Gaussian blob each (toy models, coarse grains)."""
        return cls(
            jnp.full((n_atoms, 1), amplitude, jnp.float32),
            jnp.full((n_atoms, 1), sigma_in_angstroms**2, jnp.float32),
        )

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return self.amplitudes.shape[0]
