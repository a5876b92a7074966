"""Per-image posteriors over the recovered particles, stored for ``cryosip select``.

``posterior.npz`` (written by :func:`write_posterior_npz`) holds

* ``positions`` (K, d) and ``weights`` (K,): the recovered particle measure;
* ``responsibilities`` (N, K) float16: image i's posterior probability of particle k,
  ``r_ik ∝ w_k p(y_i | theta_k)`` (rows sum to 1 within float16 rounding, ~1e-3);
* ``mean``/``sd`` (N, d): the CV posterior mean and sd per image;
* ``cv_names``, ``lower``/``upper`` (the model box) and ``table`` (the per-image table's file
  name in the same folder: ``particles_cv.star`` or ``particles_cv.cs``, or ``""``).

The probability that image i's CV lies in a set A is ``sum_k r_ik 1[theta_k in A]``.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["write_posterior_npz", "read_posterior_npz"]


def write_posterior_npz(
    path, *, positions, weights, responsibilities, mean, sd, cv_names, lower, upper, table: str
) -> None:
    from .._atomic import atomic_path

    pos = np.asarray(positions, np.float64)
    if pos.ndim == 1:
        pos = pos[:, None]
    r = np.asarray(responsibilities, np.float32)
    mean = np.asarray(mean, np.float64).reshape(r.shape[0], -1)
    sd = np.asarray(sd, np.float64).reshape(r.shape[0], -1)
    with atomic_path(path, ".npz") as tmp:
        np.savez_compressed(
            tmp,
            positions=pos,
            weights=np.asarray(weights, np.float64),
            responsibilities=r.astype(np.float16),
            mean=mean,
            sd=sd,
            cv_names=np.asarray([str(c) for c in cv_names]),
            lower=np.asarray(lower, np.float64).ravel(),
            upper=np.asarray(upper, np.float64).ravel(),
            table=np.asarray(str(table)),
        )


def read_posterior_npz(path) -> dict:
    with np.load(os.fspath(path), allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["responsibilities"] = out["responsibilities"].astype(np.float32)
    out["cv_names"] = [str(c) for c in out["cv_names"]]
    out["table"] = str(out["table"])
    return out
