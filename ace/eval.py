"""Evaluation of MLE agents: the MLE-bench headline metrics, as mean ± standard error.

Per episode the final submission is the best valid one (what `submit` hands in). Metrics:
valid submission rate, medal rates (gold, silver, bronze each exclusive, and any medal),
above-median rate, HumanRank ((teams - position + 1) / teams; an episode without a valid
submission counts 0, the bottom of the board) and steps to the first valid submission, two ways:
`steps_to_first_valid` as the AceGRPO paper counts it (over the episodes that reach one) and
`steps_to_first_valid_censored`, where an episode without one counts max_steps + 1 (so that a
policy cannot look faster by failing more often; needs the episode limit, else n/a).

Aggregation follows MLE-bench: with several seeds, each metric is averaged within a seed and
the mean ± standard error is taken over seeds; with a single seed, over episodes.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

METRICS = ("valid_rate", "gold_rate", "silver_rate", "bronze_rate", "any_medal_rate",
           "above_median_rate", "human_rank", "steps_to_first_valid", "steps_to_first_valid_censored")
# The rows of the AceGRPO paper's MLE-bench-Lite table (each mean ± SE), and the censored steps.
LITE_ROWS = ("valid_rate", "any_medal_rate", "above_median_rate", "human_rank", "steps_to_first_valid",
             "steps_to_first_valid_censored")


@dataclasses.dataclass(frozen=True)
class EpisodeSummary:
    """What evaluation needs from one episode."""

    comp_id: str
    seed: int
    valid: bool
    medal: str | None
    above_median: bool
    human_rank: float | None
    steps_to_first_valid: int | None
    num_steps: int
    max_steps: int | None = None   # the episode limit (censors steps_to_first_valid); None: unknown

    def __post_init__(self):
        if self.medal not in (None, "gold", "silver", "bronze"):
            raise ValueError(f"medal must be gold|silver|bronze|None, got {self.medal!r}")
        if not self.valid and (self.medal is not None or self.above_median):
            raise ValueError(f"{self.comp_id}: an episode without a valid submission has no medal "
                             "and is not above the median")
        if self.human_rank is not None and not 0.0 <= self.human_rank <= 1.0:
            raise ValueError(f"human_rank must be in [0, 1], got {self.human_rank}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"{self.comp_id}: max_steps={self.max_steps}, expected >= 1 or None")


@dataclasses.dataclass(frozen=True)
class MeanSE:
    """A mean with its standard error (sample std / sqrt(n); 0 when n == 1; nan when n == 0)."""

    mean: float
    se: float
    n: int

    def __str__(self) -> str:
        return "n/a" if self.n == 0 else f"{self.mean:.3f} ± {self.se:.3f}"


def summarize_episode(episode: Any, *, seed: int = 0, max_steps: int | None = None) -> EpisodeSummary:
    """An `ace.env.episode.Episode` reduced to an `EpisodeSummary`; `max_steps` is the episode limit."""
    grade = episode.final_grade
    valid = grade is not None and bool(grade.valid) and grade.score is not None
    return EpisodeSummary(
        comp_id=episode.comp_id, seed=seed, valid=valid,
        medal=grade.medal if valid else None,
        above_median=bool(grade.above_median) if valid else False,
        human_rank=grade.human_rank if valid else None,
        steps_to_first_valid=episode.steps_to_first_valid, num_steps=len(episode.steps), max_steps=max_steps)


def mean_se(values: Sequence[float]) -> MeanSE:
    """Mean and standard error (ddof=1) of `values`."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return MeanSE(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return MeanSE(mean, 0.0, 1)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return MeanSE(mean, math.sqrt(var / n), n)


def _per_episode(s: EpisodeSummary) -> dict[str, float | None]:
    return {
        "valid_rate": float(s.valid),
        "gold_rate": float(s.medal == "gold"),
        "silver_rate": float(s.medal == "silver"),
        "bronze_rate": float(s.medal == "bronze"),
        "any_medal_rate": float(s.medal is not None),
        "above_median_rate": float(s.above_median),
        "human_rank": float(s.human_rank) if s.valid and s.human_rank is not None else 0.0,
        "steps_to_first_valid": (None if s.steps_to_first_valid is None
                                 else float(s.steps_to_first_valid)),
        "steps_to_first_valid_censored": (
            float(s.steps_to_first_valid) if s.steps_to_first_valid is not None
            else None if s.max_steps is None else float(s.max_steps + 1)),
    }


def evaluate(summaries: Iterable[EpisodeSummary]) -> dict[str, MeanSE]:
    """The METRICS over episodes (one seed) or over per-seed means (several seeds).

    Args:
      summaries: per-episode summaries, from any number of competitions and seeds.

    Returns:
      {metric name: MeanSE} for every name in METRICS.
    """
    summaries = list(summaries)
    if not summaries:
        raise ValueError("evaluate needs at least one episode summary")
    by_seed: dict[int, list[dict]] = defaultdict(list)
    for s in summaries:
        by_seed[s.seed].append(_per_episode(s))
    results = {}
    for name in METRICS:
        if len(by_seed) == 1:
            (rows,) = by_seed.values()
            values = [r[name] for r in rows if r[name] is not None]
        else:
            values = []
            for rows in by_seed.values():
                seed_values = [r[name] for r in rows if r[name] is not None]
                if seed_values:
                    values.append(sum(seed_values) / len(seed_values))
        results[name] = mean_se(values)
    return results


def evaluate_episodes(episodes_by_seed: Mapping[int, Sequence[Any]], *,
                      max_steps: int | None = None) -> dict[str, MeanSE]:
    """`evaluate` straight from episodes: {seed: [Episode, ...]}, all run with limit `max_steps`."""
    return evaluate(summarize_episode(ep, seed=seed, max_steps=max_steps)
                    for seed, eps in episodes_by_seed.items() for ep in eps)


def format_table(results: Mapping[str, MeanSE] | Mapping[str, Mapping[str, MeanSE]], *,
                 rows: Sequence[str] | None = None) -> str:
    """A fixed-width text table: one row per metric, one column per run.

    Args:
      results: the output of `evaluate`, or {run name: output of evaluate} for several columns.
      rows: the metrics to show, in this order (a metric no run has shows as "-"); None shows
        every metric of the runs, METRICS first.
    """
    if not results:
        raise ValueError("format_table needs at least one result")
    first = next(iter(results.values()))
    runs = {"result": results} if isinstance(first, MeanSE) else dict(results)
    if rows is not None:
        if isinstance(rows, str) or not rows:
            raise ValueError(f"rows={rows!r}: expected a non-empty sequence of metric names")
        names = list(rows)
    else:
        names = [m for m in METRICS if any(m in r for r in runs.values())]
        names += sorted({m for r in runs.values() for m in r} - set(names))
    cells = [["metric"] + list(runs)]
    for name in names:
        row = [name]
        for r in runs.values():
            v = r.get(name)
            row.append("-" if v is None else f"{v} (n={v.n})")
        cells.append(row)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_lite_table(results: Mapping[str, MeanSE] | Mapping[str, Mapping[str, MeanSE]]) -> str:
    """The MLE-bench-Lite table of the AceGRPO paper: `format_table` over LITE_ROWS."""
    return format_table(results, rows=LITE_ROWS)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(b - a) over paired values, with a percentile bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """The mean of the paired differences b[i] - a[i] and its percentile bootstrap interval.

    Pairs (e.g. two variants run with the same training seed) are resampled together, so what the
    seed does to both cancels. Pairs where either value is nan are dropped.
    Args:
      a, b: [n] values, b[i] paired with a[i].
      n_boot: bootstrap resamples.
      level: coverage of the interval, in (0, 1).
      seed: the resampling's random seed (the interval is a function of it and the data).
    """
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level={level} must be in (0, 1) and n_boot={n_boot} >= 1")
    d = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, level)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(d.mean()), float(low), float(high), int(d.size), level)
