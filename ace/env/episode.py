"""Policies and episodes: what a policy answers, one turn's record, and the loop of one episode.

A `Policy` maps chat messages to a `PolicyOutput`; `run_episode` runs one in an `ace.env.gym.MLEEnv`
and returns an `Episode`, a tuple of `Step`s with everything the learner and the curriculum read.
The trainer's rollouts run G episodes in lockstep instead (`ace.train.episodes`); they produce the
same `Step`s.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from ace.env.actions import Action, FormatError, parse_action
from ace.env.agent import AgentState
from ace.env.gym import MLEEnv
from ace.env.prompt import render_prompt


@dataclasses.dataclass(frozen=True)
class PolicyOutput:
    """One model answer: text, the token ids (prompt and output), the behaviour logprobs of the
    output ids ([T] floats, aligned with output_ids) and the policy version that produced them."""

    text: str
    prompt_ids: tuple[int, ...] = ()
    output_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    weight_version: int = -1

    def __post_init__(self):
        if len(self.output_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.output_ids)} output ids but {len(self.logprobs)} logprobs")


Policy = Callable[[list[dict]], PolicyOutput]


@dataclasses.dataclass(frozen=True)
class PromptBudget:
    """Lets `run_episode` trim prompts to what a policy accepts; a policy may expose one as
    its `prompt_budget` attribute."""

    count_tokens: Callable[[list[dict]], int]
    max_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Step:
    """One turn of an episode, with everything the learner and the curriculum need."""

    state_before: AgentState
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    weight_version: int
    action: Action | FormatError
    observation: str
    reward: float
    duration_s: float            # environment time: execution and grading
    generation_s: float
    grade: Any | None
    state_after: AgentState
    outcome: str
    routing: Any = None          # [L, P + T, k] routed experts (`Generation.routing`), when asked for


@dataclasses.dataclass(frozen=True)
class Episode:
    """A finished (or stopped) episode; `final_grade` is the best submission's grade or None."""

    comp_id: str
    steps: tuple[Step, ...]
    final_grade: Any | None

    @property
    def total_reward(self) -> float:
        return float(sum(s.reward for s in self.steps))

    @property
    def final_state(self) -> AgentState | None:
        return self.steps[-1].state_after if self.steps else None

    @property
    def steps_to_first_valid(self) -> int | None:
        """1-based index of the first step that produced a scored valid submission."""
        for i, s in enumerate(self.steps):
            if s.outcome == "valid":
                return i + 1
        return None


def run_episode(env: MLEEnv, policy: Policy, *, state: AgentState | None = None,
                max_actions: int | None = None) -> Episode:
    """Run `policy` in `env` from `state` (or a fresh state) until done or `max_actions` actions."""
    if max_actions is not None and max_actions < 1:
        raise ValueError(f"max_actions must be >= 1 or None, got {max_actions}")
    env.reset(state)
    budget: PromptBudget | None = getattr(policy, "prompt_budget", None)
    steps: list[Step] = []
    while not env.state.done and (max_actions is None or len(steps) < max_actions):
        before = env.state
        messages = (env.messages(count_tokens=budget.count_tokens,
                                 max_prompt_tokens=budget.max_prompt_tokens)
                    if budget is not None else env.messages())
        t0 = time.perf_counter()
        out = policy(messages)
        generation_s = time.perf_counter() - t0
        result = env.step(out.text)
        steps.append(Step(state_before=before, prompt_ids=tuple(out.prompt_ids),
                          output_ids=tuple(out.output_ids), logprobs=tuple(out.logprobs),
                          weight_version=out.weight_version, action=parse_action(out.text),
                          observation=result.observation, reward=result.reward,
                          duration_s=result.duration_s, generation_s=generation_s,
                          grade=result.grade, state_after=result.state_after,
                          outcome=result.outcome))
    final = env.final_grade() if env.state.done else env.best_grade
    return Episode(comp_id=env.comp.comp_id, steps=tuple(steps), final_grade=final)


def run_group(env: MLEEnv, policy: Policy, *, group_size: int, state: AgentState | None = None,
              max_actions: int | None = None) -> list[Episode]:
    """`group_size` episodes from the same start state, one after another (threads live in the pool)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [run_episode(env, policy, state=state, max_actions=max_actions) for _ in range(group_size)]


class EnginePolicy:
    """A `Policy` backed by an `ace.rollout.engine.RolloutEngine` and a tokenizer."""

    def __init__(self, engine, tokenizer, sampling, *, max_prompt_tokens: int):
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.engine, self.tokenizer, self.sampling = engine, tokenizer, sampling
        self.prompt_budget = PromptBudget(self.count_tokens, max_prompt_tokens)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(render_prompt(self.tokenizer, messages))

    def __call__(self, messages: list[dict]) -> PolicyOutput:
        prompt_ids = render_prompt(self.tokenizer, messages)
        if len(prompt_ids) > self.prompt_budget.max_prompt_tokens:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, over max_prompt_tokens="
                             f"{self.prompt_budget.max_prompt_tokens}; build it with this policy's "
                             "prompt_budget")
        gen = self.engine.generate([prompt_ids], self.sampling)[0]
        try:
            text = self.tokenizer.decode(list(gen.output_ids), skip_special_tokens=True)
        except TypeError:  # decoders without that keyword
            text = self.tokenizer.decode(list(gen.output_ids))
        return PolicyOutput(text=text, prompt_ids=tuple(prompt_ids),
                            output_ids=tuple(int(t) for t in gen.output_ids),
                            logprobs=tuple(float(x) for x in gen.logprobs),
                            weight_version=int(gen.weight_version))


def engine_policy(engine, tokenizer, sampling, *, max_prompt_tokens: int) -> EnginePolicy:
    """Adapt a RolloutEngine into a Policy whose prompts fit `max_prompt_tokens`."""
    return EnginePolicy(engine, tokenizer, sampling, max_prompt_tokens=max_prompt_tokens)


def scripted_policy(texts: Sequence[str]) -> Policy:
    """A policy that answers with `texts` in order (no model): for tests, benchmarks and demos."""
    texts = list(texts)
    if not texts:
        raise ValueError("scripted_policy needs at least one action text")
    it = iter(texts)

    def policy(messages: list[dict]) -> PolicyOutput:
        try:
            return PolicyOutput(text=next(it))
        except StopIteration:
            raise RuntimeError(f"scripted policy ran out after {len(texts)} actions") from None
    return policy
