"""ace.core.registry: the one registry style of ace.rl and ace.curriculum."""
import pytest

from ace.core.registry import Registry
from ace.curriculum.potential import POTENTIALS
from ace.curriculum.sampler import SAMPLERS
from ace.rl.registry import ADVANTAGES, KL_ESTIMATORS


def test_registry_rejects_duplicates_and_unknown_names():
    registry = Registry("widget")
    registry.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(lambda: 2)
    with pytest.raises(ValueError, match="unknown widget 'b'; valid names: a"):
        registry.get("b")
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("")
    assert "a" in registry and registry.names() == ("a",)


def test_rl_and_curriculum_variants_live_in_the_same_kind_of_registry():
    for registry in (ADVANTAGES, KL_ESTIMATORS, POTENTIALS, SAMPLERS):
        assert isinstance(registry, Registry)
    assert POTENTIALS.names() == ("reward_std", "success_variance")
    assert SAMPLERS.names() == ("learnability", "uniform")
    # A config key selects from the curriculum's registries: an unknown name says which key.
    with pytest.raises(ValueError, match="unknown curriculum.sampler 'greedy'; valid names: learnability, uniform"):
        SAMPLERS.get("greedy")
