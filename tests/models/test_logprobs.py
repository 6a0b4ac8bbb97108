"""Chunked per-token logprobs equal the naive log_softmax of full logits, without [B, T, V] buffers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import TINY, TINY_DENSE, forward, init_params
from ace.models.logprobs import model_token_logprobs, output_weight, token_logprobs


def _naive(hidden, w, targets, temperature):
    logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) / temperature
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - logz


@pytest.mark.parametrize("chunk_size,temperature", [(4, 1.0), (3, 0.7), (64, 1.3)])
def test_chunked_logprobs_equal_naive_log_softmax(chunk_size, temperature):
    b, t, d, v = 2, 10, 8, 50
    hidden = jax.random.normal(jax.random.key(0), (b, t, d))
    w = jax.random.normal(jax.random.key(1), (d, v))
    targets = jax.random.randint(jax.random.key(2), (b, t), 0, v)
    got = token_logprobs(hidden, w, targets, chunk_size=chunk_size, temperature=temperature)
    assert got.shape == (b, t) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _naive(hidden, w, targets, temperature), atol=1e-5, rtol=1e-5)


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval"):
                yield var.aval
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _all_avals(sub)


def test_chunked_logprobs_gradient_equals_naive_and_never_builds_full_logits():
    b, t, d, v, chunk = 2, 12, 8, 40, 4
    hidden = jax.random.normal(jax.random.key(3), (b, t, d))
    w = jax.random.normal(jax.random.key(4), (d, v))
    targets = jax.random.randint(jax.random.key(5), (b, t), 0, v)
    weights = jax.random.uniform(jax.random.key(6), (b, t))

    def chunked(h, w):
        return jnp.sum(weights * token_logprobs(h, w, targets, chunk_size=chunk))

    def naive(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
        return jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])

    g_c, g_n = jax.grad(chunked, (0, 1))(hidden, w), jax.grad(naive, (0, 1))(hidden, w)
    for a, n in zip(g_c, g_n):
        np.testing.assert_allclose(np.asarray(a), np.asarray(n), atol=1e-5, rtol=1e-5)
    jaxpr = jax.make_jaxpr(jax.grad(chunked, (0, 1)))(hidden, w).jaxpr
    biggest = max(int(np.prod(a.shape)) for a in _all_avals(jaxpr) if hasattr(a, "shape") and a.shape)
    assert biggest <= b * chunk * v, f"a buffer of {biggest} elements exceeds one chunk of logits"


@pytest.mark.parametrize("config", [TINY, TINY_DENSE], ids=["moe-untied", "dense-tied"])
def test_model_token_logprobs_equal_log_softmax_of_forward_logits(config):
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    targets = jnp.roll(tokens, -1, axis=1)
    logits, _ = jax.jit(forward, static_argnames="config")(params, config, tokens, positions)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.8, -1), targets[..., None], -1)[..., 0]
    got, aux = jax.jit(model_token_logprobs, static_argnames=("config", "chunk_size", "temperature"))(
        params, config, tokens, positions, targets, chunk_size=3, temperature=0.8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert (aux.routing is not None) == config.is_moe
    assert output_weight(params, config).shape == (config.hidden_size, config.vocab_size)


def test_token_logprobs_rejects_mismatched_shapes():
    h, w = jnp.zeros((2, 5, 4)), jnp.zeros((4, 7))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, w, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="out_weight"):
        token_logprobs(h, w.T, jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(h, w, jnp.zeros((2, 5), jnp.int32), chunk_size=0)


@pytest.mark.parametrize("chunk_size,temperature", [(4, 1.0), (3, 0.7)])
def test_chunked_entropy_equals_entropy_of_full_logits(chunk_size, temperature):
    b, t, d, v = 2, 10, 8, 50
    hidden = jax.random.normal(jax.random.key(10), (b, t, d)) * 2
    w = jax.random.normal(jax.random.key(11), (d, v))
    targets = jax.random.randint(jax.random.key(12), (b, t), 0, v)
    logp, entropy = token_logprobs(hidden, w, targets, chunk_size=chunk_size, temperature=temperature,
                                   return_entropy=True)
    logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) / temperature
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)  # H = -Σ p log p, from the full [B, T, V] distribution
    np.testing.assert_allclose(np.asarray(entropy), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logp), _naive(hidden, w, targets, temperature), atol=1e-5)

    # The gradient of the chunked mean entropy equals that of the full-logits entropy.
    def chunked(h):
        return jnp.mean(token_logprobs(h, w, targets, chunk_size=chunk_size, temperature=temperature,
                                       return_entropy=True)[1])

    def full(h):
        logp_all = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w) / temperature, -1)
        return jnp.mean(-jnp.sum(jnp.exp(logp_all) * logp_all, -1))

    np.testing.assert_allclose(np.asarray(jax.grad(chunked)(hidden)), np.asarray(jax.grad(full)(hidden)),
                               atol=1e-5, rtol=1e-5)
