"""The agent's episode state as data: `AgentState` and the `StepRecord` of each past action.

An episode is MLE-Dojo-like: each turn the model sees the competition, a data summary and the
history of its actions with their feedback (the prompt: `ace.env.prompt`), and answers with exactly
one tagged action (the action format: `ace.env.actions`).

`AgentState` is a frozen dataclass that serialises to JSON, so an episode can start from any
intermediate state (the Evolving Data Buffer stores them). The episode loop lives in `ace.env.gym`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

STATE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one past action did, as shown back to the agent.

    `valid` and `score` are None when the action did not produce a graded submission;
    `note` holds a format-error message or the request_info answer (tail).
    """

    kind: str                      # an ace.env.actions.ACTION_KINDS entry, or "format_error"
    content: str                   # code, topic, or the (truncated) malformed output
    stdout_tail: str = ""
    stderr_tail: str = ""
    valid: bool | None = None
    score: float | None = None
    invalid_reason: str | None = None
    note: str = ""
    duration_s: float = 0.0
    timed_out: bool = False
    returncode: int | None = None
    milestones: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AgentState:
    """The state of an episode: plain data, serialisable, hashable into the curriculum.

    `step` counts actions taken so far (format errors included); the episode ends when the agent
    submits, when `step == max_steps`, or when `time_used_s` reaches `time_limit_s` (None = no limit).
    """

    comp_id: str
    max_steps: int
    step: int = 0
    history: tuple[StepRecord, ...] = ()
    best_score: float | None = None
    best_code: str | None = None
    best_step: int | None = None
    submitted: bool = False
    time_used_s: float = 0.0
    time_limit_s: float | None = None

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.step <= self.max_steps:
            raise ValueError(f"step must be in [0, max_steps={self.max_steps}], got {self.step}")
        if len(self.history) != self.step:
            raise ValueError(f"history has {len(self.history)} records but step is {self.step}")
        if (self.best_score is None) != (self.best_code is None):
            raise ValueError("best_score and best_code must be both set or both None")

    @property
    def done(self) -> bool:
        out_of_time = self.time_limit_s is not None and self.time_used_s >= self.time_limit_s
        return self.submitted or self.step >= self.max_steps or out_of_time

    @property
    def steps_left(self) -> int:
        return self.max_steps - self.step

    @classmethod
    def initial(cls, comp_id: str, *, max_steps: int, time_limit_s: float | None = None) -> "AgentState":
        return cls(comp_id=comp_id, max_steps=max_steps, time_limit_s=time_limit_s)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["version"] = STATE_FORMAT_VERSION
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AgentState":
        data = json.loads(text)
        version = data.pop("version", None)
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"AgentState JSON version {version!r}, expected {STATE_FORMAT_VERSION}")
        records = []
        for rec in data.pop("history"):
            rec["milestones"] = tuple(rec.get("milestones", ()))
            records.append(StepRecord(**rec))
        return cls(history=tuple(records), **data)

    def state_key(self) -> str:
        """A stable hex digest of what makes two states the same task.

        Wall-clock durations are left out so that two episodes taking the same actions with the
        same feedback map to one key; scores are rounded to 9 significant digits.
        """
        def rnd(x):
            return None if x is None else float(f"{x:.9g}")
        canon = {
            "comp_id": self.comp_id, "max_steps": self.max_steps, "step": self.step,
            "best_score": rnd(self.best_score), "submitted": self.submitted,
            "history": [[r.kind, r.content.strip(), r.valid, rnd(r.score), r.invalid_reason,
                         r.timed_out, r.returncode] for r in self.history],
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
