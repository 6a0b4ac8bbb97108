"""MoE block: router, ragged dispatch vs dense reference (forward and gradient), aux loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from ace.models import moe

# One compiled function per static configuration instead of op-by-op eager dispatch.
moe_mlp = jax.jit(moe.moe_mlp, static_argnames=("top_k", "norm_topk_prob", "impl"))


def _moe_params(key, d, e, f, scale=0.3):
    ks = jax.random.split(key, 4)
    return {
        "router": jax.random.normal(ks[0], (d, e)),
        "gate_proj": scale * jax.random.normal(ks[1], (e, d, f)),
        "up_proj": scale * jax.random.normal(ks[2], (e, d, f)),
        "down_proj": scale * jax.random.normal(ks[3], (e, f, d)),
    }


def _numpy_moe(p, x, k, norm):
    """Brute-force loop over tokens and their chosen experts."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        ids = np.argsort(-probs[n], kind="stable")[:k]
        w = probs[n, ids] / (probs[n, ids].sum() if norm else 1.0)
        for e, we in zip(ids, w):
            g, u = x[n] @ p["gate_proj"][e], x[n] @ p["up_proj"][e]
            out[n] += we * ((g / (1 + np.exp(-g)) * u) @ p["down_proj"][e])
    return out


def test_moe_ragged_and_dense_match_bruteforce_loop():
    n, e, k, norm, d, f = 12, 8, 3, False, 16, 8
    p = _moe_params(jax.random.key(n), d, e, f)
    x = jax.random.normal(jax.random.key(1), (n, d))
    want = _numpy_moe(p, x, k, norm)
    for impl in ("ragged", "dense"):
        y, _, _, _ = moe_mlp(p, x, top_k=k, norm_topk_prob=norm, impl=impl)
        np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=2e-5, err_msg=impl)


def test_ragged_dispatch_gradient_equals_dense_reference():
    # 5 tokens x 2 choices over 16 experts: most experts get no token (empty groups in ragged_dot).
    d, e, f, k, n = 16, 16, 8, 2, 5
    p = _moe_params(jax.random.key(3), d, e, f)
    x = jax.random.normal(jax.random.key(4), (n, d))
    cot = jax.random.normal(jax.random.key(5), (n, d))

    def loss(impl):
        def fn(p, x):
            y, aux, _, _ = moe.moe_mlp(p, x, top_k=k, norm_topk_prob=True, impl=impl)
            return jnp.sum(y * cot) + 0.1 * aux
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

    (v_r, g_r), (v_d, g_d) = loss("ragged")(p, x), loss("dense")(p, x)
    np.testing.assert_allclose(v_r, v_d, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g_r[0]["router"]).max()) > 0  # gates carry gradient to the router


def test_route_matches_numpy_softmax_topk():
    x = jax.random.normal(jax.random.key(0), (7, 6))
    w = jax.random.normal(jax.random.key(1), (6, 5))
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1)[:, :3]
    top = np.take_along_axis(probs, ids, -1)
    for norm, want in ((False, top), (True, top / top.sum(-1, keepdims=True))):
        r = moe.route(x, w, top_k=3, norm_topk_prob=norm)
        np.testing.assert_array_equal(np.asarray(r.ids), ids)
        np.testing.assert_allclose(np.asarray(r.weights), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(r.probs), probs, rtol=1e-5)
        assert r.ids.dtype == jnp.int32 and r.weights.dtype == jnp.float32


def test_routing_replay_uses_given_ids_with_recomputed_weights():
    d, e, f, k, n = 8, 6, 4, 2, 9
    p = _moe_params(jax.random.key(7), d, e, f)
    x = jax.random.normal(jax.random.key(8), (n, d))
    given = jnp.asarray(np.random.RandomState(0).rand(n, e).argsort(-1)[:, :k], jnp.int32)
    r = moe.route(x, p["router"], top_k=k, norm_topk_prob=True, routing=given)
    np.testing.assert_array_equal(np.asarray(r.ids), np.asarray(given))
    at_ids = np.take_along_axis(np.asarray(r.probs), np.asarray(given), -1)
    np.testing.assert_allclose(np.asarray(r.weights), at_ids / at_ids.sum(-1, keepdims=True), rtol=1e-6)
    y, _, ids, own = moe_mlp(p, x, top_k=k, norm_topk_prob=True, routing=given)
    y_dense, _, _, _ = moe_mlp(p, x, top_k=k, norm_topk_prob=True, routing=given, impl="dense")
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(given))
    # The router's own choice is still reported: the top-k of its probabilities (NumPy reference).
    own_ref = np.argsort(-np.asarray(r.probs), axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.sort(np.asarray(own), -1), np.sort(own_ref, -1))
    np.testing.assert_array_equal(np.asarray(r.own_ids), np.asarray(own))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_dense), atol=1e-5)
    # Replaying the model's own choice reproduces the unreplayed output exactly.
    y_free, _, free_ids, free_own = moe_mlp(p, x, top_k=k, norm_topk_prob=True)
    np.testing.assert_array_equal(np.asarray(free_ids), np.asarray(free_own))
    y_again, _, _, _ = moe_mlp(p, x, top_k=k, norm_topk_prob=True, routing=free_ids)
    np.testing.assert_array_equal(np.asarray(y_free), np.asarray(y_again))
    with pytest.raises(ValueError, match="routing must be"):
        moe.route(x, p["router"], top_k=k, norm_topk_prob=True, routing=given[:, :1])


def test_load_balancing_loss_matches_hf_and_masks_padding():
    n, e, k = 20, 8, 2
    logits = jax.random.normal(jax.random.key(2), (n, e)) * 2
    probs = jax.nn.softmax(logits)
    ids = jax.lax.top_k(probs, k)[1]
    got = moe.load_balancing_loss(probs, ids)
    want = load_balancing_loss_func((torch.tensor(np.asarray(logits)),), e, k)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    mask = (np.arange(n) < 13).astype(np.int32)
    want_masked = load_balancing_loss_func((torch.tensor(np.asarray(logits)),), e, k,
                                           attention_mask=torch.tensor(mask))
    np.testing.assert_allclose(float(moe.load_balancing_loss(probs, ids, mask=jnp.asarray(mask))),
                               float(want_masked), rtol=1e-5)


def test_moe_mlp_rejects_unknown_impl():
    p = _moe_params(jax.random.key(0), 4, 2, 2)
    with pytest.raises(ValueError, match="'sparse'"):
        moe.moe_mlp(p, jnp.ones((3, 4)), top_k=1, norm_topk_prob=False, impl="sparse")
