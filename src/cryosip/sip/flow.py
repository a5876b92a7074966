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

import logging
import os
import tempfile
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

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
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=self.desc, leave=self.leave, dynamic_ncols=True
        )

    def update(self, n: int, loss: float):
        self.bar.set_postfix(objective=f"{loss:.6g}")
        self.bar.update(n)

    def advance(self, n: int):
        """Count ``n`` more items done (no objective to show, e.g. while tabulating)."""
        self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _State(eqx.Module):
    positions: Array
    log_weights: Array
    step: Int[Array, ""]
    scale: Float[Array, ""]
    backoffs: Int[Array, ""]


def _schedule(kind: str, step, n_steps: int, decay: float):
    t = step.astype(jnp.float32)
    if kind == "constant":
        return jnp.ones_like(t)
    if kind == "cosine":
        return 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / n_steps, 1.0))) * (1 - decay) + decay
    if kind == "inverse":
        return 1.0 / (1.0 + t / max(1.0, decay * n_steps))
    raise ValueError(f"unknown schedule {kind!r}")


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
        lower, upper = operator.domain
        lower = jnp.asarray(lower, init.positions.dtype)
        upper = jnp.asarray(upper, init.positions.dtype)
        P = init.n_particles
        n_rec = self.n_steps // self.record_every
        losses = np.full(n_rec, np.nan, np.float32)
        held = np.full(n_rec, np.nan, np.float32)
        traj = np.full((n_rec,) + init.positions.shape, np.nan, np.float32)
        wtraj = np.full((n_rec, P), np.nan, np.float32)
        state = _State(
            init.positions,
            init.log_weights,
            jnp.asarray(0),
            jnp.asarray(1.0, jnp.float32),
            jnp.asarray(0),
        )

        if resume and checkpoint is not None and os.path.exists(checkpoint):
            with np.load(checkpoint) as z:
                state = _State(
                    jnp.asarray(z["positions"]),
                    jnp.asarray(z["log_weights"]),
                    jnp.asarray(int(z["step"])),
                    jnp.asarray(z["scale"]),
                    jnp.asarray(int(z["backoffs"])),
                )
                losses[:], held[:], traj[:], wtraj[:] = (
                    z["losses"],
                    z["heldout"],
                    z["trajectory"],
                    z["wtrajectory"],
                )
            logger.info("resumed from %s at step %d", checkpoint, int(state.step))

        def run_chunk(state):
            return _run_chunk(self, discrepancy, operator, observations, key, lower, upper, state)

        held_fn = None
        if heldout is not None:
            held_fn = eqx.filter_jit(
                lambda pos, logw, k: discrepancy(k, operator, _measure(pos, logw), heldout)
            )

        start = int(state.step)
        if progress is not None:
            progress.start(self.n_steps, start)
        prev_backoffs = int(state.backoffs)
        try:
            while int(state.step) < self.n_steps:
                s0 = int(state.step)
                if checkpoint_every and checkpoint_every % self.chunk_size:
                    raise ValueError("checkpoint_every must be a multiple of chunk_size")
                state, (ls, ps, ws) = run_chunk(state)
                n = min(self.chunk_size, self.n_steps - s0)
                ls, ps, ws = np.asarray(ls), np.asarray(ps), np.asarray(ws)
                for j in range(n):
                    s = s0 + j
                    if s % self.record_every == 0 and s // self.record_every < n_rec:
                        r = s // self.record_every
                        losses[r], traj[r], wtraj[r] = ls[j], ps[j], ws[j]
                if (
                    held_fn is not None
                    and self.heldout_every
                    and (
                        int(state.step) % self.heldout_every == 0 or int(state.step) == self.n_steps
                    )
                ):
                    r = min((int(state.step) - 1) // self.record_every, n_rec - 1)
                    held[r] = float(
                        held_fn(
                            state.positions, state.log_weights, jax.random.fold_in(key, 2**31 - 1)
                        )
                    )
                b = int(state.backoffs)
                if b > prev_backoffs:
                    logger.warning(
                        "non-finite step: skipped %d step(s) and halved the step size (now x%.3g)",
                        b - prev_backoffs,
                        float(state.scale),
                    )
                    prev_backoffs = b
                if progress is not None:
                    progress.update(n, float(ls[-1]))
                if (
                    checkpoint is not None
                    and checkpoint_every
                    and int(state.step) % checkpoint_every == 0
                ):
                    _save_checkpoint(checkpoint, state, losses, held, traj, wtraj)
                if stop is not None and stop(int(state.step)):
                    break
        finally:
            if progress is not None:
                progress.close()
        return FlowResult(
            _measure(state.positions, state.log_weights),
            jnp.asarray(losses),
            jnp.asarray(held),
            jnp.asarray(traj),
            jnp.asarray(wtraj),
            self.record_every,
            int(state.backoffs),
        )


@eqx.filter_jit
def _run_chunk(
    flow: WassersteinGradientFlow,
    discrepancy,
    operator,
    observations,
    key,
    lower,
    upper,
    state: _State,
):
    """``flow.chunk_size`` steps in one compiled scan (steps past n_steps leave the state unchanged).

    A module-level jit: repeated runs with the same shapes (bootstrap replicates, resumed runs)
    reuse the compiled program."""
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
            flow.step_size
            * _schedule(flow.schedule, state.step, flow.n_steps, flow.schedule_decay)
            * state.scale
        )
        disp = tau * (-P * gpos)
        if flow.max_displacement is not None:
            norm = jnp.linalg.norm(disp, axis=-1, keepdims=True)
            disp = disp * jnp.minimum(1.0, flow.max_displacement / jnp.maximum(norm, 1e-30))
        if flow.entropy > 0:
            disp = disp + jnp.sqrt(2 * flow.entropy * tau) * jax.random.normal(
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
            new_logw = state.log_weights - jnp.clip(
                flow.fisher_rao * (phi - jnp.sum(w * phi)), -1.0, 1.0
            )
            new_logw = new_logw - jax.scipy.special.logsumexp(new_logw)
        ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(new_pos)) & jnp.all(jnp.isfinite(new_logw))
        active = state.step < flow.n_steps
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


def _save_checkpoint(path, state: _State, losses, held, traj, wtraj):
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
    os.close(fd)
    np.savez(
        tmp,
        positions=np.asarray(state.positions),
        log_weights=np.asarray(state.log_weights),
        step=int(state.step),
        scale=np.asarray(state.scale),
        backoffs=int(state.backoffs),
        losses=losses,
        heldout=held,
        trajectory=traj,
        wtrajectory=wtraj,
    )
    os.replace(tmp, path)
