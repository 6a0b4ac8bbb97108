"""Pure GRPO math: group advantages, duration weights, the clipped policy loss, KL estimators.

Imports jax and numpy only, no I/O and no state, so it can be reused in any JAX project. Every
mode string is looked up in a registry (`ace.rl.registry`); a new estimator plugs in by name:

    @register_advantage("my_mode")
    def my_mode(grouped, *, eps): ...          # [N, G] -> [N, G]
    group_advantages(rewards, 8, mode="my_mode")
"""
from ace.rl.advantages import GroupAdvantages, duration_weights, group_advantages
from ace.rl.aggregation import aggregate_loss
from ace.rl.kl import kl_penalty
from ace.rl.losses import policy_loss
from ace.rl.registry import (Registry, get_advantage, get_aggregation, get_kl, get_policy_loss,
                             register_advantage, register_aggregation, register_kl,
                             register_policy_loss)

__all__ = [
    "GroupAdvantages",
    "Registry",
    "aggregate_loss",
    "duration_weights",
    "get_advantage",
    "get_aggregation",
    "get_kl",
    "get_policy_loss",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl",
    "register_policy_loss",
]
