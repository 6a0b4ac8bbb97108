"""One table of logical axis -> mesh axis rules, mesh construction, and activation constraints.

Model code names logical axes only (`embed`, `heads`, `experts`, `batch`, ...). Changing a
parallelism layout means editing `RULES` (or passing another table), never the model code. This
module knows no model: the shardings of a model's params are computed where its logical axes are
defined (`ace.models.qwen3.param_shardings`), so the model imports the rules and never the reverse.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: Mapping[str, Any] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
    # params
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "norm": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "router_experts": None,
    "expert_embed": "fsdp",
    "expert_mlp": "tensor",
    # kv cache
    "cache_length": None,
}


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """The size of every mesh axis ("data", "fsdp", "expert", "tensor") of a mesh over `num_devices`.

    Args:
      shape: mesh axis name -> size; missing axes get size 1, and one axis may be -1, meaning all
        remaining devices (`num_devices` over the product of the others).
      num_devices: the devices the mesh must use, all of them.
    Raises:
      ValueError naming the problem: an unknown axis, a size that is 0 or below -1, two -1 axes, or
      a device count that the fixed axes do not divide (with a -1 axis) or equal (without one).
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
    bad = {name: size for name, size in sizes.items() if size == 0 or size < -1}
    if bad:
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {bad}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free} in {dict(shape)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {fixed} "
                             f"({sizes})")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh: {sizes} needs {fixed} devices, but {num_devices} were given")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh with axes ("data", "fsdp", "expert", "tensor"); missing axes get size 1.

    Args:
      shape: mesh axis name -> size; one axis may be -1, meaning all remaining devices
        (`resolve_mesh_shape`).
      devices: defaults to `jax.devices()`; the mesh uses all of them.
    Returns:
      A `Mesh` with Auto axis types (GSPMD propagates shardings between the constraints we set).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[n] for n in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no rule; known: {sorted(rules)}")
    target = rules[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[str | None], mesh_shape: Mapping[str, int],
                    shape: Sequence[int] | None = None, rules: Mapping[str, Any] = RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec over a mesh of `mesh_shape`.

    Mesh axes of size 1, mesh axes already used by an earlier dimension, and (when `shape` is given)
    mesh axes that do not divide the dimension are dropped, so the result is always a valid sharding
    (the dimension is then replicated over that mesh axis instead of failing).
    """
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match array rank {len(shape)} (shape {tuple(shape)})")
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(axes):
        chosen = []
        extent = 1
        for mesh_axis in _mesh_axes_for(logical, rules):
            size = mesh_shape.get(mesh_axis, 1)
            if size == 1 or mesh_axis in used:
                continue
            if shape is not None and shape[dim] % (extent * size):
                continue
            chosen.append(mesh_axis)
            extent *= size
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_to_sharding(axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, Any] = RULES,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """A `NamedSharding` on `mesh` for an array whose dimensions carry these logical axis names."""
    return NamedSharding(mesh, logical_to_spec(axes, dict(mesh.shape), shape, rules))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Makes `mesh` current, so that activation constraints inside the model take effect."""
    with jax.set_mesh(mesh):
        yield mesh


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any] = RULES) -> jax.Array:
    """Activation sharding constraint by logical axes; a no-op when no mesh is current."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(axes, dict(mesh.shape), x.shape, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def to_host(x: Any) -> np.ndarray:
    """The full value of an array as NumPy. A global array spread over other hosts' devices is
    gathered, which is collective: every process must call this for the same array, in order."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
