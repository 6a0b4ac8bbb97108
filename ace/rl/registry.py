"""Name → function registries, so a new estimator plugs in by name from a config string.

In the manner of Tunix `rl/algo_core.py`: a decorator registers a function under a name, a getter
returns it, and an unknown name fails with the list of names that exist. The registries hold plain
Python functions and are filled at import time; nothing here touches arrays.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A named table of functions of one kind (advantage estimators, policy losses, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Returns a decorator that registers its function under `name`; a taken name raises."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            if name in self._fns:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (to {self._fns[name].__name__}); "
                    "pick another name")
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        """The function registered as `name`; an unknown name raises listing the valid names."""
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def names(self) -> Tuple[str, ...]:
        return tuple(sorted(self._fns))

    def __contains__(self, name: str) -> bool:
        return name in self._fns


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
