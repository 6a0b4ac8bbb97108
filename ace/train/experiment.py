"""The experiment at every scale: competitions → policy → held-out eval → AceGRPO → held-out eval → report.

`run_experiment(cfg)` is what `python experiments/run.py` calls with the composed Hydra config, for
the tiny CPU job and for `+exp=ace30b` alike; only the config picks the parts (the competitions:
`load_competitions`; the policy: `ace.train.policy`; the rollout engine: `ace.train.engines`; the
learner's devices: `ace.train.devices`). It prints the before/after table of the held-out metrics
with the change, and writes a PNG of the training curves and the before/after bars beside
metrics.jsonl. `evaluate_policy` is the evaluation used before and after RL and by
`experiments/eval.py`.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ace.env.prompt import PromptConfig
from ace.env.reward import RewardConfig
from ace.env.reports import write_transcripts
from ace.eval import MeanSE, evaluate_episodes, mean_se
from ace.rollout.engine import SamplingParams
from ace.train.episodes import run_lockstep
from ace.train.metrics import plot_training, read_jsonl

# Rows of the before/after table: (metric key, label, higher is better).
TABLE_ROWS = (("valid_rate", "valid submission rate", True), ("any_medal_rate", "any-medal rate", True),
              ("human_rank", "mean HumanRank", True), ("steps_to_first_valid", "steps to first valid", False),
              ("steps_to_first_valid_censored", "steps to first valid, censored", False),
              ("mean_reward", "mean episode reward", True))


@dataclasses.dataclass
class EvalResult:
    """Episodes by seed and the metrics: every `ace.eval.METRICS` entry plus `mean_reward`.

    `submission_paths` maps (seed, comp_id) to the saved best submission file, or None when the
    episode had none; it is empty unless `evaluate_policy` was given a `submissions_dir`.
    """

    episodes: dict[int, list[Any]]
    metrics: dict[str, MeanSE]
    submission_paths: dict[tuple[int, str], Path | None] = dataclasses.field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {k: v.mean for k, v in self.metrics.items()}


def evaluate_policy(params: Any, model_config: Any, tokenizer: Any, comps: Sequence[Any], sandbox: Any, *,
                    seeds: Sequence[int], cfg: Mapping[str, Any], engine: Any = None, version: int | None = None,
                    env_factory: Any = None, prompt_cfg: PromptConfig | None = None,
                    submissions_dir: Path | None = None) -> EvalResult:
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
      prompt_cfg: the prompt limits the policy was trained with (default: the SFT corpus's); the
        default env_factory applies env.prompt on top, as the run's own env factory does.
      submissions_dir: when given, each episode's best submission is saved (before the envs close)
        to `<submissions_dir>/seed-<seed>/<comp_id>.csv` (an older file there is removed when the
        episode has none); the envs must offer `save_best_submission`.

    Returns:
      EvalResult with `ace.eval` metrics (mean ± SE over seeds) and `mean_reward`, the mean total
      reward of an episode; with `submissions_dir`, `submission_paths` names the saved files.
    """
    if not seeds:
        raise ValueError("evaluate_policy needs at least one seed")
    if not comps:
        raise ValueError("evaluate_policy needs at least one competition")
    from ace.train.rollouts import make_env_factory

    rollout, env = cfg["rollout"], cfg["env"]
    if engine is None:
        engine = make_engine(params, model_config, cfg, max_batch=len(comps) * len(seeds))
    elif version is not None and version > engine.weight_version:
        engine.update_weights(params, version)
    if env_factory is None:
        env_factory = make_env_factory(sandbox, reward_cfg=reward_config(cfg), max_steps=int(env["max_steps"]),
                                       exec_timeout_s=float(env["exec_timeout_s"]), instrument=bool(env["instrument"]),
                                       prompt_cfg=prompt_config(cfg, prompt_cfg or _sft_prompt_config()))
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
        saved: dict[tuple[int, str], Path | None] = {}
        if submissions_dir is not None:
            for (seed, comp), e in zip(pairs, envs):
                dest = Path(submissions_dir) / f"seed-{int(seed)}" / f"{comp.comp_id}.csv"
                if not e.save_best_submission(dest):
                    dest.unlink(missing_ok=True)  # a file from an earlier evaluation is not this one's
                    dest = None
                saved[(int(seed), comp.comp_id)] = dest
    finally:
        for e in envs:
            e.close()
    by_seed: dict[int, list[Any]] = {int(s): [] for s in seeds}
    for (seed, _), ep in zip(pairs, episodes):
        by_seed[int(seed)].append(ep)
    metrics = dict(evaluate_episodes(by_seed, max_steps=int(env["max_steps"])))
    per_seed = [float(np.mean([ep.total_reward for ep in eps])) for eps in by_seed.values()]
    metrics["mean_reward"] = (mean_se(per_seed) if len(per_seed) > 1
                              else mean_se([ep.total_reward for ep in episodes]))
    return EvalResult(episodes=by_seed, metrics=metrics, submission_paths=saved)


def reward_config(cfg: Mapping[str, Any]) -> RewardConfig:
    """RewardConfig with the overrides under env.reward (unknown keys fail with their names)."""
    overrides = dict(cfg["env"].get("reward") or {})
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"env.reward: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return RewardConfig(**overrides)


def prompt_config(cfg: Mapping[str, Any], base: PromptConfig) -> PromptConfig:
    """`base` (the prompt limits the policy was trained with) with the overrides under env.prompt."""
    overrides = dict(cfg["env"].get("prompt") or {})
    names = {f.name for f in dataclasses.fields(PromptConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"env.prompt: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return dataclasses.replace(base, **{k: int(v) for k, v in overrides.items()})


def _sft_prompt_config() -> PromptConfig:
    from ace.train.sft import COMPACT_PROMPT
    return COMPACT_PROMPT


def make_engine(params: Any, model_config: Any, cfg: Mapping[str, Any], *, max_batch: int) -> Any:
    """The embedded JAX sampler (rollout.kind=jax_sampler) over `params`; an SGLang pool is opened
    with `ace.train.engines.open_engine` and passed to `evaluate_policy` as `engine`."""
    rollout = cfg["rollout"]
    if rollout["kind"] != "jax_sampler":
        raise ValueError(f"make_engine builds the embedded sampler; rollout.kind={rollout['kind']!r} needs "
                         "ace.train.engines.open_engine (it launches or connects to the servers)")
    from ace.train.engines import make_jax_sampler

    return make_jax_sampler(params, model_config, rollout, max_batch=max_batch, seed=int(cfg["seed"]))


def format_before_after(before: Mapping[str, MeanSE], after: Mapping[str, MeanSE]) -> str:
    """The before/after table: one row per headline metric with its change (+ = better)."""
    width = max(len(label) for _, label, _ in TABLE_ROWS) + 2
    lines = [f"{'metric':<{width}}{'before RL':>18}{'after RL':>18}{'change':>10}"]
    lines.append("-" * len(lines[0]))
    for key, label, higher in TABLE_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        change = a.mean - b.mean if b.n and a.n else math.nan
        mark = "" if math.isnan(change) or change == 0 else (" ↑" if (change > 0) == higher else " ↓")
        lines.append(f"{label:<{width}}{str(b):>18}{str(a):>18}{change:>+10.3f}{mark}")
    return "\n".join(lines)


def learned(before: Mapping[str, MeanSE], after: Mapping[str, MeanSE]) -> bool:
    """The main job's bar: mean reward improves, and so does the valid or the any-medal rate."""
    better = lambda k: after[k].mean > before[k].mean  # noqa: E731
    return better("mean_reward") and (better("valid_rate") or better("any_medal_rate"))


def check_multi_process(cfg: Mapping[str, Any]) -> None:
    """The combinations a multi-process run cannot take, refused with the key to change."""
    if jax.process_count() == 1:
        return
    if cfg["rollout"]["kind"] != "sglang":
        raise ValueError(f"{jax.process_count()} JAX processes: rollout.kind={cfg['rollout']['kind']!r} runs "
                         "inside one process; use rollout.kind=sglang (servers fed by the controller)")
    if (cfg.get("sft") or {}).get("enabled", True):
        raise ValueError(f"{jax.process_count()} JAX processes: stage-1 SFT (sft.enabled=true) runs in one "
                         "process; run it on one host, export the policy, and start RL from it with "
                         "model.hf_path=<export> sft.enabled=false")


def load_competitions(cfg: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """(training, evaluation) competitions of `env.kind` (builtin | mlebench), cut to the first
    `train.competitions` / `eval.competitions` when those are set. With `eval.split=validation` the
    evaluation competitions are `env.validation`, taken out of the training ones. Fails before any other work when
    `env.data_dir` holds no prepared competition."""
    env = cfg["env"]
    kind = env["kind"]
    if kind == "builtin":
        from ace.env.suites import load_suite

        train = load_suite("train", seed=int(env["suite_seed"]))
        held_out = load_suite("held_out", seed=int(env["suite_seed"]))
    elif kind == "mlebench":
        from ace.env.mlebench import load_mlebench_suite

        data_dir = env.get("data_dir")
        if not data_dir or data_dir == "???":
            raise ValueError("env.kind=mlebench needs env.data_dir: the folder `mlebench prepare` wrote "
                             "(<data_dir>/<competition>/prepared/{public,private})")
        root = Path(str(data_dir)).expanduser()
        prepared = sorted(p.parent.parent.name for p in root.glob("*/prepared/public")) if root.is_dir() else []
        if not prepared:
            raise FileNotFoundError(f"env.data_dir={str(data_dir)!r} holds no prepared competition "
                                    f"(no <id>/prepared/public folder); run `mlebench prepare` into it")
        meta = env.get("competitions_dir")
        train = load_mlebench_suite(root, _comp_list(env.get("competitions", "lite")), competitions_dir=meta)
        held = env.get("held_out")
        held_out = train if held in (None, "same") else load_mlebench_suite(root, _comp_list(held),
                                                                            competitions_dir=meta)
        if not train:
            raise ValueError(f"env.competitions={env.get('competitions')!r}: none of them is prepared under "
                             f"{root} (prepared: {prepared[:10]})")
    else:
        raise ValueError(f"env.kind={kind!r}: expected 'builtin' or 'mlebench'")
    split = cfg["eval"].get("split", "held_out")
    if split == "validation":
        # Settings are chosen on training competitions set aside, never on the held-out ones.
        names = [str(v) for v in (env.get("validation") or [])]
        by_id = {c.comp_id: c for c in train}
        unknown = [n for n in names if n not in by_id]
        if not names or unknown:
            raise ValueError(f"eval.split=validation needs env.validation: a non-empty list of training "
                             f"competitions; got {names!r} (not training competitions: {unknown}; "
                             f"training: {sorted(by_id)})")
        held_out = [by_id[n] for n in names]
        train = [c for c in train if c.comp_id not in names]
    elif split != "held_out":
        raise ValueError(f"eval.split={split!r}: expected 'held_out' (final numbers) or 'validation' "
                         "(env.validation, taken out of training)")
    n_train, n_eval = cfg["train"].get("competitions"), cfg["eval"].get("competitions")
    if n_train:
        train = train[:int(n_train)]
    if n_eval:
        held_out = held_out[:int(n_eval)]
    return list(train), list(held_out)


def _comp_list(value: Any) -> Any:
    return value if isinstance(value, str) else [str(v) for v in value]


def _save_run_policy_files(out_dir: Path, policy: Any) -> None:
    """model_config.json, tokenizer/ and prompt_config.json in the run folder: with checkpoints/ and
    config.json, what `experiments/eval.py checkpoint=<out_dir>` needs to rebuild the policy and its
    prompts (prompt_config.json holds the policy's own limits; env.prompt overrides are in config.json)."""
    (out_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(policy.model_config), indent=2))
    (out_dir / "prompt_config.json").write_text(json.dumps(dataclasses.asdict(policy.prompt_cfg), indent=2))
    policy.tokenizer.save(out_dir / "tokenizer")


def run_experiment(cfg: Mapping[str, Any], *, before: Any = None) -> dict[str, Any]:
    """The main job (see the module docstring). `cfg` is the composed config as a plain dict.

    One path for every scale; the config picks the parts:
      env.kind       builtin (offline competitions) | mlebench (env.data_dir),
      model / sft    the tiny model trained in stage 1, or an HF folder (model.hf_path), see
                     `ace.train.policy`,
      rollout.kind   jax_sampler (embedded) | sglang (servers launched or given by URL, router),
      mesh / learner.gpus / distributed   the learner's devices (see `ace.train.devices`).
    `before` is the evaluation before RL (`EvalResult`) when the caller already has it from a run
    of the same policy on the same competitions and seeds (bench/learning.py's variants share one
    SFT policy); it is then reused rather than recomputed.
    Returns:
      {"before", "after": {metric: MeanSE}, "before_eval": EvalResult, "learned": bool, "metrics_path",
       "figure_path", "out_dir"}.
    """
    from ace.curriculum import CurriculumConfig
    from ace.env.sandboxes import sandbox_from_config
    from ace.train.devices import describe_split, init_distributed, learner_mesh, restrict_learner_gpus
    from ace.train.engines import open_engine, open_mirror_engine
    from ace.train.multihost import barrier, is_controller
    from ace.train.policy import check_hf_folder, load_policy
    from ace.train.rollouts import make_env_factory
    from ace.train.trainer import AceTrainer, TrainerConfig

    t_start = time.perf_counter()
    out_dir = Path(cfg["out_dir"])
    # Everything that can be checked without a device or a server is checked first.
    tcfg = TrainerConfig.from_cfg(cfg)
    ccfg = CurriculumConfig.from_mapping(cfg["curriculum"])
    train_comps, held_out = load_competitions(cfg)
    if cfg["model"].get("hf_path"):
        check_hf_folder(cfg["model"]["hf_path"], dtype=cfg["model"].get("dtype"))
    if cfg["rollout"]["kind"] == "sglang":
        from ace.rollout.sglang_pool_config import SGLangPoolConfig
        SGLangPoolConfig.from_cfg(cfg["rollout"])
    learner_gpus = restrict_learner_gpus(cfg)
    if init_distributed(cfg):
        check_multi_process(cfg)
    # Several processes (hosts): all run this same flow over one global mesh; the controller
    # (process 0) alone rolls out, evaluates, prints and writes (see ace.train.multihost).
    controller = is_controller()
    say = builtins.print if controller else (lambda *a, **k: None)
    if controller:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    mesh = learner_mesh(cfg)
    seeds = [int(s) for s in cfg["eval"]["seeds"]]
    eval_kind = "validation" if cfg["eval"].get("split") == "validation" else "held-out"
    say(f"[ace] {len(train_comps)} training and {len(held_out)} {eval_kind} competitions ({cfg['env']['kind']}); "
        f"output in {out_dir}", flush=True)
    say(describe_split(mesh, cfg, learner_gpus), flush=True)
    with (sandbox_from_config(cfg["env"]) if controller else contextlib.nullcontext()) as sandbox:
        t0 = time.perf_counter()
        policy = load_policy(cfg, train_comps, sandbox, mesh=mesh, progress=bool(cfg.get("progress", True)))
        shown = {k: v for k, v in policy.stats.items() if k not in ("history", "model_config")}
        what = "stage 1 (SFT)" if policy.source == "sft" else f"policy ({policy.source})"
        say(f"[ace] {what} ready in {time.perf_counter() - t0:.0f}s: {shown}", flush=True)
        if controller:
            _save_run_policy_files(out_dir, policy)
        if tcfg.learner.routing_replay and not policy.model_config.is_moe:
            raise ValueError(f"train.routing_replay=true needs an MoE policy; this one is dense (num_experts="
                             f"{policy.model_config.num_experts}): set train.routing_replay=false")
        ref_params = None
        if tcfg.learner.kl_coef > 0 and cfg["model"].get("ref_hf_path"):
            from ace.models.hf import load_hf_params
            check_hf_folder(cfg["model"]["ref_hf_path"], dtype=cfg["model"].get("dtype"))
            ref_params, _ = load_hf_params(Path(cfg["model"]["ref_hf_path"]).expanduser(), policy.model_config,
                                           mesh=mesh)
        env_factory = make_env_factory(sandbox, reward_cfg=reward_config(cfg), max_steps=tcfg.max_steps,
                                       exec_timeout_s=tcfg.exec_timeout_s, instrument=tcfg.instrument,
                                       prompt_cfg=prompt_config(cfg, policy.prompt_cfg))
        # One batch row per rollout of a group; evaluation prompts go through in chunks of it.
        opener = open_engine if controller else open_mirror_engine
        with opener(cfg, policy, out_dir, max_batch=tcfg.group_size, mesh=mesh) as run_engine:
            engine = run_engine.engine
            t0 = time.perf_counter()
            reused = before is not None
            if controller and not reused:
                before = evaluate_policy(policy.params, policy.model_config, policy.tokenizer, held_out, sandbox,
                                         seeds=seeds, cfg=cfg, engine=engine, env_factory=env_factory)
            if controller and reused:
                say(f"[ace] held-out evaluation before RL: reused, valid {before.metrics['valid_rate']}", flush=True)
            elif controller:
                say(f"[ace] held-out evaluation before RL ({time.perf_counter() - t0:.0f}s): "
                    f"valid {before.metrics['valid_rate']}, reward {before.metrics['mean_reward']}", flush=True)
            trainer = AceTrainer(tcfg, ccfg, params=policy.params, model_config=policy.model_config,
                                 tokenizer=policy.tokenizer, comps=train_comps, engine=engine, env_factory=env_factory,
                                 out_dir=out_dir, mesh=mesh, progress=bool(cfg.get("progress", True)),
                                 ref_params=ref_params, after_publish=run_engine.after_publish)
            t0 = time.perf_counter()
            trainer.run(resume=bool(cfg["resume"]))
            say(f"[ace] stage 2 (AceGRPO) {tcfg.steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
            if not run_engine.wait_ready():
                say("[ace] warning: not every rollout server is back; evaluating on the ones that are", flush=True)
            t0 = time.perf_counter()
            barrier("evaluation")
            if not controller:
                # The controller's evaluation pushes the final weights if they are newer: mirror it.
                if trainer.version > engine.weight_version:
                    engine.update_weights(trainer.learner.params, trainer.version)
                return {"out_dir": out_dir, "process": jax.process_index()}
            after = evaluate_policy(trainer.learner.params, policy.model_config, policy.tokenizer, held_out, sandbox,
                                    seeds=seeds, cfg=cfg, engine=engine, version=trainer.version,
                                    env_factory=env_factory)
            say(f"[ace] held-out evaluation after RL ({time.perf_counter() - t0:.0f}s)", flush=True)
    metrics_path = out_dir / "metrics.jsonl"
    # What each held-out episode did, before and after RL (ace.env.reports.episode_transcript).
    for when, result in (("before-rl", before), ("after-rl", after)):
        write_transcripts(result.episodes, out_dir / "eval" / when / "transcripts")
    before_m, after_m = before.metrics, after.metrics
    figure = plot_training(read_jsonl(metrics_path), {k: before_m[k].mean for k, _, _ in TABLE_ROWS},
                           {k: after_m[k].mean for k, _, _ in TABLE_ROWS}, out_dir / "training.png")
    summary = {"before": {k: dataclasses.asdict(v) for k, v in before_m.items()},
               "after": {k: dataclasses.asdict(v) for k, v in after_m.items()},
               "learned": learned(before_m, after_m), "wall_s": time.perf_counter() - t_start,
               "final_version": trainer.version}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"\nHeld-out evaluation ({len(held_out)} competitions x {len(seeds)} seeds, mean ± SE over seeds):")
    say(format_before_after(before_m, after_m))
    say(f"\nlearned (reward up and valid or medal rate up): {summary['learned']}")
    say(f"metrics: {metrics_path}\nfigure:  {figure}\ntotal time: {summary['wall_s']:.0f}s", flush=True)
    return {"before": before_m, "after": after_m, "before_eval": before, "learned": summary["learned"],
            "metrics_path": metrics_path,
            "figure_path": figure, "out_dir": out_dir}
