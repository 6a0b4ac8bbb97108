"""The main job: suite → SFT (stage 1) → held-out eval → AceGRPO (stage 2) → held-out eval → report.

`run_experiment(cfg)` is what `python experiments/run.py` calls with the composed Hydra config. It
prints the before/after table of the held-out metrics with the change, and writes a PNG of the
training curves and the before/after bars beside metrics.jsonl. `evaluate_policy` is the
evaluation used before and after RL and by `experiments/eval.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ace.env.agent import PromptConfig
from ace.env.reward import RewardConfig
from ace.eval import MeanSE, evaluate_episodes, mean_se
from ace.rollout.engine import SamplingParams
from ace.train.episodes import run_lockstep
from ace.train.metrics import plot_training, read_jsonl

# Rows of the before/after table: (metric key, label, higher is better).
TABLE_ROWS = (("valid_rate", "valid submission rate", True), ("any_medal_rate", "any-medal rate", True),
              ("human_rank", "mean HumanRank", True), ("steps_to_first_valid", "steps to first valid", False),
              ("mean_reward", "mean episode reward", True))


@dataclasses.dataclass
class EvalResult:
    """Episodes by seed and the metrics: every `ace.eval.METRICS` entry plus `mean_reward`."""

    episodes: dict[int, list[Any]]
    metrics: dict[str, MeanSE]

    def means(self) -> dict[str, float]:
        return {k: v.mean for k, v in self.metrics.items()}


def evaluate_policy(params: Any, model_config: Any, tokenizer: Any, comps: Sequence[Any], sandbox: Any, *,
                    seeds: Sequence[int], cfg: Mapping[str, Any], engine: Any = None, version: int | None = None,
                    env_factory: Any = None, prompt_cfg: PromptConfig | None = None) -> EvalResult:
    """Runs one whole episode per (competition, seed) with fixed sampling seeds and scores them.

    Args:
      params: policy params (pushed into `engine` when given as `version`, or into a fresh
        embedded sampler when `engine` is None).
      model_config, tokenizer: the policy's config and tokenizer.
      comps: the competitions to evaluate on (the held-out split in the main job).
      sandbox: where actions run.
      seeds: episode seeds; the same seeds give the same sampling randomness before and after RL.
      cfg: the composed config (reads rollout.*, env.*, eval.temperature).
      engine: an existing RolloutEngine to reuse (its compiled shapes); None builds one.
      version: with `engine`, push `params` as this version first (must not go back).
      env_factory: `comp -> env`; default: MLEEnv with the config's reward and limits.
      prompt_cfg: the prompt limits the policy was trained with (default: the SFT corpus's).

    Returns:
      EvalResult with `ace.eval` metrics (mean ± SE over seeds) and `mean_reward`, the mean total
      reward of an episode.
    """
    if not seeds:
        raise ValueError("evaluate_policy needs at least one seed")
    if not comps:
        raise ValueError("evaluate_policy needs at least one competition")
    from ace.train.trainer import make_env_factory

    rollout, env = cfg["rollout"], cfg["env"]
    if engine is None:
        engine = make_engine(params, model_config, cfg, max_batch=len(comps) * len(seeds))
    elif version is not None and version > engine.weight_version:
        engine.update_weights(params, version)
    if env_factory is None:
        env_factory = make_env_factory(sandbox, reward_cfg=reward_config(cfg), max_steps=int(env["max_steps"]),
                                       exec_timeout_s=float(env["exec_timeout_s"]), instrument=bool(env["instrument"]),
                                       prompt_cfg=prompt_cfg or _sft_prompt_config())
    stop = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
    sampling = SamplingParams(max_new_tokens=int(rollout["max_new_tokens"]),
                              temperature=float(cfg["eval"]["temperature"]), top_p=float(rollout["top_p"]),
                              top_k=int(rollout["top_k"]), stop_token_ids=tuple(stop))
    pairs = [(seed, comp) for seed in seeds for comp in comps]
    envs = [env_factory(comp) for _, comp in pairs]
    try:
        # Seeds are spread by competition index so that two competitions never share randomness.
        episodes = run_lockstep(envs, [None] * len(envs), engine, tokenizer, sampling=sampling,
                                seeds=[1_000_003 + seed * 1009 + i % len(comps) for i, (seed, _) in enumerate(pairs)],
                                max_prompt_tokens=int(rollout["max_prompt_tokens"]), max_actions=None,
                                exec_workers=int((cfg.get("train") or {}).get("exec_workers", 2)))
    finally:
        for e in envs:
            e.close()
    by_seed: dict[int, list[Any]] = {int(s): [] for s in seeds}
    for (seed, _), ep in zip(pairs, episodes):
        by_seed[int(seed)].append(ep)
    metrics = dict(evaluate_episodes(by_seed))
    per_seed = [float(np.mean([ep.total_reward for ep in eps])) for eps in by_seed.values()]
    metrics["mean_reward"] = (mean_se(per_seed) if len(per_seed) > 1
                              else mean_se([ep.total_reward for ep in episodes]))
    return EvalResult(episodes=by_seed, metrics=metrics)


def reward_config(cfg: Mapping[str, Any]) -> RewardConfig:
    """RewardConfig with the overrides under env.reward (unknown keys fail with their names)."""
    overrides = dict(cfg["env"].get("reward") or {})
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"env.reward: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return RewardConfig(**overrides)


def _sft_prompt_config() -> PromptConfig:
    from ace.train.sft import COMPACT_PROMPT
    return COMPACT_PROMPT


def make_engine(params: Any, model_config: Any, cfg: Mapping[str, Any], *, max_batch: int) -> Any:
    """The rollout engine named by rollout.kind (the embedded JAX sampler on CPU)."""
    rollout = cfg["rollout"]
    if rollout["kind"] != "jax_sampler":
        raise ValueError(f"rollout.kind={rollout['kind']!r}: this entry point drives the embedded sampler "
                         "('jax_sampler'); the SGLang pool is started by the ace30b launcher")
    from ace.rollout.jax_sampler import JaxSampler

    max_prompt = int(rollout["max_prompt_tokens"])
    # A fresh state's prompt is about a third of the budget, a state with history up to all of it:
    # two prefill buckets (half and full) cover both with two compiles.
    buckets = (max_prompt // 2,) if max_prompt >= 256 else ()
    return JaxSampler(params, model_config, max_batch=max_batch, max_prompt_len=max_prompt,
                      max_new_tokens=int(rollout["max_new_tokens"]), prompt_buckets=buckets, seed=int(cfg["seed"]))


def format_before_after(before: Mapping[str, MeanSE], after: Mapping[str, MeanSE]) -> str:
    """The before/after table: one row per headline metric with its change (+ = better)."""
    lines = [f"{'metric':<24}{'before RL':>18}{'after RL':>18}{'change':>10}"]
    lines.append("-" * len(lines[0]))
    for key, label, higher in TABLE_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        change = a.mean - b.mean if b.n and a.n else math.nan
        mark = "" if math.isnan(change) or change == 0 else (" ↑" if (change > 0) == higher else " ↓")
        lines.append(f"{label:<24}{str(b):>18}{str(a):>18}{change:>+10.3f}{mark}")
    return "\n".join(lines)


def learned(before: Mapping[str, MeanSE], after: Mapping[str, MeanSE]) -> bool:
    """The main job's bar: mean reward improves, and so does the valid or the any-medal rate."""
    better = lambda k: after[k].mean > before[k].mean  # noqa: E731
    return better("mean_reward") and (better("valid_rate") or better("any_medal_rate"))


def _sft_stage(cfg: Mapping[str, Any], comps: Sequence[Any], sandbox: Any):
    from ace.train.sft import run_sft_stage

    sft = dict(cfg["sft"])
    cache = sft.pop("cache_dir", None) or str(Path.home() / ".cache" / "ace" / "sft")
    if not sft.get("enabled", True):
        raise ValueError("sft.enabled=false: the tiny CPU job trains its policy and tokenizer in stage 1; "
                         "load a pretrained HF model with the ace30b experiment instead")
    return run_sft_stage({**cfg, "sft": sft}, comps, sandbox, cache_root=cache,
                         progress=bool(cfg.get("progress", True)))


def run_experiment(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The main job (see the module docstring). `cfg` is the composed config as a plain dict.

    Returns:
      {"before", "after": {metric: MeanSE}, "learned": bool, "metrics_path", "figure_path", "out_dir"}.
    """
    from ace.curriculum import CurriculumConfig
    from ace.env.sandbox import make_sandbox
    from ace.env.suites import load_suite
    from ace.models.sharding import make_mesh
    from ace.train.trainer import AceTrainer, TrainerConfig, make_env_factory

    t_start = time.perf_counter()
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    env = cfg["env"]
    if env["kind"] != "builtin":
        raise ValueError(f"env.kind={env['kind']!r}: the CPU main job runs the built-in suite ('builtin')")
    tcfg = TrainerConfig.from_cfg(cfg)
    ccfg = CurriculumConfig.from_mapping(cfg["curriculum"])
    train_comps = load_suite("train", seed=int(env["suite_seed"]))
    held_out = load_suite("held_out", seed=int(env["suite_seed"]))
    n_train = cfg["train"].get("competitions")
    if n_train:
        train_comps = train_comps[:int(n_train)]
    n_eval = cfg["eval"].get("competitions")
    if n_eval:
        held_out = held_out[:int(n_eval)]
    seeds = [int(s) for s in cfg["eval"]["seeds"]]
    print(f"[ace] {len(train_comps)} training and {len(held_out)} held-out competitions; output in {out_dir}",
          flush=True)
    with make_sandbox(env["sandbox"]) as sandbox:
        t0 = time.perf_counter()
        sft = _sft_stage(cfg, train_comps, sandbox)
        shown = {k: v for k, v in sft.corpus_stats.items() if k not in ("history", "model_config")}
        print(f"[ace] stage 1 (SFT) ready in {time.perf_counter() - t0:.0f}s: {shown}", flush=True)
        params, model_config, tokenizer = sft.params, sft.model_config, sft.tokenizer
        mesh = None
        n_dev = int(cfg["mesh"].get("devices") or 0)
        if n_dev != 1 and jax.device_count() > 1:
            devices = jax.devices() if n_dev <= 0 else jax.devices()[:n_dev]
            shape = {k: int(v) for k, v in cfg["mesh"].items() if k != "devices"}
            mesh = make_mesh(shape, devices)
        # One batch row per rollout of a group; evaluation prompts go through in chunks of it.
        engine = make_engine(params, model_config, cfg, max_batch=tcfg.group_size)
        env_factory = make_env_factory(sandbox, reward_cfg=reward_config(cfg), max_steps=tcfg.max_steps,
                                       exec_timeout_s=tcfg.exec_timeout_s, instrument=tcfg.instrument,
                                       prompt_cfg=sft.prompt_cfg)
        t0 = time.perf_counter()
        before = evaluate_policy(params, model_config, tokenizer, held_out, sandbox, seeds=seeds, cfg=cfg,
                                 engine=engine, env_factory=env_factory)
        print(f"[ace] held-out evaluation before RL ({time.perf_counter() - t0:.0f}s): "
              f"valid {before.metrics['valid_rate']}, reward {before.metrics['mean_reward']}", flush=True)
        trainer = AceTrainer(tcfg, ccfg, params=params, model_config=model_config, tokenizer=tokenizer,
                             comps=train_comps, engine=engine, env_factory=env_factory, out_dir=out_dir, mesh=mesh,
                             progress=bool(cfg.get("progress", True)))
        t0 = time.perf_counter()
        trainer.run(resume=bool(cfg["resume"]))
        print(f"[ace] stage 2 (AceGRPO) {tcfg.steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        after = evaluate_policy(trainer.learner.params, model_config, tokenizer, held_out, sandbox, seeds=seeds,
                                cfg=cfg, engine=engine, version=trainer.version, env_factory=env_factory)
        print(f"[ace] held-out evaluation after RL ({time.perf_counter() - t0:.0f}s)", flush=True)
    metrics_path = out_dir / "metrics.jsonl"
    before_m, after_m = before.metrics, after.metrics
    figure = plot_training(read_jsonl(metrics_path), {k: before_m[k].mean for k, _, _ in TABLE_ROWS},
                           {k: after_m[k].mean for k, _, _ in TABLE_ROWS}, out_dir / "training.png")
    summary = {"before": {k: dataclasses.asdict(v) for k, v in before_m.items()},
               "after": {k: dataclasses.asdict(v) for k, v in after_m.items()},
               "learned": learned(before_m, after_m), "wall_s": time.perf_counter() - t_start}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nHeld-out evaluation ({len(held_out)} competitions x {len(seeds)} seeds, mean ± SE over seeds):")
    print(format_before_after(before_m, after_m))
    print(f"\nlearned (reward up and valid or medal rate up): {summary['learned']}")
    print(f"metrics: {metrics_path}\nfigure:  {figure}\ntotal time: {summary['wall_s']:.0f}s", flush=True)
    return {"before": before_m, "after": after_m, "learned": summary["learned"], "metrics_path": metrics_path,
            "figure_path": figure, "out_dir": out_dir}
