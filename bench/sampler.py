"""Decode throughput of the embedded JAX sampler vs transformers `generate` and, when installed
(`pip install -e ".[bench]"`), Tunix's `Sampler` (bench/tunix_peer.py), measured in one run.

Both sides get the same random model config (`config.to_hf_config()` for transformers), the same
batch of prompts and the same lengths, sample at temperature 1 with no top-k / top-p and no stop
token, so each produces exactly batch * new_tokens tokens. Timings include prefill, exclude the
first call (compilation / allocation), and are medians over `--reps` calls.

Configs A (MoE) and B (dense) are those of bench/peer_configs.py; any named config works too.

Usage: python bench/sampler.py [--configs A,B] [--batch 8] [--prompt-len 64] [--new-tokens 128] [--reps 3]
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from peer_configs import model_config, torch_model  # bench/peer_configs.py, beside this script
from timing import median_seconds  # bench/timing.py, beside this script
import tunix_peer  # bench/tunix_peer.py, beside this script: optional, `pip install -e ".[bench]"`


def jax_seconds(config, prompts: np.ndarray, new_tokens: int, reps: int) -> float:
    from ace.models import init_params
    from ace.rollout.engine import SamplingParams
    from ace.rollout.jax_sampler import JaxSampler

    batch, prompt_len = prompts.shape
    sampler = JaxSampler(init_params(config, jax.random.key(0)), config, max_batch=batch,
                         max_prompt_len=prompt_len, max_new_tokens=new_tokens, prompt_buckets=())
    requests = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i) for i in range(batch)]

    def run():
        gens = sampler.generate(prompts.tolist(), requests)
        assert all(len(g.output_ids) == new_tokens for g in gens)

    return median_seconds(run, reps)


def sort_filter_seconds(config, prompts: np.ndarray, new_tokens: int, reps: int) -> float:
    """The same decode with the sort-based top-k / top-p reference run every step even though both
    filters are off: what the sampler did before it skipped filters that are off."""
    from unittest import mock

    with mock.patch("ace.rollout.jax_sampler.filter_candidates", return_value=0):
        return jax_seconds(config, prompts, new_tokens, reps)


def torch_seconds(config, prompts: np.ndarray, new_tokens: int, reps: int) -> float:
    import torch

    torch.manual_seed(0)
    model = torch_model(config).eval()
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        assert out.shape == (prompts.shape[0], prompts.shape[1] + new_tokens)

    return median_seconds(run, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-tunix", action="store_true", help="skip the Tunix comparison (when installed)")
    args = parser.parse_args()
    use_tunix = tunix_peer.wanted(args.no_tunix)
    for name in args.configs.split(","):
        config = model_config(name)
        prompts = np.random.default_rng(0).integers(1, config.vocab_size, (args.batch, args.prompt_len))
        n_tokens = args.batch * args.new_tokens
        ace_s = jax_seconds(config, prompts, args.new_tokens, args.reps)
        sort_s = sort_filter_seconds(config, prompts, args.new_tokens, args.reps)
        hf_s = torch_seconds(config, prompts, args.new_tokens, args.reps)
        print(f"config {name}: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens each")
        print(f"decode ace JaxSampler:          {n_tokens / ace_s:10.0f} tokens/s ({ace_s * 1e3:.1f} ms per batch)")
        print(f"decode transformers generate:   {n_tokens / hf_s:10.0f} tokens/s ({hf_s * 1e3:.1f} ms per batch)")
        print(f"decode ace, sort-based filters: {n_tokens / sort_s:10.0f} tokens/s ({sort_s * 1e3:.1f} ms per batch)")
        print(f"decode ratio ace/transformers = {hf_s / ace_s:.2f}x (target >= 2x)")
        if use_tunix:
            tunix_s = tunix_peer.decode_seconds(config, prompts, args.new_tokens, args.reps)
            print(f"decode Tunix Sampler:           {n_tokens / tunix_s:10.0f} tokens/s ({tunix_s * 1e3:.1f} ms per batch)")
            print(f"decode ratio ace/Tunix = {tunix_s / ace_s:.2f}x (target >= 1x)")
        print(f"decode ratio ace/sort-based filters (filters off skipped vs sorted every step) = {sort_s / ace_s:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
