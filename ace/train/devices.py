"""Which devices the learner uses: multi-host start-up, the learner/rollout GPU split, the mesh.

Called once at start-up, before anything touches a JAX backend:
  * `init_distributed(cfg)` joins a multi-host run through `jax.distributed.initialize()` when the
    `distributed:` section asks for it, or (`enabled: auto`) when the launcher set the usual
    variables (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or SLURM / Open MPI
    on more than one task); every process then runs the same flow, process 0 in control
    (`ace.train.multihost`);
  * `restrict_learner_gpus(cfg)` makes only `learner.gpus` visible to JAX, so that the GPUs named in
    `rollout.gpus` stay free for the SGLang servers (JAX would otherwise claim memory on all);
  * `learner_mesh(cfg)` builds the mesh from `mesh:` (the rules table maps logical axes onto it) over
    the learner's devices of every host; `describe_split` is the start-up line that says who has what.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax

from ace.models.sharding import make_mesh, resolve_mesh_shape
from ace.rollout.sglang_pool_config import PoolConfigError, count_host_gpus, parse_device_list

_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS",)
DISTRIBUTED_MODES = ("auto", True, False)


def _wants_distributed(dcfg: Mapping[str, Any]) -> bool:
    enabled = dcfg.get("enabled", "auto")
    if enabled not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed.enabled={enabled!r}: expected auto, true or false")
    if enabled is not True and enabled is not False:
        if dcfg.get("coordinator_address"):
            return True
        if any(os.environ.get(v) for v in _COORDINATOR_VARS):
            return True
        tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE")
        return bool(tasks) and int(tasks) > 1
    return bool(enabled)


def init_distributed(cfg: Mapping[str, Any]) -> bool:
    """`jax.distributed.initialize` with the `distributed:` keys (None = detected from the environment).

    Returns whether this process joined a multi-process run. Must run before any JAX computation.
    """
    dcfg = dict(cfg.get("distributed") or {})
    if not _wants_distributed(dcfg):
        return False
    kwargs = {k: dcfg[k] for k in ("coordinator_address", "num_processes", "process_id") if dcfg.get(k) is not None}
    # JAX reads JAX_COORDINATOR_ADDRESS itself (and SLURM / Open MPI); the count and rank it does not.
    for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(var):
            kwargs[key] = int(os.environ[var])
    if "local_device_ids" in dcfg and dcfg["local_device_ids"] is not None:
        kwargs["local_device_ids"] = list(parse_device_list(dcfg["local_device_ids"], key="distributed.local_device_ids"))
    if count_host_gpus() == 0 and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        # CPU processes (a laptop rehearsal of a multi-host run) exchange collectives through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def restrict_learner_gpus(cfg: Mapping[str, Any]) -> tuple[int, ...] | None:
    """Makes only `learner.gpus` visible to JAX; checks both GPU lists against this host.

    Raises PoolConfigError (naming the key, the ids and what the host has) when a list asks for GPUs
    that are not there. Overlapping lists are allowed (a learner and a server sharing a GPU need
    SGLang's `--mem-fraction-static` set low) but said at start-up.
    """
    learner = parse_device_list((cfg.get("learner") or {}).get("gpus"), key="learner.gpus")
    rollout_cfg = cfg.get("rollout") or {}
    rollout = None
    if rollout_cfg.get("kind") == "sglang" and rollout_cfg.get("device", "cuda") == "cuda" and not rollout_cfg.get("urls"):
        rollout = parse_device_list(rollout_cfg.get("gpus"), key="rollout.gpus")
    if learner is None and rollout is None:
        return None
    have = count_host_gpus()
    for key, ids in (("learner.gpus", learner), ("rollout.gpus", rollout)):
        if ids is not None and max(ids) >= have:
            missing = [i for i in ids if i >= have]
            raise PoolConfigError(f"{key}={list(ids)} asks for GPUs {missing}, but this host has {have} GPU(s)"
                                  + (f" (ids 0..{have - 1})" if have else "; set it to null to run on the CPU"))
    if learner is not None and rollout is not None and set(learner) & set(rollout):
        print(f"[ace] warning: learner.gpus {list(learner)} and rollout.gpus {list(rollout)} share GPUs "
              f"{sorted(set(learner) & set(rollout))}; give the servers a low --mem-fraction-static", flush=True)
    if learner is not None:
        jax.config.update("jax_cuda_visible_devices", ",".join(str(i) for i in learner))
    return learner


def learner_mesh(cfg: Mapping[str, Any]) -> jax.sharding.Mesh | None:
    """The learner's mesh over `mesh.devices` devices (-1 = all of every host); None for one device.

    The axis sizes come from `mesh:` (one may be -1: the rest); every host contributes its local
    devices in process order, so an fsdp or expert axis can span hosts.
    """
    mesh_cfg = dict(cfg["mesh"])
    n = int(mesh_cfg.pop("devices", -1) or -1)
    devices = jax.devices()
    if n > len(devices):
        raise ValueError(f"mesh.devices={n}, but the learner sees {len(devices)} device(s) "
                         f"({devices[0].platform}); lower it or give the learner more (learner.gpus)")
    devices = devices if n <= 0 else devices[:n]
    shape = {k: int(v) for k, v in mesh_cfg.items()}
    resolve_mesh_shape(shape, len(devices))  # the axes must fit the learner's devices, even one
    if len(devices) == 1:
        return None
    return make_mesh(shape, devices)


def describe_split(mesh: jax.sharding.Mesh | None, cfg: Mapping[str, Any], learner_gpus) -> str:
    """One start-up line: the learner's devices and mesh, and where rollouts run."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    platform = devices[0].platform
    where = f"GPUs {list(learner_gpus)}" if learner_gpus else f"{len(devices)} {platform} device(s)"
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) if mesh is not None else "unsharded"
    hosts = f", {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    rollout = cfg["rollout"]
    if rollout["kind"] == "sglang":
        if rollout.get("urls"):
            rdesc = f"SGLang servers at {list(rollout['urls'])}"
        elif rollout.get("device") == "cpu":
            rdesc = f"{rollout.get('num_servers', 1)} SGLang server(s) on the CPU"
        else:
            rdesc = (f"{rollout.get('num_servers', 1)} SGLang server(s) x tp {rollout.get('tp_size', 1)} on GPUs "
                     f"{list(parse_device_list(rollout.get('gpus'), key='rollout.gpus') or [])}")
    else:
        rdesc = "the embedded JAX sampler on the learner's first device"
    return f"[ace] learner: {where} ({shape}{hosts}); rollouts: {rdesc}"
