"""Ground-truth distributions of the CV on a box domain [lower, upper] subset R^d.

Each distribution has ``sample(key, n) -> (n, d)``, ``pdf(points) -> (m,)`` (the density with
respect to Lebesgue measure on the box, for plots and moment checks), a ``name`` and
``params()`` (JSON-serialisable, recorded in ``config.json``).

**Truncation rule.** The Gaussian, the two-mode mixture, the banana and the ring are
*truncated* to the domain: samples are drawn from the untruncated law and those outside the
box are rejected (redrawn), and ``pdf`` is the untruncated density divided by its mass inside
the box (zero outside). Beta and uniform live on the box by construction; ``Samples`` must lie
inside it (an error otherwise).

``key`` may be a ``jax.random.key``, a NumPy ``Generator`` or an int seed; a JAX key is turned
into a NumPy generator seeded from its key data, so a key gives the same samples every time.

:func:`make_distribution` builds one by name: ``unimodal``/``gaussian``, ``bimodal``,
``skewed``, ``uniform``, ``banana`` and ``ring`` (d = 2) and ``samples:<path.csv>``. Its
defaults are given in coordinates u = (theta - lower) / (upper - lower) in [0, 1]^d and
scaled to the domain; for the AdK path s in [0, 1] the ``bimodal`` default is
0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os

import numpy as np
from scipy import special

from .errors import CryosipInputError


def as_rng(key) -> np.random.Generator:
    """A NumPy generator from a JAX key, a Generator or an int seed (deterministic)."""
    if isinstance(key, np.random.Generator):
        return key
    if isinstance(key, int | np.integer):
        return np.random.default_rng(int(key))
    import jax

    data = (
        np.asarray(jax.random.key_data(key))
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        else np.asarray(key)
    )
    return np.random.default_rng(data.astype(np.uint32).ravel().tolist())


def _norm_pdf(x, mean=0.0, sd=1.0):
    z = (np.asarray(x, np.float64) - mean) / sd
    return np.exp(-0.5 * z * z) / (sd * np.sqrt(2 * np.pi))


def _beta_pdf(u, a, b):
    """Beta(a, b) density on [0, 1] (0 * log 0 = 0 at the ends)."""
    return np.exp(special.xlogy(a - 1, u) + special.xlog1py(b - 1, -u) - special.betaln(a, b))


def _box(lower, upper) -> tuple[np.ndarray, np.ndarray]:
    lo = np.atleast_1d(np.asarray(lower, np.float64))
    hi = np.atleast_1d(np.asarray(upper, np.float64))
    if lo.shape != hi.shape or lo.ndim != 1:
        raise ValueError(f"lower and upper must be 1-D of equal length, got {lo.shape}, {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
        raise ValueError(f"the domain must be a finite box with lower < upper, got {lo}, {hi}")
    return lo, hi


def _as_points(points, dim: int) -> np.ndarray:
    x = np.asarray(points, np.float64)
    if dim == 1 and x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"points must be (m, {dim})" + (" or (m,)" if dim == 1 else "") + f", got {x.shape}"
        )
    return x


def _inside(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.all((x >= lo) & (x <= hi), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractDistribution(abc.ABC):
    """A probability law on the box [lower, upper] (arrays of length dim)."""

    lower: np.ndarray
    upper: np.ndarray

    name = "abstract"

    @property
    def dim(self) -> int:
        """Number of CVs the distribution is over."""
        return int(self.lower.shape[0])

    @abc.abstractmethod
    def sample(self, key, n: int) -> np.ndarray:
        """n i.i.d. draws, shape (n, dim), float64, inside the box."""

    @abc.abstractmethod
    def pdf(self, points) -> np.ndarray:
        """Density at ``points`` ((m, dim), or (m,) when dim = 1); zero outside the box."""

    def params(self) -> dict:
        """JSON-serialisable description (name, box and parameters)."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = np.asarray(v).tolist() if isinstance(v, np.ndarray | tuple | list) else v
        return out


class _Truncated(AbstractDistribution):
    """Rejection sampling from an untruncated law; pdf renormalised by the mass in the box."""

    @abc.abstractmethod
    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray: ...

    @abc.abstractmethod
    def _density(self, x: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _mass(self) -> float:
        """Mass of the untruncated law inside the box."""

    def sample(self, key, n: int) -> np.ndarray:
        rng = as_rng(key)
        n = int(n)
        acc = self._acceptance()
        out, have = np.empty((n, self.dim)), 0
        while have < n:
            m = int(np.ceil(1.2 * (n - have) / acc)) + 16
            x = self._draw(rng, m)
            x = x[_inside(x, self.lower, self.upper)][: n - have]
            out[have : have + len(x)] = x
            have += len(x)
        return out

    def _acceptance(self) -> float:
        acc = self._mass()
        if not acc > 1e-4:
            raise ValueError(f"{self.name}: only {acc:.2g} of the mass lies inside the domain")
        return acc

    def pdf(self, points) -> np.ndarray:
        x = _as_points(points, self.dim)
        return np.where(_inside(x, self.lower, self.upper), self._density(x) / self._mass(), 0.0)


def _normal_mass(mean, sd, lo, hi) -> float:
    return float(np.prod(special.ndtr((hi - mean) / sd) - special.ndtr((lo - mean) / sd)))


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian(_Truncated):
    """N(mean, diag(sd^2)) truncated to the box."""

    mean: np.ndarray
    sd: np.ndarray
    name = "gaussian"

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(
            self, "mean", np.broadcast_to(np.asarray(self.mean, np.float64), lo.shape).copy()
        )
        object.__setattr__(
            self, "sd", np.broadcast_to(np.asarray(self.sd, np.float64), lo.shape).copy()
        )
        if np.any(self.sd <= 0):
            raise ValueError(f"sd must be positive, got {self.sd}")

    def _draw(self, rng, n):
        return self.mean + self.sd * rng.standard_normal((n, self.dim))

    def _density(self, x):
        return np.prod(_norm_pdf(x, self.mean, self.sd), axis=-1)

    @functools.cached_property
    def _mass_value(self) -> float:
        return _normal_mass(self.mean, self.sd, self.lower, self.upper)

    def _mass(self):
        return self._mass_value


@dataclasses.dataclass(frozen=True, eq=False)
class TwoModeMixture(_Truncated):
    """sum_k weights[k] N(means[k], diag(sds[k]^2)) truncated to the box (any number of modes).

    ``means``/``sds``: (K,) for d = 1 or (K, d); ``weights`` (K,), normalised to sum 1.
    """

    means: np.ndarray
    sds: np.ndarray
    weights: np.ndarray
    name = "bimodal"

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        w = np.asarray(self.weights, np.float64).ravel()
        K = w.shape[0]
        means = np.asarray(self.means, np.float64).reshape(K, -1)
        sds = np.asarray(self.sds, np.float64).reshape(K, -1)
        means, sds = (np.broadcast_to(a, (K, lo.shape[0])).copy() for a in (means, sds))
        if np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
        if np.any(sds <= 0):
            raise ValueError(f"sds must be positive, got {sds}")
        for k, v in dict(lower=lo, upper=hi, means=means, sds=sds, weights=w / w.sum()).items():
            object.__setattr__(self, k, v)

    def _draw(self, rng, n):
        comp = rng.choice(self.weights.shape[0], size=n, p=self.weights)
        return self.means[comp] + self.sds[comp] * rng.standard_normal((n, self.dim))

    def _density(self, x):
        dens = [np.prod(_norm_pdf(x, m, s), axis=-1) for m, s in zip(self.means, self.sds)]
        return np.einsum("k,km->m", self.weights, np.stack(dens))

    @functools.cached_property
    def _mass_value(self) -> float:
        return float(
            sum(
                w * _normal_mass(m, s, self.lower, self.upper)
                for w, m, s in zip(self.weights, self.means, self.sds)
            )
        )

    def _mass(self):
        return self._mass_value


@dataclasses.dataclass(frozen=True, eq=False)
class Beta(AbstractDistribution):
    """Independent Beta(a, b) per coordinate, scaled from [0, 1] to the box (skewed if a != b)."""

    a: float = 2.0
    b: float = 5.0
    name = "skewed"

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        if not (self.a > 0 and self.b > 0):
            raise ValueError(f"a and b must be positive, got {self.a}, {self.b}")

    def sample(self, key, n):
        u = as_rng(key).beta(self.a, self.b, size=(int(n), self.dim))
        return self.lower + u * (self.upper - self.lower)

    def pdf(self, points):
        x = _as_points(points, self.dim)
        w = self.upper - self.lower
        u = (x - self.lower) / w
        inside = _inside(x, self.lower, self.upper)
        dens = np.prod(_beta_pdf(np.clip(u, 0, 1), self.a, self.b) / w, axis=-1)
        return np.where(inside, dens, 0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Uniform(AbstractDistribution):
    """Uniform on the box."""

    name = "uniform"

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)

    def sample(self, key, n):
        return self.lower + as_rng(key).random((int(n), self.dim)) * (self.upper - self.lower)

    def pdf(self, points):
        x = _as_points(points, self.dim)
        return np.where(
            _inside(x, self.lower, self.upper), 1.0 / np.prod(self.upper - self.lower), 0.0
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Samples(AbstractDistribution):
    """The empirical law of user-given samples (n0, d): ``sample`` resamples them with
    replacement; ``pdf`` is a Gaussian kernel density estimate (Scott's rule), for plots only
    (it is not renormalised to the box). Every sample must lie inside the box."""

    values: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 1)))
    source: str | None = None
    name = "samples"

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        v = np.asarray(self.values, np.float64)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2 or v.shape[1] != lo.shape[0] or v.shape[0] < 1:
            raise CryosipInputError(
                self.source, f"expected samples of shape (n >= 1, {lo.shape[0]}), got {v.shape}"
            )
        if not np.all(np.isfinite(v)):
            raise CryosipInputError(self.source, "samples contain NaN or infinite values")
        bad = ~_inside(v, lo, hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise CryosipInputError(
                self.source,
                f"{int(bad.sum())} samples lie outside the domain "
                f"[{lo.tolist()}, {hi.tolist()}] (first: row {i}, {v[i].tolist()})",
            )
        for k, val in dict(lower=lo, upper=hi, values=v).items():
            object.__setattr__(self, k, val)

    @classmethod
    def from_csv(cls, path, lower, upper, names: tuple[str, ...] | None = None) -> Samples:
        """Read a CSV: the columns named ``names`` if the header has them all, else every
        numeric column (which must then be exactly d of them). A header is optional."""
        import pandas as pd

        lo, _ = _box(lower, upper)
        d = lo.shape[0]
        if not os.path.exists(path):
            raise CryosipInputError(path, "no such file")
        try:
            df = pd.read_csv(path)
            if all(_is_number(c) for c in df.columns):  # no header row
                df = pd.read_csv(path, header=None)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise CryosipInputError(path, f"cannot parse as CSV ({e})") from None
        if names is not None and all(n in df.columns for n in names):
            df = df[list(names)]
        else:
            df = df.select_dtypes("number")
        if df.shape[1] != d:
            raise CryosipInputError(
                path,
                f"expected {d} numeric column(s)"
                + (f" or columns {list(names)}" if names else "")
                + f", found {list(df.columns)}",
            )
        return cls(lower, upper, values=df.to_numpy(np.float64), source=os.fspath(path))

    def sample(self, key, n):
        idx = as_rng(key).integers(0, self.values.shape[0], size=int(n))
        return self.values[idx].copy()

    def pdf(self, points):
        x = _as_points(points, self.dim)
        if self.values.shape[0] < 2 or np.any(np.std(self.values, axis=0) == 0):
            raise ValueError(
                "a density estimate needs at least two distinct samples in every coordinate"
            )
        from scipy import stats  # (slow to import; only needed here)

        return stats.gaussian_kde(self.values.T)(x.T)

    def params(self):
        return {
            "name": self.name,
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "source": self.source,
            "n_samples": int(self.values.shape[0]),
        }


def _is_number(s) -> bool:
    try:
        float(s)
    except (TypeError, ValueError):
        return False
    return True


class _Shape2D(_Truncated):
    """A 2-D shape defined in unit coordinates u = (theta - lower) / (upper - lower); the
    parameters named in ``_positive`` must be > 0."""

    _positive = ()

    def __post_init__(self):
        lo, hi = _box(self.lower, self.upper)
        if lo.shape[0] != 2:
            raise ValueError(
                f"{self.name} is a 2-D distribution, the domain has dimension {lo.shape[0]}"
            )
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        if not all(getattr(self, p) > 0 for p in self._positive):
            raise ValueError(" and ".join(self._positive) + " must be positive")

    @property
    def _width(self) -> np.ndarray:
        return self.upper - self.lower

    @abc.abstractmethod
    def _draw_unit(self, rng, n) -> np.ndarray: ...

    @abc.abstractmethod
    def _density_unit(self, u) -> np.ndarray: ...

    def _draw(self, rng, n):
        return self.lower + self._draw_unit(rng, n) * self._width

    def _density(self, x):
        return self._density_unit((x - self.lower) / self._width) / np.prod(self._width)

    @functools.cached_property
    def _mass_value(self) -> float:
        # midpoint rule on the unit square (the shapes are smooth; 800^2 nodes: error << 1e-4)
        m = 800
        g = (np.arange(m) + 0.5) / m
        U = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        return float(self._density_unit(U).mean())

    def _mass(self):
        return self._mass_value


@dataclasses.dataclass(frozen=True, eq=False)
class Banana(_Shape2D):
    """In unit coordinates: u1 ~ N(c1, sd1^2) and u2 | u1 ~ N(c2 + curvature (u1 - c1)^2, sd2^2)
    with (c1, c2) = ``center``; truncated to the box."""

    center: tuple[float, float] = (0.5, 0.3)
    sd1: float = 0.18
    sd2: float = 0.05
    curvature: float = 2.0
    name = "banana"
    _positive = ("sd1", "sd2")

    def _draw_unit(self, rng, n):
        c1, c2 = self.center
        u1 = c1 + self.sd1 * rng.standard_normal(n)
        u2 = c2 + self.curvature * (u1 - c1) ** 2 + self.sd2 * rng.standard_normal(n)
        return np.stack([u1, u2], -1)

    def _density_unit(self, u):
        c1, c2 = self.center
        return _norm_pdf(u[:, 0], c1, self.sd1) * _norm_pdf(
            u[:, 1], c2 + self.curvature * (u[:, 0] - c1) ** 2, self.sd2
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Ring(_Shape2D):
    """In unit coordinates: a Gaussian ridge of the given ``radius`` and ``width`` around
    ``center``, density proportional to exp(-(|u - c| - radius)^2 / (2 width^2)) (so the
    radius has density proportional to r N(r; radius, width), and the angle is uniform);
    truncated to the box."""

    center: tuple[float, float] = (0.5, 0.5)
    radius: float = 0.3
    width: float = 0.05
    name = "ring"
    _positive = ("radius", "width")

    def _draw_unit(self, rng, n):
        # radius ~ r N(r; radius, width) on r > 0: propose from N(radius, width), accept with
        # probability r / r_max (r_max = radius + 10 width; the mass beyond it is < 1e-22)
        r_max = self.radius + 10 * self.width
        r = self.radius + self.width * rng.standard_normal(n)
        keep = (r > 0) & (rng.random(n) * r_max < r)
        r = np.where(keep, r, np.nan)  # rejected proposals are dropped like points outside the box
        phi = rng.uniform(0, 2 * np.pi, n)
        return np.asarray(self.center) + r[:, None] * np.stack([np.cos(phi), np.sin(phi)], -1)

    def _density_unit(self, u):
        r = np.linalg.norm(u - np.asarray(self.center), axis=-1)
        t = self.radius / self.width
        norm = 2 * np.pi * (self.radius * special.ndtr(t) + self.width * _norm_pdf(t))
        return _norm_pdf(r, self.radius, self.width) / norm


DISTRIBUTIONS = (
    "unimodal",
    "gaussian",
    "bimodal",
    "skewed",
    "uniform",
    "banana",
    "ring",
    "samples:<path>",
)


def make_distribution(
    name: str, lower, upper, *, names: tuple[str, ...] | None = None, **kw
) -> AbstractDistribution:
    """A distribution by name on the box [lower, upper] (see the module docstring).

    Defaults, in unit coordinates u in [0, 1]^d (then scaled to the box):
    ``unimodal``/``gaussian``: N(0.5, 0.12^2) per coordinate (``mean``, ``sd`` override, in
    domain units); ``bimodal``: 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2) for d = 1, and for
    d = 2 the same weights and sds with means (0.25, 0.7) and (0.72, 0.3) (``means``, ``sds``,
    ``weights`` override, in domain units); ``skewed``: Beta(2, 5) (``a``, ``b``);
    ``uniform``; ``banana``/``ring`` (d = 2; keywords of :class:`Banana`/:class:`Ring`, in
    unit coordinates); ``samples:<path>``: a CSV of samples (columns ``names`` if present).
    """
    lo, hi = _box(lower, upper)
    d, w = lo.shape[0], hi - lo
    key = name.strip().lower()

    def scale(u):
        return lo + np.asarray(u, np.float64) * w

    if key.startswith("samples:"):
        if kw:
            raise ValueError(f"samples takes no parameters, got {sorted(kw)}")
        return Samples.from_csv(name.strip()[len("samples:") :], lo, hi, names)
    if key in ("unimodal", "gaussian"):
        mean = kw.pop("mean", scale(np.full(d, 0.5)))
        sd = kw.pop("sd", 0.12 * w)
        _no_extra(key, kw)
        out = Gaussian(lo, hi, mean, sd)
    elif key == "bimodal":
        means_u = np.array([[0.25], [0.72]]) if d == 1 else np.array([[0.25, 0.7], [0.72, 0.3]])
        if d > 2:
            means_u = np.stack([np.full(d, 0.25), np.full(d, 0.72)])
        means = kw.pop("means", scale(means_u))
        sds = kw.pop("sds", np.array([[0.07], [0.06]]) * w)
        weights = kw.pop("weights", (0.6, 0.4))
        _no_extra(key, kw)
        out = TwoModeMixture(lo, hi, means, sds, weights)
    elif key == "skewed":
        out = Beta(lo, hi, **kw)
    elif key == "uniform":
        _no_extra(key, kw)
        out = Uniform(lo, hi)
    elif key == "banana":
        out = Banana(lo, hi, **_tuples(kw))
    elif key == "ring":
        out = Ring(lo, hi, **_tuples(kw))
    else:
        raise ValueError(f"unknown distribution {name!r}; choose from {', '.join(DISTRIBUTIONS)}")
    if key == "unimodal":
        object.__setattr__(out, "name", "unimodal")
    return out


def _no_extra(name, kw):
    if kw:
        raise ValueError(f"{name}: unexpected parameters {sorted(kw)}")


def _tuples(kw):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
