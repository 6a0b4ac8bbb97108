"""Typed, validated view of the Hydra `curriculum.*` group (hydra_configs/curriculum/*.yaml)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ace.curriculum.potential import POTENTIALS
from ace.curriculum.sampler import SAMPLERS


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """`curriculum.*`: sampler and potential by registry name, and their numbers.

    uniform_mix is the eps of the eps-uniform mixture (`eps_uniform` in `sample`). block_index
    runs the learnability and uniform samplers, update_stats and insert through
    `ace.curriculum.block_index` (same results, a few thousand rows read per round instead of the
    whole table) when the potential is row-local; False keeps the full-table functions.
    """

    sampler: str
    potential: str
    temperature: float
    uniform_mix: float
    optimistic_value: float
    capacity: int
    max_depth: int
    block_index: bool = True

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"curriculum.sampler={self.sampler!r}; expected one of {list(SAMPLERS.names())}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"curriculum.potential={self.potential!r}; expected one of {list(POTENTIALS.names())}")
        for key in ("temperature", "uniform_mix", "optimistic_value"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"curriculum.{key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.temperature <= 0:
            raise ValueError(f"curriculum.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"curriculum.uniform_mix must be in [0, 1], got {self.uniform_mix}")
        if not isinstance(self.block_index, bool):
            raise ValueError(f"curriculum.block_index must be true or false, got {self.block_index!r}")
        for key, low in (("capacity", 1), ("max_depth", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"curriculum.{key} must be an int >= {low}, got {value!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "CurriculumConfig":
        """From the `curriculum` node of the composed Hydra config (any mapping)."""
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = sorted(names - optional - set(cfg))
        unknown = sorted(set(cfg) - names)
        if missing or unknown:
            raise ValueError(f"curriculum config: missing keys {missing}, unknown keys {unknown}")
        return cls(**{k: cfg[k] for k in names if k in cfg})

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `get_sampler(self.sampler)` (add `step`)."""
        return {"temperature": self.temperature, "eps_uniform": self.uniform_mix,
                "potential": self.potential, "optimistic_value": self.optimistic_value}
