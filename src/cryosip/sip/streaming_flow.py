"""The Wasserstein gradient flow fed one streamed minibatch per step (stacks larger than memory).

:func:`run_streaming` is :meth:`WassersteinGradientFlow.run` with a different source of
observations: the same compiled step (``_run_chunk`` with one step per call: the same objective,
velocity, schedule, displacement cap, entropy, Fisher-Rao weights and non-finite guard, and the
same per-step randomness ``fold_in(key, step)``), the same outer loop (:func:`~.flow.drive`:
records, back-off warnings, progress, checkpoints) and the same checkpoint file, but the
observations of step ``s`` are the ``s``-th batch of a stream (typically a
:class:`cryosip.data.streaming.MinibatchStream`) instead of a subsample of arrays held in
memory. Every batch must have the same shape (the stream pads the last batch of an epoch with
zero-weight images), so the step compiles once. With a batch equal to the whole data set every
step, the result equals ``flow.run`` with ``batch_size=None`` (tested).

Checkpoints: every ``checkpoint_every`` steps the particles, weights, step, step-size scale and
back-off count, the records and the *stream position* (batches consumed: the batches are a
deterministic function of the stream's key, so a count is enough) are written atomically with
:func:`~.flow.save_checkpoint`, plus ``checkpoint_tag`` arrays (the keys, the stream's layout)
that a resume checks. A resumed run asks its stream factory for a stream starting at the saved
position and ends with the same particles as an uninterrupted one.

Several processes (``jax.distributed``): call it in every process with the same arguments and
a stream whose batches are global arrays (each process reads its own rows). Only process 0
writes checkpoints; on resume process 0 reads the checkpoint and broadcasts it.

Not supported here (use ``flow.run`` on in-memory data): held-out objectives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from .discrepancies.base import AbstractDiscrepancy
from .flow import (
    FlowResult,
    WassersteinGradientFlow,
    _Records,
    _run_chunk,
    _start,
    _State,
    drive,
    load_checkpoint,
)
from .measure import ParticleMeasure
from .operator import AbstractRandomOperator, Observations

logger = logging.getLogger(__name__)

__all__ = ["run_streaming"]

StreamFactory = Callable[[int], Iterable[Observations]]


def _place_like(value, like):
    """``value`` (host array) with the sharding of ``like`` when that spans several processes."""
    sh = getattr(like, "sharding", None)
    if sh is not None and not sh.is_fully_addressable:
        return jax.device_put(np.asarray(value), sh)
    return jnp.asarray(value)


def _restore(checkpoint, records: _Records, state: _State, tag: dict) -> _State:
    """The state of ``checkpoint`` (process 0 reads it, every process gets it)."""
    from .sharding import broadcast_from_first_process

    multi = jax.process_count() > 1
    first = jax.process_index() == 0
    have = first and os.path.exists(checkpoint)
    if multi:
        have = bool(broadcast_from_first_process(np.int32(have)))
    if not have:
        return state
    # every process's placeholder (the initial state); process 0 reads the checkpoint's
    src = _State(state.positions, state.log_weights, np.int32(0), np.float32(1.0), np.int32(0))
    if first:
        src, extra = load_checkpoint(checkpoint, records)
        for name, want in tag.items():
            got = extra.get(name)
            if got is None or np.shape(got) != np.shape(want) or not np.array_equal(got, want):
                raise ValueError(
                    f"{checkpoint} was written by a different run ({name} differs: "
                    f"{np.asarray(got).tolist() if got is not None else 'missing'} vs "
                    f"{np.asarray(want).tolist()}); remove it or resume with the same settings"
                )
        pos = int(extra.get("stream_position", src.step))
        if pos != int(src.step):
            raise ValueError(f"{checkpoint}: stream position {pos} != step {int(src.step)}")
    host = _State(
        np.asarray(src.positions, state.positions.dtype),
        np.asarray(src.log_weights, state.log_weights.dtype),
        np.int32(src.step),
        np.float32(src.scale),
        np.int32(src.backoffs),
    )
    if multi:
        host, arrays = broadcast_from_first_process((host, records.arrays))
        for mine, got in zip(records.arrays, arrays):
            mine[:] = got
    logger.info("resumed from %s at step %d", checkpoint, int(host.step))
    return jax.tree_util.tree_map(_place_like, host, state)


def run_streaming(
    flow: WassersteinGradientFlow,
    discrepancy: AbstractDiscrepancy,
    operator: AbstractRandomOperator,
    stream: Iterable[Observations] | StreamFactory,
    init: ParticleMeasure,
    *,
    key: PRNGKeyArray,
    progress=None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    checkpoint_tag: dict | None = None,
    stop: Callable[[int], bool] | None = None,
) -> FlowResult:
    """``flow.n_steps`` steps, step ``s`` on the ``s``-th batch of ``stream``.

    ``stream``: an iterable of equal-shaped ``Observations`` batches, or a factory
    ``start -> iterable`` whose iterable begins at batch ``start`` (needed to resume).
    ``flow.batch_size`` and ``flow.chunk_size`` are ignored (the stream sets the batch; one step
    per compiled call); the flow stops early, with the remaining records NaN, if the stream runs
    out. ``checkpoint``/``checkpoint_every``/``resume``: as in ``flow.run`` (any
    ``checkpoint_every`` >= 1); ``checkpoint_tag``: arrays saved with the checkpoint that a
    resume must match (e.g. the keys, the batch size). ``stop(step)`` True ends the run early.
    """
    step_flow = dataclasses.replace(flow, chunk_size=1, batch_size=None)
    place = lambda v: _place_like(v, init.positions)  # noqa: E731
    lower, upper, records, state = _start(flow, operator, init, place)
    tag = {k: np.asarray(v) for k, v in (checkpoint_tag or {}).items()}
    if resume and checkpoint is not None:
        state = _restore(checkpoint, records, state, tag)
    start = int(state.step)
    if callable(stream) and not hasattr(stream, "__iter__"):
        it = iter(stream(start))
    else:
        if start:
            raise ValueError("resuming a streamed flow needs a stream factory (start -> stream)")
        it = iter(stream)
    shape = None

    def advance(state):
        nonlocal shape
        try:
            batch = next(it)
        except StopIteration:
            logger.warning("the stream ended after %d of %d steps", int(state.step), flow.n_steps)
            return None
        if shape is None:
            shape = np.shape(batch.values)
        elif np.shape(batch.values) != shape:
            raise ValueError(
                f"batch {int(state.step)} has shape {np.shape(batch.values)}, the first had "
                f"{shape}: streams must yield equal-sized batches (pad with zero weights)"
            )
        return _run_chunk(step_flow, discrepancy, operator, batch, key, lower, upper, state)

    return drive(
        step_flow,
        state,
        records,
        advance,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        stop=stop,
        checkpoint_extra=lambda st: {"stream_position": int(st.step), **tag},
        write_checkpoint=jax.process_index() == 0,
    )
