"""The whole state of a run, saved and restored together (docs/architecture.md, "Invariants", 9).

Under `<out_dir>/checkpoints/<step>/` orbax saves the arrays: the learner state (float32 params,
optimizer state, step, RNG), the task table and the trainer's RNG key. The JSON metadata holds the
step, the weight version and the `TaskStore`. Saving them as one checkpoint is what makes a resumed
run's next step equal an uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ace.curriculum import TaskTable
from ace.curriculum.store import TaskStore
from ace.models.checkpoint import Checkpointer
from ace.train.learner import LearnerState
from ace.train.multihost import localize, multi_process, replicate


@dataclasses.dataclass
class RunState:
    """learner: the learner's state; table, store: the curriculum; key: the trainer's RNG key;
    step: learner steps done; version: the weight version the learner's params are."""

    learner: LearnerState
    table: TaskTable
    store: TaskStore
    key: jax.Array
    step: int
    version: int


def _arrays(state: RunState, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """The tree orbax saves. With several processes every one saves the same tree of global arrays:
    the table and key, identical on every process, become arrays replicated over the learner's mesh."""
    if multi_process():
        return {"learner": state.learner, "table": replicate(state.table, mesh), "key": replicate(state.key, mesh)}
    return {"learner": state.learner, "table": state.table, "key": state.key}


def save_run(ckpt: Checkpointer, state: RunState, mesh: jax.sharding.Mesh | None = None) -> None:
    """Saves `state` as checkpoint `state.step` and waits until it is on disk."""
    ckpt.save(state.step, _arrays(state, mesh), metadata={
        "step": state.step, "version": state.version, "store": state.store.state_dict()})
    ckpt.wait()


def restore_run(ckpt: Checkpointer, like: RunState, mesh: jax.sharding.Mesh | None = None) -> RunState | None:
    """The latest checkpoint's state, its arrays placed like `like`'s; None when there is none.

    Raises AssertionError when the restored store does not hold exactly the table's live tasks.
    """
    if ckpt.latest_step() is None:
        return None
    target = jax.tree.map(lambda x: x.sharding, _arrays(like, mesh))
    arrays, meta = ckpt.restore(target_shardings=target)
    table, key = arrays["table"], arrays["key"]
    if multi_process():
        table, key = localize(table), localize(key)
    store = TaskStore.from_state_dict(meta["store"])
    store.check_consistent(table)
    return RunState(learner=arrays["learner"], table=table, store=store, key=key, step=int(meta["step"]),
                    version=int(meta["version"]))
