"""Argument checks shared by the curriculum functions.

Shapes are static under `jax.jit`, so shape checks run while tracing and fail before XLA compiles.
Value checks (NaN rewards, indices out of range) need the values: they run when the arguments are
concrete (an eager call, the way the trainer calls the public functions) and are skipped on
tracers, where the documented in-graph fallback applies instead.
"""
from __future__ import annotations

import numbers

import jax
import numpy as np


def is_concrete(*xs) -> bool:
    """True when every value can be read now (none is a tracer inside jit / vmap / grad)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def check_scalar(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True) -> None:
    """Checks a hyperparameter's range when it can be read; traced values pass unchecked."""
    if not is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    v = np.asarray(value)
    if not isinstance(value, numbers.Real) and not np.issubdtype(v.dtype, np.number):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {v!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v!r}")


def check_indices(idx, capacity: int, name: str, *, allow_padding: bool = False) -> None:
    """Checks that integer indices lie in [0, capacity) (or equal -1 when padding is allowed)."""
    if not is_concrete(idx):
        return
    arr = np.asarray(idx)
    low = -1 if allow_padding else 0
    bad = (arr < low) | (arr >= capacity)
    if bad.any():
        pos = int(np.flatnonzero(bad.ravel())[0])
        allowed = f"[-1, {capacity})" if allow_padding else f"[0, {capacity})"
        raise IndexError(f"{name}[{pos}] = {int(arr.ravel()[pos])} is out of range {allowed} "
                         f"for a table of capacity {capacity}")
