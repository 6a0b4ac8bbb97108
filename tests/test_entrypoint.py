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


@pytest.mark.parametrize("overrides, children, sync, sampler", [
    ([], True, False, "learnability"),
    (["ablation=full"], True, False, "learnability"),
    (["ablation=no_buffer"], False, False, "learnability"),
    (["ablation=sync"], True, True, "learnability"),
    (["ablation=uniform_sampling"], True, False, "uniform"),
])
def test_ablations_become_trainer_switches(overrides, children, sync, sampler):
    from omegaconf import OmegaConf

    from ace.curriculum import CurriculumConfig
    from ace.train.trainer import TrainerConfig

    cfg = OmegaConf.to_container(_compose(overrides), resolve=False)
    tcfg = TrainerConfig.from_cfg(cfg)
    assert (tcfg.children, tcfg.sync) == (children, sync)
    assert CurriculumConfig.from_mapping(cfg["curriculum"]).sampler == sampler


def test_switches_reach_the_trainer_config():
    from omegaconf import OmegaConf

    from ace.train.trainer import TrainerConfig

    cfg = OmegaConf.to_container(_compose(["train.duration_weighting=true", "train.stepwise=false",
                                           "env.instrument=false", "+exp=tiny_smoke"]), resolve=False)
    tcfg = TrainerConfig.from_cfg(cfg)
    assert tcfg.duration_weighting and not tcfg.stepwise and not tcfg.instrument
    assert (tcfg.steps, tcfg.group_size, tcfg.max_steps) == (2, 4, 2)


def test_env_reward_overrides_reach_the_reward_config():
    from omegaconf import OmegaConf

    from ace.train.experiment import reward_config

    cfg = OmegaConf.to_container(_compose(["env.reward.submit_without_valid=-0.9"]), resolve=False)
    assert reward_config(cfg).submit_without_valid == -0.9
    cfg["env"]["reward"] = {"no_such_constant": 1.0}
    with pytest.raises(ValueError, match="no_such_constant"):
        reward_config(cfg)
