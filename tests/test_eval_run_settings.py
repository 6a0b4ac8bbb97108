"""`experiments/eval.py` takes the run's own evaluation settings from its config.json, unless the
command line names them; competitions come from `load_competitions` for any env.kind."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_cli():
    if "ace_eval_cli" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ace_eval_cli", REPO / "experiments" / "eval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["ace_eval_cli"] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
    return sys.modules["ace_eval_cli"]


COMMAND = {"seed": 0, "suite": "held_out", "seeds": None,
           "env": {"kind": "builtin", "suite_seed": 0, "max_steps": 4, "prompt": {"head_rows": 3},
                   "reward": {"submit_without_valid": -0.8}},
           "eval": {"seeds": [0, 1, 2, 3], "temperature": 1.0, "competitions": None},
           "train": {"competitions": None, "exec_workers": 2},
           "rollout": {"kind": "jax_sampler", "max_new_tokens": 96, "max_prompt_tokens": 512, "top_p": 1.0, "top_k": 0}}
RUN = {"seed": 3,
       "env": {"kind": "builtin", "suite_seed": 0, "max_steps": 2, "prompt": {}, "reward": {}},
       "eval": {"seeds": [0], "temperature": 1.0, "competitions": 1},
       "train": {"competitions": 2, "exec_workers": 4},
       "rollout": {"kind": "sglang", "max_new_tokens": 64, "max_prompt_tokens": 768, "top_p": 0.9, "top_k": 0}}


def test_unnamed_settings_come_from_the_run(eval_cli):
    merged, taken = eval_cli.with_run_settings(COMMAND, RUN, eval_cli.override_keys(["checkpoint=/x", "seeds=[5]"]))
    assert merged["env"] == RUN["env"] and merged["eval"] == RUN["eval"] and merged["seed"] == 3
    assert merged["train"] == {"competitions": 2, "exec_workers": 2}
    # The sampling limits come from the run; the engine stays this command's (the embedded sampler).
    assert merged["rollout"] == {**RUN["rollout"], "kind": "jax_sampler"}
    assert merged["seeds"] is None and "env" in taken and "rollout.kind" not in taken


def test_named_settings_and_their_parts_stay_the_commands(eval_cli):
    overrides = ["env.max_steps=5", "+env.prompt.head_rows=3", "eval.competitions=null", "rollout.max_prompt_tokens=512"]
    command = {**COMMAND, "env": {**COMMAND["env"], "max_steps": 5}}  # as Hydra composes it with the overrides
    merged, taken = eval_cli.with_run_settings(command, RUN, eval_cli.override_keys(overrides))
    assert merged["env"] == {**RUN["env"], "max_steps": 5, "prompt": {"head_rows": 3}}
    assert merged["eval"] == {**RUN["eval"], "competitions": None}
    assert merged["rollout"]["max_prompt_tokens"] == 512 and merged["rollout"]["max_new_tokens"] == 64
    assert "rollout.max_prompt_tokens" not in taken
    # A whole group named on the command line (env=mlebench) is the command's.
    merged, _ = eval_cli.with_run_settings(COMMAND, RUN, eval_cli.override_keys(["env=mlebench"]))
    assert merged["env"] == COMMAND["env"]


def test_suites_come_from_load_competitions_with_the_runs_cuts(eval_cli):
    cfg = {**COMMAND, "train": {"competitions": 2}, "eval": {"competitions": 1}}
    train, held_out = eval_cli.suite_competitions(cfg, "train"), eval_cli.suite_competitions(cfg, "held_out")
    assert len(train) == 2 and len(held_out) == 1
    assert [c.comp_id for c in eval_cli.suite_competitions(cfg, "all")] == [c.comp_id for c in train + held_out]
    with pytest.raises(ValueError, match="env.kind=mlebench needs env.data_dir"):
        eval_cli.suite_competitions({**cfg, "env": {"kind": "mlebench", "data_dir": None}}, "held_out")
