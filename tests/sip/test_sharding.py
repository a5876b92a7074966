"""Data-parallel flows: the same particles on 4 (forced host) CPU devices as on one.

``--xla_force_host_platform_device_count`` must be set before JAX initialises, so the flows
run in a subprocess: this file executed as a script (``python test_sharding.py OUT.npz``).
"""

from __future__ import annotations

import os
import re
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
    # each device keeps its own rows: nothing per-image crosses devices, only the objective's
    # terms and the particle gradients are reduced (shard_map in DataParallelOperator)
    mmd = PairedMMD(GaussianKernel(0.5))
    grad_mmd = jax.jit(
        jax.value_and_grad(lambda p, ob: mmd(jax.random.key(0), sop, ParticleMeasure(p), ob))
    )
    # the same on the cryo-EM operator (its projector's batching rule and FFTs are where XLA's
    # sharding propagation alone gathered the rendered images to every device)
    from cryosip.cryoem.image_model import ImageModel, NuisancePrior
    from cryosip.data.adk import adk_model
    from cryosip.pipeline.operator import CryoEMOperator

    model = adk_model(ca_only=True)
    cop = CryoEMOperator(model, ImageModel.for_atoms(32, 4.0, model.atoms), 1.0, fit_scale=True)
    cnu = NuisancePrior().sample(k[1], 16)
    cobs = shard_observations(Observations(jax.vmap(cop.mean)(theta[:16] / 3, cnu), cnu), mesh)
    csop, cpos = DataParallelOperator(cop, mesh), jnp.linspace(0.1, 0.9, 4)[:, None]
    grad_cryo = jax.jit(jax.value_and_grad(lambda p, ob: KL()(None, csop, ParticleMeasure(p), ob)))
    for name, g, args in (
        ("kl", grad, (init.positions, sobs)),
        ("paired_mmd", grad_mmd, (init.positions, sobs)),
        ("cryoem_kl", grad_cryo, (cpos, cobs)),
    ):
        text = g.lower(*args).compile().as_text()
        res[f"hlo_{name}_all_gathers"] = text.count("all-gather")
        sizes = [0]
        for line in text.splitlines():
            if " all-reduce(" in line and "=" in line:
                result_type = line.split("=", 1)[1].split(" all-reduce(")[0]
                for dims in re.findall(r"\[([0-9,]*)\]", result_type):
                    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
        res[f"hlo_{name}_largest_all_reduce"] = max(sizes)
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
    for name in ("kl", "paired_mmd", "cryoem_kl"):  # nothing per image gathered; small reductions
        assert int(r[f"hlo_{name}_all_gathers"]) == 0, name
        assert 0 < int(r[f"hlo_{name}_largest_all_reduce"]) <= 16, name
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
