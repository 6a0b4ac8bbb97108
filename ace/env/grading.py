"""Grading: validity checks and scoring; medals and HumanRank come from `ace.env.medals`.

`grade_submission` never raises on a bad submission: every defect becomes an invalid
`GradeResult` whose `reason` names the rule that failed and whose `detail` names the offending
columns, rows (by id) or values. The checks run in this order:
  missing_file, unreadable, wrong_columns (missing, or extra where the rules forbid them),
  wrong_rows (length), bad_ids (empty, unknown or missing ids), duplicate_ids, nan_values,
  then per target column wrong_dtype and out_of_range, then not_normalized (rows that must sum
  to one), and metric_error (the metric itself refused the values, e.g. a log of a value <= -1).
A broken competition (missing answers file or columns) raises, since that is the harness's
fault, not the agent's.

Submissions and answers share the id column and the target columns; `Competition.rules`
(`ace.env.task.SubmissionRules`) says how rows are paired (by id or by position), whether extra
columns are allowed, which labels are accepted, whether rows must sum to one and which answer
rows are scored. A metric (`ace.env.metrics`) sees the paired rows as `y_true [N, K]` and
`y_pred [N, K]` (K = len(target_columns)).
"""
from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ace.env.medals import ranked_result
from ace.env.metrics import Metric, get_metric
from ace.env.task import Competition, GradeResult

# MLE-bench's graders test rows of probabilities with np.isclose(row_sum, 1, atol=1e-6)
# (and np.isclose's default rtol=1e-5).
SUM_TO_ONE_ATOL = 1e-6
# Cells that mean "no value" in a submission read as text.
_EMPTY = ("", "nan", "NaN", "NA", "null", "None")
# pandas.read_csv's default NA strings: MLE-bench reads answers and submissions with them, so a
# free-text label written as one of these compares as the text "nan" on both sides.
PANDAS_NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                               "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _canonical_ids(col: pd.Series) -> pd.Series:
    """Ids as strings, with integral floats ("3.0") written as integers ("3")."""
    # A non-number among the first ids settles it without parsing millions of strings.
    if pd.to_numeric(col.iloc[:64], errors="coerce").isna().any():
        return col.astype(str)
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.notna().all() and np.all(np.mod(numeric.to_numpy(float), 1) == 0):
        return numeric.astype(np.int64).astype(str)
    return col.astype(str)


def _examples(values, n: int = 3) -> str:
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    shown = ", ".join(repr(v if not isinstance(v, str) or len(v) <= 40 else v[:37] + "...") for v in values[:n])
    return f"{shown}{', ...' if len(values) > n else ''}"


def _read_answers(comp: Competition) -> pd.DataFrame:
    path = comp.answers_path
    if not path.is_file():
        raise FileNotFoundError(f"{comp.comp_id}: answers file {path} is missing")
    stat = path.stat()
    answers = _read_answers_file(str(path), stat.st_mtime_ns, stat.st_size)
    needed = list(comp.target_columns) + ([comp.id_column] if comp.rules.pairing != "position" else [])
    missing = [c for c in needed if c not in answers.columns]
    if missing:
        raise ValueError(f"{comp.comp_id}: answers file {path} lacks columns {missing}")
    return answers


@functools.lru_cache(maxsize=8)
def _read_answers_file(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    """The answers as MLE-bench's load_answers reads them (pandas' defaults), cached while the file is
    unchanged: an episode grades every run against them, and some hold millions of rows. Read-only."""
    return pd.read_csv(path)


def _known_labels(comp: Competition, answers: pd.DataFrame, col: str) -> set[str]:
    """Labels allowed in `col`: those in the answers and, if present, in the public train.csv."""
    labels = set(_label_text(answers[col]))
    train = comp.public_dir / "train.csv"
    if train.is_file():
        head = pd.read_csv(train, nrows=0)
        if col in head.columns:
            labels |= set(_label_text(pd.read_csv(train, usecols=[col])[col].dropna()))
    return labels


def _label_text(values: pd.Series) -> pd.Series:
    """Labels as text; integral numbers without a decimal point ("3", not "3.0")."""
    if pd.api.types.is_numeric_dtype(values):
        arr = values.to_numpy(np.float64)
        if np.all(np.mod(arr, 1) == 0):
            return pd.Series(arr.astype(np.int64), index=values.index).astype(str)
    return values.astype(str)


def _label_values(sub: pd.Series, truth: pd.Series, col: str, ids: pd.Series, comp: Competition,
                  answers: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) of one label column: numbers when the answers are numeric, else text."""
    if not pd.api.types.is_numeric_dtype(truth):
        # Missing answers compare as "nan" (what astype(str) gave before pandas' string dtype).
        pred, true = sub.where(~sub.isin(PANDAS_NA_STRINGS), "nan"), truth.astype(object).fillna("nan").astype(str)
    else:
        values = pd.to_numeric(sub, errors="coerce")
        bad = values.isna()
        if bad.any():
            raise _Invalid("wrong_dtype", f"column {col!r} holds non-numeric labels in {int(bad.sum())} rows, "
                           f"e.g. id {_examples(ids[bad])} = {_examples(sub[bad])}; expected numbers")
        integral = pd.api.types.is_integer_dtype(truth)
        fractional = np.mod(values.to_numpy(np.float64), 1) != 0
        if comp.rules.labels == "known" and integral and fractional.any():
            raise _Invalid("wrong_dtype", f"column {col!r} holds non-integer labels in {int(fractional.sum())} "
                           f"rows, e.g. id {_examples(ids[fractional])} = {_examples(sub[fractional])}; "
                           "expected integer labels")
        pred, true = values, truth.astype(np.float64)
    if comp.rules.labels == "known":
        known = _known_labels(comp, answers, col)
        text = _label_text(pred)
        unknown = ~text.isin(known)
        if unknown.any():
            raise _Invalid("out_of_range", f"column {col!r} holds unknown labels in {int(unknown.sum())} rows, "
                           f"e.g. id {_examples(ids[unknown])} = {_examples(sub[unknown])}; expected one of "
                           f"{_examples(sorted(known), 20)}")
    return true.to_numpy(), pred.to_numpy()


def _numeric_values(sub: pd.Series, col: str, kind: str, ids: pd.Series) -> np.ndarray:
    values = pd.to_numeric(sub, errors="coerce")
    bad = values.isna()
    if bad.any():
        raise _Invalid("wrong_dtype", f"column {col!r} holds non-numbers in {int(bad.sum())} rows, e.g. id "
                       f"{_examples(ids[bad])} = {_examples(sub[bad])}; expected numbers")
    arr = values.to_numpy(np.float64)
    infinite = ~np.isfinite(arr)
    if infinite.any():
        raise _Invalid("out_of_range", f"column {col!r} holds infinite values in {int(infinite.sum())} rows, "
                       f"e.g. id {_examples(ids[infinite])}; expected finite numbers")
    if kind == "probability":
        outside = (arr < 0) | (arr > 1)
        if outside.any():
            raise _Invalid("out_of_range", f"column {col!r} holds values outside [0, 1] in {int(outside.sum())} "
                           f"rows, e.g. id {_examples(ids[outside])} = {_examples(arr[outside])}; expected "
                           "probabilities")
    return arr


def _check_columns(comp: Competition, columns: list[str]) -> None:
    rules = comp.rules
    expected = [comp.id_column, *comp.target_columns]
    required = list(comp.target_columns) + ([comp.id_column] if rules.pairing != "position" else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise _Invalid("wrong_columns", f"missing columns {missing}; found {columns[:20]}, expected {expected}")
    if len(set(columns)) != len(columns):
        raise _Invalid("wrong_columns", f"repeated column names in {columns[:20]}; expected {expected}")
    extra = [c for c in columns if c not in expected]
    if extra and not rules.extra_columns:
        raise _Invalid("wrong_columns", f"unexpected columns {extra[:10]}; expected exactly {expected}")


def _pair_rows(comp: Competition, sub: pd.DataFrame, answers: pd.DataFrame,
               empty: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(submission rows, their empty-cell mask, their ids) in the answers' row order."""
    if comp.rules.pairing == "position":
        return sub.reset_index(drop=True), empty.reset_index(drop=True), pd.Series(
            [f"row {i + 1}" for i in range(len(sub))])
    id_col = comp.id_column
    if comp.rules.pairing == "sorted":
        # Both sides sorted by id and paired in order; the ids themselves are not compared.
        ids = _canonical_ids(sub[id_col])
        placed = np.empty(len(sub), dtype=np.int64)
        placed[np.argsort(_canonical_ids(answers[id_col]).to_numpy(), kind="stable")] = \
            np.argsort(ids.to_numpy(), kind="stable")
        return (sub.iloc[placed].reset_index(drop=True), empty.iloc[placed].reset_index(drop=True),
                ids.iloc[placed].reset_index(drop=True))
    if empty[id_col].any():
        rows = np.flatnonzero(empty[id_col].to_numpy()) + 1
        raise _Invalid("bad_ids", f"column {id_col!r} is empty in {len(rows)} rows, e.g. data rows {list(rows[:3])}")
    ids, true_ids = _canonical_ids(sub[id_col]), _canonical_ids(answers[id_col])
    unknown = ids[~ids.isin(true_ids)].unique()
    if len(unknown):
        raise _Invalid("bad_ids", f"{len(unknown)} ids are not in the test set, e.g. {_examples(sorted(unknown))}")
    if true_ids.is_unique:
        repeated = ids[ids.duplicated()].value_counts() + 1
    else:
        counts, true_counts = ids.value_counts(), true_ids.value_counts()
        repeated = counts[counts > true_counts.reindex(counts.index).fillna(0)]
    if len(repeated):
        raise _Invalid("duplicate_ids", f"{len(repeated)} ids appear more often than in the test set, e.g. "
                       f"{_examples(repeated.index)} ({_examples(repeated.to_numpy())} times)")
    missing = true_ids[~true_ids.isin(ids)].unique()
    if len(missing):
        raise _Invalid("bad_ids", f"{len(missing)} test ids are missing, e.g. {_examples(sorted(missing))}")
    if true_ids.is_unique:
        order = pd.Index(ids).get_indexer(true_ids)
    else:
        # An id may repeat in the answers (e.g. a comment text used as the id): the k-th copy in the
        # submission pairs with the k-th copy in the answers (the ids agree as a multiset here).
        sub_keys = pd.MultiIndex.from_arrays([ids, ids.groupby(ids).cumcount()])
        true_keys = pd.MultiIndex.from_arrays([true_ids, true_ids.groupby(true_ids).cumcount()])
        order = pd.Series(np.arange(len(sub)), index=sub_keys).reindex(true_keys).to_numpy()
    return (sub.iloc[order].reset_index(drop=True), empty.iloc[order].reset_index(drop=True),
            true_ids.reset_index(drop=True))


def _check_and_pair(comp: Competition, path: Path, answers: pd.DataFrame, metric: Metric):
    """Validity checks; returns (y_true [N, K], y_pred [N, K]) of the scored rows, or raises _Invalid."""
    if not path.is_file():
        raise _Invalid("missing_file", f"no submission file at {path}")
    try:
        # Read as text first so that dtype checks see what was written, not pandas' guess.
        sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the submission's fault
        raise _Invalid("unreadable", f"cannot parse {path.name} as CSV: {type(exc).__name__}: {exc}")
    _check_columns(comp, [str(c) for c in sub.columns])
    if len(sub) != len(answers):
        raise _Invalid("wrong_rows", f"{len(sub)} rows; expected {len(answers)} (one per test row)")
    empty = sub.apply(lambda c: c.str.strip().isin(_EMPTY))
    sub, empty, ids = _pair_rows(comp, sub, answers, empty)
    answers = answers.reset_index(drop=True)
    if comp.rules.columns_by_position:
        # The non-id columns, in the file's order, stand for target_columns in theirs.
        others = [c for c in sub.columns if c != comp.id_column]
        sub = sub.rename(columns=dict(zip(others, comp.target_columns)))
        empty = empty.rename(columns=dict(zip(others, comp.target_columns)))
    free_text = {c for c in comp.target_columns if metric.kind == "label" and comp.rules.labels == "any"
                 and not pd.api.types.is_numeric_dtype(answers[c])}
    holes = {c: ids[empty[c]] for c in comp.target_columns if c not in free_text and empty[c].any()}
    if holes:
        col, where = next(iter(holes.items()))
        raise _Invalid("nan_values", f"missing or NaN values in columns {list(holes)}: {len(where)} rows of "
                       f"{col!r}, e.g. id {_examples(where)}")
    preds, truths = [], []
    for col in comp.target_columns:
        if metric.kind == "label":
            true, pred = _label_values(sub[col], answers[col], col, ids, comp, answers)
        else:
            true, pred = answers[col].to_numpy(np.float64), _numeric_values(sub[col], col, metric.kind, ids)
        truths.append(true)
        preds.append(pred)
    y_true, y_pred = np.stack(truths, axis=1), np.stack(preds, axis=1)
    if comp.rules.sum_to_one:
        sums = y_pred.astype(np.float64).sum(axis=1)
        off = ~np.isclose(sums, 1.0, atol=SUM_TO_ONE_ATOL)
        if off.any():
            raise _Invalid("not_normalized", f"{int(off.sum())} rows of {list(comp.target_columns)[:5]} do not "
                           f"sum to 1 (within {SUM_TO_ONE_ATOL:g}), e.g. id {_examples(ids[off])} with sums "
                           f"{_examples(np.round(sums[off], 8))}")
    if comp.rules.scored_rows == "nonnegative_answers":
        # Answer rows marked -1 are "not scored" (jigsaw-toxic-comment-classification-challenge).
        keep = y_true.astype(np.float64).sum(axis=1) >= 0
        y_true, y_pred = y_true[keep], y_pred[keep]
    return y_true, y_pred


def score_submission(comp: Competition, submission_path: Path) -> tuple[float | None, GradeResult | None]:
    """The metric value of a submission, or (None, invalid GradeResult); never raises on bad input."""
    metric = get_metric(comp.metric)
    answers = _read_answers(comp)
    try:
        y_true, y_pred = _check_and_pair(comp, Path(submission_path), answers, metric)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                score = metric.fn(y_true, y_pred)
            except (ValueError, TypeError) as exc:
                raise _Invalid("metric_error", f"{comp.metric} cannot score these values: {exc}") from None
        if not math.isfinite(score):
            raise _Invalid("metric_error", f"{comp.metric} evaluated to {score}")
    except _Invalid as bad:
        return None, GradeResult.invalid(bad.reason, bad.detail)
    if comp.rules.round_digits is not None:
        score = round(score, comp.rules.round_digits)
    return float(score), None


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
