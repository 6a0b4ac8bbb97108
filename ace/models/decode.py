"""One-token decode step: the fast path of KV-cache decoding, kept beside `qwen3.forward` (its reference).

`qwen3.forward(tokens[:, None], positions[:, None], cache=cache)` writes each layer's new key and
value into the cache, then attends over the whole cache through the general attention path. Per
generated token that costs, in every layer, a copy of the layer's cache (the scan's slice and the
scatter into it) and a transpose of it for the score product; on a small model those copies, not
the matmuls, are most of a decode step. `decode_step` computes the same numbers without them:

- each layer attends to the cache as it was (the slots before the token's position, read in place
  in the [B, K, S, Dh] layout) plus the token's own fresh key and value, in one softmax;
- the new keys and values of all layers leave the layer scan as a small [L, B, K, Dh] output and are
  written into the cache by one scatter after it, which XLA does in place inside the sampler's loop.

The result equals the reference (tests/models/test_decode.py): same logits, same cache, same routing.

Shapes: B batch, S cache slots, D hidden, H query heads, K kv heads, G = H / K, Dh head dim, V vocab,
L layers, k experts per token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ace.models.configs import ModelConfig
from ace.models.logprobs import output_weight
from ace.models.qwen3 import KVCache, ModelAux, mlp_block, out_proj, project_qkv, rms_norm
from ace.models.sharding import constrain


def cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     positions: jax.Array) -> jax.Array:
    """Attention of one query per row over the cache slots before its position and its own key.

    Equal to writing (k_new, v_new) at slot `positions` and attending causally over the cache.
    The cache is read in q's dtype (as `qwen3.forward` does); scores and softmax are float32, and
    probabilities are cast to q's dtype for the value product.

    Args:
      q: [B, H, Dh] queries. k_new, v_new: [B, K, Dh], the token's own key and value.
      k_cache, v_cache: [B, K, S, Dh]; slots >= positions are ignored.
      positions: [B] int, the token's position (= its slot).
    Returns:
      [B, H, Dh] in q's dtype.
    """
    b, h, dh = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, kv, h // kv, dh)  # query head h serves kv head h // G, as HF repeat_kv
    scale = jnp.float32(dh) ** -0.5
    old = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(s, dtype=positions.dtype)[None, :] < positions[:, None]  # [B, S]
    old = jnp.where(visible[:, None, None], old, -jnp.inf)
    own = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    top = jnp.maximum(jnp.max(old, axis=-1), own)  # finite: the own key is always visible
    p_old, p_own = jnp.exp(old - top[..., None]), jnp.exp(own - top)
    norm = jnp.sum(p_old, axis=-1) + p_own
    dtype = q.dtype
    out = jnp.einsum("bkgs,bksd->bkgd", (p_old / norm[..., None]).astype(dtype), v_cache.astype(dtype),
                     preferred_element_type=jnp.float32)
    out = out + (p_own / norm)[..., None] * v_new.astype(jnp.float32)[:, :, None]
    return out.reshape(b, h, dh).astype(dtype)


def decode_step(params: dict, config: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
                return_routing: bool = False) -> tuple[jax.Array, ModelAux]:
    """Feeds one token per row and returns the next-token logits, as `qwen3.forward` with a cache.

    Args:
      params: the nested-dict params. config: static model config.
      tokens: [B] int32 token ids. positions: [B] int32 their positions (= cache slots); positions
        past the cache's end are dropped from the cache write, as in `forward`.
      cache: KVCache [L, B, K, S, Dh] holding every slot before each row's position.
      return_routing: also return the routed expert ids (MoE only).
    Returns:
      (logits [B, V] float32, ModelAux with the updated cache, and routing / own_routing [L, B, k]
      int32 when requested on an MoE model).
    """
    c = config
    if tokens.ndim != 1 or positions.shape != tokens.shape:
        raise ValueError(f"decode_step: tokens and positions must both be [B], got {tokens.shape} and {positions.shape}")
    want = (c.num_layers, tokens.shape[0], c.num_kv_heads, c.head_dim)
    if cache.k.ndim != 5 or (cache.k.shape[:3] + cache.k.shape[4:]) != want or cache.v.shape != cache.k.shape:
        raise ValueError(f"decode_step: cache k/v must be [L, B, K, S, Dh] with (L, B, K, Dh) = {want}, "
                         f"got k {cache.k.shape} v {cache.v.shape}")
    b = tokens.shape[0]
    positions = positions.astype(jnp.int32)
    h = constrain(jnp.take(params["embed"]["embedding"], tokens, axis=0)[:, None], ("batch", "length", "act_embed"))
    token_mask = jnp.ones((b, 1), bool)

    def body(h, xs):
        layer, k_cache, v_cache = xs
        attn = layer["attn"]
        x = rms_norm(h, layer["input_norm"]["scale"], c.rms_norm_eps)
        q, k, v = project_qkv(c, attn, x, positions[:, None])
        o = cached_attention(q[:, 0], k[:, 0], v[:, 0], k_cache, v_cache, positions)
        h = h + out_proj(o[:, None], attn["o_proj"])
        h = constrain(h, ("batch", "length", "act_embed"))
        y, aux, ids = mlp_block(c, layer["mlp"], rms_norm(h, layer["post_attn_norm"]["scale"], c.rms_norm_eps),
                                None, token_mask)
        h = constrain(h + y, ("batch", "length", "act_embed"))
        return h, (aux, ids, k[:, 0], v[:, 0])

    h, (aux_losses, ids, new_k, new_v) = jax.lax.scan(body, h, (params["layers"], cache.k, cache.v))
    # One in-place scatter for all layers: slot `positions[b]` of row b gets its [L, K, Dh] keys/values.
    rows = jnp.arange(b)
    k = cache.k.at[:, rows, :, positions].set(jnp.swapaxes(new_k, 0, 1).astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, :, positions].set(jnp.swapaxes(new_v, 0, 1).astype(cache.v.dtype), mode="drop")
    h = rms_norm(h[:, 0], params["final_norm"]["scale"], c.rms_norm_eps)
    logits = jnp.einsum("bd,dv->bv", h, output_weight(params, c), preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "act_vocab"))
    routed = return_routing and c.is_moe
    # ids: [L, 2, B, 1, k], the experts used and the router's own choice per layer.
    aux = ModelAux(jnp.mean(aux_losses), ids[:, 0, :, 0] if routed else None, KVCache(k, v),
                   ids[:, 1, :, 0] if routed else None)
    return logits, aux
