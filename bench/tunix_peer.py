"""Tunix (google-tunix 0.1.7, JAX) as the peer of bench/model.py and bench/sampler.py: its Qwen3 /
Qwen3-MoE model and its `Sampler`, built for the same config and timed the same way.

Optional: installed by `pip install -e ".[bench]"`. `available()` says whether it is; the scripts
print "Tunix: not installed" and go on without it. Random weights of the same shapes (speed does
not depend on the values). On CPU Tunix's MoE layer takes its "vanilla dense routing" path (every
expert on every token); no other is offered there.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from timing import median_seconds  # bench/timing.py, beside this script


def available() -> bool:
    return importlib.util.find_spec("tunix") is not None


def _model(config):
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.qwen3 import model as tq

    if config.param_dtype != jnp.float32:
        raise ValueError(f"tunix_peer: the benchmarks run float32, got {config.dtype}")
    cfg = tq.ModelConfig(
        num_layers=config.num_layers, vocab_size=config.vocab_size, embed_dim=config.hidden_size,
        hidden_dim=config.moe_intermediate_size if config.is_moe else config.intermediate_size,
        num_heads=config.num_heads, head_dim=config.head_dim, num_kv_heads=config.num_kv_heads,
        rope_theta=int(config.rope_theta), norm_eps=config.rms_norm_eps,
        use_tied_embedding=config.tie_word_embeddings,
        num_experts=config.num_experts if config.is_moe else None,
        num_experts_per_tok=config.num_experts_per_tok if config.is_moe else None)
    return tq.Qwen3(cfg, rngs=nnx.Rngs(0))


def _causal_inputs(tokens: np.ndarray):
    import jax.numpy as jnp

    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    return jnp.asarray(tokens, jnp.int32), positions, mask


def forward_seconds(config, tokens: np.ndarray, reps: int) -> float:
    """Median seconds of one jitted forward of Tunix's model over tokens [B, T] (logits, no cache)."""
    import jax
    from flax import nnx

    model = _model(config)
    tok, pos, mask = _causal_inputs(tokens)

    @nnx.jit
    def fwd(model, tok, pos, mask):
        return model(tok, pos, None, mask)[0]

    return median_seconds(lambda: jax.block_until_ready(fwd(model, tok, pos, mask)), reps)


def fwd_bwd_seconds(config, tokens: np.ndarray, reps: int) -> float:
    """Median seconds of one jitted forward + backward (next-token cross-entropy, gradients of
    every parameter) of Tunix's model over tokens [B, T]."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    model = _model(config)
    tok, pos, mask = _causal_inputs(tokens)

    def loss_fn(model, tok, pos, mask):
        logits = model(tok, pos, None, mask)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]))

    @nnx.jit
    def step(model, tok, pos, mask):
        return nnx.value_and_grad(loss_fn)(model, tok, pos, mask)

    return median_seconds(lambda: jax.block_until_ready(step(model, tok, pos, mask)), reps)


class _IdTokenizer:
    """Prompts as space-separated token ids: what Tunix's `Sampler` (which takes strings) needs to be
    fed exact token ids. The eos id lies outside the vocabulary, so every row generates every token."""

    def __init__(self, vocab_size: int):
        self._eos = vocab_size + 1

    def encode(self, text: str, **_) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return 0


def decode_seconds(config, prompts: np.ndarray, new_tokens: int, reps: int) -> float:
    """Median seconds of Tunix's `Sampler` generating `new_tokens` per prompt of prompts [B, P] at
    temperature 1 with no top-k / top-p (Tunix then samples by `jax.random.categorical`, no sort)."""
    from tunix.generate import sampler as ts

    model = _model(config)
    batch, prompt_len = prompts.shape
    cache = ts.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=config.num_layers,
                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = ts.Sampler(model, _IdTokenizer(config.vocab_size), cache)
    texts = [" ".join(str(int(t)) for t in row) for row in prompts]

    def run():
        out = sampler(texts, max_generation_steps=new_tokens, max_prompt_length=prompt_len, temperature=1.0,
                      top_p=1.0, top_k=None, seed=0)
        assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens]

    return median_seconds(run, reps)
