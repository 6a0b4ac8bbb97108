"""policy_loss and aggregate_loss against token-by-token NumPy references, plus gradient
properties: masking, the ratio-1 gradient, and exactly where clipping stops the gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ace.rl import aggregate_loss, policy_loss

B, T = 3, 5
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
HYP = settings(max_examples=20, deadline=None)


def reference_policy_loss(logp, old_logp, advantages, mask, *, eps_low, eps_high, agg,
                          dual_clip=None, rollout_logp=None, tis_cap=None, norm_len=None,
                          sample_weights=None):
    """Token by token, in the objective form of the papers (maximise the surrogate)."""
    logp, old_logp, mask = (np.asarray(x, np.float64) for x in (logp, old_logp, mask))
    advantages = np.asarray(advantages, np.float64)
    batch, length = logp.shape
    loss = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            if mask[b, t] == 0:
                continue
            a = advantages[b] if advantages.ndim == 1 else advantages[b, t]
            r = np.exp(logp[b, t] - old_logp[b, t])
            surrogate = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if dual_clip is not None and a < 0:
                surrogate = max(surrogate, dual_clip * a)
            token_loss = -surrogate
            if rollout_logp is not None:
                token_loss *= min(np.exp(old_logp[b, t] - rollout_logp[b, t]), tis_cap)
            if sample_weights is not None:
                token_loss *= sample_weights[b]
            loss[b, t] = token_loss
    return reference_aggregate(loss, mask, agg, norm_len)


def reference_aggregate(loss, mask, agg, norm_len=None):
    loss, mask = np.asarray(loss, np.float64), np.asarray(mask, np.float64)
    if agg == "token_mean":
        return (loss * mask).sum() / mask.sum()
    if agg == "seq_mean_token_mean":
        per_seq = [(loss[b] * mask[b]).sum() / mask[b].sum() for b in range(len(loss))
                   if mask[b].sum() > 0]
        return sum(per_seq) / len(per_seq)
    return (loss * mask).sum() / (loss.shape[0] * (loss.shape[1] if norm_len is None else norm_len))


def token_weights(mask, agg, norm_len=None):
    """d(aggregate)/d(per_token loss) for each token, written out per mode."""
    mask = np.asarray(mask, np.float64)
    if agg == "token_mean":
        return mask / mask.sum()
    if agg == "seq_mean_token_mean":
        lengths = mask.sum(axis=1, keepdims=True)
        return np.where(lengths > 0, mask / np.maximum(lengths, 1), 0) / (lengths > 0).sum()
    return mask / (mask.shape[0] * (mask.shape[1] if norm_len is None else norm_len))


@functools.partial(jax.jit, static_argnames=("agg", "eps_low", "eps_high", "dual_clip"))
def _loss_and_grad(logp, old_logp, advantages, mask, *, agg, eps_low=0.2, eps_high=0.28,
                   dual_clip=None):
    def loss_fn(lp):
        return policy_loss(lp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                           agg=agg, dual_clip=dual_clip)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp)
    return loss, metrics, grad


def _batch(seed, per_token_adv=False):
    rng = np.random.default_rng(seed)
    logp = np.log(rng.uniform(0.05, 1.0, (B, T))).astype(np.float32)
    old_logp = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    advantages = rng.normal(size=(B, T) if per_token_adv else (B,)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("options", [
    dict(),
    dict(dual_clip=3.0),
    dict(tis_cap=1.5),
    dict(sample_weights=True),
    dict(dual_clip=2.0, tis_cap=2.0, sample_weights=True, per_token_adv=True),
])
def test_policy_loss_matches_numpy_reference(agg, options):
    options = dict(options)
    logp, old_logp, advantages, mask = _batch(1, options.pop("per_token_adv", False))
    rng = np.random.default_rng(2)
    if options.pop("sample_weights", False):
        options["sample_weights"] = rng.uniform(0.1, 3.0, B).astype(np.float32)
    if "tis_cap" in options:
        options["rollout_logp"] = (old_logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    if agg == "seq_mean_token_sum_norm":
        options["norm_len"] = 16
    loss, _ = policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, agg=agg,
                          **options)
    expected = reference_policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28,
                                     agg=agg, **options)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_policy_loss_metrics_match_numpy():
    logp, old_logp, advantages, mask = _batch(3)
    rng = np.random.default_rng(4)
    rollout_logp = (old_logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    _, metrics = policy_loss(logp, old_logp, advantages, mask, eps_low=0.1, eps_high=0.15,
                             agg="token_mean", dual_clip=1.5, rollout_logp=rollout_logp,
                             tis_cap=1.2)
    keep = mask > 0
    ratio = np.exp(logp.astype(np.float64) - old_logp)[keep]
    adv = np.broadcast_to(advantages[:, None], (B, T))[keep]
    low = (adv < 0) & (ratio < 0.9)
    high = (adv > 0) & (ratio > 1.15)
    expected = dict(
        clip_frac=np.mean(low | high), clip_frac_low=np.mean(low), clip_frac_high=np.mean(high),
        approx_kl=np.mean(ratio - 1 - np.log(ratio)), ratio_mean=ratio.mean(),
        ratio_max=ratio.max(), ratio_min=ratio.min(),
        dual_clip_frac=np.mean((adv < 0) & (ratio > 1.5)),
        tis_weight_mean=np.mean(np.minimum(np.exp(old_logp - rollout_logp.astype(np.float64)),
                                           1.2)[keep]),
        tis_truncated_frac=np.mean((np.exp(old_logp - rollout_logp.astype(np.float64)) > 1.2)[keep]))
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert 0 < metrics["clip_frac"] < 1  # the batch exercises both sides of the test


_log_ratio = arrays(np.float32, (B, T), elements=st.floats(-0.75, 0.75, width=32))
_garbage = arrays(np.float32, (B, T), elements=st.sampled_from([0.0, -3.0, 7.0, np.inf, -np.inf,
                                                                   np.nan]))
_mask = arrays(np.bool_, (B, T)).filter(lambda m: m.any())


@HYP
@given(log_ratio=_log_ratio, mask=_mask, garbage=_garbage, agg=st.sampled_from(AGGS))
def test_masked_tokens_change_neither_loss_nor_gradient(log_ratio, mask, garbage, agg):
    logp, _, _, _ = _batch(5)
    old_logp = logp - log_ratio
    advantages = np.random.default_rng(6).normal(size=(B, T)).astype(np.float32)
    clean = _loss_and_grad(logp, old_logp, advantages, mask.astype(np.float32), agg=agg,
                           dual_clip=3.0)
    dirty = _loss_and_grad(np.where(mask, logp, garbage), np.where(mask, old_logp, -garbage),
                           np.where(mask, advantages, garbage), mask.astype(np.float32), agg=agg,
                           dual_clip=3.0)
    np.testing.assert_array_equal(dirty[0], clean[0])
    np.testing.assert_array_equal(dirty[2], clean[2])
    assert np.all(np.asarray(clean[2])[~mask] == 0.0)
    for name in clean[1]:
        np.testing.assert_array_equal(dirty[1][name], clean[1][name], err_msg=name)


@HYP
@given(mask=_mask, agg=st.sampled_from(AGGS), per_token=st.booleans())
def test_gradient_at_ratio_one_is_minus_advantage_times_aggregation_weight(mask, agg, per_token):
    logp, _, advantages, _ = _batch(7, per_token_adv=per_token)
    mask = mask.astype(np.float32)
    loss, metrics, grad = _loss_and_grad(logp, logp, advantages, mask, agg=agg)
    adv = advantages if per_token else np.broadcast_to(advantages[:, None], (B, T))
    # d(−A·r)/d logp = −A·r = −A at r = 1, times the weight the aggregation gives the token.
    expected = -adv * token_weights(mask, agg)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, (-adv * token_weights(mask, agg)).sum(), rtol=1e-5,
                               atol=1e-6)
    assert metrics["clip_frac"] == 0 and metrics["approx_kl"] == 0 and metrics["ratio_max"] == 1


# Log-ratios on a 0.05 grid stay clear of log(0.8), log(1.28) and log(3) (the clip and dual-clip
# boundaries below), so that float rounding cannot move a token across a boundary.
_grid_log_ratio = arrays(np.float32, (B, T), elements=st.integers(-30, 30).map(lambda k: k * 0.05))


@HYP
@given(log_ratio=_grid_log_ratio, advantage_signs=arrays(np.int8, (B, T), elements=st.sampled_from(
    [-1, 1])), agg=st.sampled_from(AGGS), dual=st.booleans())
def test_clipping_stops_the_gradient_exactly_where_it_should(log_ratio, advantage_signs, agg, dual):
    logp, _, _, mask = _batch(8)
    old_logp = logp - log_ratio
    magnitudes = np.random.default_rng(9).uniform(0.5, 2.0, (B, T)).astype(np.float32)
    advantages = advantage_signs * magnitudes
    dual_clip = 3.0 if dual else None
    _, metrics, grad = _loss_and_grad(logp, old_logp, advantages, mask, agg=agg, eps_low=0.2,
                                      eps_high=0.28, dual_clip=dual_clip)
    ratio = np.exp(log_ratio.astype(np.float64))
    stopped = (((advantages > 0) & (ratio > 1.28)) | ((advantages < 0) & (ratio < 0.8))
               | (dual and (advantages < 0) & (ratio > 3.0)))
    expected = np.where(stopped, 0.0, -advantages * ratio) * token_weights(mask, agg)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[stopped] == 0.0)


def test_importance_and_sample_weights_scale_the_gradient_without_their_own_gradient():
    logp, _, advantages, mask = _batch(10)
    rng = np.random.default_rng(11)
    rollout_logp = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    sample_weights = rng.uniform(0.5, 2.0, B).astype(np.float32)

    def loss_fn(lp, rollout, weights):
        return policy_loss(lp, logp, advantages, mask, eps_low=0.2, eps_high=0.2,
                           agg="token_mean", rollout_logp=rollout, tis_cap=1.3,
                           sample_weights=weights)[0]

    grads = jax.grad(loss_fn, argnums=(0, 1, 2))(logp, rollout_logp, sample_weights)
    tis = np.minimum(np.exp(logp - rollout_logp.astype(np.float64)), 1.3)
    expected = (-advantages[:, None] * tis * sample_weights[:, None]) * token_weights(mask,
                                                                                      "token_mean")
    np.testing.assert_allclose(grads[0], expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_decoupled_ppo_clips_against_the_proximal_policy_and_weights_by_behaviour():
    """Three distinct logprobs per token: the clip sees current/proximal only, the behaviour
    policy enters only through the truncated weight proximal/behaviour. Loss and gradient against
    the token-by-token formula d/dlogp [−w·min(r·A, clip(r)·A)] = −w·A·r where the clip is inactive."""
    rng = np.random.default_rng(21)
    mask = (rng.uniform(size=(B, T)) > 0.2).astype(np.float32)
    mask[:, 0] = 1
    behaviour = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    proximal = (behaviour + rng.normal(0, 0.6, (B, T))).astype(np.float32)
    current = (proximal + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    advantages = rng.normal(0, 1, B).astype(np.float32)
    eps_low, eps_high, cap = 0.2, 0.28, 1.5

    def loss_fn(lp):
        return policy_loss(lp, proximal, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                           agg="token_mean", rollout_logp=behaviour, tis_cap=cap)

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(current)
    cur, prox, beh = (np.asarray(x, np.float64) for x in (current, proximal, behaviour))
    r = np.exp(cur - prox)
    w = np.minimum(np.exp(prox - beh), cap)
    a = advantages[:, None].astype(np.float64)
    surrogate = np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
    want_loss = np.sum(-w * surrogate * mask) / mask.sum()
    active = ~(((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low)))
    want_grad = np.where(active, -w * a * r, 0.0) * mask / mask.sum()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    # The batch exercises every case: clipped and unclipped tokens, truncated and kept weights.
    assert 0 < float(metrics["clip_frac"]) < 1
    assert 0 < float(metrics["tis_truncated_frac"]) < 1
    # Clipping against the behaviour policy instead would give another gradient.
    r_beh = np.exp(cur - beh)
    wrong_active = ~(((a > 0) & (r_beh > 1 + eps_high)) | ((a < 0) & (r_beh < 1 - eps_low)))
    assert np.any((wrong_active != active) & (mask > 0))


def test_policy_loss_under_vmap_equals_a_loop():
    batches = [_batch(seed) for seed in (12, 13)]
    stacked = [np.stack(parts) for parts in zip(*batches)]
    vmapped = jax.vmap(lambda lp, old, adv, m: _loss_and_grad(lp, old, adv, m,
                                                              agg="seq_mean_token_mean"))(*stacked)
    for k, parts in enumerate(batches):
        loss, metrics, grad = _loss_and_grad(*parts, agg="seq_mean_token_mean")
        np.testing.assert_allclose(vmapped[0][k], loss, rtol=1e-6)
        np.testing.assert_allclose(vmapped[2][k], grad, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(vmapped[1]["clip_frac"][k], metrics["clip_frac"])


def test_bfloat16_inputs_are_computed_in_float32():
    logp, old_logp, advantages, mask = _batch(14)
    loss, metrics = policy_loss(jnp.asarray(logp, jnp.bfloat16), jnp.asarray(old_logp, jnp.bfloat16),
                                advantages, mask, eps_low=0.2, eps_high=0.2, agg="token_mean")
    assert loss.dtype == jnp.float32 and metrics["ratio_mean"].dtype == jnp.float32


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_loss_matches_numpy_and_ignores_masked_inf(agg):
    rng = np.random.default_rng(15)
    per_token = rng.normal(size=(B, T)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    norm_len = 8 if agg == "seq_mean_token_sum_norm" else None
    out = jax.jit(functools.partial(aggregate_loss, agg=agg, norm_len=norm_len))(
        np.where(mask > 0, per_token, np.inf), mask)
    np.testing.assert_allclose(out, reference_aggregate(per_token, mask, agg, norm_len), rtol=1e-6)
    # seq_mean_token_sum_norm defaults to the padded length T.
    if agg == "seq_mean_token_sum_norm":
        np.testing.assert_allclose(aggregate_loss(per_token, mask, agg=agg),
                                   reference_aggregate(per_token, mask, agg, T), rtol=1e-6)


def test_aggregate_loss_of_empty_mask_is_zero():
    for agg in AGGS:
        assert aggregate_loss(jnp.ones((B, T)), jnp.zeros((B, T)), agg=agg) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(logp=np.zeros(T)), r"logp must have shape \[B, T\] \(rank 2\), got shape \(5,\)"),
    (dict(old_logp=np.zeros((B, T + 1))), r"old_logp must have shape \[B, T\] = \(3, 5\)"),
    (dict(mask=np.ones((B, 1))), r"mask must have shape \[B, T\]"),
    (dict(advantages=np.zeros(B + 1)), r"advantages must have shape \[B\] = \(3,\)"),
    (dict(sample_weights=np.ones((B, T))), r"sample_weights must have shape \[B\]"),
    (dict(rollout_logp=np.zeros((B, 2)), tis_cap=2.0), "rollout_logp must have shape"),
    (dict(rollout_logp=np.zeros((B, T))), "rollout_logp and tis_cap go together"),
    (dict(tis_cap=2.0), "rollout_logp and tis_cap go together"),
    (dict(tis_cap=0.0, rollout_logp=np.zeros((B, T))), "tis_cap must be > 0.0, got 0.0"),
    (dict(eps_low=1.0), "eps_low must be < 1.0, got 1.0"),
    (dict(eps_high=-0.1), "eps_high must be >= 0.0, got -0.1"),
    (dict(dual_clip=1.0), "dual_clip must be > 1.0, got 1.0"),
    (dict(agg="sum"), "valid names: seq_mean_token_mean, seq_mean_token_sum_norm, token_mean"),
    (dict(norm_len=8), "norm_len=8 only applies to agg='seq_mean_token_sum_norm'"),
    (dict(agg="seq_mean_token_sum_norm", norm_len=0), "norm_len must be > 0.0, got 0"),
])
def test_policy_loss_rejects_bad_input(kwargs, message):
    args = dict(logp=np.zeros((B, T)), old_logp=np.zeros((B, T)), advantages=np.zeros(B),
                mask=np.ones((B, T)), eps_low=0.2, eps_high=0.2, agg="token_mean")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss(**args)
