"""MLE-bench grading reports: one per graded submission, and their aggregate as a JSON file.

MLE-bench (`mlebench/grade.py`) grades each submission of a run into a `CompetitionReport` and
sums the reports of a run into one summary, saved as `<timestamp>_grading_report.json`. These
functions write the same documents from our own grades (`ace.env.grading`), so that tools that
read MLE-bench's reports read ours.

A competition report (`competition_report`) holds exactly REPORT_FIELDS:

  competition_id               the competition (`Competition.comp_id`).
  score                        the submission's metric value; null when there is no valid one.
  gold_threshold, silver_threshold, bronze_threshold
                               the score a submission must reach (>= when higher is better, <=
                               otherwise) for that medal: the leaderboard score at the cut-off
                               position of Kaggle's progression rules (`ace.env.grading`);
                               null when the competition has no leaderboard.
  median_threshold             the median leaderboard score; above_median needs a score strictly
                               better than it. Null without a leaderboard.
  any_medal                    gold_medal or silver_medal or bronze_medal.
  gold_medal, silver_medal, bronze_medal
                               the best medal reached; at most one of them is true.
  above_median                 the score is strictly better than median_threshold.
  submission_exists            the submission file exists.
  valid_submission             the submission passed every check and was scored (has a score).
  is_lower_better              the metric's direction (lower scores are better).
  created_at                   when the report was made (ISO 8601).
  submission_path              the submission file graded (a string; null when none was named).

Transcripts (`write_transcripts`) are ours, not MLE-bench's: one JSON file per episode with each
step's action, outcome, reward and observation, for reading why an episode failed.

The aggregate (`aggregate_reports`) holds AGGREGATE_FIELDS: total_runs (reports),
total_runs_with_submissions (submission_exists), total_valid_submissions (valid_submission),
total_medals (gold + silver + bronze), total_gold_medals, total_silver_medals,
total_bronze_medals, total_above_median, and competition_reports (the list of reports).
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ace.env.medals import medal_thresholds
from ace.env.task import GradeResult

REPORT_FIELDS = (
    "competition_id", "score", "gold_threshold", "silver_threshold", "bronze_threshold",
    "median_threshold", "any_medal", "gold_medal", "silver_medal", "bronze_medal", "above_median",
    "submission_exists", "valid_submission", "is_lower_better", "created_at", "submission_path",
)
_BOOL_FIELDS = ("any_medal", "gold_medal", "silver_medal", "bronze_medal", "above_median",
                "submission_exists", "valid_submission", "is_lower_better")
_FLOAT_FIELDS = ("score", "gold_threshold", "silver_threshold", "bronze_threshold", "median_threshold")

# (aggregate key, the report field it counts); total_medals counts any_medal.
_COUNTS = (
    ("total_runs_with_submissions", "submission_exists"),
    ("total_valid_submissions", "valid_submission"),
    ("total_medals", "any_medal"),
    ("total_gold_medals", "gold_medal"),
    ("total_silver_medals", "silver_medal"),
    ("total_bronze_medals", "bronze_medal"),
    ("total_above_median", "above_median"),
)
AGGREGATE_FIELDS = ("total_runs", *(k for k, _ in _COUNTS), "competition_reports")
REPORT_SUFFIX = "_grading_report.json"


def competition_report(comp: Any, grade: GradeResult | None, submission_path: Path | str | None, *,
                       created_at: datetime | None = None) -> dict[str, Any]:
    """MLE-bench's CompetitionReport (as its JSON dict) for one graded submission.

    Args:
      comp: the `ace.env.task.Competition` the submission is for.
      grade: its `ace.env.task.GradeResult`; None when nothing was submitted (no file was graded).
      submission_path: the submission file (whether or not it exists); None when there is none.
      created_at: the report's time (default: now, UTC).
    Returns:
      {field: value} with exactly REPORT_FIELDS, in MLE-bench's order (see the module docstring).
    Raises:
      TypeError: `grade` is neither a GradeResult nor None, or `created_at` is not a datetime.
      ValueError: a valid grade without a file at `submission_path`.
    """
    if grade is not None and not isinstance(grade, GradeResult):
        raise TypeError(f"{comp.comp_id}: grade must be an ace.env.task.GradeResult or None, "
                        f"got {type(grade).__name__}")
    if created_at is None:
        created_at = datetime.now(timezone.utc)
    if not isinstance(created_at, datetime):
        raise TypeError(f"created_at must be a datetime or None, got {type(created_at).__name__}")
    exists = submission_path is not None and Path(submission_path).is_file()
    # A grade without a score (a format check of validate_code) is no valid submission.
    valid = grade is not None and bool(grade.valid) and grade.score is not None
    if valid and not exists:
        raise ValueError(f"{comp.comp_id}: the grade is valid but there is no submission file at "
                         f"{submission_path!r}; pass the file that was graded")
    if comp.leaderboard:
        cuts = medal_thresholds(comp.leaderboard, comp.higher_is_better)
        gold, silver, bronze, median = (float(cuts.gold), float(cuts.silver), float(cuts.bronze),
                                        float(cuts.median))
    else:
        gold = silver = bronze = median = None
    medal = grade.medal if valid else None
    return {
        "competition_id": str(comp.comp_id),
        "score": float(grade.score) if valid else None,
        "gold_threshold": gold,
        "silver_threshold": silver,
        "bronze_threshold": bronze,
        "median_threshold": median,
        "any_medal": medal is not None,
        "gold_medal": medal == "gold",
        "silver_medal": medal == "silver",
        "bronze_medal": medal == "bronze",
        "above_median": bool(grade.above_median) if valid else False,
        "submission_exists": bool(exists),
        "valid_submission": bool(valid),
        "is_lower_better": not bool(comp.higher_is_better),
        "created_at": created_at.isoformat(),
        "submission_path": None if submission_path is None else str(submission_path),
    }


def check_report(report: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first defect of a competition report (fields and their types)."""
    if not isinstance(report, Mapping):
        raise ValueError(f"a competition report is a dict, got {type(report).__name__}")
    name = report.get("competition_id", "<no competition_id>")
    missing = [f for f in REPORT_FIELDS if f not in report]
    if missing:
        raise ValueError(f"competition report {name!r} is missing the field(s) {missing}")
    extra = sorted(set(report) - set(REPORT_FIELDS))
    if extra:
        raise ValueError(f"competition report {name!r} has unknown field(s) {extra}; "
                         f"expected exactly {list(REPORT_FIELDS)}")
    if not isinstance(report["competition_id"], str) or not report["competition_id"]:
        raise ValueError(f"competition report: competition_id must be a non-empty string, "
                         f"got {report['competition_id']!r}")
    for f in _BOOL_FIELDS:
        if not isinstance(report[f], bool):
            raise ValueError(f"competition report {name!r}: {f} must be a bool, got {report[f]!r}")
    for f in _FLOAT_FIELDS:
        v = report[f]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"competition report {name!r}: {f} must be a finite number or null, got {v!r}")
    medals = [report[f] for f in ("gold_medal", "silver_medal", "bronze_medal")]
    if sum(medals) > 1 or report["any_medal"] != any(medals):
        raise ValueError(f"competition report {name!r}: at most one medal, and any_medal must equal "
                         f"gold or silver or bronze (got {medals}, any_medal={report['any_medal']})")
    if report["valid_submission"] and (report["score"] is None or not report["submission_exists"]):
        raise ValueError(f"competition report {name!r}: a valid submission has a score and a file")


def aggregate_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MLE-bench's summary of a run's competition reports (counts as ints, then the reports).

    Args:
      reports: competition reports (`competition_report` dicts, each with exactly REPORT_FIELDS).
    Returns:
      {field: value} with exactly AGGREGATE_FIELDS (see the module docstring).
    Raises:
      ValueError: a report misses a field, has an unknown one, or a value of the wrong type.
    """
    if isinstance(reports, Mapping) or isinstance(reports, (str, bytes)):
        raise ValueError("aggregate_reports takes a list of competition reports, got "
                         f"{type(reports).__name__}")
    reports = [dict(r) if isinstance(r, Mapping) else r for r in reports]
    for r in reports:
        check_report(r)
    out: dict[str, Any] = {"total_runs": len(reports)}
    for key, field in _COUNTS:
        out[key] = int(sum(bool(r[field]) for r in reports))
    out["competition_reports"] = reports
    return out


def _timestamp() -> str:
    """MLE-bench's report timestamp, `YYYY-MM-DDTHH-MM-SS-UTC` (UTC)."""
    return time.strftime("%Y-%m-%dT%H-%M-%S-UTC", time.gmtime())


def write_grading_report(aggregate: Mapping[str, Any], out_dir: Path | str) -> Path:
    """Writes `aggregate` to `<out_dir>/<UTC timestamp>_grading_report.json` (indent 2).

    Creates `out_dir`. A second report in the same second gets `-1`, `-2`, ... after the
    timestamp rather than overwriting the first.
    Raises:
      ValueError: `aggregate` misses one of AGGREGATE_FIELDS, has others, or holds a bad report.
    """
    missing = [f for f in AGGREGATE_FIELDS if f not in aggregate]
    if missing:
        raise ValueError(f"grading report is missing the field(s) {missing}; build it with aggregate_reports")
    extra = sorted(set(aggregate) - set(AGGREGATE_FIELDS))
    if extra:
        raise ValueError(f"grading report has unknown field(s) {extra}; expected exactly {list(AGGREGATE_FIELDS)}")
    for r in aggregate["competition_reports"]:
        check_report(r)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _timestamp()
    text = json.dumps(dict(aggregate), indent=2)
    for i in range(1000):
        path = out_dir / f"{stamp}{f'-{i}' if i else ''}{REPORT_SUFFIX}"
        try:
            with open(path, "x") as fh:   # never overwrite an earlier report
                fh.write(text)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{out_dir}: 1000 grading reports already carry the timestamp {stamp}")


def episode_transcript(episode: Any) -> dict[str, Any]:
    """An `ace.env.episode.Episode` as plain data: per step the action as the model wrote it (or the
    text that held no action, with the format error), the outcome, the reward and the observation."""
    from ace.env.actions import Action, format_action

    steps = []
    for i, step in enumerate(episode.steps, 1):
        action = step.action
        parsed = isinstance(action, Action)
        steps.append({"step": i, "outcome": step.outcome, "reward": float(step.reward),
                      "action": format_action(action) if parsed else action.text,
                      "format_error": None if parsed else action.message, "observation": step.observation})
    grade = episode.final_grade
    return {"comp_id": episode.comp_id, "steps": steps, "final_score": None if grade is None else grade.score,
            "final_valid": bool(grade is not None and grade.valid)}


def write_transcripts(episodes_by_seed: Mapping[int, Sequence[Any]], out_dir: Path | str) -> list[Path]:
    """`<out_dir>/seed-<seed>/<comp_id>.json`, the `episode_transcript` of every episode."""
    paths = []
    for seed, episodes in episodes_by_seed.items():
        for episode in episodes:
            path = Path(out_dir) / f"seed-{seed}" / f"{episode.comp_id}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(episode_transcript(episode), indent=1))
            paths.append(path)
    return paths
