"""The lowest layer: argument checks and name registries shared by `ace.rl` and `ace.curriculum`.

Needs jax and numpy only and imports nothing else from ace, so every package may import it
(docs/architecture.md, "Packages and what each owns").
"""
from ace.core.checks import (as_float_array, check_indices, check_rank, check_scalar, check_shape, check_static_int,
                             is_concrete)
from ace.core.registry import Registry

__all__ = ["Registry", "as_float_array", "check_indices", "check_rank", "check_scalar", "check_shape",
           "check_static_int", "is_concrete"]
