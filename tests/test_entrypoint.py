"""The Hydra entry point composes every config group and rejects unknown keys."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "hydra_configs")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_tiny_cpu_experiment():
    cfg = _compose([])
    assert cfg.model.name == "tiny"
    assert cfg.rollout.kind == "jax_sampler"
    assert cfg.env.kind == "builtin"


def test_ace30b_composes_with_overrides():
    cfg = _compose(["+exp=ace30b", "curriculum.temperature=0.5"])
    assert cfg.model.name == "qwen3-30b-a3b"
    assert cfg.rollout.kind == "sglang"
    assert cfg.env.kind == "mlebench"
    assert cfg.curriculum.temperature == 0.5


@pytest.mark.parametrize(
    "override",
    ["ablation=no_buffer", "ablation=uniform_sampling", "ablation=sync", "curriculum=uniform",
     "+exp=tiny_smoke", "rollout=sglang", "env=mlebench", "model=qwen3_30b_a3b"],
)
def test_every_group_option_composes(override):
    _compose([override])


def test_uniform_sampling_ablation_switches_the_sampler():
    assert _compose(["ablation=uniform_sampling"]).curriculum.sampler == "uniform"


def test_unknown_key_fails_with_hydra_error():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        _compose(["train.no_such_key=1"])


def test_cli_rejects_unknown_key():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "experiments/run.py", "curriculum.bogus=1"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr
