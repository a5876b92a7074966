"""The public API is flat (``import cryosip`` is enough), and the jaxtyping annotations of public
functions hold at run time (checked with beartype, a test dependency)."""

from __future__ import annotations

import importlib
import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import cryosip

# name in ``cryosip`` -> the module that defines it
EXPORTS = {
    "LinearModes": "cryosip.conformations.modes",
    "PathModel": "cryosip.conformations.path",
    "load_model": "cryosip.data.models",
    "read_particles": "cryosip.data.particles",
    "read_star": "cryosip.data.star",
    "write_star": "cryosip.data.star",
    "read_cs": "cryosip.data.cryosparc",
    "write_cs": "cryosip.data.cryosparc",
    "read_cryodrgn": "cryosip.data.cryodrgn",
    "write_cryodrgn": "cryosip.data.cryodrgn",
    "read_mrcs": "cryosip.data.mrc",
    "write_mrcs": "cryosip.data.mrc",
    "read_volume_mrc": "cryosip.data.mrc",
    "make_distribution": "cryosip.data.distributions",
    "AbstractDistribution": "cryosip.data.distributions",
    "Gaussian": "cryosip.data.distributions",
    "TwoModeMixture": "cryosip.data.distributions",
    "Beta": "cryosip.data.distributions",
    "Uniform": "cryosip.data.distributions",
    "Samples": "cryosip.data.distributions",
    "Banana": "cryosip.data.distributions",
    "Ring": "cryosip.data.distributions",
    "PairedMMD": "cryosip.sip.discrepancies",
    "KL": "cryosip.sip.discrepancies",
    "prepare": "cryosip.pipeline.problem",
    "Problem": "cryosip.pipeline.problem",
    "MethodResult": "cryosip.pipeline.methods",
    "run_method": "cryosip.pipeline.methods",
    "method_from_name": "cryosip.pipeline.methods",
    "WGF": "cryosip.pipeline.methods",
    "EMGrid": "cryosip.pipeline.methods",
    "PerImageMAP": "cryosip.pipeline.methods",
    "MAPClasses": "cryosip.pipeline.methods",
    "GMM": "cryosip.pipeline.methods",
    "Bootstrap": "cryosip.pipeline.methods",
}


def test_public_names_import_from_cryosip_directly():
    from cryosip import (  # noqa: F401  (the import itself is the test)
        MMD,
        LinearModes,
        UnpairedMMD,
        make_distribution,
        read_cryodrgn,
        read_cs,
        read_mrcs,
        read_particles,
        read_star,
    )

    for name, module in EXPORTS.items():
        assert getattr(cryosip, name) is getattr(importlib.import_module(module), name), name
    # the unconditional estimator under its clear name; MMD is the same class (old name)
    assert UnpairedMMD is MMD
    assert UnpairedMMD(cryosip.GaussianKernel(1.0)).name == "mmd-unconditional"
    # a distribution made through the flat API samples inside its box
    truth = make_distribution("bimodal", 0.0, 1.0)
    assert isinstance(truth, cryosip.TwoModeMixture)
    x = truth.sample(0, 100)
    assert x.shape == (100, 1) and (x >= 0).all() and (x <= 1).all()


def checked(f):
    """``f`` with its jaxtyping annotations enforced at call time (shapes and dtypes)."""
    return jaxtyped(typechecker=beartype)(f)


def _f32(*shape):
    return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


CALLS = {
    "euler_to_matrix": (cryosip.euler_to_matrix, (_f32(5), _f32(5), _f32(5))),
    "kl": (cryosip.kl, (_f32(7, 3), _f32(3))),
    "mmd": (cryosip.mmd, (_f32(4, 2, 2), _f32(6, 2, 2), cryosip.GaussianKernel(1.0))),
    "sq_distances": ("cryosip.sip.discrepancies.kernels:sq_distances", (_f32(4, 3), _f32(5, 3))),
    "wavelength": ("cryosip.cryoem.ctf:wavelength_in_angstroms", (jnp.full((2,), 300.0),)),
    "axis_angle": ("cryosip.cryoem.pose:axis_angle_to_matrix", (_f32(6, 3),)),
}


def _function(f):
    if isinstance(f, str):
        module, name = f.split(":")
        return getattr(importlib.import_module(module), name)
    return f


@pytest.mark.parametrize("name", sorted(CALLS))
def test_annotations_hold_at_run_time(name):
    f, args = CALLS[name]
    out = checked(_function(f))(*args)  # raises TypeCheckError if an annotation is wrong
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "f, args",
    [
        # n_particles disagrees between the log-likelihood (7, 3) and the log-weights (4,)
        (cryosip.kl, (_f32(7, 3), _f32(4))),
        # d disagrees between x (4, 3) and y (5, 2)
        ("cryosip.sip.discrepancies.kernels:sq_distances", (_f32(4, 3), _f32(5, 2))),
        # a rotation vector has 3 components
        ("cryosip.cryoem.pose:axis_angle_to_matrix", (_f32(6, 2),)),
    ],
)
def test_a_wrong_shape_is_caught(f, args):
    with pytest.raises(TypeCheckError):
        checked(_function(f))(*args)


def undocumented_public_api() -> list[str]:
    """Names exported by ``cryosip`` without a docstring, and the public methods and properties
    of its classes that have none anywhere in their class hierarchy (an override may inherit the
    documentation of the method it overrides)."""
    out = []
    for name in sorted(dir(cryosip)):
        obj = getattr(cryosip, name)
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not str(getattr(obj, "__module__", "")).startswith("cryosip"):
            continue
        if not inspect.getdoc(obj):
            out.append(name)
        if not inspect.isclass(obj):
            continue
        for attr in dir(obj):
            owners = [c for c in obj.__mro__ if attr in vars(c)]
            if attr.startswith("_") or not owners[0].__module__.startswith("cryosip"):
                continue
            v = vars(owners[0])[attr]
            if not (isinstance(v, property | staticmethod | classmethod) or inspect.isfunction(v)):
                continue
            docs = [getattr(vars(c)[attr], "__doc__", None) for c in owners]
            if not any(d and d.strip() for d in docs):
                out.append(f"{name}.{attr}")
    return out


def test_every_public_name_and_method_has_a_docstring():
    assert undocumented_public_api() == []


def test_the_docstring_check_sees_a_missing_docstring(monkeypatch):
    class Undocumented:
        def method(self):
            return 1

    Undocumented.__module__ = "cryosip.fake"
    monkeypatch.setattr(cryosip, "Undocumented", Undocumented, raising=False)
    assert undocumented_public_api() == ["Undocumented", "Undocumented.method"]
