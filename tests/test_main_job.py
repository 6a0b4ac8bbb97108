"""The main job end to end: `experiments/run.py +exp=tiny_smoke` in a subprocess, from a cold SFT cache,
then the README's evaluation command on the folder it wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ace.eval import METRICS
from ace.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `+exp=tiny_smoke` run: (its out_dir, its stdout)."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/run.py", "+exp=tiny_smoke", f"out_dir={out}",
           f"sft.cache_dir={tmp_path / 'sft'}", f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


@pytest.mark.slow
def test_tiny_smoke_run_prints_the_table_and_writes_metrics_figure_and_checkpoint(smoke_run):
    out, text = smoke_run
    for label in ("valid submission rate", "any-medal rate", "mean HumanRank", "steps to first valid",
                  "steps to first valid, censored", "mean episode reward"):
        assert label in text, text
    assert "before RL" in text and "after RL" in text and "change" in text
    records = read_jsonl(out / "metrics.jsonl")
    steps = json.loads((out / "config.json").read_text())["train"]["steps"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for key in ("reward_mean", "reward_std", "valid_rate", "medal_rate", "table_size", "lp_mean", "depth_0",
                "learner_idle_fraction", "tokens_per_s", "step_time_s", "loss", "grad_norm",
                "sampled_depth_mean", "lp_sampled_max"):
        assert key in records[-1], key
    # Initial states are logged apart from deeper ones whenever a step drew them.
    assert any("reward_mean_depth0" in r and "valid_rate_depth0" in r for r in records)
    # Every held-out episode's transcript, before and after RL.
    for when in ("before-rl", "after-rl"):
        transcripts = list((out / "eval" / when / "transcripts").glob("seed-*/*.json"))
        assert transcripts and all(json.loads(t.read_text())["steps"] for t in transcripts)
    png = out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in text
    ckpts = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert str(steps) in ckpts
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"valid_rate", "any_medal_rate", "mean_reward"}


def _table(stdout: str) -> dict[str, str]:
    """Rows of the metrics table that `experiments/eval.py` prints: {metric: "mean ± se"}."""
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("metric")]
    assert header, stdout
    rows = [line.split(None, 1) for line in lines[header[-1] + 2:] if line.strip()]
    return {name: value.strip() for name, value in rows}


@pytest.mark.slow
def test_readme_eval_command_evaluates_the_run_folder_alone(smoke_run, tmp_path):
    out, _ = smoke_run
    for name in ("model_config.json", "prompt_config.json", "tokenizer/tokenizer.json", "config.json"):
        assert (out / name).is_file(), name
    # The README's command, word for word but for the folder (and Hydra's own output folder).
    cmd = [sys.executable, "experiments/eval.py", f"checkpoint={out}", "suite=held_out", "seeds=[0,1,2]",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    steps = json.loads((out / "config.json").read_text())["train"]["steps"]
    # The newest checkpoint, on the run's held-out cut (eval.competitions=1), with the seeds asked for.
    assert f"[eval] step {steps} of {out}: 1 held_out competitions x 3 seeds [0, 1, 2]" in proc.stdout, proc.stdout
    table = _table(proc.stdout)
    assert set(METRICS) | {"mean_reward"} <= set(table), table
    for name in ("valid_rate", "any_medal_rate", "mean_reward"):
        assert "±" in table[name], table
