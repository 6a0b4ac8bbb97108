"""The main job end to end: `experiments/run.py +exp=tiny_smoke` in a subprocess, from a cold SFT cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ace.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_smoke_run_prints_the_table_and_writes_metrics_figure_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/run.py", "+exp=tiny_smoke", f"out_dir={out}",
           f"sft.cache_dir={tmp_path / 'sft'}", f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = proc.stdout
    for label in ("valid submission rate", "any-medal rate", "mean HumanRank", "steps to first valid",
                  "mean episode reward"):
        assert label in text, text
    assert "before RL" in text and "after RL" in text and "change" in text
    records = read_jsonl(out / "metrics.jsonl")
    steps = json.loads((out / "config.json").read_text())["train"]["steps"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for key in ("reward_mean", "reward_std", "valid_rate", "medal_rate", "table_size", "lp_mean", "depth_0",
                "learner_idle_fraction", "tokens_per_s", "step_time_s", "loss", "grad_norm"):
        assert key in records[-1], key
    png = out / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in text
    ckpts = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert str(steps) in ckpts
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) >= {"valid_rate", "any_medal_rate", "mean_reward"}
