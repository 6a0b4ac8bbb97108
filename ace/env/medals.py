"""Where a score stands on a competition's leaderboard: medal thresholds (MLE-bench rules), the
medal a score wins, and HumanRank.

`ace.env.grading` checks and scores a submission, then places its score here (`ranked_result`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ace.env.task import GradeResult


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
