"""The GRPO update on this CPU: ace's jitted learner against the same update written in PyTorch over
the transformers model of the same config, each figure measured in one run.

One update is what the trainer does with a batch of finished groups: the proximal logprobs (one
forward of the policy), the reference logprobs for the KL term (one forward of the frozen
reference), then `micro_batches` forward+backward passes of the clipped GRPO loss (token mean,
eps 0.2 / 0.28, k3 KL with beta 0.04, the MoE load-balancing loss), gradient clipping at norm 1
and one AdamW step. The PyTorch side does exactly that with `Qwen3(Moe)ForCausalLM`, a deep copy
as the reference, and `torch.optim.AdamW`; it is what a user of transformers would write. Both start
from the same weights, and the first update's gradient norm of each is printed as a check that they
compute the same thing.

Configs (as in the issue that asked for this script): A, a Qwen3-MoE of 2.04M parameters (vocab 1024,
hidden 128, 4 layers, 4 heads / 2 KV heads, head dim 32, 8 experts top-2, expert hidden 128); B, the
dense Qwen3 of the same shape. Batches: "grpo", 4 prompts x 4 generations of 64 prompt + 32 new
tokens; "long", 8 rows of 512 tokens (256 prompt + 256 completion). float32, compile excluded,
median of --reps updates after --warmup.

Usage: python bench/learner.py [--configs A,B] [--batches grpo,long] [--reps 5] [--micro-batches 1]
"""
from __future__ import annotations

import argparse
import copy

import numpy as np

from peer_configs import model_config  # bench/peer_configs.py, beside this script
from timing import median_seconds  # bench/timing.py, beside this script

BATCHES = {"grpo": (16, 64, 32), "long": (8, 256, 256)}  # rows, prompt tokens, completion tokens
EPS_LOW, EPS_HIGH, BETA, LR = 0.2, 0.28, 0.04, 1e-4


def make_samples(config, rows: int, prompt: int, new: int, seed: int = 0):
    """Random prompts and completions with behaviour logprobs, and group-normalised advantages."""
    from ace.train.queue import Sample

    rng = np.random.default_rng(seed)
    samples = [Sample(task_id=i // 4, prompt_ids=rng.integers(1, config.vocab_size, prompt).tolist(),
                      output_ids=rng.integers(1, config.vocab_size, new).tolist(),
                      rollout_logprobs=(-6.0 - rng.random(new)).tolist(), reward=float(rng.random()),
                      duration_s=1.0, policy_version=0) for i in range(rows)]
    rewards = np.array([s.reward for s in samples]).reshape(-1, min(4, rows))
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)).ravel()
    return samples, adv.astype(np.float32)


def median_update_seconds(update, reps: int, warmup: int) -> tuple[float, float]:
    """(median seconds of an update after `warmup` updates, what the first update returned)."""
    first = update()
    for _ in range(warmup - 2):
        update()
    return median_seconds(update, reps), first  # median_seconds makes the last warm-up call


def ace_update(config, params, samples, adv, pad_to: int, micro_batches: int):
    """Returns a callable running one full update with ace's learner (jitted, state donated); it
    returns the gradient norm before clipping."""
    import jax

    from ace.train.batches import make_batch
    from ace.train.learner import LearnerConfig, init_learner, jit_logprobs, jit_train_step

    cfg = LearnerConfig(lr=LR, schedule="constant", total_steps=10**6, micro_batches=micro_batches,
                        eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=BETA, kl_kind="k3", max_grad_norm=1.0)
    # Copies: the state is donated to each step, and the caller's params must outlive it.
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    state = {"s": init_learner(jax.tree.map(lambda x: x.copy(), params), cfg, jax.random.key(1))}
    batch = jax.device_put(make_batch(samples, adv, pad_to=pad_to))
    logprobs = jit_logprobs(cfg, config)
    step = jit_train_step(cfg, config, donate=True)

    def update():
        b = batch.replace(old_logp=logprobs(state["s"].params, batch), ref_logp=logprobs(ref_params, batch))
        state["s"], metrics = step(state["s"], b)
        return float(metrics["grad_norm"])

    return update


def torch_update(config, params, samples, adv, pad_to: int, micro_batches: int):
    """Returns a callable running the same update in PyTorch on the transformers model holding the
    same weights (exported by `ace.models.hf.save_hf_checkpoint`); it returns the gradient norm before clipping."""
    import tempfile

    import torch
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    from ace.models.hf import save_hf_checkpoint

    model_cls = Qwen3MoeForCausalLM if config.is_moe else Qwen3ForCausalLM
    with tempfile.TemporaryDirectory() as folder:
        save_hf_checkpoint(params, config, folder)
        model = model_cls.from_pretrained(folder, torch_dtype=torch.float32).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, eps=1e-8)
    b = len(samples)
    tokens = torch.zeros(b, pad_to, dtype=torch.long)
    mask = torch.zeros(b, pad_to)
    rollout = torch.zeros(b, pad_to)
    for i, s in enumerate(samples):
        p, o = len(s.prompt_ids), len(s.output_ids)
        tokens[i, :p + o] = torch.tensor(s.prompt_ids + s.output_ids)
        mask[i, p - 1:p + o - 1] = 1.0  # position t predicts token t + 1
        rollout[i, p - 1:p + o - 1] = torch.tensor(s.rollout_logprobs)
    advantages = torch.tensor(adv)
    attention = (tokens != 0) | (torch.arange(pad_to) < 1)
    targets = torch.roll(tokens, -1, dims=1)
    moe = config.is_moe

    def token_logprobs(m, rows):
        out = m(tokens[rows], attention_mask=attention[rows], use_cache=False, output_router_logits=moe)
        logp = torch.log_softmax(out.logits.float(), -1).gather(-1, targets[rows, :, None])[..., 0]
        return logp, (out.aux_loss if moe else None)

    def update():
        with torch.no_grad():
            old = token_logprobs(model, slice(None))[0]
            ref_logp = token_logprobs(ref, slice(None))[0]
        opt.zero_grad(set_to_none=True)
        total = mask.sum()
        for rows in torch.arange(b).chunk(micro_batches):
            logp, aux = token_logprobs(model, rows)
            m = mask[rows]
            ratio = torch.exp(logp - old[rows])
            a = advantages[rows, None]
            pg = -torch.minimum(ratio * a, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a)
            delta = ref_logp[rows] - logp
            kl = torch.exp(delta) - delta - 1  # k3
            loss = ((pg + BETA * kl) * m).sum() / total
            if aux is not None:
                loss = loss + config.router_aux_loss_coef * aux / micro_batches
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(norm)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument("--batches", default="grpo,long")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=1)
    args = parser.parse_args()
    import jax
    import torch

    from ace.models import init_params

    print(f"jax {jax.__version__} on {jax.default_backend()}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32; median of {args.reps} updates after {args.warmup}")
    print(f"{'config':<7}{'batch':<7}{'tokens':>7}  {'ace s':>8}  {'torch s':>8}  {'ace tok/s':>10}  "
          f"{'torch tok/s':>11}  {'torch/ace time':>14}  first grad norm ace / torch")
    for name in args.configs.split(","):
        config = model_config(name)
        for batch_name in args.batches.split(","):
            rows, prompt, new = BATCHES[batch_name]
            samples, adv = make_samples(config, rows, prompt, new)
            pad_to = prompt + new
            params = init_params(config, jax.random.key(0))
            torch_run = torch_update(config, params, samples, adv, pad_to, args.micro_batches)
            t_ace, norm_ace = median_update_seconds(ace_update(config, params, samples, adv, pad_to,
                                                               args.micro_batches), args.reps, args.warmup)
            t_torch, norm_torch = median_update_seconds(torch_run, args.reps, args.warmup)
            tokens = rows * pad_to
            print(f"{name:<7}{batch_name:<7}{tokens:>7}  {t_ace:8.3f}  {t_torch:8.3f}  {tokens / t_ace:10.0f}  "
                  f"{tokens / t_torch:11.0f}  {t_torch / t_ace:13.2f}x  {norm_ace:.5g} / {norm_torch:.5g}",
                  flush=True)


if __name__ == "__main__":
    main()
