"""Training metrics: per-step summaries of groups and of the curriculum, the JSONL / TensorBoard /
console logger, and the figure of the training curves with the before/after evaluation bars.

Every per-step metric is a flat dict of floats with stable names, so that the JSONL file, the
TensorBoard scalars and the plots read the same keys.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Keys shown on the console progress bar, in this order, with their short labels.
CONSOLE_KEYS = (("reward_mean", "r"), ("valid_rate", "valid"), ("table_size", "tasks"),
                ("lp_mean", "lp"), ("step_time_s", "s/step"))


def group_metrics(rewards: np.ndarray, outcomes: Sequence[Sequence[str]],
                  medals: Sequence[Sequence[str | None]], success: np.ndarray,
                  depths: Sequence[int] | None = None) -> dict[str, float]:
    """Reward and outcome statistics of one learner batch.

    Args:
      rewards: [N, G] float rewards of the N groups of G samples.
      outcomes: [N][G] the outcome of each sample (an `ace.env.reward.OUTCOMES` entry; for a
        whole episode, "valid" when any of its steps was).
      medals: [N][G] the medal of each sample's best submission, or None.
      success: [N, G] bool, the learnability success flags.
      depths: [N] the depth of each group's task (0: a competition's initial state), or None.

    Returns:
      reward_mean, reward_std (over all N*G samples), group_reward_std (mean within-group std),
      zero_variance_frac (groups whose rewards are all equal: no GRPO signal), valid_rate,
      medal_rate, success_rate, and outcome_<name> fractions. With depths, also reward_mean and
      valid_rate over the depth-0 groups (`*_depth0`) and over the deeper ones (`*_deeper`), each
      only when the batch has such groups: the curve of initial states measures learning, apart
      from the curriculum's drift towards deeper (harder or easier) states.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, G], got shape {rewards.shape}")
    n, g = rewards.shape
    flat_outcomes = [o for row in outcomes for o in row]
    flat_medals = [m for row in medals for m in row]
    if len(flat_outcomes) != n * g or len(flat_medals) != n * g:
        raise ValueError(f"outcomes and medals must be [N, G] = [{n}, {g}], got {len(flat_outcomes)} "
                         f"outcomes and {len(flat_medals)} medals")
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "group_reward_std": float(rewards.std(axis=1).mean()),
        "zero_variance_frac": float(np.mean(rewards.max(axis=1) == rewards.min(axis=1))),
        "valid_rate": float(np.mean([o == "valid" for o in flat_outcomes])),
        "medal_rate": float(np.mean([m is not None for m in flat_medals])),
        "success_rate": float(np.asarray(success, np.float64).mean()),
    }
    for name in sorted(set(flat_outcomes)):
        out[f"outcome_{name}"] = float(np.mean([o == name for o in flat_outcomes]))
    if depths is not None:
        depths = np.asarray(depths)
        if depths.shape != (n,):
            raise ValueError(f"depths must be [N] = [{n}], got shape {depths.shape}")
        valid = np.asarray([[o == "valid" for o in row] for row in outcomes], np.float64)
        for name, mask in (("depth0", depths == 0), ("deeper", depths > 0)):
            if mask.any():
                out[f"reward_mean_{name}"] = float(rewards[mask].mean())
                out[f"valid_rate_{name}"] = float(valid[mask].mean())
    return out


def curriculum_metrics(table: Any, potentials: np.ndarray, sampled_rows: np.ndarray, *,
                       max_depth: int) -> dict[str, float]:
    """Table size, depth histogram and learnability statistics.

    Args:
      table: an `ace.curriculum.TaskTable` (capacity C).
      potentials: [C] float learnability potential of every row (ignored where invalid).
      sampled_rows: [N] int rows sampled this step.
      max_depth: the deepest depth counted in the histogram (deeper rows go to the last bin).

    Returns:
      table_size, mean_depth, depth_<d> counts for d in 0..max_depth, lp_mean / lp_max and the
      quartiles lp_q25 / lp_q50 / lp_q75 over the live tasks, never_tried_frac, and of the rows
      sampled this step: sampled_depth_mean, sampled_depth_<d> counts, lp_sampled_mean / min / max.
    """
    valid = np.asarray(table.valid, bool)
    depth = np.asarray(table.depth)[valid]
    lp = np.asarray(potentials, np.float64)
    live_lp = lp[valid]
    visits = np.asarray(table.visits)[valid]
    rows = np.asarray(sampled_rows, np.int64)
    out = {
        "table_size": float(valid.sum()),
        "mean_depth": float(depth.mean()) if depth.size else 0.0,
        "lp_mean": float(live_lp.mean()) if live_lp.size else 0.0,
        "lp_max": float(live_lp.max()) if live_lp.size else 0.0,
        "lp_sampled_mean": float(lp[rows].mean()) if rows.size else 0.0,
        "never_tried_frac": float(np.mean(visits == 0)) if visits.size else 0.0,
    }
    if live_lp.size:
        out.update(zip(("lp_q25", "lp_q50", "lp_q75"), map(float, np.quantile(live_lp, [0.25, 0.5, 0.75]))))
    hist = np.bincount(np.minimum(depth, max_depth), minlength=max_depth + 1)
    for d, count in enumerate(hist):
        out[f"depth_{d}"] = float(count)
    if rows.size:
        sampled_depth = np.asarray(table.depth)[rows]
        out["sampled_depth_mean"] = float(sampled_depth.mean())
        out["lp_sampled_min"], out["lp_sampled_max"] = float(lp[rows].min()), float(lp[rows].max())
        hist = np.bincount(np.minimum(sampled_depth, max_depth), minlength=max_depth + 1)
        for d, count in enumerate(hist):
            out[f"sampled_depth_{d}"] = float(count)
    return out


def _scalar(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class MetricsLogger:
    """Writes one JSON line per step to `<out_dir>/metrics.jsonl`, the same scalars to TensorBoard,
    and the key numbers to a tqdm bar. Owns the file, the TensorBoard writer and the bar; `close()`
    (or the context manager) releases them on every exit path.

    Args:
      out_dir: folder of metrics.jsonl and tb/.
      total_steps: the bar's length.
      start_step: steps already done (a resumed run appends to the existing file).
      tensorboard: write TensorBoard event files too.
      progress: show a tqdm bar on stderr.
    """

    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if start_step == 0:
            self.path.write_text("")
        else:
            _truncate_after(self.path, start_step)
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="AceGRPO", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (non-numeric values are kept in the JSON line only) for `step`."""
        record = {"step": int(step), **{k: (_scalar(v) if _scalar(v) is not None else v)
                                        for k, v in metrics.items()}}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                x = _scalar(value)
                if x is not None:
                    self._tb.add_scalar(key, x, int(step))
        if self._bar is not None:
            shown = {label: f"{metrics[k]:.3g}" for k, label in CONSOLE_KEYS if _scalar(metrics.get(k)) is not None}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_after(path: Path, start_step: int) -> None:
    """Keeps the lines of steps <= start_step (done and checkpointed); a resumed run redoes the rest."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) <= start_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    x = np.asarray(values, np.float64)
    if window <= 1 or x.size < window:
        return x
    kernel = np.ones(window) / window
    head = np.array([x[:i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(x, kernel, mode="valid")])


# Panels of the training figure: (title, [(metric key, label)]); keys on one panel share a unit.
TRAINING_PANELS = (
    ("reward (mean over samples)", (("reward_mean", "all"), ("reward_mean_depth0", "initial states"),
                                    ("reward_mean_deeper", "deeper states"))),
    ("valid submission rate", (("valid_rate", "all"), ("valid_rate_depth0", "initial states"),
                               ("valid_rate_deeper", "deeper states"))),
    ("task table size", (("table_size", "tasks"),)),
    ("learnability potential", (("lp_mean", "live mean"), ("lp_sampled_mean", "sampled mean"))),
    ("depth of the sampled tasks", (("sampled_depth_mean", "mean"),)),
)
# Before/after bars, one axis per unit: rates in [0, 1], steps, reward.
EVAL_PANELS = (
    ("held-out rates", ("valid_rate", "any_medal_rate", "above_median_rate", "human_rank")),
    ("held-out steps to first valid", ("steps_to_first_valid", "steps_to_first_valid_censored")),
    ("held-out episode reward", ("mean_reward",)),
)


def plot_training(records: Sequence[Mapping[str, Any]], before: Mapping[str, float] | None,
                  after: Mapping[str, float] | None, out_png: str | os.PathLike) -> Path:
    """Writes a PNG: the training curves (TRAINING_PANELS) on the top row and the held-out
    evaluation before and after RL on the bottom row, one axis per unit (EVAL_PANELS).

    Args:
      records: the per-step metric dicts (from `read_jsonl`).
      before, after: {metric name: value} of the held-out evaluation before and after RL, or None.
      out_png: where the figure goes.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, len(TRAINING_PANELS), figsize=(4.4 * len(TRAINING_PANELS), 8))
    window = max(1, len(records) // 10)
    for ax, (title, keys) in zip(axes[0], TRAINING_PANELS):
        for i, (key, label) in enumerate(keys):
            pts = [(st, r[key]) for st, r in zip(steps, records) if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, vals = zip(*pts)
            ax.plot(xs, vals, alpha=0.25, color=f"C{i}")
            ax.plot(xs, _smooth(vals, window), color=f"C{i}", label=label)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax, (title, names) in zip(axes[1], EVAL_PANELS):
        names = [k for k in names if before and after and _scalar(before.get(k)) is not None
                 and _scalar(after.get(k)) is not None]
        x = np.arange(len(names))
        if names:
            ax.bar(x - 0.2, [before[k] for k in names], 0.4, label="before RL")
            ax.bar(x + 0.2, [after[k] for k in names], 0.4, label="after RL")
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            ax.legend(fontsize=8)
        ax.set_title(title)
    for ax in axes[1][len(EVAL_PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def mean_of(records: Iterable[Mapping[str, Any]], key: str) -> float:
    """Mean of `key` over the records that have a finite value for it (nan if none)."""
    vals = [_scalar(r.get(key)) for r in records]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else math.nan
