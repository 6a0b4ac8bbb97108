"""The ace.rl registries: advantage modes, policy losses, loss aggregations, KL estimators, duration
normalisations. A new estimator plugs in by name from a config string (`ace.core.registry`):

    @register_advantage("my_mode")
    def my_mode(grouped, *, eps): ...
"""
from __future__ import annotations

from typing import Callable

from ace.core.registry import Registry

ADVANTAGES = Registry("advantage mode")
POLICY_LOSSES = Registry("policy loss")
AGGREGATIONS = Registry("loss aggregation")
KL_ESTIMATORS = Registry("KL estimator")
DURATION_NORMALIZERS = Registry("duration normalisation")


def register_advantage(name: str):
    """Decorator: registers `fn(grouped_rewards [N, G], *, eps) -> [N, G]` as advantage mode `name`."""
    return ADVANTAGES.register(name)


def get_advantage(name: str) -> Callable:
    return ADVANTAGES.get(name)


def register_policy_loss(name: str):
    """Decorator: registers a function with the signature of `ace.rl.policy_loss` under `name`."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    return POLICY_LOSSES.get(name)


def register_aggregation(name: str):
    """Decorator: registers `fn(per_token [B, T], mask [B, T], norm_len) -> scalar` under `name`."""
    return AGGREGATIONS.register(name)


def get_aggregation(name: str) -> Callable:
    return AGGREGATIONS.get(name)


def register_kl(name: str):
    """Decorator: registers a per-token `fn(logp, ref_logp) -> kl` (same shapes) under `name`."""
    return KL_ESTIMATORS.register(name)


def get_kl(name: str) -> Callable:
    return KL_ESTIMATORS.get(name)
