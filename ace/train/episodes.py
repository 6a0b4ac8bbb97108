"""Episodes in lockstep: many environments advance one turn at a time with one batched generation.

The embedded sampler pads every `generate` call to its `max_batch` rows, so one prompt per call
costs as much as a full batch; here the prompts of every live episode go out in one call, and the
resulting actions run in the sandbox side by side on a small thread pool. Randomness is explicit:
request (episode i, turn t) samples with seed `seeds[i] * 1000 + t`, so the same seeds, states and
weights give the same tokens whatever else runs (the engine's contract for seeded requests).

Nothing else that varies between runs reaches the next prompt: the sandbox runs of one turn may
finish in any order, but their outcomes are attached to their episodes by index, never by arrival;
the prompt shows no wall-clock durations (`ace.env.prompt.render_record`) nor workspace paths
(`ace.env.gym.MLEEnv`); and the sandbox starts every script with fixed seeds (`ace.env.subprocess_sandbox`).
So one checkpoint evaluated twice with the same seeds gives the same episodes, token for token,
on a quiet machine or a busy one (`tests/test_eval_determinism.py`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Sequence

from ace.env.actions import parse_action
from ace.env.agent import AgentState
from ace.env.episode import Episode, Step
from ace.env.prompt import render_prompt
from ace.rollout.engine import SamplingParams

_TURN_SEED_STRIDE = 1000  # turns per episode never reach this, so (seed, turn) pairs never collide


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of `ids` without special tokens (the stop token is part of the sampled ids)."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:  # decoders without that keyword
        return tokenizer.decode(list(ids))


def run_lockstep(envs: Sequence[Any], states: Sequence[AgentState | None], engine: Any, tokenizer: Any, *,
                 sampling: SamplingParams, seeds: Sequence[int], max_prompt_tokens: int,
                 max_actions: int | None, exec_workers: int = 2, grade_final: bool = True) -> list[Episode]:
    """Runs one episode per environment until each is done or took `max_actions` actions.

    Args:
      envs: E environments (`ace.env.gym.MLEEnv` or anything with its reset / messages / step /
        state / final_grade / best_grade / comp interface), each used by one episode.
      states: E start states (None = the competition's initial state).
      engine: a RolloutEngine (generate(prompts, params) -> Generations with logprobs).
      tokenizer: renders chat messages to ids (`render_prompt`) and decodes outputs.
      sampling: the sampling settings; its seed is replaced per request (see the module docstring).
      seeds: E ints, one per episode.
      max_prompt_tokens: prompts are trimmed to this budget (oldest history first).
      max_actions: stop each episode after this many actions (1 = step-wise RL); None = until done.
      exec_workers: threads that run the actions (sandbox executions) of one turn.
      grade_final: give each finished episode its final grade, which may re-run the best script of
        an episode started from a stored state; False keeps only the grades seen during the episode.

    Returns:
      E `Episode`s in the order of `envs`; each step carries its prompt ids, output ids, behaviour
      logprobs and the engine's weight version.
    """
    n = len(envs)
    if len(states) != n or len(seeds) != n:
        raise ValueError(f"run_lockstep: got {n} envs, {len(states)} states and {len(seeds)} seeds; "
                         "expected one state and one seed per env")
    if max_actions is not None and max_actions < 1:
        raise ValueError(f"max_actions must be >= 1 or None, got {max_actions}")
    if exec_workers < 1:
        raise ValueError(f"exec_workers must be >= 1, got {exec_workers}")
    for env, state in zip(envs, states):
        env.reset(state)

    def count_tokens(messages):
        return len(render_prompt(tokenizer, messages))

    steps: list[list[Step]] = [[] for _ in range(n)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=exec_workers) as pool:
        turn = 0
        while True:
            live = [i for i in range(n) if not envs[i].state.done
                    and (max_actions is None or len(steps[i]) < max_actions)]
            if not live:
                break
            befores = {i: envs[i].state for i in live}
            prompts = {}
            for i in live:
                messages = envs[i].messages(count_tokens=count_tokens, max_prompt_tokens=max_prompt_tokens)
                prompts[i] = render_prompt(tokenizer, messages)
            requests = [dataclasses.replace(sampling, seed=int(seeds[i]) * _TURN_SEED_STRIDE + turn) for i in live]
            t0 = time.perf_counter()
            gens = engine.generate([prompts[i] for i in live], requests)
            generation_s = (time.perf_counter() - t0) / len(live)
            texts = {i: decode(tokenizer, g.output_ids) for i, g in zip(live, gens)}
            # map() yields in the order of `live`, whichever run finishes first.
            results = dict(zip(live, pool.map(lambda i: envs[i].step(texts[i]), live)))
            for i, gen in zip(live, gens):
                res = results[i]
                steps[i].append(Step(
                    state_before=befores[i], prompt_ids=tuple(prompts[i]),
                    output_ids=tuple(int(t) for t in gen.output_ids),
                    logprobs=tuple(float(x) for x in gen.logprobs), weight_version=int(gen.weight_version),
                    action=parse_action(texts[i]), observation=res.observation, reward=res.reward,
                    duration_s=res.duration_s, generation_s=generation_s, grade=res.grade,
                    state_after=res.state_after, outcome=res.outcome, routing=gen.routing))
            turn += 1
    episodes = []
    for i, env in enumerate(envs):
        final = env.final_grade() if env.state.done and grade_final else env.best_grade
        episodes.append(Episode(comp_id=env.comp.comp_id, steps=tuple(steps[i]), final_grade=final))
    return episodes
