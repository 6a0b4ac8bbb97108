"""A competition (what the agent must solve) and the result of grading one submission.

A competition is plain data: a description, a public folder that is copied into the agent's
workspace (`train.csv`, `test.csv`, `sample_submission.csv`, ...), a private folder holding the
answers (never copied into a workspace), a metric with its direction, and the scores of the
teams on its leaderboard. Grading lives in `ace.env.grading`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

TASK_TYPES = ("binary", "multiclass", "regression", "multioutput", "image")

# Every way a submission can be invalid; `GradeResult.reason` is one of these.
INVALID_REASONS = (
    "missing_file",
    "unreadable",
    "wrong_columns",
    "bad_ids",
    "duplicate_ids",
    "wrong_rows",
    "nan_values",
    "out_of_range",
    "wrong_dtype",
)

MEDALS = ("gold", "silver", "bronze")


@dataclass(frozen=True)
class Competition:
    """One competition: description, public and private data, metric, direction, leaderboard.

    Attributes:
      comp_id: stable identifier, e.g. "iris-species".
      description: markdown shown to the agent.
      public_dir: folder copied read-only into the workspace as `./data/`.
      private_dir: folder with `answers_file`; graders read it, workspaces never see it.
      metric: a name in `ace.env.grading.METRICS`.
      higher_is_better: direction of `metric` (False for losses and errors).
      id_column: name of the row identifier column in test, answers and submissions.
      target_columns: the prediction columns a submission must hold besides `id_column`.
      leaderboard: team scores (any order); empty means "no medals can be computed".
      task_type: one of TASK_TYPES.
      answers_file: file name inside `private_dir`; same columns as a submission.
      sample_submission_file: file name inside `public_dir`.
    """

    comp_id: str
    description: str
    public_dir: Path
    private_dir: Path
    metric: str
    higher_is_better: bool
    id_column: str
    target_columns: tuple[str, ...]
    leaderboard: tuple[float, ...]
    task_type: str
    answers_file: str = "answers.csv"
    sample_submission_file: str = "sample_submission.csv"

    def __post_init__(self) -> None:
        if not self.comp_id or not isinstance(self.comp_id, str):
            raise ValueError(f"comp_id must be a non-empty string, got {self.comp_id!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(
                f"{self.comp_id}: task_type={self.task_type!r}, expected one of {TASK_TYPES}"
            )
        if isinstance(self.target_columns, str) or not self.target_columns:
            raise ValueError(
                f"{self.comp_id}: target_columns={self.target_columns!r}, "
                "expected a non-empty tuple of column names"
            )
        if self.id_column in self.target_columns:
            raise ValueError(
                f"{self.comp_id}: id_column={self.id_column!r} also appears in target_columns"
            )
        if len(set(self.target_columns)) != len(self.target_columns):
            raise ValueError(f"{self.comp_id}: duplicate target_columns {self.target_columns!r}")
        # Normalise so that lists and paths given as strings compare and hash like tuples.
        object.__setattr__(self, "public_dir", Path(self.public_dir))
        object.__setattr__(self, "private_dir", Path(self.private_dir))
        object.__setattr__(self, "target_columns", tuple(self.target_columns))
        scores = tuple(float(s) for s in self.leaderboard)
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"{self.comp_id}: leaderboard holds non-finite scores {bad[:3]}")
        object.__setattr__(self, "leaderboard", scores)

    @property
    def answers_path(self) -> Path:
        return self.private_dir / self.answers_file

    @property
    def sample_submission_path(self) -> Path:
        return self.public_dir / self.sample_submission_file

    @property
    def num_teams(self) -> int:
        return len(self.leaderboard)


@dataclass(frozen=True)
class GradeResult:
    """The outcome of grading one submission file; invalid submissions are results too.

    Attributes:
      valid: the file passed every validity check and was scored.
      reason: None when valid, else one of INVALID_REASONS.
      detail: a human-readable explanation (what was found, what was expected).
      score: the metric value, None when invalid.
      medal: "gold" | "silver" | "bronze" | None.
      above_median: strictly better than the leaderboard's median score.
      human_rank: (teams - position + 1) / teams in [0, 1]; None when invalid or no leaderboard.
    """

    valid: bool
    reason: str | None
    detail: str
    score: float | None
    medal: str | None
    above_median: bool
    human_rank: float | None

    def __post_init__(self) -> None:
        if self.valid and self.reason is not None:
            raise ValueError(f"a valid GradeResult has reason=None, got {self.reason!r}")
        if not self.valid and self.reason not in INVALID_REASONS:
            raise ValueError(f"reason={self.reason!r}, expected one of {INVALID_REASONS}")
        if self.medal is not None and self.medal not in MEDALS:
            raise ValueError(f"medal={self.medal!r}, expected one of {MEDALS} or None")
        if not self.valid and (self.score is not None or self.medal is not None):
            raise ValueError("an invalid GradeResult carries no score and no medal")

    @classmethod
    def invalid(cls, reason: str, detail: str) -> GradeResult:
        return cls(
            valid=False, reason=reason, detail=detail, score=None, medal=None,
            above_median=False, human_rank=None,
        )

    @property
    def any_medal(self) -> bool:
        return self.medal is not None

    @property
    def gold(self) -> bool:
        return self.medal == "gold"

    @property
    def silver(self) -> bool:
        return self.medal == "silver"

    @property
    def bronze(self) -> bool:
        return self.medal == "bronze"
