"""A stochastic inverse problem that is not cryo-EM: exponential decay with a random amplitude.

    x' = -theta x,  x(0) = xi ~ Uniform(a0, a1)   observed at times t_1..t_T with noise sigma:
    y = xi exp(-theta t) + sigma eps.

theta (the decay rate) varies across the population with an unknown distribution rho; xi is a
nuisance (known per observation, like a measured initial dose, or unknown). The same engine
recovers rho. Copy this class to plug in your own operator: implement ``mean``,
``sample_nuisance`` and ``domain``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import promoted_dtype
from .noise import GaussianNoise
from .operator import AbstractRandomOperator


class DecayOperator(AbstractRandomOperator):
    times: jax.Array
    noise: GaussianNoise
    fit_scale: bool = False
    lower_bound: float = eqx.field(static=True, default=0.1)
    upper_bound: float = eqx.field(static=True, default=3.0)
    amplitude_range: tuple[float, float] = eqx.field(static=True, default=(0.5, 1.5))

    def __init__(
        self,
        times=None,
        sigma: float = 0.05,
        lower: float = 0.1,
        upper: float = 3.0,
        amplitude_range=(0.5, 1.5),
    ):
        self.times = jnp.asarray(np.linspace(0.0, 3.0, 16) if times is None else times, jnp.float32)
        self.noise = GaussianNoise(sigma)
        self.fit_scale = False
        self.lower_bound, self.upper_bound = float(lower), float(upper)
        self.amplitude_range = tuple(float(a) for a in amplitude_range)

    def mean(self, theta, nuisance):
        times = self.times.astype(promoted_dtype(theta, self.times))  # float64 theta: float64
        return nuisance * jnp.exp(-theta[0] * times)

    def sample_nuisance(self, key, n):
        lo, hi = self.amplitude_range
        return jax.random.uniform(key, (n,), minval=lo, maxval=hi)

    @property
    def domain(self):
        return jnp.array([self.lower_bound]), jnp.array([self.upper_bound])

    @property
    def obs_size(self) -> int:
        return int(self.times.shape[0])
