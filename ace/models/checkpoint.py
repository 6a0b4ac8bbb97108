"""Orbax checkpoints of sharded pytrees (params, optimizer state, step, RNG keys) plus JSON metadata.

A checkpoint directory holds one sub-directory per step, each with two items: ``state`` (any pytree of
jax arrays, NumPy arrays and scalars, saved shard by shard by every process) and ``metadata`` (a JSON
object: config, curriculum counters, whatever the caller needs to resume). Only the newest
``max_to_keep`` steps are kept.

Restoring does not need the mesh the checkpoint was written on: the caller names the shardings it
wants (or an abstract tree of ``jax.ShapeDtypeStruct`` with shardings) and each process reads only
the slices its devices hold, so a checkpoint saved on ``fsdp=8`` restores onto ``fsdp=2 x expert=4``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import metadata as ocp_metadata

_STATE = "state"
_METADATA = "metadata"


class Checkpointer:
    """Owns one orbax ``CheckpointManager`` over ``directory``; use as a context manager or ``close()``.

    Args:
      directory: the checkpoint root (created on first save).
      max_to_keep: how many of the newest steps to keep; older ones are deleted after each save.
      async_save: when True, ``save`` returns once the arrays are copied off the devices and writes
        in the background; ``wait()`` or ``close()`` blocks until the files are complete.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = False):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()},
            options=options,
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending writes and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def wait(self) -> None:
        """Blocks until every started save is fully on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when the directory holds none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> None:
        """Saves ``state`` (a pytree of arrays / scalars) and JSON-able ``metadata`` as ``step``.

        Raises:
          ValueError: ``step`` is negative or already saved; ``metadata`` is not a JSON object.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step in self.all_steps():
            raise ValueError(f"step {step} already exists in {self.directory}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a JSON object (a mapping), got {type(metadata).__name__}")
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(dict(metadata or {}))}
        )
        self._manager.save(step, args=args)

    def restore(self, step: int | None = None, *, target_shardings: Any = None) -> tuple[Any, dict]:
        """Restores ``(state, metadata)`` of ``step`` (default: the latest).

        Args:
          step: which step; None means ``latest_step()``.
          target_shardings: where the arrays go. One of
            - None: every array onto the first local device, with the shapes and dtypes saved;
              the tree comes back as nested dicts / lists (NamedTuples become dicts).
            - a pytree with the structure of the saved state whose array leaves are
              ``jax.sharding.Sharding`` (shapes and dtypes are read from the checkpoint) or
              ``jax.ShapeDtypeStruct`` with a sharding (shape and dtype are checked / cast);
              the result has this tree's structure (e.g. optax NamedTuples) and these shardings.
              Scalar leaves (Python ints / floats) restore as Python scalars.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in the directory.
          ValueError: the target tree does not match the saved tree (names the leaf).
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"step {step} not in {self.directory}; saved steps: {steps}")
        saved = self._manager.item_metadata(step)[_STATE]
        saved_tree = saved.tree if hasattr(saved, "tree") else saved
        if target_shardings is None:
            target = _default_target(saved_tree)
        else:
            target = _target_from(target_shardings, saved_tree)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(target), _METADATA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        return restored[_STATE], dict(restored[_METADATA] or {})


def save(directory: str | os.PathLike, step: int, state: Any, metadata: Mapping[str, Any] | None = None,
         *, max_to_keep: int = 3) -> None:
    """Saves ``state`` and ``metadata`` as ``step`` under ``directory``, keeping the newest ``max_to_keep``.

    Blocks until the checkpoint is complete. See ``Checkpointer.save``.
    """
    with Checkpointer(directory, max_to_keep=max_to_keep) as ckpt:
        ckpt.save(step, state, metadata)


def restore(directory: str | os.PathLike, step: int | None = None, *,
            target_shardings: Any = None) -> tuple[Any, dict]:
    """Restores ``(state, metadata)`` from ``directory``. See ``Checkpointer.restore``."""
    _require_dir(directory)
    with Checkpointer(directory) as ckpt:
        return ckpt.restore(step, target_shardings=target_shardings)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step under ``directory``; None when there is none (or no directory)."""
    if not os.path.isdir(directory):
        return None
    with Checkpointer(directory) as ckpt:
        return ckpt.latest_step()


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Complete steps under ``directory``, ascending (empty when there is no directory)."""
    if not os.path.isdir(directory):
        return []
    with Checkpointer(directory) as ckpt:
        return ckpt.all_steps()


def _require_dir(directory) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {os.fspath(directory)!r} does not exist")


def _is_saved_leaf(x) -> bool:
    return isinstance(x, ocp_metadata.Metadata)


def _default_target(saved_tree):
    """An abstract tree that puts every saved array on the first local device."""
    device = jax.local_devices()[0]

    def leaf(md):
        if isinstance(md, ocp_metadata.ScalarMetadata):
            return np.dtype(md.dtype).type(0).item()
        if isinstance(md, ocp_metadata.StringMetadata):
            return ""
        return jax.ShapeDtypeStruct(tuple(md.shape), md.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(device))

    return jax.tree.map(leaf, saved_tree, is_leaf=_is_saved_leaf)


def _path_entry_name(entry) -> str | int:
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key
    raise ValueError(f"unsupported pytree path entry {entry!r}")


def _lookup(saved_tree, path):
    """The saved metadata at ``path``; orbax stores NamedTuples as dicts and tuples as lists."""
    node = saved_tree
    for entry in path:
        name = _path_entry_name(entry)
        if isinstance(node, Mapping):
            key = name if name in node else str(name)
            if key not in node:
                raise ValueError(
                    f"target leaf {jax.tree_util.keystr(path)} is not in the checkpoint "
                    f"(at {name!r} the saved keys are {sorted(map(str, node))})")
            node = node[key]
        elif isinstance(node, (list, tuple)) and isinstance(name, int) and name < len(node):
            node = node[name]
        else:
            raise ValueError(f"target leaf {jax.tree_util.keystr(path)} is not in the checkpoint")
    return node


def _target_from(target_shardings, saved_tree):
    """Turns a tree of shardings / ShapeDtypeStructs into orbax's abstract restore target."""
    is_leaf = lambda x: isinstance(x, (jax.sharding.Sharding, jax.ShapeDtypeStruct))
    flat, treedef = jax.tree_util.tree_flatten_with_path(target_shardings, is_leaf=is_leaf)
    saved_count = len(jax.tree.leaves(saved_tree, is_leaf=_is_saved_leaf))
    if len(flat) != saved_count:
        raise ValueError(
            f"target_shardings has {len(flat)} leaves but the checkpoint holds {saved_count}")
    out = []
    for path, want in flat:
        md = _lookup(saved_tree, path)
        where = jax.tree_util.keystr(path)
        if isinstance(want, jax.sharding.Sharding):
            if not isinstance(md, ocp_metadata.ArrayMetadata):
                raise ValueError(f"target leaf {where} is a sharding but the checkpoint holds {md!r}")
            out.append(jax.ShapeDtypeStruct(tuple(md.shape), md.dtype, sharding=want))
        elif isinstance(want, jax.ShapeDtypeStruct):
            want_shape = tuple(want.shape)
            if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
                # orbax stores a typed key as its raw key data, which has trailing impl dims.
                want_shape = tuple(jax.eval_shape(jax.random.key_data, want).shape)
            if isinstance(md, ocp_metadata.ArrayMetadata) and tuple(md.shape) != want_shape:
                raise ValueError(f"target leaf {where} has shape {want_shape} but the "
                                 f"checkpoint holds shape {tuple(md.shape)}")
            if want.sharding is None:
                raise ValueError(f"target leaf {where} is a ShapeDtypeStruct without a sharding")
            out.append(want)
        else:
            out.append(want)
    return jax.tree_util.tree_unflatten(treedef, out)
