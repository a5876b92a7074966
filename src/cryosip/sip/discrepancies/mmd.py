"""Maximum mean discrepancy: unconditional (nuisances unknown) and nuisance-paired (known).

Unconditional:  1/2 MMD^2(mu, nu) = 1/2 [E k(X,X') - 2 E k(X,Y) + E k(Y,Y')], X ~ mu[rho] with
fresh nuisances and noise. Measured on AdK (docs/method.md section 2): on raw pixels it sees only the
mean of rho, because pose variability swamps the conformational signal.

Paired (the kernel score, a proper scoring rule): each observation y_n is compared with model
outputs simulated under its own nuisance xi_n,
    S = (1/N) sum_n [ 1/2 E k(X_n, X_n') - E k(X_n, y_n) ],  X_n = F0(theta, xi_n) + eps, theta ~ rho.
For a Gaussian kernel and Gaussian noise the noise expectation is closed-form
(``noise_average=True``, the default): with d entries per observation,
    E k(X_i, y)   = (h^2/(h^2+s^2))^(d/2)  exp(-||m_i - y||^2 / (2(h^2+s^2)))
    E k(X_i, X_j') = (h^2/(h^2+2s^2))^(d/2) exp(-||m_i - m_j||^2 / (2(h^2+2s^2))),
which removes the Monte Carlo noise of the simulated noise without changing the objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .base import AbstractDiscrepancy
from .kernels import AbstractKernel, GaussianKernel, sq_distances


def _kernel_mean(
    kx, ky, kernel: AbstractKernel, wx, wy, exclude_diagonal: bool = False, chunk: int = 1024
):
    """sum_ab wx_a wy_b k(x_a, y_b), in row chunks (bounded memory)."""
    n = kx.shape[0]
    if n <= chunk:
        K = kernel(sq_distances(kx, ky))
        if exclude_diagonal:
            K = K * (1.0 - jnp.eye(n, ky.shape[0], dtype=K.dtype))
        return wx @ K @ wy
    pad = (-n) % chunk
    xs = jnp.pad(kx, ((0, pad), (0, 0))).reshape(-1, chunk, kx.shape[1])
    ws = jnp.pad(wx, (0, pad)).reshape(-1, chunk)
    offs = jnp.arange(xs.shape[0]) * chunk

    def body(args):
        xc, wc, off = args
        K = kernel(sq_distances(xc, ky))
        if exclude_diagonal:
            rows = off + jnp.arange(chunk)
            K = K * (rows[:, None] != jnp.arange(ky.shape[0])[None, :]).astype(K.dtype)
        return wc @ K @ wy

    return jnp.sum(jax.lax.map(body, (xs, ws, offs)))


def mmd(
    x: Float[Array, "n ..."],
    y: Float[Array, "m ..."],
    kernel: AbstractKernel,
    wx: Float[Array, " n"] | None = None,
    wy: Float[Array, " m"] | None = None,
    unbiased: bool = False,
) -> Float[Array, ""]:
    """1/2 MMD^2 between weighted samples (V-statistic, or U-statistic with ``unbiased``)."""
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    wx = jnp.full((x.shape[0],), 1.0 / x.shape[0], x.dtype) if wx is None else wx / jnp.sum(wx)
    wy = jnp.full((y.shape[0],), 1.0 / y.shape[0], y.dtype) if wy is None else wy / jnp.sum(wy)
    if unbiased:
        kxx = _kernel_mean(x, x, kernel, wx, wx, True) / (1.0 - jnp.sum(wx * wx))
        kyy = _kernel_mean(y, y, kernel, wy, wy, True) / (1.0 - jnp.sum(wy * wy))
    else:
        kxx = _kernel_mean(x, x, kernel, wx, wx)
        kyy = _kernel_mean(y, y, kernel, wy, wy)
    return 0.5 * (kxx + kyy) - _kernel_mean(x, y, kernel, wx, wy)


def mmd_random_features(
    key, x, y, bandwidth: float, n_features: int = 1024, wx=None, wy=None
) -> Float[Array, ""]:
    """1/2 MMD^2 for a Gaussian kernel by random Fourier features: O((n+m) d F) instead of O((n+m)^2 d)."""
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    kw, kb = jax.random.split(key)
    W = jax.random.normal(kw, (x.shape[1], n_features), x.dtype) / bandwidth
    b = jax.random.uniform(kb, (n_features,), x.dtype, 0.0, 2 * jnp.pi)
    feat = lambda z: jnp.sqrt(2.0 / n_features) * jnp.cos(z @ W + b)  # noqa: E731
    wx = jnp.full((x.shape[0],), 1.0 / x.shape[0]) if wx is None else wx / jnp.sum(wx)
    wy = jnp.full((y.shape[0],), 1.0 / y.shape[0]) if wy is None else wy / jnp.sum(wy)
    diff = wx @ feat(x) - wy @ feat(y)
    return 0.5 * jnp.sum(diff * diff)


class UnpairedMMD(AbstractDiscrepancy):
    """Unconditional MMD between fresh model draws (random nuisances) and the observations
    (``--objective mmd-unconditional``; ``--objective mmd`` is :class:`PairedMMD`). ``MMD`` is
    the old name of this class, kept as an alias."""

    kernel: AbstractKernel
    n_samples: int = 256
    unbiased: bool = True
    estimator: str = "exact"  # or "rff" (Gaussian kernel only)
    n_features: int = 1024

    def __call__(self, key, operator, measure, obs):
        P = measure.n_particles
        reps = -(-self.n_samples // P)
        idx = jnp.tile(jnp.arange(P), reps)[: self.n_samples]
        counts = jnp.bincount(idx, length=P)
        wx = measure.weights[idx] / counts[idx].astype(measure.weights.dtype)
        k1, k2 = jax.random.split(key)
        x = operator.sample(k1, measure.positions[idx])
        y = obs.values
        if self.estimator == "rff":
            if not isinstance(self.kernel, GaussianKernel) or len(self.kernel.bandwidth) != 1:
                raise ValueError("random features need a single-bandwidth GaussianKernel")
            return mmd_random_features(
                k2, x, y, self.kernel.bandwidth[0], self.n_features, wx, obs.weight
            )
        return mmd(x, y, self.kernel, wx, obs.weight, self.unbiased)

    @property
    def name(self) -> str:
        return "mmd-unconditional"


def paired_kernel_score(
    dy: Float[Array, "n_obs n_particles"],
    dmm: Float[Array, "n_obs n_particles n_particles"],
    log_weights: Float[Array, " n_particles"],
    sigma: Float[Array, ""],
    n_entries: int,
    bandwidths: tuple[float, ...],
    obs_weight: Float[Array, " n_obs"] | None = None,
) -> Float[Array, ""]:
    """Noise-averaged Gaussian-kernel score from paired squared distances (see module docstring)."""
    w = jnp.exp(log_weights)
    s2 = sigma**2
    total = 0.0
    for h in bandwidths:
        h2 = h * h
        log_c1 = 0.5 * n_entries * jnp.log(h2 / (h2 + s2))
        log_c2 = 0.5 * n_entries * jnp.log(h2 / (h2 + 2 * s2))
        k_xy = jnp.exp(log_c1 - 0.5 * dy / (h2 + s2))  # (B, P)
        k_xx = jnp.exp(log_c2 - 0.5 * dmm / (h2 + 2 * s2))  # (B, P, P)
        total = total + 0.5 * jnp.einsum("bpq,p,q->b", k_xx, w, w) - k_xy @ w
    if obs_weight is None:
        return jnp.mean(total)
    return jnp.sum(obs_weight * total) / jnp.sum(obs_weight)


class PairedMMD(AbstractDiscrepancy):
    """The nuisance-paired kernel score (known nuisances). ``noise_average`` uses the closed form
    (Gaussian kernel only); otherwise X_n carry fresh simulated noise and any kernel works."""

    kernel: AbstractKernel
    noise_average: bool = True
    batch_size: int | None = None

    def __call__(self, key, operator, measure, obs):
        if self.noise_average:
            if not isinstance(self.kernel, GaussianKernel):
                raise ValueError(
                    "noise_average=True needs a GaussianKernel; use noise_average=False for others"
                )
            dy, dmm = operator.paired_sq_distances(
                measure.positions, obs, batch_size=self.batch_size
            )
            return paired_kernel_score(
                dy,
                dmm,
                measure.log_weights,
                operator.noise.sigma,
                operator.obs_size,
                self.kernel.bandwidth,
                obs.weight,
            )
        ms = operator.paired_means(
            measure.positions, obs, batch_size=self.batch_size
        )  # (B, P, ...)
        B, P = ms.shape[:2]
        x = operator.noise.sample(key, ms).reshape(B, P, -1)
        y = jnp.reshape(obs.values, (B, -1))
        w = measure.weights
        off = 1.0 - jnp.eye(P, dtype=x.dtype)

        def one(xb, yb):
            kxx = self.kernel(sq_distances(xb, xb)) * off
            kxy = self.kernel(jnp.sum((xb - yb) ** 2, axis=1))
            return 0.5 * (w @ kxx @ w) / (1.0 - jnp.sum(w * w)) - kxy @ w

        s = jax.vmap(one)(x, y)
        return jnp.sum(obs.weight * s) / jnp.sum(obs.weight)

    @property
    def name(self) -> str:
        return "mmd"


MMD = UnpairedMMD  # the old name (it reads like the paired score the CLI calls mmd)
