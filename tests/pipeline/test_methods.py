"""Methods are configured objects with one result type; names become objects in one registry."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cryosip import GMM, WGF, Bootstrap, MAPClasses, PerImageMAP, method_from_name, run_method
from cryosip.pipeline.methods import METHODS
from cryosip.pipeline.problem import Problem


def _problem() -> Problem:
    """A 1-D problem given by its per-image log-likelihood on a fine grid (no images)."""
    grid = np.linspace(0.0, 1.0, 65)
    theta = np.random.default_rng(0).beta(2.0, 5.0, 200)
    ll = -0.5 * ((grid[None, :] - theta[:, None]) / 0.1) ** 2
    return Problem(None, None, None, np.zeros(1), np.ones(1), grid, ll, 1.0, 0.0)


def test_the_registry_names_the_cli_methods():
    assert list(METHODS) == ["wgf", "em-grid", "per-image", "map-classes", "gmm"]
    m = method_from_name("wgf", objective="mmd", n_steps=7, nodes=5, n_components=2)
    assert m == WGF(objective="mmd", n_steps=7)  # other methods' settings are ignored
    with pytest.raises(TypeError, match="n_step\\b"):  # a typo is not
        method_from_name("wgf", n_step=7)
    assert method_from_name("gmm", n_components=3) == GMM(3)
    with pytest.raises(ValueError, match="unknown method"):
        method_from_name("em")
    with pytest.raises(ValueError, match="no bootstrap"):
        Bootstrap(MAPClasses(), 2)


def test_objects_give_what_run_method_gives_and_the_step_size_is_explicit():
    problem, key = _problem(), jax.random.key(3)
    flow = dict(n_particles=8, n_steps=30, bandwidth=0.05, progress=False)
    a = Bootstrap(WGF(**flow), 2).run(problem, key)
    b = run_method(problem, "wgf", key=key, n_bootstrap=2, **flow)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.weights, b.weights)
    assert len(a.replicates) == len(a.particle_replicates) == 2 and a.particles is not None
    assert a.step_size > 0  # the policy's step size, resolved
    # the resolved step size given back reproduces the run
    c = WGF(**flow, step_size=a.step_size).run(problem, key)
    assert c.step_size == a.step_size and np.array_equal(c.positions, a.positions)
    p = Bootstrap(PerImageMAP(), 3).run(problem, key)
    q = run_method(problem, "per-image", key=key, n_bootstrap=3)
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(p.replicates, q.replicates))
    assert p.label == "per-image" and p.step_size is None
