"""Trace-time argument checks shared by the ace.rl functions.

Shapes are static under `jax.jit`, so these checks run once while tracing and a wrong shape fails
before XLA compiles, with a message naming the argument. Value checks (a negative duration, a clip
range below zero) only run on concrete Python numbers or arrays, never on tracers.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def as_float_array(x, name: str) -> jax.Array:
    """`x` as a JAX array of a floating dtype at least float32 (bf16/f16 are upcast, ints cast)."""
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}") from err
    if arr.dtype == jnp.bool_ or not jnp.issubdtype(arr.dtype, jnp.floating):
        return arr.astype(jnp.float32)
    return arr.astype(jnp.promote_types(arr.dtype, jnp.float32))


def check_rank(x: jax.Array, rank: int, name: str, dims: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have shape {dims} (rank {rank}), got shape {tuple(x.shape)}")


def check_shape(x: jax.Array, shape: Sequence[int], name: str, dims: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {dims} = {tuple(shape)}, got {tuple(x.shape)}")


def is_concrete(x) -> bool:
    """True when the values of `x` can be read now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_static_number(value, name: str, *, low: Optional[float] = None,
                        high: Optional[float] = None, low_inclusive: bool = True,
                        high_inclusive: bool = True) -> None:
    """Checks a hyperparameter's range when it is a plain number; traced values pass unchecked."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        if is_concrete(value) and np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
        return
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {high}, got {value!r}")


def check_static_int(value, name: str, *, low: int) -> int:
    """A Python int >= `low` (shapes depend on it, so it cannot be traced)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int (it fixes a shape), got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def broadcast_per_sequence(x: jax.Array, shape: Tuple[int, int], name: str) -> jax.Array:
    """A per-sequence [B] or per-token [B, T] array, broadcast to [B, T]."""
    batch, length = shape
    if x.shape == (batch,):
        return jnp.broadcast_to(x[:, None], shape)
    if x.shape == (batch, length):
        return x
    raise ValueError(f"{name} must have shape [B] = ({batch},) or [B, T] = ({batch}, {length}), "
                     f"got {tuple(x.shape)}")
