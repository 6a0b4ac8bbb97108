"""How a [B, T] per-token loss becomes one scalar: the aggregation modes of GRPO variants.

The mode decides how much each token weighs, and therefore the length bias of the update:
- "token_mean": every valid token of the batch weighs the same (DAPO, Yu et al. 2025, sec. 3.3).
- "seq_mean_token_mean": each sequence weighs the same, its tokens share that weight (the original
  GRPO objective, Shao et al. 2024, eq. 3); a token of a short answer weighs more.
- "seq_mean_token_sum_norm": tokens summed per sequence and divided by a constant `norm_len`
  (Dr. GRPO, Liu et al. 2025, sec. 3.1), so no weight depends on the lengths in the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ace.core.checks import as_float_array, check_rank, check_scalar, check_shape
from ace.rl.registry import AGGREGATIONS, register_aggregation


@register_aggregation("token_mean")
def token_mean(per_token: jax.Array, mask: jax.Array, norm_len) -> jax.Array:
    """sum(loss·mask) / sum(mask); 0 when no token is valid."""
    del norm_len
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1e-8)


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(per_token: jax.Array, mask: jax.Array, norm_len) -> jax.Array:
    """Mean over sequences with ≥ 1 valid token of (sum_t loss·mask / sum_t mask)."""
    del norm_len
    tokens = jnp.sum(mask, axis=-1)
    has_tokens = tokens > 0
    seq_loss = jnp.sum(per_token * mask, axis=-1) / jnp.where(has_tokens, tokens, 1.0)
    return jnp.sum(seq_loss) / jnp.maximum(jnp.sum(has_tokens), 1)


@register_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(per_token: jax.Array, mask: jax.Array, norm_len) -> jax.Array:
    """sum(loss·mask) / (B · norm_len): B counts every sequence, empty ones included."""
    return jnp.sum(per_token * mask) / (per_token.shape[0] * norm_len)


def aggregate_loss(per_token, mask, *, agg: str, norm_len=None) -> jax.Array:
    """Reduces a per-token loss to a scalar under the aggregation mode `agg`.

    Args:
      per_token: [B, T] float loss of each token.
      mask: [B, T] bool or float, 1 = keep (a float mask acts as a token weight). Masked tokens
        contribute neither value nor gradient, even if `per_token` holds inf or NaN there.
      agg: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm", or a mode added with
        `register_aggregation`.
      norm_len: the constant normaliser of "seq_mean_token_sum_norm" (> 0), default T. Passing it
        with another mode raises, since it would be silently ignored.

    Returns:
      scalar float32 (float64 if `per_token` is float64).
    """
    aggregator = AGGREGATIONS.get(agg)
    per_token = as_float_array(per_token, "per_token")
    check_rank(per_token, 2, "per_token", "[B, T]")
    mask = as_float_array(mask, "mask")
    check_shape(mask, per_token.shape, "mask", "[B, T]")
    if agg == "seq_mean_token_sum_norm":
        if norm_len is None:
            norm_len = per_token.shape[1]
        check_scalar(norm_len, "norm_len", low=0.0, low_inclusive=False)
    elif norm_len is not None:
        raise ValueError(f"norm_len={norm_len!r} only applies to agg='seq_mean_token_sum_norm', "
                         f"got agg={agg!r}")
    keep = mask != 0
    # Zero the masked entries before multiplying: 0·inf would be NaN in the value and gradient.
    per_token = jnp.where(keep, per_token, 0.0)
    return aggregator(per_token, jnp.where(keep, mask, 0.0), norm_len)
