"""The pose-marginalised likelihood: reduction to the base operator, the perturbation law, the table."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from cryosip.conformations.toys import Dumbbell
from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.pipeline.pose_marginal import (
    PoseMarginalOperator,
    perturb_nuisance,
    sample_pose_perturbations,
)
from cryosip.sip.operator import Observations


@pytest.fixture(scope="module")
def scene():
    """A dumbbell (separation 10-40 A) in 24-px images at 2.5 A/px, SNR about 0.5, known poses."""
    model = Dumbbell()
    base = CryoEMOperator(
        model,
        ImageModel.for_atoms(24, 2.5, model.atoms),
        1.0,
        NuisancePrior(shift_sd_in_angstroms=1.0),
    )
    k = jax.random.split(jax.random.key(0), 3)
    theta = jax.random.uniform(k[0], (6, 1), minval=12.0, maxval=38.0)
    nu = jax.jit(lambda k: base.sample_nuisance(k, 6))(k[1])
    clean = jax.jit(lambda t, n: base.means(t, n))(theta, nu)
    sigma = float(jnp.sqrt(jnp.mean(jnp.var(clean.reshape(6, -1), axis=1)) / 0.5))
    base = base.with_sigma(sigma)
    obs = Observations(clean + sigma * jax.random.normal(k[2], clean.shape), nu)
    return base, obs, theta


@eqx.filter_jit
def _loglik(op, theta, obs, batch_size):
    return op.log_likelihood_matrix(theta, obs, batch_size=batch_size)


def loglik(op, theta, obs, batch_size=None):
    """op.log_likelihood_matrix, compiled once per operator type and shapes (eager rendering is slow)."""
    return np.asarray(_loglik(op, theta, obs, batch_size), np.float64)


def test_zero_perturbation_reduces_to_the_base_operator(scene):
    base, obs, theta = scene
    grid = jnp.linspace(10.0, 40.0, 7)[:, None]
    pm = PoseMarginalOperator(
        base,
        n_draws=5,
        rotation_sd_in_degrees=0.0,
        shift_sd_in_angstroms=0.0,
        key=jax.random.key(3),
    )
    expected = loglik(base, grid, obs)
    # log-likelihoods of ~5,000 in float32: the log-mean-exp of identical terms returns them to ~1e-7
    np.testing.assert_allclose(loglik(pm, grid, obs), expected, rtol=1e-6, atol=1e-4)
    # and with one draw (of size zero), whatever the key
    pm1 = PoseMarginalOperator(base, n_draws=1, key=jax.random.key(9))
    np.testing.assert_allclose(loglik(pm1, grid, obs), expected, rtol=1e-6, atol=1e-4)


def test_marginal_is_the_log_mean_of_the_perturbed_likelihoods(scene):
    base, obs, _ = scene
    grid = jnp.linspace(10.0, 40.0, 7)[:, None]
    pm = PoseMarginalOperator(
        base,
        n_draws=4,
        rotation_sd_in_degrees=8.0,
        shift_sd_in_angstroms=1.5,
        key=jax.random.key(4),
    )
    got = loglik(pm, grid, obs, batch_size=2)
    for n in range(2):
        nu_n = jax.tree_util.tree_map(lambda a: a[n], obs.nuisance)
        nus = pm.perturbed(nu_n, obs.index[n])
        y = jnp.broadcast_to(obs.values[n], (4,) + obs.values.shape[1:])
        lls = loglik(base, grid, Observations(y, nus))  # (K, P): each draw as its own "image"
        np.testing.assert_allclose(
            got[n], logsumexp(lls, axis=0) - np.log(4.0), rtol=1e-6, atol=1e-3
        )
    # the perturbation changes the likelihood (this is not the base operator)
    assert np.abs(got - loglik(base, grid, obs)).max() > 0.1


def test_perturbations_have_the_requested_rms_and_antithetic_pairs():
    dR, dt = jax.jit(lambda k: sample_pose_perturbations(k, 20000, 10.0, 2.0))(jax.random.key(0))
    dR, dt = np.asarray(dR, np.float64), np.asarray(dt, np.float64)
    np.testing.assert_allclose(
        np.einsum("nij,nkj->nik", dR, dR), np.broadcast_to(np.eye(3), dR.shape), atol=1e-5
    )
    angle = np.degrees(np.arccos(np.clip((np.trace(dR, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    np.testing.assert_allclose(np.sqrt(np.mean(angle**2)), 10.0, rtol=0.02)  # rms angle
    np.testing.assert_allclose(
        np.sqrt(np.mean(np.sum(dt**2, axis=1))), 2.0, rtol=0.02
    )  # rms shift length
    # the axis is uniform: the mean rotation axis is ~0
    axis = np.stack(
        [dR[:, 2, 1] - dR[:, 1, 2], dR[:, 0, 2] - dR[:, 2, 0], dR[:, 1, 0] - dR[:, 0, 1]], 1
    )
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    assert np.abs(axis.mean(0)).max() < 0.03
    a, s = sample_pose_perturbations(jax.random.key(1), 6, 5.0, 1.0, antithetic=True)
    np.testing.assert_allclose(
        np.asarray(a[3:]), np.transpose(np.asarray(a[:3]), (0, 2, 1)), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(s[3:]), -np.asarray(s[:3]), atol=0)


def test_perturb_nuisance_broadcasts_one_pose_or_pairs_a_batch(scene):
    base, obs, _ = scene
    dR, dt = sample_pose_perturbations(jax.random.key(2), 6, 5.0, 1.0)
    paired = perturb_nuisance(obs.nuisance, dR, dt)
    np.testing.assert_allclose(
        np.asarray(paired.rotation), np.asarray(obs.nuisance.rotation @ dR), atol=1e-6
    )
    one = perturb_nuisance(jax.tree_util.tree_map(lambda a: a[0], obs.nuisance), dR, dt)
    assert one.ctf.defocus_u_in_angstroms.shape == (6,)
    np.testing.assert_allclose(
        np.asarray(one.shift_in_angstroms), np.asarray(obs.nuisance.shift_in_angstroms[0] + dt)
    )
    with pytest.raises(ValueError, match="does not match"):
        perturb_nuisance(obs.nuisance, dR[:4], dt[:4])


def test_tabulated_marginal_matches_direct_evaluation(scene):
    base, obs, _ = scene
    pm = PoseMarginalOperator(
        base,
        n_draws=4,
        rotation_sd_in_degrees=5.0,
        shift_sd_in_angstroms=1.0,
        key=jax.random.key(5),
    )
    tab = pm.tabulate(obs, n_nodes=61)
    fine = jnp.linspace(10.0, 40.0, 121)[:, None]  # the nodes and the midpoints between them
    direct = loglik(pm, fine, obs)
    # exact at the nodes
    np.testing.assert_allclose(
        np.asarray(tab.table, np.float64), direct[:, ::2], rtol=1e-6, atol=1e-3
    )
    # between nodes: the direct log-likelihood itself jumps by up to ~1 nat where an atom's
    # projection window moves by a pixel (the windowed projector's tails), which a smooth cubic
    # cannot follow; the posterior it implies agrees
    got = np.asarray(tab.log_likelihood_matrix(fine, tab.observations()), np.float64)
    assert np.abs(got - direct).max() < 2.0
    post = lambda L: (
        np.exp(L - L.max(1, keepdims=True))
        / np.exp(L - L.max(1, keepdims=True)).sum(1, keepdims=True)
    )  # noqa: E731
    mean_direct, mean_tab = (
        post(direct) @ np.asarray(fine[:, 0]),
        post(got) @ np.asarray(fine[:, 0]),
    )
    np.testing.assert_allclose(
        mean_tab, mean_direct, rtol=0, atol=0.1
    )  # Angstrom, on a 10-40 A domain
