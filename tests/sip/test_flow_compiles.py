"""The flow's compiled chunk is shared by runs that differ only in their numbers.

A bootstrap replicate runs the main flow's settings with a shorter ``n_steps``; runs on other
data get another step size. Both reuse the compiled chunk (the numbers are traced), and a run's
second chunk reuses its first's (the step counter is int32, not weak-typed). The results are
those of a flow with the numbers compiled in: ``test_engine`` and ``test_resume`` pin them."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from cryosip.sip.discrepancies import KL
from cryosip.sip.examples import DecayOperator
from cryosip.sip.flow import WassersteinGradientFlow
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.operator import Observations


def _data(n=200):
    op = DecayOperator(sigma=0.1)
    k = jax.random.split(jax.random.key(3), 3)
    th = 0.5 + 2.0 * jax.random.uniform(k[0], (n, 1))
    nu = op.sample_nuisance(k[1], n)
    return op, Observations(op.sample(k[2], th, nu), nu)


def _chunk_compiles(records) -> int:
    return sum(
        "Finished XLA compilation" in r.getMessage() and "_run_chunk" in r.getMessage()
        for r in records
    )


def test_replicates_and_other_numbers_reuse_the_compiled_chunk(caplog):
    op, obs = _data()
    init = ParticleMeasure(jnp.linspace(0.3, 2.7, 12)[:, None])
    # chunk_size 7: a shape no other test compiles, so the first run below compiles once
    flow = WassersteinGradientFlow(
        step_size=2e-3, n_steps=35, chunk_size=7, max_displacement=0.05, fisher_rao=0.3
    )
    caplog.set_level(logging.WARNING, logger="jax._src.dispatch")
    with jax.log_compiles(True):
        full = flow.run(KL(), op, obs, init, key=jax.random.key(0))
        first = _chunk_compiles(caplog.records)
        caplog.clear()
        short = dataclasses.replace(flow, n_steps=14, step_size=3e-3, max_displacement=0.04)
        counts = jnp.asarray(np.arange(len(obs)) % 3, jnp.float32)
        boot = short.run(KL(), op, obs.with_weight(counts), full.measure, key=jax.random.key(1))
        again = _chunk_compiles(caplog.records)
    assert first == 1, "a run's chunks compiled more than once"
    assert again == 0, "a shorter run with other step sizes compiled the chunk again"
    assert boot.n_steps_taken == 14
    assert np.all(np.isfinite(np.asarray(boot.losses)))
