"""The SFT corpus of stage 1: (state -> action) pairs from real, graded runs of compact reference scripts.

For each training competition the reference population (`ace.env.reference_solutions`) is rewritten as
compact scripts (`ace.train.sft_scripts`: same model, preprocessing, feature choice and predictions, short
enough for the tiny policy's generation budget); a diverse subset is run in the sandbox through
`MLEEnv`, graded, and turned into `initial`, `improve` and `submit` examples. `ace.train.sft` trains on them.
Their prompts come from `ace.env.prompt.build_messages`, the renderer of RL and evaluation, over states
that `MLEEnv` recorded, so SFT, RL and evaluation prompts have one layout and none shows a duration.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

from ace.env.actions import Action, format_action
from ace.env.agent import AgentState
from ace.env.gym import MLEEnv
from ace.env.prompt import PromptConfig, build_messages, data_summary
from ace.env.reference_solutions import mismatched_scripts, reference_scripts
from ace.env.reward import RewardConfig
from ace.train.sft_scripts import CandidateScript, compact_script, select_diverse


EXAMPLE_KINDS = ("initial", "improve", "submit")


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One (state -> action) pair.

    messages: the chat prompt of the state (`build_messages`); action: the target text
    (`format_action` of the action); kind: an EXAMPLE_KINDS entry; score: the graded score of the
    action's script, or for `submit` the state's best score; None when there is none.
    """

    messages: list[dict]
    action: str
    comp_id: str
    kind: str
    score: float | None

    def __post_init__(self):
        if self.kind not in EXAMPLE_KINDS:
            raise ValueError(f"SFTExample.kind must be one of {EXAMPLE_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class _Run:
    script: CandidateScript
    state_after: AgentState
    outcome: str          # ace.env.reward OUTCOMES entry: "valid", "invalid", "runtime_error", ...
    score: float | None
    good: bool = False    # valid and strictly better than the leaderboard median
    imitable: bool = True  # False for the wrong-kind run: a state to recover from, never a target


def _run_competition(comp, sandbox, scripts: Sequence[CandidateScript], *, max_steps: int,
                     exec_timeout_s: float, prompt_cfg: PromptConfig) -> list[_Run]:
    runs = []
    with MLEEnv(comp, sandbox, reward_cfg=RewardConfig(), max_steps=max_steps, exec_timeout_s=exec_timeout_s,
                instrument=False, prompt_cfg=prompt_cfg) as env:
        for script in scripts:
            env.reset()
            result = env.step(format_action(Action("execute_code", script.code)))
            valid = result.outcome == "valid"
            runs.append(_Run(script, result.state_after, result.outcome,
                             float(result.grade.score) if valid else None,
                             bool(valid and result.grade.above_median)))
    return runs


def _examples_for(comp, runs: Sequence[_Run], *, max_steps: int, prompt_cfg: PromptConfig, improve_per_comp: int,
                  rng: random.Random) -> list[SFTExample]:
    def better(a, b):
        return a > b if comp.higher_is_better else a < b

    def msgs(state):
        return build_messages(state, comp, prompt_cfg, summary=summary)

    def example(state, action, kind, score):
        return SFTExample(msgs(state), action, comp.comp_id, kind, score)

    summary = data_summary(comp.public_dir, prompt_cfg)
    valid = sorted((r for r in runs if r.score is not None and r.imitable), key=lambda r: r.score,
                   reverse=comp.higher_is_better)
    good = [r for r in valid if r.good] or valid[:1]
    if not good:
        return []  # nothing ran validly: no action worth imitating
    fresh = AgentState.initial(comp.comp_id, max_steps=max_steps)
    out = [example(fresh, format_action(Action("execute_code", r.script.code)), "initial", r.score) for r in good]
    if max_steps < 2:
        return out
    # One submit per depth: a submit costs a whole prompt of compute for a three-token action.
    out.append(example(good[0].state_after, format_action(Action("submit")), "submit", good[0].score))
    two_step_submits = 0
    improves = 0
    for weak in runs:
        targets = [g for g in good if g is not weak and (weak.score is None or better(g.score, weak.score))]
        if not targets or improves == improve_per_comp:
            continue
        improves += 1
        target = rng.choice(targets)
        out.append(example(weak.state_after, format_action(Action("execute_code", target.script.code)),
                           "improve", target.score))
        if max_steps >= 3 and not two_step_submits:
            two_step_submits += 1
            # The two-step state is what MLEEnv would reach by running `weak` then `target`.
            s = weak.state_after
            two = dataclasses.replace(s, step=2, history=s.history + target.state_after.history,
                                      best_score=target.score, best_code=target.script.code, best_step=1,
                                      time_used_s=s.time_used_s + target.state_after.time_used_s)
            out.append(example(two, format_action(Action("submit")), "submit", target.score))
    return out


def build_sft_corpus(comps: Sequence[Any], sandbox, *, scripts_per_comp: int, seed: int,
                     prompt_cfg: PromptConfig, max_steps: int, improve_per_comp: int,
                     exec_timeout_s: float = 60.0, workers: int = 2,
                     wrong_kind_first: bool = False, infer_task: bool = False) -> list[SFTExample]:
    """Run a diverse set of compact reference scripts per competition for real and build the pairs.

    Args:
      comps: training competitions (`ace.env.task.Competition`).
      sandbox: runs the scripts (owned by the caller); grading happens outside it, in `MLEEnv`.
      scripts_per_comp: scripts run per competition.
      seed: picks the diverse subset and the improve targets.
      prompt_cfg: prompt limits of every state (use the same in RL).
      max_steps: episode length written into the states ("Steps left").
      improve_per_comp: most improve pairs per competition (they have the longest prompts).
      exec_timeout_s: limit of one script run.
      workers: competitions run concurrently (threads; the sandbox runs subprocesses).
      wrong_kind_first: run one script of the wrong kind first (a classifier on a regression task or
        the reverse); its failure is the state of the first `improve` example, a recovery from the
        error a policy makes when it confuses the task on an unseen competition. Off by default:
        one main-job run each way did not separate it from noise (see the README).
      infer_task: scripts that read the task type and output rule from the competition's files
        (`compact_script`); the wrong-kind script keeps its kind written in, so that it fails.
    Returns:
      examples of kinds "initial", "improve" and "submit", grouped by competition in `comps` order.
    """
    if not comps:
        raise ValueError("build_sft_corpus needs at least one competition")
    if scripts_per_comp < 1 or max_steps < 1 or workers < 1:
        raise ValueError(f"scripts_per_comp={scripts_per_comp}, max_steps={max_steps}, workers={workers}: "
                         "expected all >= 1")

    seeds = [seed * 1_000_003 + zlib.crc32(c.comp_id.encode()) for c in comps]
    # Scripts are rendered here, not in the workers: CPython 3.11's ast.parse is not thread-safe.
    wrong = int(wrong_kind_first)
    chosen = [(select_diverse([compact_script(s, c) for s in mismatched_scripts(c)], 1, seed=s) if wrong else [])
              + select_diverse([compact_script(s, c, infer_task=infer_task) for s in reference_scripts(c)],
                               scripts_per_comp, seed=s)
              for c, s in zip(comps, seeds)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(lambda c, scripts: _run_competition(
            c, sandbox, scripts, max_steps=max_steps, exec_timeout_s=exec_timeout_s, prompt_cfg=prompt_cfg),
            comps, chosen))
    if wrong:  # the wrong-kind run is a state to recover from, never an action to imitate
        runs = [[dataclasses.replace(r[0], imitable=False), *r[1:]] for r in runs]
    return [ex for c, r, s in zip(comps, runs, seeds)
            for ex in _examples_for(c, r, max_steps=max_steps, prompt_cfg=prompt_cfg,
                                    improve_per_comp=improve_per_comp, rng=random.Random(s))]


def _write_jsonl(path: Path, examples: Sequence[SFTExample]) -> None:
    path.write_text("".join(json.dumps(dataclasses.asdict(e), sort_keys=True) + "\n" for e in examples))


def _read_jsonl(path: Path) -> list[SFTExample]:
    return [SFTExample(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place; a concurrent identical build may win."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build_corpus(cache_dir: str | Path, comps: Sequence[Any], sandbox, **kwargs) -> list[SFTExample]:
    """`build_sft_corpus(comps, sandbox, **kwargs)` cached as `<cache_dir>/corpus.jsonl`.

    The caller chooses `cache_dir` from a hash of everything the corpus depends on; a present file
    is trusted and read back without running anything.
    """
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / "corpus.jsonl"
    if path.is_file():
        return _read_jsonl(path)
    examples = build_sft_corpus(comps, sandbox, **kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".corpus.{time.time_ns()}.jsonl"
    _write_jsonl(tmp, examples)
    tmp.replace(path)
    return examples


def corpus_stats(examples: Sequence[SFTExample]) -> dict[str, Any]:
    """Counts by kind and competition, and how many distinct scripts the actions hold."""
    kinds = {k: sum(e.kind == k for e in examples) for k in EXAMPLE_KINDS}
    comps = sorted({e.comp_id for e in examples})
    scripts = {e.action for e in examples if e.kind != "submit"}
    return {"examples": len(examples), **{f"examples_{k}": n for k, n in kinds.items()},
            "competitions": len(comps), "distinct_scripts": len(scripts)}
