"""Explicit dtype promotion (issue 16).

The code does not rely on JAX's implicit promotion between array dtypes (the tests run with
``jax_numpy_dtype_promotion="strict"``); where arrays of different dtypes meet, they are cast
to the dtype JAX's standard promotion would give them, so results are the same as with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def promoted_dtype(*args) -> jnp.dtype:
    """The dtype JAX's standard promotion gives ``args`` (arrays, dtypes or scalars), whatever
    the current promotion mode: the dtype to cast to explicitly."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*args)


def promote(*arrays):
    """``arrays`` cast to their :func:`promoted_dtype`: the explicit form of an implicit promotion."""
    dtype = promoted_dtype(*arrays)
    return tuple(jnp.asarray(a, dtype) for a in arrays)
