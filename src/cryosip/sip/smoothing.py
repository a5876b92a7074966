"""Regularisation chosen from the data: a kernel-smoothed measure, its bandwidth by held-out likelihood.

Under KL (the marginal likelihood) the best measure for a finite set of images is discrete and
spiky (the nonparametric MLE): particles that are free to move drift towards it, and a grid
method is held back from it only by its grid. Neither is what the images say about a smooth
population. cryosip regularises the measure itself,

    rho_h = mu * N(0, diag(h_a^2)),    h_a = h x (width of CV a),

so the model of an image is p_h(y | theta) = integral p(y | theta') N(theta'; theta, h^2) dtheta',
a kernel-smoothed likelihood: the flow runs unchanged on a table of p_h, and its particles
carry mu; the reported distribution is rho_h (each particle spread by the kernel,
:func:`expand_particles`). h = 0 is the unregularised flow.

The bandwidth is chosen by K-fold cross-validation over images: for every candidate h, the
smoothed NPMLE (EM for the weights of rho_h on a fine grid of centres) is fitted to the
images outside a fold and scored by the log-likelihood of the images in it; the candidate
with the best held-out total is chosen. The rule is the same in every dimension (the grid is
the table's product grid, refined) and needs no setting. (Until 2026-12-05 the least smoothing
within one standard error of the best was taken; it chose less smoothing than the images ask
for, often none, and was measured worse: ``benchmarks/bandwidth_rules.py``.) ``docs/method.md``
section 3 has the derivation; ``docs/results.md`` the measured effect.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jaxtyping import Array, Float

from .loglik_table import LogLikTableOperator, interpolation_matrix, product_nodes
from .operator import reflect_into

# relative bandwidths tried (fractions of each CV's range); 0 is "no smoothing"
CANDIDATES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.045, 0.065, 0.09, 0.13)
_FINE_ENTRIES = 4e6  # at most this many (image, fine node) entries in the refined table (CV cost)


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """The chosen regularisation and the evidence for it (strict-JSON-ready via :meth:`to_dict`)."""

    relative: float  # h: fraction of each CV's range
    absolute: tuple[float, ...]  # h_a in CV units, per CV
    candidates: tuple[float, ...]
    heldout_loglik: tuple[float, ...]  # summed over folds, per candidate (nats)
    n_folds: int
    resolution: float  # the fine grid's spacing, relative: smaller candidates were not tried

    def to_dict(self) -> dict:
        best = max(self.heldout_loglik)
        return {
            "rule": f"{self.n_folds}-fold cross-validated held-out log-likelihood, best total"
            if self.n_folds
            else "given",
            "bandwidth_relative": self.relative,
            "bandwidth": list(self.absolute),
            "candidates_relative": list(self.candidates),
            "heldout_loglik_minus_best": [round(v - best, 3) for v in self.heldout_loglik],
        }


def refine(table: LogLikTableOperator, n_obs: int | None = None) -> LogLikTableOperator:
    """The table resampled (cubic) on a finer product grid: up to 257 nodes in 1-D and 65 per CV
    above, fewer when needed to keep images x nodes below 4e6 (the cross-validation's cost)."""
    n = int(table.table.shape[0] if n_obs is None else n_obs)
    d = table.dim
    per_cv = int(max(4, min(257 if d == 1 else 65, (_FINE_ENTRIES / max(n, 1)) ** (1.0 / d))))
    shape = tuple((g - 1) * max(1, (per_cv - 1) // (g - 1)) + 1 for g in table.shape)
    if shape == table.shape:
        return table
    # the tensor-product interpolant, applied one CV at a time (the same values as
    # interpolate_loglik at the fine nodes, in float64)
    x = np.asarray(table.table, np.float64).reshape((-1,) + tuple(table.shape))
    for a, (lo, hi, g, k) in enumerate(
        zip(table.lower_bounds, table.upper_bounds, table.shape, shape)
    ):
        fine_axis = product_nodes([lo], [hi], (k,))[:, 0]
        x = np.moveaxis(
            np.tensordot(x, interpolation_matrix(fine_axis, lo, hi, g), ([a + 1], [1])), -1, a + 1
        )
    return LogLikTableOperator(
        x.reshape(x.shape[0], -1),
        table.lower_bounds,
        table.upper_bounds,
        shape=shape,
        noise=table.noise,
        fit_scale=table.fit_scale,
        n_obs_entries=table.n_obs_entries,
    )


def _kernels(shape, relative) -> list[np.ndarray]:
    """Per-CV (G, G) matrices K[g', g]: the Gaussian of sd h x range centred at node g, on the
    nodes g', normalised to mass 1 inside the domain (a truncated kernel). ``relative``: one h
    for every CV, or one per CV."""
    out = []
    for g, rel in zip(shape, np.broadcast_to(np.asarray(relative, np.float64), (len(shape),))):
        u = np.linspace(0.0, 1.0, g)
        if rel <= 0:
            out.append(np.eye(g))
            continue
        k = np.exp(-0.5 * ((u[:, None] - u[None, :]) / rel) ** 2)
        out.append(k / k.sum(0, keepdims=True))
    return out


def _smooth_exp(E: np.ndarray, shape, relative) -> np.ndarray:
    """Apply the separable kernel to every row of E (N, prod(shape))."""
    x = E.reshape((E.shape[0],) + tuple(shape))
    for a, k in enumerate(_kernels(shape, relative)):
        x = np.moveaxis(np.tensordot(x, k, axes=([a + 1], [0])), -1, a + 1)
    return x.reshape(E.shape[0], -1)


def smooth(fine: LogLikTableOperator, relative: float) -> LogLikTableOperator:
    """The table of log p_h(y | theta): the kernel-smoothed likelihood on the same nodes."""
    if relative <= 0:
        return fine
    L = np.asarray(fine.table, np.float64)
    top = L.max(axis=1, keepdims=True)
    Eh = _smooth_exp(np.exp(L - top), fine.shape, relative)
    return fine.with_table(np.log(np.maximum(Eh, 1e-300)) + top)


def _apply_kernels(x, kernels, shape, transpose: bool):
    """``K @ x`` (``transpose``: ``K^T @ x``) for every candidate h: ``x`` (H, F, G) on the
    product grid of ``shape``, ``kernels`` one (H, g, g) stack per CV (:func:`_kernels` of each
    candidate), ``K_h`` their tensor product, so that the smoothed likelihood is ``E @ K_h``.
    ``x`` may be a JAX or a NumPy array (the same einsum)."""
    lib = jnp if isinstance(x, jax.Array) else np
    h, f = x.shape[:2]
    x = x.reshape((h, f) + tuple(shape))
    for a, k in enumerate(kernels):
        x = lib.moveaxis(x, a + 2, -1)
        x = lib.einsum("hf...j,hji->hf...i" if transpose else "hf...j,hij->hf...i", x, k)
        x = lib.moveaxis(x, -1, a + 2)
    return x.reshape(h, f, -1)


@functools.partial(jax.jit, static_argnames=("shape",))
def _em_smoothed(E: Float[Array, "n g"], kernels, c: Float[Array, "f n"], n_iter_dummy, shape):
    """Weights (H, F, G): for every candidate h and fold f, the mixture with fixed components
    maximising sum_n c_fn log (E K_h w)_n (EM). ``E K_h`` is never formed: the smoothed mixture
    is ``E (K_h w)`` and the EM update ``K_h^T (E^T r)``, so every pass over E serves all
    candidates and folds at once (the same iterates as EM on each smoothed table)."""
    n_h, n_f, g = kernels[0].shape[0], c.shape[0], E.shape[1]
    w0 = jnp.full((n_h, n_f, g), 1.0 / g, E.dtype)
    total = jnp.sum(c, axis=1)[None, :, None]

    def step(w, _):
        v = _apply_kernels(w, kernels, shape, transpose=False).reshape(n_h * n_f, g)
        m = (v @ E.T).reshape(n_h, n_f, -1)  # (H, F, N) the smoothed mixtures at every image
        r = (c[None] / jnp.maximum(m, 1e-30)).reshape(n_h * n_f, -1) @ E
        r = _apply_kernels(r.reshape(n_h, n_f, g), kernels, shape, transpose=True)
        return w * r / total, None

    w, _ = jax.lax.scan(step, w0, n_iter_dummy)
    return w


def heldout_loglik(
    E: np.ndarray, shape, candidates, folds: np.ndarray, n_iter: int = 200, *, per_image=False
) -> np.ndarray:
    """(H,) for every candidate bandwidth, the held-out log-likelihood summed over images (up to
    each row's constant): each image scored under the smoothed mixture fitted by EM to the
    images of the other folds. ``E`` (N, G) the likelihood of every image on the fine product
    grid of ``shape`` (each row scaled by its maximum), ``folds`` (N,) each image's fold. Every
    candidate's and fold's EM runs in one compiled call; the scores in float64. ``per_image``:
    (H, N), each image's own score (for standard errors)."""
    n_folds = int(folds.max()) + 1
    kernels = [np.stack(k) for k in zip(*(_kernels(shape, h) for h in candidates))]
    train = (folds[None, :] != np.arange(n_folds)[:, None]).astype(np.float32)
    ws = _em_smoothed(
        jnp.asarray(E, jnp.float32),
        tuple(jnp.asarray(k, jnp.float32) for k in kernels),
        jnp.asarray(train),
        jnp.zeros(n_iter),
        tuple(int(g) for g in shape),
    )
    mix = _apply_kernels(np.asarray(ws, np.float64), kernels, shape, transpose=False)  # K_h w
    held = np.zeros((len(candidates), len(E)) if per_image else len(candidates))
    for k in range(n_folds):
        rows = folds == k
        scores = np.log(np.maximum(E[rows] @ mix[:, k, :].T, 1e-300))  # (rows, H)
        if per_image:
            held[:, rows] = scores.T
        else:
            held += scores.sum(0)
    return held


def cv_folds(n: int, n_folds: int = 3, seed: int = 0) -> np.ndarray:
    """(n,) each image's fold for the cross-validation: a seeded permutation, dealt round-robin."""
    return np.random.default_rng(seed).permutation(n) % n_folds


def choose_bandwidth(
    table: LogLikTableOperator,
    *,
    candidates=CANDIDATES,
    n_folds: int = 3,
    n_iter: int = 200,
    seed: int = 0,
) -> tuple[Bandwidth, LogLikTableOperator]:
    """Pick h by ``n_folds``-fold cross-validation over images (module docstring).

    ``table`` is the likelihood table (raw, any d). Returns the choice and the smoothed, refined
    table the flow should run on."""
    fine = refine(table)
    L = np.asarray(fine.table, np.float64)
    top = L.max(axis=1, keepdims=True)
    E = np.exp(L - top)
    folds = cv_folds(E.shape[0], n_folds, seed)
    spacing = min(1.0 / (g - 1) for g in fine.shape)
    # h < half the fine spacing: the fine grid cannot represent it, the same as no smoothing
    tried = [float(h) for h in candidates if not 0 < h < 0.5 * spacing]
    scores = [float(v) for v in heldout_loglik(E, fine.shape, tried, folds, n_iter)]
    best = tried[int(np.argmax(scores))]  # the best held-out total (module docstring)
    lo, hi = np.asarray(fine.lower_bounds), np.asarray(fine.upper_bounds)
    choice = Bandwidth(
        best,
        tuple(float(v) for v in best * (hi - lo)),
        tuple(tried),
        tuple(scores),
        int(n_folds),
        float(spacing),
    )
    return choice, smooth(fine, best)


# points per CV of each particle's kernel in :func:`expand_particles`, by dimension: at most 81
# per particle (the per-image posterior over them is images x particles x points); above 4 CVs,
# 3 per CV
POINTS_PER_CV = {1: 17, 2: 7, 3: 4, 4: 3}


def kernel_points(q: int) -> np.ndarray:
    """``q`` equal-weight points standing for N(0, 1): the midpoint quantiles
    Phi^-1((i + 1/2) / q), rescaled so that their variance is exactly 1.

    Chosen for what the points are used for (distances between distributions: W1, W2,
    histograms): the midpoint quantiles are the W1-optimal equal-weight points. Measured W1 to
    N(0, 1): 0.046 for q = 33, 0.082 for 17, 0.18 for 7, 0.29 for 4, 0.37 for 3; the 5-point
    Gauss-Hermite rule used before (exact to the 9th moment) is 0.35 away, 0.44 for 3 points.
    With a kernel of 0.065 of the range that added ~0.01 to the reported W1 on a 300-image
    cryojax set (0.0181 reported; 0.0088 with 17 of these points, 0.0085 with 33, 0.0072 for
    the continuous rho_h)."""
    z = scipy.special.ndtri((np.arange(q) + 0.5) / q)
    return z / np.sqrt(np.mean(z * z))


def expand_particles(
    positions, weights, bandwidth, lower, upper, points_per_cv: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """rho_h as weighted points: each particle spread over a product of :func:`kernel_points`
    of its kernel (17 points in 1-D, 7 / 4 / 3 per CV in 2-D / 3-D / 4-D), reflected into the
    domain. Away from the domain edges the points keep each particle's mean and the kernel's
    variance h^2 exactly (odd moments vanish by symmetry)."""
    x = np.asarray(positions, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    w = np.asarray(weights, np.float64)
    d = x.shape[1]
    h = np.broadcast_to(np.asarray(bandwidth, np.float64), (d,))
    if not np.any(h > 0):
        return x, w
    z = kernel_points(points_per_cv or POINTS_PER_CV.get(d, 3))
    grid = np.stack(np.meshgrid(*([z] * d), indexing="ij"), -1).reshape(-1, d)
    pts = x[:, None, :] + grid[None, :, :] * h  # (K, Q, d)
    pts = np.asarray(
        reflect_into(jnp.asarray(pts), jnp.asarray(lower), jnp.asarray(upper)), np.float64
    )
    return pts.reshape(-1, d), np.repeat(w / len(grid), len(grid))
