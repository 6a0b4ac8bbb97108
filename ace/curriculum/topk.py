"""Exact top-k of a long vector through block maxima: `lax.top_k`'s result at a fraction of its cost.

`lax.top_k` over a 1M-row table column costs ~1.5 ms on a CPU core, most of a curriculum round.
Splitting the vector into blocks of B entries, taking each block's maximum (one vectorised pass),
picking the k best blocks and running `lax.top_k` on their k * B entries gives the same answer:
if x is among the top k, its block's maximum ranks no lower than x, and at most k - 1 entries (so
at most k - 1 blocks) rank above x, so x's block is among the k best blocks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# 64 entries per block: the block-max pass stays vectorised and the final top_k sees k * 64 rows.
BLOCK = 64
# Below this many blocks per selected entry the two-level selection does not pay off.
MIN_BLOCKS_PER_K = 4


def top_k(x: jax.Array, k: int, *, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """Largest k entries of a float32 vector: the result of `jax.lax.top_k(x, k)`, ties by lowest index.

    Precondition: x holds no NaN and no -0.0. Block maxima come from an ordinary float max, which
    cannot tell -0.0 from +0.0 (lax.top_k ranks -0.0 lower), so callers write +0.0 for zero inside
    the pass that makes x; a separate canonicalising pass here would cost a full extra read and
    write of x. Vectors shorter than `MIN_BLOCKS_PER_K * k * block` go straight to `lax.top_k`.

    Args:
      x: [N] float32, no NaN, no -0.0.
      k: static number of entries, 1 <= k <= N.
      block: static block size B of the first level.

    Returns:
      (values [k] float32, indices [k] int32).
    """
    if x.ndim != 1:
        raise ValueError(f"top_k takes a vector [N], got shape {tuple(x.shape)}")
    if x.dtype != jnp.float32:
        raise ValueError(f"top_k takes float32, got {x.dtype}")
    n = x.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    if not isinstance(block, int) or block < 2:
        raise ValueError(f"block must be an int >= 2, got {block!r}")
    n_blocks = n // block
    if n_blocks < MIN_BLOCKS_PER_K * k:
        return jax.lax.top_k(x, k)
    body = n_blocks * block
    block_max = x[:body].reshape(n_blocks, block).max(axis=1)
    _, best = jax.lax.top_k(block_max, k)
    # Ascending block order keeps candidate positions increasing in the original index, so the
    # final top_k breaks ties by lowest original index as the one-level top_k would.
    best = jnp.sort(best)
    cand_idx = (best[:, None] * block + jnp.arange(block, dtype=jnp.int32)[None, :]).reshape(-1)
    cand = x[:body].reshape(n_blocks, block)[best].reshape(-1)
    if body < n:  # the ragged tail is always a candidate; its indices are the largest
        cand = jnp.concatenate([cand, x[body:]])
        cand_idx = jnp.concatenate([cand_idx, jnp.arange(body, n, dtype=jnp.int32)])
    vals, pos = jax.lax.top_k(cand, k)
    return vals, cand_idx[pos]
