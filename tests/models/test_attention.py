"""Blockwise (flash-style) attention against the plain reference: values, gradients, sharding, memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ace.models.attention import attention_mask, blockwise_attention, reference_attention
from ace.models.sharding import make_mesh


def _qkv(key, b, t, s, h, kh, dh, dtype=jnp.float32):
    kq, kk, kv, kc = jax.random.split(key, 4)
    return (jax.random.normal(kq, (b, t, h, dh), dtype), jax.random.normal(kk, (b, s, kh, dh), dtype),
            jax.random.normal(kv, (b, s, kh, dh), dtype), jax.random.normal(kc, (b, t, h, dh), dtype))


def _numpy_attention(q, k, v, mask):
    """Softmax attention by a loop over heads in float64; query head h reads kv head h // (H / K)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for hi in range(h):
        scores = np.einsum("btd,bsd->bts", q[:, :, hi], k[:, :, hi // group]) / np.sqrt(dh)
        scores = np.where(mask, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, hi] = np.einsum("bts,bsd->btd", probs / probs.sum(-1, keepdims=True), v[:, :, hi // group])
    return out


def _case(name):
    """(q, k, v, cotangent, mask kwargs, block_q, block_kv) for one masking situation."""
    key = jax.random.key(7)
    if name == "causal_gqa":  # T = 20 is not a multiple of the 8-blocks
        b, t, s, h, kh = 2, 20, 20, 4, 2
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        kw = dict(q_positions=pos, kv_positions=pos, causal=True)
        return (*_qkv(key, b, t, s, h, kh, 8), kw, 8, 8)
    if name == "packed_with_padding":
        b, t, h, kh = 2, 19, 4, 1
        seg = jnp.array([[1] * 6 + [2] * 9 + [0] * 4, [3] * 12 + [4] * 5 + [0] * 2])
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        return (*_qkv(key, b, t, t, h, kh, 8), kw, 4, 8)
    if name == "cache_decode":  # queries at their positions, keys at cache slots; rows at different depths
        b, t, s, h, kh = 2, 3, 13, 4, 2
        qpos = jnp.array([[4, 5, 6], [9, 10, 11]])
        kw = dict(q_positions=qpos, kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)), causal=True)
        return (*_qkv(key, b, t, s, h, kh, 8), kw, 2, 4)
    if name == "bidirectional_segments":
        b, t, h, kh = 1, 10, 2, 2
        seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, causal=False)
        return (*_qkv(key, b, t, t, h, kh, 4), kw, 4, 3)
    raise KeyError(name)


@jax.jit(static_argnames=("impl", "causal", "block_q", "block_kv"))
def _value_and_grads(q, k, v, ct, *, impl, causal, block_q=0, block_kv=0, **mask_kw):
    if impl == "blockwise":
        fn = lambda q, k, v: blockwise_attention(q, k, v, **mask_kw, causal=causal, block_q=block_q,
                                                 block_kv=block_kv)
    else:
        fn = lambda q, k, v: reference_attention(q, k, v, **mask_kw, causal=causal)
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)


@pytest.mark.parametrize("name", ["causal_gqa", "packed_with_padding", "cache_decode", "bidirectional_segments"])
def test_blockwise_matches_reference_values_and_gradients(name):
    q, k, v, ct, kw, bq, bkv = _case(name)
    out, grads = _value_and_grads(q, k, v, ct, impl="blockwise", block_q=bq, block_kv=bkv, **kw)
    ref_out, ref_grads = _value_and_grads(q, k, v, ct, impl="reference", **kw)
    mask_kw = {key: val for key, val in kw.items() if key != "causal"}
    expected = _numpy_attention(q, k, v, np.asarray(attention_mask(**mask_kw, causal=kw["causal"])))
    np.testing.assert_allclose(ref_out, expected, atol=1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    for got, want, label in zip(grads, ref_grads, "qkv"):
        assert float(jnp.abs(want).max()) > 1e-3, f"d{label} should not vanish in this case"
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{label}")


def test_query_that_sees_no_key_gets_zeros_and_finite_gradients():
    # Position -1 precedes every cache slot: the first query has nothing to attend to.
    q, k, v, ct = _qkv(jax.random.key(1), 1, 2, 6, 2, 1, 4)
    kw = dict(q_positions=jnp.array([[-1, 3]]), kv_positions=jnp.arange(6)[None])
    out, grads = _value_and_grads(q, k, v, ct, impl="blockwise", causal=True, block_q=1, block_kv=4, **kw)
    ref_out, _ = _value_and_grads(q, k, v, ct, impl="reference", causal=True, **kw)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1], ref_out[0, 1], atol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    np.testing.assert_array_equal(grads[0][0, 0], 0.0)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, _ = _qkv(jax.random.key(2), 1, 16, 16, 2, 1, 8, jnp.bfloat16)
    pos = jnp.arange(16)[None]
    out = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos, block_q=4,
                                                      block_kv=4))(q, k, v)
    assert out.dtype == jnp.bfloat16
    expected = _numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                np.asarray(attention_mask(pos, pos, causal=True)))
    # bfloat16 keeps 8 mantissa bits: one rounding of the output (plus of p for the value product).
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=3e-2)


def test_sharded_over_eight_devices_equals_unsharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    b, t, h, kh = 4, 12, 4, 2
    q, k, v, ct = _qkv(jax.random.key(3), b, t, t, h, kh, 8)
    seg = jnp.array([[1] * 12, [1] * 5 + [2] * 7, [1] * 9 + [0] * 3, [2] * 12])
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))

    def loss(q, k, v, seg):
        out = blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                  kv_segment_ids=seg, block_q=4, block_kv=8)
        return jnp.sum(out * ct)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = jax.jit(grad_fn, in_shardings=(heads, heads, heads, rows))
    args = (jax.device_put(q, heads), jax.device_put(k, heads), jax.device_put(v, heads), jax.device_put(seg, rows))
    value, grads = sharded(*args)
    assert len(grads[0].sharding.device_set) == 8
    ref_value, ref_grads = jax.jit(grad_fn)(q, k, v, seg)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-5)


def _largest_intermediate(closed_jaxpr) -> int:
    """Element count of the largest value anywhere in a jaxpr, sub-jaxprs (scan, cond, vjp) included."""
    largest = 0

    def visit(jaxpr):
        nonlocal largest
        for var in list(jaxpr.invars) + list(jaxpr.constvars):
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(closed_jaxpr.jaxpr)
    return largest


def test_blockwise_gradient_holds_no_t_by_s_buffer():
    b, t, h, kh, dh, block = 1, 256, 4, 2, 8, 32
    q, k, v, ct = _qkv(jax.random.key(4), b, t, t, h, kh, dh)
    pos = jnp.arange(t)[None]

    def grads(fn):
        return jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)

    blockwise = grads(lambda q, k, v: blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos,
                                                          block_q=block, block_kv=block))
    reference = grads(lambda q, k, v: reference_attention(q, k, v, q_positions=pos, kv_positions=pos))
    # The check can fail: the reference gradient does hold [B, H, T, S] scores.
    assert _largest_intermediate(reference) >= b * h * t * t
    # Blockwise: at most one [B, H, block, block] tile or a linear [B, T, H, Dh]-sized array (x 2 for padding).
    assert _largest_intermediate(blockwise) <= 2 * b * h * max(block * block, t * dh)
    assert _largest_intermediate(blockwise) < b * h * t * t // 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q must be a positive int, got 0"),
    (dict(block_kv=2.0), "block_kv must be a positive int, got 2.0"),
    (dict(q_positions=jnp.zeros((2, 5), jnp.int32)), r"q_positions must be \[B, T\] = \(2, 6\)"),
    (dict(q_segment_ids=jnp.zeros((2, 6), jnp.int32)), "both q_segment_ids and kv_segment_ids or neither"),
    (dict(k=jnp.zeros((2, 6, 3, 8))), "query heads H=4 must be a multiple of kv heads K=3"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    args = dict(q=jnp.zeros((2, 6, 4, 8)), k=jnp.zeros((2, 6, 2, 8)), v=None, q_positions=jnp.zeros((2, 6), jnp.int32),
                kv_positions=jnp.zeros((2, 6), jnp.int32))
    args.update(kwargs)
    if args["v"] is None:
        args["v"] = args["k"]
    with pytest.raises(ValueError, match=match):
        blockwise_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_qwen3_blockwise_config_matches_reference_config_packed_and_decoding():
    from ace.models.configs import TINY_DENSE
    from ace.models.qwen3 import forward, init_cache, init_params

    reference = TINY_DENSE.replace(num_layers=1)
    blockwise = reference.replace(attention_impl="blockwise", attention_block_q=4, attention_block_kv=4)
    params = init_params(reference, jax.random.key(5))
    b, t = 2, 10
    tokens = jax.random.randint(jax.random.key(6), (b, t), 0, reference.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.array([[1] * 4 + [2] * 6, [1] * 8 + [0] * 2])
    run = jax.jit(forward, static_argnums=1)
    np.testing.assert_allclose(run(params, blockwise, tokens, positions, segment_ids=seg)[0],
                               run(params, reference, tokens, positions, segment_ids=seg)[0], atol=1e-4)
    # Prefill into a 12-slot cache, as the sampler does: keys sit at slots, queries at positions.
    got, got_aux = run(params, blockwise, tokens, positions, cache=init_cache(blockwise, b, 12))
    want, want_aux = run(params, reference, tokens, positions, cache=init_cache(reference, b, 12))
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(got_aux.cache.k, want_aux.cache.k, atol=1e-5)


def test_auto_attention_resolves_as_documented():
    from ace.models.autoselect import choose_attention

    def pick(backend, t, s, dtype=jnp.float32, cudnn_mask=True, dh=64):
        return choose_attention("auto", q_len=t, kv_len=s, dtype=dtype, head_dim=dh, cudnn_mask=cudnn_mask,
                                block_q=512, block_kv=512, backend=backend)

    assert pick("cpu", 256, 256) == ("reference", 512, 512)
    assert pick("cpu", 1, 8192) == ("reference", 512, 512)  # decoding: one query row
    assert pick("cpu", 512, 512) == ("blockwise", 128, 128)  # CPU tiles: 128 beats 512
    assert pick("tpu", 512, 512) == ("blockwise", 512, 512)
    assert pick("gpu", 4096, 4096, jnp.bfloat16) == ("cudnn", 512, 512)
    assert pick("gpu", 4096, 4096, jnp.float32) == ("blockwise", 512, 512)  # cuDNN wants 16-bit
    assert pick("gpu", 4096, 4096, jnp.bfloat16, cudnn_mask=False) == ("blockwise", 512, 512)
    assert pick("gpu", 4096, 4096, jnp.bfloat16, dh=256) == ("blockwise", 512, 512)
    explicit = choose_attention("reference", q_len=4096, kv_len=4096, dtype=jnp.float32, head_dim=64,
                                cudnn_mask=True, block_q=512, block_kv=512, backend="cpu")
    assert explicit == ("reference", 512, 512)


@pytest.mark.parametrize("t", [24, 300], ids=["short-reference", "long-blockwise"])
def test_auto_attention_equals_reference_in_value_and_gradient(t):
    from ace.models.attention import attention

    b, h, kh = 1, 2, 1
    q, k, v, ct = _qkv(jax.random.key(9), b, t, t, h, kh, 8)
    seg = jnp.concatenate([jnp.ones((b, t - t // 3), jnp.int32), 2 * jnp.ones((b, t // 3), jnp.int32)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)

    def run(impl):
        fn = lambda q, k, v: attention(q, k, v, impl=impl, **kw)
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    out, grads = jax.jit(run, static_argnums=0)("auto")
    ref_out, ref_grads = jax.jit(run, static_argnums=0)("reference")
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)
