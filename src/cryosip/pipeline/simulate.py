"""Simulate particle stacks from a conformation distribution through the cryo-EM operator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from ..cryoem.image_model import CryoNuisance
from ..cryoem.noise import RadialNoiseSpectrum
from ..data.particles import ParticleStack
from .operator import CryoEMOperator


def render_batch_fn(operator: CryoEMOperator) -> Callable:
    """A jitted function (theta (B, d), nuisance batch) -> noise-free images (B, D, D)."""
    return jax.jit(jax.vmap(operator.mean))


def render_clean(
    operator: CryoEMOperator, theta: np.ndarray, nuisance: CryoNuisance, batch_size: int = 256
) -> np.ndarray:
    """Noise-free images for paired rows of theta and nuisance, in batches (NumPy out)."""
    f = render_batch_fn(operator)
    n = theta.shape[0]
    out = np.empty((n, operator.image_model.box_size, operator.image_model.box_size), np.float32)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        # pad the last batch to a full one so that only one shape is ever compiled
        idx = np.minimum(np.arange(s, s + batch_size), n - 1)
        nu = jax.tree_util.tree_map(lambda a: jnp.asarray(a[idx]), nuisance)
        out[s:e] = np.asarray(f(jnp.asarray(theta[idx], jnp.float32), nu))[: e - s]
    return out


def sigma_for_snr(clean: np.ndarray, snr: float) -> float:
    """sigma such that SNR = mean over images of var(clean image over the box) / sigma^2."""
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    return float(np.sqrt(np.mean(np.var(clean.reshape(clean.shape[0], -1), axis=1)) / snr))


def add_noise(
    key: PRNGKeyArray, clean: np.ndarray, sigma: float, batch_size: int = 1024
) -> np.ndarray:
    """clean + sigma N(0, I), batch by batch with keys folded from ``key`` (reproducible from the seed)."""
    out = np.empty_like(clean)
    for b, s in enumerate(range(0, clean.shape[0], batch_size)):
        e = min(clean.shape[0], s + batch_size)
        noise = jax.random.normal(
            jax.random.fold_in(key, b), (e - s,) + clean.shape[1:], jnp.float32
        )
        out[s:e] = clean[s:e] + sigma * np.asarray(noise)
    return out


# --------------------------------------------------------------------------------------------
# Whole data sets: conformations from a distribution, nuisances from the operator's prior,
# noise at a target SNR; chunk by chunk so that large stacks never sit in memory at once.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SimulationPlan:
    """Everything about a simulated data set except its pixels.

    ``theta`` (n, d) float32 is the true CV of every particle (exactly what is rendered),
    ``nuisance`` its pose, shift and CTF (NumPy), ``sigma`` the noise standard deviation,
    ``snr`` the SNR measured on the pilot batch with that sigma, ``noise_key`` the key from
    which image i's noise is drawn as ``normal(fold_in(noise_key, i))`` (so the noise of an
    image does not depend on the chunking).
    """

    theta: np.ndarray
    nuisance: CryoNuisance
    sigma: float
    snr: float
    noise_key: PRNGKeyArray
    pilot_size: int
    noise_colour: RadialNoiseSpectrum | None = None  # unit pixel variance; None: white

    def __len__(self) -> int:
        return int(self.theta.shape[0])


@dataclasses.dataclass
class SimulatedChunk:
    """Images ``start .. start + len(images)`` of a plan: noisy ``images``, noise-free ``clean``."""

    start: int
    images: np.ndarray
    clean: np.ndarray


@dataclasses.dataclass
class SimulatedDataset:
    """An in-memory simulation: the stack (noisy images + nuisances), noise-free images, truth."""

    stack: ParticleStack
    clean: np.ndarray
    theta: np.ndarray
    sigma: float
    snr: float


@eqx.filter_jit
def _render_and_noise(
    operator: CryoEMOperator, theta, nuisance, index, sigma, noise_key, colour=None
):
    clean = jax.vmap(operator.mean)(theta, nuisance)
    shape = clean.shape[1:]

    def noise(i):
        return jax.random.normal(jax.random.fold_in(noise_key, i), shape, clean.dtype)

    white = jax.vmap(noise)(index)
    if colour is not None:  # the noise model's own sampler (cryoem/noise.py), unit pixel sd
        white = colour.colour(white)
    return clean, clean + sigma * white


@eqx.filter_jit
def _sample_nuisance(operator: CryoEMOperator, key, n: int):
    """The operator's nuisance prior, compiled once (eagerly it dispatches dozens of small ops)."""
    return operator.sample_nuisance(key, n)


def _render_range(
    operator, theta, nuisance, sigma, noise_key, start, stop, batch_size, colour=None
):
    D = operator.image_model.box_size
    clean = np.empty((stop - start, D, D), np.float32)
    noisy = np.empty_like(clean)
    sig = jnp.asarray(sigma, jnp.float32)
    for s in range(start, stop, batch_size):
        e = min(stop, s + batch_size)
        # pad to a full batch (repeating the last row) so that one shape is ever compiled
        idx = np.minimum(np.arange(s, s + batch_size), stop - 1)
        nu = jax.tree_util.tree_map(lambda a: jnp.asarray(a[idx]), nuisance)
        c, y = _render_and_noise(
            operator,
            jnp.asarray(theta[idx], jnp.float32),
            nu,
            jnp.asarray(idx, jnp.int32),
            sig,
            noise_key,
            colour,
        )
        clean[s - start : e - start] = np.asarray(c)[: e - s]
        noisy[s - start : e - start] = np.asarray(y)[: e - s]
    return clean, noisy


def plan_simulation(
    key: PRNGKeyArray,
    operator: CryoEMOperator,
    distribution,
    n_images: int,
    *,
    snr: float | None = None,
    sigma: float | None = None,
    pilot_size: int = 256,
    batch_size: int = 128,
    noise_colour: RadialNoiseSpectrum | None = None,
) -> SimulationPlan:
    """Draw the truth and the nuisances, and fix sigma (give exactly one of ``snr``, ``sigma``).

    ``noise_colour``: the noise spectrum's shape (:class:`~cryosip.cryoem.noise.RadialNoiseSpectrum`,
    scaled here to unit pixel variance); the noise is ``sigma`` times noise of that shape, so the
    SNR keeps its meaning. None: white noise.

    ``distribution`` is anything with ``sample(key, n) -> (n, d)`` (see
    :mod:`cryosip.data.distributions`). The key is split into (conformations, nuisances,
    noise). With ``snr``, sigma comes from the first ``pilot_size`` particles of the data set
    rendered noise-free: SNR = mean over images of var(clean) / sigma^2 (:func:`sigma_for_snr`).
    """
    if (snr is None) == (sigma is None):
        raise ValueError("give exactly one of snr and sigma")
    n = int(n_images)
    if n < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    k_theta, k_nu, k_noise = jax.random.split(key, 3)
    theta = np.asarray(distribution.sample(k_theta, n), np.float32).reshape(n, -1)
    dim = operator.conformation.dim
    if theta.shape[1] != dim:
        raise ValueError(
            f"the distribution has dimension {theta.shape[1]}, the conformation model {dim}"
        )
    nuisance = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float32), _sample_nuisance(operator, k_nu, n)
    )
    m = min(n, int(pilot_size))
    pilot, _ = _render_range(operator, theta, nuisance, 0.0, k_noise, 0, m, batch_size)
    if snr is not None:
        sigma = sigma_for_snr(pilot, snr)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    measured = float(np.mean(np.var(pilot.reshape(m, -1), axis=1)) / sigma**2)
    if noise_colour is not None:
        noise_colour = noise_colour.normalised()
    return SimulationPlan(theta, nuisance, sigma, measured, k_noise, m, noise_colour)


def iter_simulation(
    operator: CryoEMOperator,
    plan: SimulationPlan,
    *,
    chunk_size: int = 1000,
    batch_size: int = 128,
    progress: Callable[[int], object] | None = None,
) -> Iterator[SimulatedChunk]:
    """Render and add noise chunk by chunk (``progress(n_done_in_chunk)`` after each chunk).

    The result does not depend on ``chunk_size``; memory is O(chunk_size) images."""
    n = len(plan)
    for start in range(0, n, int(chunk_size)):
        stop = min(n, start + int(chunk_size))
        clean, noisy = _render_range(
            operator,
            plan.theta,
            plan.nuisance,
            plan.sigma,
            plan.noise_key,
            start,
            stop,
            batch_size,
            plan.noise_colour,
        )
        if progress is not None:
            progress(stop - start)
        yield SimulatedChunk(start, noisy, clean)


def simulate_dataset(
    key: PRNGKeyArray,
    operator: CryoEMOperator,
    distribution,
    n_images: int,
    *,
    chunk_size: int = 1000,
    progress: Callable[[int], object] | None = None,
    **plan_options,
) -> SimulatedDataset:
    """Simulate a particle stack in memory (what ``cryosip simulate`` writes to files).

    ``plan_options`` are :func:`plan_simulation`'s keywords (``snr`` or ``sigma``,
    ``pilot_size``, ``batch_size``, ``noise_colour``); ``batch_size`` also batches the
    rendering. Same key and arguments give the same images as the CLI with ``--seed`` (the key
    is ``jax.random.key(seed)``). Returns the noisy stack (with its nuisances), the noise-free
    images and the true CV of each particle."""
    plan = plan_simulation(key, operator, distribution, n_images, **plan_options)
    batch_size = plan_options.get("batch_size", 128)
    D = operator.image_model.box_size
    images = np.empty((len(plan), D, D), np.float32)
    clean = np.empty_like(images)
    chunks = iter_simulation(
        operator, plan, chunk_size=chunk_size, batch_size=batch_size, progress=progress
    )
    for ch in chunks:
        images[ch.start : ch.start + len(ch.images)] = ch.images
        clean[ch.start : ch.start + len(ch.images)] = ch.clean
    pixel_size = operator.image_model.pixel_size
    stack = ParticleStack(images, plan.nuisance, pixel_size, source="simulated")
    return SimulatedDataset(stack, clean, plan.theta, plan.sigma, plan.snr)
