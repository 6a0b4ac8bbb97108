"""Per-token estimators of KL(π ‖ π_ref) from samples of π (Schulman 2020, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html).

With log r = log π_ref(x) − log π(x) for x ~ π:
- k1 = −log r: unbiased, high variance, can be negative.
- k2 = ½ (log r)²: biased, low variance, ≥ 0 (its gradient is that of the true KL to first order).
- k3 = (r − 1) − log r: unbiased, low variance, ≥ 0 (GRPO's KL term, Shao et al. 2024, eq. 4).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ace.core.checks import as_float_array, check_shape
from ace.rl.registry import KL_ESTIMATORS, register_kl

# exp(20) ≈ 5e8 keeps r finite in float32 for any token; verl clamps the same way. Beyond it the
# value saturates and the gradient with respect to log r is 0.
_MAX_LOG_RATIO = 20.0


@register_kl("k1")
def k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return logp - ref_logp


@register_kl("k2")
def k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(ref_logp - logp)


@register_kl("k3")
def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    log_ratio = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # expm1 keeps precision when r ≈ 1, where (r − 1) − log r is a difference of near-equal terms.
    return jnp.expm1(log_ratio) - log_ratio


def kl_penalty(logp, ref_logp, *, kind: str, mask=None) -> jax.Array:
    """KL(π ‖ π_ref) estimated per token from the sampled tokens' log-probabilities.

    Args:
      logp: [B, T] (any shape) float log π of the sampled tokens under the current policy.
      ref_logp: same shape, log π_ref of the same tokens under the reference policy.
      kind: "k1" | "k2" | "k3" (see the module docstring), or one added with `register_kl`.
      mask: None, or the shape of `logp`, bool or float, 1 = keep.

    Returns:
      mask None: the per-token estimate, same shape as `logp`, float32 (float64 if given).
      mask given: a scalar, the masked token mean sum(k·mask) / sum(mask) (0 when nothing is kept);
        masked tokens contribute no value and no gradient, even if they hold inf.
    """
    estimator = KL_ESTIMATORS.get(kind)
    logp = as_float_array(logp, "logp")
    ref_logp = as_float_array(ref_logp, "ref_logp")
    if logp.ndim == 0:
        raise ValueError("logp must have shape [B, T] (at least rank 1), got a scalar")
    check_shape(ref_logp, logp.shape, "ref_logp", "the shape of logp")
    if mask is None:
        return estimator(logp, ref_logp)
    mask = as_float_array(mask, "mask")
    check_shape(mask, logp.shape, "mask", "the shape of logp")
    keep = mask != 0
    # Replace masked log-probs before the estimator so that no inf/NaN reaches exp or the gradient.
    per_token = estimator(jnp.where(keep, logp, 0.0), jnp.where(keep, ref_logp, 0.0))
    weights = jnp.where(keep, mask, 0.0)
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1e-8)
