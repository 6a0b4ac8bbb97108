"""Does AceGRPO learn, and what do its curriculum parts buy? The tiny experiment with several seeds.

    python bench/learning.py [--steps 24] [--seeds 0 1 2] [--sft-seed 0] [--variants AceGRPO no_buffer uniform_sampling]

Runs the main job (`ace.train.experiment.run_experiment`: SFT, held-out evaluation, AceGRPO,
held-out evaluation) once per (variant, seed) and prints, per variant, the held-out any-medal rate
and mean episode reward after RL (and before, with the change) as mean ± standard error over the
training seeds. Every run starts from one SFT policy (`--sft-seed`, trained once and cached), so
the seeds vary the RL rollouts and updates only; `--sft-seed -1` gives each seed its own SFT run.
The default budget (`--steps`, learner steps per run) is shorter than the main job's so that the
bench finishes in reasonable time on a CPU; it says so in its output. Extra Hydra overrides pass
through `--override key=value` (repeatable).
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
    "AceGRPO": ("ablation=none",),
    "no_buffer": ("ablation=no_buffer",),
    "uniform_sampling": ("ablation=uniform_sampling",),
    "sync": ("ablation=sync",),
}
DEFAULT_VARIANTS = ("AceGRPO", "no_buffer", "uniform_sampling")
HEADLINE = (("any_medal_rate", "any-medal rate"), ("mean_reward", "mean reward"))


def compose_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The main job's config (hydra_configs/config.yaml plus `overrides`) as a plain resolved dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "hydra_configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def run_variant(variant: str, *, seed: int, steps: int, out_dir: Path, extra: Sequence[str] = (),
                sft_seed: int | None = None) -> dict[str, Any]:
    """One main-job run of `variant` with training seed `seed` and `steps` learner steps.

    `sft_seed` fixes the seed of stage 1 (None = `seed`), so that runs share one cached SFT policy.

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
    return run_experiment(compose_config(overrides))


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant and headline metric: MeanSE over seeds of the after-RL value, of the before-RL
    value, and of the per-seed change (after - before)."""
    from ace.eval import mean_se

    out: dict[str, dict[str, Any]] = {}
    for variant, runs in results.items():
        out[variant] = {}
        for key, _ in HEADLINE:
            after = [r["after"][key].mean for r in runs]
            before = [r["before"][key].mean for r in runs]
            out[variant][key] = {"after": mean_se(after), "before": mean_se(before),
                                 "change": mean_se([a - b for a, b in zip(after, before)])}
    return out


def format_summary(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table: one row per variant, after / before / change per headline metric."""
    header = f"{'variant':<18}" + "".join(f"{label + ' after':>22}{'before':>18}{'change':>18}"
                                          for _, label in HEADLINE)
    lines = [header, "-" * len(header)]
    for variant, metrics in summary.items():
        row = f"{variant:<18}"
        for key, _ in HEADLINE:
            m = metrics[key]
            row += f"{str(m['after']):>22}{str(m['before']):>18}{str(m['change']):>18}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    main_steps = compose_config([])["train"]["steps"]
    parser.add_argument("--steps", type=int, default=24, help=f"AceGRPO learner steps per run (main job: {main_steps})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_learning",
                        help="one sub-directory per run goes here")
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
    t0 = time.perf_counter()
    for variant in args.variants:
        for seed in args.seeds:
            t_run = time.perf_counter()
            res = run_variant(variant, seed=seed, steps=args.steps, out_dir=args.out / f"{variant}_seed{seed}",
                              extra=args.override, sft_seed=sft_seed)
            results[variant].append(res)
            print(f"[bench] {variant} seed {seed}: any-medal {res['after']['any_medal_rate'].mean:.3f}, "
                  f"reward {res['after']['mean_reward'].mean:.3f} ({time.perf_counter() - t_run:.0f}s)", flush=True)
    summary = summarize(results)
    print(f"\nHeld-out metrics after {args.steps} AceGRPO steps, mean ± standard error over {len(args.seeds)} "
          f"training seeds (each seed's value is its mean over the eval seeds):")
    print(format_summary(summary))
    print(f"total time: {time.perf_counter() - t0:.0f}s", flush=True)
    return summary


if __name__ == "__main__":
    main()
