"""CurriculumConfig: the Hydra files load; bad values fail at start-up naming the key."""
from pathlib import Path

import pytest
import yaml

from ace.curriculum import CurriculumConfig, get_potential, get_sampler

CONFIGS = Path(__file__).resolve().parents[2] / "hydra_configs" / "curriculum"


@pytest.mark.parametrize("name", ["learnability", "uniform"])
def test_shipped_curriculum_configs_validate_and_resolve_registries(name):
    cfg = CurriculumConfig.from_mapping(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    assert get_sampler(cfg.sampler) is not None and get_potential(cfg.potential) is not None
    assert cfg.sampler_kwargs()["eps_uniform"] == cfg.uniform_mix


@pytest.mark.parametrize("key, value, message", [
    ("temperature", 0.0, "curriculum.temperature must be > 0"),
    ("uniform_mix", 1.5, r"curriculum.uniform_mix must be in \[0, 1\]"),
    ("sampler", "greedy", "curriculum.sampler='greedy'"),
    ("potential", "entropy", "curriculum.potential='entropy'"),
    ("capacity", 0, "curriculum.capacity must be an int >= 1"),
    ("block_index", "yes", "curriculum.block_index must be true or false, got 'yes'"),
])
def test_bad_values_name_the_key(key, value, message):
    cfg = yaml.safe_load((CONFIGS / "learnability.yaml").read_text()) | {key: value}
    with pytest.raises(ValueError, match=message):
        CurriculumConfig.from_mapping(cfg)
    with pytest.raises(ValueError, match=r"missing keys \['capacity'\]"):
        CurriculumConfig.from_mapping({k: v for k, v in cfg.items() if k != "capacity"})


def test_block_index_defaults_on_when_a_config_leaves_it_out():
    cfg = yaml.safe_load((CONFIGS / "learnability.yaml").read_text())
    assert CurriculumConfig.from_mapping(cfg).block_index is True
    cfg.pop("block_index")
    assert CurriculumConfig.from_mapping(cfg).block_index is True
    assert CurriculumConfig.from_mapping(cfg | {"block_index": False}).block_index is False
