"""The cryo-EM operator's tabulation kernel (``CryoEMOperator.node_means``: structures once per
node, transfer once per image) gives the generic kernel's tables (``pair_means``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryosip.cryoem.image_model import ImageModel, NuisancePrior
from cryosip.data.adk import adk_model
from cryosip.pipeline.operator import CryoEMOperator
from cryosip.sip.operator import AbstractRandomOperator, Observations
from cryosip.sip.table import TabulatedOperator, _node_tables, gram_tables


@pytest.mark.parametrize("center", [False, True])
def test_cryoem_kernel_equals_generic_tables(center):
    model = adk_model(ca_only=True)
    noise_filter = np.linspace(0.5, 1.5, 32 * 17, dtype=np.float32).reshape(1, 32, 17)
    im = ImageModel.for_atoms(32, 3.0, model.atoms, fourier_filter=noise_filter)
    op = CryoEMOperator(model, im, 1.0, NuisancePrior(shift_sd_in_angstroms=2.0), fit_scale=center)
    nu = op.sample_nuisance(jax.random.key(0), 6)
    y = op.sample(jax.random.key(1), jnp.full((6, 1), 0.4), nu)
    nodes = jnp.linspace(0.0, 1.0, 9)[:, None]
    generic = AbstractRandomOperator.pair_means(op, nodes, nu).reshape(6, 9, -1)
    ref = gram_tables(generic, y, center)
    fast = _node_tables(op, nodes, y, nu, center)  # op.node_means
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max())
        )
    tab = TabulatedOperator.build(op, Observations(y, nu), 9, batch_size=4)
    np.testing.assert_allclose(
        np.asarray(tab.gram),
        np.asarray(ref[0]),
        rtol=1e-5,
        atol=1e-6 * float(jnp.abs(ref[0]).max()),
    )
