"""MLEEnv on a tiny hand-made competition, with the real subprocess sandbox and grader."""

import numpy as np
import pandas as pd
import pytest

from ace.env.actions import Action, format_action
from ace.env.agent import AgentState
from ace.env.episode import PolicyOutput, engine_policy, run_episode, run_group, scripted_policy
from ace.env.gym import MLEEnv
from ace.env.prompt import PromptConfig, render_prompt
from ace.env.reward import RewardConfig, step_reward
from ace.env.sandbox import SandboxLimits
from ace.env.subprocess_sandbox import SubprocessSandbox
from ace.env.task import Competition
from ace.rollout.engine import Generation, SamplingParams

N_TRAIN, N_TEST = 300, 20
BOARD = (0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0)


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    root = tmp_path_factory.mktemp("comp")
    pub, priv = root / "public", root / "private"
    pub.mkdir(), priv.mkdir()
    rng = np.random.default_rng(0)
    x = rng.normal(size=N_TRAIN + N_TEST)
    y = 3 * x + rng.normal(scale=0.1, size=x.size)
    ids = np.arange(x.size)
    pd.DataFrame({"id": ids[:N_TRAIN], "x": x[:N_TRAIN], "y": y[:N_TRAIN]}).to_csv(pub / "train.csv", index=False)
    pd.DataFrame({"id": ids[N_TRAIN:], "x": x[N_TRAIN:]}).to_csv(pub / "test.csv", index=False)
    pd.DataFrame({"id": ids[N_TRAIN:], "y": 0.0}).to_csv(pub / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ids[N_TRAIN:], "y": y[N_TRAIN:]}).to_csv(priv / "answers.csv", index=False)
    return Competition(comp_id="toy-linear", description="Predict y from x. Metric: RMSE.",
                       public_dir=pub, private_dir=priv, metric="rmse", higher_is_better=False,
                       id_column="id", target_columns=("y",), leaderboard=BOARD, task_type="regression")


@pytest.fixture(scope="module")
def sandbox():
    with SubprocessSandbox(SandboxLimits(wall_time_s=30)) as sb:
        yield sb


def _env(comp, sandbox, **kw):
    kw = {**dict(reward_cfg=RewardConfig(), max_steps=6, exec_timeout_s=30, instrument=True), **kw}
    return MLEEnv(comp, sandbox, **kw)


# Stdlib-only scripts start fast; `slope` sets how good the predictions are.
def solution(slope, *, extra=""):
    return f'''
import csv
rows = list(csv.DictReader(open("data/test.csv")))
{extra}
with open("submission/submission.csv", "w") as f:
    f.write("id,y\\n")
    for r in rows:
        f.write(f"{{r['id']}},{{{slope} * float(r['x'])}}\\n")
'''


def _rmse_of(comp, slope):
    test = pd.read_csv(comp.public_dir / "test.csv")
    ans = pd.read_csv(comp.private_dir / "answers.csv")
    return float(np.sqrt(np.mean((slope * test["x"].to_numpy() - ans["y"].to_numpy()) ** 2)))


def test_execute_grades_rewards_and_tracks_the_best(comp, sandbox, tmp_path):
    with _env(comp, sandbox) as env:
        env.reset()
        assert not env.save_best_submission(tmp_path / "none.csv") and not (tmp_path / "none.csv").exists()
        first = env.step(format_action(Action("execute_code", solution(2.0))))
        assert first.outcome == "valid" and first.grade.valid
        assert first.grade.score == pytest.approx(_rmse_of(comp, 2.0))
        want, _ = step_reward("valid", cfg=env.reward_cfg, score=first.grade.score, best_before=None,
                              leaderboard=BOARD, higher_is_better=False, medal=first.grade.medal)
        assert first.reward == pytest.approx(want)
        assert env.state.best_score == first.grade.score and env.state.best_step == 0

        worse = env.step(format_action(Action("execute_code", solution(0.0))))
        assert worse.grade.score > first.grade.score and env.state.best_score == first.grade.score
        better = env.step(format_action(Action("execute_code", solution(3.0))))
        assert better.grade.score < first.grade.score and env.state.best_step == 2
        assert worse.reward < better.reward
        assert "score" in better.observation and "Submission: valid" in better.observation

        done = env.step("<submit/>")
        assert done.done and env.state.submitted and done.grade == better.grade
        assert env.final_grade() == better.grade
        # The best file (slope 3.0), not the last or the first one, is what gets saved.
        assert env.save_best_submission(tmp_path / "deep" / "best.csv")
        saved = pd.read_csv(tmp_path / "deep" / "best.csv")
        test = pd.read_csv(comp.public_dir / "test.csv")
        np.testing.assert_allclose(saved["y"].to_numpy(), 3.0 * test["x"].to_numpy())
        with pytest.raises(RuntimeError, match="over"):
            env.step("<submit/>")


def test_format_error_and_info_cost_a_step_but_run_nothing(comp, sandbox):
    with _env(comp, sandbox) as env:
        env.reset()
        bad = env.step("I think I should use a linear model.")
        assert bad.outcome == "format_error" and bad.reward == env.reward_cfg.format_error
        assert bad.exec is None and "no action found" in bad.observation
        info = env.step("<request_info>sample_submission</request_info>")
        assert info.outcome == "info" and "id,y" in info.observation
        metric = env.step("<request_info>metric</request_info>")
        assert "lower is better" in metric.observation and "best 0.5" in metric.observation
        assert env.state.step == 3 and [r.kind for r in env.state.history] == [
            "format_error", "request_info", "request_info"]


def test_failures_runtime_partial_credit_and_no_stale_submission(comp, sandbox):
    with _env(comp, sandbox) as env:
        env.reset()
        assert env.step(format_action(Action("execute_code", solution(3.0)))).outcome == "valid"
        # Fails after loading data: the earlier submission file must not be credited to it.
        crash = env.step(format_action(Action("execute_code", solution(
            3.0, extra="import pandas as pd\ndf = pd.read_csv('data/train.csv')\nraise SystemExit('boom')"))))
        assert crash.outcome == "runtime_error" and crash.grade is None
        assert crash.milestones >= {"imports", "data_loaded"}
        import_fail = env.step(format_action(Action("execute_code", "import not_a_module\n")))
        assert import_fail.outcome == "runtime_error" and import_fail.milestones == frozenset()
        assert crash.reward > import_fail.reward
        assert "ModuleNotFoundError" in import_fail.observation
        silent = env.step(format_action(Action("execute_code", "print('no file written')\n")))
        assert silent.outcome == "invalid" and silent.grade.reason == "missing_file"
        assert silent.reward == env.reward_cfg.invalid_submission
        assert "[ace-milestone]" not in silent.observation + crash.observation


def test_validate_runs_on_a_subsample_and_reports_no_score(comp, sandbox):
    probe = solution(3.0, extra=(
        "n = sum(1 for _ in open('data/train.csv')) - 1\n"
        "assert n == 50, n\n"
        "assert sum(1 for _ in open('data/test.csv')) - 1 == %d" % N_TEST))
    with _env(comp, sandbox, validate_rows=50) as env:
        env.reset()
        out = env.step(format_action(Action("validate_code", probe)))
        assert out.outcome == "validated", out.observation
        assert out.grade.valid and out.grade.score is None and out.grade.medal is None
        assert out.reward == env.reward_cfg.validated and env.state.best_score is None
        assert "not scored" in out.observation
        broken = env.step(format_action(Action("validate_code", solution(3.0).replace('"id,y', '"id,z'))))
        assert broken.outcome == "invalid" and broken.grade.reason == "wrong_columns"


def test_episode_resumes_from_a_stored_state_and_rebuilds_the_best(comp, sandbox, tmp_path):
    with _env(comp, sandbox) as env:
        env.reset()
        env.step(format_action(Action("execute_code", solution(2.5))))
        stored = env.state.to_json()
    with _env(comp, sandbox) as env:
        state = AgentState.from_json(stored)
        ep = run_episode(env, scripted_policy(["<submit/>"]), state=state)
        assert len(ep.steps) == 1 and ep.steps[0].state_before == state
        assert ep.final_grade.valid and ep.final_grade.score == pytest.approx(_rmse_of(comp, 2.5))
        assert ep.final_state.step == 2 and ep.final_state.submitted
        assert env.save_best_submission(tmp_path / "best.csv")  # the rebuilt file
        assert len(pd.read_csv(tmp_path / "best.csv")) == N_TEST
        with pytest.raises(ValueError, match="'other'"):
            env.reset(AgentState("other", max_steps=3))


def test_run_group_runs_g_episodes_from_the_same_state_until_max_steps(comp, sandbox):
    start = AgentState("toy-linear", max_steps=2)
    texts = ["<request_info>data</request_info>", format_action(Action("execute_code", solution(3.0)))]
    with _env(comp, sandbox) as env:
        eps = run_group(env, scripted_policy(texts * 2), group_size=2, state=start)
    assert len(eps) == 2
    for ep in eps:
        assert [s.outcome for s in ep.steps] == ["info", "valid"]
        assert ep.steps[0].state_before == start and ep.final_state.done and not ep.final_state.submitted
        assert ep.steps_to_first_valid == 2 and ep.final_grade.valid
        assert ep.total_reward == pytest.approx(sum(s.reward for s in ep.steps))
    assert eps[0].steps[1].grade == eps[1].steps[1].grade


class _FakeEngine:
    """A RolloutEngine that always answers with fixed token ids and records what it was sent."""

    def __init__(self, answer_ids):
        self.answer_ids, self.prompts = answer_ids, []

    @property
    def weight_version(self):
        return 7

    def generate(self, prompts, params):
        self.prompts.extend(list(p) for p in prompts)
        return [Generation(output_ids=list(self.answer_ids), logprobs=[-0.5] * len(self.answer_ids),
                           finish_reason="stop", weight_version=7) for _ in prompts]

    def update_weights(self, params, version):
        raise NotImplementedError


class _CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_engine_policy_trims_prompts_to_its_budget_and_carries_logprobs(comp, sandbox):
    tok = _CharTokenizer()
    info = tok.encode("<request_info>description</request_info>")
    engine = _FakeEngine(info)
    with _env(comp, sandbox, max_steps=4, prompt_cfg=PromptConfig(head_rows=2)) as env:
        full = len(render_prompt(tok, env.reset()))
        budget = full + 170  # room for about two of the three records of the last turn
        policy = engine_policy(engine, tok, SamplingParams(max_new_tokens=64), max_prompt_tokens=budget)
        ep = run_episode(env, policy)
    assert len(ep.steps) == 4 and all(s.outcome == "info" for s in ep.steps)
    assert all(len(p) <= budget for p in engine.prompts)
    last = tok.decode(engine.prompts[-1])
    assert "earlier step(s) omitted" in last and "Step 3: request_info" in last
    assert "Step 1: request_info" not in last
    for s, p in zip(ep.steps, engine.prompts):
        assert list(s.prompt_ids) == p and list(s.output_ids) == info
        assert s.logprobs == (-0.5,) * len(info) and s.weight_version == 7
    with pytest.raises(ValueError, match="max_prompt_tokens=5"):
        engine_policy(engine, tok, SamplingParams(), max_prompt_tokens=5)([{"role": "user", "content": "x" * 50}])
    with pytest.raises(ValueError, match="logprobs"):
        PolicyOutput("x", output_ids=(1, 2), logprobs=(0.0,))


def test_constructor_rejects_bad_settings(comp, sandbox):
    for kw, needle in [(dict(max_steps=0), "max_steps"), (dict(exec_timeout_s=0), "exec_timeout_s"),
                       (dict(validate_rows=0), "validate_rows")]:
        base = dict(reward_cfg=RewardConfig(), max_steps=3, exec_timeout_s=5, instrument=False)
        with pytest.raises(ValueError, match=needle):
            MLEEnv(comp, sandbox, **{**base, **kw})
