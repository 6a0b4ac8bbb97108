"""The GRPO update on this CPU: ace's jitted learner against the same update written in PyTorch over
the transformers model of the same config, each figure measured in one run.

One update is what the trainer does with a batch of finished groups: the reference logprobs for
the KL term (one forward of the frozen reference), then `micro_batches` forward+backward passes of
the clipped GRPO loss, whose proximal logprobs are its own forward's, detached (exact for one
optimizer step per batch; ace's `LearnerConfig.proximal_from_step`, which the trainer sets) (token mean,
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

Then the whole GRPO step against Tunix (google-tunix, JAX; optional, see bench/tunix_peer.py),
printed after the table: 4 prompts of 64 tokens x 4 generations (16 rows), 32 new tokens each at
temperature 1 with no top-k / top-p and no stop token, a trivial deterministic reward (the fraction
of even token ids), group advantages, then one GRPO update with beta 0.04. ace: `JaxSampler.generate`
of the 16 requests, `Sample`s, `group_advantages`, `make_batch`, and the update above (reference
logprobs, one train step). Tunix: its own loop, `GRPOLearner.train`, over an `RLCluster`
with the vanilla rollout engine (`tunix_peer.grpo_step_seconds` says what one of its steps holds).
Each side's step is timed whole, compile excluded, median of --reps steps after --warmup.

Usage: python bench/learner.py [--configs A,B] [--batches grpo,long] [--reps 5] [--micro-batches 1]
                               [--steps-only] [--no-tunix]
"""
from __future__ import annotations

import argparse
import copy
import itertools

import numpy as np

from peer_configs import model_config  # bench/peer_configs.py, beside this script
from timing import median_seconds  # bench/timing.py, beside this script
import tunix_peer  # bench/tunix_peer.py, beside this script: optional, `pip install -e ".[bench]"`

BATCHES = {"grpo": (16, 64, 32), "long": (8, 256, 256)}  # rows, prompt tokens, completion tokens
GRPO_STEP = (4, 4, 64, 32)  # prompts, generations per prompt, prompt tokens, new tokens
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


def ace_learner(config, params, micro_batches: int):
    """ace's learner as the trainer runs it: returns (update, policy). `update(batch)` runs one full
    update on a device `Batch` [B, T] (reference logprobs, then the jitted train step, state donated,
    which takes the proximal logprobs from its own forward: one optimizer step per batch, as
    `AceTrainer` does with minibatches = 1) and returns the gradient norm before clipping;
    `policy()` is the current params, valid until the next update (which donates them)."""
    import jax

    from ace.train.learner import LearnerConfig, init_learner, jit_logprobs, jit_train_step

    cfg = LearnerConfig(lr=LR, schedule="constant", total_steps=10**6, micro_batches=micro_batches,
                        eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=BETA, kl_kind="k3", max_grad_norm=1.0,
                        proximal_from_step=True)
    # Copies: the state is donated to each step, and the caller's params must outlive it.
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    state = {"s": init_learner(jax.tree.map(lambda x: x.copy(), params), cfg, jax.random.key(1))}
    logprobs = jit_logprobs(cfg, config)
    step = jit_train_step(cfg, config, donate=True)

    def update(batch):
        b = batch.replace(ref_logp=logprobs(ref_params, batch))
        state["s"], metrics = step(state["s"], b)
        return float(metrics["grad_norm"])

    return update, lambda: state["s"].params


def ace_update(config, params, samples, adv, pad_to: int, micro_batches: int):
    """Returns a callable running one full update with ace's learner (jitted, state donated) on the
    batch of `samples`; it returns the gradient norm before clipping."""
    import jax

    from ace.train.batches import make_batch

    update, _ = ace_learner(config, params, micro_batches)
    batch = jax.device_put(make_batch(samples, adv, pad_to=pad_to))
    return lambda: update(batch)


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
            ref_logp = token_logprobs(ref, slice(None))[0]
        opt.zero_grad(set_to_none=True)
        total = mask.sum()
        for rows in torch.arange(b).chunk(micro_batches):
            logp, aux = token_logprobs(model, rows)
            m = mask[rows]
            ratio = torch.exp(logp - logp.detach())  # proximal = these params: one step per batch
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


def ace_grpo_step(config, params, prompts: np.ndarray, generations: int, new_tokens: int):
    """Returns a callable running one whole GRPO step with ace on prompts [N, P]; it returns the
    gradient norm before clipping.

    One step: `JaxSampler.generate` of N * G requests (each prompt G times, `new_tokens` at
    temperature 1, no top-k / top-p, no stop ids: every row generates every token) in one batch of
    N * G rows; the reward of each row (`tunix_peer.completion_reward`, as on the Tunix side);
    `group_advantages` ("grpo": (r - mean) / (std + 1e-6), std with ddof 1, as Tunix); `Sample`s with
    the generated ids and behaviour logprobs; `make_batch` padded to P + new_tokens; then the update
    of `ace_learner` (reference logprobs, one jitted train step with one AdamW step).
    """
    import jax

    from ace.rl.advantages import group_advantages
    from ace.rollout.engine import SamplingParams
    from ace.rollout.jax_sampler import JaxSampler
    from ace.train.batches import make_batch
    from ace.train.queue import Sample

    n, prompt_len = prompts.shape
    rows = n * generations
    update, policy = ace_learner(config, params, micro_batches=1)
    sampler = JaxSampler(policy(), config, max_batch=rows, max_prompt_len=prompt_len, max_new_tokens=new_tokens,
                         prompt_buckets=())
    row_prompts = np.repeat(prompts, generations, axis=0).tolist()  # group g of prompt n at row n * G + g
    versions = itertools.count()

    def step():
        version = next(versions)
        # The sampler takes the learner's own arrays, no copy, as Tunix's rollout shares its actor's
        # weights. They are current here; the update below donates them, so every step hands the
        # sampler the new ones before it generates.
        sampler.update_weights(policy(), version)
        requests = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=version * rows + i)
                    for i in range(rows)]
        gens = sampler.generate(row_prompts, requests)
        rewards = np.array([tunix_peer.completion_reward(g.output_ids) for g in gens], np.float32)
        adv = np.asarray(group_advantages(rewards, generations, mode="grpo").advantages)
        samples = [Sample(task_id=i // generations, prompt_ids=row_prompts[i], output_ids=g.output_ids,
                          rollout_logprobs=g.logprobs, reward=float(r), duration_s=0.0, policy_version=version)
                   for i, (g, r) in enumerate(zip(gens, rewards))]
        return update(jax.device_put(make_batch(samples, adv, pad_to=prompt_len + new_tokens)))

    return step


def grpo_steps(configs: list[str], reps: int, warmup: int, use_tunix: bool) -> None:
    """Prints the GRPO step section: per config, ace's and (when `use_tunix`) Tunix's median step
    seconds and their ratio."""
    import jax

    from ace.models import init_params

    n, generations, prompt_len, new_tokens = GRPO_STEP
    print(f"\nGRPO step (generate {n}x{generations} x {new_tokens} tokens + update): {n} prompts of {prompt_len} "
          f"tokens x {generations} generations, temperature 1, beta {BETA}; median of {reps} steps after {warmup}")
    for name in configs:
        config = model_config(name)
        prompts = np.random.default_rng(0).integers(1, config.vocab_size, (n, prompt_len))
        params = init_params(config, jax.random.key(0))
        t_ace, _ = median_update_seconds(ace_grpo_step(config, params, prompts, generations, new_tokens), reps,
                                         warmup)
        line = f"config {name}: ace {t_ace:.3f} s"
        if use_tunix:
            t_tunix = tunix_peer.grpo_step_seconds(config, prompts, generations, new_tokens, reps, warmup=warmup)
            line += f", Tunix {t_tunix:.3f} s; ratio Tunix/ace time = {t_tunix / t_ace:.2f} (target >= 1)"
        print(line, flush=True)


def update_table(args, configs: list[str]) -> None:
    """Prints the update table: ace against PyTorch, per config and batch."""
    import jax
    import torch

    from ace.models import init_params

    print(f"jax {jax.__version__} on {jax.default_backend()}; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; float32; median of {args.reps} updates after {args.warmup}")
    print(f"{'config':<7}{'batch':<7}{'tokens':>7}  {'ace s':>8}  {'torch s':>8}  {'ace tok/s':>10}  "
          f"{'torch tok/s':>11}  {'torch/ace time':>14}  first grad norm ace / torch")
    for name in configs:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument("--batches", default="grpo,long")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--steps-only", action="store_true", help="run only the GRPO step section")
    parser.add_argument("--no-tunix", action="store_true", help="skip Tunix in the GRPO step section (when installed)")
    args = parser.parse_args()
    configs = args.configs.split(",")
    if not args.steps_only:
        update_table(args, configs)
    use_tunix = tunix_peer.wanted(args.no_tunix)
    grpo_steps(configs, args.reps, args.warmup, use_tunix)


if __name__ == "__main__":
    main()
