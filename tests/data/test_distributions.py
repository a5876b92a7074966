"""Ground-truth CV distributions: samples agree with the pdf, stay in the domain, reproduce."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from cryosip.data.distributions import (
    Beta,
    Gaussian,
    Ring,
    Samples,
    TwoModeMixture,
    Uniform,
    make_distribution,
)
from cryosip.data.errors import CryosipInputError

N = 100_000


def _moments_1d(dist, m=20001):
    g = np.linspace(dist.lower[0], dist.upper[0], m)
    p = dist.pdf(g)
    mass = np.trapezoid(p, g)
    mean = np.trapezoid(p * g, g) / mass
    var = np.trapezoid(p * (g - mean) ** 2, g) / mass
    return mass, np.array([mean]), np.array([var])


def _moments_2d(dist, m=401):
    g0 = np.linspace(dist.lower[0], dist.upper[0], m)
    g1 = np.linspace(dist.lower[1], dist.upper[1], m)
    G = np.stack(np.meshgrid(g0, g1, indexing="ij"), -1)
    p = dist.pdf(G.reshape(-1, 2)).reshape(m, m)

    def integrate(f):
        return np.trapezoid(np.trapezoid(f, g1, axis=1), g0)

    mass = integrate(p)
    mean = np.array([integrate(p * G[..., i]) for i in range(2)]) / mass
    var = np.array([integrate(p * (G[..., i] - mean[i]) ** 2) for i in range(2)]) / mass
    return mass, mean, var


CASES = [
    ("unimodal", [10.0], [40.0]),
    ("gaussian", [0.0], [1.0]),
    ("bimodal", [0.0], [1.0]),
    ("skewed", [30.0], [150.0]),
    ("uniform", [0.0], [1.0]),
    ("bimodal", [30.0, 30.0], [150.0, 150.0]),
    ("banana", [30.0, 30.0], [150.0, 150.0]),
    ("ring", [30.0, 30.0], [150.0, 150.0]),
    ("skewed", [0.0, -1.0], [1.0, 1.0]),
]


@pytest.mark.parametrize("name,lower,upper", CASES, ids=[f"{c[0]}-{len(c[1])}d" for c in CASES])
def test_sample_moments_match_pdf(name, lower, upper):
    dist = make_distribution(name, lower, upper)
    x = dist.sample(jax.random.key(0), N)
    assert x.shape == (N, len(lower)) and x.dtype == np.float64
    assert np.all(x >= dist.lower) and np.all(x <= dist.upper)
    mass, mean, var = (_moments_1d if dist.dim == 1 else _moments_2d)(dist)
    np.testing.assert_allclose(mass, 1.0, rtol=2e-3)
    se = np.sqrt(var / N)
    np.testing.assert_allclose(x.mean(0), mean, atol=5 * se.max())
    np.testing.assert_allclose(x.var(0), var, rtol=0.03)
    # zero density outside the box
    outside = np.array(dist.upper) + 1.0
    assert float(dist.pdf(outside[None] if dist.dim > 1 else outside)[0]) == 0.0


def test_truncated_gaussian_against_scipy():
    """A Gaussian near the edge is truncated to the box by rejection: compare with truncnorm."""
    dist = Gaussian([0.0], [1.0], mean=0.05, sd=0.1)
    x = dist.sample(1, N)[:, 0]
    a, b = (0.0 - 0.05) / 0.1, (1.0 - 0.05) / 0.1
    ref = stats.truncnorm(a, b, loc=0.05, scale=0.1)
    np.testing.assert_allclose(x.mean(), ref.mean(), atol=5 * ref.std() / np.sqrt(N))
    np.testing.assert_allclose(x.std(), ref.std(), rtol=0.02)
    g = np.linspace(0, 1, 7)
    np.testing.assert_allclose(dist.pdf(g), ref.pdf(g), rtol=1e-10)
    assert x.min() >= 0.0


def test_bimodal_default_for_adk_and_beta_moments():
    d = make_distribution("bimodal", [0.0], [1.0])
    assert isinstance(d, TwoModeMixture) and d.name == "bimodal"
    np.testing.assert_allclose(d.means[:, 0], [0.25, 0.72])
    np.testing.assert_allclose(d.sds[:, 0], [0.07, 0.06])
    np.testing.assert_allclose(d.weights, [0.6, 0.4])
    x = d.sample(jax.random.key(1), N)[:, 0]
    np.testing.assert_allclose(np.mean(x < 0.5), 0.6, atol=0.01)  # the modes barely overlap
    b = make_distribution("skewed", [30.0], [150.0], a=2.0, b=5.0)
    assert isinstance(b, Beta)
    y = b.sample(jax.random.key(2), N)[:, 0]
    np.testing.assert_allclose(y.mean(), 30 + 120 * 2 / 7, atol=0.5)
    assert stats.skew(y) > 0.4  # right-skewed
    u = make_distribution("uniform", [0.0], [2.0])
    assert isinstance(u, Uniform)
    np.testing.assert_allclose(u.pdf(np.array([0.5, 1.5])), 0.5)


def test_reproducible_and_seed_dependent():
    d = make_distribution("ring", [0.0, 0.0], [1.0, 1.0])
    assert isinstance(d, Ring)
    a = d.sample(jax.random.key(5), 1000)
    np.testing.assert_array_equal(a, d.sample(jax.random.key(5), 1000))
    assert not np.array_equal(a, d.sample(jax.random.key(6), 1000))
    np.testing.assert_array_equal(d.sample(7, 50), d.sample(np.random.default_rng(7), 50))
    r = np.linalg.norm(a - 0.5, axis=1)
    np.testing.assert_allclose(r.mean(), (0.3**2 + 0.05**2) / 0.3, atol=0.005)  # E r^2 / E r


def test_samples_from_csv(tmp_path):
    rng = np.random.default_rng(0)
    vals = rng.uniform(0.1, 0.9, size=(500, 1))
    path = tmp_path / "s.csv"
    path.write_text("other,s\n" + "".join(f"{i},{v:.17g}\n" for i, v in enumerate(vals[:, 0])))
    d = make_distribution(f"samples:{path}", [0.0], [1.0], names=("s",))
    assert isinstance(d, Samples)
    np.testing.assert_array_equal(d.values, vals)
    x = d.sample(jax.random.key(0), N)
    assert np.isin(x, vals).all()
    np.testing.assert_allclose(x.mean(), vals.mean(), atol=5 * vals.std() / np.sqrt(N))
    # the KDE integrates to ~1 over a range covering the samples
    g = np.linspace(-0.5, 1.5, 4001)
    np.testing.assert_allclose(np.trapezoid(d.pdf(g), g), 1.0, rtol=1e-3)
    # headerless, two columns for a 2-D domain
    p2 = tmp_path / "s2.csv"
    p2.write_text("".join(f"{a:.6f},{b:.6f}\n" for a, b in rng.uniform(0, 1, size=(20, 2))))
    assert Samples.from_csv(p2, [0, 0], [1, 1]).values.shape == (20, 2)
    # samples outside the domain are an error, as is a missing file
    bad = tmp_path / "bad.csv"
    bad.write_text("s\n0.5\n1.5\n")
    with pytest.raises(CryosipInputError, match="outside the domain"):
        make_distribution(f"samples:{bad}", [0.0], [1.0])
    with pytest.raises(CryosipInputError):
        make_distribution(f"samples:{tmp_path / 'nope.csv'}", [0.0], [1.0])


def test_bad_names_and_dimensions():
    with pytest.raises(ValueError, match="unknown distribution"):
        make_distribution("trimodal", [0.0], [1.0])
    with pytest.raises(ValueError, match="2-D"):
        make_distribution("banana", [0.0], [1.0])
    with pytest.raises(ValueError):
        make_distribution("uniform", [1.0], [0.0])
    with pytest.raises(ValueError):
        make_distribution("gaussian", [0.0], [1.0], sd=-1.0)
    # parameters in domain units override the defaults
    g = make_distribution("unimodal", [10.0], [40.0], mean=20.0, sd=2.0)
    assert g.name == "unimodal"
    np.testing.assert_allclose(g.sample(0, N).mean(), 20.0, atol=0.05)
    assert g.params()["mean"] == [20.0]
