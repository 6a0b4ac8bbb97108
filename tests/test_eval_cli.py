"""`experiments/eval.py`: restore a trainer checkpoint and evaluate it with fixed seeds."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ace.curriculum import init_table
from ace.curriculum.store import TaskStore
from ace.env.agent import AgentState
from ace.env.prompt import PromptConfig, build_messages
from ace.env.suites import load_suite
from ace.eval import METRICS
from ace.models.checkpoint import Checkpointer
from ace.models.configs import TINY
from ace.models.qwen3 import init_params
from ace.models.tokenizer import train_tiny_tokenizer
from ace.train.learner import LearnerConfig, init_learner

REPO = Path(__file__).resolve().parents[1]
# Small enough for a CPU test: one held-out competition, one action of a few tokens per episode.
PROMPT = {"head_rows": 0, "max_columns": 5, "description_chars": 600}
FAST = ["eval.competitions=1", "env.max_steps=1", "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=1024",
        "train.exec_workers=1", *[f"+env.prompt.{k}={v}" for k, v in PROMPT.items()]]


def _load_eval_module():
    if "ace_eval_cli" in sys.modules:
        return sys.modules["ace_eval_cli"]
    spec = importlib.util.spec_from_file_location("ace_eval_cli", REPO / "experiments" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ace_eval_cli"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _write_run(run_dir: Path, seed: int, step: int = 3):
    """A tiny random-weights run dir in the trainer's layout: checkpoints/<step> (learner, table, key;
    metadata step/version/store), model_config.json and tokenizer/."""
    # Trained on the held-out prompts so that a prompt fits a small budget, as the SFT tokenizer does.
    texts = [m["content"] for comp in load_suite("held_out")
             for m in build_messages(AgentState(comp_id=comp.comp_id, max_steps=1), comp, PromptConfig(**PROMPT))]
    tokenizer = train_tiny_tokenizer(texts * 2, vocab_size=1024)
    vocab = -(-tokenizer.vocab_size // 64) * 64
    model_config = TINY.replace(vocab_size=vocab, num_layers=1)
    params = init_params(model_config, jax.random.key(seed))
    lcfg = LearnerConfig(lr=1e-3, total_steps=10)
    state = {"learner": init_learner(params, lcfg, jax.random.key(1)), "table": init_table(8),
             "key": jax.random.key(2)}
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        ckpt.save(step, state, metadata={"step": step, "version": step, "store": TaskStore().state_dict()})
    tokenizer.save(run_dir / "tokenizer")
    (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_config)))
    return params, model_config


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    module = _load_eval_module()  # registers the eval_cli config
    with initialize_config_dir(config_dir=str(REPO / "hydra_configs"), version_base="1.3"):
        cfg = compose(config_name="eval_cli", overrides=overrides)
    from omegaconf import OmegaConf
    return module, OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    params, model_config = _write_run(root, seed=0)
    return root, params, model_config


def test_load_policy_restores_the_saved_params_from_any_checkpoint_path(run_dir):
    root, params, model_config = run_dir
    module = _load_eval_module()
    for path in (root, root / "checkpoints", root / "checkpoints" / "3"):
        policy = module.load_policy(path)
        assert policy.step == 3 and policy.model_config == model_config and policy.run_dir == root
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), policy.params, params)
    with pytest.raises(FileNotFoundError, match="holds no orbax checkpoint"):
        module.load_policy(root / "tokenizer")


def test_eval_is_deterministic_in_the_seeds_and_metrics_match_the_episodes(run_dir, capsys):
    root, _, _ = run_dir
    module, cfg = _compose([f"checkpoint={root}", "suite=held_out", "seeds=[0,1]", *FAST])
    first = module.evaluate_checkpoint(cfg)
    second = module.evaluate_checkpoint(cfg)
    tokens = lambda res: [[s.output_ids for s in ep.steps] for eps in res["episodes"].values() for ep in eps]  # noqa
    assert tokens(first) == tokens(second)
    assert sorted(first["episodes"]) == [0, 1]
    # Brute force: per-seed means, then mean and standard error over the two seeds.
    per_seed = [np.mean([ep.total_reward for ep in eps]) for eps in first["episodes"].values()]
    assert first["metrics"]["mean_reward"].mean == pytest.approx(np.mean(per_seed))
    assert first["metrics"]["mean_reward"].se == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2))
    valid = [np.mean([ep.final_grade is not None and bool(ep.final_grade.valid) for ep in eps])
             for eps in first["episodes"].values()]
    assert first["metrics"]["valid_rate"].mean == pytest.approx(np.mean(valid))
    out = capsys.readouterr().out
    for name in METRICS + ("mean_reward",):
        assert name in out
    # MLE-bench's grading report per seed, one competition report per episode, counts that match.
    assert sorted(first["reports"]) == [0, 1] and first["out_dir"] == root / "eval" / "held_out-step3"
    for seed, eps in first["episodes"].items():
        path = first["reports"][seed]
        assert path.parent == first["out_dir"] / f"seed-{seed}" and path.name.endswith("_grading_report.json")
        report = json.loads(path.read_text())
        assert list(report) == ["total_runs", "total_runs_with_submissions", "total_valid_submissions",
                                "total_medals", "total_gold_medals", "total_silver_medals", "total_bronze_medals",
                                "total_above_median", "competition_reports"]
        valid = [ep.final_grade is not None and bool(ep.final_grade.valid) for ep in eps]
        assert report["total_runs"] == len(eps) and report["total_valid_submissions"] == sum(valid)
        assert report["total_runs_with_submissions"] >= sum(valid)
        for comp_report, ep, ok in zip(report["competition_reports"], eps, valid):
            assert comp_report["competition_id"] == ep.comp_id and comp_report["valid_submission"] == ok
            assert len(comp_report) == 16 and comp_report["gold_threshold"] is not None
            if ok:
                assert comp_report["submission_path"].endswith(f"submissions/seed-{seed}/{ep.comp_id}.csv")
            else:  # no valid submission, nothing saved: no path, as for a missing file
                assert comp_report["submission_path"] is None and not comp_report["submission_exists"]
    metrics = json.loads((first["out_dir"] / "metrics.json").read_text())
    assert metrics["valid_rate"]["mean"] == pytest.approx(first["metrics"]["valid_rate"].mean)
    assert metrics["valid_rate"]["n"] == 2
    lite_rows = [ln.split()[0] for ln in (first["out_dir"] / "lite_table.txt").read_text().splitlines()[2:]]
    assert lite_rows == ["valid_rate", "any_medal_rate", "above_median_rate", "human_rank", "steps_to_first_valid",
                         "steps_to_first_valid_censored"]
    # A transcript per episode: the steps as the environment recorded them.
    for seed, eps in first["episodes"].items():
        for ep in eps:
            transcript = json.loads((first["out_dir"] / "transcripts" / f"seed-{seed}" / f"{ep.comp_id}.json").read_text())
            assert [s["outcome"] for s in transcript["steps"]] == [s.outcome for s in ep.steps]
            assert [s["observation"] for s in transcript["steps"]] == [s.observation for s in ep.steps]
            assert transcript["final_valid"] == bool(ep.final_grade is not None and ep.final_grade.valid)


def test_eval_cli_subprocess_prints_the_metrics_table(run_dir):
    root, _, _ = run_dir
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "experiments/eval.py", f"checkpoint={root}", "suite=held_out",
                           "seeds=[0]", *FAST, "hydra.run.dir=/tmp/ace_eval_cli_hydra", "hydra.output_subdir=null"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("metric")]
    assert header, proc.stdout
    rows = {ln.split()[0] for ln in lines[header[0] + 2:] if ln.strip()}
    assert set(METRICS) | {"mean_reward"} <= rows


def test_eval_cli_rejects_a_missing_checkpoint_and_a_bad_suite(tmp_path, run_dir):
    module, cfg = _compose([f"checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        module.evaluate_checkpoint(cfg)
    module, cfg = _compose([f"checkpoint={run_dir[0]}", "suite=validation"])
    with pytest.raises(ValueError, match="suite='validation', expected one of"):
        module.evaluate_checkpoint(cfg)


def test_lite_suite_needs_mlebench_and_lists_the_unprepared_competitions(tmp_path, run_dir, capsys):
    module, cfg = _compose([f"checkpoint={run_dir[0]}", "suite=lite"])
    with pytest.raises(ValueError, match="suite=lite .* needs env.kind=mlebench.*env=mlebench env.data_dir="):
        module.evaluate_checkpoint(cfg)
    module, cfg = _compose([f"checkpoint={run_dir[0]}", "suite=lite", "env=mlebench"])
    with pytest.raises(ValueError, match="suite=lite needs env.data_dir"):
        module.evaluate_checkpoint(cfg)
    from ace.env.mlebench import MLEBENCH_LITE
    from tests.support.mlebench_data import THREE_LITE, write_mlebench_folder

    data = write_mlebench_folder(tmp_path / "mlebench", n=12)
    module, cfg = _compose([f"checkpoint={run_dir[0]}", "suite=lite", "env=mlebench", f"env.data_dir={data}",
                            "env.sandbox=subprocess", "env.exec_timeout_s=30", "seeds=[0]", *FAST,
                            "rollout.max_prompt_tokens=2000"])
    capsys.readouterr()
    result = module.evaluate_checkpoint(cfg)
    out = capsys.readouterr().out
    assert f"{len(MLEBENCH_LITE) - 3} of {len(MLEBENCH_LITE)} competitions are not prepared" in out
    assert "aerial-cactus-identification" in out and "spooky-author-identification" not in out.split("\n")[0]
    # All three prepared Lite competitions are evaluated (no eval.competitions cut), with the Lite table.
    assert sorted(ep.comp_id for ep in result["episodes"][0]) == sorted(THREE_LITE)
    assert [ln.split()[0] for ln in result["table"].splitlines()[2:]] == [
        "valid_rate", "any_medal_rate", "above_median_rate", "human_rank", "steps_to_first_valid",
        "steps_to_first_valid_censored"]
    assert "MLE-bench-Lite evaluation, 3 competitions" in out and "mean_reward" not in result["table"]
    report = json.loads(result["reports"][0].read_text())
    assert result["reports"][0].parent == run_dir[0] / "eval" / "lite-step3" / "seed-0"
    assert report["total_runs"] == 3 and sorted(r["competition_id"] for r in report["competition_reports"]) == \
        sorted(THREE_LITE)
