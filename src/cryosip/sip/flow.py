"""Wasserstein gradient flow of J(rho) = D(mu[rho], nu_N), solved with particles.

    d/dt rho = div(rho grad dJ/drho)  (+ alpha Laplacian rho with an entropy term)

With equal-weight particles and the nuisance/noise draws frozen inside one step, particle i's
velocity is -P * grad_{theta_i} J_hat(theta_1..theta_P): one reverse-mode pass through the
simulator gives every velocity. Steps: explicit Euler, or Euler-Maruyama with entropy weight
alpha (theta += tau v + sqrt(2 alpha tau) Z). Particles are reflected at the domain boundary.
Options: minibatches of observations and fresh nuisance draws each step, a step-size schedule,
a displacement guard (a step that is non-finite is skipped and the step size halved; a particle
that would move more than ``max_displacement`` is slowed to that), Wasserstein-Fisher-Rao
weight updates (log w_i -= eta * (Phi_i - <Phi>), Phi_i = dJ/dw_i, eta = ``fisher_rao`` per step), a held-out discrepancy,
checkpoints and an exact resume (every step's randomness is ``fold_in(key, step)``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .._atomic import atomic_path
from ._dtypes import promoted_dtype
from .discrepancies.base import AbstractDiscrepancy
from .measure import ParticleMeasure
from .operator import AbstractRandomOperator, Observations, reflect_into

logger = logging.getLogger(__name__)


class FlowResult(eqx.Module):
    """Outcome of a flow. ``losses``/``heldout`` have length n_steps // record_every, NaN where not reached."""

    measure: ParticleMeasure
    losses: Float[Array, " n_records"]
    heldout: Float[Array, " n_records"]
    trajectory: Float[Array, "n_records n_particles dim"]
    log_weight_trajectory: Float[Array, "n_records n_particles"]
    record_every: int = eqx.field(static=True)
    n_backoffs: int = eqx.field(static=True)

    @property
    def n_steps_taken(self) -> int:
        """Steps run (recorded objective values times ``record_every``)."""
        return int(np.sum(np.isfinite(np.asarray(self.losses)))) * self.record_every

    @property
    def converged(self) -> Bool[Array, ""]:
        """Relative change of the mean recorded objective between the last two tenths < 1e-3 of its spread."""
        x = np.asarray(self.losses)
        x = x[np.isfinite(x)]
        if x.size < 20:
            return jnp.asarray(False)
        k = max(2, x.size // 10)
        spread = max(float(np.ptp(x)), 1e-12)
        return jnp.asarray(abs(x[-k:].mean() - x[-2 * k : -k].mean()) < 1e-2 * spread)


class TqdmProgress:
    """A progress meter: a tqdm bar showing the objective (the default for the CLI)."""

    def __init__(self, desc: str = "flow", leave: bool = True):
        self.desc, self.leave, self.bar = desc, leave, None

    def start(self, total: int, initial: int = 0):
        """Open the bar for ``total`` steps, ``initial`` of them already done (a resumed run)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=self.desc, leave=self.leave, dynamic_ncols=True
        )

    def update(self, n: int, loss: float):
        """Count ``n`` more steps and show the latest objective."""
        self.bar.set_postfix(objective=f"{loss:.6g}")
        self.bar.update(n)

    def advance(self, n: int):
        """Count ``n`` more items done (no objective to show, e.g. while tabulating)."""
        self.bar.update(n)

    def close(self):
        """Close the bar (no-op if it was never started)."""
        if self.bar is not None:
            self.bar.close()


class _State(eqx.Module):
    positions: Array
    log_weights: Array
    step: Int[Array, ""]
    scale: Float[Array, ""]
    backoffs: Int[Array, ""]


def _schedule(kind: str, step, inv_horizon, decay, keep):
    """Step-size factor at ``step``. ``inv_horizon``: 1 / n_steps (cosine) or
    1 / max(1, decay * n_steps) (inverse), in float32; ``keep`` = 1 - decay. Traced scalars, so
    that the run's length is not compiled in. A product with the reciprocal, not a quotient:
    XLA compiled ``t / n_steps`` with a constant ``n_steps`` as ``t * (1 / n_steps)``, and this
    keeps those steps to the bit (a quotient moved the default reconstruct's particles by 5e-3)."""
    t = step.astype(jnp.float32)
    if kind == "constant":
        return jnp.ones_like(t)
    if kind == "cosine":
        return 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t * inv_horizon, 1.0))) * keep + decay
    if kind == "inverse":
        return 1.0 / (1.0 + t * inv_horizon)
    raise ValueError(f"unknown schedule {kind!r}")


class _Knobs(eqx.Module):
    """The flow's numbers as traced scalars (:func:`_run_chunk`): runs that differ only in them
    (a bootstrap replicate's shorter ``n_steps``, another data set's step size) share one
    compiled chunk."""

    n_steps: Int[Array, ""]
    inv_horizon: Float[Array, ""]
    decay: Float[Array, ""]
    keep: Float[Array, ""]
    step_size: Float[Array, ""]
    max_displacement: Float[Array, ""]
    entropy: Float[Array, ""]
    fisher_rao: Float[Array, ""]


def _split_flow(flow) -> tuple:
    """(the flow with its numbers replaced by placeholders that keep every branch, the numbers
    as :class:`_Knobs`). The values are rounded to float32 on the host as the Python constants
    were when they were compiled in, so the steps are the same."""
    n, decay = int(flow.n_steps), float(flow.schedule_decay)
    horizon = max(1.0, decay * n) if flow.schedule == "inverse" else float(n)
    f32 = lambda v: jnp.asarray(np.float32(v))  # noqa: E731
    knobs = _Knobs(
        jnp.asarray(np.int32(n)),
        jnp.asarray(np.float32(1.0) / np.float32(horizon)),
        f32(decay),
        f32(1 - decay),
        f32(flow.step_size),
        f32(0.0 if flow.max_displacement is None else flow.max_displacement),
        f32(flow.entropy),
        f32(flow.fisher_rao),
    )
    shape = dataclasses.replace(
        flow,
        step_size=0.0,
        n_steps=0,
        schedule_decay=0.0,
        max_displacement=None if flow.max_displacement is None else 1.0,
        entropy=1.0 if flow.entropy > 0 else 0.0,
        fisher_rao=1.0 if flow.fisher_rao > 0 else 0.0,
        record_every=1,
        heldout_every=0,
    )
    return shape, knobs


class WassersteinGradientFlow(eqx.Module):
    """Particle discretisation of the Wasserstein(-Fisher-Rao) gradient flow of a discrepancy.

    ``step_size`` is in units of theta per unit velocity; ``max_displacement`` caps one particle's
    move per step (in theta units; None: no cap). ``batch_size`` None uses every observation each
    step. ``entropy`` > 0 switches to Euler-Maruyama. ``fisher_rao`` > 0 also moves the weights.
    """

    step_size: float = 1e-2
    n_steps: int = 300
    batch_size: int | None = None
    entropy: float = 0.0
    schedule: str = "cosine"
    schedule_decay: float = 0.05
    max_displacement: float | None = None
    fisher_rao: float = 0.0
    record_every: int = 1
    chunk_size: int = 25
    heldout_every: int = 0

    def run(
        self,
        discrepancy: AbstractDiscrepancy,
        operator: AbstractRandomOperator,
        observations: Observations,
        init: ParticleMeasure,
        *,
        key: PRNGKeyArray,
        heldout: Observations | None = None,
        progress=None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        stop: Callable[[int], bool] | None = None,
    ) -> FlowResult:
        """Run the flow. ``stop(step)`` returning True ends it early (used to test resume)."""
        lower, upper, records, state = _start(self, operator, init)
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            state, _ = load_checkpoint(checkpoint, records)
            logger.info("resumed from %s at step %d", checkpoint, int(state.step))
        if checkpoint_every and checkpoint_every % self.chunk_size:
            raise ValueError("checkpoint_every must be a multiple of chunk_size")

        def advance(state):
            return _run_chunk(self, discrepancy, operator, observations, key, lower, upper, state)

        held_fn = None
        if heldout is not None:
            held_fn = eqx.filter_jit(
                lambda pos, logw, k: discrepancy(k, operator, _measure(pos, logw), heldout)
            )

        def after_chunk(state):
            if (
                held_fn is not None
                and self.heldout_every
                and (int(state.step) % self.heldout_every == 0 or int(state.step) == self.n_steps)
            ):
                r = min((int(state.step) - 1) // self.record_every, len(records.heldout) - 1)
                records.heldout[r] = float(
                    held_fn(state.positions, state.log_weights, jax.random.fold_in(key, 2**31 - 1))
                )

        return drive(
            self,
            state,
            records,
            advance,
            progress=progress,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            stop=stop,
            after_chunk=after_chunk,
        )


def _start(flow: WassersteinGradientFlow, operator, init: ParticleMeasure, scalar=jnp.asarray):
    """(lower, upper) in the particles' dtype, NaN records and the initial state of a run;
    ``scalar`` places the state's step, scale and back-off count (int32/float32, not
    weak-typed: the chunk's output carry is int32, and a weak input would compile twice)."""
    lower, upper = (jnp.asarray(b, init.positions.dtype) for b in operator.domain)
    n_rec = flow.n_steps // flow.record_every
    nan = lambda *shape: np.full(shape, np.nan, np.float32)  # noqa: E731
    records = _Records(
        nan(n_rec), nan(n_rec), nan(n_rec, *init.positions.shape), nan(n_rec, init.n_particles)
    )
    zero, one = scalar(np.int32(0)), scalar(np.float32(1.0))
    return lower, upper, records, _State(init.positions, init.log_weights, zero, one, zero)


def _run_chunk(flow: WassersteinGradientFlow, *args):
    """``flow.chunk_size`` steps in one compiled scan (steps past n_steps leave the state
    unchanged); ``args`` = (discrepancy, operator, observations, key, lower, upper, state).

    The compiled program is module-level and sees the flow's numbers (step count, step size,
    schedule decay, displacement cap, entropy, Fisher-Rao rate) as traced values: repeated runs
    with the same shapes (bootstrap replicates with their shorter ``n_steps``, resumed runs,
    held-out runs) reuse it."""
    shape, knobs = _split_flow(flow)
    return _run_chunk_compiled(shape, knobs, *args)


@eqx.filter_jit
def _run_chunk_compiled(
    flow: WassersteinGradientFlow,
    knobs: _Knobs,
    discrepancy,
    operator,
    observations,
    key,
    lower,
    upper,
    state: _State,
):
    n_obs = len(observations)
    P = state.positions.shape[0]

    def objective(pos, logw, obs, k):
        return discrepancy(k, operator, _measure(pos, logw), obs)

    def one_step(state: _State, _):
        k = jax.random.fold_in(key, state.step)
        kb, kd, kn = jax.random.split(k, 3)
        if flow.batch_size is None or flow.batch_size >= n_obs:
            obs = observations
        else:
            idx = jax.random.choice(kb, n_obs, (flow.batch_size,), replace=False)
            obs = observations.take(idx)
        loss, (gpos, glogw) = jax.value_and_grad(objective, argnums=(0, 1))(
            state.positions, state.log_weights, obs, kd
        )
        tau = (
            knobs.step_size
            * _schedule(flow.schedule, state.step, knobs.inv_horizon, knobs.decay, knobs.keep)
            * state.scale
        )
        # the knobs are float32: cast where they meet float64 particles (x64)
        dtype = promoted_dtype(tau, gpos)
        disp = tau.astype(dtype) * (-P * gpos)
        if flow.max_displacement is not None:
            norm = jnp.linalg.norm(disp, axis=-1, keepdims=True)
            cap = knobs.max_displacement.astype(promoted_dtype(knobs.max_displacement, norm))
            disp = disp * jnp.minimum(1.0, cap / jnp.maximum(norm, 1e-30))
        if flow.entropy > 0:
            disp = disp + jnp.sqrt(2 * knobs.entropy * tau).astype(dtype) * jax.random.normal(
                kn, disp.shape, disp.dtype
            )
        new_pos = reflect_into(state.positions + disp, lower, upper)
        new_logw = state.log_weights
        if flow.fisher_rao > 0:
            w = jnp.exp(state.log_weights)
            phi = glogw / jnp.maximum(w, 1e-30)  # dJ/dw_i (log-weights chain rule)
            # a step of size fisher_rao along the Fisher-Rao gradient (independent of the transport step):
            # for KL, phi_i = -R_i / w_i (R_i: responsibility mass), so fisher_rao = 1 is an EM-like update
            # guard: at most a factor e per step, whatever the objective's scale
            rate = knobs.fisher_rao.astype(promoted_dtype(knobs.fisher_rao, phi))
            new_logw = state.log_weights - jnp.clip(rate * (phi - jnp.sum(w * phi)), -1.0, 1.0)
            new_logw = new_logw - jax.scipy.special.logsumexp(new_logw)
        ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(new_pos)) & jnp.all(jnp.isfinite(new_logw))
        active = state.step < knobs.n_steps
        take = ok & active
        new_state = _State(
            jnp.where(take, new_pos, state.positions),
            jnp.where(take, new_logw, state.log_weights),
            state.step + active.astype(state.step.dtype),
            jnp.where(ok | ~active, state.scale, 0.5 * state.scale),
            state.backoffs + (~ok & active).astype(jnp.int32),
        )
        return new_state, (loss, state.positions, state.log_weights)

    return jax.lax.scan(one_step, state, None, length=flow.chunk_size)


def _measure(pos, logw) -> ParticleMeasure:
    m = object.__new__(ParticleMeasure)
    object.__setattr__(m, "positions", pos)
    object.__setattr__(m, "log_weights", logw)
    return m


@dataclasses.dataclass
class _Records:
    """The per-record arrays of a run (NaN where not reached), filled in place."""

    losses: np.ndarray
    heldout: np.ndarray
    trajectory: np.ndarray
    wtrajectory: np.ndarray

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.losses, self.heldout, self.trajectory, self.wtrajectory

    def put(self, s0: int, n: int, record_every: int, ls, ps, ws) -> None:
        """Store steps ``s0 .. s0 + n - 1`` of a chunk's outputs (every ``record_every``-th)."""
        ls, ps, ws = np.asarray(ls), np.asarray(ps), np.asarray(ws)
        n_rec = self.losses.shape[0]
        for j in range(n):
            s = s0 + j
            if s % record_every == 0 and s // record_every < n_rec:
                r = s // record_every
                self.losses[r], self.trajectory[r], self.wtrajectory[r] = ls[j], ps[j], ws[j]


def drive(
    flow: WassersteinGradientFlow,
    state: _State,
    records: _Records,
    advance: Callable,
    *,
    progress=None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    stop: Callable[[int], bool] | None = None,
    after_chunk: Callable[[_State], None] | None = None,
    checkpoint_extra: Callable[[_State], dict] | None = None,
    write_checkpoint: bool = True,
) -> FlowResult:
    """The flow's outer loop, shared by :meth:`WassersteinGradientFlow.run` and
    :func:`cryosip.sip.streaming_flow.run_streaming`: ``advance(state)`` runs the next compiled
    chunk (``(state, (losses, positions, log_weights))``, or None when its data ran out); this
    records it, warns about skipped non-finite steps, updates ``progress``, writes a checkpoint
    every ``checkpoint_every`` steps (with ``checkpoint_extra(state)``'s arrays; only where
    ``write_checkpoint``), stops when ``stop(step)`` says so and returns the run's result."""
    if progress is not None:
        progress.start(flow.n_steps, int(state.step))
    prev_backoffs = int(state.backoffs)
    try:
        while int(state.step) < flow.n_steps:
            s0 = int(state.step)
            out = advance(state)
            if out is None:
                break
            state, (ls, ps, ws) = out
            n = min(flow.chunk_size, flow.n_steps - s0)
            records.put(s0, n, flow.record_every, ls, ps, ws)
            if after_chunk is not None:
                after_chunk(state)
            b = int(state.backoffs)
            if b > prev_backoffs:
                logger.warning(
                    "non-finite step: skipped %d step(s) and halved the step size (now x%.3g)",
                    b - prev_backoffs,
                    float(state.scale),
                )
                prev_backoffs = b
            if progress is not None:
                progress.update(n, float(np.asarray(ls)[n - 1]))
            step = int(state.step)
            if (
                checkpoint is not None
                and checkpoint_every
                and write_checkpoint
                and step % checkpoint_every == 0
            ):
                extra = checkpoint_extra(state) if checkpoint_extra is not None else {}
                save_checkpoint(checkpoint, state, records, **extra)
            if stop is not None and stop(step):
                break
    finally:
        if progress is not None:
            progress.close()
    return FlowResult(
        _measure(state.positions, state.log_weights),
        *(jnp.asarray(a) for a in records.arrays),
        flow.record_every,
        int(state.backoffs),
    )


def save_checkpoint(path, state: _State, records: _Records, **extra) -> None:
    """Write the flow's state and records (and ``extra`` arrays) to ``path`` atomically."""
    with atomic_path(path, ".npz") as tmp:
        np.savez(
            tmp,
            positions=np.asarray(state.positions),
            log_weights=np.asarray(state.log_weights),
            step=int(state.step),
            scale=np.asarray(state.scale),
            backoffs=int(state.backoffs),
            losses=records.losses,
            heldout=records.heldout,
            trajectory=records.trajectory,
            wtrajectory=records.wtrajectory,
            **{k: np.asarray(v) for k, v in extra.items()},
        )


_STATE_KEYS = (
    "positions",
    "log_weights",
    "step",
    "scale",
    "backoffs",
    "losses",
    "heldout",
    "trajectory",
    "wtrajectory",
)


def load_checkpoint(path, records: _Records) -> tuple[_State, dict]:
    """The state in a checkpoint of :func:`save_checkpoint`; fills ``records`` in place and
    returns the extra arrays."""
    with np.load(path) as z:
        state = _State(
            jnp.asarray(z["positions"]),
            jnp.asarray(z["log_weights"]),
            jnp.asarray(int(z["step"]), jnp.int32),
            jnp.asarray(z["scale"], jnp.float32),
            jnp.asarray(int(z["backoffs"]), jnp.int32),
        )
        records.losses[:], records.heldout[:] = z["losses"], z["heldout"]
        records.trajectory[:], records.wtrajectory[:] = z["trajectory"], z["wtrajectory"]
        extra = {k: z[k] for k in z.files if k not in _STATE_KEYS}
    return state, extra
