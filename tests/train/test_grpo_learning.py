"""A real (tiny) GRPO run: the embedded sampler and the learner raise a toy reward."""
import jax
import numpy as np

from ace.models import TINY_DENSE, init_params
from ace.rl import group_advantages
from ace.rollout.engine import SamplingParams
from ace.rollout.jax_sampler import JaxSampler
from ace.train.batches import make_batch
from ace.train.learner import LearnerConfig, init_learner, jit_train_step
from ace.train.queue import Sample

CONFIG = TINY_DENSE.replace(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=64)
TARGET = 7
PROMPTS = [[1, 2], [3, 4, 5], [6], [8, 9]]
GROUP, NEW_TOKENS, STEPS = 8, 6, 30


def reward(output_ids) -> float:
    """The fraction of completion tokens that are the target token."""
    return float(np.mean([t == TARGET for t in output_ids])) if output_ids else 0.0


def test_grpo_steps_with_the_embedded_sampler_raise_the_mean_reward():
    cfg = LearnerConfig(lr=3e-3, warmup_steps=0, schedule="constant", total_steps=STEPS + 1, max_grad_norm=1.0,
                        eps_low=0.2, eps_high=0.28, agg="token_mean", micro_batches=2, tis_cap=2.0)
    state = init_learner(init_params(CONFIG, jax.random.key(0)), cfg, jax.random.key(1))
    sampler = JaxSampler(state.params, CONFIG, max_batch=len(PROMPTS) * GROUP, max_prompt_len=4,
                         max_new_tokens=NEW_TOKENS, prompt_buckets=(), seed=0)
    step = jit_train_step(cfg, CONFIG)
    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    mean_rewards = []
    for i in range(STEPS):
        requests = [SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i * 1000 + j)
                    for j in range(len(prompts))]
        gens = sampler.generate(prompts, requests)
        rewards = np.asarray([reward(g.output_ids) for g in gens], np.float32)
        mean_rewards.append(rewards.mean())
        adv = np.asarray(group_advantages(rewards, GROUP, mode="grpo").advantages)
        samples = [Sample(task_id=k // GROUP, prompt_ids=p, output_ids=g.output_ids, rollout_logprobs=g.logprobs,
                          reward=float(r), duration_s=0.0, policy_version=g.weight_version)
                   for k, (p, g, r) in enumerate(zip(prompts, gens, rewards))]
        state, metrics = step(state, make_batch(samples, adv, pad_to=4 + NEW_TOKENS))
        assert np.isfinite(float(metrics["loss"]))
        sampler.update_weights(state.params, i + 1)
    start, end = np.mean(mean_rewards[:3]), np.mean(mean_rewards[-5:])
    # A uniform policy over 16 tokens scores 1/16; the learned one must clearly prefer the target.
    assert end >= start + 0.25, (start, end, mean_rewards)
    assert sampler.trace_counts == {"prefill": 1, "decode": 1}
