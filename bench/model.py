"""Throughput of the model's implementation choices on this machine, each figure a ratio measured in the same run.

Two models, batch 8 x 512 tokens, float32 (compile excluded, medians of --reps calls):
  A: Qwen3-MoE, 2.04M params: vocab 1024, hidden 128, 4 layers, 4 heads / 2 KV heads of 32,
     8 experts top-2 of hidden 128 (untied lm_head).
  B: the dense Qwen3 of the same shape, MLP hidden 256 (= top-2 x 128: the same active MLP flops).

1. forward and forward+backward (next-token loss + aux loss) tokens/s for each `moe_impl` and
   `attention_impl` choice and for "auto", each against the former default, ragged dispatch +
   reference attention, as the baseline ("blockwise@128" is blockwise with 128 x 128 tiles, what
   "auto" uses on CPU at this length; "blockwise" keeps the config's 512 x 512 tiles).
2. forward and fwd+bwd tokens/s: `ace` with "auto" (jitted JAX) vs the transformers torch model of
   the same config and, when installed (`pip install -e ".[bench]"`), Tunix's Qwen3 model
   (bench/tunix_peer.py); ratios > 1 mean ace is faster.

Usage: python bench/model.py [--batch 8] [--length 512] [--reps 5] [--no-torch]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from peer_configs import model_config, torch_model  # bench/peer_configs.py, beside this script
from timing import median_seconds  # bench/timing.py, beside this script
import tunix_peer  # bench/tunix_peer.py, beside this script: optional, `pip install -e ".[bench]"`

# (label, moe_impl, attention_impl, attention block) per row; the first is the baseline.
BASELINE = ("ragged+reference", "ragged", "reference", 512)
MOE_ROWS = [BASELINE, ("dense+reference", "dense", "reference", 512),
            ("grouped+reference", "grouped", "reference", 512), ("ragged+blockwise", "ragged", "blockwise", 512),
            ("ragged+blockwise@128", "ragged", "blockwise", 128),
            ("grouped+blockwise@128", "grouped", "blockwise", 128), ("auto+auto", "auto", "auto", 512)]
DENSE_ROWS = [("reference", "ragged", "reference", 512), ("blockwise", "ragged", "blockwise", 512),
              ("blockwise@128", "ragged", "blockwise", 128), ("auto", "auto", "auto", 512)]


def model_configs():
    return {"A (Qwen3-MoE)": (model_config("A"), MOE_ROWS), "B (Qwen3 dense)": (model_config("B"), DENSE_ROWS)}


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

    model = torch_model(config).eval()
    ids = torch.tensor(tokens)

    def run():
        with torch.no_grad():
            model(ids, use_cache=False)

    return median_seconds(run, reps)


def bench_train_step_torch(config, tokens: np.ndarray, reps: int) -> float:
    """Median seconds of one forward+backward (next-token cross-entropy + the MoE aux loss, as the
    model computes it with labels) of the transformers torch model."""
    import torch

    model = torch_model(config, output_router_logits=config.is_moe).train()
    ids = torch.tensor(tokens)

    def run():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    return median_seconds(run, reps)


def main() -> None:
    from ace.models import abstract_params, init_params
    from ace.models.autoselect import choose_attention, choose_moe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--no-tunix", action="store_true", help="skip the Tunix comparison (when installed)")
    args = parser.parse_args()

    tokens_np = np.random.RandomState(0).randint(0, 1024, (args.batch, args.length))
    tokens = jnp.asarray(tokens_np, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(args.length, dtype=jnp.int32), tokens.shape)
    n_tokens = args.batch * args.length
    print(f"batch={args.batch} length={args.length} reps={args.reps} backend={jax.default_backend()} "
          f"device={jax.devices()[0].device_kind}")
    for name, (config, rows) in model_configs().items():
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
        attn = choose_attention("auto", q_len=args.length, kv_len=args.length, dtype=config.param_dtype,
                                head_dim=config.head_dim, cudnn_mask=True, block_q=config.attention_block_q,
                                block_kv=config.attention_block_kv)
        resolved = f"attention {attn[0]} (blocks {attn[1]}x{attn[2]})"
        if config.is_moe:
            pairs = n_tokens * config.num_experts_per_tok
            resolved += f", moe {choose_moe('auto', num_pairs=pairs, num_experts=config.num_experts)}"
        print(f"\n{name}: {n_params / 1e6:.2f}M params; auto resolves to {resolved}")
        params = init_params(config, jax.random.key(0))
        base = None
        for label, moe_impl, attention_impl, block in rows:
            c = config.replace(moe_impl=moe_impl, attention_impl=attention_impl, attention_block_q=block,
                               attention_block_kv=block)
            fwd = bench_forward_ace(c, params, tokens, positions, args.reps)
            step = bench_train_step(c, params, tokens, positions, args.reps)
            base = base or (fwd, step)
            print(f"  {label:22s} forward {n_tokens / fwd:9.0f} tok/s ({base[0] / fwd:5.2f}x)   "
                  f"fwd+bwd {n_tokens / step:9.0f} tok/s ({base[1] / step:5.2f}x)", flush=True)
        if jax.default_backend() == "cpu" and config.is_moe:
            # jax/_src/lax/lax.py `_ragged_dot_general_impl`: without a native kernel the groups are
            # expanded to a masked [E, N*k, D] operand, so ragged does k times the dense path's expert flops.
            print("  (cpu: ragged_dot falls back to a masked dense matmul; its win needs GPU/TPU)")
        peers = {}
        if not args.no_torch:
            peers["transformers torch"] = (bench_forward_torch(config, tokens_np, args.reps),
                                           bench_train_step_torch(config, tokens_np, args.reps))
        if tunix_peer.wanted(args.no_tunix, indent="  "):
            peers["Tunix 0.1.7"] = (tunix_peer.forward_seconds(config, tokens_np, args.reps),
                                    tunix_peer.fwd_bwd_seconds(config, tokens_np, args.reps))
        if peers:
            ace = (bench_forward_ace(config, params, tokens, positions, args.reps),
                   bench_train_step(config, params, tokens, positions, args.reps))
            print(f"  {'ace (auto)':22s} forward {n_tokens / ace[0]:9.0f} tok/s   fwd+bwd {n_tokens / ace[1]:9.0f} tok/s")
            for peer, (fwd, step) in peers.items():
                print(f"  {peer:22s} forward {n_tokens / fwd:9.0f} tok/s   fwd+bwd {n_tokens / step:9.0f} tok/s   "
                      f"ratio ace/{peer.split()[0]} = {fwd / ace[0]:.2f}x forward, {step / ace[1]:.2f}x fwd+bwd", flush=True)

if __name__ == "__main__":
    main()
