"""Wall-clock per RL step: synchronous loop vs the async pipeline (RolloutQueue + RolloutPool).

Episodes spend their time in (simulated) sandbox execution with heavy-tailed, lognormal durations;
the learner step is a fixed sleep. Both loops run the same tasks, durations and 8 rollout workers:

  sync   each step runs its N groups on the workers, waits for the slowest, then trains while the
         workers idle: per step ~ E[slowest of the batch] + learner time.
  async  workers keep producing into the bounded queue while the learner trains; weights are
         published every step; groups more than `max_staleness` versions old are dropped.

The async figure is measured against the physical limit max(learner time, rollout time /
concurrency): no schedule can do better than keeping the slower of the two busy all the time.

A second row (`--real`, on by default when the SGLang environment .venv-sglang exists) runs the
real system on this machine: the tiny policy of the main job (stage-1 SFT, cached under
~/.cache/ace/sft), real sandbox runs on the built-in competitions, a real SGLang CPU server fed
through the async queue, the real learner; the same number of AceGRPO steps synchronously
(`ablation=sync`) and asynchronously, measured in one run; the first step of each (compiles) is
left out of the mean.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
from pathlib import Path
import itertools
import math
import threading
import time

import numpy as np

from ace.rollout.engine import Generation, SamplingParams
from ace.train.pool import RolloutPool
from ace.train.queue import Group, RolloutQueue, Sample


class InstantEngine:
    """Generation is not the bottleneck here: the engine answers at once; execution takes time."""

    def __init__(self):
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts, params):
        return [Generation(output_ids=[1], logprobs=[-0.1], finish_reason="stop",
                           weight_version=self._version) for _ in prompts]

    def update_weights(self, params, version):
        self._version = version


def make_task_source(*, seed: int, group_size: int, mean_s: float, sigma: float):
    """Tasks as (task id, [G] episode durations), drawn from one seeded stream."""
    mu = math.log(mean_s) - sigma ** 2 / 2  # so that E[duration] = mean_s
    rng = np.random.default_rng(seed)
    lock = threading.Lock()
    counter = itertools.count()

    def source():
        with lock:
            return next(counter), rng.lognormal(mu, sigma, size=group_size)
    return source


def run_group(engine, task) -> Group:
    """G episodes of one task, one after another: generate an action, execute it (sleep), grade."""
    task_id, durations = task
    samples = []
    for d in durations:
        gen = engine.generate([[task_id]], SamplingParams(max_new_tokens=1))[0]
        time.sleep(d)  # sandbox execution of the action
        samples.append(Sample(task_id=task_id, prompt_ids=[task_id], output_ids=gen.output_ids,
                              rollout_logprobs=gen.logprobs, reward=0.0, duration_s=float(d),
                              policy_version=gen.weight_version))
    return Group(task_id=task_id, group_size=len(durations), samples=samples, group_id=task_id)


def sync_loop(args) -> float:
    """Seconds per step of rollout-then-train with the same number of workers."""
    engine, source = InstantEngine(), make_task_source(seed=args.seed, group_size=args.group_size,
                                                       mean_s=args.mean_exec_s, sigma=args.sigma)
    with concurrent.futures.ThreadPoolExecutor(args.workers) as ex:
        t0 = None
        for step in range(args.steps + 1):
            if step == 1:
                t0 = time.monotonic()  # step 0 warms up threads, like the async warm-up
            groups = list(ex.map(lambda _: run_group(engine, source()), range(args.groups_per_step)))
            assert len(groups) == args.groups_per_step
            time.sleep(args.learner_s)
            engine.update_weights(None, step + 1)
    return (time.monotonic() - t0) / args.steps


def async_pipeline(args) -> tuple[float, dict]:
    """Seconds per step of the pipelined loop, and the queue's metrics."""
    engine = InstantEngine()
    source = make_task_source(seed=args.seed, group_size=args.group_size, mean_s=args.mean_exec_s,
                              sigma=args.sigma)
    queue = RolloutQueue(args.capacity_groups, max_staleness=args.max_staleness, policy="drop")
    version = 0
    with RolloutPool(engine, source, run_group, queue, workers=args.workers) as pool:
        queue.get_batch(args.groups_per_step, current_version=version, timeout=60)  # pipeline fill
        t0 = time.monotonic()
        warm = queue.metrics()
        for _ in range(args.steps):
            time.sleep(args.learner_s)
            version += 1
            pool.publish(None, version)
            queue.get_batch(args.groups_per_step, current_version=version, timeout=60)
        per_step = (time.monotonic() - t0) / args.steps
        m = queue.metrics()
        queue.close()
    # Idle fraction over the measured steps only (the fill is excluded, as for sync).
    m["learner_idle_fraction"] = (m["learner_wait_s"] - warm["learner_wait_s"]) / (per_step * args.steps)
    return per_step, m


REPO = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"


def real_system(args) -> tuple[float, float]:
    """Seconds per step (mean over steps 2..N) of sync and async AceGRPO with a real SGLang CPU server."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ace.curriculum import CurriculumConfig
    from ace.env.sandboxes import make_sandbox
    from ace.train.engines import open_engine
    from ace.train.experiment import load_competitions, prompt_config, reward_config
    from ace.train.metrics import read_jsonl
    from ace.train.policy import load_policy
    from ace.train.rollouts import make_env_factory
    from ace.train.trainer import AceTrainer, TrainerConfig

    overrides = ["rollout=sglang_cpu", f"train.steps={args.real_steps}", "train.checkpoint_every=1000",
                 "progress=false"]
    with initialize_config_dir(config_dir=str(REPO / "hydra_configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    train_comps, _ = load_competitions(cfg)
    per_step = {}
    with tempfile.TemporaryDirectory(prefix="ace-bench-pipeline-") as tmp, make_sandbox("subprocess") as sandbox:
        policy = load_policy(cfg, train_comps, sandbox, progress=False)
        env_factory = make_env_factory(sandbox, reward_cfg=reward_config(cfg), max_steps=int(cfg["env"]["max_steps"]),
                                       exec_timeout_s=float(cfg["env"]["exec_timeout_s"]), instrument=True,
                                       prompt_cfg=prompt_config(cfg, policy.prompt_cfg))
        with open_engine(cfg, policy, Path(tmp) / "engine", max_batch=int(cfg["train"]["group_size"])) as run_engine:
            for mode in ("sync", "async"):
                mode_cfg = {**cfg, "ablation": {**cfg["ablation"], "sync": mode == "sync"}}
                trainer = AceTrainer(TrainerConfig.from_cfg(mode_cfg), CurriculumConfig.from_mapping(cfg["curriculum"]),
                                     params=policy.params, model_config=policy.model_config,
                                     tokenizer=policy.tokenizer, comps=train_comps, engine=run_engine.engine,
                                     env_factory=env_factory, out_dir=Path(tmp) / mode, progress=False)
                trainer.run()
                rows = read_jsonl(Path(tmp) / mode / "metrics.jsonl")
                per_step[mode] = float(np.mean([r["step_time_s"] for r in rows[1:]]))
                print(f"  real {mode}: {json.dumps([round(r['step_time_s'], 2) for r in rows])} s per step", flush=True)
    return per_step["sync"], per_step["async"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--groups-per-step", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--mean-exec-s", type=float, default=0.025, help="mean sandbox time per episode")
    ap.add_argument("--sigma", type=float, default=1.2, help="lognormal sigma (heavy tail)")
    ap.add_argument("--learner-s", type=float, default=0.1, help="simulated learner step time")
    ap.add_argument("--max-staleness", type=int, default=2)
    ap.add_argument("--capacity-groups", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=SGLANG_PYTHON.exists(),
                    help="also run the real system (tiny policy, sandbox, SGLang CPU server)")
    ap.add_argument("--real-steps", type=int, default=6)
    args = ap.parse_args()

    rollout_s = args.groups_per_step * args.group_size * args.mean_exec_s
    limit = max(args.learner_s, rollout_s / args.workers)
    print(f"pipeline bench: {args.groups_per_step} groups x {args.group_size} episodes per step, "
          f"{args.workers} workers, execution lognormal(mean {args.mean_exec_s * 1e3:.0f} ms, "
          f"sigma {args.sigma}), learner {args.learner_s * 1e3:.0f} ms/step, {args.steps} steps")
    sync_s = sync_loop(args)
    async_s, m = async_pipeline(args)
    print(f"sync loop      : {sync_s:.3f} s/step")
    print(f"async pipeline : {async_s:.3f} s/step  (learner idle {100 * m['learner_idle_fraction']:.1f}%, "
          f"stale groups dropped {m['dropped_stale']:.0f}, mean staleness {m['mean_staleness']:.2f})")
    print(f"physical limit : {limit:.3f} s/step = max(learner {args.learner_s:.3f}, "
          f"rollout {rollout_s:.3f} / {args.workers} workers)")
    print(f"speed-up async vs sync: {sync_s / async_s:.2f}x (target >= 2x); "
          f"async reaches {100 * limit / async_s:.0f}% of the physical limit")
    if args.real:
        print(f"real system: tiny policy, built-in competitions, subprocess sandbox, 1 SGLang CPU server, "
              f"{args.real_steps} AceGRPO steps each")
        real_sync, real_async = real_system(args)
        print(f"real sync loop      : {real_sync:.2f} s/step")
        print(f"real async pipeline : {real_async:.2f} s/step")
        print(f"real speed-up async vs sync: {real_sync / real_async:.2f}x")
    else:
        print("real system: skipped (no .venv-sglang; build it with bash tests/support/sglang_env/build.sh)")


if __name__ == "__main__":
    main()
