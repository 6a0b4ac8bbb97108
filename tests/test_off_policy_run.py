"""The main job with the off-policy machinery switched on: KL to the frozen initial policy, routing
replay on the tiny MoE, the `sync` ablation and the asynchronous default, each to completion."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ace.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
OFF_POLICY_KEYS = ("entropy", "kl", "tis_weight_mean", "tis_truncated_frac", "routing_disagreement", "clip_frac",
                   "ratio_mean")


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")  # the two runs share one stage-1 policy


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["sync", "full"])
def test_kl_and_routing_replay_run_to_completion_and_log_their_metrics(tmp_path, sft_cache, ablation):
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/run.py", "+exp=tiny_smoke", f"out_dir={out}", f"sft.cache_dir={sft_cache}",
           f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false", f"ablation={ablation}", "train.kl_coef=0.05",
           "train.routing_replay=true", "train.minibatches=2", "rollout.temperature=0.9", "eval.seeds=[0]"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in OFF_POLICY_KEYS:
            assert key in r, key
        assert r["entropy"] > 0
        assert 0.0 < r["tis_weight_mean"] <= 2.0 and 0.0 <= r["tis_truncated_frac"] <= 1.0
        assert 0.0 <= r["routing_disagreement"] <= 1.0
    # Step 1 trains the reference itself (KL 0 up to the second minibatch's move); the policy then leaves it.
    assert records[-1]["kl"] > 0.0
