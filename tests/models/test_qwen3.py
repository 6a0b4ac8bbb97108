"""Qwen3 decoder: NumPy reference parity, KV cache, packing, routing replay, NNX wrapper, validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ace.models import TINY, TINY_DENSE, Qwen3, forward, init_cache, init_params

fwd = jax.jit(forward, static_argnames=("config", "return_routing", "return_hidden", "remat"))


@pytest.fixture(scope="module")
def moe_params():
    return init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def dense_params():
    # Perturb the norm scales away from 1 so a transposed or skipped norm would show.
    p = init_params(TINY_DENSE, jax.random.key(1))
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape) if a.ndim <= 2
                        and a.shape[-1] in (16, 64) and a.shape[0] != 512 else a, p)


def _np_rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _np_rope(x, pos, theta):
    """x [T, N, Dh]; HF rotate_half convention."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None, :]
    rot = np.concatenate([-x[..., dh // 2:], x[..., : dh // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _silu(x):
    return x / (1 + np.exp(-x))


def _numpy_forward(params, c, tokens):
    """Plain float64 loops: one sequence at a time, head by head, token by token for the experts."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = []
    for seq in np.asarray(tokens):
        t = len(seq)
        h = p["embed"]["embedding"][seq]
        pos = np.arange(t, dtype=np.float64)
        for i in range(c.num_layers):
            a = jax.tree.map(lambda w: w[i], p["layers"])
            x = _np_rms(h, a["input_norm"]["scale"], c.rms_norm_eps)
            q = np.einsum("td,dhk->thk", x, a["attn"]["q_proj"])
            k = np.einsum("td,dhk->thk", x, a["attn"]["k_proj"])
            v = np.einsum("td,dhk->thk", x, a["attn"]["v_proj"])
            q = _np_rope(_np_rms(q, a["attn"]["q_norm"], c.rms_norm_eps), pos, c.rope_theta)
            k = _np_rope(_np_rms(k, a["attn"]["k_norm"], c.rms_norm_eps), pos, c.rope_theta)
            o = np.zeros_like(q)
            rep = c.num_heads // c.num_kv_heads
            for head in range(c.num_heads):
                s = q[:, head] @ k[:, head // rep].T / np.sqrt(c.head_dim)
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                o[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // rep]
            h = h + np.einsum("thk,hkd->td", o, a["attn"]["o_proj"])
            x = _np_rms(h, a["post_attn_norm"]["scale"], c.rms_norm_eps)
            m = a["mlp"]
            if c.is_moe:
                logits = x @ m["router"]
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                y = np.zeros_like(x)
                for n in range(t):
                    ids = np.argsort(-probs[n])[: c.num_experts_per_tok]
                    gates = probs[n, ids] / (probs[n, ids].sum() if c.norm_topk_prob else 1)
                    for e, g in zip(ids, gates):
                        y[n] += g * ((_silu(x[n] @ m["gate_proj"][e]) * (x[n] @ m["up_proj"][e]))
                                     @ m["down_proj"][e])
            else:
                y = (_silu(x @ m["gate_proj"]) * (x @ m["up_proj"])) @ m["down_proj"]
            h = h + y
        h = _np_rms(h, p["final_norm"]["scale"], c.rms_norm_eps)
        head = p["embed"]["embedding"].T if c.tie_word_embeddings else p["lm_head"]
        out.append(h @ head)
    return np.stack(out)


def _positions(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _tokens(seed, b, t, v=512):
    return jnp.asarray(np.random.RandomState(seed).randint(0, v, (b, t)), jnp.int32)


@pytest.mark.parametrize("which", ["moe", "dense"])
def test_forward_matches_numpy_reference(which, moe_params, dense_params):
    config, params = (TINY, moe_params) if which == "moe" else (TINY_DENSE, dense_params)
    tokens = _tokens(0, 2, 8)
    logits, aux = fwd(params, config, tokens, _positions(2, 8))
    assert logits.shape == (2, 8, config.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _numpy_forward(params, config, tokens), atol=2e-5)
    assert (float(aux.aux_loss) > 0) == config.is_moe


def test_kv_cache_right_padded_prefill_then_decode_matches_full_forward(moe_params):
    # Row 0: prompt of 5, row 1: prompt of 3 right-padded to 5; then 3 decode steps each.
    full = _tokens(1, 2, 8)
    lengths = np.array([5, 3])
    want = np.asarray(fwd(moe_params, TINY, full, _positions(2, 8))[0])
    prompt = np.asarray(full[:, :5]).copy()
    prompt[1, 3:] = 0  # padding tokens: their cache slots get overwritten by the decode steps
    cache = init_cache(TINY, 2, 16)
    logits, aux = fwd(moe_params, TINY, jnp.asarray(prompt), _positions(2, 5), cache=cache)
    np.testing.assert_allclose(np.asarray(logits)[0], want[0, :5], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1, :3], want[1, :3], atol=1e-5)
    cache = aux.cache
    for step in range(3):
        pos = lengths + step
        tok = np.asarray(full)[np.arange(2), pos][:, None]
        logits, aux = fwd(moe_params, TINY, jnp.asarray(tok), jnp.asarray(pos[:, None], jnp.int32), cache=cache)
        cache = aux.cache
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[np.arange(2), pos], atol=1e-5)


def test_packed_segments_equal_separate_sequences(moe_params):
    a, b = _tokens(2, 1, 5), _tokens(3, 1, 3)
    packed = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)], 0)
    seg = jnp.asarray([[1] * 5 + [2] * 3, [1] * 3 + [2] * 5], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(3)), list(range(3)) + list(range(5))], jnp.int32)
    got = np.asarray(fwd(moe_params, TINY, packed, pos, segment_ids=seg)[0])
    # Alone, each sequence is a prefix of a row; causality makes the tail irrelevant.
    alone = np.asarray(fwd(moe_params, TINY, packed[::-1], _positions(2, 8))[0])
    np.testing.assert_allclose(got[0, :5], alone[1, :5], atol=1e-5)
    np.testing.assert_allclose(got[0, 5:], alone[0, :3], atol=1e-5)
    np.testing.assert_allclose(got[1, :3], alone[0, :3], atol=1e-5)
    np.testing.assert_allclose(got[1, 3:], alone[1, :5], atol=1e-5)


def test_routing_replay_reproduces_logits_and_given_routing_changes_them(moe_params):
    tokens, pos = _tokens(4, 2, 8), _positions(2, 8)
    logits, aux = fwd(moe_params, TINY, tokens, pos, return_routing=True)
    k, e = TINY.num_experts_per_tok, TINY.num_experts
    assert aux.routing.shape == (TINY.num_layers, 2, 8, k) and aux.routing.dtype == jnp.int32
    replay_logits, replay_aux = fwd(moe_params, TINY, tokens, pos, routing=aux.routing, return_routing=True)
    np.testing.assert_allclose(np.asarray(replay_logits), np.asarray(logits), atol=1e-6)
    other = (aux.routing + 1) % e  # shifting every id keeps the k ids of a token distinct
    other_logits, other_aux = fwd(moe_params, TINY, tokens, pos, routing=other, return_routing=True)
    np.testing.assert_array_equal(np.asarray(other_aux.routing), np.asarray(other))
    # Layer 0 routes the embeddings, which no replay changes: its own choice is the free routing.
    np.testing.assert_array_equal(np.asarray(other_aux.own_routing[0]), np.asarray(aux.routing[0]))
    np.testing.assert_array_equal(np.asarray(aux.own_routing), np.asarray(aux.routing))
    assert float(jnp.abs(other_logits - logits).max()) > 1e-4


def test_nnx_module_state_is_the_params_tree(moe_params):
    model = Qwen3(TINY, params=moe_params)
    pure = nnx.split(model)[1].to_pure_dict()
    assert jax.tree.structure(pure) == jax.tree.structure(moe_params)
    for x, y in zip(jax.tree.leaves(pure), jax.tree.leaves(moe_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = Qwen3(TINY_DENSE, rngs=nnx.Rngs(params=0))
    assert "lm_head" not in fresh.params()  # tied embeddings
    assert jax.tree.structure(fresh.params()) == jax.tree.structure(init_params(TINY_DENSE, jax.random.key(0)))


def test_param_shapes_follow_the_contract(moe_params):
    c = TINY
    L, D, H, K, Dh, E, Fe = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                             c.num_experts, c.moe_intermediate_size)
    shapes = jax.tree.map(lambda a: a.shape, moe_params)
    assert shapes["embed"]["embedding"] == (c.vocab_size, D) and shapes["lm_head"] == (D, c.vocab_size)
    assert shapes["layers"]["attn"]["q_proj"] == (L, D, H, Dh)
    assert shapes["layers"]["attn"]["k_proj"] == (L, D, K, Dh)
    assert shapes["layers"]["attn"]["o_proj"] == (L, H, Dh, D)
    assert shapes["layers"]["mlp"] == {"router": (L, D, E), "gate_proj": (L, E, D, Fe),
                                       "up_proj": (L, E, D, Fe), "down_proj": (L, E, Fe, D)}
    assert shapes["final_norm"]["scale"] == (D,)


def test_forward_rejects_bad_shapes_with_named_arguments(moe_params, dense_params):
    tokens, pos = _tokens(0, 2, 4), _positions(2, 4)
    with pytest.raises(ValueError, match="positions"):
        forward(moe_params, TINY, tokens, pos[:, :3])
    with pytest.raises(ValueError, match="routing"):
        forward(moe_params, TINY, tokens, pos, routing=jnp.zeros((2, 2, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="dense model"):
        forward(dense_params, TINY_DENSE, tokens, pos, routing=jnp.zeros((2, 2, 4, 2), jnp.int32))
    with pytest.raises(ValueError, match="cache"):
        forward(moe_params, TINY, tokens, pos, cache=init_cache(TINY, 3, 8))
    with pytest.raises(ValueError, match="tokens must be"):
        forward(moe_params, TINY, tokens[0], pos[0])
