"""MoE block: router, ragged and grouped dispatch vs dense reference (forward and gradient), aux loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from ace.models import moe

# One compiled function per static configuration instead of op-by-op eager dispatch.
moe_mlp = jax.jit(moe.moe_mlp, static_argnames=("top_k", "norm_topk_prob", "impl", "tile"))


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


def test_moe_dispatches_match_bruteforce_loop():
    n, e, k, norm, d, f = 12, 8, 3, False, 16, 8
    p = _moe_params(jax.random.key(n), d, e, f)
    x = jax.random.normal(jax.random.key(1), (n, d))
    want = _numpy_moe(p, x, k, norm)
    for impl in ("ragged", "grouped", "dense", "auto"):
        y, _, _, _ = moe_mlp(p, x, top_k=k, norm_topk_prob=norm, impl=impl, tile=2)
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


def _experts_value_and_grads(fn, p, x, ids, weights, cot):
    """jit(value_and_grad) of sum(fn(...) * cot) w.r.t. x, the expert weights and the gate weights."""
    def loss(x, weights, gate, up, down):
        return jnp.sum(fn(x, ids, weights, gate, up, down) * cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(
        x, weights, p["gate_proj"], p["up_proj"], p["down_proj"])


# (tokens, experts, top-k, tile): groups of many tiles, tile 1, one tile larger than every group,
# more experts than pairs (most groups empty), k = E.
GROUPED_CASES = [(40, 4, 2, 4), (33, 8, 3, 5), (12, 8, 2, 1), (12, 8, 2, 64), (5, 16, 2, 2), (9, 3, 3, 2)]


@pytest.mark.parametrize("n,e,k,tile", GROUPED_CASES)
def test_grouped_dispatch_equals_dense_reference_in_value_and_gradient(n, e, k, tile):
    d, f = 16, 8
    p = _moe_params(jax.random.key(n + e), d, e, f)
    x = jax.random.normal(jax.random.key(1), (n, d))
    cot = jax.random.normal(jax.random.key(2), (n, d))
    r = moe.route(x, p["router"], top_k=k, norm_topk_prob=False)
    grouped = functools.partial(moe.grouped_experts, tile=tile)
    (v_g, g_g), (v_d, g_d) = (_experts_value_and_grads(fn, p, x, r.ids, r.weights, cot)
                              for fn in (grouped, moe.dense_experts))
    np.testing.assert_allclose(v_g, v_d, rtol=1e-5)
    for a, b, name in zip(g_g, g_d, ("x", "weights", "gate", "up", "down")):
        assert float(jnp.abs(b).max()) > 0, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=name)


def test_grouped_dispatch_with_skewed_routing_and_foreign_ids():
    # Replayed routing sends 30 of 32 pairs to expert 2: one group of 8 tiles, 5 experts empty.
    # Ids >= E (another expert shard's pairs in the expert-parallel kernel) must contribute nothing.
    n, e, k, d, f = 16, 7, 2, 8, 4
    p = _moe_params(jax.random.key(11), d, e, f)
    x = jax.random.normal(jax.random.key(12), (n, d))
    cot = jax.random.normal(jax.random.key(13), (n, d))
    ids = np.full((n, k), 2, np.int32)
    ids[:, 1] = np.where(np.arange(n) % 2, e, 2)  # every odd token's second pair is foreign
    ids[0] = [5, 2]
    ids[1, 0] = 0
    weights = jax.random.uniform(jax.random.key(14), (n, k))
    ids = jnp.asarray(ids)
    # Dense reference of the same pairs: drop the foreign ones (gate 0, any valid expert id).
    foreign = ids >= e
    def ref(x, ids_, w, g, u, dn):
        return moe.dense_experts(x, jnp.where(foreign, 0, ids_), jnp.where(foreign, 0.0, w), g, u, dn)

    (v_g, g_g), (v_d, g_d) = (_experts_value_and_grads(fn, p, x, ids, weights, cot)
                              for fn in (functools.partial(moe.grouped_experts, tile=4), ref))
    np.testing.assert_allclose(v_g, v_d, rtol=1e-5)
    for a, b in zip(g_g, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert float(jnp.abs(g_g[1][foreign]).max()) == 0.0  # foreign gates get no gradient


def test_grouped_tile_shrinks_for_few_pairs_and_caps_at_max():
    assert moe.grouped_tile(16, 8, 256) == 2  # decode-sized: at most the mean group
    assert moe.grouped_tile(256, 8, 256) == 32
    assert moe.grouped_tile(8192, 8, 256) == 256
    assert moe.grouped_tile(8192, 8, 64) == 64
    assert moe.grouped_tile(3, 8, 256) == 1
    with pytest.raises(ValueError, match="tile"):
        moe.grouped_experts(jnp.ones((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)),
                            jnp.ones((2, 4, 3)), jnp.ones((2, 4, 3)), jnp.ones((2, 3, 4)), tile=0)


def test_moe_mlp_grouped_and_auto_equal_dense_through_the_router():
    n, e, k, d, f = 64, 8, 2, 16, 8
    p = _moe_params(jax.random.key(21), d, e, f)
    x = jax.random.normal(jax.random.key(22), (n, d))
    cot = jax.random.normal(jax.random.key(23), (n, d))

    def grads(impl, tile=256):
        def fn(p, x):
            y, aux, _, _ = moe.moe_mlp(p, x, top_k=k, norm_topk_prob=True, impl=impl, tile=tile)
            return jnp.sum(y * cot) + 0.1 * aux
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(p, x)

    v_d, g_d = grads("dense")
    for impl, tile in (("grouped", 4), ("grouped", 256), ("auto", 256)):
        v, g = grads(impl, tile)
        np.testing.assert_allclose(v, v_d, rtol=1e-5, err_msg=impl)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_d)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=impl)


def test_auto_resolves_as_documented():
    from ace.models.autoselect import choose_moe

    assert choose_moe("auto", num_pairs=8192, num_experts=8, backend="cpu") == "grouped"
    assert choose_moe("auto", num_pairs=16, num_experts=8, backend="cpu") == "dense"  # decode-sized
    assert choose_moe("auto", num_pairs=8192, num_experts=8, backend="gpu") == "ragged"
    assert choose_moe("auto", num_pairs=16, num_experts=8, backend="tpu") == "ragged"
    assert choose_moe("ragged", num_pairs=8192, num_experts=8, backend="cpu") == "ragged"
    # On this (CPU) backend "auto" traces to the grouped kernel: no ragged_dot, no [E, N, F] einsum.
    p = _moe_params(jax.random.key(0), 16, 8, 8)

    def traced(n):
        return str(jax.make_jaxpr(lambda x: moe.moe_mlp(p, x, top_k=2, norm_topk_prob=True, impl="auto"))(
            jnp.ones((n, 16))))

    if jax.default_backend() == "cpu":
        many, few = traced(64), traced(4)  # 16 and 1 pairs per expert
        assert "ragged_dot" not in many and "sort" in many  # grouped: sorted, no ragged_dot
        assert "ragged_dot" not in few and "sort" not in few  # dense: no dispatch at all


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"fsdp": 2, "expert": 4}], ids=["fsdp8", "fsdp2xexpert4"])
def test_grouped_model_sharded_equals_unsharded_dense_in_value_and_gradient(mesh_shape):
    from ace.models import TINY, init_params
    from ace.models.logprobs import model_token_logprobs
    from ace.models.qwen3 import shard_params
    from ace.models.sharding import logical_to_sharding, make_mesh, use_mesh

    config = TINY.replace(num_layers=1, moe_tile=8)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p, tokens, positions, config):
        logp, aux = model_token_logprobs(p, config, tokens, positions, targets, chunk_size=6)
        return -jnp.mean(logp) + config.router_aux_loss_coef * aux.aux_loss

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=3)
    want_v, want_g = grad(params, tokens, positions, config.replace(moe_impl="dense"))
    mesh = make_mesh(mesh_shape)
    batch = logical_to_sharding(("batch", "length"), mesh)
    grouped = config.replace(moe_impl="grouped")
    with use_mesh(mesh):
        got_v, got_g = grad(shard_params(params, grouped, mesh), jax.device_put(tokens, batch),
                            jax.device_put(positions, batch), grouped)
        jaxpr = str(jax.make_jaxpr(lambda p: loss(p, tokens, positions, grouped))(params))
    assert ("shard_map" in jaxpr) == ("expert" in mesh_shape)  # expert-parallel kernel runs grouped
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-4)
