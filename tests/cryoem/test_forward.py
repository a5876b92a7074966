"""The forward model on its own: gradients, shifts, windowing, rotations, SO(3) sampling."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryosip.cryoem.atoms import AtomParameters
from cryosip.cryoem.ctf import CTFParams
from cryosip.cryoem.image_model import CryoNuisance, ImageModel
from cryosip.cryoem.pose import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler,
    matrix_to_quaternion,
    quaternion_to_matrix,
    sample_uniform_rotations,
)
from cryosip.cryoem.projection import (
    chunk_size,
    project_gaussians,
    project_gaussians_dense,
    window_half_width,
)


@pytest.fixture
def enable_x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


@pytest.fixture(scope="module")
def adk():
    from cryosip.data.adk import adk_model

    model = adk_model(ca_only=False)
    return model, jnp.asarray(model(jnp.array([0.3])))


# one compiled function per configuration, shared by the tests (compilation dominates their time)
_project = jax.jit(project_gaussians, static_argnums=(3, 4, 5))
_dense = jax.jit(project_gaussians_dense, static_argnums=(3, 4))
_render = eqx.filter_jit(lambda im, coords, atoms, nu: im.render(coords, atoms, nu))


def _toy(rng, n=24, spread=6.0):
    elements = rng.choice(["C", "N", "O", "H", "S"], size=n)
    return rng.normal(0.0, spread, (n, 3)), AtomParameters.from_elements(list(elements))


def _nuisance(
    rot=(30.0, 60.0, -20.0), shift=(1.3, -2.1), dfu=12000.0, dfv=11000.0, ang=25.0, dtype=np.float32
):
    ctf = jax.tree.map(lambda a: jnp.asarray(a, dtype), CTFParams.make(dfu, dfv, ang))
    return CryoNuisance(
        euler_to_matrix(*[jnp.asarray(a, dtype) for a in rot]), jnp.asarray(shift, dtype), ctf
    )


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _to64(tree):
    return jax.tree.map(
        lambda a: (
            jnp.asarray(a, jnp.float64)
            if isinstance(a, jax.Array) and a.dtype == jnp.float32
            else a
        ),
        tree,
    )


# ----------------------------------------------------------------------------------------
# gradients: autodiff (custom VJP) against central finite differences, float64
# ----------------------------------------------------------------------------------------


def _assert_fd(value, grad, x, v, eps, rtol):
    """<grad(x), v> against the central difference of ``value`` along v."""
    g = grad(x)
    assert bool(jnp.isfinite(g).all())
    fd = (float(value(x + eps * v)) - float(value(x - eps * v))) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), fd, rtol=rtol)


def test_gradient_wrt_coordinates_matches_finite_differences(enable_x64):
    rng = np.random.default_rng(0)
    coords, atoms = _toy(rng)
    atoms = _to64(atoms)
    im = ImageModel.for_atoms(24, 2.0, atoms)
    nu = _nuisance(dtype=np.float64)
    w = jnp.asarray(rng.normal(size=(24, 24)))
    loss = jax.jit(lambda x: jnp.sum(w * im.render(x, atoms, nu)))
    x = jnp.asarray(coords)
    v = jnp.asarray(rng.normal(size=coords.shape))
    # no atom's window may move between x - eps v and x + eps v (that would be a jump)
    pix = lambda y: np.round((np.asarray(y) @ np.asarray(nu.rotation)[:2].T) / im.pixel_size)
    assert np.array_equal(pix(x - 1e-5 * v), pix(x + 1e-5 * v))
    _assert_fd(loss, jax.jit(jax.grad(loss)), x, v, 1e-5, 1e-4)


def test_gradients_wrt_amplitudes_variances_and_positions_under_vmap(enable_x64):
    rng = np.random.default_rng(1)
    coords, atoms = _toy(rng, n=12)
    amp = jnp.asarray(atoms.amplitudes, jnp.float64)
    var = jnp.asarray(atoms.variances, jnp.float64) + 0.05
    xy = jnp.asarray(coords[:, :2])
    D, px, h = 20, 2.0, 1
    w = jnp.asarray(rng.normal(size=(3, D, D)))
    shifts = jnp.asarray(rng.normal(0, 2.0, (3, 1, 2)))

    @jax.jit
    def loss(xy, amp, var):  # a vmap over images exercises the chunked batching rules
        imgs = jax.vmap(lambda s: project_gaussians(xy + s, amp, var, D, px, h))(shifts)
        return jnp.sum(w * imgs)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(xy, amp, var)
    dirs = [jnp.asarray(rng.normal(size=a.shape)) for a in (xy, amp, var)]
    for i, (g, v, eps) in enumerate(zip(grads, dirs, (1e-6, 1e-6, 1e-7))):
        args = [xy, amp, var]
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + eps * v, args[i] - eps * v
        fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
        assert bool(jnp.isfinite(g).all())
        np.testing.assert_allclose(float(jnp.vdot(g, v)), fd, rtol=1e-4)


def test_gradient_through_path_cv_matches_fd(enable_x64):
    from cryosip.data.adk import adk_model

    model = _to64(adk_model(ca_only=True))
    im = ImageModel.for_atoms(48, 2.0, model.atoms)
    nu = _nuisance(dtype=np.float64)
    obs = jnp.asarray(np.random.default_rng(2).normal(0, 0.01, (48, 48)))
    loss = jax.jit(lambda th: jnp.sum((im.render(model(th), model.atoms, nu) - obs) ** 2))
    _assert_fd(loss, jax.jit(jax.grad(loss)), jnp.array([0.4137]), jnp.array([1.0]), 1e-6, 1e-4)


# ----------------------------------------------------------------------------------------
# shifts, windowing, batching
# ----------------------------------------------------------------------------------------


def test_integer_shift_equals_roll(adk):
    model, coords = adk
    im = ImageModel.for_atoms(64, 2.0, model.atoms)
    base = np.asarray(_render(im, coords, model.atoms, _nuisance(shift=(0.0, 0.0))))
    scale = float(np.abs(base).max())
    for dx, dy in [(3, -2), (-5, 7)]:
        moved = _render(im, coords, model.atoms, _nuisance(shift=(dx * 2.0, dy * 2.0)))
        np.testing.assert_allclose(
            np.asarray(moved), np.roll(base, (dy, dx), axis=(0, 1)), rtol=0, atol=1e-5 * scale
        )


def test_projection_of_atoms_moved_by_whole_pixels_is_rolled(adk):
    model, coords = adk
    a = model.atoms
    xy = coords[:, :2]
    p0 = _project(xy, a.amplitudes, a.variances, 64, 2.0, 1)
    p1 = _project(xy + jnp.array([2 * 4.0, 2 * -3.0]), a.amplitudes, a.variances, 64, 2.0, 1)
    np.testing.assert_allclose(
        np.asarray(p1),
        np.roll(np.asarray(p0), (-3, 4), axis=(0, 1)),
        rtol=0,
        atol=1e-5 * float(p0.max()),
    )


@pytest.mark.parametrize("pixel_size", [1.0, 1.5, 2.0])
def test_windowed_projection_matches_dense(pixel_size, adk):
    model, coords = adk
    a = model.atoms
    D = int(round(96.0 / pixel_size / 2)) * 2
    h = window_half_width(float(jnp.max(a.variances)), pixel_size)
    assert h == ImageModel.for_atoms(D, pixel_size, a).half_width
    for r in sample_uniform_rotations(jax.random.key(7), 2):
        xy = coords @ r[:2].T
        win = _project(xy, a.amplitudes, a.variances, D, pixel_size, h)
        dense = _dense(xy, a.amplitudes, a.variances, D, pixel_size)
        assert _rel(win, dense) < 1e-3
        # lumped tails: every atom's mass is kept (exactly, up to float32 sums)
        np.testing.assert_allclose(float(win.sum()), float(dense.sum()), rtol=1e-4)


def test_window_rule():
    sigma = 0.798  # carbon's widest Peng Gaussian
    assert [window_half_width(sigma**2, p) for p in (1.0, 1.5, 2.0, 3.0)] == [2, 2, 1, 1]
    assert chunk_size(3341, 1) >= 1 and chunk_size(214, 1) > chunk_size(3341, 1)
    # on the CPU, chunks that fit in cache; on an accelerator, a whole large batch at once
    assert chunk_size(3341, 1, "cpu") == 3 and chunk_size(3341, 1, "gpu") == 2231


def test_one_chunk_for_the_whole_batch_gives_the_same_images(adk, monkeypatch):
    """The accelerator's rule (one chunk per batch) renders what the CPU's chunks render."""
    from cryosip.cryoem import projection as P

    model, coords = adk
    a = model.atoms
    rots = sample_uniform_rotations(jax.random.key(4), 4 * chunk_size(a.n_atoms, 1) + 1)
    xys = jnp.einsum("nj,bij->bni", coords, rots[:, :2])

    def render():
        f = jax.vmap(lambda x: project_gaussians(x, a.amplitudes, a.variances, 64, 2.0, 1))
        loss = lambda x: jnp.sum(f(x) ** 2)  # noqa: E731 - the backward kernels too
        return jax.jit(lambda x: (f(x), jax.grad(loss)(x)))(xys)

    chunked = render()
    monkeypatch.setattr(P, "chunk_size", lambda n, h, backend=None: 10**6)
    whole = render()
    for c, w in zip(chunked, whole):
        np.testing.assert_allclose(
            np.asarray(w), np.asarray(c), rtol=0, atol=1e-6 * float(np.abs(c).max())
        )


def test_vmap_matches_single_images_with_a_partial_last_chunk(adk):
    model, coords = adk
    a = model.atoms
    rots = sample_uniform_rotations(jax.random.key(3), 2 * chunk_size(a.n_atoms, 1) + 1)
    xys = jnp.einsum("nj,bij->bni", coords, rots[:, :2])
    batch = jax.jit(
        jax.vmap(lambda x: project_gaussians(x, a.amplitudes, a.variances, 64, 2.0, 1))
    )(xys)
    for i in (0, xys.shape[0] - 1):
        single = _project(xys[i], a.amplitudes, a.variances, 64, 2.0, 1)
        np.testing.assert_allclose(
            np.asarray(batch[i]), np.asarray(single), rtol=0, atol=1e-6 * float(single.max())
        )
    # per-image atom parameters (batched amplitudes) take the same path
    amps = jnp.stack([a.amplitudes, 2.0 * a.amplitudes])
    two = jax.jit(jax.vmap(lambda am: project_gaussians(xys[0], am, a.variances, 64, 2.0, 1)))(amps)
    np.testing.assert_allclose(np.asarray(two[1]), 2.0 * np.asarray(two[0]), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------------------


_euler_to_matrix = jax.jit(euler_to_matrix)


def test_euler_round_trip():
    rng = np.random.default_rng(4)
    rot = rng.uniform(-180, 180, 200)
    tilt = rng.uniform(0.5, 179.5, 200)
    psi = rng.uniform(-180, 180, 200)
    R = np.asarray(_euler_to_matrix(rot, tilt, psi), np.float64)
    np.testing.assert_allclose(
        R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.det(R), 1.0, rtol=1e-5)
    r2, t2, p2 = matrix_to_euler(R)
    np.testing.assert_allclose(t2, tilt, atol=2e-3)
    wrap = lambda d: (d + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(wrap(r2 - rot), 0.0, atol=2e-2)
    np.testing.assert_allclose(wrap(p2 - psi), 0.0, atol=2e-2)
    # gimbal lock: the angles are ambiguous, the matrix is not
    M = np.asarray(
        _euler_to_matrix(np.array([40.0, 40.0]), np.array([0.0, 180.0]), np.array([15.0, 15.0])),
        np.float64,
    )
    np.testing.assert_allclose(np.asarray(_euler_to_matrix(*matrix_to_euler(M))), M, atol=1e-5)
    # RELION's A for rot = 90: the reference x axis goes to the particle's -y axis ... (z-rot)
    np.testing.assert_allclose(
        np.asarray(_euler_to_matrix(90.0, 0.0, 0.0)), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6
    )


def test_quaternion_and_axis_angle_round_trips():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(100, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    R = np.asarray(jax.jit(quaternion_to_matrix)(jnp.asarray(q)), np.float64)
    np.testing.assert_allclose(matrix_to_quaternion(R), q, atol=1e-5)
    v = rng.normal(size=(100, 3))
    v *= (rng.uniform(0.01, np.pi - 0.01, 100) / np.linalg.norm(v, axis=1))[:, None]
    aa = jax.jit(axis_angle_to_matrix)
    Rv = np.asarray(aa(jnp.asarray(v)), np.float64)
    np.testing.assert_allclose(matrix_to_axis_angle(Rv), v, atol=1e-4)
    special = np.asarray(aa(jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, np.pi / 2]])))
    np.testing.assert_allclose(special[0], np.eye(3), atol=0)
    # a rotation by pi/2 about z takes x to y (active rotation)
    np.testing.assert_allclose(special[1] @ [1, 0, 0], [0, 1, 0], atol=1e-6)


def test_uniform_rotations_are_haar():
    R = np.asarray(
        jax.jit(sample_uniform_rotations, static_argnums=1)(jax.random.key(11), 20000), np.float64
    )
    np.testing.assert_allclose(np.linalg.det(R), 1.0, rtol=1e-5)
    np.testing.assert_allclose(R.mean(axis=0), np.zeros((3, 3)), atol=0.02)
    np.testing.assert_allclose((R**2).mean(axis=0), np.full((3, 3), 1 / 3), atol=0.02)
    # the angle of a Haar rotation has density (1 - cos a) / pi: mean = pi/2 + 2/pi
    angle = np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1))
    np.testing.assert_allclose(angle.mean(), np.pi / 2 + 2 / np.pi, atol=0.02)
