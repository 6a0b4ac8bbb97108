"""Several JAX processes, one controller: what crosses between them and how arrays become global.

A multi-host run starts the same command on every host (`distributed.*`, see `ace.train.devices`).
Every process runs the same AceGRPO control flow over the same global mesh, so every jitted step,
collective and checkpoint save happens on all of them in the same order. Only process 0 (the
controller) talks to the outside world: it rolls out (SGLang servers, sandboxes), evaluates, logs
and writes files. What it observed there, the rollout groups of a step and the RNG key its worker
threads advanced, is sent to the other processes with `broadcast_object` before they need it, so
their curriculum tables and learner states stay identical to the controller's.

With one process every function here is the identity or a plain host transfer.
"""
from __future__ import annotations

import itertools
import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ace.models.sharding import to_host


def multi_process() -> bool:
    return jax.process_count() > 1


def is_controller() -> bool:
    """True on process 0, which rolls out, evaluates, logs and writes files."""
    return jax.process_index() == 0


# How long a process waits for the others at a barrier: the controller may spend long stretches
# alone (starting 30B servers, a step's rollouts, an evaluation) while the others wait.
BARRIER_TIMEOUT_S = 24 * 3600
_barriers = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reached the barrier `name` (the n-th call of any name on each
    process pairs with the n-th on the others). Collectives that follow a stretch of controller-only
    work go behind one: their own timeouts are short, the coordination service's wait is not."""
    if not multi_process():
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"ace-{next(_barriers)}-{name}", int(timeout_s * 1000))


def broadcast_object(obj: Any = None) -> Any:
    """The controller's `obj` on every process (pickled; followers pass None). Collective; it first
    waits at a barrier, so the followers may wait as long as the controller needs to produce `obj`."""
    if not multi_process():
        return obj
    barrier("broadcast")
    if is_controller():
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        n = multihost_utils.broadcast_one_to_all(np.asarray(data.size, np.int64))
        multihost_utils.broadcast_one_to_all(data)
        return obj
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(0, np.int64)))
    data = multihost_utils.broadcast_one_to_all(np.zeros(n, np.uint8))
    return pickle.loads(np.asarray(data).tobytes())


def tree_to_host(tree: Any) -> Any:
    return jax.tree.map(to_host, tree)


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` laid out with `sharding`; a host value (the same on every process) becomes a global array
    of which each process holds only its own devices' slices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if not multi_process():
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every array leaf as a global array replicated over `mesh` (for multi-process checkpoints)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: put_global(x, sharding), tree)


def localize(tree: Any) -> Any:
    """The inverse of `replicate`: each replicated global leaf as an array on this process's first device."""
    return jax.tree.map(lambda x: jax.device_put(to_host(x), jax.local_devices()[0]), tree)


class MirrorEngine:
    """The rollout engine of a non-controller process: it never generates; a weight push runs the
    exporter too, since exporting sharded params is collective (the controller alone writes)."""

    supports_concurrent_update = False

    def __init__(self, exporter, *, initial_version: int = 0):
        self.exporter = exporter
        self._version = initial_version

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts, params):
        raise RuntimeError("rollouts run on the controller (process 0) only")

    def update_weights(self, params: Any, version: int) -> None:
        if version <= self._version:
            raise ValueError(f"version must grow: got {version}, engine holds {self._version}")
        self.exporter(params, None)
        self._version = version
