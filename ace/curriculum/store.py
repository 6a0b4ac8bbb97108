"""Host-side TaskStore: the text payload of every live task, keyed by task id.

The array table holds numbers only (docs/architecture.md, "Invariants", 2). The store mirrors it:
after every `insert`, `apply_insert(result, payloads)` adds the payloads of added tasks and drops
those of evicted ones, so the store's ids always equal the table's live task ids
(`check_consistent`). The store does no file I/O: `state_dict()` / `from_state_dict()` exchange
plain JSON-able data with the trainer's checkpointer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import numpy as np

from ace.curriculum.buffer import ADDED, DROPPED, MERGED, PADDING, STATUS_NAMES, TOO_DEEP, InsertResult
from ace.curriculum.table import TaskTable

STATE_DICT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TaskPayload:
    """The text of one task.

    competition: competition name; prefix: the trajectory prefix (actions with their execution
    feedback) that leads to this state, "" for an initial state; best_code / best_score: the best
    submission found so far on this path (None before any valid one).
    """

    competition: str
    prefix: str = ""
    best_code: str | None = None
    best_score: float | None = None

    def __post_init__(self):
        if not isinstance(self.competition, str) or not self.competition:
            raise ValueError(f"TaskPayload.competition must be a non-empty str, got {self.competition!r}")
        if not isinstance(self.prefix, str):
            raise TypeError(f"TaskPayload.prefix must be a str, got {type(self.prefix).__name__}")
        if self.best_code is not None and not isinstance(self.best_code, str):
            raise TypeError(f"TaskPayload.best_code must be a str or None, got {type(self.best_code).__name__}")
        if self.best_score is not None:
            score = float(self.best_score)
            if not math.isfinite(score):
                raise ValueError(f"TaskPayload.best_score must be finite or None, got {self.best_score!r}")
            object.__setattr__(self, "best_score", score)

    def text(self) -> str:
        """The text whose `state_hash` identifies this task's state."""
        return f"{self.competition}\x00{self.prefix}"


class TaskStore:
    """Payloads of the live tasks, by task id. Mutated only through `apply_insert` / `update_best`."""

    def __init__(self) -> None:
        self._payloads: dict[int, TaskPayload] = {}

    def __len__(self) -> int:
        return len(self._payloads)

    def __contains__(self, task_id: int) -> bool:
        return int(task_id) in self._payloads

    def __getitem__(self, task_id: int) -> TaskPayload:
        try:
            return self._payloads[int(task_id)]
        except KeyError:
            raise KeyError(f"task id {task_id} is not in the TaskStore ({len(self)} live tasks)") from None

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._payloads))

    def ids(self) -> set[int]:
        return set(self._payloads)

    def apply_insert(self, result: InsertResult, payloads: Sequence[TaskPayload | None]) -> None:
        """Mirrors an `insert`: stores the payloads of added rows, forgets evicted tasks.

        Args:
          result: the InsertResult of `insert` ([R] arrays).
          payloads: R entries aligned with the candidate rows given to `insert`; entries of padding
            rows may be None.

        The whole result is validated before anything changes, so a bad call leaves the store as it
        was.
        """
        status = np.asarray(result.status)
        task_id = np.asarray(result.task_id)
        evicted = np.asarray(result.evicted_task_id)
        if status.ndim != 1:
            raise ValueError(f"result.status must be [R], got shape {status.shape}")
        if len(payloads) != status.shape[0]:
            raise ValueError(f"got {len(payloads)} payloads for an InsertResult of R={status.shape[0]} rows")
        unknown = ~np.isin(status, list(STATUS_NAMES))
        if unknown.any():
            raise ValueError(f"result.status[{int(np.flatnonzero(unknown)[0])}] is not a known status code")
        added_ids, evicted_ids = [], []
        for i, st in enumerate(status):
            if st == ADDED:
                if not isinstance(payloads[i], TaskPayload):
                    raise TypeError(f"payloads[{i}] must be a TaskPayload for an added row, got "
                                    f"{type(payloads[i]).__name__}")
                added_ids.append(int(task_id[i]))
                if evicted[i] >= 0:
                    evicted_ids.append(int(evicted[i]))
            elif st == MERGED and int(task_id[i]) not in self._payloads and int(task_id[i]) not in added_ids:
                raise ValueError(f"row {i} was merged into task {int(task_id[i])}, which the store does not hold")
            elif st in (PADDING, DROPPED, TOO_DEEP):
                continue
        missing = [t for t in evicted_ids if t not in self._payloads]
        if missing:
            raise ValueError(f"InsertResult evicts task ids {missing} that the store does not hold")
        clash = [t for t in added_ids if t in self._payloads and t not in evicted_ids]
        if clash:
            raise ValueError(f"InsertResult adds task ids {clash} that the store already holds")
        for t in evicted_ids:
            del self._payloads[t]
        for i, st in enumerate(status):
            if st == ADDED:
                self._payloads[int(task_id[i])] = payloads[i]

    def update_best(self, task_id: int, *, code: str, score: float, higher_is_better: bool) -> bool:
        """Records a submission for a task if it beats the best so far; returns True if it did."""
        old = self[task_id]
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"score must be finite, got {score!r}")
        better = (old.best_score is None or (score > old.best_score if higher_is_better
                                             else score < old.best_score))
        if better:
            self._payloads[int(task_id)] = dataclasses.replace(old, best_code=code, best_score=score)
        return better

    def check_consistent(self, table: TaskTable) -> None:
        """Raises if the table's live task ids and the store's ids differ (orphan rows or payloads)."""
        valid = np.asarray(table.valid)
        live = np.asarray(table.task_id)[valid]
        live_ids = set(int(t) for t in live)
        if len(live_ids) != live.size:
            raise AssertionError("the table holds duplicate task ids")
        orphan_rows = sorted(live_ids - self.ids())
        orphan_payloads = sorted(self.ids() - live_ids)
        if orphan_rows or orphan_payloads:
            raise AssertionError(f"table and TaskStore disagree: rows without payload {orphan_rows[:10]}, "
                                 f"payloads without row {orphan_payloads[:10]}")

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able data for the checkpoint (no file I/O here)."""
        return {
            "version": STATE_DICT_VERSION,
            "tasks": [{"task_id": t, **dataclasses.asdict(self._payloads[t])} for t in sorted(self._payloads)],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TaskStore":
        """Rebuilds a store from `state_dict()` output."""
        if not isinstance(state, dict) or state.get("version") != STATE_DICT_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"TaskStore state must be a dict with version {STATE_DICT_VERSION}, got {got!r}")
        store = cls()
        fields = {f.name for f in dataclasses.fields(TaskPayload)}
        for entry in state["tasks"]:
            entry = dict(entry)
            tid = int(entry.pop("task_id"))
            if set(entry) != fields:
                raise ValueError(f"task {tid}: payload fields {sorted(entry)}, expected {sorted(fields)}")
            if tid in store._payloads:
                raise ValueError(f"task id {tid} appears twice in the TaskStore state")
            store._payloads[tid] = TaskPayload(**entry)
        return store
