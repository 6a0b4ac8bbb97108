"""The one-token decode step against its reference, `qwen3.forward` with a KV cache."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import TINY, TINY_DENSE, forward, init_cache, init_params
from ace.models.attention import reference_attention
from ace.models.decode import cached_attention, decode_step

fwd = jax.jit(forward, static_argnames=("config", "return_routing", "return_hidden", "remat"))
step = jax.jit(decode_step, static_argnames=("config", "return_routing"))


def _prefilled(config, params, lengths, slots):
    """A cache after a right-padded prefill of random prompts of `lengths`, and the full token rows."""
    b = len(lengths)
    tokens = jax.random.randint(jax.random.key(7), (b, max(lengths) + 4), 0, config.vocab_size)
    prompt = jnp.where(jnp.arange(max(lengths))[None] < jnp.asarray(lengths)[:, None], tokens[:, :max(lengths)], 0)
    positions = jnp.broadcast_to(jnp.arange(max(lengths), dtype=jnp.int32), prompt.shape)
    _, aux = fwd(params, config, prompt, positions, cache=init_cache(config, b, slots))
    return aux.cache, np.asarray(tokens)


@pytest.mark.parametrize("config", [TINY, TINY_DENSE], ids=["moe", "dense"])
def test_decode_steps_equal_forward_with_a_cache_in_logits_cache_and_routing(config):
    params = init_params(config, jax.random.key(0))
    lengths = np.array([5, 3, 7])
    cache, tokens = _prefilled(config, params, lengths, 16)
    ref_cache = cache
    for t in range(3):
        pos = jnp.asarray(lengths + t, jnp.int32)
        tok = jnp.asarray(tokens[np.arange(3), lengths + t], jnp.int32)
        want, want_aux = fwd(params, config, tok[:, None], pos[:, None], cache=ref_cache, return_routing=True)
        got, got_aux = step(params, config, tok, pos, cache, return_routing=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got_aux.cache.k), np.asarray(want_aux.cache.k), atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_aux.cache.v), np.asarray(want_aux.cache.v), atol=1e-6)
        if config.is_moe:
            np.testing.assert_array_equal(np.asarray(got_aux.routing), np.asarray(want_aux.routing[:, :, 0]))
            assert got_aux.routing.shape == (config.num_layers, 3, config.num_experts_per_tok)
        else:
            assert got_aux.routing is None
        cache, ref_cache = got_aux.cache, want_aux.cache


def test_decode_step_in_bfloat16_stays_close_to_the_reference():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    params = init_params(config, jax.random.key(1))
    lengths = np.array([4, 6])
    cache, tokens = _prefilled(config, params, lengths, 12)
    tok = jnp.asarray(tokens[np.arange(2), lengths], jnp.int32)
    pos = jnp.asarray(lengths, jnp.int32)
    want, _ = fwd(params, config, tok[:, None], pos[:, None], cache=cache)
    got, _ = step(params, config, tok, pos, cache)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), atol=0.05, rtol=0.05)


def test_cached_attention_equals_writing_the_cache_then_attending():
    b, h, kv, s, dh = 4, 6, 2, 10, 8
    ks = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(ks[0], (b, h, dh))
    k_new, v_new = jax.random.normal(ks[1], (b, kv, dh)), jax.random.normal(ks[2], (b, kv, dh))
    k_cache, v_cache = jax.random.normal(ks[3], (b, kv, s, dh)), jax.random.normal(ks[4], (b, kv, s, dh))
    positions = jnp.array([0, 3, 9, 5], jnp.int32)  # slot 0 sees only itself; slot 9 is the last
    got = cached_attention(q, k_new, v_new, k_cache, v_cache, positions)
    rows = jnp.arange(b)
    k_full = k_cache.at[rows, :, positions].set(k_new)
    v_full = v_cache.at[rows, :, positions].set(v_new)
    want = reference_attention(q[:, None], jnp.swapaxes(k_full, 1, 2), jnp.swapaxes(v_full, 1, 2),
                               q_positions=positions[:, None],
                               kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), atol=1e-5)


def test_positions_past_the_cache_are_dropped_from_the_write():
    params = init_params(TINY_DENSE, jax.random.key(2))
    cache, _ = _prefilled(TINY_DENSE, params, np.array([4, 4]), 6)
    _, aux = step(params, TINY_DENSE, jnp.array([1, 2], jnp.int32), jnp.array([5, 6], jnp.int32), cache)
    k = np.asarray(aux.cache.k)
    assert not np.allclose(k[:, 0, :, 5], np.asarray(cache.k)[:, 0, :, 5])  # in range: written
    np.testing.assert_array_equal(k[:, 1], np.asarray(cache.k)[:, 1])  # position 6 of 6 slots: dropped


def test_bad_shapes_raise_naming_them():
    params = init_params(TINY_DENSE, jax.random.key(0))
    cache = init_cache(TINY_DENSE, 2, 8)
    with pytest.raises(ValueError, match=r"tokens and positions must both be \[B\]"):
        decode_step(params, TINY_DENSE, jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32), cache)
    with pytest.raises(ValueError, match=r"cache k/v must be \[L, B, K, S, Dh\]"):
        decode_step(params, TINY_DENSE, jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32), cache)
