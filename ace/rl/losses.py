"""The clipped policy-gradient loss of GRPO, with clip-higher, dual clip and truncated importance
weights for off-policy rollouts.

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et
al. 2025, sec. 4.2) separates the policy that sampled the data from the one the update is anchored
to. Three logprobs of each token:
  behaviour  log π_behav: what the rollout engine returned (`rollout_logp`), possibly several
             versions old and computed by other kernels;
  proximal   log π_prox: the learner's recomputation with the params at the start of this update
             (`old_logp`), once per batch, before any gradient step;
  current    log π_θ: differentiated (`logp`).
The trust region is the clip on π_θ / π_prox; the off-policy correction is the importance weight
π_prox / π_behav, truncated at `tis_cap` and held constant.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ace.core.checks import as_float_array, check_rank, check_scalar, check_shape
from ace.rl.aggregation import aggregate_loss
from ace.rl.registry import AGGREGATIONS, register_policy_loss


def _masked_mean(x: jax.Array, keep: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(count, 1.0)


def _per_token(x: jax.Array, shape: Tuple[int, int], name: str) -> jax.Array:
    """A per-sequence [B] or per-token [B, T] array, broadcast to [B, T] (a sequence's advantage
    applies to each of its tokens)."""
    batch, length = shape
    if x.shape == (batch,):
        return jnp.broadcast_to(x[:, None], shape)
    if x.shape == (batch, length):
        return x
    raise ValueError(f"{name} must have shape [B] = ({batch},) or [B, T] = ({batch}, {length}), "
                     f"got {tuple(x.shape)}")


@register_policy_loss("grpo")
def policy_loss(logp, old_logp, advantages, mask, *, eps_low: float, eps_high: float, agg: str,
                dual_clip: Optional[float] = None, rollout_logp=None,
                tis_cap: Optional[float] = None, norm_len=None,
                sample_weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The clipped surrogate loss −min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A), aggregated.

    r = π(token) / π_old(token) = exp(logp − old_logp). The PPO clip (Schulman et al. 2017, eq. 7)
    with separate lower and upper ranges ("clip-higher", DAPO, Yu et al. 2025, sec. 3.1). Per token:
      loss = max(−A·r, −A·clip(r, 1 − eps_low, 1 + eps_high))
      dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5), for A < 0 only:
        loss = min(loss, −A·dual_clip), which bounds the loss when r ≫ 1 on a bad token.
      truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
        You Off-Policy RL Training"): the rollout engine's sampler differs from the learner's
        forward pass, so each token is reweighted by w = min(exp(old_logp − rollout_logp), tis_cap),
        a constant (no gradient flows through it).
      sample_weights: the loss of sequence b is multiplied by sample_weights[b] (duration weights,
        staleness reweighting), a constant.
    Then `aggregate_loss(loss, mask, agg=agg, norm_len=norm_len)`.

    Args:
      logp: [B, T] float log π(token) under the policy being optimised (the only input with a
        gradient).
      old_logp: [B, T] float log π_old(token), the learner's log-probs of the policy that produced
        the data (treated as a constant).
      advantages: [B] per sequence or [B, T] per token, float (a constant).
      mask: [B, T] bool or float, 1 = keep (a float mask acts as a token weight). Masked tokens
        change neither the loss nor its gradient, even when their inputs hold inf or NaN.
      eps_low: lower clip range, 0 ≤ eps_low < 1 (e.g. 0.2).
      eps_high: upper clip range, ≥ 0 (e.g. 0.2, or 0.28 for clip-higher).
      agg: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm" (see aggregation.py).
      dual_clip: None (off) or the constant c > 1 of the dual clip.
      rollout_logp: None, or [B, T] float log-probs the rollout engine returned for the same tokens.
        Requires `tis_cap`.
      tis_cap: the truncation cap (> 0, e.g. 2.0) of the importance weights; requires
        `rollout_logp`.
      norm_len: constant normaliser for agg="seq_mean_token_sum_norm", default T.
      sample_weights: None or [B] float per-sequence weights (a constant).

    Returns:
      (loss, metrics): loss a scalar float32 (float64 if `logp` is float64); metrics a flat dict
      of scalars without gradient, each a mean over valid tokens (mask ≠ 0):
        clip_frac: share of tokens whose gradient the clip zeroes (clip_frac_low + clip_frac_high);
        clip_frac_low: r < 1 − eps_low with A < 0; clip_frac_high: r > 1 + eps_high with A > 0;
        approx_kl: k3 estimate of KL(π_old ‖ π), mean of (r − 1) − log r;
        ratio_mean, ratio_max, ratio_min: statistics of r (1.0 when no token is valid);
        dual_clip_frac (dual clip on): share of tokens where the dual clip is active;
        tis_weight_mean (importance weights on): mean of the truncated weights;
        tis_truncated_frac (importance weights on): share of tokens whose weight the cap cut.
    """
    AGGREGATIONS.get(agg)  # fail on a bad mode before any tracing work
    check_scalar(eps_low, "eps_low", low=0.0, high=1.0, high_inclusive=False)
    check_scalar(eps_high, "eps_high", low=0.0)
    if dual_clip is not None:
        check_scalar(dual_clip, "dual_clip", low=1.0, low_inclusive=False)
    if (rollout_logp is None) != (tis_cap is None):
        raise ValueError(
            "rollout_logp and tis_cap go together: got rollout_logp "
            f"{'None' if rollout_logp is None else 'given'} and tis_cap={tis_cap!r}; pass both to "
            "reweight off-policy tokens by truncated importance weights, or neither")
    if tis_cap is not None:
        check_scalar(tis_cap, "tis_cap", low=0.0, low_inclusive=False)

    logp = as_float_array(logp, "logp")
    check_rank(logp, 2, "logp", "[B, T]")
    shape = logp.shape
    old_logp = as_float_array(old_logp, "old_logp")
    check_shape(old_logp, shape, "old_logp", "[B, T]")
    mask = as_float_array(mask, "mask")
    check_shape(mask, shape, "mask", "[B, T]")
    advantages = _per_token(as_float_array(advantages, "advantages"), shape, "advantages")

    keep = mask != 0
    # Masked entries are replaced before any arithmetic so that padding garbage (inf, NaN) reaches
    # neither the loss nor, through exp, the gradient.
    logp = jnp.where(keep, logp, 0.0)
    old_logp = jax.lax.stop_gradient(jnp.where(keep, old_logp, 0.0))
    advantages = jax.lax.stop_gradient(jnp.where(keep, advantages, 0.0))

    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    per_token = jnp.maximum(unclipped_loss, clipped_loss)
    metrics: Dict[str, jax.Array] = {}
    count = jnp.sum(keep)

    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > dual_bound)
        per_token = jnp.where(advantages < 0, jnp.minimum(per_token, dual_bound), per_token)
        metrics["dual_clip_frac"] = _masked_mean(dual_active.astype(per_token.dtype), keep, count)

    if rollout_logp is not None:
        rollout_logp = as_float_array(rollout_logp, "rollout_logp")
        check_shape(rollout_logp, shape, "rollout_logp", "[B, T]")
        rollout_logp = jnp.where(keep, rollout_logp, 0.0)
        raw_weight = jax.lax.stop_gradient(jnp.exp(old_logp - rollout_logp))
        tis_weight = jnp.minimum(raw_weight, tis_cap)
        per_token = per_token * tis_weight
        metrics["tis_weight_mean"] = _masked_mean(tis_weight, keep, count)
        metrics["tis_truncated_frac"] = _masked_mean((raw_weight > tis_cap).astype(per_token.dtype), keep, count)

    if sample_weights is not None:
        sample_weights = as_float_array(sample_weights, "sample_weights")
        check_shape(sample_weights, shape[:1], "sample_weights", "[B]")
        per_token = per_token * jax.lax.stop_gradient(sample_weights)[:, None]

    loss = aggregate_loss(per_token, mask, agg=agg, norm_len=norm_len)

    ratio_sg = jax.lax.stop_gradient(ratio)
    clip_low = keep & (advantages < 0) & (ratio_sg < 1.0 - eps_low)
    clip_high = keep & (advantages > 0) & (ratio_sg > 1.0 + eps_high)
    dtype = per_token.dtype
    any_valid = count > 0
    metrics.update(
        clip_frac=_masked_mean((clip_low | clip_high).astype(dtype), keep, count),
        clip_frac_low=_masked_mean(clip_low.astype(dtype), keep, count),
        clip_frac_high=_masked_mean(clip_high.astype(dtype), keep, count),
        approx_kl=_masked_mean(jnp.expm1(jax.lax.stop_gradient(log_ratio))
                               - jax.lax.stop_gradient(log_ratio), keep, count),
        ratio_mean=jnp.where(any_valid, _masked_mean(ratio_sg, keep, count), 1.0),
        ratio_max=jnp.where(any_valid, jnp.max(jnp.where(keep, ratio_sg, -jnp.inf)), 1.0),
        ratio_min=jnp.where(any_valid, jnp.min(jnp.where(keep, ratio_sg, jnp.inf)), 1.0),
    )
    return loss, {name: value.astype(dtype) for name, value in metrics.items()}
