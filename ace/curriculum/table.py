"""TaskTable: the array-backed task buffer, a pytree of fixed-capacity columns.

The table holds numbers only (docs/architecture.md, "Invariants", 2); the text of each task lives
in the host-side `TaskStore`, keyed by `task_id`. Capacity `C` is the static leading dimension of
every column, so every function over a table compiles once per capacity.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NO_TASK = -1  # task_id / parent_id of an empty row, parent_id of a root task.
NEVER = -1  # last_sampled_step of a task never sampled.


class TaskTable(NamedTuple):
    """Fixed-capacity columns, one row per task. A row is live iff `valid`.

    Running reward statistics are over every attempt (episode) ever made from the task;
    `recent_*` are over the attempts of the latest `update_stats` call only (the last group),
    which is what the Learnability Potential reads.

    Fields (C = capacity):
      valid:               [C] bool.
      task_id:             [C] int32, unique over the table's lifetime; NO_TASK on empty rows.
      parent_id:           [C] int32, task id of the state this one was expanded from; NO_TASK for roots.
      competition_id:      [C] int32.
      depth:               [C] int32, number of executed steps from the competition's initial state.
      visits:              [C] int32, attempts (episodes) made from this task.
      successes:           [C] int32, successful attempts.
      reward_mean:         [C] float32, running mean of all rewards.
      reward_var:          [C] float32, running population variance of all rewards.
      recent_success_rate: [C] float32, success rate of the latest group.
      recent_reward_std:   [C] float32, population std of the latest group's rewards.
      last_sampled_step:   [C] int32, step of the latest `update_stats`; NEVER if none.
      created_step:        [C] int32.
      state_hash:          [C, 2] uint32, hash of the task's text state (see `state_hash`).
      next_task_id:        [] int32, id the next inserted task gets.
    """

    valid: jax.Array
    task_id: jax.Array
    parent_id: jax.Array
    competition_id: jax.Array
    depth: jax.Array
    visits: jax.Array
    successes: jax.Array
    reward_mean: jax.Array
    reward_var: jax.Array
    recent_success_rate: jax.Array
    recent_reward_std: jax.Array
    last_sampled_step: jax.Array
    created_step: jax.Array
    state_hash: jax.Array
    next_task_id: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid.shape[-1]


class TaskRows(NamedTuple):
    """A batch of R candidate tasks for `insert`; rows with `valid == False` are padding.

    Fields: valid [R] bool, parent_id [R] int32, competition_id [R] int32, depth [R] int32,
    state_hash [R, 2] uint32.
    """

    valid: jax.Array
    parent_id: jax.Array
    competition_id: jax.Array
    depth: jax.Array
    state_hash: jax.Array


def init_table(capacity: int) -> TaskTable:
    """An empty table of `capacity` rows (every row invalid, next task id 0)."""
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    c = int(capacity)
    i32 = lambda fill: jnp.full((c,), fill, jnp.int32)  # noqa: E731
    f32 = jnp.zeros((c,), jnp.float32)
    return TaskTable(
        valid=jnp.zeros((c,), jnp.bool_),
        task_id=i32(NO_TASK),
        parent_id=i32(NO_TASK),
        competition_id=i32(0),
        depth=i32(0),
        visits=i32(0),
        successes=i32(0),
        reward_mean=f32,
        reward_var=f32,
        recent_success_rate=f32,
        recent_reward_std=f32,
        last_sampled_step=i32(NEVER),
        created_step=i32(0),
        state_hash=jnp.zeros((c, 2), jnp.uint32),
        next_task_id=jnp.zeros((), jnp.int32),
    )


def _as_int_vector(name: str, values, length: int | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 0 and length is not None:
        arr = np.full((length,), arr)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence [R], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected R={length} (from state_hashes)")
    return arr.astype(np.int64)


def make_rows(parent_ids, competition_ids, depths, state_hashes, *, pad_to: int | None = None) -> TaskRows:
    """Builds a `TaskRows` batch on the host from plain Python / NumPy data.

    Args:
      parent_ids: [R] ints (or a scalar broadcast to R), NO_TASK (-1) for root tasks.
      competition_ids: [R] ints (or a scalar), >= 0.
      depths: [R] ints (or a scalar), >= 0.
      state_hashes: [R, 2] uint32, one `state_hash(text)` per row.
      pad_to: if given, pad with invalid rows up to this many rows, so that `insert` compiles once
        for a fixed batch size however many children a step produced.

    Returns:
      TaskRows with R rows (or `pad_to` rows).
    """
    hashes = np.asarray(state_hashes)
    if hashes.ndim != 2 or hashes.shape[1] != 2:
        raise ValueError(f"state_hashes must have shape [R, 2], got {hashes.shape}")
    if hashes.size and not np.issubdtype(hashes.dtype, np.integer):
        raise TypeError(f"state_hashes must be uint32, got dtype {hashes.dtype}")
    if hashes.size and (hashes.min() < 0 or hashes.max() > np.iinfo(np.uint32).max):
        raise ValueError("state_hashes must hold uint32 values in [0, 2**32)")
    r = hashes.shape[0]
    parents = _as_int_vector("parent_ids", parent_ids, r)
    comps = _as_int_vector("competition_ids", competition_ids, r)
    deps = _as_int_vector("depths", depths, r)
    if (parents < NO_TASK).any():
        raise ValueError(f"parent_ids must be >= -1 (-1 = root), got {parents.min()}")
    if (comps < 0).any():
        raise ValueError(f"competition_ids must be >= 0, got {comps.min()}")
    if (deps < 0).any():
        raise ValueError(f"depths must be >= 0, got {deps.min()}")
    total = r if pad_to is None else int(pad_to)
    if total < r:
        raise ValueError(f"pad_to={pad_to} is smaller than the number of rows R={r}")
    if total < 1:
        raise ValueError("make_rows needs at least one row (or pad_to >= 1)")
    pad = total - r

    def padded(a, fill, dtype):
        return jnp.asarray(np.concatenate([a, np.full((pad,) + a.shape[1:], fill)]).astype(dtype))

    return TaskRows(
        valid=padded(np.ones((r,), bool), False, np.bool_),
        parent_id=padded(parents, NO_TASK, np.int32),
        competition_id=padded(comps, 0, np.int32),
        depth=padded(deps, 0, np.int32),
        state_hash=padded(hashes.astype(np.uint32), 0, np.uint32),
    )


def state_hash(text: str) -> np.ndarray:
    """A stable 64-bit hash of a task's text state, as [2] uint32 (BLAKE2b, little-endian words).

    Stable across processes and Python versions (unlike `hash()`), so merged duplicates survive a
    checkpoint-restore.
    """
    if not isinstance(text, str):
        raise TypeError(f"state_hash takes the task's text state as str, got {type(text).__name__}")
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


def check_table(table: TaskTable) -> int:
    """Checks column shapes and dtypes at trace time; returns the capacity C."""
    if not isinstance(table, TaskTable):
        raise TypeError(f"expected a TaskTable, got {type(table).__name__}")
    c = table.valid.shape[-1] if table.valid.ndim else None
    expected = {
        "valid": ((c,), jnp.bool_), "task_id": ((c,), jnp.int32), "parent_id": ((c,), jnp.int32),
        "competition_id": ((c,), jnp.int32), "depth": ((c,), jnp.int32), "visits": ((c,), jnp.int32),
        "successes": ((c,), jnp.int32), "reward_mean": ((c,), jnp.float32),
        "reward_var": ((c,), jnp.float32), "recent_success_rate": ((c,), jnp.float32),
        "recent_reward_std": ((c,), jnp.float32), "last_sampled_step": ((c,), jnp.int32),
        "created_step": ((c,), jnp.int32), "state_hash": ((c, 2), jnp.uint32),
        "next_task_id": ((), jnp.int32),
    }
    for name, (shape, dtype) in expected.items():
        col = getattr(table, name)
        if tuple(col.shape) != shape or col.dtype != dtype:
            raise ValueError(f"TaskTable.{name} must be {shape} {jnp.dtype(dtype).name} "
                             f"(capacity {c}), got {tuple(col.shape)} {col.dtype}")
    return c


def stats(table: TaskTable) -> dict[str, jax.Array]:
    """Scalar summaries for logging (jit-able); names are stable.

    Returns a flat dict of [] arrays: size, fill_fraction, never_tried_fraction, mean_visits,
    mean_success_rate (successes / attempts of tried tasks), mean_reward (average reward mean of
    tried tasks), mean_depth, max_depth, num_roots.
    """
    check_table(table)
    valid = table.valid
    size = valid.sum()
    n = jnp.maximum(size, 1).astype(jnp.float32)
    tried = valid & (table.visits > 0)
    n_tried = jnp.maximum(tried.sum(), 1).astype(jnp.float32)
    visits = jnp.where(tried, table.visits, 0).astype(jnp.float32)
    return {
        "size": size.astype(jnp.int32),
        "fill_fraction": size / table.capacity,
        "never_tried_fraction": (valid & ~tried).sum() / n,
        "mean_visits": visits.sum() / n,
        "mean_success_rate": jnp.where(tried, table.successes, 0).sum() / jnp.maximum(visits.sum(), 1.0),
        "mean_reward": jnp.where(tried, table.reward_mean, 0.0).sum() / n_tried,
        "mean_depth": jnp.where(valid, table.depth, 0).sum() / n,
        "max_depth": jnp.where(valid, table.depth, 0).max(),
        "num_roots": (valid & (table.parent_id == NO_TASK)).sum().astype(jnp.int32),
    }
