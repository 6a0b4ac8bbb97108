"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) and duration-aware sample weights."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ace.core.checks import as_float_array, check_scalar, check_static_int, is_concrete
from ace.rl.registry import ADVANTAGES, DURATION_NORMALIZERS, register_advantage


class GroupAdvantages(NamedTuple):
    """Output of `group_advantages`.

    advantages: same shape as the rewards ([N·G] or [N, G]), float32 (or float64 input dtype).
    zero_variance: [N] bool, True for a group whose G rewards are all equal; its advantages are
      exactly 0, so it carries no learning signal and callers may drop it.
    """
    advantages: jax.Array
    zero_variance: jax.Array


@register_advantage("grpo")
def grpo_advantages(grouped: jax.Array, *, eps: float) -> jax.Array:
    """(r − mean) / (std + eps) per group (Shao et al. 2024, DeepSeekMath, eq. 3).

    std is the unbiased sample std (ddof=1), as in the TRL and Tunix GRPO implementations.
    Args: grouped [N, G] float. Returns [N, G].
    """
    group_size = grouped.shape[-1]
    centred = grouped - grouped.mean(axis=-1, keepdims=True)
    variance = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (group_size - 1)
    # In a constant group sqrt'(0) is infinite and 0/eps is 0/0 when eps=0: both give NaN
    # gradients even behind a jnp.where, so the square root and the division see a safe 1 there.
    # Those groups are zeroed by the caller anyway.
    constant = jnp.max(grouped, axis=-1, keepdims=True) == jnp.min(grouped, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.where(constant, 1.0, variance))
    return centred / jnp.where(constant, 1.0, std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(grouped: jax.Array, *, eps: float) -> jax.Array:
    """r − mean per group: Dr. GRPO drops the std division (Liu et al. 2025, "Understanding
    R1-Zero-Like Training", sec. 3.1) because it over-weights groups with low reward spread.
    Args: grouped [N, G] float; eps unused. Returns [N, G].
    """
    del eps
    return grouped - grouped.mean(axis=-1, keepdims=True)


@register_advantage("rloo")
def rloo_advantages(grouped: jax.Array, *, eps: float) -> jax.Array:
    """r_i − mean_{j≠i} r_j: the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).
    Args: grouped [N, G] float, G ≥ 2; eps unused. Returns [N, G].
    """
    del eps
    group_size = grouped.shape[-1]
    baseline = (grouped.sum(axis=-1, keepdims=True) - grouped) / (group_size - 1)
    return grouped - baseline


def group_advantages(rewards, group_size: int, *, mode: str, eps: float = 1e-6) -> GroupAdvantages:
    """Advantages of each sample relative to the other samples of its group.

    Args:
      rewards: [N·G] (groups contiguous: sample g of group n at n·G + g) or [N, G]; any real dtype,
        computed in float32 (float64 if given).
      group_size: G, a Python int ≥ 2 (a group of one has no relative advantage).
      mode: a registered advantage mode: "grpo" ((r − mean)/(std + eps)), "dr_grpo" (r − mean),
        "rloo" (r minus the mean of the other G − 1 rewards), or one added with
        `register_advantage`.
      eps: added to the std in "grpo"; ignored by the other built-in modes.

    Returns:
      GroupAdvantages(advantages with the shape of `rewards`, zero_variance [N] bool). Groups whose
      rewards are all equal get advantages exactly 0 whatever the mode.
    """
    estimator = ADVANTAGES.get(mode)
    group_size = check_static_int(group_size, "group_size", low=2)
    check_scalar(eps, "eps", low=0.0)
    rewards = as_float_array(rewards, "rewards")
    if rewards.ndim == 1:
        if rewards.shape[0] % group_size:
            raise ValueError(f"rewards has shape [N·G] = ({rewards.shape[0]},), which is not a "
                             f"multiple of group_size={group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.ndim == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards has shape [N, G] = {tuple(rewards.shape)} but "
                             f"group_size={group_size}")
        grouped = rewards
    else:
        raise ValueError(f"rewards must have shape [N·G] or [N, G], got {tuple(rewards.shape)}")

    zero_variance = jnp.max(grouped, axis=-1) == jnp.min(grouped, axis=-1)
    advantages = estimator(grouped, eps=eps)
    if advantages.shape != grouped.shape:
        raise ValueError(f"advantage mode {mode!r} returned shape {tuple(advantages.shape)}, "
                         f"expected [N, G] = {tuple(grouped.shape)}")
    advantages = jnp.where(zero_variance[:, None], 0.0, advantages).astype(grouped.dtype)
    return GroupAdvantages(advantages.reshape(rewards.shape), zero_variance)


@DURATION_NORMALIZERS.register("batch_mean")
def _batch_mean_weights(durations: jax.Array) -> jax.Array:
    mean = durations.mean()
    # An all-zero batch (e.g. every action failed instantly) has no duration signal: fall back to
    # uniform weights instead of dividing by zero.
    usable = mean > jnp.finfo(durations.dtype).tiny
    return jnp.where(usable, durations / jnp.where(usable, mean, 1.0), 1.0)


@DURATION_NORMALIZERS.register("none")
def _raw_durations(durations: jax.Array) -> jax.Array:
    return durations


def duration_weights(durations, *, normalize: str = "batch_mean") -> jax.Array:
    """Duration-aware sample weights: w_i = Δt_i / mean_j Δt_j.

    In an asynchronous rollout pipeline fast actions come back more often than slow ones, so a
    plain average over-weights them; weighting each sample by its execution time undoes that
    ("Reinforcement Learning for Machine Learning Engineering Agents", Yang et al. 2025,
    duration-aware gradient updates). Dividing by the batch mean keeps the loss scale unchanged.

    Args:
      durations: [B] non-negative execution times Δt (any unit), float or int.
      normalize: "batch_mean" (weights average to 1; a batch whose mean duration is 0 gets
        uniform weights 1) or "none" (the raw durations, float).

    Returns:
      weights: [B] float32 (float64 if given), to pass as `policy_loss(..., sample_weights=)`.
    """
    normalizer = DURATION_NORMALIZERS.get(normalize)
    durations = as_float_array(durations, "durations")
    if durations.ndim != 1:
        raise ValueError(f"durations must have shape [B], got {tuple(durations.shape)}")
    if is_concrete(durations):
        values = np.asarray(durations)
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(f"durations must be finite and >= 0, got durations[{index}] = "
                             f"{float(values[index])}")
    return normalizer(durations)
