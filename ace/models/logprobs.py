"""Per-token logprobs of given tokens, chunked over the sequence so [B, T, V] logits never exist.

Each chunk's logits are computed inside `jax.checkpoint` within a `lax.scan`, so the forward holds
one [B, C, V] chunk at a time and the backward recomputes it instead of storing it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ace.models import qwen3
from ace.models.configs import ModelConfig


def output_weight(params: dict, config: ModelConfig) -> jax.Array:
    """The LM head as [D, V]: `lm_head`, or the transposed embedding when embeddings are tied."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]


def token_logprobs(hidden: jax.Array, out_weight: jax.Array, targets: jax.Array, *, chunk_size: int = 512,
                   temperature: float = 1.0, return_entropy: bool = False):
    """log_softmax(hidden @ out_weight / temperature)[target] per position, computed chunk by chunk.

    With `return_entropy`, also the entropy of each position's distribution at that temperature,
    H = −Σ p·log p with p = softmax(logits / temperature), from the same chunk of logits
    (so it costs no second pass and never holds [B, T, V] either); it is differentiable, for an
    entropy bonus.

    Args:
      hidden: [B, T, D] final-normed hidden states.
      out_weight: [D, V] output projection.
      targets: [B, T] int token ids whose logprob is wanted (e.g. tokens shifted left by one).
      chunk_size: positions per chunk; T is padded up to a multiple of it.
      temperature: logits are divided by it (the sampler's temperature, for behaviour logprobs).
    Returns:
      [B, T] float32 logprobs, or (logprobs, entropy) both [B, T] float32 with `return_entropy`.
    """
    if hidden.ndim != 3:
        raise ValueError(f"token_logprobs: hidden must be [B, T, D], got {hidden.shape}")
    b, t, d = hidden.shape
    if out_weight.ndim != 2 or out_weight.shape[0] != d:
        raise ValueError(f"token_logprobs: out_weight must be [D={d}, V], got {out_weight.shape}")
    if targets.shape != (b, t):
        raise ValueError(f"token_logprobs: targets must be [B, T] = {(b, t)}, got {targets.shape}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"token_logprobs: chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    chunk = min(chunk_size, t)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    y = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    h = h.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    y = y.reshape(b, n_chunks, chunk).swapaxes(0, 1)  # [n, B, C]

    @jax.checkpoint
    def chunk_logprobs(h_c, y_c):
        # Over [B*C] rows: one contraction in the weight gradient (see `qwen3.project_qkv`).
        logits = jnp.einsum("nd,dv->nv", h_c.reshape(-1, d), out_weight,
                            preferred_element_type=jnp.float32).reshape(b, chunk, -1) / temperature
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        if not return_entropy:
            return picked - log_z
        # -Σ p·log p with log p formed first: logsumexp(z) − Σ p·z cancels badly when z is large.
        logp_all = logits - log_z[..., None]
        return picked - log_z, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)

    _, out = jax.lax.scan(lambda carry, xs: (carry, chunk_logprobs(*xs)), None, (h, y))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :t]  # noqa: E731
    return jax.tree.map(unchunk, out)


def model_token_logprobs(params: dict, config: ModelConfig, tokens: jax.Array, positions: jax.Array,
                         targets: jax.Array, *, segment_ids: jax.Array | None = None,
                         routing: jax.Array | None = None, chunk_size: int = 512, temperature: float = 1.0,
                         remat: bool = False, return_entropy: bool = False):
    """Runs the decoder on `tokens` [B, T] and returns the logprobs [B, T] float32 of `targets` [B, T]
    at each position (with `return_entropy`: (logprobs, entropy), see `token_logprobs`), and the
    model's ModelAux (aux loss, routed experts and the routers' own choice when MoE)."""
    hidden, aux = qwen3.forward(params, config, tokens, positions, segment_ids=segment_ids, routing=routing,
                                return_routing=config.is_moe, return_hidden=True, remat=remat)
    return token_logprobs(hidden, output_weight(params, config), targets, chunk_size=chunk_size,
                          temperature=temperature, return_entropy=return_entropy), aux
