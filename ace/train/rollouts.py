"""Collecting groups: the G episodes of one task, run in lockstep against the rollout engine and
fresh environments, summarised as one queue `Group`.

Each sample's `extra` is the record the rest of a step reads:
  turns     (prompt ids, output ids, behaviour logprobs, routing) of every action: the learner's
            rows (`ace.train.batches`);
  outcome   "valid" if any step was, else the last step's outcome (`episode_outcome`);
  medal     the best medal of a valid step, or None;
  success   a valid submission that beat the task's own best so far, the Learnability success;
  children  (depth offset, state) of every executed, non-final step: the buffer's candidate tasks
            (`ace.train.tasks`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ace.env.prompt import PromptConfig
from ace.env.reward import RewardConfig
from ace.rollout.engine import SamplingParams
from ace.train.episodes import run_lockstep
from ace.train.metrics import group_metrics
from ace.train.queue import Group, Sample
from ace.train.tasks import TaskRef
from ace.train.trainer_config import TrainerConfig

# Outcomes of a step whose code ran: its resulting state is a task worth starting from.
EXECUTED = ("runtime_error", "invalid", "validated", "valid")
_MEDAL_ORDER = {None: 0, "bronze": 1, "silver": 2, "gold": 3}


def episode_outcome(steps: Sequence[Any]) -> str:
    """"valid" when any step submitted a valid answer, else the last step's outcome."""
    outcomes = [s.outcome for s in steps]
    return "valid" if "valid" in outcomes else outcomes[-1]


def episode_medal(steps: Sequence[Any]) -> str | None:
    """The best medal among the episode's valid steps, or None."""
    medals = [s.grade.medal for s in steps if s.outcome == "valid" and s.grade is not None]
    return max(medals, key=lambda m: _MEDAL_ORDER[m], default=None)


def improved(steps: Sequence[Any]) -> bool:
    """Learnability success: a valid submission that beats the task's own best so far."""
    return any(s.outcome == "valid" and s.state_after.best_step == s.state_before.step for s in steps)


def episode_sample(task_id: int, steps: Sequence[Any]) -> Sample:
    """One episode's steps (`ace.env.episode.Step`s, at least one) as a queue Sample.

    The sample's tokens are the first action's; every action is kept in `extra["turns"]`. Reward
    and duration are the episode's sums; `policy_version` the oldest version behind any token.
    """
    children = [(i + 1, s.state_after) for i, s in enumerate(steps)
                if s.outcome in EXECUTED and not s.state_after.done]
    return Sample(
        task_id=task_id, prompt_ids=steps[0].prompt_ids, output_ids=steps[0].output_ids,
        rollout_logprobs=steps[0].logprobs, reward=float(sum(s.reward for s in steps)),
        duration_s=float(sum(s.duration_s for s in steps)),
        policy_version=min(s.weight_version for s in steps),
        extra={"turns": [(s.prompt_ids, s.output_ids, s.logprobs, s.routing) for s in steps],
               "outcome": episode_outcome(steps), "medal": episode_medal(steps),
               "success": improved(steps), "children": children})


def rollout_group(engine: Any, task: TaskRef, seed: int, *, comp: Any, env_factory: Callable[[Any], Any],
                  tokenizer: Any, sampling: SamplingParams, cfg: TrainerConfig) -> Group:
    """G rollouts of `task` (one action each in step-wise mode, else whole episodes) as a Group.

    Args:
      engine: the RolloutEngine to sample from (a worker's, in the asynchronous loop).
      task: where the rollouts start; comp: its competition.
      seed: sampling seeds are seed * G + g for rollout g, so a group repeats given its seed.
      env_factory: `env_factory(comp) -> env`; each rollout gets its own, closed afterwards.
      tokenizer, sampling: render prompts and decode actions; the sampling settings.
      cfg: group size, prompt budget, step-wise mode and sandbox runs in flight.
    """
    envs = [env_factory(comp) for _ in range(cfg.group_size)]
    try:
        episodes = run_lockstep(envs, [task.state] * cfg.group_size, engine, tokenizer, sampling=sampling,
                                seeds=[seed * cfg.group_size + g for g in range(cfg.group_size)],
                                max_prompt_tokens=cfg.max_prompt_tokens,
                                max_actions=1 if cfg.stepwise else None, exec_workers=cfg.exec_workers,
                                grade_final=False)
    finally:
        for env in envs:
            env.close()
    samples = []
    for ep in episodes:
        if not ep.steps:
            raise RuntimeError(f"task {task.task_id} ({comp.comp_id}) started from a finished state")
        samples.append(episode_sample(task.task_id, ep.steps))
    return Group(task_id=task.task_id, group_size=cfg.group_size, samples=samples)


def rollout_metrics(groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> dict[str, float]:
    """`group_metrics` of a step's groups (rewards, outcomes, medals, successes, by task depth) and
    `rollout_tokens`, the tokens the engine generated for them."""
    rewards = np.asarray([[s.reward for s in g.samples] for g in groups])
    out = group_metrics(rewards, [[s.extra["outcome"] for s in g.samples] for g in groups],
                        [[s.extra["medal"] for s in g.samples] for g in groups],
                        np.asarray([[s.extra["success"] for s in g.samples] for g in groups]),
                        depths=[tasks[id(g)].depth for g in groups])
    out["rollout_tokens"] = float(sum(len(t[1]) for g in groups for s in g.samples for t in s.extra["turns"]))
    return out


def make_env_factory(sandbox: Any, *, reward_cfg: RewardConfig, max_steps: int, exec_timeout_s: float,
                     instrument: bool, prompt_cfg: PromptConfig = PromptConfig()) -> Callable[[Any], Any]:
    """`comp -> MLEEnv` with the run's sandbox and reward; every env shares the caller's sandbox."""
    from ace.env.gym import MLEEnv

    def factory(comp):
        return MLEEnv(comp, sandbox, reward_cfg=reward_cfg, max_steps=max_steps, exec_timeout_s=exec_timeout_s,
                      instrument=instrument, prompt_cfg=prompt_cfg)
    return factory
