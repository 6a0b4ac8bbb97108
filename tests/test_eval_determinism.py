"""Held-out evaluation repeats exactly: same params and seeds give the same episodes, token for token.

Two evaluations of one set of params (`evaluate_policy`, as `experiments/eval.py` and the main job run
it) with episodes of three steps and two sandbox runs in flight. The second evaluation runs on a
fresh sandbox (other random workspace paths), reports wall-clock durations 100 s and more off the
real ones, and finishes the runs of a turn in another order; its prompts must not notice.

The policy is the random-init tiny model, whose samples are near-uniform tokens that never form an
action. So that the episodes run code, each sampled output picks one of ACTIONS (by the sum of its
token ids): the choice still depends on every prompt token through the model, and the scripts
hit what used to leak into prompts (tracebacks and grader messages quoting the workspace path,
unseeded `random` / numpy / scikit-learn / pandas, str hash order) and the wall time of each run.
"""
import dataclasses
import threading
import time

import jax
import numpy as np
import pandas as pd
import pytest

from ace.env.agent import AgentState
from ace.env.prompt import build_messages
from ace.env.subprocess_sandbox import SubprocessSandbox
from ace.env.suites import load_suite
from ace.models.configs import TINY
from ace.models.qwen3 import init_params
from ace.models.tokenizer import train_tiny_tokenizer
from ace.train.experiment import evaluate_policy, make_engine
from ace.train.sft import COMPACT_PROMPT

SEEDS = [0, 1]
CFG = {"seed": 0, "rollout": {"kind": "jax_sampler", "max_new_tokens": 4, "max_prompt_tokens": 1024,
                              "top_p": 1.0, "top_k": 0},
       "env": {"max_steps": 3, "exec_timeout_s": 30, "instrument": True, "reward": {}, "prompt": {}},
       "eval": {"temperature": 1.0}, "train": {"exec_workers": 2}}


def _code(kind: str, body: str) -> str:
    return f"<{kind}>\n```python\n{body.strip()}\n```\n</{kind}>"


ACTIONS = (
    # A syntax error: its traceback quotes the script's path.
    _code("execute_code", "x = (\nprint(x)"),
    # Unseeded generators and set order on stdout; no submission, so the grader names the missing file.
    _code("execute_code", """
import random
import numpy as np
print(random.random(), np.random.rand(), list({"alpha", "beta", "gamma", "delta"}))
"""),
    # A valid submission, with an unseeded forest and pandas sample on stdout.
    _code("execute_code", """
import os
import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor
sub = pd.read_csv("data/sample_submission.csv")
X = np.random.rand(40, 3)
forest = RandomForestRegressor(n_estimators=3).fit(X, X[:, 0])
print(forest.predict(X[:2]), sub.sample(2).index.tolist())
os.makedirs("submission", exist_ok=True)
sub.to_csv("submission/submission.csv", index=False)
"""),
    "<request_info>metric</request_info>",
    "Let me think about the data first.",
)


class ActionsFromSamples:
    """A RolloutEngine: the wrapped sampler samples, and the sum of its tokens picks an ACTIONS entry.

    `sampled` records (prompt ids, sampled ids) of every request, in request order.
    """

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.sampled = []

    @property
    def weight_version(self):
        return self.engine.weight_version

    def update_weights(self, params, version):
        self.engine.update_weights(params, version)

    def generate(self, prompts, params):
        out = []
        for prompt, gen in zip(prompts, self.engine.generate(prompts, params)):
            self.sampled.append((tuple(prompt), tuple(int(t) for t in gen.output_ids)))
            ids = self.tokenizer.encode(ACTIONS[sum(gen.output_ids) % len(ACTIONS)])
            out.append(dataclasses.replace(gen, output_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop",
                                           routing=None))
        return out


class ObservedSandbox:
    """Forwards to a real sandbox; counts runs in flight, and (perturb=True) reports other durations
    and holds every other run back so that the runs of a turn finish in another order."""

    def __init__(self, sandbox, *, perturb: bool):
        self.sandbox, self.perturb = sandbox, perturb
        self.lock, self.in_flight, self.max_in_flight, self.calls = threading.Lock(), 0, 0, 0

    def create_workspace(self, public_dir):
        return self.sandbox.create_workspace(public_dir)

    def destroy_workspace(self, workspace):
        self.sandbox.destroy_workspace(workspace)

    def run(self, workspace, code, *, timeout_s=None):
        with self.lock:
            self.calls += 1
            call = self.calls
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.perturb and call % 2:
                time.sleep(0.4)  # the first run of a turn now tends to finish last
            result = self.sandbox.run(workspace, code, timeout_s=timeout_s)
        finally:
            with self.lock:
                self.in_flight -= 1
        if self.perturb:
            result = dataclasses.replace(result, duration_s=result.duration_s + 100.0 * call)
        return result


@pytest.fixture(scope="module")
def policy():
    comps = load_suite("held_out")[:2]
    texts = [m["content"] for comp in comps
             for m in build_messages(AgentState(comp_id=comp.comp_id, max_steps=3), comp, COMPACT_PROMPT)]
    tokenizer = train_tiny_tokenizer((texts + list(ACTIONS)) * 2, vocab_size=1024)
    model_config = TINY.replace(vocab_size=-(-tokenizer.vocab_size // 64) * 64, num_layers=1)
    return init_params(model_config, jax.random.key(0)), model_config, tokenizer, comps


def _evaluate(policy, *, perturb: bool, submissions_dir=None):
    params, model_config, tokenizer, comps = policy
    # A fresh sampler and sandbox each time, as two processes would have.
    engine = ActionsFromSamples(make_engine(params, model_config, CFG, max_batch=len(comps) * len(SEEDS)), tokenizer)
    with SubprocessSandbox() as real:
        sandbox = ObservedSandbox(real, perturb=perturb)
        result = evaluate_policy(params, model_config, tokenizer, comps, sandbox, seeds=SEEDS, cfg=CFG, engine=engine,
                                 submissions_dir=submissions_dir)
    return result, engine, sandbox


def _transcripts(result):
    return [[(s.prompt_ids, s.output_ids, s.logprobs, s.observation, s.reward, s.outcome) for s in ep.steps]
            for seed in SEEDS for ep in result.episodes[seed]]


def test_two_evaluations_with_the_same_seeds_give_the_same_transcripts_and_metrics(policy, tmp_path):
    stale = [tmp_path / "subs" / f"seed-{seed}" / f"{c.comp_id}.csv" for seed in SEEDS for c in policy[3]]
    for path in stale:  # files of an earlier evaluation: replaced, or removed where no episode made one
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stale\n")
    first, engine1, sandbox1 = _evaluate(policy, perturb=False, submissions_dir=tmp_path / "subs")
    second, engine2, sandbox2 = _evaluate(policy, perturb=True)
    episodes = [ep for seed in SEEDS for ep in first.episodes[seed]]
    assert len(episodes) == 4 and all(len(ep.steps) == CFG["env"]["max_steps"] for ep in episodes)
    # The episodes ran code, with two runs in flight, and the perturbation reached the second run's states.
    outcomes = {s.outcome for ep in episodes for s in ep.steps}
    assert {"runtime_error", "invalid", "valid"} <= outcomes, outcomes
    assert sandbox1.max_in_flight == sandbox2.max_in_flight == 2
    records = [r for seed in SEEDS for ep in second.episodes[seed] for r in ep.final_state.history
               if r.kind == "execute_code"]
    assert records and all(r.duration_s > 100 for r in records)

    assert engine1.sampled == engine2.sampled
    assert _transcripts(first) == _transcripts(second)
    np.testing.assert_equal({k: dataclasses.astuple(v) for k, v in first.metrics.items()},
                            {k: dataclasses.astuple(v) for k, v in second.metrics.items()})
    # Paths reach the prompt as the script sees them, relative to its working directory.
    prompts = [engine1.tokenizer.decode(s.prompt_ids) for ep in episodes for s in ep.steps]
    assert any('File "./script.py"' in p for p in prompts)
    assert any("no submission file at ./submission/submission.csv" in p for p in prompts)
    # The best submission of each episode was saved before the envs closed; MLE-bench reports take them.
    from ace.env.reports import competition_report

    comps = {c.comp_id: c for c in policy[3]}
    assert second.submission_paths == {} and len(first.submission_paths) == 4
    for seed in SEEDS:
        for ep in first.episodes[seed]:
            path = first.submission_paths[(seed, ep.comp_id)]
            valid = ep.final_grade is not None and ep.final_grade.valid
            assert (path == tmp_path / "subs" / f"seed-{seed}" / f"{ep.comp_id}.csv") if valid else path is None
            if valid:
                pd.testing.assert_frame_equal(pd.read_csv(path),
                                              pd.read_csv(comps[ep.comp_id].public_dir / "sample_submission.csv"))
                report = competition_report(comps[ep.comp_id], ep.final_grade, path)
                assert report["valid_submission"] and report["score"] == ep.final_grade.score
    assert any(p is not None for p in first.submission_paths.values())
    assert [p.is_file() for p in stale] == [p is not None for p in first.submission_paths.values()]
