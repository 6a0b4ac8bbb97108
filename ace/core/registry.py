"""Name -> function registries, so that a variant plugs in by the name a config string holds.

In the manner of Tunix `rl/algo_core.py`: a decorator registers a function under a name, a getter
returns it, and an unknown name fails listing the names that exist. `ace.rl` keeps its advantage
modes, losses, aggregations and KL estimators in them, `ace.curriculum` its potentials and
samplers. Registries hold plain Python functions and are filled at import time; nothing here
touches arrays.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A named table of functions of one kind (advantage estimators, potentials, ...).

    `kind` names the kind in messages; for a registry a config key selects from, it is that key
    (`Registry("curriculum.sampler")`), so an error names what the user wrote.
    """

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
        """The registered names, sorted."""
        return tuple(sorted(self._fns))

    def __contains__(self, name: str) -> bool:
        return name in self._fns
