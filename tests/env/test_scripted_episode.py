"""A scripted agent (fixed actions, no model) runs a full episode on every built-in competition.

Real suite, real subprocess sandbox, real grader. Each episode asks for the data summary,
executes a fast reference solution, and submits; on the first competition of each task type it
also validates the script on the train subsample first (a sandbox run costs about a second of
scikit-learn imports, so validating everywhere would double the test's time).
"""
import functools

import pytest

from ace.env.actions import Action, format_action
from ace.env.grading import grade_submission
from ace.env.episode import run_episode, scripted_policy
from ace.env.gym import MLEEnv
from ace.env.reference_solutions import reference_scripts, run_in_process
from ace.env.reward import RewardConfig
from ace.env.sandbox import SandboxLimits
from ace.env.subprocess_sandbox import SubprocessSandbox
from ace.env.suites import competition_ids, get_competition

# Linear models: the fastest members of both reference populations.
FAST = ("logreg_C1.0", "ridge_a1.0")


@functools.lru_cache(maxsize=None)
def _first_of_each_task_type():
    seen = {}
    for comp_id in competition_ids("all"):
        seen.setdefault(get_competition(comp_id).task_type, comp_id)
    return set(seen.values())


def fast_reference(comp):
    return next(s for s in reference_scripts(comp) if s.name in FAST)


@pytest.fixture(scope="module")
def sandbox():
    with SubprocessSandbox(SandboxLimits(wall_time_s=120)) as sb:
        yield sb


@pytest.mark.parametrize("comp_id", competition_ids("all"))
def test_scripted_agent_produces_a_valid_submission(comp_id, sandbox, tmp_path):
    comp = get_competition(comp_id)
    script = fast_reference(comp)
    validate = comp_id in _first_of_each_task_type()
    actions = (["<request_info>data</request_info>"]
               + [format_action(Action("validate_code", script.code))] * validate
               + [format_action(Action("execute_code", script.code)), "<submit/>"])
    with MLEEnv(comp, sandbox, reward_cfg=RewardConfig(), max_steps=6, exec_timeout_s=120,
                instrument=True) as env:
        ep = run_episode(env, scripted_policy(actions))
    outcomes = [s.outcome for s in ep.steps]
    expected = ["info"] + ["validated"] * validate + ["valid", "submit"]
    assert outcomes == expected, [s.observation for s in ep.steps]
    assert ep.final_state.submitted and ep.steps_to_first_valid == 2 + validate
    assert ep.final_grade.valid and ep.final_grade.score is not None
    # Independent reference: the same script run in this process, graded directly.
    reference = run_in_process(script, comp.public_dir)
    (tmp_path / "submission.csv").write_text(reference.to_csv(index=False))
    direct = grade_submission(comp, tmp_path / "submission.csv")
    assert ep.final_grade.score == pytest.approx(direct.score, rel=1e-6, abs=1e-9)
    assert ep.final_grade.medal == direct.medal
    executed = ep.steps[1 + validate]
    assert "Submission: valid, score" in executed.observation
    assert ep.steps[0].reward < executed.reward
