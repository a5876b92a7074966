"""Tabulated operator: exact simulations on a grid over a 1-D theta, reused by every step.

For a low-dimensional conformation variable with known nuisances, every quantity the KL and
paired-MMD objectives need is a quadratic form in the noise-free outputs. With the
outputs interpolated between grid nodes by a natural cubic spline (linear in the node outputs),
``m_n(theta) = sum_g phi_g(theta) m_n(theta_g)``, they become

    ||m_n(theta) - y_n||^2          = |y_n|^2 - 2 phi.c_n + phi^T M_n phi
    ||m_n(theta) - m_n(theta')||^2  = (phi - phi')^T M_n (phi - phi')

with the per-observation Gram matrix ``M_n[g, h] = <m_n(theta_g), m_n(theta_h)>`` and
``c_n[g] = <m_n(theta_g), y_n>``. One simulation per (observation, node) builds the table;
each flow step then costs small matrix products, and gradients in theta are exact for the
interpolated model. ``docs/method.md`` section 3 calls this the tabulated path; the direct path
(the base operator) remains for high-dimensional theta, and the tests compare the two.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .noise import GaussianNoise, paired_profiled_sq_distances, profiled_scale
from .operator import AbstractRandomOperator, Observations, map_batches


def catmull_rom_sparse(theta: Float[Array, " n"], lower: float, upper: float, n_nodes: int, xp=jnp):
    """Catmull-Rom interpolation on uniform nodes (C^1, local, exact at nodes): (node indices (n, 4), weights (n, 4)).

    ``xp=np`` computes in NumPy (no compilation, float64: e.g. interpolation matrices)."""
    h = (upper - lower) / (n_nodes - 1)
    x = xp.clip((theta - lower) / h, 0.0, n_nodes - 1.0)
    k = xp.clip(xp.floor(x), 0, n_nodes - 2).astype(xp.int32)
    t = x - k.astype(x.dtype)
    t2, t3 = t * t, t * t * t
    w = xp.stack(
        [
            0.5 * (-t + 2 * t2 - t3),
            0.5 * (2 - 5 * t2 + 3 * t3),
            0.5 * (t + 4 * t2 - 3 * t3),
            0.5 * (-t2 + t3),
        ],
        axis=-1,
    )  # (n, 4)
    idx = xp.clip(k[:, None] + xp.arange(-1, 3, dtype=k.dtype), 0, n_nodes - 1)  # clamped ends
    return idx, w


def natural_spline_transform(n_nodes: int, h: float) -> np.ndarray:
    """T (2G, G): node values -> [node values; second derivatives] of the natural cubic spline."""
    G = n_nodes
    T = np.zeros((2 * G, G))
    T[:G] = np.eye(G)
    if G > 2:
        A = np.diag(np.full(G - 2, 4.0)) + np.diag(np.ones(G - 3), 1) + np.diag(np.ones(G - 3), -1)
        R = np.zeros((G - 2, G))
        for i in range(G - 2):
            R[i, i : i + 3] = np.array([1.0, -2.0, 1.0]) * 6.0 / h**2
        T[G + 1 : 2 * G - 1] = np.linalg.solve(A, R)
    return T


def natural_spline_sparse(theta: Float[Array, " n"], lower: float, upper: float, n_nodes: int):
    """Natural cubic spline on uniform nodes in local form: indices into [values; second derivatives]
    (n, 4) and weights (n, 4). Interpolation error O(h^4) for smooth functions (Catmull-Rom: O(h^2))."""
    h = (upper - lower) / (n_nodes - 1)
    x = jnp.clip((theta - lower) / h, 0.0, n_nodes - 1.0)
    k = jnp.clip(jnp.floor(x), 0, n_nodes - 2).astype(jnp.int32)
    t = x - k.astype(x.dtype)
    u = 1.0 - t
    c = h * h / 6.0
    w = jnp.stack([u, t, c * (u**3 - u), c * (t**3 - t)], axis=-1)
    idx = jnp.stack([k, k + 1, n_nodes + k, n_nodes + k + 1], axis=-1)
    return idx, w


@eqx.filter_jit
def _node_tables(base, nodes, y, nu, center: bool):
    """Gram matrix, cross products and |y|^2 for a batch of observations (module-level: compiled once per shape)."""
    b, n_nodes = jax.tree_util.tree_leaves(y)[0].shape[0], nodes.shape[0]
    # every (observation, node) image: AbstractRandomOperator.node_means (one flat batch)
    return gram_tables(base.node_means(nodes, nu).reshape(b, n_nodes, -1), y, center)


def gram_tables(ms: Float[Array, "b g p"], y, center: bool):
    """Gram matrices, cross products with the observations and |y|^2 of rendered node images."""
    b = ms.shape[0]
    yv = y.reshape(b, -1)
    if center:
        ms = ms - ms.mean(axis=2, keepdims=True)
        yv = yv - yv.mean(axis=1, keepdims=True)
    gram = jnp.einsum("bgp,bhp->bgh", ms, ms)
    cross = jnp.einsum("bgp,bp->bg", ms, yv)
    return gram, cross, jnp.sum(yv * yv, axis=1)


class TabulatedOperator(AbstractRandomOperator):
    """Gram tables of a base operator's outputs on a 1-D node grid, for every observation."""

    noise: GaussianNoise
    fit_scale: bool
    lower: float = eqx.field(static=True)
    upper: float = eqx.field(static=True)
    n_nodes: int = eqx.field(static=True)
    n_obs_entries: int = eqx.field(static=True)
    gram: Float[Array, "n_obs n_nodes n_nodes"]
    cross: Float[Array, "n_obs n_nodes"]
    ysq: Float[Array, " n_obs"]
    transform: Float[Array, "two_nodes n_nodes"]
    gram_blocks: Float[Array, "n_obs n_seg 4 4"]
    cross_blocks: Float[Array, "n_obs n_seg 4"]

    @classmethod
    def build(
        cls,
        base: AbstractRandomOperator,
        obs: Observations,
        n_nodes: int = 33,
        *,
        batch_size: int = 64,
        progress=None,
    ) -> TabulatedOperator:
        """One simulation per (observation, node) (:meth:`node_means`); ``progress(n_done)`` is
        called after each batch."""
        lower, upper = (np.asarray(b, np.float64) for b in base.domain)
        if lower.shape != (1,) or not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            raise ValueError(
                "the tabulated path needs a 1-D theta with a bounded domain; use the direct path"
            )
        nodes = jnp.linspace(float(lower[0]), float(upper[0]), n_nodes)[:, None]
        center = base.fit_scale

        parts = map_batches(
            lambda sub: _node_tables(base, nodes, sub.values, sub.nuisance, center),
            obs,
            batch_size,
            progress=progress,
        )
        gram, cross, ysq = (jnp.asarray(np.concatenate(c)) for c in zip(*parts))
        d = int(np.prod(jax.tree_util.tree_leaves(obs.values)[0].shape[1:]))
        return cls(
            base.noise,
            base.fit_scale,
            float(lower[0]),
            float(upper[0]),
            n_nodes,
            d - int(center),
            gram,
            cross,
            ysq,
        )

    def __init__(self, noise, fit_scale, lower, upper, n_nodes, n_obs_entries, gram, cross, ysq):
        self.noise, self.fit_scale, self.lower, self.upper = noise, bool(fit_scale), lower, upper
        self.n_nodes, self.n_obs_entries = n_nodes, n_obs_entries
        self.gram, self.cross, self.ysq = gram, cross, ysq
        # natural cubic spline in theta: segment k touches [m_k, m_k+1, m''_k, m''_k+1], linear in the node outputs
        T = natural_spline_transform(n_nodes, (upper - lower) / (n_nodes - 1))
        seg = (
            np.arange(n_nodes - 1)[:, None] + np.array([0, 1, n_nodes, n_nodes + 1])[None, :]
        )  # (G-1, 4)
        Tb = jnp.asarray(T[seg], gram.dtype)  # (G-1, 4, G)
        self.transform = jnp.asarray(T, gram.dtype)
        self.gram_blocks = jnp.einsum("sag,ngh,sbh->nsab", Tb, gram, Tb)
        self.cross_blocks = jnp.einsum("sag,ng->nsa", Tb, cross)

    @property
    def domain(self):
        return jnp.array([self.lower]), jnp.array([self.upper])

    @property
    def nodes(self) -> Float[Array, " n_nodes"]:
        """The tabulated CV values (uniform on the domain)."""
        return jnp.linspace(self.lower, self.upper, self.n_nodes)

    @property
    def obs_size(self) -> int:
        return self.n_obs_entries

    def observations(self) -> Observations:
        """The tabulated observations, as indices into the tables."""
        n = self.ysq.shape[0]
        idx = jnp.arange(n, dtype=jnp.int32)
        return Observations(idx, None, idx)

    def mean(self, theta, nuisance):
        raise NotImplementedError(
            "a tabulated operator has no images; use the base operator to simulate"
        )

    def sample_nuisance(self, key: PRNGKeyArray, n: int):
        raise NotImplementedError(
            "a tabulated operator is tied to its observations' known nuisances"
        )

    def _basis(self, theta):
        """Dense spline weights (P, G) on the node outputs."""
        idx, w = natural_spline_sparse(theta[:, 0], self.lower, self.upper, self.n_nodes)
        return jnp.einsum("pa,pag->pg", w, self.transform[idx])

    def _quad(self, theta, obs):
        phi = self._basis(theta)  # (P, G)
        M = self.gram[obs.index]  # (B, G, G)
        Mphi = jnp.einsum("bgh,ph->bpg", M, phi)  # (B, P, G)
        q = jnp.einsum("bpg,pg->bp", Mphi, phi)
        b = jnp.einsum("bg,pg->bp", self.cross[obs.index], phi)
        return phi, Mphi, q, b, self.ysq[obs.index]

    def log_likelihood_matrix(self, theta, obs, *, key=None, n_nuisance=0, batch_size=None):
        # sparse: theta in segment k is a combination of 4 spline basis vectors, so q = phi^T M phi
        # needs one precomputed (4, 4) block per (observation, particle): a single-index gather
        idx, w = natural_spline_sparse(theta[:, 0], self.lower, self.upper, self.n_nodes)
        k = idx[:, 0]
        n = obs.index
        blk = self.gram_blocks[n[:, None], k[None, :]]  # (B, P, 4, 4)
        q = jnp.einsum("bpij,pi,pj->bp", blk, w, w)
        b = jnp.einsum("bpi,pi->bp", self.cross_blocks[n[:, None], k[None, :]], w)
        ysq = self.ysq[n]
        if self.fit_scale:
            a = profiled_scale(b, q)
            r2 = ysq[:, None] - 2 * a * b + a * a * q
        else:
            r2 = ysq[:, None] - 2 * b + q
        s2 = self.noise.sigma**2
        return -0.5 * r2 / s2 - 0.5 * self.n_obs_entries * jnp.log(2 * jnp.pi * s2)

    def paired_sq_distances(self, theta, obs, batch_size=None):
        phi, Mphi, q, b, ysq = self._quad(theta, obs)
        cross_pp = jnp.einsum("bpg,qg->bpq", Mphi, phi)
        dmm = jnp.maximum(q[:, :, None] + q[:, None, :] - 2 * cross_pp, 0.0)
        if self.fit_scale:  # the tables are centred when the scale is profiled
            return paired_profiled_sq_distances(b, q, ysq, dmm)
        return jnp.maximum(ysq[:, None] - 2 * b + q, 0.0), dmm
