"""Conformation models: the AdK path CV, PathModel, LinearModes and the geometric toys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryosip.conformations.modes import LinearModes, superpose_frames
from cryosip.conformations.path import PathModel, kabsch_superpose
from cryosip.conformations.toys import TOYS, Dumbbell, Hinge, Square, TwoHinge
from cryosip.cryoem.atoms import AtomParameters
from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.data.adk import adk_model, load_adk_arrays


@pytest.fixture(scope="module")
def adk_ca():
    a = load_adk_arrays()
    ca = a["names"] == "CA"
    return adk_model(ca_only=True), a["frames"][:, ca]


@pytest.fixture(scope="module")
def adk_ca_raw():
    """The unsmoothed path: a spline through every superposed DIMS frame."""
    a = load_adk_arrays()
    ca = a["names"] == "CA"
    return adk_model(ca_only=True, smooth=False), a["frames"][:, ca]


def _rmsd(x, ref):
    y = kabsch_superpose(np.asarray(x, np.float64), ref)
    return float(np.sqrt(np.mean(np.sum((y - ref) ** 2, axis=1))))


def _path(model, s):
    return np.asarray(jax.vmap(model)(jnp.asarray(np.asarray(s)[:, None], jnp.float32)), np.float64)


def _random_rotation(seed):
    q = np.random.default_rng(seed).standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


# ------------------------------------------------------------------------------------- AdK


@pytest.mark.parametrize("which", ["smoothed", "raw"])
def test_adk_cv_is_monotone_in_rmsd_to_closed_and_open(which, adk_ca, adk_ca_raw):
    model, frames = adk_ca if which == "smoothed" else adk_ca_raw
    closed, opened = frames[0], frames[-1]  # raw trajectory frames, independent of the model

    # the closed end is the compact one (1AKE-like): smaller radius of gyration
    def rg(x):
        return np.sqrt(np.mean(np.sum((x - x.mean(0)) ** 2, axis=1)))

    assert rg(closed) < rg(opened) - 2.0
    s = np.linspace(0, 1, 11)
    X = _path(model, s)
    to_closed = np.array([_rmsd(x, closed) for x in X])
    to_open = np.array([_rmsd(x, opened) for x in X])
    # the raw path passes through the end frames; the built-in smoothed path (a least-squares
    # spline, residual ~0.30 A, about the DIMS jitter) ends within 0.25 A of them
    end_tol = 1e-3 if which == "raw" else 0.3
    np.testing.assert_allclose([to_closed[0], to_open[-1]], 0.0, atol=end_tol)
    np.testing.assert_allclose(
        [to_closed[-1], to_open[0]], 6.81, atol=0.02 if which == "raw" else 0.05
    )  # closed-open C-alpha RMSD
    assert np.all(np.diff(to_closed) > 0), to_closed
    assert np.all(np.diff(to_open) < 0), to_open
    # on a fine grid the DIMS path backtracks by at most a few hundredths of an Angstrom
    s = np.linspace(0, 1, 197)
    X = _path(model, s)
    to_closed = np.array([_rmsd(x, closed) for x in X])
    to_open = np.array([_rmsd(x, opened) for x in X])
    assert np.max(np.maximum.accumulate(to_closed) - to_closed) < 0.05
    assert np.max(to_open - np.minimum.accumulate(to_open)) < 0.05


def test_path_model_passes_through_superposed_frames(adk_ca_raw):
    model, frames = adk_ca_raw
    ca = np.ones(frames.shape[1], bool)
    ref = frames[0]
    expected = np.stack([kabsch_superpose(f, ref, ca) for f in frames])
    expected -= expected[0].mean(0)
    got = _path(model, np.arange(frames.shape[0]) / (frames.shape[0] - 1))
    assert got.shape == frames.shape
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float32 spline coefficients
    # and at the frame parameters s = i / (F - 1) directly
    idx = np.array([0, 13, 50, 97])
    np.testing.assert_allclose(_path(model, idx / 97.0), expected[idx], atol=2e-3)


def test_path_model_two_frames_is_a_straight_line():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3)) * 5
    b = a + rng.normal(size=(5, 3))
    model = PathModel(
        np.stack([a, b]), AtomParameters.single_gaussian(5), superpose_on=None, center=False
    )
    b_sup = kabsch_superpose(b, a)
    np.testing.assert_allclose(
        np.asarray(model(jnp.array([0.3]))), 0.7 * a + 0.3 * b_sup, atol=1e-4
    )


def test_clamping_outside_the_domain(adk_ca):
    model, _ = adk_ca
    np.testing.assert_allclose(
        np.asarray(model(jnp.array([-0.4]))), np.asarray(model(jnp.array([0.0]))), atol=0
    )
    np.testing.assert_allclose(
        np.asarray(model(jnp.array([1.7]))), np.asarray(model(jnp.array([1.0]))), atol=0
    )
    assert model.cv_names == ("s",)
    np.testing.assert_allclose(np.asarray(model.lower), [0.0])
    np.testing.assert_allclose(np.asarray(model.upper), [1.0])
    for toy in (Dumbbell(), Hinge(), Square(), TwoHinge()):
        lo, hi = np.asarray(toy.lower), np.asarray(toy.upper)
        np.testing.assert_allclose(
            np.asarray(toy(jnp.asarray(lo - 7.0))), np.asarray(toy(jnp.asarray(lo))), atol=0
        )
        np.testing.assert_allclose(
            np.asarray(toy(jnp.asarray(hi + 7.0))), np.asarray(toy(jnp.asarray(hi))), atol=0
        )


# -------------------------------------------------------------------------------- LinearModes


def test_linear_modes_reconstruct_adk_frames(adk_ca):
    _, frames = adk_ca
    atoms = AtomParameters.single_gaussian(frames.shape[1])
    aligned = superpose_frames(frames)
    errors = {}
    for k in (1, 3, 10, frames.shape[0] - 1):
        lm = LinearModes.from_trajectory(frames, atoms, k)
        M = np.asarray(lm.modes, np.float64).reshape(k, -1)
        d = (aligned - np.asarray(lm.mean, np.float64)).reshape(len(aligned), -1)
        scores = np.linalg.lstsq(M.T, d.T, rcond=None)[0].T  # least-squares theta of each frame
        if k == 3:  # the model's own projection agrees
            np.testing.assert_allclose(
                np.asarray(lm.scores(jnp.asarray(aligned, jnp.float32))), scores, atol=2e-3
            )
        if k <= 10:  # (the last modes of k = F - 1 have tiny sds: float32 noise dominates them)
            # theta is in units of each mode's standard deviation over the trajectory
            np.testing.assert_allclose(scores.std(0, ddof=1), 1.0, rtol=2e-3)
            np.testing.assert_allclose(scores.mean(0), 0.0, atol=2e-3)
            assert np.all(scores >= np.asarray(lm.lower) - 1e-3)
            assert np.all(scores <= np.asarray(lm.upper) + 1e-3)
        # X(theta) = mean + sum_k theta_k modes[k] (NumPy here; the model call is checked below)
        rec = np.asarray(lm.mean) + np.tensordot(scores, np.asarray(lm.modes, np.float64), axes=1)
        errors[k] = np.sqrt(np.mean(np.sum((rec - aligned) ** 2, axis=-1), axis=-1)).max()
        if k == 3:
            inside = jnp.asarray(np.clip(scores[::10], -2.9, 2.9), jnp.float32)
            np.testing.assert_allclose(
                np.asarray(jax.vmap(lm)(inside)),
                np.asarray(lm.mean)
                + np.tensordot(np.asarray(inside), np.asarray(lm.modes), axes=1),
                atol=1e-4,
            )
    assert errors[1] > errors[3] > errors[10]
    assert errors[10] < 0.1 * 6.81  # 10 modes: < 10% of the closed-open RMSD
    assert errors[frames.shape[0] - 1] < 5e-3  # all modes: exact up to float32


def test_linear_modes_exact_for_a_low_rank_trajectory():
    rng = np.random.default_rng(1)
    n = 20
    mean = rng.normal(size=(n, 3)) * 10
    basis = rng.normal(size=(2, n, 3))
    z = rng.normal(size=(30, 2)) * [3.0, 1.0]
    frames = mean + np.einsum("fk,kna->fna", z, basis)
    lm = LinearModes.from_trajectory(frames, AtomParameters.single_gaussian(n), 2, superpose=False)
    scores = np.asarray(lm.scores(jnp.asarray(frames, jnp.float32)))
    rec = np.asarray(jax.vmap(lm)(jnp.asarray(scores, jnp.float32)))
    np.testing.assert_allclose(rec, frames, atol=2e-3)
    # the scores are the latent coordinates up to a linear map (exact rank 2)
    A, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], scores, rcond=None)
    np.testing.assert_allclose(np.c_[z, np.ones(len(z))] @ A, scores, atol=1e-3)
    assert lm.cv_names == ("z1", "z2")
    # the map is linear: its Jacobian is the modes
    J = np.asarray(jax.jacfwd(lm.coordinates)(jnp.zeros(2)))
    np.testing.assert_allclose(np.moveaxis(J, -1, 0), np.asarray(lm.modes), atol=1e-6)
    # given modes and bounds
    given = LinearModes(mean, basis, AtomParameters.single_gaussian(n), bounds=(-1.0, [2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(given.upper), [2.0, 3.0])
    np.testing.assert_allclose(
        np.asarray(given(jnp.array([5.0, -5.0]))), mean + 2.0 * basis[0] - 1.0 * basis[1], atol=1e-4
    )
    with pytest.raises(ValueError):
        LinearModes(mean, basis, AtomParameters.single_gaussian(n), bounds=(-np.inf, 1.0))


# ------------------------------------------------------------------------------------- toys


def _hinge_angle(c, n):
    u, v = c[n] - c[0], c[2 * n] - c[0]
    return np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)))


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys_cv_recovered_from_coordinates(name):
    toy = TOYS[name]()
    lo, hi = np.asarray(toy.lower), np.asarray(toy.upper)
    rng = np.random.default_rng(0)
    thetas = lo + rng.random((12, toy.dim)) * (hi - lo)
    thetas[0], thetas[1] = lo, hi
    for i, th in enumerate(thetas):
        c = np.asarray(toy(jnp.asarray(th, jnp.float32)), np.float64)
        assert c.shape == (toy.atoms.n_atoms, 3)
        np.testing.assert_allclose(c.mean(0), 0.0, atol=1e-4)  # centred for every theta
        c = c @ _random_rotation(i).T + rng.normal(size=3)  # any rigid motion
        if name == "dumbbell":
            measured = [np.linalg.norm(c[1] - c[0])]
        elif name == "square":
            measured = [np.mean(np.linalg.norm(c - np.roll(c, -1, axis=0), axis=1))]
            sides = np.linalg.norm(c - np.roll(c, -1, axis=0), axis=1)
            np.testing.assert_allclose(sides, th[0], rtol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(c[2] - c[0]), np.sqrt(2) * th[0], rtol=1e-5)
        elif name == "hinge":
            measured = [_hinge_angle(c, toy.n_per_arm)]
        else:
            nb, n1 = toy.n_body, toy.n_arm1
            left, right, tip1, tip2 = c[0], c[nb - 1], c[nb + n1 - 1], c[-1]

            def ang(u, v):
                return np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)))

            measured = [ang(tip1 - left, right - left), ang(tip2 - right, left - right)]
        np.testing.assert_allclose(measured, th, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(
            np.asarray(toy.measure(jnp.asarray(c, jnp.float32))), th, rtol=1e-4, atol=2e-3
        )


def test_toy_metadata():
    assert Dumbbell().cv_names == ("separation",)
    assert Hinge().cv_names == ("angle",)
    assert Square().cv_names == ("side",)
    assert TwoHinge().cv_names == ("angle1", "angle2")
    np.testing.assert_allclose(np.asarray(Dumbbell().lower), [10.0])
    np.testing.assert_allclose(np.asarray(Dumbbell().upper), [40.0])
    np.testing.assert_allclose(np.asarray(TwoHinge().upper), [150.0, 150.0])
    assert TwoHinge().dim == 2 and Square().dim == 1
    with pytest.raises(ValueError):
        TwoHinge(n_arm1=3, n_arm2=3)  # equal arms: the two angles could be swapped
    with pytest.raises(ValueError):
        Hinge(domain=(30.0, 200.0))


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_images_change_visibly_over_the_domain(name):
    """At 48 px and 2 A/px the noise-free images at the two ends of the domain differ clearly
    (relative L2 difference > 0.3 under the same pose and CTF) and fit in the box."""
    toy = TOYS[name]()
    im = ImageModel.for_atoms(48, 2.0, toy.atoms)
    nu = jax.tree_util.tree_map(lambda a: a[0], NuisancePrior().sample(jax.random.key(3), 1))
    render = jax.jit(jax.vmap(lambda th: im.render(toy(th), toy.atoms, nu)))
    lo, hi = toy.lower, toy.upper
    a, b = np.asarray(render(jnp.stack([lo, hi])))
    assert np.linalg.norm(a - b) > 0.3 * max(np.linalg.norm(a), np.linalg.norm(b))
    extent = max(np.abs(np.asarray(toy(lo))).max(), np.abs(np.asarray(toy(hi))).max())
    assert extent + 3 * np.sqrt(float(toy.atoms.variances.max())) < 24 * 2.0
