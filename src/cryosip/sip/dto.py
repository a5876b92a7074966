"""Discretize-then-optimize (DTO) baselines: MAP methods as restrictions of the SIP objective.

With the KL objective, J(rho) = -(1/N) sum_n log int p(y_n | theta) d rho(theta) is the negative
mean marginal log-likelihood. Restricting rho to a finite family first and then optimising is
what the usual MAP methods do (``docs/method.md`` section 4):

- :func:`em_grid`: fixed support (grid nodes or trajectory frames), free weights, EM on the
  marginal likelihood with an optional Dirichlet prior (ensemble reweighting);
  :func:`bootstrap_em` resamples the images for uncertainty bands;
- :func:`map_classes`: K free conformations with free weights (multi-class MAP), optimised
  jointly by Adam on the same objective;
- :func:`per_image_map`: theta_n = argmax p(y_n | theta) p0(theta) per image, then a histogram
  (it does not deconvolve the noise: biased at low SNR);
- :func:`gmm`: a Gaussian mixture on the CV, its marginal likelihood computed by quadrature on a
  fine grid, fitted by Adam.

Every function takes any :class:`~cryosip.sip.operator.AbstractRandomOperator` (a direct one,
or a :class:`~cryosip.sip.table.TabulatedOperator`), or a precomputed log-likelihood matrix.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float, PRNGKeyArray
from scipy.special import logsumexp as np_logsumexp

from .measure import ParticleMeasure, grid_measure
from .operator import AbstractRandomOperator, Observations, map_batches

logger = logging.getLogger(__name__)


def loglik_on_nodes(
    operator: AbstractRandomOperator,
    obs: Observations,
    nodes,
    *,
    key=None,
    batch_size: int | None = 256,
):
    """log p(y_n | theta_k) for every observation and node, (N, K)."""
    nodes = np.asarray(nodes, np.float32)
    if nodes.ndim == 1:
        nodes = nodes[:, None]
    n = len(obs)
    if batch_size is None or n <= batch_size:
        return np.asarray(_loglik_matrix(operator, nodes, obs, key))
    return np.concatenate(
        map_batches(lambda b: _loglik_matrix(operator, nodes, b, key), obs, batch_size)
    )


@eqx.filter_jit
def _loglik_matrix(operator, nodes, obs, key):
    """Compiled once per (operator structure, shapes): repeated calls reuse it."""
    return operator.log_likelihood_matrix(jnp.asarray(nodes), obs, key=key)


# ------------------------------------------------------------------------------------------------
# Fixed support, free weights: EM
# ------------------------------------------------------------------------------------------------


def em_weights(
    loglik: np.ndarray,
    n_iter: int = 500,
    prior_alpha: float = 1.0,
    obs_weight=None,
    tol: float = 1e-9,
):
    """EM (MAP under a symmetric Dirichlet(alpha) prior) for mixture weights with fixed components.

    Maximises ``sum_n c_n log sum_k w_k exp(L_nk) + (alpha - 1) sum_k log w_k`` over the simplex
    (``c_n`` = ``obs_weight``, 1 by default; bootstrap passes resampling counts). ``alpha = 1`` is
    plain maximum likelihood (the NPMLE on the given support). Computed in float64 NumPy: the
    objective is a sum of N terms of size O(n_pix), beyond float32's resolution.

    Returns (weights (K,), objective history): ``history[i]`` is the penalised log-likelihood
    of the weights entering iteration ``i``; it never decreases for ``alpha >= 1`` (EM is an
    MM algorithm), up to float64 round-off.
    """
    L = np.asarray(loglik, np.float64)
    if L.ndim != 2:
        raise ValueError(f"loglik must be (n_obs, n_components), got shape {L.shape}")
    N, K = L.shape
    c = np.ones(N) if obs_weight is None else np.asarray(obs_weight, np.float64)
    a1 = float(prior_alpha) - 1.0
    rowmax = L.max(axis=1, keepdims=True)
    E = np.exp(
        L - rowmax
    )  # each row's largest entry is 1: no overflow, underflow only far from the max
    E[E < 1e-200] = (
        0.0  # no subnormals (they slow the products down many times; their terms are negligible)
    )
    const = float(c @ rowmax[:, 0])
    keep = c > 0
    E, c_k = E[keep], c[keep]

    def objective(w):
        m = E @ w
        bad = m < 1e-280
        lm = np.log(np.where(bad, 1.0, m))
        if bad.any():  # weights vanished where these rows' likelihood lives: back to log space
            with np.errstate(divide="ignore"):
                lm[bad] = np_logsumexp(
                    (L[keep][bad] - rowmax[keep][bad]) + np.log(w)[None, :], axis=1
                )
        pen = a1 * np.sum(np.log(np.maximum(w, 1e-300))) if a1 != 0.0 else 0.0
        return float(c_k @ lm) + const + pen, m, bad

    w = np.full(K, 1.0 / K)
    hist = []
    for _ in range(int(n_iter)):
        obj, m, bad = objective(w)
        hist.append(obj)
        if bad.any():
            lw = np.log(np.maximum(w, 1e-300))
            lj = (L[keep] - rowmax[keep]) + lw[None, :]
            r = np.exp(lj - np_logsumexp(lj, axis=1, keepdims=True))
            counts = c_k @ r
        else:
            counts = w * (E.T @ (c_k / m))
        counts = np.maximum(counts + a1, 0.0)
        w = counts / counts.sum()
        w[w < 1e-200] = 0.0
        if len(hist) > 2 and abs(hist[-1] - hist[-2]) < tol * max(1.0, abs(hist[-1])):
            break
    return w, np.asarray(hist)


def em_grid(
    operator, obs, nodes, *, n_iter: int = 500, prior_alpha: float = 1.0, loglik=None
) -> ParticleMeasure:
    """Ensemble reweighting on fixed nodes: the K-atom restriction of the KL objective."""
    L = loglik_on_nodes(operator, obs, nodes) if loglik is None else loglik
    w, _ = em_weights(L, n_iter=n_iter, prior_alpha=prior_alpha)
    return grid_measure(nodes, w)


def bootstrap_em(
    loglik: np.ndarray,
    n_boot: int,
    key: PRNGKeyArray,
    *,
    n_iter: int = 500,
    prior_alpha: float = 1.0,
) -> Float[np.ndarray, "n_boot n_components"]:
    """EM weights for ``n_boot`` bootstrap replicates (images resampled with replacement).

    Replicate b uses the multiplicity counts of a uniform resample of the N images as EM's
    observation weights, so the log-likelihood matrix is computed once. Quantiles over the
    replicates give uncertainty bands on the weights (sampling variability of the images only).
    """
    L = np.asarray(loglik)
    n = L.shape[0]
    out = np.empty((int(n_boot), L.shape[1]))
    for b in range(int(n_boot)):
        idx = np.asarray(jax.random.randint(jax.random.fold_in(key, b), (n,), 0, n))
        counts = np.bincount(idx, minlength=n)
        out[b], _ = em_weights(L, n_iter=n_iter, prior_alpha=prior_alpha, obs_weight=counts)
    return out


# ------------------------------------------------------------------------------------------------
# Per-image MAP
# ------------------------------------------------------------------------------------------------


def per_image_map(operator, obs, grid, *, log_prior=None, loglik=None) -> np.ndarray:
    """Per-image MAP theta on a fine grid (N,); log_prior over the grid optional (default flat)."""
    L = loglik_on_nodes(operator, obs, grid) if loglik is None else loglik
    if log_prior is not None:
        L = L + np.asarray(log_prior)[None, :]
    g = np.asarray(grid)
    return g[np.argmax(L, axis=1)]


# ------------------------------------------------------------------------------------------------
# A small Adam (optax is not a dependency)
# ------------------------------------------------------------------------------------------------


def _adam_update(grads, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step for a pytree; ``lr``: a pytree of scalar learning rates. -> (updates, m, v)."""
    m = jax.tree_util.tree_map(lambda mi, g: b1 * mi + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda vi, g: b2 * vi + (1 - b2) * g * g, v, grads)
    t = step.astype(jnp.float32) + 1.0
    c1, c2 = 1 - b1**t, 1 - b2**t
    upd = jax.tree_util.tree_map(
        lambda mi, vi, a: -a * (mi / c1) / (jnp.sqrt(vi / c2) + eps), m, v, lr
    )
    return upd, m, v


def _cosine(step, n_steps, floor=0.05):
    t = jnp.minimum(step.astype(jnp.float32) / max(1, n_steps), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * t))


def _bounds(operator):
    lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in operator.domain)
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Free support and weights: multi-class MAP
# ------------------------------------------------------------------------------------------------


def _default_init(operator, obs, n: int, key, grid_size: int, batch_size: int) -> np.ndarray:
    """(n, d) initial positions: per-image-MAP quantiles (1-D bounded), else uniform in the box."""
    lo, hi = _bounds(operator)
    bounded = bool(np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)))
    if not bounded:
        raise ValueError("an unbounded domain needs an explicit init")
    if lo.size == 1:
        grid = np.linspace(lo[0], hi[0], grid_size)
        m = per_image_map(
            operator,
            obs,
            grid,
            loglik=loglik_on_nodes(operator, obs, grid, key=key, batch_size=batch_size),
        )
        q = np.quantile(m, (np.arange(n) + 0.5) / n)
        # equal quantiles would stay glued together (same gradient): spread them within a grid cell
        h = (hi[0] - lo[0]) / (grid_size - 1)
        q = q + h * (np.asarray(jax.random.uniform(key, (n,))) - 0.5)
        return np.clip(q, lo[0], hi[0])[:, None]
    u = np.asarray(jax.random.uniform(key, (n, lo.size)))
    return lo + (hi - lo) * u


def map_classes(
    operator: AbstractRandomOperator,
    obs: Observations,
    K: int,
    *,
    key: PRNGKeyArray,
    n_steps: int = 500,
    learning_rate: float = 0.01,
    weight_learning_rate: float = 0.05,
    init=None,
    grid_size: int = 257,
    batch_size: int | None = None,
    n_nuisance: int = 64,
) -> ParticleMeasure:
    """Multi-class MAP: K free conformations with free weights maximising the marginal likelihood.

    The objective is the KL one restricted to K-atom measures,
    ``-(1/sum c) sum_n c_n log sum_k softmax(a)_k p(y_n | theta_k)``, minimised jointly over the
    positions theta (Adam, step ``learning_rate`` times the domain width, projected onto the
    domain) and the logits a (Adam, step ``weight_learning_rate``), with a cosine decay to 5%.
    ``init``: a ParticleMeasure or (K, d) positions (weights start uniform); by default the
    quantiles of the per-image MAP on a ``grid_size`` grid (1-D), or uniform in the box.
    ``batch_size`` observations per step (None: all; a fresh random minibatch otherwise, and a
    fresh nuisance draw when the observations carry no nuisances).
    """
    K = int(K)
    k_init, k_run = jax.random.split(key)
    lo, hi = _bounds(operator)
    if init is None:
        theta0 = _default_init(operator, obs, K, k_init, grid_size, 256)
        logits0 = np.zeros(K)
    elif isinstance(init, ParticleMeasure):
        theta0, logits0 = np.asarray(init.positions), np.asarray(init.log_weights)
    else:
        theta0 = np.asarray(init, np.float64).reshape(K, -1)
        logits0 = np.zeros(K)
    if theta0.shape[0] != K:
        raise ValueError(f"init has {theta0.shape[0]} classes, K = {K}")
    width = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    n_obs = len(obs)
    batch = None if batch_size is None or batch_size >= n_obs else int(batch_size)
    theta, log_w, hist = _fit_classes(
        operator,
        obs,
        np.asarray(theta0, np.float32),
        np.asarray(logits0, np.float32),
        k_run,
        np.asarray(lo, np.float32),
        np.asarray(hi, np.float32),
        np.asarray(learning_rate * width, np.float32),
        np.float32(weight_learning_rate),
        int(n_steps),
        batch,
        int(n_nuisance),
    )
    hist = np.asarray(hist)
    logger.debug("map_classes K=%d: objective %.6g -> %.6g", K, hist[0], hist[-1])
    return ParticleMeasure(theta, log_w)


@eqx.filter_jit
def _fit_classes(
    operator,
    obs,
    theta0,
    logits0,
    key,
    lo,
    hi,
    lr_theta,
    lr_logits,
    n_steps: int,
    batch: int | None,
    n_nuisance: int,
):
    """Adam on (positions, logits) of a K-atom measure for the KL objective; one compiled scan."""
    n_obs = obs.index.shape[0]

    def loss(params, o, k):
        ll = operator.log_likelihood_matrix(params["theta"], o, key=k, n_nuisance=n_nuisance)
        lm = logsumexp(ll + jax.nn.log_softmax(params["logits"])[None, :], axis=1)
        return -jnp.sum(o.weight * lm) / jnp.sum(o.weight)

    lr = {"theta": jnp.asarray(lr_theta), "logits": jnp.asarray(lr_logits)}

    def step(carry, _):
        params, m, v, i = carry
        kb, kn = jax.random.split(jax.random.fold_in(key, i))
        o = (
            obs
            if batch is None
            else obs.take(jax.random.choice(kb, n_obs, (batch,), replace=False))
        )
        val, g = jax.value_and_grad(loss)(params, o, kn)
        g = jax.tree_util.tree_map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), g)
        s = _cosine(i, n_steps)
        upd, m, v = _adam_update(g, m, v, i, jax.tree_util.tree_map(lambda a: a * s, lr))
        theta = jnp.clip(params["theta"] + upd["theta"], lo, hi)
        params = {"theta": theta, "logits": params["logits"] + upd["logits"]}
        return (params, m, v, i + 1), val

    params = {"theta": jnp.asarray(theta0), "logits": jnp.asarray(logits0)}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (params, _, _, _), hist = jax.lax.scan(
        step, (params, zeros, zeros, jnp.asarray(0)), None, length=n_steps
    )
    return params["theta"], jax.nn.log_softmax(params["logits"]), hist


# ------------------------------------------------------------------------------------------------
# A Gaussian mixture on the CV, fitted through the likelihood
# ------------------------------------------------------------------------------------------------


class GMMFit(NamedTuple):
    """A Gaussian mixture fitted through the likelihood (a tuple: ``fit[0]`` is the measure).

    ``measure``: atoms on the quadrature grid with the mixture's (grid-normalised) masses;
    ``weights`` (C,), ``means`` (C, d), ``sds`` (C, d): the components (diagonal covariance,
    each truncated to the grid's box); ``log_likelihood``: the mean marginal log-likelihood
    per image; ``history``: the objective (negative mean log-likelihood) per Adam step of the
    best restart.
    """

    measure: ParticleMeasure
    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    log_likelihood: float
    history: np.ndarray


def mixture_on_grid(
    grid: Float[Array, "n_grid dim"],
    weights: Float[Array, " c"],
    means: Float[Array, "c dim"],
    sds: Float[Array, "c dim"],
) -> Float[Array, " n_grid"]:
    """Masses of a diagonal Gaussian mixture on grid points, each component normalised there."""
    z = (grid[None, :, :] - means[:, None, :]) / sds[:, None, :]
    logc = -0.5 * jnp.sum(z * z, axis=-1)  # (C, G)
    logc = logc - logsumexp(logc, axis=1, keepdims=True)
    return jnp.exp(logsumexp(logc + jnp.log(weights)[:, None], axis=0))


def _weighted_gmm_init(
    grid: np.ndarray, mass: np.ndarray, C: int, rng: np.random.Generator, h: np.ndarray
):
    """Plain weighted EM for a C-component diagonal GMM fitted to a discrete measure (a guess)."""
    G, d = grid.shape
    mass = mass / mass.sum()
    cdf = np.cumsum(mass)
    qs = (np.arange(C) + rng.uniform(0.25, 0.75, C)) / C
    mu = grid[np.minimum(np.searchsorted(cdf, qs), G - 1)].astype(np.float64)
    span = grid.max(0) - grid.min(0)
    sd = np.tile(np.maximum(span / (2 * C), h), (C, 1))
    pi = np.full(C, 1.0 / C)
    for _ in range(100):
        z = (grid[None] - mu[:, None]) / sd[:, None]
        lp = np.log(pi)[:, None] - 0.5 * np.sum(z * z, -1) - np.sum(np.log(sd), -1)[:, None]
        r = np.exp(lp - np_logsumexp(lp, axis=0, keepdims=True)) * mass[None]  # (C, G)
        nk = r.sum(1) + 1e-12
        pi = nk / nk.sum()
        mu = (r @ grid) / nk[:, None]
        sd = np.sqrt(np.maximum((r @ grid**2) / nk[:, None] - mu**2, h**2))
    return pi, mu, sd


def gmm(
    operator: AbstractRandomOperator | None,
    obs: Observations | None,
    n_components: int,
    *,
    key: PRNGKeyArray,
    grid=None,
    loglik=None,
    n_steps: int = 400,
    n_restarts: int = 4,
    learning_rate: float = 0.03,
) -> GMMFit:
    """A Gaussian mixture rho = sum_c pi_c N(mu_c, diag s_c^2) on the CV, by maximum likelihood.

    The marginal likelihood is computed by quadrature on ``grid`` ((G,) or (G, d) points, uniform
    spacing; default 257 points over a bounded 1-D domain): ``p(y_n) = sum_g q_g p(y_n | theta_g)``
    with ``q`` the mixture's masses on the grid (each component normalised over the grid, i.e.
    truncated to the domain). The log-likelihood matrix is computed once (or passed as ``loglik``;
    then ``operator`` may be None, and ``obs`` too: every row then counts once).
    Initial guesses: a weighted GMM fitted to the EM (NPMLE) weights on the grid, jittered per
    restart; then Adam on (logits, means, log sds) for ``n_steps``; the best restart is kept.
    sds are bounded below by half a grid spacing.
    """
    if grid is None:
        lo, hi = _bounds(operator)
        if lo.size != 1 or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise ValueError(
                "gmm needs a quadrature grid for a multi-dimensional or unbounded domain"
            )
        grid = np.linspace(lo[0], hi[0], 257)
    g = np.asarray(grid, np.float64)
    L = loglik_on_nodes(operator, obs, g, key=key) if loglik is None else np.asarray(loglik)
    c = None if obs is None else np.asarray(obs.weight, np.float64)
    return gmm_from_loglik(
        L,
        g,
        n_components,
        key=key,
        obs_weight=c,
        n_steps=n_steps,
        n_restarts=n_restarts,
        learning_rate=learning_rate,
    )


def gmm_from_loglik(
    loglik: np.ndarray,
    grid,
    n_components: int,
    *,
    key: PRNGKeyArray,
    obs_weight=None,
    n_steps: int = 400,
    n_restarts: int = 4,
    learning_rate: float = 0.03,
) -> GMMFit:
    """:func:`gmm` on a precomputed (N, G) log-likelihood matrix over the quadrature ``grid``.

    With ``loglik`` = 0 on the diagonal and -inf elsewhere and ``obs_weight`` a density's masses
    on the grid, this fits the mixture to that density directly (the family's best fit).
    """
    C = int(n_components)
    g = np.asarray(grid, np.float64)
    if g.ndim == 1:
        g = g[:, None]
    G, d = g.shape
    L = np.asarray(loglik, np.float64)
    if L.ndim != 2 or L.shape[1] != G:
        raise ValueError(f"loglik must be (n_obs, {G}) for {G} grid points, got {L.shape}")
    h = np.array(
        [
            np.min(np.diff(np.unique(g[:, j]))) if np.unique(g[:, j]).size > 1 else 1.0
            for j in range(d)
        ]
    )
    c = np.ones(L.shape[0]) if obs_weight is None else np.asarray(obs_weight, np.float64)
    keep = c > 0
    L, c = L[keep], c[keep]
    w_em, _ = em_weights(L, n_iter=300, obs_weight=c)

    kd = (
        np.asarray(jax.random.key_data(key))
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        else np.asarray(key)
    )
    rng = np.random.default_rng(kd.astype(np.uint32).ravel().tolist())
    rowmax = L.max(axis=1, keepdims=True)
    # p(y_n) / max_g p(y_n | theta_g) = sum_g E_ng q_g: a matrix-vector product per step, no exp
    E = np.exp(L - rowmax).astype(np.float32)
    inits = [_weighted_gmm_init(g, w_em, C, rng, h) for _ in range(max(1, int(n_restarts)))]
    p0 = {
        "logits": np.stack([np.log(np.maximum(pi, 1e-6)) for pi, _, _ in inits]).astype(np.float32),
        "mu": np.stack([mu for _, mu, _ in inits]).astype(np.float32),
        "log_s": np.stack(
            [np.log(np.maximum(sd - 0.5 * h, 0.25 * h)) for _, _, sd in inits]
        ).astype(np.float32),
    }
    lr = {
        "logits": np.float32(learning_rate * 3),
        "mu": (learning_rate * (g.max(0) - g.min(0))).astype(np.float32),
        "log_s": np.float32(learning_rate * 3),
    }
    finals, hists, pis, mus, sds, qs = (
        np.asarray(x, np.float64)
        for x in _fit_gmm(
            E,
            (c / c.sum()).astype(np.float32),
            g.astype(np.float32),
            (0.5 * h).astype(np.float32),
            p0,
            lr,
            int(n_steps),
        )
    )
    r = int(np.argmin(finals))
    logger.debug("gmm C=%d: restart objectives %s", C, finals)
    pi, mu, sd, q = pis[r], mus[r], sds[r], qs[r]
    ll = -finals[r] + float(np.sum(c / c.sum() * rowmax[:, 0]))
    order = np.argsort(mu[:, 0])
    return GMMFit(grid_measure(g, q), pi[order], mu[order], sd[order], ll, hists[r])


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _fit_gmm(E, c, grid, hmin, p0, lr, n_steps: int):
    """Adam on (logits, means, log sds) of a grid-truncated diagonal GMM; all restarts at once."""

    def unpack(p):
        return jax.nn.softmax(p["logits"]), p["mu"], hmin + jnp.exp(p["log_s"])

    def loss(p):
        q = mixture_on_grid(grid, *unpack(p))
        return -jnp.sum(c * jnp.log(jnp.maximum(E @ q, 1e-37)))

    def one(p):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, p)

        def step(carry, _):
            p, m, v, i = carry
            val, gr = jax.value_and_grad(loss)(p)
            gr = jax.tree_util.tree_map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), gr)
            upd, m, v = _adam_update(
                gr, m, v, i, jax.tree_util.tree_map(lambda a: a * _cosine(i, n_steps), lr)
            )
            p = jax.tree_util.tree_map(lambda a, u: a + u, p, upd)
            p["mu"] = jnp.clip(p["mu"], grid.min(0), grid.max(0))
            return (p, m, v, i + 1), val

        (p, _, _, _), hist = jax.lax.scan(
            step, (p, zeros, zeros, jnp.asarray(0)), None, length=n_steps
        )
        pi, mu, sd = unpack(p)
        return loss(p), hist, pi, mu, sd, mixture_on_grid(grid, pi, mu, sd)

    return jax.vmap(one)(p0)
