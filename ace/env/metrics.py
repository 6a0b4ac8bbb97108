"""Competition metrics: scikit-learn's functions, called the way MLE-bench's graders call them.

Every metric takes the rows already paired and validated by `ace.env.grading`:
`y_true [N, K]` and `y_pred [N, K]` (K = the competition's target columns), float arrays for
numeric metrics and label arrays (numbers or strings) for label metrics. None of them rescales,
renormalises or clips its input beyond what the scikit-learn function itself does, so a score
here equals the score MLE-bench's `grade.py` computes for the same rows.

`Metric.kind` decides which values a submission may hold (see `ace.env.grading`):
  "label":        class labels;
  "probability":  numbers in [0, 1];
  "value":        finite real numbers.

MLE-bench grader names (a competition's config.yaml `grader.name`) map to these metrics in
`GRADER_METRICS`.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn import metrics as skm


def _one_column(name: str, y: np.ndarray) -> np.ndarray:
    if y.shape[1] != 1:
        raise ValueError(f"{name} scores one target column, got {y.shape[1]}")
    return y[:, 0]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of rows predicted exactly (`accuracy_score`). y_*: [N, 1] labels."""
    return float(skm.accuracy_score(_one_column("accuracy", y_true), _one_column("accuracy", y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the labels of y_true and y_pred. y_*: [N, 1] labels."""
    return float(skm.f1_score(_one_column("macro_f1", y_true), _one_column("macro_f1", y_pred),
                              average="macro"))


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights (aptos2019). y_*: [N, 1] numeric ordinal labels."""
    return float(skm.cohen_kappa_score(_one_column("qwk", y_pred), _one_column("qwk", y_true),
                                       weights="quadratic"))


def roc_auc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ROC AUC; with K > 1 columns, the unweighted mean of the K column AUCs ("macro").

    y_true [N, K] in {0, 1}; y_pred [N, K] scores. Raises ValueError when a column of y_true
    holds one class only (the AUC is undefined there).
    """
    if y_true.shape[1] == 1:
        return float(skm.roc_auc_score(y_true[:, 0], y_pred[:, 0]))
    return float(skm.roc_auc_score(y_true, y_pred, average="macro"))


def log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean negative log-likelihood (`sklearn.metrics.log_loss`).

    K == 1: binary; y_true [N, 1] in {0, 1}, y_pred [N, 1] = P(class 1).
    K > 1: y_true [N, K] one-hot, y_pred [N, K] class probabilities.
    Probabilities are clipped to [eps, 1 - eps] (eps of float64) and not renormalised: rows that
    do not sum to one are a validity question (`SubmissionRules.sum_to_one`), not rescaled here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "do not sum to one": judged by the rules
        if y_pred.shape[1] == 1:
            return float(skm.log_loss(y_true[:, 0], y_pred[:, 0]))
        return float(skm.log_loss(y_true, y_pred))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error over all N*K entries. y_*: [N, K] float."""
    return float(skm.root_mean_squared_error(y_true.reshape(-1), y_pred.reshape(-1)))


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the K columns of each column's RMSE. y_*: [N, K] float."""
    return float(skm.root_mean_squared_error(y_true, y_pred, multioutput="uniform_average"))


def mean_column_wise_rmsle(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the K columns of each column's root mean squared log error (nomad2018).

    y_*: [N, K] float; scikit-learn rejects values <= -1 (log1p is undefined there).
    """
    return float(skm.root_mean_squared_log_error(y_true, y_pred, multioutput="uniform_average"))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error over all N*K entries. y_*: [N, K] float."""
    return float(skm.mean_absolute_error(y_true.reshape(-1), y_pred.reshape(-1)))


@dataclass(frozen=True)
class Metric:
    """A registered metric: `fn(y_true [N, K], y_pred [N, K]) -> float`, its direction and the
    kind of values a submission holds ("label" | "probability" | "value")."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("label", "probability", "value"):
            raise ValueError(f"metric {self.name!r}: kind={self.kind!r}, expected label, probability or value")


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", accuracy, True, "label"),
        Metric("macro_f1", macro_f1, True, "label"),
        Metric("qwk", quadratic_weighted_kappa, True, "label"),
        Metric("roc_auc", roc_auc, True, "probability"),
        Metric("log_loss", log_loss, False, "probability"),
        Metric("rmse", rmse, False, "value"),
        Metric("mcrmse", mcrmse, False, "value"),
        Metric("mcrmsle", mean_column_wise_rmsle, False, "value"),
        Metric("mae", mae, False, "value"),
    )
}

# MLE-bench grader names (config.yaml `grader.name`, compared case-, space- and underscore-
# insensitively) -> METRICS. The first lines are the names MLE-bench-Lite's configs use.
GRADER_METRICS: dict[str, str] = {
    "auc-roc": "roc_auc", "column-wise-roc-auc": "roc_auc", "mean-column-wise-roc-auc": "roc_auc",
    "quadratic-weighted-kappa": "qwk", "accuracy": "accuracy", "multi-class-classification-accuracy": "accuracy",
    "log-loss": "log_loss", "multi-class-log-loss": "log_loss",
    "root-mean-squared-error": "rmse", "mean-column-wise-rmsle": "mcrmsle",
    "auc": "roc_auc", "roc-auc": "roc_auc", "logloss": "log_loss", "rmse": "rmse", "mcrmse": "mcrmse",
    "mae": "mae", "macro-f1": "macro_f1", "f1-macro": "macro_f1",
}


def _grader_key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def get_metric(name: str) -> Metric:
    """The registered metric `name`; KeyError naming the known ones otherwise."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}, expected one of {sorted(METRICS)}")
    return METRICS[name]


def metric_for_grader(grader: str) -> str:
    """The METRICS name of an MLE-bench grader name; KeyError naming the known graders otherwise."""
    key = _grader_key(grader)
    if key not in GRADER_METRICS:
        raise KeyError(f"unknown MLE-bench grader {grader!r}, expected one of {sorted(GRADER_METRICS)}")
    return GRADER_METRICS[key]
