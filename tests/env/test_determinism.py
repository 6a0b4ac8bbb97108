"""What the agent is shown does not depend on the machine's load or on the process: no durations in
the prompt, no workspace paths in the feedback, and scripts that start with fixed seeds."""
import dataclasses

import pytest

from ace.env.agent import AgentState, StepRecord
from ace.env.prompt import PromptConfig, build_messages, render_record
from ace.env.subprocess_sandbox import SubprocessSandbox
from ace.env.sandbox_guards import mask_workspace_path
from ace.env.suites import get_competition

UNSEEDED = """
import random, sys
print(random.random(), hash("abc"), list({"alpha", "beta", "gamma", "delta"}))
import numpy as np
print(np.random.rand())
import pandas as pd
print(pd.DataFrame({"a": range(20)}).sample(3).a.tolist())
from sklearn.ensemble import RandomForestClassifier
X = np.random.rand(30, 2)
print(RandomForestClassifier(n_estimators=3).fit(X, X[:, 0] > 0.5).predict_proba(X[:2])[:, 1].tolist())
"""


def _record(**kw):
    return StepRecord("execute_code", "print(1)\n", stdout_tail="1\n", **{"returncode": 0, **kw})


def test_a_record_renders_the_same_whatever_its_duration():
    cfg = PromptConfig()
    quick, slow = (render_record(0, _record(duration_s=d), cfg) for d in (0.3, 47.9))
    assert quick == slow and "Exit code 0." in quick and "0.3" not in quick
    timed_out = render_record(0, _record(duration_s=60.0, timed_out=True, returncode=-9), cfg)
    assert "Timed out." in timed_out and "60" not in timed_out


def test_the_prompt_shows_time_left_only_with_a_time_limit():
    comp = get_competition("iris-species")
    untimed = AgentState(comp_id=comp.comp_id, max_steps=3, step=1, history=(_record(duration_s=3.0),),
                         time_used_s=3.0)
    other_load = dataclasses.replace(untimed, history=(_record(duration_s=9.0),), time_used_s=9.0)
    text = lambda s: build_messages(s, comp, PromptConfig())[-1]["content"]  # noqa: E731
    assert text(untimed) == text(other_load) and "Time left" not in text(untimed)
    assert "Time left: 97s" in text(dataclasses.replace(untimed, time_limit_s=100.0))


def test_mask_workspace_path_writes_the_workspace_as_the_working_directory(tmp_path):
    root = tmp_path / "ws-a1b2"
    root.mkdir()
    text = f'File "{root}/script.py", line 1\nno submission file at {root}/submission/submission.csv; cwd {root}'
    assert mask_workspace_path(text, root) == ('File "./script.py", line 1\nno submission file at '
                                               './submission/submission.csv; cwd .')
    assert mask_workspace_path("", root) == ""


@pytest.mark.parametrize("isolation", ["auto", "fallback"])
def test_unseeded_scripts_print_the_same_in_two_sandboxes(isolation, tmp_path):
    (tmp_path / "train.csv").write_text("a\n1\n")
    outputs, roots = [], []
    for _ in range(2):
        with SubprocessSandbox(isolation=isolation) as sandbox:
            ws = sandbox.create_workspace(tmp_path)
            result = sandbox.run(ws, UNSEEDED, timeout_s=60)
            assert result.ok, result.stderr[-2000:]
            outputs.append(result.stdout)
            roots.append(ws.root)
    assert outputs[0] == outputs[1] and roots[0] != roots[1]


def test_forked_children_draw_the_same_in_every_run(tmp_path):
    code = ("import os, random\npid = os.fork()\nif pid == 0:\n    print(random.random(), flush=True)\n"
            "    os._exit(0)\nos.waitpid(pid, 0)\n")
    (tmp_path / "train.csv").write_text("a\n1\n")
    with SubprocessSandbox() as sandbox:
        ws = sandbox.create_workspace(tmp_path)
        first, second = (sandbox.run(ws, code, timeout_s=30).stdout for _ in range(2))
    assert first == second and first.strip()


def test_the_sandbox_environment_fixes_the_hash_seed(tmp_path):
    (tmp_path / "train.csv").write_text("a\n1\n")
    with SubprocessSandbox() as sandbox:
        ws = sandbox.create_workspace(tmp_path)
        result = sandbox.run(ws, "import os\nprint(os.environ.get('PYTHONHASHSEED'))\n", timeout_s=30)
    assert result.stdout.strip() == "0"
