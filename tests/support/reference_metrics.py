"""Metrics written out from their definitions with NumPy, as references for the tests.

Independent of scikit-learn (which `ace.env.metrics` calls): pair counting for the AUC, the
confusion-matrix formula for Cohen's kappa, explicit sums for the rest.
"""
from __future__ import annotations

import numpy as np

F64_EPS = np.finfo(np.float64).eps


def accuracy(t, p) -> float:
    return float(np.mean(np.asarray(t) == np.asarray(p)))


def macro_f1(t, p) -> float:
    t, p = np.asarray(t), np.asarray(p)
    scores = []
    for c in sorted(set(t.tolist()) | set(p.tolist())):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def auc(t, s) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    t, s = np.asarray(t, float), np.asarray(s, float)
    pos, neg = s[t == 1], s[t == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def mean_auc(t, s) -> float:
    """Mean of the column AUCs of t, s [N, K]."""
    return float(np.mean([auc(t[:, k], s[:, k]) for k in range(t.shape[1])]))


def binary_log_loss(t, p) -> float:
    p = np.clip(np.asarray(p, float), F64_EPS, 1 - F64_EPS)
    t = np.asarray(t, float)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def multiclass_log_loss(onehot, p) -> float:
    """-mean log p[true class], probabilities clipped to [eps, 1 - eps] and not renormalised."""
    p = np.clip(np.asarray(p, float), F64_EPS, 1 - F64_EPS)
    return float(-np.mean(np.sum(np.asarray(onehot, float) * np.log(p), axis=1)))


def rmse(t, p) -> float:
    return float(np.sqrt(np.mean((np.asarray(t, float) - np.asarray(p, float)) ** 2)))


def mean_column_rmse(t, p) -> float:
    return float(np.mean([rmse(t[:, k], p[:, k]) for k in range(t.shape[1])]))


def mean_column_rmsle(t, p) -> float:
    t, p = np.asarray(t, float), np.asarray(p, float)
    return float(np.mean([rmse(np.log1p(t[:, k]), np.log1p(p[:, k])) for k in range(t.shape[1])]))


def mae(t, p) -> float:
    return float(np.mean(np.abs(np.asarray(t, float) - np.asarray(p, float))))


def quadratic_kappa(t, p) -> float:
    """1 - sum(W * O) / sum(W * E) over the sorted labels seen in either array, W_ij = (i - j)^2."""
    t, p = np.asarray(t), np.asarray(p)
    labels = sorted(set(t.tolist()) | set(p.tolist()))
    index = {v: i for i, v in enumerate(labels)}
    n = len(labels)
    observed = np.zeros((n, n))
    for a, b in zip(t, p):
        observed[index[a], index[b]] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    i, j = np.indices((n, n))
    weights = (i - j) ** 2
    return float(1 - (weights * observed).sum() / (weights * expected).sum())
