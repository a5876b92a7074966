"""The generic SIP engine on a non-cryo toy (exponential decay with a random amplitude)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cryosip.sip.discrepancies import (
    KL,
    MMD,
    EnergyKernel,
    GaussianKernel,
    InverseMultiquadricKernel,
    PairedMMD,
    kl,
    mmd,
)
from cryosip.sip.examples import DecayOperator
from cryosip.sip.flow import WassersteinGradientFlow
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.operator import Observations
from cryosip.sip.table import TabulatedOperator


def bimodal(key, n):
    k1, k2 = jax.random.split(key)
    comp = jax.random.bernoulli(k1, 0.6, (n,))
    z = jax.random.normal(k2, (n,))
    return jnp.where(comp, 0.8 + 0.1 * z, 2.0 + 0.15 * z)[:, None]


def make_data(n=1500, sigma=0.1, seed=0):
    op = DecayOperator(sigma=sigma)
    k = jax.random.split(jax.random.key(seed), 3)
    th = bimodal(k[0], n)
    nu = op.sample_nuisance(k[1], n)
    return op, th, Observations(op.sample(k[2], th, nu), nu)


def test_kl_matches_bruteforce_marginal_likelihood():
    op, th, obs = make_data(n=7)
    pos = jnp.array([[0.5], [1.1], [2.3]])
    w = jnp.array([0.2, 0.5, 0.3])
    m = ParticleMeasure(pos, jnp.log(w))
    got = float(KL()(None, op, m, obs))
    y, nu, s = (
        np.asarray(obs.values, np.float64),
        np.asarray(obs.nuisance, np.float64),
        float(op.noise.sigma),
    )
    t = np.asarray(op.times, np.float64)
    total = 0.0
    for n in range(7):
        p = 0.0
        for i in range(3):
            mean = nu[n] * np.exp(-float(pos[i, 0]) * t)
            p += (
                float(w[i])
                * np.exp(-0.5 * np.sum((y[n] - mean) ** 2) / s**2)
                / (2 * np.pi * s**2) ** (t.size / 2)
            )
        total += np.log(p)
    np.testing.assert_allclose(got, -total / 7, rtol=1e-5)


def test_velocity_is_minus_P_grad_and_matches_finite_differences(x64):
    op, th, obs = make_data(n=50)
    op = DecayOperator(sigma=0.1)
    obs = Observations(jnp.asarray(obs.values, jnp.float64), jnp.asarray(obs.nuisance, jnp.float64))
    pos = jnp.linspace(0.4, 2.6, 8, dtype=jnp.float64)[:, None]
    J = lambda p: KL()(None, op, ParticleMeasure(p), obs)  # noqa: E731
    g = jax.grad(J)(pos)
    assert jnp.isfinite(g).all()
    d = jax.random.normal(jax.random.key(3), pos.shape, jnp.float64)
    eps = 1e-5
    fd = (J(pos + eps * d) - J(pos - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g * d)), float(fd), rtol=1e-6)
    # one explicit Euler step of the flow moves particle i by tau * (-P * dJ/dtheta_i)
    flow = WassersteinGradientFlow(step_size=1e-3, n_steps=1, schedule="constant", chunk_size=1)
    res = flow.run(KL(), op, obs, ParticleMeasure(pos), key=jax.random.key(0))
    np.testing.assert_allclose(
        np.asarray(res.measure.positions), np.asarray(pos - 1e-3 * 8 * g), rtol=1e-6
    )


@pytest.mark.parametrize(
    "kernel", [GaussianKernel(1.3), InverseMultiquadricKernel(1.0), EnergyKernel()]
)
def test_mmd_invariants_and_naive_double_loop(kernel):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(0.5, 1.2, size=(40, 5)), jnp.float32)
    # D(mu, mu) = 0 (V-statistic), D >= 0, symmetry, permutation invariance
    np.testing.assert_allclose(float(mmd(x, x, kernel)), 0.0, atol=1e-5)
    v = float(mmd(x, y, kernel))
    assert v > 0
    np.testing.assert_allclose(float(mmd(y, x, kernel)), v, rtol=1e-5)
    perm = rng.permutation(30)
    np.testing.assert_allclose(float(mmd(x[perm], y, kernel)), v, rtol=1e-5)
    # naive double loop
    k = lambda a, b: float(kernel(jnp.sum((a - b) ** 2)))  # noqa: E731
    xx = np.mean([[k(a, b) for b in x] for a in x])
    yy = np.mean([[k(a, b) for b in y] for a in y])
    xy = np.mean([[k(a, b) for b in y] for a in x])
    np.testing.assert_allclose(v, 0.5 * (xx + yy) - xy, rtol=2e-4, atol=1e-6)


def test_mmd_chunked_equals_unchunked():
    from cryosip.sip.discrepancies.mmd import _kernel_mean

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(70, 3)), jnp.float32)
    w = jnp.full((70,), 1 / 70, jnp.float32)
    k = GaussianKernel(1.0)
    np.testing.assert_allclose(
        float(_kernel_mean(x, x, k, w, w, True, chunk=16)),
        float(_kernel_mean(x, x, k, w, w, True, chunk=1024)),
        rtol=1e-5,
    )


def test_paired_score_is_minimised_by_the_truth_in_expectation():
    op, th, obs = make_data(n=2000, sigma=0.1, seed=4)
    key = jax.random.key(7)
    # candidate measures: the truth (a large sample of it), a shifted truth, a uniform one
    cand = {
        "truth": bimodal(jax.random.key(11), 128),
        "shifted": bimodal(jax.random.key(11), 128) + 0.25,
        "uniform": jnp.linspace(0.1, 3.0, 128)[:, None],
    }
    disc = PairedMMD(GaussianKernel(0.5))
    scores = {k: float(disc(key, op, ParticleMeasure(v), obs)) for k, v in cand.items()}
    assert scores["truth"] < scores["shifted"] and scores["truth"] < scores["uniform"], scores
    # the Monte Carlo (fresh noise) estimator agrees with the closed-form noise average
    mc = PairedMMD(GaussianKernel(0.5), noise_average=False)
    sub = obs.take(jnp.arange(400))
    vals = [
        float(mc(jax.random.key(i), op, ParticleMeasure(cand["truth"][:64]), sub)) for i in range(4)
    ]
    exact = float(disc(key, op, ParticleMeasure(cand["truth"][:64]), sub))
    np.testing.assert_allclose(np.mean(vals), exact, rtol=0.05)


def test_table_matches_direct_simulation():
    op, th, obs = make_data(n=200)
    tab = TabulatedOperator.build(op, obs, n_nodes=41)
    pos = jax.random.uniform(jax.random.key(2), (16, 1), minval=0.1, maxval=3.0)
    direct = np.asarray(op.log_likelihood_matrix(pos, obs))
    tabbed = np.asarray(tab.log_likelihood_matrix(pos, tab.observations()))
    spread = np.ptp(direct, axis=1).mean()
    np.testing.assert_allclose(tabbed, direct, atol=0.02 * spread)
    dy_d, dmm_d = op.paired_sq_distances(pos, obs)
    dy_t, dmm_t = tab.paired_sq_distances(pos, tab.observations())
    np.testing.assert_allclose(
        np.asarray(dmm_t), np.asarray(dmm_d), atol=0.02 * float(jnp.max(dmm_d))
    )
    np.testing.assert_allclose(np.asarray(dy_t), np.asarray(dy_d), rtol=0.02)


@pytest.mark.parametrize("objective", ["kl", "mmd-paired", "mmd-unconditional"])
def test_flows_recover_a_bimodal_distribution(objective):
    op, th, obs = make_data(n=800)
    truth = np.asarray(th[:, 0])
    # start from a deliberately wrong measure (particles spread uniformly)
    init = ParticleMeasure(jnp.linspace(0.3, 2.7, 48)[:, None])
    if objective == "kl":
        tab = TabulatedOperator.build(op, obs, 33)
        o, ob, disc, steps, bound = tab, tab.observations(), KL(), 300, 0.12
    elif objective == "mmd-paired":
        o, ob, disc, steps, bound = op, obs, PairedMMD(GaussianKernel(0.4)), 200, 0.15
    else:
        o, ob, disc, steps, bound = op, obs, MMD(GaussianKernel(0.4), n_samples=256), 200, 0.2
    flow = WassersteinGradientFlow(
        step_size=3e-3 if objective == "kl" else 0.5,
        n_steps=steps,
        batch_size=None if objective == "kl" else 200,
        max_displacement=0.05,
        fisher_rao=0.3 if objective == "kl" else 0.0,
    )
    w0 = scipy.stats.wasserstein_distance(np.asarray(init.positions[:, 0]), truth)
    res = flow.run(disc, o, ob, init, key=jax.random.key(1))
    w = scipy.stats.wasserstein_distance(
        np.asarray(res.measure.positions[:, 0]), truth, np.asarray(res.measure.weights)
    )
    losses = np.asarray(res.losses)
    assert w < bound, (w0, w)
    assert np.mean(losses[-20:]) < np.mean(losses[:5])


def test_resume_reproduces_uninterrupted_run(tmp_path):
    op, th, obs = make_data(n=300)
    init = ParticleMeasure(jnp.linspace(0.3, 2.7, 16)[:, None])
    flow = WassersteinGradientFlow(
        step_size=2e-3,
        n_steps=60,
        batch_size=100,
        entropy=1e-4,
        chunk_size=10,
        max_displacement=0.05,
    )
    full = flow.run(KL(), op, obs, init, key=jax.random.key(5))
    ck = tmp_path / "ck.npz"
    part = flow.run(
        KL(),
        op,
        obs,
        init,
        key=jax.random.key(5),
        checkpoint=ck,
        checkpoint_every=20,
        stop=lambda s: s >= 40,
    )
    assert part.n_steps_taken < 60
    resumed = flow.run(
        KL(), op, obs, init, key=jax.random.key(5), checkpoint=ck, checkpoint_every=20, resume=True
    )
    np.testing.assert_allclose(
        np.asarray(resumed.measure.positions), np.asarray(full.measure.positions), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(resumed.losses), np.asarray(full.losses), rtol=1e-6)


def test_guard_backs_off_on_nonfinite_steps():
    op, th, obs = make_data(n=50)
    bad = Observations(obs.values.at[0, 0].set(jnp.nan), obs.nuisance)
    flow = WassersteinGradientFlow(step_size=1e-3, n_steps=10, chunk_size=10)
    res = flow.run(
        KL(), op, bad, ParticleMeasure(jnp.linspace(0.3, 2.7, 8)[:, None]), key=jax.random.key(0)
    )
    assert res.n_backoffs == 10
    np.testing.assert_allclose(
        np.asarray(res.measure.positions[:, 0]), np.linspace(0.3, 2.7, 8), rtol=1e-6
    )


def test_kl_pure_function_weighting():
    ll = jnp.array([[0.0, -1.0], [-2.0, 0.5]])
    lw = jnp.log(jnp.array([0.3, 0.7]))
    a = float(kl(ll, lw))
    b = float(kl(ll, lw, jnp.array([2.0, 2.0])))
    np.testing.assert_allclose(a, b, rtol=1e-6)
