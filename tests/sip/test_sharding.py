"""Data-parallel flows: the same particles on 4 (forced host) CPU devices as on one.

``--xla_force_host_platform_device_count`` must be set before JAX initialises, so the flows
run in a subprocess: this file executed as a script (``python test_sharding.py OUT.npz``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

N_DEVICES = 4
CASES = ("kl", "kl_unknown_nuisance", "paired_mmd_minibatch")


def _child(out: str) -> None:  # runs in the subprocess
    import jax
    import jax.numpy as jnp

    from cryosip.sip.discrepancies import KL, GaussianKernel, PairedMMD
    from cryosip.sip.examples import DecayOperator
    from cryosip.sip.flow import WassersteinGradientFlow
    from cryosip.sip.measure import ParticleMeasure
    from cryosip.sip.operator import Observations
    from cryosip.sip.sharding import DataParallelOperator, make_mesh, replicate, shard_observations

    op = DecayOperator(sigma=0.1)
    k = jax.random.split(jax.random.key(0), 3)
    n = 256
    theta = jnp.where(jax.random.bernoulli(k[0], 0.5, (n, 1)), 0.8, 2.0)
    nu = op.sample_nuisance(k[1], n)
    obs = Observations(op.sample(k[2], theta, nu), nu)
    init = ParticleMeasure(jnp.linspace(0.3, 2.8, 16)[:, None])
    mesh = make_mesh()
    sop = DataParallelOperator(op, mesh)
    sobs = shard_observations(obs, mesh)
    res = {
        "n_devices": len(jax.devices()),
        "values_shards": np.array([s.data.shape[0] for s in sobs.values.addressable_shards]),
        "values_devices": len(sobs.values.sharding.device_set),
        "nuisance_devices": len(sobs.nuisance.sharding.device_set),
    }
    setups = {
        "kl": (KL(), obs, sobs, None),
        "kl_unknown_nuisance": (
            KL(n_nuisance=64),
            Observations(obs.values),
            Observations(sobs.values),
            None,
        ),
        "paired_mmd_minibatch": (PairedMMD(GaussianKernel(0.5)), obs, sobs, 64),
    }
    for name, (disc, o1, o4, batch) in setups.items():
        flow = WassersteinGradientFlow(
            step_size=2e-3 if name != "paired_mmd_minibatch" else 2e-2,
            n_steps=30,
            chunk_size=30,
            batch_size=batch,
        )
        r1 = flow.run(disc, op, o1, init, key=jax.random.key(1))
        r4 = flow.run(disc, sop, o4, replicate(init, mesh), key=jax.random.key(1))
        res[f"{name}_single"] = np.asarray(r1.measure.positions)
        res[f"{name}_sharded"] = np.asarray(r4.measure.positions)
        res[f"{name}_losses_single"] = np.asarray(r1.losses)
        res[f"{name}_losses_sharded"] = np.asarray(r4.losses)
    # the compiled objective + gradient is partitioned: per-device work and a cross-device reduction
    grad = jax.jit(jax.value_and_grad(lambda p, ob: KL()(None, sop, ParticleMeasure(p), ob)))
    hlo = grad.lower(init.positions, sobs).compile().as_text()
    res["hlo_has_all_reduce"] = "all-reduce" in hlo
    np.savez(out, **res)


def test_sharded_flow_gives_the_single_device_particles(tmp_path):
    out = tmp_path / "sharding.npz"
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as z:
        r = {k: z[k] for k in z.files}
    assert int(r["n_devices"]) == N_DEVICES
    assert int(r["values_devices"]) == N_DEVICES and int(r["nuisance_devices"]) == N_DEVICES
    np.testing.assert_array_equal(r["values_shards"], [256 // N_DEVICES] * N_DEVICES)
    assert bool(r["hlo_has_all_reduce"])
    for name in CASES:
        single, sharded = r[f"{name}_single"], r[f"{name}_sharded"]
        # the particles moved (the comparison is not trivially of the initial positions)
        assert np.abs(single - np.linspace(0.3, 2.8, 16)[:, None]).max() > 0.05, name
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(
            r[f"{name}_losses_sharded"], r[f"{name}_losses_single"], rtol=1e-5, err_msg=name
        )


if __name__ == "__main__":
    _child(sys.argv[1])


def test_single_process_helpers_are_identities():
    """One process: all rows are local, a global batch is the local one, broadcast is identity
    (the multi-process paths run in tests/cli/test_multiprocess.py)."""
    import jax
    import jax.numpy as jnp

    from cryosip.sip.sharding import (
        broadcast_from_first_process,
        data_sharding,
        global_rows,
        make_mesh,
        process_rows,
    )

    sh = data_sharding(make_mesh())
    np.testing.assert_array_equal(process_rows(sh, 8), np.arange(8))
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    np.testing.assert_array_equal(np.asarray(global_rows(sh, x, 8)), x)
    tree = (jnp.ones(3), np.float32(2.5), 7, "kl", jax.random.key(0))
    out = broadcast_from_first_process(tree)
    assert out is tree
