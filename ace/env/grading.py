"""Grading: validity checks, metrics, medal thresholds (MLE-bench rules) and HumanRank.

`grade_submission` never raises on a bad submission: every defect becomes an invalid
`GradeResult` whose `reason` names the first check that failed, in this order:
missing_file, unreadable, wrong_columns, wrong_rows, duplicate_ids, bad_ids (unknown or empty
ids), nan_values, then per target column wrong_dtype and out_of_range. A broken competition (missing answers file) does raise, since that
is the harness's fault, not the agent's.

Submissions and answers share one layout: `id_column` plus `target_columns`. A metric sees
the rows aligned by id, as arrays `y_true [N, K]` and `y_pred [N, K]` (K = len(target_columns)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from ace.env.task import Competition, GradeResult

# Probabilities are clipped away from 0 and 1 before taking logs, as Kaggle's log loss does.
_LOG_LOSS_EPS = 1e-15


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of rows whose labels all match. y_true, y_pred: [N, K] labels (any dtype)."""
    return float(np.mean(np.all(y_true == y_pred, axis=1)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN). y_*: [N, 1] labels.

    The classes are the union of the labels seen in y_true and y_pred (sklearn's convention).
    """
    t, p = y_true[:, 0], y_pred[:, 0]
    f1s = []
    for c in np.unique(np.concatenate([t, p])):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [N], ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Each run of equal values gets the mean of positions start+1 .. end.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    run_ranks = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Area under the ROC curve, averaged over columns. y_true [N, K] in {0, 1}; y_pred [N, K].

    Computed as the Mann-Whitney U statistic with average ranks for ties.
    """
    aucs = []
    for k in range(y_true.shape[1]):
        t = y_true[:, k].astype(np.float64)
        ranks = _average_ranks(y_pred[:, k].astype(np.float64))
        n_pos = float(np.sum(t == 1))
        n_neg = float(len(t) - n_pos)
        if n_pos == 0 or n_neg == 0:
            raise ValueError(f"roc_auc needs both classes in column {k} of the answers")
        aucs.append((np.sum(ranks[t == 1]) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean negative log-likelihood.

    K == 1: binary; y_true [N, 1] in {0, 1}, y_pred [N, 1] = P(class 1).
    K > 1: y_true [N, K] one-hot, y_pred [N, K] class probabilities, each row floored at eps
    and renormalised to sum to one (Kaggle's multi-class log loss).
    """
    t = y_true.astype(np.float64)
    if y_pred.shape[1] == 1:
        p = np.clip(y_pred.astype(np.float64), _LOG_LOSS_EPS, 1 - _LOG_LOSS_EPS)
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
    # Floor before renormalising so that an all-zero row becomes uniform instead of NaN.
    p = np.maximum(y_pred.astype(np.float64), _LOG_LOSS_EPS)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.sum(t * np.log(p), axis=1)))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error over all N*K entries. y_*: [N, K] float."""
    return float(np.sqrt(np.mean((y_true.astype(float) - y_pred.astype(float)) ** 2)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error over all N*K entries. y_*: [N, K] float."""
    return float(np.mean(np.abs(y_true.astype(float) - y_pred.astype(float))))


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean column-wise RMSE: the mean over the K columns of each column's RMSE. y_*: [N, K]."""
    err = (y_true.astype(float) - y_pred.astype(float)) ** 2
    return float(np.mean(np.sqrt(np.mean(err, axis=0))))


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    kind decides the validity checks on submitted values:
      "label": class labels, each must be a known label of the competition;
      "probability": numbers in [0, 1];
      "value": finite real numbers.
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    kind: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", accuracy, True, "label"),
        Metric("macro_f1", macro_f1, True, "label"),
        Metric("roc_auc", roc_auc, True, "probability"),
        Metric("log_loss", log_loss, False, "probability"),
        Metric("rmse", rmse, False, "value"),
        Metric("mae", mae, False, "value"),
        Metric("mcrmse", mcrmse, False, "value"),
    )
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}, expected one of {sorted(METRICS)}")
    return METRICS[name]


class MedalThresholds(NamedTuple):
    """Scores a submission must reach (>= if higher is better, <= otherwise) for each medal."""

    gold: float
    silver: float
    bronze: float
    median: float


def _medal_positions(num_teams: int) -> tuple[int, int, int]:
    """1-based leaderboard positions of the gold, silver and bronze cut-offs.

    Kaggle's progression rules as MLE-bench applies them (mlebench/grade_helpers.py):
      < 100 teams:  top 10%, top 20%, top 40%
      100-249:      top 10 teams, top 20%, top 40%
      250-999:      top 10 + 0.2% of teams, top 50, top 100
      >= 1000:      top 10 + 0.2% of teams, top 5%, top 10%
    Fractions are floored, and a cut-off is never above position 1.
    """
    n = num_teams
    if n < 1:
        raise ValueError(f"medal thresholds need at least one team, got num_teams={n}")
    if n < 100:
        return max(1, int(n * 0.1)), max(1, int(n * 0.2)), max(1, int(n * 0.4))
    if n < 250:
        return 10, max(1, int(n * 0.2)), max(1, int(n * 0.4))
    if n < 1000:
        return 10 + int(n * 0.002), 50, 100
    return 10 + int(n * 0.002), max(1, int(n * 0.05)), max(1, int(n * 0.1))


def _sorted_best_first(leaderboard, higher_is_better: bool) -> np.ndarray:
    scores = np.asarray(leaderboard, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(scores)):
        raise ValueError("leaderboard holds non-finite scores")
    scores = np.sort(scores)
    return scores[::-1] if higher_is_better else scores


def medal_thresholds(leaderboard, higher_is_better: bool) -> MedalThresholds:
    """Medal cut-off scores and the median for a leaderboard of team scores (any order).

    Args:
      leaderboard: [T] team scores, T >= 1.
      higher_is_better: direction of the metric.
    Returns:
      MedalThresholds(gold, silver, bronze, median): the scores of the teams at the cut-off
      positions of `_medal_positions(T)`, and the median of all T scores.
    """
    scores = _sorted_best_first(leaderboard, higher_is_better)
    gold, silver, bronze = _medal_positions(len(scores))
    return MedalThresholds(
        gold=float(scores[gold - 1]),
        silver=float(scores[silver - 1]),
        bronze=float(scores[bronze - 1]),
        median=float(np.median(scores)),
    )


def medal_for(score: float, thresholds: MedalThresholds, higher_is_better: bool) -> str | None:
    """The best medal whose threshold `score` reaches (ties with a threshold win it)."""
    for name, cut in (("gold", thresholds.gold), ("silver", thresholds.silver),
                      ("bronze", thresholds.bronze)):
        if (score >= cut) if higher_is_better else (score <= cut):
            return name
    return None


def human_rank(score: float, leaderboard, higher_is_better: bool) -> float:
    """HumanRank position score (teams - position + 1) / teams, in [0, 1].

    position = 1 + the number of teams strictly better than `score`, so beating every team
    gives 1.0, tying the winner gives 1.0, and losing to every team gives 0.0.
    Args:
      score: the submission's metric value.
      leaderboard: [T] team scores, T >= 1.
    """
    scores = np.asarray(leaderboard, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("human_rank needs a leaderboard with at least one team")
    better = np.sum(scores > score) if higher_is_better else np.sum(scores < score)
    teams = scores.size
    position = 1 + int(better)
    return (teams - position + 1) / teams


def ranked_result(score: float, leaderboard, higher_is_better: bool, detail: str = "") -> GradeResult:
    """A valid GradeResult for `score` placed on `leaderboard` ([T] team scores; may be empty)."""
    if len(leaderboard) == 0:
        return GradeResult(True, None, detail, float(score), None, False, None)
    th = medal_thresholds(leaderboard, higher_is_better)
    above = score > th.median if higher_is_better else score < th.median
    return GradeResult(
        valid=True,
        reason=None,
        detail=detail,
        score=float(score),
        medal=medal_for(score, th, higher_is_better),
        above_median=bool(above),
        human_rank=human_rank(score, leaderboard, higher_is_better),
    )


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _canonical_ids(col: pd.Series) -> pd.Series:
    """Ids as strings, with integral floats ("3.0") written as integers ("3")."""
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.notna().all() and np.all(np.mod(numeric.to_numpy(float), 1) == 0):
        return numeric.astype(np.int64).astype(str)
    return col.astype(str)


def _read_answers(comp: Competition) -> pd.DataFrame:
    path = comp.answers_path
    if not path.is_file():
        raise FileNotFoundError(f"{comp.comp_id}: answers file {path} is missing")
    answers = pd.read_csv(path)
    missing = [c for c in (comp.id_column, *comp.target_columns) if c not in answers.columns]
    if missing:
        raise ValueError(f"{comp.comp_id}: answers file {path} lacks columns {missing}")
    return answers


def _known_labels(comp: Competition, answers: pd.DataFrame, col: str) -> set[str]:
    """Labels allowed in `col`: those in the answers and, if present, in the public train.csv."""
    labels = set(answers[col].astype(str))
    train = comp.public_dir / "train.csv"
    if train.is_file():
        head = pd.read_csv(train, nrows=0)
        if col in head.columns:
            labels |= set(pd.read_csv(train, usecols=[col])[col].dropna().astype(str))
    return labels


def _label_values(sub: pd.Series, truth: pd.Series, col: str, known: set[str]) -> np.ndarray:
    truth_numeric = pd.api.types.is_numeric_dtype(truth)
    if truth_numeric:
        values = pd.to_numeric(sub, errors="coerce")
        if values.isna().any():
            bad = sub[values.isna()].iloc[0]
            raise _Invalid("wrong_dtype", f"column {col!r} holds {bad!r}; expected numeric labels")
        if pd.api.types.is_integer_dtype(truth) and np.any(np.mod(values.to_numpy(float), 1) != 0):
            bad = values[np.mod(values.to_numpy(float), 1) != 0].iloc[0]
            raise _Invalid("wrong_dtype", f"column {col!r} holds {bad!r}; expected integer labels")
        as_text = (values.astype(np.int64) if pd.api.types.is_integer_dtype(truth) else values).astype(str)
    else:
        as_text = sub.astype(str)
    unknown = sorted(set(as_text) - known)
    if unknown:
        raise _Invalid(
            "out_of_range",
            f"column {col!r} holds unknown labels {unknown[:5]}; expected one of {sorted(known)[:20]}",
        )
    return as_text.to_numpy(dtype=object)


def _numeric_values(sub: pd.Series, col: str, kind: str) -> np.ndarray:
    values = pd.to_numeric(sub, errors="coerce")
    if values.isna().any():
        bad = sub[values.isna()].iloc[0]
        raise _Invalid("wrong_dtype", f"column {col!r} holds {bad!r}; expected a number")
    arr = values.to_numpy(np.float64)
    if not np.all(np.isfinite(arr)):
        raise _Invalid("out_of_range", f"column {col!r} holds infinite values")
    if kind == "probability" and (arr.min() < 0 or arr.max() > 1):
        bad = arr[(arr < 0) | (arr > 1)][0]
        raise _Invalid("out_of_range", f"column {col!r} holds {bad!r}; expected a probability in [0, 1]")
    return arr


def _check_and_align(comp: Competition, path: Path, answers: pd.DataFrame, metric: Metric):
    """Validity checks; returns (y_true [N, K], y_pred [N, K]) aligned by id, or raises _Invalid."""
    if not path.is_file():
        raise _Invalid("missing_file", f"no submission file at {path}")
    try:
        # Read as text first so that dtype checks see what was written, not pandas' guess.
        sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the submission's fault
        raise _Invalid("unreadable", f"cannot parse {path.name} as CSV: {type(exc).__name__}: {exc}")
    expected = [comp.id_column, *comp.target_columns]
    if list(sub.columns) != expected and sorted(map(str, sub.columns)) != sorted(expected):
        raise _Invalid("wrong_columns", f"columns {list(sub.columns)[:20]}; expected {expected}")
    if len(sub) != len(answers):
        raise _Invalid("wrong_rows", f"{len(sub)} rows; expected {len(answers)}")
    empty = sub.apply(lambda c: c.str.strip().isin(["", "nan", "NaN", "NA", "null", "None"]))
    if empty[comp.id_column].any():
        raise _Invalid("bad_ids", f"column {comp.id_column!r} has empty ids")
    ids = _canonical_ids(sub[comp.id_column])
    dup = ids[ids.duplicated()]
    if len(dup):
        raise _Invalid("duplicate_ids", f"{len(dup)} duplicate ids, e.g. {dup.iloc[0]!r}")
    true_ids = _canonical_ids(answers[comp.id_column])
    unknown = sorted(set(ids) - set(true_ids))
    if unknown:
        raise _Invalid("bad_ids", f"{len(unknown)} ids not in the test set, e.g. {unknown[:3]}")
    sub = sub.assign(**{comp.id_column: ids.to_numpy()}).set_index(comp.id_column)
    sub = sub.loc[true_ids.to_numpy()]
    nan_cols = [c for c in comp.target_columns if empty.loc[:, c].any()]
    if nan_cols:
        raise _Invalid("nan_values", f"missing or NaN values in columns {nan_cols}")
    preds, truths = [], []
    for col in comp.target_columns:
        if metric.kind == "label":
            known = _known_labels(comp, answers, col)
            preds.append(_label_values(sub[col], answers[col], col, known))
            truths.append(_label_values(answers[col], answers[col], col, known))
        else:
            preds.append(_numeric_values(sub[col], col, metric.kind))
            truths.append(answers[col].to_numpy(np.float64))
    return np.stack(truths, axis=1), np.stack(preds, axis=1)


def score_submission(comp: Competition, submission_path: Path) -> tuple[float | None, GradeResult | None]:
    """The metric value of a submission, or (None, invalid GradeResult); never raises on bad input."""
    metric = get_metric(comp.metric)
    answers = _read_answers(comp)
    try:
        y_true, y_pred = _check_and_align(comp, Path(submission_path), answers, metric)
    except _Invalid as bad:
        return None, GradeResult.invalid(bad.reason, bad.detail)
    score = metric.fn(y_true, y_pred)
    if not math.isfinite(score):
        return None, GradeResult.invalid("out_of_range", f"{comp.metric} evaluated to {score}")
    return score, None


def grade_submission(comp: Competition, submission_path: Path) -> GradeResult:
    """Validate, score and rank one submission file against `comp`'s answers and leaderboard.

    Never raises on a bad submission; raises only when the competition itself is broken
    (unknown metric, missing or malformed answers file).
    """
    score, invalid = score_submission(comp, submission_path)
    if invalid is not None:
        return invalid
    detail = f"{comp.metric}={score:.6g} ({'higher' if comp.higher_is_better else 'lower'} is better)"
    return ranked_result(score, comp.leaderboard, comp.higher_is_better, detail)
