"""Qwen3 decoder (dense and MoE) as a pure function over a nested-dict params pytree.

One code path from the tiny CPU model to Qwen3-30B-A3B: layers are stacked on a leading axis L and
run by `jax.lax.scan`, so 48 layers compile once. Conventions follow HF transformers Qwen3 /
Qwen3-MoE: RMSNorm scale multiplies directly (init 1), QK-norm over head_dim per head before RoPE,
"rotate_half" RoPE, softmax scale 1/sqrt(head_dim), no biases.

Shapes: B batch, T length, S cache slots, D hidden, H query heads, K kv heads, Dh head dim,
F dense MLP hidden, E experts, Fe expert hidden, k experts per token, V vocab, L layers.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ace.models import moe
from ace.models.attention import attention
from ace.models.configs import ModelConfig
from ace.models.sharding import RULES, constrain, logical_to_sharding

INIT_STD = 0.02  # HF `initializer_range` default for Qwen3


class KVCache(NamedTuple):
    """Per-layer keys and values by slot; slot index == token position. k, v: [L, B, K, S, Dh].

    Heads before slots so that a decode step's score and value products (`ace.models.decode`) read
    each layer's cache in place, as batched [S, Dh] matrices, with no per-step transpose."""

    k: jax.Array
    v: jax.Array


class ModelAux(NamedTuple):
    """Side outputs of `forward`.

    aux_loss: scalar float32, the layer mean of the unscaled load-balancing loss (0 for dense models);
      the caller multiplies by `config.router_aux_loss_coef`.
    routing: [L, B, T, k] int32 routed expert ids (the replayed ones under replay) when requested on
      an MoE model, else None.
    cache: the updated KVCache when one was passed, else None.
    own_routing: [L, B, T, k] int32 the experts each router would pick by itself, when routing was
      requested; equal to `routing` unless routing was replayed.
    """

    aux_loss: jax.Array
    routing: jax.Array | None
    cache: KVCache | None
    own_routing: jax.Array | None = None


def _param_spec(config: ModelConfig) -> dict:
    """Tree of (shape, logical axes, init) per param; the single source for shapes and shardings."""
    c = config
    L, D, H, K, Dh, V = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    if c.is_moe:
        E, Fe = c.num_experts, c.moe_intermediate_size
        mlp = {
            "router": ((L, D, E), ("layers", "embed", "router_experts"), "normal"),
            "gate_proj": ((L, E, D, Fe), ("layers", "experts", "expert_embed", "expert_mlp"), "normal"),
            "up_proj": ((L, E, D, Fe), ("layers", "experts", "expert_embed", "expert_mlp"), "normal"),
            "down_proj": ((L, E, Fe, D), ("layers", "experts", "expert_mlp", "expert_embed"), "normal"),
        }
    else:
        F = c.intermediate_size
        mlp = {
            "gate_proj": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "up_proj": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "down_proj": ((L, F, D), ("layers", "mlp", "embed"), "normal"),
        }
    spec = {
        "embed": {"embedding": ((V, D), ("vocab", "embed"), "normal")},
        "layers": {
            "input_norm": {"scale": ((L, D), ("layers", "norm"), "ones")},
            "attn": {
                "q_proj": ((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal"),
                "k_proj": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
                "v_proj": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
                "o_proj": ((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "normal"),
                "q_norm": ((L, Dh), ("layers", "norm"), "ones"),
                "k_norm": ((L, Dh), ("layers", "norm"), "ones"),
            },
            "post_attn_norm": {"scale": ((L, D), ("layers", "norm"), "ones")},
            "mlp": mlp,
        },
        "final_norm": {"scale": ((D,), ("norm",), "ones")},
    }
    if not c.tie_word_embeddings:
        spec["lm_head"] = ((D, V), ("embed", "vocab"), "normal")
    return spec


def _is_spec_leaf(x) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], str)


def param_logical_axes(config: ModelConfig) -> dict:
    """The params tree with a tuple of logical axis names per leaf (see `sharding.RULES`)."""
    return jax.tree.map(lambda s: s[1], _param_spec(config), is_leaf=_is_spec_leaf)


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random params: weights ~ N(0, 0.02^2), norm scales 1, in `config.dtype`."""
    return _init_params_jit(config, key)


@jax.jit(static_argnums=0)
def _init_params_jit(config: ModelConfig, key: jax.Array) -> dict:
    spec = _param_spec(config)
    leaves, treedef = jax.tree.flatten(spec, is_leaf=_is_spec_leaf)
    keys = jax.random.split(key, len(leaves))
    dtype = config.param_dtype

    def make(leaf, k):
        shape, _, init = leaf
        if init == "ones":
            return jnp.ones(shape, dtype)
        return (INIT_STD * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(leaf, k) for leaf, k in zip(leaves, keys)])


def abstract_params(config: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct` per param, without allocating anything."""
    return jax.eval_shape(lambda k: _init_params_jit(config, k), jax.random.key(0))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, Any] = RULES, *, drop_indivisible: bool = True) -> dict:
    """The params tree of `config` with a `NamedSharding` per leaf (no allocation: shapes via eval_shape).

    With `drop_indivisible`, a mesh axis that does not divide a dimension is dropped for that
    dimension (see `ace.models.sharding.logical_to_spec`), so every sharding is valid. Without it,
    every leaf takes exactly the mesh axes the rules ask for, valid or not:
    `ace.train.dry_run.strict_param_shardings` reports the invalid ones, since on the cluster that
    leaf would quietly be replicated. `mesh` may be abstract (shard shapes without devices).
    """
    shapes = abstract_params(config)
    axes = param_logical_axes(config)
    return jax.tree.map(lambda ax, s: logical_to_sharding(ax, mesh, rules, s.shape if drop_indivisible else None),
                        axes, shapes, is_leaf=_is_axes)


def shard_params(params: dict, config: ModelConfig, mesh: jax.sharding.Mesh,
                 rules: Mapping[str, Any] = RULES) -> dict:
    """Places `params` onto `mesh` with the shardings of `param_shardings`."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty KV cache with `max_len` slots per row: k, v [L, B, K, S, Dh] zeros."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch and max_len must be positive, got batch={batch} max_len={max_len}")
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF Qwen3RMSNorm: normalise in float32, cast back, then multiply by scale. x [..., N], scale [N]."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF "rotate_half" RoPE. x [B, T, N, Dh], positions [B, T] int32 -> [B, T, N, Dh] in x.dtype."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def project_qkv(config: ModelConfig, attn: dict, x: jax.Array, positions: jax.Array):
    """One layer's queries, keys and values of the normed input x [B, T, D] at positions [B, T]:
    q [B, T, H, Dh], k and v [B, T, K, Dh], with QK-norm and RoPE applied to q and k."""
    c = config
    b, t, d = x.shape
    # Matmuls over [B*T, D] rows, here and in every projection below: with B and T kept apart, the
    # weight gradient contracts two axes, which XLA:CPU runs ~2.5x slower than one GEMM.
    rows = x.reshape(b * t, d)
    q = jnp.einsum("nd,dhk->nhk", rows, attn["q_proj"]).reshape(b, t, c.num_heads, c.head_dim)
    k = jnp.einsum("nd,dhk->nhk", rows, attn["k_proj"]).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = jnp.einsum("nd,dhk->nhk", rows, attn["v_proj"]).reshape(b, t, c.num_kv_heads, c.head_dim)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    q = apply_rope(rms_norm(q, attn["q_norm"], c.rms_norm_eps), positions, c.rope_theta)
    k = apply_rope(rms_norm(k, attn["k_norm"], c.rms_norm_eps), positions, c.rope_theta)
    return q, k, v


def out_proj(o: jax.Array, o_proj: jax.Array) -> jax.Array:
    """The attention output projection: o [B, T, H, Dh] @ o_proj [H, Dh, D] -> [B, T, D], over
    [B*T] rows (see `project_qkv`)."""
    b, t, h, dh = o.shape
    return jnp.einsum("nhk,hkd->nd", o.reshape(b * t, h, dh), o_proj).reshape(b, t, -1)


def mlp_block(config: ModelConfig, mlp: dict, x: jax.Array, routing: jax.Array | None, token_mask: jax.Array):
    """One layer's MLP (dense or MoE) of the normed input x [B, T, D].

    routing: optional [B, T, k] expert ids to replay (MoE). token_mask: [B, T] bool, real tokens (aux loss).
    Returns (y [B, T, D], unscaled aux loss scalar float32 (0 when dense), ids [2, B, T, k] int32 the
    experts used and the router's own choice, or None when dense).
    """
    c = config
    b, t, d = x.shape
    if not c.is_moe:
        rows = x.reshape(b * t, d)  # one-contraction GEMMs, see `project_qkv`
        y = (jax.nn.silu(rows @ mlp["gate_proj"]) * (rows @ mlp["up_proj"])) @ mlp["down_proj"]
        return y.reshape(b, t, d), jnp.zeros((), jnp.float32), None
    flat_routing = None if routing is None else routing.reshape(b * t, -1)
    y, aux, ids, own_ids = moe.moe_mlp(mlp, x.reshape(b * t, d), top_k=c.num_experts_per_tok,
                                       norm_topk_prob=c.norm_topk_prob, impl=c.moe_impl, tile=c.moe_tile,
                                       routing=flat_routing, mask=token_mask.reshape(-1))
    return y.reshape(b, t, d), aux, jnp.stack([ids.reshape(b, t, -1), own_ids.reshape(b, t, -1)])


def _decoder_layer(config: ModelConfig, h, layer, positions, masking, token_mask, routing, cache_kv):
    """One pre-norm block: h + attn(norm(h)), then + mlp(norm(.)). h [B, T, D].

    masking: the `ace.models.attention.attention` mask inputs (positions, segment ids, index_causal).
    """
    c = config
    b = h.shape[0]
    attn = layer["attn"]
    q, k, v = project_qkv(c, attn, rms_norm(h, layer["input_norm"]["scale"], c.rms_norm_eps), positions)
    new_kv = None
    if cache_kv is not None:
        ck, cv = cache_kv  # [B, K, S, Dh]
        rows = jnp.arange(b)[:, None]
        # Slot == position, per row; out-of-range positions are dropped rather than clamped.
        ck = ck.at[rows, :, positions].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[rows, :, positions].set(v.astype(cv.dtype), mode="drop")
        new_kv = (ck, cv)
        k, v = jnp.swapaxes(ck, 1, 2).astype(q.dtype), jnp.swapaxes(cv, 1, 2).astype(q.dtype)
    o = attention(q, k, v, impl=c.attention_impl, causal=True, block_q=c.attention_block_q,
                  block_kv=c.attention_block_kv, **masking)
    h = h + out_proj(o, attn["o_proj"])
    h = constrain(h, ("batch", "length", "act_embed"))

    x = rms_norm(h, layer["post_attn_norm"]["scale"], c.rms_norm_eps)
    y, aux, ids = mlp_block(c, layer["mlp"], x, routing, token_mask)
    h = constrain(h + y, ("batch", "length", "act_embed"))
    return h, aux, ids, new_kv


def _check_inputs(config, tokens, positions, segment_ids, cache, routing):
    if tokens.ndim != 2:
        raise ValueError(f"forward: tokens must be [B, T], got shape {tokens.shape}")
    if positions.shape != tokens.shape:
        raise ValueError(f"forward: positions must match tokens {tokens.shape}, got {positions.shape}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"forward: segment_ids must match tokens {tokens.shape}, got {segment_ids.shape}")
    if cache is not None:
        if segment_ids is not None:
            raise ValueError("forward: segment_ids (packing) and cache (decoding) cannot be combined")
        want = (config.num_layers, tokens.shape[0], config.num_kv_heads, config.head_dim)
        got = (cache.k.shape[0], cache.k.shape[1], cache.k.shape[2], cache.k.shape[4]) if cache.k.ndim == 5 else None
        if got != want or cache.v.shape != cache.k.shape:
            raise ValueError(f"forward: cache k/v must be [L, B, K, S, Dh] with (L, B, K, Dh) = {want}, "
                             f"got k {cache.k.shape} v {cache.v.shape}")
    if routing is not None:
        if not config.is_moe:
            raise ValueError("forward: routing was given but the config is a dense model (num_experts=0)")
        want = (config.num_layers, *tokens.shape, config.num_experts_per_tok)
        if routing.shape != want:
            raise ValueError(f"forward: routing must be [L, B, T, k] = {want}, got {routing.shape}")


def forward(params: dict, config: ModelConfig, tokens: jax.Array, positions: jax.Array, *,
            segment_ids: jax.Array | None = None, cache: KVCache | None = None,
            routing: jax.Array | None = None, return_routing: bool = False, return_hidden: bool = False,
            remat: bool = False) -> tuple[jax.Array, ModelAux]:
    """Runs the decoder.

    Args:
      params: the nested-dict params (see `init_params`).
      config: static model config.
      tokens: [B, T] int32 token ids.
      positions: [B, T] int32 RoPE positions (distinct within a row when a cache is used).
      segment_ids: optional [B, T] int32 for packed sequences: a token attends only to earlier tokens
        (by index in T) of the same segment id. Id 0 marks padding, excluded from the aux loss.
      cache: optional KVCache [L, B, K, S, Dh]: each token's k/v is written at slot = its position and
        each query attends to slots <= its own position, so right-padded prefill then one-token decode
        steps are exact.
      routing: optional [L, B, T, k] int32 expert ids to replay (MoE only).
      return_routing: also return the routed expert ids [L, B, T, k] (MoE only; None for dense).
      return_hidden: return the final-normed hidden states [B, T, D] instead of logits.
      remat: recompute each layer in the backward pass (saves activation memory at scale).
    Returns:
      (logits [B, T, V] float32, or hidden [B, T, D] in config.dtype, ModelAux).
    """
    c = config
    _check_inputs(c, tokens, positions, segment_ids, cache, routing)
    b, t = tokens.shape
    positions = positions.astype(jnp.int32)
    h = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    h = constrain(h, ("batch", "length", "act_embed"))

    if cache is not None:
        # A query sees the cache slots up to its own position (slot == position).
        slots = jnp.broadcast_to(jnp.arange(cache.k.shape[3], dtype=jnp.int32), (b, cache.k.shape[3]))
        masking = dict(q_positions=positions, kv_positions=slots, index_causal=False)
        token_mask = jnp.ones((b, t), bool)
    else:
        # Causal by index in T (not by RoPE position), within a segment when packed.
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        masking = dict(q_positions=idx, kv_positions=idx, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                       index_causal=segment_ids is None)
        token_mask = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0

    def body(carry, xs):
        layer, layer_routing, layer_kv = xs
        out, aux, ids, new_kv = _decoder_layer(c, carry, layer, positions, masking, token_mask, layer_routing,
                                               layer_kv)
        return out, (aux, ids, new_kv)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    cache_xs = None if cache is None else (cache.k, cache.v)
    h, (aux_losses, ids, new_kv) = jax.lax.scan(body, h, (params["layers"], routing, cache_xs))
    h = rms_norm(h, params["final_norm"]["scale"], c.rms_norm_eps)

    new_cache = None if new_kv is None else KVCache(*new_kv)
    want = return_routing and c.is_moe
    # ids: [L, 2, B, T, k], the experts used and the router's own choice per layer.
    aux = ModelAux(jnp.mean(aux_losses), ids[:, 0] if want else None, new_cache, ids[:, 1] if want else None)
    if return_hidden:
        return h, aux
    if c.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h, params["embed"]["embedding"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", h, params["lm_head"], preferred_element_type=jnp.float32)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab")), aux


class _ParamTree(nnx.Module):
    """NNX node mirroring one level of the params dict, so `nnx.state(...).to_pure_dict()` returns it."""

    def __init__(self, tree: dict):
        for name, value in tree.items():
            setattr(self, name, _ParamTree(value) if isinstance(value, dict) else nnx.Param(value))


class Qwen3(nnx.Module):
    """Flax NNX wrapper over the same params: `nnx.split(model)[1].to_pure_dict()` is the params dict."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if (rngs is None) == (params is None):
            raise ValueError("Qwen3: pass exactly one of rngs (random init) or params (existing weights)")
        self.config = config
        tree = init_params(config, rngs.params()) if params is None else params
        for name, value in tree.items():
            setattr(self, name, _ParamTree(value) if isinstance(value, dict) else nnx.Param(value))

    def params(self) -> dict:
        """The plain nested-dict params."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    def __call__(self, tokens: jax.Array, positions: jax.Array, **kwargs) -> tuple[jax.Array, ModelAux]:
        """`forward(self.params(), self.config, tokens, positions, **kwargs)`."""
        return forward(self.params(), self.config, tokens, positions, **kwargs)
