"""Grouped-query attention: the plain reference path and a memory-efficient blockwise path.

Both compute softmax(q k^T / sqrt(Dh) + mask) v with the same mask, defined by positions and segment
ids (`attention_mask`): query i sees key j when

    (not causal or kv_positions[j] <= q_positions[i]) and q_segment_ids[i] == kv_segment_ids[j].

Training passes positions = token index and the packing segment ids (0 = padding, which then only
sees padding); KV-cache decoding passes the query's position and kv_positions = slot index.

`reference_attention` materialises the [B, H, T, S] scores. `blockwise_attention` is the online
softmax of FlashAttention (Dao et al. 2022, Alg. 1; backward as in FlashAttention-2, Dao 2023,
Alg. 2) in pure JAX: a `lax.map` over query blocks around a `lax.scan` over key/value blocks, with
a custom VJP that recomputes each block's probabilities from the saved log-sum-exp, so neither pass
holds more than one [B, H, block_q, block_kv] tile of scores. GQA is done by grouping query heads,
never by repeating k/v.

Shapes: B batch, T queries, S keys, H query heads, K kv heads (H % K == 0), G = H / K, Dh head dim.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ace.models.autoselect import choose_attention

ATTENTION_IMPLS = ("reference", "blockwise", "cudnn", "auto")


def _check_shapes(name, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: expected q [B, T, H, Dh] and k, v [B, S, K, Dh] of equal shape, got "
                         f"q {q.shape} k {k.shape} v {v.shape}")
    b, t, h, dh = q.shape
    if k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"{name}: k/v batch and head_dim must match q's (B={b}, Dh={dh}), got k {k.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{name}: query heads H={h} must be a multiple of kv heads K={k.shape[2]}")
    s = k.shape[1]
    if q_positions.shape != (b, t):
        raise ValueError(f"{name}: q_positions must be [B, T] = {(b, t)}, got {q_positions.shape}")
    if kv_positions.shape != (b, s):
        raise ValueError(f"{name}: kv_positions must be [B, S] = {(b, s)}, got {kv_positions.shape}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"{name}: pass both q_segment_ids and kv_segment_ids or neither")
    if q_segment_ids is not None:
        if q_segment_ids.shape != (b, t):
            raise ValueError(f"{name}: q_segment_ids must be [B, T] = {(b, t)}, got {q_segment_ids.shape}")
        if kv_segment_ids.shape != (b, s):
            raise ValueError(f"{name}: kv_segment_ids must be [B, S] = {(b, s)}, got {kv_segment_ids.shape}")


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None, *, causal: bool) -> jax.Array:
    """Which keys each query sees.

    Args:
      q_positions: [B, T] int; kv_positions: [B, S] int (token index when training, slot when decoding).
      q_segment_ids, kv_segment_ids: optional [B, T] / [B, S] int packing ids; a query sees only keys of
        its own id.
      causal: also require kv_positions <= q_positions.
    Returns:
      [B, T, S] bool, True = visible.
    """
    b, t = q_positions.shape
    s = kv_positions.shape[1]
    mask = jnp.ones((b, t, s), bool)
    if causal:
        mask = kv_positions[:, None, :] <= q_positions[:, :, None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain GQA with an explicit mask. q [B, T, H, Dh]; k, v [B, S, K, Dh]; mask [B, T, S] bool.

    Scores and softmax are float32; probabilities are cast to v.dtype for the value product, as HF
    does. A row with no visible key gets the uniform mean of v (softmax of equal scores).
    Returns [B, T, H, Dh] in v.dtype.
    """
    b, t, h, dh = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, dh)  # query head h serves kv head h // G, as HF repeat_kv
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(dh))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                        kv_positions: jax.Array, q_segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, causal: bool = True) -> jax.Array:
    """Attention through the full [B, H, T, S] score matrix (the plain path, O(T*S) memory).

    Args: as `blockwise_attention`. Returns [B, T, H, Dh] in v.dtype.
    """
    _check_shapes("reference_attention", q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=causal)
    return masked_attention(q, k, v, mask)


def _tile_mask(causal, qpos, qseg, kpos, kseg, kvalid):
    """[B, bq, bkv] visibility of one tile; kvalid hides the keys added to pad S to whole blocks."""
    mask = (qseg[:, :, None] == kseg[:, None, :]) & kvalid[:, None, :]
    if causal:
        mask = mask & (kpos[:, None, :] <= qpos[:, :, None])
    return mask


def _scores(q_blk, k_blk, scale):
    """q_blk [B, bq, K, G, Dh], k_blk [B, bkv, K, Dh] -> [B, K, G, bq, bkv] float32."""
    return jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def _forward_blocks(causal, scale, qb, kb, vb, qpos, qseg, kpos, kseg, kvalid):
    """Online softmax. qb [nq, B, bq, K, G, Dh]; kb, vb [nkv, B, bkv, K, Dh]; ids [n, B, blk].

    Returns out [nq, B, bq, K, G, Dh] in v.dtype and lse [nq, B, K, G, bq] float32 (0 where a query
    sees no key; its probabilities are exp(-inf - lse) = 0 in the backward either way).
    """
    nq, b, bq, kh, g, dh = qb.shape

    def one_q_block(xs):
        q_blk, qp, qs = xs

        def step(carry, kv_xs):
            k_blk, v_blk, kp, ks, kval = kv_xs
            mask = _tile_mask(causal, qp, qs, kp, ks, kval)[:, None, None]

            def update(carry):
                m, l, acc = carry
                s = jnp.where(mask, _scores(q_blk, k_blk, scale), -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                # Until a visible key shows up m stays -inf; shifting by 0 keeps exp(-inf) = 0, not NaN.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk,
                                preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            # Tiles wholly above the causal diagonal (or across segments) are skipped, about half the work.
            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, dh), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, kpos, kseg, kvalid))
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return jnp.einsum("bkgqd->bqkgd", out).astype(vb.dtype), lse

    return jax.lax.map(one_q_block, (qb, qpos, qseg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(causal, scale, qb, kb, vb, qpos, qseg, kpos, kseg, kvalid):
    return _forward_blocks(causal, scale, qb, kb, vb, qpos, qseg, kpos, kseg, kvalid)[0]


def _flash_fwd(causal, scale, qb, kb, vb, qpos, qseg, kpos, kseg, kvalid):
    out, lse = _forward_blocks(causal, scale, qb, kb, vb, qpos, qseg, kpos, kseg, kvalid)
    return out, (qb, kb, vb, qpos, qseg, kpos, kseg, kvalid, out, lse)


def _flash_bwd(causal, scale, res, d_out):
    """FlashAttention-2 backward: outer scan over kv blocks, inner scan over q blocks.

    dk, dv of a kv block accumulate in the inner carry; dq [nq, ...] float32 is the outer carry, so
    the largest temporaries are one score tile and the linear-size q/k/v gradients.
    """
    qb, kb, vb, qpos, qseg, kpos, kseg, kvalid, out, lse = res
    # delta_i = sum_d dO_i * O_i, the softmax-Jacobian correction (FlashAttention-2, Alg. 2 line 4).
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dq0 = jnp.zeros(qb.shape, jnp.float32)

    def kv_step(dq, kv_xs):
        k_blk, v_blk, kp, ks, kval = kv_xs

        def q_step(carry, q_xs):
            dk, dv = carry
            q_blk, do_blk, lse_blk, delta_blk, qp, qs, dq_blk = q_xs
            mask = _tile_mask(causal, qp, qs, kp, ks, kval)[:, None, None]

            def update(args):
                dk, dv, dq_blk = args
                s = jnp.where(mask, _scores(q_blk, k_blk, scale), -jnp.inf)
                p = jnp.exp(s - lse_blk[..., None])
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_blk.dtype), do_blk,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_blk[..., None]) * scale
                dq_blk = dq_blk + jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k_blk.dtype), k_blk,
                                             preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q_blk.dtype), q_blk,
                                     preferred_element_type=jnp.float32)
                return dk, dv, dq_blk

            dk, dv, dq_blk = jax.lax.cond(jnp.any(mask), update, lambda a: a, (dk, dv, dq_blk))
            return (dk, dv), dq_blk

        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (qb, d_out, lse, delta, qpos, qseg, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_step, dq0, (kb, vb, kpos, kseg, kvalid))
    return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """[B, N, ...] -> [ceil(N / block), B, block, ...], padded with `fill` along N."""
    b, n = x.shape[:2]
    nb = -(-n // block)
    pad = [(0, 0), (0, nb * block - n)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(b, nb, block, *x.shape[2:]), 1, 0)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array,
                        kv_positions: jax.Array, q_segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, causal: bool = True, block_q: int = 512,
                        block_kv: int = 512) -> jax.Array:
    """Memory-efficient attention, equal to `reference_attention` up to float rounding.

    Forward and backward hold O(B*H*(T + S)*Dh) plus one [B, H, block_q, block_kv] float32 tile,
    never [T, S]. Differentiable in q, k, v (custom VJP); jit-, grad- and GSPMD-friendly.

    Args:
      q: [B, T, H, Dh] queries (float; bfloat16 inputs accumulate in float32).
      k, v: [B, S, K, Dh] keys and values, H % K == 0; query head h reads kv head h // (H / K).
      q_positions: [B, T] int, kv_positions: [B, S] int; with `causal` a query sees keys whose
        kv_position <= its q_position (token index in training, cache slot when decoding).
      q_segment_ids, kv_segment_ids: optional [B, T] / [B, S] int packing ids (0 = padding);
        a query sees only keys with its own id. Both or neither.
      causal: apply the position rule above.
      block_q, block_kv: tile sizes; T and S need not be multiples (they are padded internally).
    Returns:
      [B, T, H, Dh] in v.dtype. A query that sees no key at all gets zeros (the reference gives the
      uniform mean of v there; neither is meaningful, such rows are padding).
    """
    _check_shapes("blockwise_attention", q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"blockwise_attention: {name} must be a positive int, got {value!r}")
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    # Blocks larger than the sequence only add padding work.
    block_q, block_kv = min(block_q, t), min(block_kv, s)
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((b, t), jnp.int32)
        kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    qb = _to_blocks(q.reshape(b, t, kh, h // kh, dh), block_q, 0)
    kb, vb = _to_blocks(k, block_kv, 0), _to_blocks(v, block_kv, 0)
    qpos = _to_blocks(q_positions.astype(jnp.int32), block_q, 0)
    qseg = _to_blocks(q_segment_ids.astype(jnp.int32), block_q, 0)
    kpos = _to_blocks(kv_positions.astype(jnp.int32), block_kv, 0)
    kseg = _to_blocks(kv_segment_ids.astype(jnp.int32), block_kv, 0)
    kvalid = _to_blocks(jnp.ones((b, s), bool), block_kv, False)
    out = _flash(bool(causal), 1.0 / math.sqrt(dh), qb, kb, vb, qpos, qseg, kpos, kseg, kvalid)
    out = jnp.moveaxis(out, 0, 1).reshape(b, -1, h, dh)[:, :t]
    return out.astype(v.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, q_positions: jax.Array,
              kv_positions: jax.Array, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, causal: bool = True, block_q: int = 512,
              block_kv: int = 512, index_causal: bool = False) -> jax.Array:
    """Dispatches to the implementation named by `impl` (one of ATTENTION_IMPLS).

    "cudnn" calls `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only, fused, GQA
    native) when the mask is exactly the causal triangle over token indices (`index_causal=True`,
    no segment ids, T == S); packed or cache cases fall back to "blockwise", which cuDNN's mask
    types do not express without materialising a [T, S] mask. "auto" picks by backend, length and
    dtype (`ace.models.autoselect.choose_attention`; on CPU it may also shrink the blocks).
    Args and Returns: as `blockwise_attention`.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    plain_causal = index_causal and causal and q_segment_ids is None and q.shape[1] == k.shape[1]
    impl, block_q, block_kv = choose_attention(impl, q_len=q.shape[1], kv_len=k.shape[1], dtype=q.dtype,
                                               head_dim=q.shape[3], cudnn_mask=plain_causal,
                                               block_q=block_q, block_kv=block_kv)
    kw = dict(q_positions=q_positions, kv_positions=kv_positions, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, causal=causal)
    if impl == "reference":
        return reference_attention(q, k, v, **kw)
    if impl == "cudnn" and plain_causal:
        _check_shapes("attention", q, k, v, q_positions, kv_positions, None, None)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").astype(v.dtype)
    return blockwise_attention(q, k, v, **kw, block_q=block_q, block_kv=block_kv)
