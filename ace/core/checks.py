"""Argument checks for pure array functions: one message style, naming the argument and what was expected.

Shapes are static under `jax.jit`, so shape checks run once while tracing and a wrong shape fails
before XLA compiles. Value checks (a range, an index, a finite number) need the values: they run
when the arguments are concrete (an eager call, the way the trainer calls the public functions)
and are skipped on tracers, where the caller's documented in-graph behaviour applies instead.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*xs) -> bool:
    """True when every value (every leaf of every pytree in `xs`) can be read now: none is a tracer
    inside jit / vmap / grad."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def check_scalar(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Checks a hyperparameter: a finite real scalar in [low, high] (or the open ends asked for).

    A traced value passes unchecked (its value cannot be read); a concrete one, a Python number or
    a 0-d array, is checked. Raises ValueError naming `name`, the bound and the value, or TypeError
    for a bool or a non-number.
    """
    if not is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = arr.item()
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {v!r}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {v!r}")


def check_static_int(value, name: str, *, low: int) -> int:
    """A Python (or numpy) int >= `low`, returned as int. Shapes depend on it, so it cannot be traced."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int (it fixes a shape), got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_rank(x: jax.Array, rank: int, name: str, dims: str) -> None:
    """`x` has `rank` dimensions; `dims` names them for the message, e.g. "[B, T]"."""
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {dims} (rank {rank}), got shape {tuple(x.shape)}")


def check_shape(x: jax.Array, shape: Sequence[int], name: str, dims: str) -> None:
    """`x` has exactly `shape`; `dims` names it for the message, e.g. "[B, T]"."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {dims} = {tuple(shape)}, got {tuple(x.shape)}")


def as_float_array(x, name: str) -> jax.Array:
    """`x` as a JAX array of a floating dtype at least float32 (bf16/f16 are upcast, ints and bools
    cast), so that sums and exponentials keep float32 precision."""
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}") from err
    if arr.dtype == jnp.bool_ or not jnp.issubdtype(arr.dtype, jnp.floating):
        return arr.astype(jnp.float32)
    return arr.astype(jnp.promote_types(arr.dtype, jnp.float32))


def check_indices(idx, size: int, name: str, *, allow_padding: bool = False) -> None:
    """Integer indices lie in [0, size), or equal -1 where `allow_padding` (a padded slot).

    Checked when `idx` is concrete; raises IndexError naming the first bad position and its value.
    """
    if not is_concrete(idx):
        return
    arr = np.asarray(idx)
    low = -1 if allow_padding else 0
    bad = (arr < low) | (arr >= size)
    if bad.any():
        pos = int(np.flatnonzero(bad.ravel())[0])
        raise IndexError(f"{name}[{pos}] = {int(arr.ravel()[pos])} is out of range [{low}, {size})")
