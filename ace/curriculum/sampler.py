"""Task samplers: which rows of the table the next rollouts start from.

Every sampler has the signature
  `fn(key, table, n, *, temperature, eps_uniform, potential, optimistic_value, step) -> [n] int32`
and is registered in `SAMPLERS` under its config name (`curriculum.sampler`; a new one plugs in
with `register_sampler`). Samplers draw without replacement with the Gumbel-top-k trick, so the
returned order is the order of successive draws.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ace.core.checks import check_scalar, is_concrete
from ace.core.registry import Registry
from ace.curriculum.potential import DEFAULT_OPTIMISTIC_VALUE, get_potential, learnability
from ace.curriculum.table import TaskTable, check_table
from ace.curriculum.topk import top_k

Sampler = Callable[..., jax.Array]
# Config key `curriculum.sampler` -> sampler; `register_sampler` adds one.
SAMPLERS = Registry("curriculum.sampler")


def register_sampler(name: str):
    """Decorator: registers a function with the signature of `sample` as sampler `name`."""
    return SAMPLERS.register(name)


def get_sampler(name: str) -> Sampler:
    """The sampler registered under `name` (config key `curriculum.sampler`); an unknown name
    raises listing the registered ones."""
    return SAMPLERS.get(name)


def sampling_probs(table: TaskTable, *, temperature, eps_uniform, potential: str,
                   optimistic_value=DEFAULT_OPTIMISTIC_VALUE, step=None) -> jax.Array:
    """Single-draw probabilities q = (1 - eps) softmax(LP / temperature) + eps / N_valid.

    The softmax over LP / temperature concentrates draws on the frontier as temperature -> 0; the
    eps-uniform mixture keeps every task's probability >= eps / N_valid, so no task starves
    (docs/architecture.md, "Learnability Potential").

    Args:
      table: TaskTable of capacity C.
      temperature: tau > 0.
      eps_uniform: mixing weight of the uniform distribution, in [0, 1].
      potential: a registered potential (`ace.curriculum.potential.POTENTIALS`).
      optimistic_value: LP of never-tried tasks.
      step: current trainer step, passed to the potential.

    Returns:
      [C] float32, summing to 1 over valid rows and 0 on empty rows (all 0 if the table is empty).
    """
    check_scalar(temperature, "temperature", low=0.0, low_inclusive=False)
    check_scalar(eps_uniform, "eps_uniform", low=0.0, high=1.0)
    lp = learnability(table, potential=potential, optimistic_value=optimistic_value, step=step)
    valid = table.valid
    # A float32 count is exact below 2**24 rows and saves materialising valid as int32 for the sum.
    n_valid = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    logits = jnp.where(valid, lp / temperature, -jnp.inf)
    # Subtracting the max keeps exp finite for small temperatures; an empty table stays all-zero
    # (m = float32 min, so exp(-inf - m) = 0). Reducing `logits` itself, not a re-masked copy,
    # spares a [C] temporary: logits on valid rows are finite, so the max is theirs.
    m = jnp.max(logits)
    m = jnp.where(m == -jnp.inf, jnp.finfo(jnp.float32).min, m)
    w = jnp.exp(logits - m)
    soft = w / jnp.maximum(w.sum(), jnp.finfo(jnp.float32).tiny)
    q = (1.0 - eps_uniform) * soft + eps_uniform * valid / n_valid
    return jnp.where(valid, q, 0.0).astype(jnp.float32)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniforms(key: jax.Array, size: int) -> jax.Array:
    """[size] float32 uniforms in the open interval (0, 1), one per row, from `key`.

    A keyed counter hash (two MurmurHash3 finaliser rounds over the row index, seeded with 64 bits
    drawn from `key` by jax.random) instead of `jax.random.uniform`: threefry over a 1M-row table
    costs several ms on a CPU and dominated the sampling round, the hash costs ~0.2 ms. The top 24
    bits become the mantissa, centred in their cell so that 0 and 1 never occur.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    x = jnp.arange(size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed[0]  # Weyl sequence
    x = _fmix32(_fmix32(x) ^ seed[1])
    return ((x >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -24)


def _top_n_without_replacement(key: jax.Array, weights: jax.Array, n: int) -> jax.Array:
    """Draws n rows without replacement, P(next = i) proportional to weights[i] among the rest.

    top-n of w_i / E_i with E_i ~ Exp(1) i.i.d. is the Gumbel-top-k trick written with one log
    (argmax log w_i + Gumbel_i == argmax w_i / E_i); its order is that of successive draws
    (Vieira 2014, "Gumbel-max trick and weighted reservoir sampling"; Kool et al. 2019). Rows of
    weight 0 are never drawn: their positions in the output are -1.
    """
    e = -jnp.log(row_uniforms(key, weights.shape[0]))
    # Same values as where(w > 0, w / e, -1), written so the division is the last op: XLA then
    # stores the score once for both passes of `top_k` instead of storing w / e and a masked copy.
    score = jnp.where(weights > 0, weights, -e) / e
    vals, idx = top_k(score, n)
    return jnp.where(vals >= 0, idx, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "potential"))
def _sample_learnability(key, table, n, temperature, eps_uniform, potential, optimistic_value, step):
    q = sampling_probs(table, temperature=temperature, eps_uniform=eps_uniform, potential=potential,
                       optimistic_value=optimistic_value, step=step)
    return _top_n_without_replacement(key, q, n)


@functools.partial(jax.jit, static_argnames=("n",))
def _sample_uniform(key, table, n):
    return _top_n_without_replacement(key, table.valid.astype(jnp.float32), n)


def _check_sample_args(key, table: TaskTable, n) -> None:
    capacity = check_table(table)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int (number of tasks to draw), got {n!r}")
    if n > capacity:
        raise ValueError(f"cannot draw n={n} tasks without replacement from a table of capacity {capacity}")
    key_dtype = getattr(key, "dtype", None)
    if key_dtype is None or not (jax.dtypes.issubdtype(key_dtype, jax.dtypes.prng_key)
                                 or (key_dtype == jnp.uint32 and key.shape[-1:] == (2,))):
        raise TypeError(f"key must be a jax.random key, got {type(key).__name__} with dtype {key_dtype}")
    if is_concrete(table.valid):
        n_valid = int(np.asarray(table.valid).sum())
        if n > n_valid:
            raise ValueError(f"cannot draw n={n} tasks without replacement: the table holds only "
                             f"{n_valid} valid rows")


@register_sampler("learnability")
def sample(key: jax.Array, table: TaskTable, n: int, *, temperature, eps_uniform, potential: str,
           optimistic_value=DEFAULT_OPTIMISTIC_VALUE, step=None) -> jax.Array:
    """Draws n distinct valid rows with first-draw probabilities `sampling_probs(...)`.

    Args:
      key: a jax.random key.
      table: TaskTable of capacity C.
      n: static number of rows to draw; must not exceed the number of valid rows.
      temperature, eps_uniform, potential, optimistic_value, step: see `sampling_probs`.

    Returns:
      [n] int32 row indices, distinct, in draw order. Under an outer jit (no eager check possible)
      positions beyond the number of valid rows are -1.
    """
    _check_sample_args(key, table, n)
    get_potential(potential)
    check_scalar(temperature, "temperature", low=0.0, low_inclusive=False)
    check_scalar(eps_uniform, "eps_uniform", low=0.0, high=1.0)
    check_scalar(optimistic_value, "optimistic_value")
    step = jnp.int32(0) if step is None else step
    return _sample_learnability(key, table, int(n), temperature, eps_uniform, potential,
                                optimistic_value, step)


@register_sampler("uniform")
def sample_uniform(key: jax.Array, table: TaskTable, n: int, *, temperature=None, eps_uniform=None,
                   potential=None, optimistic_value=None, step=None) -> jax.Array:
    """Draws n distinct valid rows uniformly (the `uniform` ablation); LP options are ignored.

    Returns:
      [n] int32 row indices, distinct, in draw order (-1 beyond the valid rows under an outer jit).
    """
    del temperature, eps_uniform, potential, optimistic_value, step
    _check_sample_args(key, table, n)
    return _sample_uniform(key, table, int(n))

