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

TASK_TYPES = ("binary", "multiclass", "multilabel", "regression", "multioutput", "image", "text", "audio")

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
    "not_normalized",
    "metric_error",
)

PAIRINGS = ("id", "sorted", "position")
SCORED_ROWS = ("all", "nonnegative_answers")
LABEL_POLICIES = ("known", "any")


@dataclass(frozen=True)
class SubmissionRules:
    """How a competition checks a submission and pairs it with the answers.

    MLE-bench's graders differ here competition by competition; the defaults are the strict
    rules of the built-in suite. Attributes:
      pairing: "id" pairs rows by the id column (the submission's ids must be the answers' ids);
        "sorted" sorts both by id and pairs them in that order without comparing the ids;
        "position" pairs row i with answer row i and does not look at ids.
      extra_columns: columns besides the id and targets are ignored (True) or make the
        submission invalid (False).
      columns_by_position: the submission's non-id columns, in the file's order, are the
        targets in `target_columns` order (names must still all be there); False: by name.
      labels: for label metrics, "known" accepts only labels seen in the answers or the public
        train.csv; "any" accepts any value of the answers' type (any number; any text, where
        empty and NA-like cells read as the text "nan", as pandas' default reader gives).
      sum_to_one: the target columns of every row must sum to 1 (np.isclose, atol 1e-6).
      scored_rows: "all", or "nonnegative_answers": answer rows whose targets sum below 0 (-1
        marks "not scored") are left out of the score.
      round_digits: the score is rounded to this many decimals before ranking (None: not rounded).
    """

    pairing: str = "id"
    extra_columns: bool = False
    columns_by_position: bool = False
    labels: str = "known"
    sum_to_one: bool = False
    scored_rows: str = "all"
    round_digits: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("pairing", PAIRINGS), ("labels", LABEL_POLICIES),
                              ("scored_rows", SCORED_ROWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SubmissionRules.{name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.round_digits is not None and not 0 <= self.round_digits <= 15:
            raise ValueError(f"SubmissionRules.round_digits={self.round_digits!r}, expected None or 0..15")

MEDALS = ("gold", "silver", "bronze")


@dataclass(frozen=True)
class Competition:
    """One competition: description, public and private data, metric, direction, leaderboard.

    Attributes:
      comp_id: stable identifier, e.g. "iris-species".
      description: markdown shown to the agent.
      public_dir: folder copied read-only into the workspace as `./data/`.
      private_dir: folder with `answers_file`; graders read it, workspaces never see it.
      metric: a name in `ace.env.metrics.METRICS`.
      higher_is_better: direction of `metric` (False for losses and errors).
      id_column: name of the row identifier column in test, answers and submissions.
      target_columns: the prediction columns a submission must hold besides `id_column`.
      leaderboard: team scores (any order); empty means "no medals can be computed".
      task_type: one of TASK_TYPES.
      answers_file: file name inside `private_dir`; holds the id and target columns.
      sample_submission_file: file name inside `public_dir` (may be zipped: pandas reads it).
      rules: how submissions are checked and paired with the answers (`SubmissionRules`).
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
    rules: SubmissionRules = SubmissionRules()

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
