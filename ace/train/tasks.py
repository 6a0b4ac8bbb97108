"""The curriculum as the trainer sees it: task references, the first table, draws, and each step's
buffer update.

The table (`ace.curriculum`) holds numbers and the `TaskStore` each task's text. A draw turns rows
into `TaskRef`s carrying the `AgentState` a rollout starts from; after a step the groups go back as
stats and, unless the `no_buffer` ablation switches children off, as child tasks one level deeper
(docs/architecture.md, "Learnability Potential"). Every function returns the new table (and the
new block index, when the curriculum keeps one: `curriculum_index`); only `apply_groups` also
changes the store, which is host-side state by design.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ace.curriculum import (CurriculumConfig, TaskRows, TaskTable, init_table, insert, make_rows, state_hash,
                            update_stats)
from ace.curriculum.block_index import (BlockIndex, build_index, insert_indexed, sample_indexed,
                                        update_stats_indexed)
from ace.curriculum.buffer import ADDED
from ace.curriculum.potential import ROW_LOCAL_POTENTIALS
from ace.curriculum.store import TaskPayload, TaskStore
from ace.env.agent import AgentState
from ace.train.queue import Group


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """A task drawn from the table: its row at draw time, id, competition index, depth and state."""

    row: int
    task_id: int
    comp_index: int
    depth: int
    state: AgentState | None  # None: the competition's initial state


def initial_curriculum(comp_ids: Sequence[str], curriculum: CurriculumConfig) -> tuple[TaskTable, TaskStore]:
    """A table and store holding one root task per training competition, competition i in row i.

    Raises ValueError when two competitions share an id (their initial states would merge).
    """
    table = init_table(curriculum.capacity)
    store = TaskStore()
    payloads = [TaskPayload(competition=c) for c in comp_ids]
    rows = make_rows(-1, np.arange(len(comp_ids)), 0, np.stack([state_hash(p.text()) for p in payloads]))
    table, result = insert(table, rows, step=0, potential=curriculum.potential,
                           optimistic_value=curriculum.optimistic_value)
    store.apply_insert(result, payloads)
    if int(np.sum(np.asarray(result.status) == ADDED)) != len(comp_ids):
        raise ValueError("two training competitions share one id; their initial tasks merged")
    return table, store


# Samplers the block index draws for, with their eps-uniform weight: "uniform" is the mixture's
# eps = 1 end.
INDEXED_SAMPLERS = {"learnability": lambda c: c.uniform_mix, "uniform": lambda c: 1.0}


def curriculum_index(table: TaskTable, curriculum: CurriculumConfig) -> BlockIndex | None:
    """The block index of `table` when `curriculum` can use one (`block_index` on, a row-local
    potential, a sampler the index draws for), else None: the full-table functions run."""
    if (not curriculum.block_index or curriculum.potential not in ROW_LOCAL_POTENTIALS
            or curriculum.sampler not in INDEXED_SAMPLERS):
        return None
    return build_index(table, temperature=curriculum.temperature, potential=curriculum.potential,
                       optimistic_value=curriculum.optimistic_value)


def draw_tasks(sampler: Callable[..., jax.Array], key: jax.Array, table: TaskTable, store: TaskStore, n: int, *,
               step: int, curriculum: CurriculumConfig, index: BlockIndex | None = None) -> list[TaskRef]:
    """n distinct tasks by `sampler` (a registered curriculum sampler), each with its state from the store.

    With a block index the draw goes through it (`sample_indexed`: the same distribution)."""
    if index is not None:
        rows = np.asarray(sample_indexed(key, table, index, n,
                                         eps_uniform=INDEXED_SAMPLERS[curriculum.sampler](curriculum)))
    else:
        rows = np.asarray(sampler(key, table, n, step=jnp.int32(step), **curriculum.sampler_kwargs()))
    task_ids = np.asarray(table.task_id)[rows]
    comp_ids = np.asarray(table.competition_id)[rows]
    depths = np.asarray(table.depth)[rows]
    out = []
    for row, tid, cid, depth in zip(rows, task_ids, comp_ids, depths):
        payload = store[int(tid)]
        state = AgentState.from_json(payload.prefix) if payload.prefix else None
        out.append(TaskRef(int(row), int(tid), int(cid), int(depth), state))
    return out


def record_groups(table: TaskTable, groups: Sequence[Group], *, step: int,
                  index: BlockIndex | None = None) -> tuple[TaskTable, list[int], BlockIndex | None]:
    """`update_stats` with each group's rewards and successes, for the tasks still in the table.

    Returns the new table, the rows updated, in group order, and the new index (None without one).
    A task drawn by a rollout worker can be evicted before its group is back; its group then
    updates nothing.
    """
    task_ids = np.asarray(table.task_id)
    valid = np.asarray(table.valid)
    rows, rewards, success = [], [], []
    for g in groups:
        hit = np.flatnonzero(valid & (task_ids == g.task_id))
        if hit.size:
            rows.append(int(hit[0]))
            rewards.append([s.reward for s in g.samples])
            success.append([s.extra["success"] for s in g.samples])
    if rows:
        args = (np.asarray(rows, np.int32), np.asarray(rewards, np.float32), np.asarray(success, bool), int(step))
        if index is not None:
            table, index = update_stats_indexed(table, index, *args)
        else:
            table = update_stats(table, *args)
    return table, rows, index


def child_tasks(groups: Sequence[Group], tasks: Mapping[int, TaskRef], comp_ids: Sequence[str], *,
                max_children: int) -> tuple[TaskRows, list[TaskPayload]] | None:
    """The states the groups' executed, non-final steps reached, as candidate rows for `insert`.

    Args:
      groups: the step's groups; each sample's `extra["children"]` holds (depth offset, state).
      tasks: id(group) -> the task the group started from (the parent).
      comp_ids: competition index -> competition id.
      max_children: the fixed number of candidate rows (one compiled insert); later states are cut.
    Returns:
      (rows padded to `max_children`, the payload of each real row), or None when there is none.
    """
    cands: list[tuple[TaskRef, int, AgentState]] = []
    for g in groups:
        task = tasks[id(g)]
        for s in g.samples:
            for offset, state in s.extra["children"]:
                cands.append((task, task.depth + offset, state))
    if not cands:
        return None
    cands = cands[:max_children]
    payloads = [TaskPayload(competition=comp_ids[t.comp_index], prefix=st.to_json(), best_code=st.best_code,
                            best_score=st.best_score) for t, _, st in cands]
    # The hash ignores wall-clock times (state_key), so equal histories merge into one task.
    hashes = np.stack([state_hash(f"{p.competition}\x00{st.state_key()}") for p, (_, _, st) in zip(payloads, cands)])
    rows = make_rows([t.task_id for t, _, _ in cands], [t.comp_index for t, _, _ in cands],
                     [d for _, d, _ in cands], hashes, pad_to=max_children)
    return rows, payloads


def apply_groups(table: TaskTable, store: TaskStore, groups: Sequence[Group], tasks: Mapping[int, TaskRef], *,
                 step: int, curriculum: CurriculumConfig, comp_ids: Sequence[str], children: bool,
                 max_children: int, n_protected: int,
                 index: BlockIndex | None = None) -> tuple[TaskTable, BlockIndex | None]:
    """The Evolving Data Buffer after one step: stats of the groups' tasks, then their children.

    Args:
      table, store: the curriculum before the step; the store is updated in place.
      groups, tasks: the step's groups and id(group) -> the task each started from.
      step: the learner step the stats are recorded at.
      children: insert child tasks (False under the `no_buffer` ablation: stats only).
      max_children: candidate rows per insert (see `child_tasks`).
      n_protected: how many of the updated rows (the tasks just rolled out) eviction must spare.
      index: the table's block index (`curriculum_index`), or None for the full-table functions.
    Returns:
      The new table and index; `store` then holds exactly the table's live tasks.
    """
    table, sampled_rows, index = record_groups(table, groups, step=step, index=index)
    if not children:
        return table, index
    cands = child_tasks(groups, tasks, comp_ids, max_children=max_children)
    if cands is None:
        return table, index
    rows, payloads = cands
    # The tasks just rolled out keep their fresh stats: their rows are never evicted here.
    protected = np.full(n_protected, -1, np.int32)
    kept = sampled_rows[:n_protected]
    protected[:len(kept)] = kept
    if index is not None:
        table, index, result = insert_indexed(table, index, rows, step=int(step), protected=protected,
                                              max_depth=curriculum.max_depth)
    else:
        table, result = insert(table, rows, step=int(step), protected=protected, potential=curriculum.potential,
                               optimistic_value=curriculum.optimistic_value, max_depth=curriculum.max_depth)
    payload_rows: list[Any] = payloads + [None] * (max_children - len(payloads))
    store.apply_insert(result, payload_rows)
    return table, index
