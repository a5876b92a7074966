"""Projected potential of Gaussian atoms, pixel-averaged (erf pixel integrals on a window).

Each Gaussian is integrated exactly over each pixel, as cryojax's default
``GaussianMixtureProjection()`` does, but only on a ``(2h+1)^2`` window around the atom's
nearest pixel. The 1-D pixel integrals are separable, so one atom needs, per axis and
Gaussian, the error function at the window's ``2h`` inner pixel edges only: the mass beyond
the window's outer edges is *lumped* into the outermost window pixels (the outer "edges" are
at -inf and +inf). Lumping keeps each atom's total mass exact (the image's DC term is exact)
and halves both the erf count and the truncation error of a plain window (measured on AdK,
relative L2 against :func:`project_gaussians_dense`: 1.6e-4 instead of 3.1e-4 at 2 A/px, h=1).

Speed on CPU (see ``docs/forward.md``) comes from:

* an atom-minor layout (atoms on the vectorised minor axis) and a rational erf with
  ~4e-7 absolute error in float32 (XLA's float32 erf is ~3x slower; float64 uses ``lax.erf``);
* a custom batching rule: a ``vmap`` over images runs as a loop over small chunks of images
  whose intermediates stay in cache, each chunk scattering whole ``(w, w)`` windows into one
  ``(chunk, P, P)`` canvas (XLA's batched element scatter is ~5x slower);
* a custom VJP whose backward pass gathers the cotangent windows (the adjoint of the
  scatter) and contracts them with the analytic erf derivatives, without materialising the
  autodiff intermediates. It returns cotangents for amplitudes and variances only when they
  are differentiated (``symbolic_zeros``).

Everything is jit-, vmap- and grad-able (reverse mode; forward-mode ``jvp`` of the windowed
projector is not defined).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Float

__all__ = ["project_gaussians", "project_gaussians_dense", "window_half_width", "chunk_size"]

# Window rule: h * pixel_size >= _WINDOW_SIGMAS * sigma_max. Measured on AdK all-atom
# (random poses, lumped tails, relative L2 vs the dense erf projection): margin/sigma =
# 1.56 -> 3.9e-3, 1.88 -> 1.3e-3, 2.5 -> 1.6e-4 (2 A/px) and 2.9e-4 (1 A/px), 3.1 -> 3e-5.
_WINDOW_SIGMAS = 2.25
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
# Working-set target of one chunk, in atom-window pixels (n_atoms * w^2 * chunk); tuned on a
# 2-core AVX-512 machine with 1 MiB L2 per core (AdK, 3,341 atoms, 3x3 windows -> 4 images).
_CHUNK_BUDGET = 120_000
# On a GPU the loop over chunks only serialises small kernels (an H200 ran the CPU's 3-image
# chunks at 0.3-0.9x cryojax's fastest projector; benchmarks/README.md, "GPU"): one chunk of
# up to this many atom-window pixels (~270 MB per intermediate in float32; AdK all-atom at
# h=1: 2,231 images; the same H200 then ran 1.3-1.5x cryojax's fastest).
_ACCELERATOR_CHUNK_BUDGET = 1 << 26


def window_half_width(max_variance: float, pixel_size: float) -> int:
    """Half-width h (pixels) of the (2h+1)^2 window: h * pixel_size >= 2.25 sigma_max.

    With lumped tails this keeps the windowed image within ~6e-4 relative L2 of the dense one
    (AdK: h=1 at 2 A/px, h=2 at 1 and 1.5 A/px; widest Peng Gaussian sigma = 0.8 A).
    """
    return max(1, math.ceil(_WINDOW_SIGMAS * math.sqrt(max_variance) / pixel_size - 1e-9))


def chunk_size(n_atoms: int, half_width: int, backend: str | None = None) -> int:
    """Images per chunk in the batched projector: on the CPU, one chunk's intermediates stay in
    cache; on an accelerator (``backend``, default JAX's default backend), chunks are as large
    as memory allows, so that a batch runs as a few large kernels."""
    w = 2 * half_width + 1
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return max(1, _ACCELERATOR_CHUNK_BUDGET // max(1, n_atoms * w * w))
    return int(min(64, max(1, _CHUNK_BUDGET // max(1, n_atoms * w * w))))


def _erf(x: Array) -> Array:
    """erf; float32: a rational minimax approximation (|error| < 5e-7), float64: ``lax.erf``."""
    if x.dtype != jnp.float32:
        return jax.lax.erf(x)
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08
    p = x2 * p + -2.10102402082508e-06
    p = x2 * p + -5.69250639462346e-05
    p = x2 * p + -7.34990630326855e-04
    p = x2 * p + -2.95459980854025e-03
    p = x2 * p + -1.60960333262415e-02
    q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04
    q = x2 * q + -1.68282697438203e-03
    q = x2 * q + -7.37332916720468e-03
    q = x2 * q + -1.42647390514189e-02
    return x * p / q


# --------------------------------------------------------------------------------------
# The chunk kernels. Shapes: c images, n atoms, K Gaussians per atom, 2 axes (x, y).
# xyT (c, 2, n) in Angstrom; amp/var (K, n) shared by the chunk or (c, K, n) per image.
# --------------------------------------------------------------------------------------


class _Geometry(eqx.Module):
    box_size: int = eqx.field(static=True)
    pixel_size: float = eqx.field(static=True)
    half_width: int = eqx.field(static=True)

    @property
    def w(self) -> int:
        return 2 * self.half_width + 1

    @property
    def pad(self) -> int:
        return self.w

    @property
    def canvas(self) -> int:
        return self.box_size + 2 * self.pad


# The chunk's canvases are stacked as one (c * P, P) array; an atom's (w, w) window starts at
# (row, column) = (b * P + y0, x0). Window dimensions are minor in the updates (XLA's layout).
_SCATTER_DNUMS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1, 2), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1)
)
_GATHER_DNUMS = jax.lax.GatherDimensionNumbers(
    offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0, 1)
)


class _Edges(eqx.Module):
    """Per-chunk quantities shared by the forward and backward kernels (all atom-minor).

    ``t[e]`` (c, 2, 1, n): signed distance (Angstrom) from the atom to inner pixel edge e of its
    window, per axis (0 = x, 1 = y); ``z[e] = t[e] * s`` (c, 2, K, n) with s = 1/sqrt(2 var);
    ``index`` (c*n, 2): each window's (row, column) in the stacked canvas.
    """

    t: list
    z: list
    index: Array


def _edges(geo: _Geometry, xyT: Array, s: Array) -> _Edges:
    c, _, n = xyT.shape
    px, h, w, P = geo.pixel_size, geo.half_width, geo.w, geo.canvas
    u = xyT * (1.0 / px) + (geo.box_size // 2)  # continuous pixel coordinates (c, 2, n)
    centre = jnp.round(u)
    off = ((centre - u) * px)[:, :, None, :]  # nearest pixel centre minus atom
    t = [off + (e - h + 0.5) * px for e in range(2 * h)]
    s = s[:, None] if s.ndim == 3 else s  # (K, n) or (c, 1, K, n)
    z = [te * s for te in t]
    first = centre.astype(jnp.int32) + (geo.pad - h)  # window's first pixel in the padded canvas
    row = jnp.clip(first[:, 1], 0, P - w) + (jnp.arange(c, dtype=jnp.int32) * P)[:, None]
    col = jnp.clip(first[:, 0], 0, P - w)
    index = jnp.stack([row.reshape(-1), col.reshape(-1)], axis=-1)
    return _Edges(t, z, index)


def _profile(cdf: list[Array], i: int, axis: int, k: int) -> Array:
    """2 x the mass of Gaussian k in window pixel i along ``axis`` (lumped tails):
    Delta_i = c_i - c_{i-1} with c_{-1} = -1 and c_{2h} = +1; (c, n)."""
    if i == 0:
        return 1.0 + cdf[0][:, axis, k]
    if i == len(cdf):
        return 1.0 - cdf[-1][:, axis, k]
    return cdf[i][:, axis, k] - cdf[i - 1][:, axis, k]


def _amp(a: Array, k: int) -> Array:
    """Amplitude of Gaussian k: (n,) shared or (c, n) per image."""
    return a[:, k] if a.ndim == 3 else a[k]


def _profiles(cdf: list[Array], axis: int, K: int) -> list[list[Array]]:
    """prof[i][k] (c, n): 2 x the mass of Gaussian k in window pixel i along ``axis``, with
    lumped tails: Delta_i = c_i - c_{i-1}, c_{-1} = -1, c_{2h} = +1."""
    return [[_profile(cdf, i, axis, k) for k in range(K)] for i in range(len(cdf) + 1)]


def _forward_chunk(geo: _Geometry, xyT: Array, amp: Array, var: Array) -> Array:
    """Images (c, D, D) of c atom sets. xyT (c, 2, n); amp, var (K, n) or (c, K, n)."""
    c, _, n = xyT.shape
    w, D, P, pad = geo.w, geo.box_size, geo.canvas, geo.pad
    K = amp.shape[-2]
    ed = _edges(geo, xyT, jax.lax.rsqrt(2.0 * var))
    cdf = [_erf(z) for z in ed.z]
    a = amp * (0.25 / (geo.pixel_size * geo.pixel_size))
    ay = [[_amp(a, k) * p for k, p in enumerate(row)] for row in _profiles(cdf, 1, K)]
    dx = _profiles(cdf, 0, K)
    # sums over K written out: XLA:CPU turns a reduce over the K axis into a slow library call
    foot = [[sum(ay[i][k] * dx[j][k] for k in range(K)) for j in range(w)] for i in range(w)]
    foot = jnp.stack([jnp.stack(row, axis=-1) for row in foot], axis=-2).reshape(c * n, w, w)
    canvas = jax.lax.scatter_add(
        jnp.zeros((c * P, P), foot.dtype),
        ed.index,
        foot,
        _SCATTER_DNUMS,
        indices_are_sorted=False,
        unique_indices=False,
        mode="promise_in_bounds",
    )
    return canvas.reshape(c, P, P)[:, pad : pad + D, pad : pad + D]


def _backward_chunk(geo: _Geometry, need_amp: bool, need_var: bool, xyT, amp, var, g):
    """Cotangents (dxyT (c, 2, n), damp (c, K, n) | None, dvar (c, K, n) | None) of the chunk."""
    c, _, n = xyT.shape
    w, P, pad, px, h = geo.w, geo.canvas, geo.pad, geo.pixel_size, geo.half_width
    K = amp.shape[-2]
    s = jax.lax.rsqrt(2.0 * var)
    ed = _edges(geo, xyT, s)
    cdf = [_erf(z) for z in ed.z]
    a = amp * (0.25 / (px * px))
    s_b = s[:, None] if s.ndim == 3 else s
    a_b = a[:, None] if a.ndim == 3 else a
    # q_e = a * d c_e / d xy = -a * s * erf'(z_e)       (c, 2, K, n)
    q = [(-_TWO_OVER_SQRT_PI) * a_b * s_b * jnp.exp(-z * z) for z in ed.z]
    gp = jnp.pad(g, ((0, 0), (pad, pad), (pad, pad))).reshape(c * P, P)
    G = jax.lax.gather(
        gp, ed.index, _GATHER_DNUMS, slice_sizes=(w, w), mode="promise_in_bounds"
    ).reshape(c, n, w, w)
    py, pxx = _profiles(cdf, 1, K), _profiles(cdf, 0, K)
    # d loss / d c^x_e = sum_i a Delta^y_i (G_{i,e} - G_{i,e+1}); likewise for y with i <-> j
    dGx = [[G[:, :, i, e] - G[:, :, i, e + 1] for e in range(2 * h)] for i in range(w)]
    dGy = [[G[:, :, e, j] - G[:, :, e + 1, j] for e in range(2 * h)] for j in range(w)]
    dx = sum(
        dGx[i][e] * sum(q[e][:, 0, k] * py[i][k] for k in range(K))
        for i in range(w)
        for e in range(2 * h)
    )
    dy = sum(
        dGy[j][e] * sum(q[e][:, 1, k] * pxx[j][k] for k in range(K))
        for j in range(w)
        for e in range(2 * h)
    )
    dxyT = jnp.stack([dx, dy], axis=1)
    damp = dvar = None
    if need_amp:
        scale = 0.25 / (px * px)
        damp = jnp.stack(
            [
                scale
                * sum(py[i][k] * sum(G[:, :, i, j] * pxx[j][k] for j in range(w)) for i in range(w))
                for k in range(K)
            ],
            axis=1,
        )
    if need_var:
        # a * d c_e / d var = a * erf'(z_e) * t_e * (-s^3) = q_e * t_e * s^2
        s2 = s * s
        dvar = jnp.stack(
            [
                (s2[:, k] if s2.ndim == 3 else s2[k])
                * sum(
                    q[e][:, 0, k] * ed.t[e][:, 0, 0] * sum(dGx[i][e] * py[i][k] for i in range(w))
                    + q[e][:, 1, k]
                    * ed.t[e][:, 1, 0]
                    * sum(dGy[j][e] * pxx[j][k] for j in range(w))
                    for e in range(2 * h)
                )
                for k in range(K)
            ],
            axis=1,
        )
    return dxyT, damp, dvar


# --------------------------------------------------------------------------------------
# Batching: a vmap over images runs the chunk kernels in a loop over chunks.
# --------------------------------------------------------------------------------------


def _chunked(fn, batch_size: int, chunk: int, args, batched):
    """``fn(*args_chunk)`` over chunks of the leading axis of the ``batched`` args (the others
    are passed whole); outputs stacked back to ``batch_size``. ``None`` outputs stay ``None``."""
    n_chunks = -(-batch_size // chunk)
    if n_chunks == 1:
        return fn(*args)
    total = n_chunks * chunk
    stacked = []
    for x, b in zip(args, batched):
        if b:
            if total != batch_size:  # pad with copies of the last item (their results are dropped)
                x = jnp.concatenate([x, jnp.repeat(x[-1:], total - batch_size, 0)])
            stacked.append(x.reshape((n_chunks, chunk) + x.shape[1:]))

    def body(xs):
        it = iter(xs)
        return fn(*[next(it) if b else x for x, b in zip(args, batched)])

    out = jax.lax.map(body, stacked)
    return jax.tree.map(lambda y: y.reshape((total,) + y.shape[2:])[:batch_size], out)


def _atom_minor(a: Array) -> Array:
    """(..., n, K) -> (..., K, n)."""
    return jnp.swapaxes(a, -1, -2)


@functools.cache
def _make_projector(box_size: int, pixel_size: float, half_width: int):
    geo = _Geometry(box_size, pixel_size, half_width)

    def forward(xy, amp, var):  # xy (c, n, 2); amp, var (K, n) or (c, K, n)
        return _forward_chunk(geo, jnp.swapaxes(xy, 1, 2), amp, var)

    @custom_vmap
    def fwd_kernel(xy, amp, var):
        return forward(xy[None], _atom_minor(amp), _atom_minor(var))[0]

    @fwd_kernel.def_vmap
    def _fwd_rule(axis_size, in_batched, xy, amp, var):
        xyb, ab, vb = in_batched
        if not xyb:
            xy = jnp.broadcast_to(xy, (axis_size,) + xy.shape)
        chunk = chunk_size(xy.shape[-2], half_width)
        args = (xy, _atom_minor(amp), _atom_minor(var))
        return _chunked(forward, axis_size, chunk, args, (True, ab, vb)), True

    def make_bwd_kernel(need_amp: bool, need_var: bool):
        def backward(xy, amp, var, g):  # -> dxy (c, n, 2), damp / dvar (c, n, K) or None
            dxyT, da, dv = _backward_chunk(
                geo, need_amp, need_var, jnp.swapaxes(xy, 1, 2), amp, var, g
            )
            return (
                jnp.swapaxes(dxyT, 1, 2),
                None if da is None else _atom_minor(da),
                None if dv is None else _atom_minor(dv),
            )

        @custom_vmap
        def bwd_kernel(xy, amp, var, g):
            dxy, da, dv = backward(xy[None], _atom_minor(amp), _atom_minor(var), g[None])
            return dxy[0], (None if da is None else da[0]), (None if dv is None else dv[0])

        @bwd_kernel.def_vmap
        def _bwd_rule(axis_size, in_batched, xy, amp, var, g):
            xyb, ab, vb, gb = in_batched
            if not xyb:
                xy = jnp.broadcast_to(xy, (axis_size,) + xy.shape)
            if not gb:
                g = jnp.broadcast_to(g, (axis_size,) + g.shape)
            chunk = chunk_size(xy.shape[-2], half_width)
            args = (xy, _atom_minor(amp), _atom_minor(var), g)
            dxy, da, dv = _chunked(backward, axis_size, chunk, args, (True, ab, vb, True))
            return (dxy, da, dv), (True, None if da is None else True, None if dv is None else True)

        return bwd_kernel

    bwd_kernels = {(a, v): make_bwd_kernel(a, v) for a in (False, True) for v in (False, True)}

    class _Res(eqx.Module):
        xy: Array
        amp: Array
        var: Array
        need_amp: bool = eqx.field(static=True)
        need_var: bool = eqx.field(static=True)

    @jax.custom_vjp
    def project(xy, amp, var):
        return fwd_kernel(xy, amp, var)

    def project_fwd(xy, amp, var):
        image = fwd_kernel(xy.value, amp.value, var.value)
        return image, _Res(xy.value, amp.value, var.value, amp.perturbed, var.perturbed)

    def project_bwd(res, g):
        if type(g) is jax.custom_derivatives.SymbolicZero:  # pragma: no cover - unused output
            g = jnp.zeros(g.shape, g.dtype)
        dxy, da, dv = bwd_kernels[(res.need_amp, res.need_var)](res.xy, res.amp, res.var, g)
        return dxy, da, dv

    project.defvjp(project_fwd, project_bwd, symbolic_zeros=True)
    return project


def project_gaussians(
    xy: Float[Array, "n_atoms 2"],
    amplitudes: Float[Array, "n_atoms n_gauss"],
    variances: Float[Array, "n_atoms n_gauss"],
    box_size: int,
    pixel_size: float,
    half_width: int,
) -> Float[Array, "y_dim x_dim"]:
    """Pixel-averaged projection onto a ``box_size``^2 grid whose pixel i has centre (i - D//2)*pixel_size.

    ``xy`` are the in-plane atom positions (Angstrom, x then y); the image is indexed [y, x].
    Atoms are summed on a ``(2 half_width + 1)^2`` window with lumped tails (module docstring).
    """
    xy = jnp.asarray(xy)
    dtype = jnp.result_type(xy, amplitudes, variances)
    proj = _make_projector(int(box_size), float(pixel_size), int(half_width))
    return proj(xy.astype(dtype), jnp.asarray(amplitudes, dtype), jnp.asarray(variances, dtype))


def project_gaussians_dense(
    xy: Float[Array, "n_atoms 2"],
    amplitudes: Float[Array, "n_atoms n_gauss"],
    variances: Float[Array, "n_atoms n_gauss"],
    box_size: int,
    pixel_size: float,
) -> Float[Array, "y_dim x_dim"]:
    """Reference: the same pixel integrals over the whole grid (no window). O(n * D) erfs."""
    D = box_size
    edges = (jnp.arange(D + 1, dtype=xy.dtype) - D // 2 - 0.5) * pixel_size  # (D+1,)
    inv = jax.lax.rsqrt(2.0 * variances)
    cx = jax.scipy.special.erf((edges[None, None, :] - xy[:, 0, None, None]) * inv[:, :, None])
    cy = jax.scipy.special.erf((edges[None, None, :] - xy[:, 1, None, None]) * inv[:, :, None])
    px = (cx[..., 1:] - cx[..., :-1]) * (0.5 / pixel_size)
    py = (cy[..., 1:] - cy[..., :-1]) * (0.5 / pixel_size)
    return jnp.einsum("nk,nky,nkx->yx", amplitudes, py, px)
