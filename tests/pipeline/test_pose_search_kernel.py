"""The pose-error search's kernel (``calibrate._perturbed_fits``: structures once per image,
the shift candidates from the projection at the given rotation, renders shared by the data and
its replicate, which it builds) gives the fit gains of rendering every (image, candidate) pair
with ``op.mean``."""

import jax
import jax.numpy as jnp
import numpy as np

from cryosip.cryoem.image_model import CryoNuisance, ImageModel, NuisancePrior
from cryosip.data.adk import adk_model
from cryosip.pipeline.calibrate import _candidate_perturbations, _perturbed_fits
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.pipeline.pose_marginal import perturb_nuisance


def _pairwise_gains(op, theta, nu, y, rots, shifts):
    """Every (image, candidate) pair rendered on its own: rotations (shift as given), then
    shifts (rotation as given)."""
    c = theta.shape[0]
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (len(shifts), 3, 3))
    all_rots = jnp.asarray(np.concatenate([rots, eye]))
    all_shifts = jnp.asarray(np.concatenate([np.zeros((len(rots), 2), np.float32), shifts]))
    r = all_rots.shape[0]
    flat = jax.tree_util.tree_map(lambda a: jnp.repeat(a, r, axis=0), nu)
    pert = perturb_nuisance(flat, jnp.tile(all_rots, (c, 1, 1)), jnp.tile(all_shifts, (c, 1)))
    ms = jax.vmap(op.mean)(jnp.repeat(theta, r, axis=0), pert).reshape(c, r, -1)
    mc = ms - ms.mean(axis=2, keepdims=True)
    yc = y.reshape(y.shape[0], c, -1)
    yc = yc - yc.mean(axis=2, keepdims=True)
    return jnp.einsum("crp,kcp->kcr", mc, yc) ** 2 / jnp.sum(mc * mc, axis=2)


def test_pose_search_kernel_equals_pairwise_renders():
    model = adk_model(ca_only=True)
    noise_filter = np.linspace(0.5, 1.5, 2 * 32 * 17, dtype=np.float32).reshape(2, 32, 17)
    im = ImageModel.for_atoms(32, 3.0, model.atoms, fourier_filter=noise_filter)
    op = CryoEMOperator(model, im, 1.0, NuisancePrior(shift_sd_in_angstroms=2.0))
    nu = op.sample_nuisance(jax.random.key(0), 4)
    nu = CryoNuisance(nu.rotation, nu.shift_in_angstroms, nu.ctf, jnp.array([0, 1, 1, 0]))
    theta = jnp.array([[0.2], [0.5], [0.7], [0.9]], jnp.float32)
    y = jnp.stack(
        [op.sample(jax.random.key(1), theta, nu), op.sample(jax.random.key(2), theta, nu)]
    )
    rots, _, shifts = _candidate_perturbations()
    rots, shifts = rots[:7], shifts[:5].astype(np.float32)  # identity first in both
    fast = _perturbed_fits(op, theta, nu, y, jnp.asarray(rots), jnp.asarray(shifts))
    ref = _pairwise_gains(op, theta, nu, y, rots, shifts)
    assert fast.shape == (2, 4, 12)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=2e-4)
    np.testing.assert_array_equal(  # the same best candidate for every image
        np.argmax(np.asarray(fast[..., :7]), -1), np.argmax(np.asarray(ref[..., :7]), -1)
    )
    np.testing.assert_array_equal(
        np.argmax(np.asarray(fast[..., 7:]), -1), np.argmax(np.asarray(ref[..., 7:]), -1)
    )
    # the noise replicate (a x the model at the given pose + noise), built inside the kernel
    a = jnp.array([0.5, 1.0, 1.5, 2.0], jnp.float32)
    noise = jax.random.normal(jax.random.key(3), y.shape[1:])
    null = a[:, None, None] * jax.vmap(op.mean)(theta, nu) + noise
    with_rep = _perturbed_fits(
        op, theta, nu, y[:1], jnp.asarray(rots), jnp.asarray(shifts), (a, noise)
    )
    ref_rep = _pairwise_gains(op, theta, nu, null[None], rots, shifts)
    np.testing.assert_allclose(np.asarray(with_rep[1]), np.asarray(ref_rep[0]), rtol=2e-4)
    np.testing.assert_allclose(np.asarray(with_rep[0]), np.asarray(fast[0]), rtol=1e-6)
