"""The Wasserstein gradient flow fed one streamed minibatch per step (stacks larger than memory).

:func:`run_streaming` runs the same per-step update as :meth:`WassersteinGradientFlow.run`
(the engine's compiled step, ``_run_chunk`` with one step per call: the same objective,
velocity, schedule, displacement cap, entropy, Fisher-Rao weights and non-finite guard, and the
same per-step randomness ``fold_in(key, step)``), but the observations of step ``s`` are the
``s``-th batch of an iterator (typically a :class:`cryosip.data.streaming.MinibatchStream`)
instead of a subsample of arrays held in memory. Every batch must have the same shape (the
stream pads the last batch of an epoch with zero-weight images), so the step compiles once.
With a batch equal to the whole data set every step, the result equals ``flow.run`` with
``batch_size=None`` (tested).

Not supported here (use ``flow.run`` on in-memory data): held-out objectives, checkpoints and
resume (a stream's position is not checkpointed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .discrepancies.base import AbstractDiscrepancy
from .flow import FlowResult, WassersteinGradientFlow, _measure, _run_chunk, _State
from .measure import ParticleMeasure
from .operator import AbstractRandomOperator, Observations

logger = logging.getLogger(__name__)

__all__ = ["run_streaming"]


def run_streaming(
    flow: WassersteinGradientFlow,
    discrepancy: AbstractDiscrepancy,
    operator: AbstractRandomOperator,
    stream: Iterable[Observations],
    init: ParticleMeasure,
    *,
    key: PRNGKeyArray,
    progress=None,
) -> FlowResult:
    """``flow.n_steps`` steps, step ``s`` on the ``s``-th batch of ``stream``.

    ``flow.batch_size`` is ignored (the stream sets the batch); the flow stops early, with the
    remaining records NaN, if the stream runs out.
    """
    step_flow = dataclasses.replace(flow, chunk_size=1, batch_size=None)
    lower, upper = operator.domain
    lower = jnp.asarray(lower, init.positions.dtype)
    upper = jnp.asarray(upper, init.positions.dtype)
    n_rec = flow.n_steps // flow.record_every
    losses = np.full(n_rec, np.nan, np.float32)
    traj = np.full((n_rec,) + init.positions.shape, np.nan, np.float32)
    wtraj = np.full((n_rec, init.n_particles), np.nan, np.float32)
    state = _State(
        init.positions,
        init.log_weights,
        jnp.asarray(0),
        jnp.asarray(1.0, jnp.float32),
        jnp.asarray(0),
    )
    it = iter(stream)
    shape = None
    if progress is not None:
        progress.start(flow.n_steps, 0)
    prev_backoffs = 0
    try:
        for s in range(flow.n_steps):
            try:
                batch = next(it)
            except StopIteration:
                logger.warning("the stream ended after %d of %d steps", s, flow.n_steps)
                break
            if shape is None:
                shape = np.shape(batch.values)
            elif np.shape(batch.values) != shape:
                raise ValueError(
                    f"batch {s} has shape {np.shape(batch.values)}, the first had {shape}: "
                    "streams must yield equal-sized batches (pad with zero weights)"
                )
            state, (ls, ps, ws) = _run_chunk(
                step_flow, discrepancy, operator, batch, key, lower, upper, state
            )
            if s % flow.record_every == 0 and s // flow.record_every < n_rec:
                r = s // flow.record_every
                losses[r], traj[r], wtraj[r] = (
                    np.asarray(ls[0]),
                    np.asarray(ps[0]),
                    np.asarray(ws[0]),
                )
            b = int(state.backoffs)
            if b > prev_backoffs:
                logger.warning(
                    "non-finite step %d skipped; step size halved (now x%.3g)",
                    s,
                    float(state.scale),
                )
                prev_backoffs = b
            if progress is not None:
                progress.update(1, float(ls[0]))
    finally:
        if progress is not None:
            progress.close()
    return FlowResult(
        _measure(state.positions, state.log_weights),
        jnp.asarray(losses),
        jnp.full((n_rec,), jnp.nan, jnp.float32),
        jnp.asarray(traj),
        jnp.asarray(wtraj),
        flow.record_every,
        int(state.backoffs),
    )
