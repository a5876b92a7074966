"""Data-parallel flows: observations (and nuisance draws) split over devices, particles replicated.

The engine's objective is a sum over observations (KL: of per-image log marginal likelihoods;
paired MMD: of per-image kernel scores), and every velocity is a gradient of it. Placing the
observations sharded along their leading axis over a one-axis ``Mesh`` and everything else
(particles, operator) replicated is enough: ``jit`` propagates the shardings through the
compiled step (``_run_chunk`` in :mod:`cryosip.sip.flow`), so each device simulates and
differentiates its own images, and XLA inserts the all-reduce of the objective and of the
particle gradients. The engine's code does not change::

    mesh = make_mesh()                                  # every device jax.devices() lists
    obs = shard_observations(obs, mesh)                 # images + known nuisances split
    op = DataParallelOperator(op, mesh)                 # Monte Carlo nuisance draws split too
    init = replicate(init, mesh)
    result = flow.run(disc, op, obs, init, key=key)     # same particles as one device

Several processes (hosts): call ``jax.distributed.initialize()`` first in every process
(``cryosip.cli._distributed`` does, for ``cryosip reconstruct --stream --num-processes N``);
``jax.devices()`` then lists the devices of all processes, :func:`make_mesh` spans them, and the
same code runs data-parallel over all of them. Each process builds only its own rows of a
batch (:func:`process_rows`, :func:`global_rows`); what every process must agree on (the
particles, the operator, the step sizes) is made identical with
:func:`broadcast_from_first_process`, or taken whole from process 0 with
:func:`share_from_first_process` (``docs/scaling.md`` has the recipe, SLURM included). The mesh uses ``AxisType.Auto`` (classic sharding
propagation; ``jax.make_mesh`` defaults to ``Explicit`` in recent JAX).
"""

from __future__ import annotations

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .operator import AbstractRandomOperator, AbstractWrappedOperator, Observations

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_AXIS",
    "DataParallelOperator",
    "broadcast_from_first_process",
    "share_from_first_process",
    "data_sharding",
    "global_rows",
    "make_mesh",
    "process_rows",
    "replicate",
    "replicated_sharding",
    "shard_observations",
]

DATA_AXIS = "data"


def make_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: all of ``jax.devices()``, every host's)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("no devices to build a mesh on")
    return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh's (only) axis, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` (particles, an operator) copied to every device of the mesh."""
    sh = replicated_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, sh) if isinstance(a, (jax.Array, np.ndarray)) else a, tree
    )


def process_rows(sharding, n: int) -> np.ndarray:
    """The rows of an ``(n, ...)`` array split by ``sharding`` that live on this process's
    devices (sorted; all of ``range(n)`` in a single process)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((n,)).values():
        sl = index[0] if index else slice(None)
        rows.update(range(*sl.indices(n)))
    return np.asarray(sorted(rows), np.int64)


def global_rows(sharding, local, n: int) -> jax.Array:
    """The global ``(n, ...)`` array, split by ``sharding``, of which this process holds the rows
    :func:`process_rows` (``local``, in that order); other processes supply theirs."""
    local = np.asarray(local)
    if sharding.is_fully_addressable:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (n,) + local.shape[1:])


def _is_numeric(leaf) -> bool:
    if isinstance(leaf, bool) or leaf is None:
        return False
    if isinstance(leaf, (int, float, np.generic)):
        return True
    if isinstance(leaf, (np.ndarray, jax.Array)):
        return not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    return False


def broadcast_from_first_process(tree: PyTree) -> PyTree:
    """``tree`` with every numeric leaf (arrays, Python numbers) replaced by process 0's value,
    bit for bit (sent as raw bytes, so float64 stays float64); identity in a single process.

    Every process must call it with a tree of the same structure and leaf shapes (what each
    computes from the same inputs). Key arrays and non-numeric leaves are kept as they are.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if _is_numeric(leaf)]
    arrays = [np.array(leaves[i], order="C") for i in where]  # keeps 0-d arrays 0-d
    raw = [a.reshape(-1).view(np.uint8) for a in arrays]
    got = multihost_utils.broadcast_one_to_all(raw)
    for i, a, r in zip(where, arrays, got, strict=True):
        v = np.asarray(r, np.uint8).view(a.dtype).reshape(a.shape)
        old = leaves[i]
        if isinstance(old, jax.Array):
            leaves[i] = jnp.asarray(v)
        elif isinstance(old, np.ndarray):
            leaves[i] = v
        else:  # Python or NumPy scalar
            leaves[i] = type(old)(v[()])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def share_from_first_process(obj):
    """Process 0's ``obj`` (any picklable object: modules, measures, dataclasses) on every
    process, sent pickled; the other processes pass anything (their value is not used, so they
    need not compute it). Identity in a single process."""
    if jax.process_count() == 1:
        return obj
    import pickle

    from jax.experimental import multihost_utils

    first = jax.process_index() == 0
    payload = np.frombuffer(pickle.dumps(obj), np.uint8) if first else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(payload.size)))
    if not first:
        payload = np.zeros(size, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(payload), np.uint8)
    return obj if first else pickle.loads(got.tobytes())  # noqa: S301 - from process 0 of this run


def _pad_rows(a, n_pad: int):
    a = jnp.asarray(a)
    return jnp.concatenate([a, jnp.repeat(a[-1:], n_pad, axis=0)], axis=0)


def shard_observations(obs: Observations, mesh: Mesh, *, pad: bool = False) -> Observations:
    """``obs`` with every leaf split along the observation axis over the mesh's devices.

    The number of observations must be a multiple of the number of devices, unless ``pad``:
    then copies of the last observation with weight 0 are appended (they leave weighted
    objectives -- ``KL``, ``PairedMMD`` -- unchanged, but a flow with ``batch_size`` set would
    draw them into minibatches, so pad only for full-batch flows or pad the data beforehand).
    """
    n = len(obs)
    n_dev = mesh.devices.size
    n_pad = (-n) % n_dev
    if n_pad:
        if not pad:
            raise ValueError(
                f"{n} observations do not split evenly over {n_dev} devices (pass pad=True)"
            )
        logger.info(
            "padding %d observations with %d zero-weight copies for %d devices", n, n_pad, n_dev
        )
        padded = jax.tree_util.tree_map(
            lambda a: _pad_rows(a, n_pad), (obs.values, obs.nuisance, obs.index)
        )
        weight = jnp.concatenate([jnp.asarray(obs.weight), jnp.zeros((n_pad,), jnp.float32)])
        obs = Observations(padded[0], padded[1], padded[2], weight)
    sh = data_sharding(mesh)
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sh), obs)


class DataParallelOperator(AbstractWrappedOperator):
    """Wraps an operator so that each device renders and differentiates only its own rows.

    ``mean``, ``domain`` and the noise are the wrapped operator's. With known nuisances (and a
    row count that splits evenly over the devices) the per-observation quantities the objectives
    need -- ``log_likelihood_matrix`` (``KL``), ``paired_sq_distances`` and ``paired_means``
    (paired MMD) -- run under a ``jax.shard_map`` over the data axis: each device computes its
    own rows, the (rows, particles) results stay split, and only the objective's terms and the
    particle-sized gradients are reduced across devices (XLA's sharding propagation alone
    gathered the B x P rendered images to every device: measured slower on 2 processes than on
    one, ``docs/scaling.md``). ``sample_nuisance`` draws the same values and constrains their
    leading axis to the data axis (``KL`` with unknown nuisances and the unconditional ``MMD``
    then simulate data-parallel as well).
    """

    operator: AbstractRandomOperator
    mesh: Mesh = eqx.field(static=True)

    def __init__(self, operator: AbstractRandomOperator, mesh: Mesh):
        self.operator = operator
        self.mesh = mesh

    @property
    def wrapped(self) -> AbstractRandomOperator:
        return self.operator

    def sample_nuisance(self, key, n: int):
        nu = self.operator.sample_nuisance(key, n)
        if n % self.mesh.devices.size:
            return nu
        return jax.lax.with_sharding_constraint(nu, data_sharding(self.mesh))

    def _local(self, method: str, theta, obs: Observations, **kw):
        """``self.operator.<method>(theta, obs)`` on each device's own rows of ``obs`` (a
        ``shard_map`` over the data axis): outputs stay split along the data axis, and the
        cotangent of the replicated ``theta`` (and of the operator) is summed across devices
        by a ``psum`` of particle-sized arrays. Rendered images never leave their device."""
        axis = self.mesh.axis_names[0]
        params, static = eqx.partition(self.operator, eqx.is_array)
        index = jnp.asarray(obs.index)

        def local(params, theta, values, nuisance, index):
            # mark the replicated inputs device-varying here, at the boundary: the transpose of
            # that cast is the psum of their (particle-sized) cotangents. Left invariant, the
            # cast would happen deep inside (where theta meets each image's pose) and the psum
            # would carry per-(image, particle) atom coordinates instead.
            params, theta = jax.lax.pcast((params, theta), axis, to="varying")
            op = eqx.combine(params, static)
            return getattr(op, method)(theta, Observations(values, nuisance, index), **kw)

        rows, whole = PartitionSpec(axis), PartitionSpec()
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(whole, whole, rows, rows, rows),
            out_specs=rows,
        )(params, theta, obs.values, obs.nuisance, index)

    def _splits(self, obs: Observations) -> bool:
        """Known nuisances and a row count that splits evenly over the mesh's devices."""
        return obs.nuisance is not None and len(obs) % self.mesh.devices.size == 0

    def log_likelihood_matrix(self, theta, obs, *, key=None, n_nuisance=64, batch_size=None):
        if not self._splits(obs):  # Monte Carlo nuisances: draws split by sample_nuisance
            return super().log_likelihood_matrix(
                theta, obs, key=key, n_nuisance=n_nuisance, batch_size=batch_size
            )
        return self._local("log_likelihood_matrix", theta, obs, batch_size=batch_size)

    def paired_sq_distances(self, theta, obs, batch_size=None):
        if not self._splits(obs):
            return super().paired_sq_distances(theta, obs, batch_size=batch_size)
        return self._local("paired_sq_distances", theta, obs, batch_size=batch_size)

    def paired_means(self, theta, obs, batch_size=None):
        if not self._splits(obs):
            return super().paired_means(theta, obs, batch_size=batch_size)
        return self._local("paired_means", theta, obs, batch_size=batch_size)
