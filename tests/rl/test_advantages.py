"""group_advantages and duration_weights against loop-based NumPy references and properties."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ace.rl import duration_weights, group_advantages

N, G = 3, 4
MODES = ("grpo", "dr_grpo", "rloo")
HYP = settings(max_examples=25, deadline=None)


def reference_advantages(rewards, group_size, mode, eps=1e-6):
    """One group and one sample at a time, straight from the papers' formulas."""
    flat = np.asarray(rewards, np.float64).reshape(-1, group_size)
    out = np.zeros_like(flat)
    for n, group in enumerate(flat):
        if np.all(group == group[0]):
            continue
        for i, r in enumerate(group):
            if mode == "grpo":
                mean = sum(group) / group_size
                std = np.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
                out[n, i] = (r - mean) / (std + eps)
            elif mode == "dr_grpo":
                out[n, i] = r - sum(group) / group_size
            else:
                others = [x for j, x in enumerate(group) if j != i]
                out[n, i] = r - sum(others) / len(others)
    return out.reshape(np.shape(rewards))


@functools.partial(jax.jit, static_argnames=("mode", "eps"))
def _grouped(rewards, *, mode, eps=1e-6):
    return group_advantages(rewards, G, mode=mode, eps=eps)


# Rewards on a coarse grid, as real graders give, so that groups with equal rewards occur.
_rewards = arrays(np.float32, (N, G), elements=st.integers(-4, 4).map(lambda k: k / 2.0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flat", [False, True])
def test_group_advantages_match_numpy_reference(mode, flat):
    rewards = np.array([[0.0, 1.0, 0.5, 0.25], [2.0, 2.0, 2.0, 2.0], [-1.0, 3.0, 0.0, 0.0]],
                       np.float32)
    if flat:
        rewards = rewards.reshape(-1)
    out = group_advantages(rewards, G, mode=mode)
    assert out.advantages.shape == rewards.shape
    assert out.advantages.dtype == jnp.float32
    np.testing.assert_allclose(out.advantages, reference_advantages(rewards, G, mode), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(out.zero_variance, [False, True, False])


@HYP
@given(rewards=_rewards, mode=st.sampled_from(MODES))
def test_group_advantages_sum_to_zero_per_group(rewards, mode):
    advantages = np.asarray(_grouped(rewards, mode=mode).advantages, np.float64)
    scale = 1.0 + np.abs(advantages).max()
    np.testing.assert_allclose(advantages.sum(axis=1), 0.0, atol=1e-5 * scale)


@HYP
@given(rewards=_rewards, scale=st.floats(0.1, 10.0), shift=st.floats(-5.0, 5.0))
def test_grpo_advantages_invariant_to_affine_rewards(rewards, scale, shift):
    # eps=0 makes the invariance exact up to rounding; with eps>0 it holds only when std >> eps.
    base = _grouped(rewards, mode="grpo", eps=0.0)
    moved = _grouped(rewards * np.float32(scale) + np.float32(shift), mode="grpo", eps=0.0)
    np.testing.assert_allclose(moved.advantages, base.advantages, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(moved.zero_variance, base.zero_variance)


@HYP
@given(rewards=_rewards, mode=st.sampled_from(MODES))
def test_zero_variance_groups_are_flagged_and_zeroed(rewards, mode):
    out = _grouped(rewards, mode=mode)
    constant = np.array([len(set(row.tolist())) == 1 for row in rewards])
    np.testing.assert_array_equal(out.zero_variance, constant)
    assert np.all(np.asarray(out.advantages)[constant] == 0.0)
    assert np.all(np.isfinite(out.advantages))


def test_group_advantages_under_vmap_and_grad():
    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(2, N * G)).astype(np.float32)
    batched = jax.vmap(lambda r: group_advantages(r, G, mode="grpo").advantages)(stacked)
    for k in range(2):
        np.testing.assert_allclose(batched[k], reference_advantages(stacked[k], G, "grpo"),
                                   rtol=1e-4, atol=1e-5)
    # d/dr of sum(A·c) for dr_grpo is c − mean_group(c), by linearity.
    weights = rng.normal(size=(N, G)).astype(np.float32)
    grad = jax.grad(lambda r: jnp.sum(group_advantages(r, G, mode="dr_grpo").advantages
                                      * weights))(stacked[0].reshape(N, G))
    np.testing.assert_allclose(grad, weights - weights.mean(axis=1, keepdims=True), atol=1e-6)
    # A constant group must not produce NaN gradients even with eps=0.
    grad = jax.grad(lambda r: jnp.sum(group_advantages(r, G, mode="grpo", eps=0.0).advantages))(
        jnp.ones((N, G)))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rewards=np.zeros(10), group_size=4, mode="grpo"), "not a multiple of group_size=4"),
    (dict(rewards=np.zeros((3, 5)), group_size=4, mode="grpo"), r"\[N, G\] = \(3, 5\)"),
    (dict(rewards=np.zeros((2, 2, 4)), group_size=4, mode="grpo"), "rewards must have shape"),
    (dict(rewards=np.zeros(8), group_size=1, mode="rloo"), "group_size must be >= 2, got 1"),
    (dict(rewards=np.zeros(8), group_size=4.0, mode="grpo"), "group_size must be a Python int"),
    (dict(rewards=np.zeros(8), group_size=4, mode="ppo"), "valid names: dr_grpo, grpo, rloo"),
    (dict(rewards=np.zeros(8), group_size=4, mode="grpo", eps=-1.0), "eps must be >= 0.0"),
])
def test_group_advantages_reject_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(**kwargs)


def test_duration_weights_are_duration_over_batch_mean():
    durations = np.array([1.0, 3.0, 0.0, 12.0], np.float32)
    weights = jax.jit(duration_weights)(durations)
    np.testing.assert_allclose(weights, durations / 4.0, rtol=1e-6)
    np.testing.assert_allclose(np.mean(weights), 1.0, rtol=1e-6)
    np.testing.assert_allclose(duration_weights(durations, normalize="none"), durations)
    # Integer seconds are accepted and come back as float32.
    assert duration_weights(np.array([2, 6]), normalize="batch_mean").dtype == jnp.float32


def test_duration_weights_zero_mean_gives_uniform_weights():
    weights = jax.jit(duration_weights)(jnp.zeros(5))
    np.testing.assert_array_equal(weights, np.ones(5))


@HYP
@given(durations=arrays(np.float32, (6,), elements=st.floats(0.0, 1e4, width=32)),
       factor=st.floats(0.01, 100.0))
def test_duration_weights_invariant_to_time_unit(durations, factor):
    base = duration_weights(durations)
    rescaled = duration_weights(durations * np.float32(factor))
    assert np.all(np.asarray(base) >= 0)
    if durations.mean() * min(factor, 1.0) > 1e-30:
        np.testing.assert_allclose(rescaled, base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("durations, normalize, message", [
    (np.array([1.0, -2.0]), "batch_mean", r"durations\[1\] = -2.0"),
    (np.array([1.0, np.nan]), "batch_mean", r"durations\[1\] = nan"),
    (np.ones((2, 2)), "batch_mean", r"shape \[B\]"),
    (np.ones(2), "max", "valid names: batch_mean, none"),
])
def test_duration_weights_reject_bad_input(durations, normalize, message):
    with pytest.raises(ValueError, match=message):
        duration_weights(durations, normalize=normalize)
