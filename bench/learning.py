"""Does AceGRPO learn, and what do its curriculum parts buy? The project's ablation study on the CPU.

    python bench/learning.py [--steps 24] [--seeds 0 1 2 3 4] [--variants AceGRPO no_buffer uniform_sampling sync]

Runs the main job (`ace.train.experiment.run_experiment`: SFT, held-out evaluation, AceGRPO,
held-out evaluation) once per (variant, training seed). Every run starts from one SFT policy
(`--sft-seed`, trained once and cached) and is evaluated on the same held-out competitions with
the same evaluation seeds, so the training seed varies the RL rollouts and updates only, and the
variants of one seed form a pair.

It prints, per variant, the held-out metrics after RL (valid rate, any-medal rate, mean HumanRank,
steps to the first valid submission as the paper counts it and censored, mean episode reward), each
as mean ± standard error over the training seeds, and each ablation's difference from AceGRPO
with a paired bootstrap 95% interval (`ace.eval.paired_bootstrap`, pairs = training seeds). It
writes `<out>/table.csv` (one row per variant and metric) and `<out>/ablations.png` (one axis per
metric, and the training reward curves), which `notebooks/ablations.ipynb` reads. The budget
(`--steps` learner steps per run) is shorter than the main job's so that the study fits on a CPU;
it says so in its output. Extra Hydra overrides pass through `--override key=value` (repeatable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Variant name -> Hydra overrides (the ablation config groups of hydra_configs/ablation/).
VARIANTS: dict[str, tuple[str, ...]] = {
    "AceGRPO": ("ablation=full",),
    "no_buffer": ("ablation=no_buffer",),
    "uniform_sampling": ("ablation=uniform_sampling",),
    "sync": ("ablation=sync",),
    # Curriculum settings (not in the default study; run them with --variants ... --override
    # eval.split=validation to choose on training competitions set aside, never on the held-out).
    "reward_std": ("ablation=full", "curriculum.potential=reward_std"),
    "sampler_temp_1": ("ablation=full", "curriculum.temperature=1.0"),
    "G8": ("ablation=full", "train.group_size=8", "train.tasks_per_step=1"),
}
DEFAULT_VARIANTS = ("AceGRPO", "no_buffer", "uniform_sampling", "sync")
FULL = "AceGRPO"
# (metric key, label, higher is better) of the table, the CSV and the figure.
HEADLINE = (("valid_rate", "valid rate", True), ("any_medal_rate", "any-medal rate", True),
            ("human_rank", "HumanRank", True), ("steps_to_first_valid", "steps to 1st valid", False),
            ("steps_to_first_valid_censored", "steps, censored", False), ("mean_reward", "mean reward", True))


def compose_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The main job's config (hydra_configs/config.yaml plus `overrides`) as a plain resolved dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "hydra_configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def run_variant(variant: str, *, seed: int, steps: int, out_dir: Path, extra: Sequence[str] = (),
                sft_seed: int | None = None, before: Any = None) -> dict[str, Any]:
    """One main-job run of `variant` with training seed `seed` and `steps` learner steps.

    `sft_seed` fixes the seed of stage 1 (None = `seed`), so that runs share one cached SFT policy;
    `before` is the evaluation of that policy before RL from an earlier run, reused.

    Returns:
      run_experiment's result: {"before", "after": {metric: MeanSE}, "learned", "metrics_path", ...}.
    """
    from ace.train.experiment import run_experiment

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}, expected one of {sorted(VARIANTS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    overrides = [*VARIANTS[variant], f"seed={seed}", f"train.steps={steps}", f"out_dir={out_dir}",
                 "progress=false", *([] if sft_seed is None else [f"sft.seed={sft_seed}"]), *extra]
    return run_experiment(compose_config(overrides), before=before)


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]], *, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (variant, headline metric): the after-RL value as mean ± SE over training seeds,
    the before-RL value, and for each ablation the paired difference from FULL (same seeds).

    Args:
      results: {variant: [run_experiment result per seed, in `seeds` order]}.
    Returns:
      rows of {variant, metric, mean, se, n, before_mean, diff, diff_low, diff_high}, the diff
      fields None for FULL (or when FULL was not run).
    """
    from ace.eval import mean_se, paired_bootstrap

    def values(runs, key, when="after"):
        return [r[when][key].mean if r[when][key].n else float("nan") for r in runs]

    rows = []
    for variant, runs in results.items():
        if len(runs) != len(seeds):
            raise ValueError(f"{variant}: {len(runs)} runs for {len(seeds)} seeds")
        for key, _, _ in HEADLINE:
            after = values(runs, key)
            m = mean_se([x for x in after if x == x])
            before = mean_se([x for x in values(runs, key, "before") if x == x])
            row = {"variant": variant, "metric": key, "mean": m.mean, "se": m.se, "n": m.n,
                   "before_mean": before.mean, "diff": None, "diff_low": None, "diff_high": None}
            if variant != FULL and FULL in results:
                d = paired_bootstrap(values(results[FULL], key), after)
                row.update(diff=d.mean, diff_low=d.low, diff_high=d.high)
            rows.append(row)
    return rows


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """Two fixed-width tables: the metrics after RL per variant (mean ± SE), and each ablation's
    difference from FULL with its 95% paired bootstrap interval."""
    from ace.eval import MeanSE, PairedDifference

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["metric"]): r for r in rows}
    width = 26  # "+0.458 [+0.412, +0.503]" and a gap
    header = f"{'variant':<18}" + "".join(f"{label:>{width}}" for _, label, _ in HEADLINE)
    lines = ["after RL (mean ± SE over training seeds)", header, "-" * len(header)]
    for v in variants:
        lines.append(f"{v:<18}" + "".join(
            f"{str(MeanSE(cell[v, k]['mean'], cell[v, k]['se'], cell[v, k]['n'])):>{width}}" for k, _, _ in HEADLINE))
    ablations = [v for v in variants if cell[v, HEADLINE[0][0]]["diff"] is not None]
    if ablations:
        lines += ["", f"difference from {FULL} (ablation - {FULL}), paired bootstrap 95% interval", header,
                  "-" * len(header)]
        for v in ablations:
            lines.append(f"{v:<18}" + "".join(
                f"{str(PairedDifference(cell[v, k]['diff'], cell[v, k]['diff_low'], cell[v, k]['diff_high'], cell[v, k]['n'], 0.95)):>{width}}"
                for k, _, _ in HEADLINE))
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The summary rows as CSV (one row per variant and metric)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_ablations(rows: Sequence[Mapping[str, Any]], curves: Mapping[str, Sequence[Sequence[float]]],
                   path: Path) -> Path:
    """One axis per headline metric (bars: variants, error bars: SE over seeds), and the training
    reward per step, averaged over seeds, per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, len(HEADLINE) + 1, figsize=(3.6 * (len(HEADLINE) + 1), 3.8))
    for ax, (key, label, higher) in zip(axes, HEADLINE):
        x = np.arange(len(variants))
        ax.bar(x, [cell[v, key]["mean"] for v in variants], yerr=[cell[v, key]["se"] for v in variants],
               color=[f"C{i}" for i in range(len(variants))], capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels(variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    ax = axes[-1]
    for i, (variant, per_seed) in enumerate(curves.items()):
        length = min((len(c) for c in per_seed), default=0)
        if length:
            ax.plot(np.arange(1, length + 1), np.mean([c[:length] for c in per_seed], axis=0), color=f"C{i}",
                    label=variant)
    ax.set_title("training reward (mean over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from ace.train.metrics import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    main_steps = compose_config([])["train"]["steps"]
    parser.add_argument("--steps", type=int, default=24, help=f"AceGRPO learner steps per run (main job: {main_steps})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_learning",
                        help="one sub-directory per run, table.csv and ablations.png go here")
    parser.add_argument("--sft-seed", type=int, default=0,
                        help="seed of the one SFT policy every run starts from (-1: each run's own seed)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override, e.g. eval.seeds=[0]")
    args = parser.parse_args(argv)
    sft_seed = None if args.sft_seed < 0 else args.sft_seed
    print(f"bench/learning: tiny experiment, {args.steps} AceGRPO steps per run (a short budget; the main "
          f"job trains {main_steps}), training seeds {args.seeds}, variants {args.variants}, SFT seed "
          f"{'= training seed' if sft_seed is None else sft_seed}", flush=True)
    if args.override:
        print(f"extra overrides: {args.override}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    curves: dict[str, list[list[float]]] = {v: [] for v in args.variants}
    t0 = time.perf_counter()
    # One SFT policy, one set of evaluation seeds: the evaluation before RL is the same for every
    # run, so it is computed once.
    before = None
    for variant in args.variants:
        for seed in args.seeds:
            t_run = time.perf_counter()
            res = run_variant(variant, seed=seed, steps=args.steps, out_dir=args.out / f"{variant}_seed{seed}",
                              extra=args.override, sft_seed=sft_seed, before=before)
            if sft_seed is not None:
                before = res["before_eval"]
            results[variant].append(res)
            curves[variant].append([r["reward_mean"] for r in read_jsonl(res["metrics_path"]) if "reward_mean" in r])
            print(f"[bench] {variant} seed {seed}: valid {res['after']['valid_rate'].mean:.3f}, any-medal "
                  f"{res['after']['any_medal_rate'].mean:.3f}, reward {res['after']['mean_reward'].mean:.3f} "
                  f"({time.perf_counter() - t_run:.0f}s)", flush=True)
    rows = summarize(results, seeds=args.seeds)
    print(f"\nHeld-out metrics after {args.steps} AceGRPO steps over {len(args.seeds)} training seeds (each "
          f"seed's value is its mean over the evaluation seeds):")
    print(format_summary(rows))
    print(f"table: {write_csv(rows, args.out / 'table.csv')}, figure: "
          f"{plot_ablations(rows, curves, args.out / 'ablations.png')}")
    print(f"total time: {time.perf_counter() - t0:.0f}s", flush=True)
    return rows


if __name__ == "__main__":
    main()
