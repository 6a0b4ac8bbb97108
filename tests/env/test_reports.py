"""MLE-bench grading reports (`ace.env.reports`): per-competition reports, aggregate and JSON file."""
import json
import re
from datetime import datetime, timezone

import numpy as np
import pytest

from ace.env.reports import aggregate_reports, competition_report, write_grading_report
from ace.env.task import Competition, GradeResult

# MLE-bench's field names, written out here rather than imported (mlebench/grade_helpers.py,
# mlebench/grade.py).
MLEBENCH_REPORT_FIELDS = [
    "competition_id", "score", "gold_threshold", "silver_threshold", "bronze_threshold", "median_threshold",
    "any_medal", "gold_medal", "silver_medal", "bronze_medal", "above_median", "submission_exists",
    "valid_submission", "is_lower_better", "created_at", "submission_path",
]
MLEBENCH_AGGREGATE_FIELDS = [
    "total_runs", "total_runs_with_submissions", "total_valid_submissions", "total_medals", "total_gold_medals",
    "total_silver_medals", "total_bronze_medals", "total_above_median", "competition_reports",
]
N_TEAMS = 120
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _board(higher_is_better):
    rng = np.random.default_rng(1 if higher_is_better else 2)
    return tuple(float(x) for x in rng.uniform(0.0, 1.0, size=N_TEAMS))


def _comp(tmp_path, *, higher_is_better=True, leaderboard=None, comp_id="toy-auc"):
    return Competition(comp_id=comp_id, description="toy", public_dir=tmp_path, private_dir=tmp_path,
                       metric="roc_auc" if higher_is_better else "rmse", higher_is_better=higher_is_better,
                       id_column="id", target_columns=("y",),
                       leaderboard=_board(higher_is_better) if leaderboard is None else leaderboard,
                       task_type="binary" if higher_is_better else "regression")


def _expected_thresholds(board, higher_is_better):
    """MLE-bench's rule for 100-249 teams: gold at position 10, silver at int(0.2 T), bronze at int(0.4 T)."""
    best_first = sorted(board, reverse=higher_is_better)
    n = len(best_first)
    assert 100 <= n < 250
    return (best_first[10 - 1], best_first[int(0.2 * n) - 1], best_first[int(0.4 * n) - 1],
            float(np.median(board)))


def _file(tmp_path, name="submission.csv"):
    path = tmp_path / name
    path.write_text("id,y\n0,0.5\n")
    return path


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_valid_submission_report_field_by_field(tmp_path, higher_is_better):
    comp = _comp(tmp_path, higher_is_better=higher_is_better)
    gold, silver, bronze, median = _expected_thresholds(comp.leaderboard, higher_is_better)
    # A score between the silver and the gold cut-offs.
    score = (gold + silver) / 2
    grade = GradeResult(valid=True, reason=None, detail="", score=score, medal="silver", above_median=True,
                        human_rank=0.9)
    path = _file(tmp_path)
    report = competition_report(comp, grade, path, created_at=WHEN)
    assert list(report) == MLEBENCH_REPORT_FIELDS
    assert report == {
        "competition_id": comp.comp_id, "score": score,
        "gold_threshold": pytest.approx(gold), "silver_threshold": pytest.approx(silver),
        "bronze_threshold": pytest.approx(bronze), "median_threshold": pytest.approx(median),
        "any_medal": True, "gold_medal": False, "silver_medal": True, "bronze_medal": False,
        "above_median": True, "submission_exists": True, "valid_submission": True,
        "is_lower_better": not higher_is_better, "created_at": WHEN.isoformat(), "submission_path": str(path),
    }
    assert all(isinstance(report[k], float) for k in MLEBENCH_REPORT_FIELDS[1:6])


def test_invalid_and_missing_submissions(tmp_path):
    comp = _comp(tmp_path)
    gold, silver, bronze, median = _expected_thresholds(comp.leaderboard, True)
    bad = competition_report(comp, GradeResult.invalid("wrong_columns", "no column y"), _file(tmp_path),
                             created_at=WHEN)
    assert bad["submission_exists"] and not bad["valid_submission"] and bad["score"] is None
    assert not any(bad[k] for k in ("any_medal", "gold_medal", "silver_medal", "bronze_medal", "above_median"))
    assert bad["gold_threshold"] == pytest.approx(gold) and bad["median_threshold"] == pytest.approx(median)
    none = competition_report(comp, None, tmp_path / "never_written.csv")
    assert not none["submission_exists"] and not none["valid_submission"] and none["score"] is None
    assert none["submission_path"] == str(tmp_path / "never_written.csv")
    assert datetime.fromisoformat(none["created_at"]).tzinfo is not None
    assert competition_report(comp, None, None)["submission_path"] is None
    # A format check (validate_code) is valid but unscored: no valid submission.
    unscored = GradeResult(valid=True, reason=None, detail="", score=None, medal=None, above_median=False,
                           human_rank=None)
    assert not competition_report(comp, unscored, _file(tmp_path))["valid_submission"]
    # No leaderboard: null thresholds.
    bare = competition_report(_comp(tmp_path, leaderboard=()), None, None)
    assert [bare[k] for k in MLEBENCH_REPORT_FIELDS[2:6]] == [None] * 4


def test_competition_report_rejects_inconsistent_inputs(tmp_path):
    comp = _comp(tmp_path)
    valid = GradeResult(valid=True, reason=None, detail="", score=0.5, medal=None, above_median=False,
                        human_rank=0.2)
    with pytest.raises(ValueError, match="no submission file"):
        competition_report(comp, valid, tmp_path / "missing.csv")
    with pytest.raises(TypeError, match="GradeResult"):
        competition_report(comp, {"valid": True}, None)
    with pytest.raises(TypeError, match="created_at"):
        competition_report(comp, None, None, created_at="2025-01-01")


def _reports(tmp_path):
    comp = _comp(tmp_path)
    gold, silver, bronze, median = _expected_thresholds(comp.leaderboard, True)
    grades = [
        GradeResult(True, None, "", gold + 1e-3, "gold", True, 1.0),
        GradeResult(True, None, "", (silver + bronze) / 2, "bronze", True, 0.7),
        GradeResult(True, None, "", min(comp.leaderboard) - 1e-3, None, False, 0.0),
        GradeResult.invalid("nan_values", "row 0"),
        None,
    ]
    return [competition_report(comp, g, _file(tmp_path, f"s{i}.csv") if g is not None else tmp_path / "x.csv",
                               created_at=WHEN) for i, g in enumerate(grades)]


def test_aggregate_counts(tmp_path):
    reports = _reports(tmp_path)
    agg = aggregate_reports(reports)
    assert list(agg) == MLEBENCH_AGGREGATE_FIELDS
    assert {k: v for k, v in agg.items() if k != "competition_reports"} == {
        "total_runs": 5, "total_runs_with_submissions": 4, "total_valid_submissions": 3, "total_medals": 2,
        "total_gold_medals": 1, "total_silver_medals": 0, "total_bronze_medals": 1, "total_above_median": 2}
    assert all(type(agg[k]) is int for k in MLEBENCH_AGGREGATE_FIELDS[:-1])
    assert agg["competition_reports"] == reports
    assert aggregate_reports([])["total_runs"] == 0


def test_aggregate_names_the_bad_field(tmp_path):
    report = _reports(tmp_path)[0]
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['score'\]"):
        aggregate_reports([{k: v for k, v in report.items() if k != "score"}])
    with pytest.raises(ValueError, match="unknown field.*human_rank"):
        aggregate_reports([{**report, "human_rank": 1.0}])
    with pytest.raises(ValueError, match="gold_medal must be a bool"):
        aggregate_reports([{**report, "gold_medal": 1}])
    with pytest.raises(ValueError, match="any_medal"):
        aggregate_reports([{**report, "any_medal": False}])
    with pytest.raises(ValueError, match="list of competition reports"):
        aggregate_reports(report)


def test_grading_report_json_round_trips(tmp_path):
    agg = aggregate_reports(_reports(tmp_path))
    out = tmp_path / "nested" / "reports"
    path = write_grading_report(agg, out)
    assert path.parent == out
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-UTC_grading_report\.json", path.name), path.name
    loaded = json.loads(path.read_text())
    assert loaded == agg and list(loaded) == MLEBENCH_AGGREGATE_FIELDS
    assert all(list(r) == MLEBENCH_REPORT_FIELDS for r in loaded["competition_reports"])
    assert path.read_text().startswith('{\n  "total_runs"')  # indent 2, as MLE-bench writes it
    second = write_grading_report(agg, out)   # same second: a new file, the first one kept
    assert second != path and path.is_file() and json.loads(second.read_text()) == agg
    with pytest.raises(ValueError, match="missing the field"):
        write_grading_report({k: v for k, v in agg.items() if k != "total_medals"}, out)
