"""Data parallelism over tasks with ``jax.sharding``, on one device, many devices or many hosts.

- One ``Mesh`` over every device of every process, with one axis ``'data'``. Inside the jitted
  train step the task batch is constrained to ``PartitionSpec('data')``: each device runs the
  backbone on its share of the tasks, and the mean loss, the BatchNorm batch statistics and the
  gradients are reduced across devices by XLA (no ``pmap``). Parameters, optimizer state and the
  image pools are replicated (``PartitionSpec()``); with ``parallel.shard_head`` the MTL head table
  [num_base_classes, D] (and its optimizer moments) is split along the class axis
  (``PartitionSpec('data', None)``) for very many base classes.
- The global task batch does not depend on the device or process count. Tasks are sampled inside
  the jitted step over the *global* task axis: the step key is ``fold_in(base_key, step)`` and task
  ``t`` uses the ``t``-th of ``split(step_key, tasks_per_step)``; sharding propagation lets each
  device sample only its own tasks. The process index is deliberately *not* folded into the rng:
  that would make the batch depend on the process count. So 1 process with 8 devices, 2 processes
  with 4 devices each and 1 device all train on the same tasks and agree to float tolerance.
- Multi-host: :func:`initialize` calls ``jax.distributed.initialize`` (from ``parallel.coordinator``
  / ``num_processes`` / ``process_id``, or auto-detected on TPU pods, SLURM and Open MPI with
  ``parallel.distributed=True``) before anything touches the devices, with CPU collectives through
  gloo. Arrays spanning several processes are built with ``jax.make_array_from_callback`` from
  values every process holds (:func:`put`); host reads of replicated values use the local shard
  (:func:`host`). Process 0 writes the logs and results; every process takes part in orbax
  checkpointing (orbax writes each replicated array once, from process 0).
- Gloo builds a communication context the first time a set of devices runs a cross-process
  collective, and gives up when the other processes do not arrive within 30 s (``Gloo context
  initialization failed: ... GetKeyValue() timed out``); later collectives on that set wait longer.
  So nothing here relies on processes arriving together by chance: host barriers (:func:`sync`) go
  through the coordination service's key-value store (no collective, a long timeout); train.py
  sets up the one-device-per-process context (orbax's barriers, :func:`agree`) right after such a
  barrier (:func:`warm_up`), and compiles the train step ahead of time and waits at a barrier
  before its first run, whose gradient all-reduce is the first collective over all devices.
  CI under load failed this way (process 1 timing out on ``cpu:gloo/0,1,131072,131073``). With
  process 0 delayed by 45 s before its first step, or before orbax's ``CheckpointManager`` (its
  creation is a ``sync_global_devices``), the run fails without these barriers and passes with
  them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
_INITIALIZED = {"done": False}
# how long a host barrier waits for the slowest process (loading a dataset for the first time,
# compiling on a busy machine) before it fails with the barrier's name
BARRIER_TIMEOUT_S = 3600
_BARRIERS = {"count": 0}


def initialize(pc: ml_collections.ConfigDict | None) -> bool:
    """Start the multi-process runtime when the config (or the environment) asks for it.

    Must run before anything queries devices. Returns whether jax.distributed was initialised.
    """
    if _INITIALIZED["done"]:
        return True
    env = os.environ.get("JAX_COORDINATOR_ADDRESS")
    wanted = pc is not None and (pc.distributed or pc.coordinator)
    if not wanted:
        return False
    # on CPU, cross-process collectives need an implementation (gloo ships with jaxlib); harmless
    # for GPU/TPU backends, which bring their own
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if pc.coordinator or env:
        kwargs["coordinator_address"] = pc.coordinator or env
    if pc.num_processes > 0:
        kwargs["num_processes"] = pc.num_processes
    elif os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if pc.process_id >= 0:
        kwargs["process_id"] = pc.process_id
    elif os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    _INITIALIZED["done"] = True
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Barrier across processes (no-op with one process), through the coordination service.

    Every process calls the same barriers in the same order; a counter makes each barrier's id
    unique, so a name can be used more than once.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _BARRIERS["count"] += 1
    client = distributed.global_state.client
    if client is None:  # multi-process without jax.distributed (not expected): a collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"mtl_gbml/{_BARRIERS['count']}/{name}", int(timeout_s * 1000))


def warm_up() -> None:
    """Set gloo up for the one-device-per-process collectives (barriers inside orbax, which are
    ``sync_global_devices``, and :func:`agree`) while every process is here: right after a
    coordination-service barrier. Call once, before anything else may run such a collective."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    sync("warm_up")
    multihost_utils.sync_global_devices("mtl_gbml/warm_up")


def agree(values) -> np.ndarray:
    """Process 0's ``values`` on every process (host decisions such as stopping must agree)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def make_mesh() -> Mesh:
    """All devices of all processes along one 'data' axis."""
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(tree: Any, mesh: Mesh, shard_head: bool = False) -> Any:
    """Shardings for a training state: replicated, except (``shard_head``) every 2-d leaf under a
    ``'head'`` key (the MTL head table and its optimizer moments), split along its class axis."""
    rep = replicated(mesh)
    rows = NamedSharding(mesh, PartitionSpec(AXIS, None))
    n = mesh.devices.size

    def pick(path, leaf):
        keys = {getattr(k, "key", None) for k in path}
        if shard_head and "head" in keys and np.ndim(leaf) == 2:
            if np.shape(leaf)[0] % n == 0:
                return rows
            warned.append(np.shape(leaf)[0])
        return rep

    warned: list[int] = []
    out = jax.tree_util.tree_map_with_path(pick, tree)
    if warned and is_primary():
        print(
            f"parallel.shard_head: {warned[0]} head rows do not split evenly over {n} devices; "
            "the head stays replicated"
        )
    return out


def host(tree: Any) -> Any:
    """numpy copies of a tree of arrays, read from this process's shards (works for arrays that
    span other processes: replicated ones need only a local shard; sharded ones are gathered)."""

    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def put(tree: Any, shardings: Any) -> Any:
    """Place a tree whose values every process holds identically onto (possibly multi-process)
    shardings; ``shardings`` is one sharding or a tree of them."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, s):
        x = np.asarray(host(x))
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def scalar(value, dtype, mesh: Mesh) -> jax.Array:
    """A replicated scalar (the same host value on every process)."""
    return put(np.asarray(value, dtype), replicated(mesh))


def local(tree: Any) -> Any:
    """A tree on this process's first device (evaluation runs there, on every process alike)."""
    return jax.device_put(host(tree), jax.local_devices()[0])
