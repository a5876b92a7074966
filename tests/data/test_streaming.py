"""Streaming minibatches from memory-mapped stacks, and the flow fed one minibatch per step."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryosip.data.mrc import MrcsWriter, read_mrcs
from cryosip.data.particles import ParticleStack
from cryosip.data.streaming import (
    DiskRows,
    MinibatchStream,
    epoch_batches,
    release_pages,
    spill_rows,
)
from cryosip.sip.discrepancies import KL
from cryosip.sip.examples import DecayOperator
from cryosip.sip.flow import WassersteinGradientFlow
from cryosip.sip.measure import ParticleMeasure
from cryosip.sip.operator import Observations
from cryosip.sip.streaming_flow import run_streaming

N, D = 103, 8


class GuardedImages:
    """An image source that records every read and refuses to be loaded whole."""

    def __init__(self, base):
        self.base = base
        self.shape = base.shape
        self.ndim = base.ndim
        self.reads: list[int] = []
        self.lock = threading.Lock()

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise AssertionError(f"unexpected index {idx!r}")
        with self.lock:
            self.reads.append(int(idx.size))
        return self.base[idx]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole stack was converted to an array")


@pytest.fixture
def stack_path(tmp_path):
    path = tmp_path / "noise.mrcs"
    rng = np.random.default_rng(0)
    with MrcsWriter(path, N, D, 2.0) as w:
        for s in range(0, N, 40):
            w.write(rng.normal(size=(min(40, N - s), D, D)).astype(np.float32))
    return path


def test_epoch_batches_are_permutations_with_zero_weight_padding():
    idx, w = epoch_batches(jax.random.key(0), 10, 4)
    assert idx.shape == w.shape == (3, 4)
    np.testing.assert_array_equal(np.sort(idx[w > 0]), np.arange(10))
    assert w.sum() == 10 and np.all(np.diff(idx, axis=1) >= 0)
    idx, w = epoch_batches(jax.random.key(0), 3, 8)  # one batch larger than the data
    assert idx.shape == (1, 8) and w.sum() == 3
    np.testing.assert_array_equal(np.sort(idx[w > 0]), np.arange(3))


def test_every_image_once_per_epoch_without_loading_the_stack(stack_path):
    mm = read_mrcs(stack_path)
    assert isinstance(mm, np.memmap)
    guarded = GuardedImages(mm)
    batch, n_epochs = 16, 3
    with MinibatchStream(
        guarded, batch, jax.random.key(1), n_epochs=n_epochs, prefetch=2
    ) as stream:
        batches = list(stream)
    per_epoch = -(-N // batch)
    assert len(batches) == n_epochs * per_epoch == len(stream)
    orders = []
    for e in range(n_epochs):
        ep = batches[e * per_epoch : (e + 1) * per_epoch]
        idx = np.concatenate([np.asarray(b.index) for b in ep])
        w = np.concatenate([np.asarray(b.weight) for b in ep])
        seen = idx[w > 0]
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))  # each image exactly once
        assert w.sum() == N and set(np.unique(w)) <= {0.0, 1.0}
        orders.append(seen)
        for b in ep:  # the values are the stack's rows
            assert b.values.shape == (batch, D, D)
            np.testing.assert_array_equal(np.asarray(b.values), np.asarray(mm[np.asarray(b.index)]))
    assert not np.array_equal(orders[0], orders[1])  # a fresh permutation every epoch
    assert max(guarded.reads) == batch and len(guarded.reads) == n_epochs * per_epoch
    assert stream.epoch == n_epochs


def test_memory_map_is_read_with_pread_not_mapped(stack_path):
    mm = read_mrcs(stack_path)
    with MinibatchStream(mm, 10, jax.random.key(4), n_epochs=1) as stream:
        assert stream._file is not None  # the whole-file map is read with os.preadv
        batches = list(stream)
    for b in batches:
        np.testing.assert_array_equal(np.asarray(b.values), np.asarray(mm[np.asarray(b.index)]))
    assert release_pages(mm) == 1 and release_pages(GuardedImages(np.zeros((2, 2, 2)))) == 0


def test_particle_stack_batches_carry_their_nuisances(stack_path):
    mm = read_mrcs(stack_path)
    rot = np.broadcast_to(np.eye(3, dtype=np.float32), (N, 3, 3)).copy()
    nu = ParticleStack.make_nuisance(
        rot, np.zeros((N, 2)), defocus_u_in_angstroms=np.arange(N) + 1e4
    )
    stack = ParticleStack(GuardedImages(mm), nu, 2.0)
    with MinibatchStream(stack, 32, jax.random.key(2), n_epochs=1) as stream:
        b = next(iter(stream))
    np.testing.assert_allclose(
        np.asarray(b.nuisance.ctf.defocus_u_in_angstroms), np.asarray(b.index) + 1e4
    )
    assert b.nuisance.rotation.shape == (32, 3, 3)


def test_spilled_nuisances_read_the_same_rows_from_disk(stack_path):
    """spill_rows keeps per-particle arrays out of memory (issue 18: flat memory in N): varying
    arrays become DiskRows read with pread, constant ones broadcast views; a stream over the
    spilled stack yields the same batches as over the in-memory one."""
    rng = np.random.default_rng(1)
    rot = rng.normal(size=(N, 3, 3)).astype(np.float32)
    nu = ParticleStack.make_nuisance(
        rot, rng.normal(size=(N, 2)), defocus_u_in_angstroms=np.arange(N) + 1e4
    )
    spilled = spill_rows(nu, min_rows=10)
    assert isinstance(spilled.rotation, DiskRows)
    assert spilled.ctf.voltage_in_kilovolts.strides == (0,)  # one value for every particle
    idx = np.array([7, 3, 3, 100, 0])
    np.testing.assert_array_equal(spilled.rotation[idx], rot[idx])
    np.testing.assert_array_equal(spilled.rotation[5:9], rot[5:9])
    np.testing.assert_array_equal(spilled.rotation[np.arange(N) % 4 == 1], rot[1::4])
    np.testing.assert_array_equal(np.asarray(spilled.shift_in_angstroms), nu.shift_in_angstroms)
    assert len(spilled.rotation) == N and spilled.rotation.ndim == 3
    assert spill_rows(nu).rotation is nu.rotation  # below min_rows: left in memory

    mm = read_mrcs(stack_path)
    batches = []
    for n in (nu, spilled):
        with MinibatchStream(ParticleStack(mm, n, 2.0), 32, jax.random.key(4), n_epochs=1) as s:
            batches.append(next(iter(s)))
    a, b = batches
    for x, y in zip(jax.tree_util.tree_leaves(a.nuisance), jax.tree_util.tree_leaves(b.nuisance)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_prefetch_is_bounded_and_errors_reach_the_consumer(stack_path):
    guarded = GuardedImages(read_mrcs(stack_path))
    stream = MinibatchStream(guarded, 8, jax.random.key(3), prefetch=2).start()
    time.sleep(0.5)  # the consumer takes nothing: the reader stops at the queue bound
    assert len(guarded.reads) <= 2 + 1
    stream.close()

    class Broken(GuardedImages):
        def __getitem__(self, idx):
            raise OSError("disk gone")

    with (
        MinibatchStream(Broken(read_mrcs(stack_path)), 8, jax.random.key(3)) as s2,
        pytest.raises(OSError, match="disk gone"),
    ):
        next(s2)


def _decay_data(n=128):
    op = DecayOperator(sigma=0.1)
    k = jax.random.split(jax.random.key(0), 3)
    theta = jnp.where(jax.random.bernoulli(k[0], 0.4, (n, 1)), 0.8, 2.0)
    nu = op.sample_nuisance(k[1], n)
    return op, np.asarray(op.sample(k[2], theta, nu)), np.asarray(nu)


def test_streaming_flow_equals_the_full_batch_flow():
    op, y, nu = _decay_data()
    init = ParticleMeasure(jnp.linspace(0.3, 2.8, 12)[:, None])
    flow = WassersteinGradientFlow(step_size=2e-3, n_steps=20, chunk_size=10)
    ref = flow.run(
        KL(), op, Observations(jnp.asarray(y), jnp.asarray(nu)), init, key=jax.random.key(5)
    )
    with MinibatchStream(
        y, len(y), jax.random.key(6), nuisance=nu
    ) as stream:  # one batch = all data
        res = run_streaming(flow, KL(), op, stream, init, key=jax.random.key(5))
    assert np.abs(np.asarray(ref.measure.positions) - np.asarray(init.positions)).max() > 0.05
    np.testing.assert_allclose(
        np.asarray(res.measure.positions), np.asarray(ref.measure.positions), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(res.losses), np.asarray(ref.losses), rtol=1e-5)


def test_streaming_minibatch_flow_moves_towards_the_data():
    op, y, nu = _decay_data(200)
    init = ParticleMeasure(jnp.linspace(0.3, 2.8, 12)[:, None])
    flow = WassersteinGradientFlow(step_size=2e-3, n_steps=40)
    with MinibatchStream(y, 48, jax.random.key(7), nuisance=nu, n_epochs=None) as stream:
        res = run_streaming(flow, KL(), op, stream, init, key=jax.random.key(8))
        assert stream.n_batches == 40 and stream.epoch == 40 // 5
    losses = np.asarray(res.losses)
    assert np.all(np.isfinite(losses)) and losses[-5:].mean() < losses[:5].mean()
