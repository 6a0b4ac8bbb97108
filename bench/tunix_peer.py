"""Tunix (google-tunix 0.1.7, JAX) as the peer of bench/model.py, bench/sampler.py and bench/learner.py:
its Qwen3 / Qwen3-MoE model, its `Sampler` and its GRPO training step (`GRPOLearner` over an
`RLCluster`), built for the same config and timed the same way.

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


def wanted(skip: bool, indent: str = "") -> bool:
    """Whether a script should time Tunix: installed and not skipped (`--no-tunix`). Prints the
    skip line when it is not installed."""
    if skip:
        return False
    if not available():
        print(f'{indent}Tunix: not installed (pip install -e ".[bench]"); skipped')
        return False
    return True


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


def completion_reward(ids) -> float:
    """The GRPO-step benchmark's reward, trivial and deterministic, shared by ace and Tunix: the
    fraction of a completion's token ids [T] that are even (0 for an empty completion)."""
    ids = np.asarray(ids, np.int64)
    return float(np.mean(ids % 2 == 0)) if ids.size else 0.0


def _reward_fn(prompts, completions, **_) -> list[float]:
    """Tunix reward function: `completions` are `_IdTokenizer` strings of ids, one per row."""
    del prompts
    return [completion_reward([int(x) for x in text.split()]) for text in completions]


class _TimedBatches:
    """An iterable of `steps` copies of one Tunix training batch ({"prompts": [N] str array}) that
    records `time.perf_counter()` each time Tunix's loop asks for the next batch, and once more
    when it asks past the last one. Before each record it calls `sync` (blocks until the actor's
    weights are computed), so that no update still runs asynchronously across a boundary.

    `RLLearner.train` asks for batch 0 before it builds anything, then asks for batch k + 1 at the
    start of step k + 1's data loading, so times[k + 1] - times[k] is one whole training step k
    (step 0 also holds the setup and every compilation)."""

    def __init__(self, batch: dict, steps: int, sync):
        self._batch, self._steps, self._sync = batch, steps, sync
        self.times: list[float] = []

    def __iter__(self):
        import time

        for _ in range(self._steps):
            self._sync()
            self.times.append(time.perf_counter())
            yield dict(self._batch)
        self._sync()
        self.times.append(time.perf_counter())


def _grpo_learner(config, prompt_len: int, generations: int, new_tokens: int, steps: int):
    """Tunix's GRPO machinery for `config` on one CPU device: an `RLCluster` (actor, frozen
    reference of the same initial weights, vanilla rollout engine, every role on one 1x1 mesh so
    that the rollout shares the actor's weights and no weight sync runs) and a `GRPOLearner` with
    beta 0.04 (k3 KL), clipping eps 0.2 (`GRPOConfig` has no separate upper eps), token-mean loss,
    num_iterations 1, and the optimizer ace uses: clip global norm 1, AdamW lr 1e-4, no decay.
    Returns the learner; its training loop stops after `steps` optimizer steps at the latest."""
    import jax
    import optax
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.grpo import grpo_learner as gl
    from tunix.rl.rollout import base_rollout

    # A 1x1 mesh with the axis names Tunix's models and input sharding name ("fsdp", "tp").
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len, kv_cache_size=prompt_len + new_tokens,
        temperature=1.0, top_p=1.0, top_k=None)
    cluster_config = rlc.ClusterConfig(
        role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        # max_steps one past the data, so that the loop ends by asking for one more batch (the
        # last time stamp) rather than by its step count.
        training_config=rlc.RLTrainingConfig(actor_optimizer=optimizer, eval_every_n_steps=10 ** 9,
                                             max_steps=steps + 1),
        rollout_config=rollout)
    cluster = rlc.RLCluster(actor=_model(config), reference=_model(config),
                            tokenizer=_IdTokenizer(config.vocab_size), cluster_config=cluster_config)
    algo = gl.GRPOConfig(num_generations=generations, num_iterations=1, beta=0.04, kl_loss_mode="low_var_kl",
                         epsilon=0.2, loss_agg_mode="token-mean")
    return gl.GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=[_reward_fn])


def grpo_step_seconds(config, prompts: np.ndarray, generations: int = 4, new_tokens: int = 32,
                      reps: int = 3, *, warmup: int = 1) -> float:
    """Median seconds of one GRPO training step of Tunix, run by its own loop `GRPOLearner.train`
    over warmup + reps identical batches of prompts [N, P]; the first `warmup` steps (at least the
    first, which compiles) are dropped.

    One Tunix step here is, in order (`RLLearner._run_global_step` with mini batch = full batch):
    repeat each prompt `generations` times (N * G rows); generate `new_tokens` tokens per row with
    its `Sampler` (prefill + decode, temperature 1, no top-k / top-p; the eos id is outside the
    vocabulary, so every row generates every token) in one call of N * G rows; detokenise; one
    jitted forward of the frozen reference for its per-token logprobs; the reward of each row
    (`completion_reward`), group advantages ((r - mean) / (std + 1e-6)); host-side metric buffering
    (reward and length statistics); then one jitted train step: forward + backward of the GRPO loss
    (the old logprobs are the current ones under stop_gradient, as num_iterations is 1, so no extra
    forward; the loss also computes the token entropy and some fifteen diagnostic scalars), the
    global gradient norm, and one optimizer update (clip + AdamW). No weight sync (the rollout
    shares the actor's weights), no checkpoint, no metrics backend, no evaluation.
    """
    warmup = max(warmup, 1)
    total = warmup + reps
    learner = _grpo_learner(config, prompts.shape[1], generations, new_tokens, total)

    def sync():
        import jax
        from flax import nnx

        jax.block_until_ready(nnx.state(learner.rl_cluster.actor_trainer.model))

    # A numpy array, not a list: the loop repeats each leaf of the batch G times with `np.repeat`,
    # and a list of strings would be N leaves (each string repeated into an array of its own).
    texts = np.array([" ".join(str(int(t)) for t in row) for row in prompts])
    batches = _TimedBatches({"prompts": texts}, total, sync)
    learner.train(batches)
    steps = np.diff(batches.times)
    if len(steps) != total or learner.rl_cluster.actor_trainer.train_steps != total:
        raise RuntimeError(f"tunix_peer: expected {total} timed steps and optimizer steps, got {len(steps)} "
                           f"and {learner.rl_cluster.actor_trainer.train_steps}")
    return float(np.median(steps[warmup:]))
