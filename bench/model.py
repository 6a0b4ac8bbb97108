"""Throughput of the tiny MoE model on this CPU, each figure a ratio measured in the same run.

1. forward+backward tokens/s: ragged dispatch (sort + `jax.lax.ragged_dot`) vs the dense reference
   path (every expert on every token).
2. forward tokens/s: `ace` (jitted JAX) vs the transformers torch `Qwen3MoeForCausalLM` of the same config.

Usage: python bench/model.py [--config tiny] [--batch 8] [--length 256] [--reps 5]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from timing import median_seconds  # bench/timing.py, beside this script


def bench_train_step(config, params, tokens, positions, reps: int) -> float:
    """Median seconds of one jitted forward+backward (next-token loss + aux loss) on `config`."""
    from ace.models.logprobs import model_token_logprobs

    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p):
        logp, aux = model_token_logprobs(p, config, tokens, positions, targets, chunk_size=128)
        return -jnp.mean(logp) + config.router_aux_loss_coef * aux.aux_loss

    step = jax.jit(jax.value_and_grad(loss))
    return median_seconds(lambda: jax.block_until_ready(step(params)), reps)


def bench_forward_ace(config, params, tokens, positions, reps: int) -> float:
    from ace.models import forward

    fwd = jax.jit(lambda p, t, pos: forward(p, config, t, pos)[0])
    return median_seconds(lambda: jax.block_until_ready(fwd(params, tokens, positions)), reps)


def bench_forward_torch(config, tokens: np.ndarray, reps: int) -> float:
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3Config, Qwen3MoeForCausalLM

    hf = config.to_hf_config()
    model_cls, config_cls = ((Qwen3MoeForCausalLM, Qwen3MoeConfig) if config.is_moe
                             else (Qwen3ForCausalLM, Qwen3Config))
    model = model_cls(config_cls(**hf)).eval()
    ids = torch.tensor(tokens)

    def run():
        with torch.no_grad():
            model(ids, use_cache=False)

    return median_seconds(run, reps)


def main() -> None:
    from ace.models import get_config, init_params

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    config = get_config(args.config)
    if not config.is_moe:
        raise SystemExit(f"--config must name an MoE config for the dispatch comparison, got {args.config!r}")
    params = init_params(config, jax.random.key(0))
    tokens_np = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.length))
    tokens = jnp.asarray(tokens_np, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)
    n_tokens = args.batch * args.length
    print(f"config={args.config} batch={args.batch} length={args.length} reps={args.reps} "
          f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}")

    ragged = bench_train_step(config.replace(moe_impl="ragged"), params, tokens, positions, args.reps)
    dense = bench_train_step(config.replace(moe_impl="dense"), params, tokens, positions, args.reps)
    print(f"fwd+bwd  ragged dispatch : {n_tokens / ragged:12.0f} tokens/s")
    print(f"fwd+bwd  dense reference : {n_tokens / dense:12.0f} tokens/s")
    print(f"fwd+bwd  ratio ragged/dense = {dense / ragged:.2f}x")
    if jax.default_backend() == "cpu":
        # jax/_src/lax/lax.py `_ragged_dot_general_impl`: without a native kernel the groups are
        # expanded to a masked [E, N*k, D] operand, so ragged does k times the dense path's expert flops.
        print("         (cpu: ragged_dot falls back to a masked dense matmul; the ragged win needs GPU/TPU)")

    ace_fwd = bench_forward_ace(config, params, tokens, positions, args.reps)
    torch_fwd = bench_forward_torch(config, tokens_np, args.reps)
    print(f"forward  ace (jax, ragged): {n_tokens / ace_fwd:12.0f} tokens/s")
    print(f"forward  transformers torch: {n_tokens / torch_fwd:12.0f} tokens/s")
    print(f"forward  ratio ace/transformers = {torch_fwd / ace_fwd:.2f}x")


if __name__ == "__main__":
    main()
