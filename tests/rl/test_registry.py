"""Registries plug new estimators in by name; `import ace.rl` stays free of heavy frameworks."""
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import ace.rl as rl
from ace.rl.registry import ADVANTAGES, Registry


def test_registered_advantage_mode_is_used_by_group_advantages():
    name = "test_only_max_baseline"
    if name not in ADVANTAGES:
        @rl.register_advantage(name)
        def max_baseline(grouped, *, eps):
            return grouped - grouped.max(axis=-1, keepdims=True)
    rewards = np.array([[1.0, 3.0], [2.0, 2.0]], np.float32)
    out = rl.group_advantages(rewards, 2, mode=name)
    np.testing.assert_array_equal(out.advantages, [[-2.0, 0.0], [0.0, 0.0]])
    assert rl.get_advantage(name)(jnp.asarray(rewards), eps=0.0).shape == (2, 2)


def test_builtin_names_resolve_to_the_public_functions():
    assert rl.get_policy_loss("grpo") is rl.policy_loss
    assert set(rl.registry.ADVANTAGES.names()) >= {"grpo", "dr_grpo", "rloo"}
    assert rl.registry.AGGREGATIONS.names() == ("seq_mean_token_mean", "seq_mean_token_sum_norm",
                                                 "token_mean")
    assert rl.registry.KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert callable(rl.get_aggregation("token_mean")) and callable(rl.get_kl("k3"))


def test_ace_rl_exports_the_shared_registry_class():
    from ace.core.registry import Registry as CoreRegistry
    assert rl.Registry is Registry is CoreRegistry


def test_import_ace_rl_pulls_no_heavy_framework():
    code = ("import sys, ace.rl\n"
            "heavy = {'flax', 'optax', 'hydra', 'omegaconf', 'chex', 'torch', 'transformers'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "[]", out.stdout

