"""The GRPO learner: its state, and `train_step` as a pure, shardable function.

`train_step(state, batch) -> (state, metrics)` recomputes the learner's logprobs of the batch with
the chunked logprob function, takes the clipped GRPO loss of `ace.rl.policy_loss` (plus an
optional KL to a reference policy, an entropy bonus and the MoE load-balancing loss), accumulates
gradients over micro-batches with `lax.scan`, and applies AdamW with global-norm clipping.
`ppo_update(state, batch)` splits the batch into `minibatches` and takes one `train_step` on each
(verl's PPO mini-batches), all anchored to the same proximal logprobs `Batch.old_logp`, which the
caller computes once with `learner_logprobs` before the update (decoupled PPO, see
`ace.rl.losses`), or, with one step per batch, `LearnerConfig.proximal_from_step` takes from the
step's own forward. `jit_train_step` compiles `ppo_update` once with params and optimizer state
sharded by the rules table.

Every logprob (behaviour, proximal, current, reference) is of the same distribution: softmax of
the logits divided by the sampling temperature (`LearnerConfig.temperature`), before top-k/top-p
truncation, which is what both rollout engines return.

The settings are a `LearnerConfig` (`ace.train.learner_config`); a batch is a `Batch`
(`ace.train.batches`, which also says how its columns align with tokens).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ace.models.configs import ModelConfig
from ace.models.logprobs import model_token_logprobs
from ace.models.qwen3 import abstract_params, param_shardings
from ace.models.sharding import RULES, logical_to_sharding, use_mesh
from ace.rl import kl_penalty, policy_loss
from ace.train.batches import Batch
from ace.train.learner_config import LearnerConfig
from ace.train.multihost import put_global

@flax.struct.dataclass
class LearnerState:
    """params: float32 master weights; opt_state: optax state; step: int32 scalar; rng: PRNG key."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def _schedule(cfg: LearnerConfig) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 0), cfg.total_steps,
                                                  end_value=cfg.lr * cfg.min_lr_ratio)
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    return optax.join_schedules([warm, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])


def make_optimizer(cfg: LearnerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm), then AdamW on the warmup + schedule learning rate.

    Weight decay skips 1-D params (norm scales), as is usual for transformers.
    """
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, mu_dtype=cfg.mu_dtype,
                    weight_decay=cfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    )


def init_learner(params: Any, cfg: LearnerConfig, key: jax.Array) -> LearnerState:
    """A fresh LearnerState: float32 master copies of `params`, optimizer state, step 0, `key`."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return LearnerState(params=params, opt_state=make_optimizer(cfg).init(params),
                        step=jnp.zeros((), jnp.int32), rng=key)


def _targets(tokens: jax.Array) -> jax.Array:
    """tokens shifted left by one ([B, T]); the last column has no successor and is never in the loss."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def _compute_params(params, cfg: LearnerConfig):
    dtype = jnp.dtype(cfg.compute_dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def learner_logprobs(params: Any, batch: Batch, *, config: LearnerConfig, model_config: ModelConfig) -> jax.Array:
    """The learner's logprobs [B, T] float32 of tokens[:, t + 1] at each t (0 outside the loss mask),
    at `config.logprob_temperature` and with the batch's routing replayed when configured.

    Use it to fill `old_logp` (the proximal policy: the params at the start of the update) or
    `ref_logp` (a frozen reference model).
    """
    routing = batch.routing if config.routing_replay else None
    logp, _ = model_token_logprobs(_compute_params(params, config), model_config, jnp.asarray(batch.tokens),
                                   jnp.asarray(batch.positions), _targets(jnp.asarray(batch.tokens)),
                                   routing=routing, chunk_size=config.logprob_chunk_size,
                                   temperature=config.logprob_temperature)
    return jnp.where(jnp.asarray(batch.loss_mask) != 0, logp, 0.0)


def _loss_shares(mask: jax.Array, agg: str) -> jax.Array:
    """[M] weight of each micro-batch's aggregated loss so that their weighted sum is the full-batch loss.

    mask: [M, b, T]. token_mean divides by the tokens of the whole batch, seq_mean_token_mean by its
    sequences with at least one token, seq_mean_token_sum_norm by B * norm_len (a constant, so every
    micro-batch gets the same share).
    """
    keep = (mask != 0)
    if agg == "token_mean":
        per = jnp.sum(mask, axis=(1, 2))
    elif agg == "seq_mean_token_mean":
        per = jnp.sum(jnp.any(keep, axis=2), axis=1).astype(jnp.float32)
    else:
        per = jnp.full(mask.shape[:1], float(mask.shape[1]))
    return per / jnp.maximum(jnp.sum(per), 1e-8)


def _split_micro(batch: Batch, m: int) -> Batch:
    """[B, ...] -> [M, B/M, ...]; micro-batch i takes rows i, i+M, i+2M, ... so that each one keeps
    the batch's sharding over devices instead of living on a slice of them."""

    def split(x, axis):
        x = jnp.moveaxis(x, axis, 0)
        x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        return jnp.moveaxis(x, 1, axis + 1)

    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    out = {k: None if v is None else split(jnp.asarray(v), 1 if k == "routing" else 0) for k, v in fields.items()}
    return Batch(**out)


_MEAN_METRICS_SKIP = ("ratio_max", "ratio_min")


def _masked_token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    keep = mask != 0
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def routing_disagreement(given: jax.Array, own: jax.Array, mask: jax.Array) -> jax.Array:
    """Share of (token, layer) pairs whose set of k experts differs between two routings.

    Args: given, own: [L, B, T, k] int expert ids (order within k ignored); mask: [B, T], pairs
      count where mask ≠ 0. Returns a float32 scalar in [0, 1] (0 when nothing is kept).
    """
    differ = jnp.any(jnp.sort(given, axis=-1) != jnp.sort(own, axis=-1), axis=-1)  # [L, B, T]
    keep = jnp.broadcast_to(mask != 0, differ.shape)
    return jnp.sum(differ & keep) / jnp.maximum(jnp.sum(keep), 1)


def train_step(state: LearnerState, batch: Batch, *, config: LearnerConfig,
               model_config: ModelConfig) -> tuple[LearnerState, dict[str, jax.Array]]:
    """One optimiser step on `batch` (B sequences, B a multiple of config.micro_batches).

    Loss = GRPO policy loss + kl_coef * KL(pi || pi_ref) (token mean, k1/k2/k3) − entropy_coef *
    entropy (token mean) + aux_loss_coef * MoE load-balancing loss (mean over micro-batches).
    Micro-batch losses are weighted by their share of the aggregation's normaliser, so
    accumulation equals one pass over the full batch.

    Returns:
      (new state, metrics): flat dict of float32 scalars: loss, pg_loss, kl, aux_loss, entropy
      (token mean, at the sampling temperature), grad_norm, lr, tokens, the policy-loss metrics
      (clip_frac, approx_kl, ratio_mean, ratio_max, tis_weight_mean, tis_truncated_frac, ...) and,
      when the batch carries routing, routing_disagreement (share of (token, layer) pairs where
      this router's own top-k differs from the batch's routing).
    """
    batch.check()
    cfg, mc = config, model_config
    b, t = batch.tokens.shape
    m = cfg.micro_batches
    if b % m:
        raise ValueError(f"train_step: batch size {b} is not a multiple of micro_batches={m}")
    if cfg.kl_coef > 0 and batch.ref_logp is None:
        raise ValueError("train_step: kl_coef > 0 needs Batch.ref_logp (the reference policy's logprobs)")
    if cfg.routing_replay and batch.routing is None:
        raise ValueError("train_step: routing_replay=True needs Batch.routing [L, B, T, k]")
    aux_coef = mc.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    micro = _split_micro(batch, m)
    shares = _loss_shares(micro.loss_mask, cfg.agg)
    token_counts = jnp.sum(micro.loss_mask != 0, axis=(1, 2)).astype(jnp.float32)
    token_shares = token_counts / jnp.maximum(jnp.sum(token_counts), 1.0)
    norm_len = (cfg.norm_len or t) if cfg.agg == "seq_mean_token_sum_norm" else None

    def micro_loss(params, mb: Batch, share, token_share):
        routing = mb.routing if cfg.routing_replay else None
        (logp, entropy), aux = model_token_logprobs(
            _compute_params(params, cfg), mc, mb.tokens, mb.positions, _targets(mb.tokens), routing=routing,
            chunk_size=cfg.logprob_chunk_size, remat=cfg.remat, temperature=cfg.logprob_temperature,
            return_entropy=True)
        # One optimizer step per batch: the params differentiated here are the proximal ones.
        old_logp = jax.lax.stop_gradient(logp) if cfg.proximal_from_step else mb.old_logp
        pg, metrics = policy_loss(logp, old_logp, mb.advantages, mb.loss_mask, eps_low=cfg.eps_low,
                                  eps_high=cfg.eps_high, agg=cfg.agg, dual_clip=cfg.dual_clip,
                                  rollout_logp=mb.rollout_logp if cfg.tis_cap is not None else None,
                                  tis_cap=cfg.tis_cap, norm_len=norm_len, sample_weights=mb.sample_weights)
        kl = (kl_penalty(logp, mb.ref_logp, kind=cfg.kl_kind, mask=mb.loss_mask)
              if mb.ref_logp is not None else jnp.zeros((), jnp.float32))
        mean_entropy = _masked_token_mean(entropy, mb.loss_mask)
        loss = share * pg + token_share * cfg.kl_coef * kl + aux_coef * aux.aux_loss / m
        if cfg.entropy_coef > 0:  # otherwise the entropy is only logged: no term in the loss
            loss = loss - token_share * cfg.entropy_coef * mean_entropy
        parts = {"pg_loss": share * pg, "kl": token_share * kl, "aux_loss": aux.aux_loss / m}
        metrics = {**metrics, "entropy": jax.lax.stop_gradient(mean_entropy)}
        if mb.routing is not None and aux.own_routing is not None:
            metrics["routing_disagreement"] = routing_disagreement(mb.routing, aux.own_routing, mb.loss_mask)
        return loss, (parts, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, xs):
        grads, loss_sum, parts_sum, mean_sum, ratio_max, ratio_min = carry
        mb, share, token_share = xs
        (loss, (parts, metrics)), g = grad_fn(state.params, mb, share, token_share)
        grads = jax.tree.map(jnp.add, grads, g)
        parts_sum = {k: parts_sum[k] + v for k, v in parts.items()}
        mean_sum = {k: mean_sum[k] + token_share * metrics[k] for k in mean_sum}
        ratio_max = jnp.maximum(ratio_max, jnp.where(token_share > 0, metrics["ratio_max"], -jnp.inf))
        ratio_min = jnp.minimum(ratio_min, jnp.where(token_share > 0, metrics["ratio_min"], jnp.inf))
        return (grads, loss_sum + loss, parts_sum, mean_sum, ratio_max, ratio_min), None

    metric_shapes = jax.eval_shape(lambda: micro_loss(state.params, jax.tree.map(lambda x: x[0], micro),
                                                      shares[0], token_shares[0])[1][1])
    zeros = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, state.params), zeros,
            {"pg_loss": zeros, "kl": zeros, "aux_loss": zeros},
            {k: zeros for k in metric_shapes if k not in _MEAN_METRICS_SKIP},
            jnp.array(-jnp.inf, jnp.float32), jnp.array(jnp.inf, jnp.float32))
    (grads, loss, parts, means, ratio_max, ratio_min), _ = jax.lax.scan(accumulate, init,
                                                                       (micro, shares, token_shares))
    optimizer = make_optimizer(cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    any_tokens = jnp.sum(token_counts) > 0
    metrics = {"loss": loss, **parts, **means,
               "ratio_max": jnp.where(any_tokens, ratio_max, 1.0), "ratio_min": jnp.where(any_tokens, ratio_min, 1.0),
               "grad_norm": optax.global_norm(grads), "lr": _schedule(cfg)(state.step),
               "tokens": jnp.sum(token_counts)}
    rng, _ = jax.random.split(state.rng)
    new_state = LearnerState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def ppo_update(state: LearnerState, batch: Batch, *, config: LearnerConfig,
               model_config: ModelConfig) -> tuple[LearnerState, dict[str, jax.Array]]:
    """`config.minibatches` optimizer steps on one batch, each a `train_step` on a slice of its rows.

    Minibatch i takes rows i, i+K, i+2K, ... (K = minibatches), so every minibatch keeps the
    batch's sharding and mixes samples of all groups. All of them share `batch.old_logp`, the
    proximal logprobs computed once before the update, so from the second step on the ratio
    π_θ / π_prox moves away from 1 and the clip can act. B must be a multiple of
    minibatches · micro_batches.

    Returns:
      (new state, metrics): `train_step`'s metrics averaged over the minibatches (ratio_max and
      ratio_min are the extremes, lr the last step's).
    """
    k = config.minibatches
    b = batch.tokens.shape[0]
    if b % (k * config.micro_batches):
        raise ValueError(f"ppo_update: batch size {b} is not a multiple of minibatches * micro_batches = "
                         f"{k} * {config.micro_batches}")
    if k == 1:
        return train_step(state, batch, config=config, model_config=model_config)
    minis = _split_micro(batch, k)
    state, per_step = jax.lax.scan(
        lambda st, mb: train_step(st, mb, config=config, model_config=model_config), state, minis)
    metrics = {name: jnp.mean(v) for name, v in per_step.items()}
    metrics.update(ratio_max=jnp.max(per_step["ratio_max"]), ratio_min=jnp.min(per_step["ratio_min"]),
                   lr=per_step["lr"][-1], tokens=jnp.sum(per_step["tokens"]))
    return state, metrics


def optimizer_shardings(optimizer: optax.GradientTransformation, opt_state: Any, param_sharding: Any,
                        mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> Any:
    """Shardings of an optimizer state (real or abstract) whose params have `param_sharding`.

    Params-shaped leaves (Adam's moments) take their param's sharding, so the moments shard like
    the params they follow; every other leaf (step counters) is replicated.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_sharding,
                                 transform_non_params=lambda _: replicated)


def state_shardings(cfg: LearnerConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh,
                    rules=RULES) -> LearnerState:
    """A LearnerState of NamedShardings: params and the optimizer's params-shaped moments by the
    rules table, every other leaf (counts, step, rng) replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_shard = param_shardings(model_config, mesh, rules)
    abstract = jax.eval_shape(lambda: init_learner(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(model_config)), cfg, jax.random.key(0)))
    opt_shard = optimizer_shardings(make_optimizer(cfg), abstract.opt_state, p_shard, mesh)
    return LearnerState(params=p_shard, opt_state=opt_shard, step=replicated, rng=replicated)


def batch_shardings(batch: Batch, mesh: jax.sharding.Mesh, rules=RULES) -> Batch:
    """Shardings for a batch: its B axis on the rules table's "batch" mesh axes, the rest replicated."""

    def one(name, x):
        if x is None:
            return None
        axes = ["batch"] + [None] * (np.ndim(x) - 1)
        if name == "routing":
            axes = [None, "batch"] + [None] * (np.ndim(x) - 2)
        return logical_to_sharding(axes, mesh, rules, np.shape(x))

    return Batch(**{f.name: one(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def place_batch(batch: Batch, mesh: jax.sharding.Mesh, rules=RULES) -> Batch:
    """The batch on `mesh` by `batch_shardings`; host arrays become global arrays when the mesh spans
    several processes (each of which passes the same batch)."""
    return jax.tree.map(put_global, batch, batch_shardings(batch, mesh, rules))


def jit_train_step(cfg: LearnerConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None, *,
                   rules=RULES, donate: bool = False) -> Callable[[LearnerState, Batch], tuple[LearnerState, dict]]:
    """`ppo_update` jitted once; with a mesh, state in/out shardings come from the rules table.

    The returned callable places each batch on the mesh (B over the "batch" rule) before the call
    and runs the step under the mesh so that the model's activation constraints apply. Pass
    `shard_state(state, ...)` output (or any state; it is resharded by the jit) as the state.
    """
    step = functools.partial(ppo_update, config=cfg, model_config=model_config)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    s_shard = state_shardings(cfg, model_config, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(step, in_shardings=(s_shard, None), out_shardings=(s_shard, replicated),
                     donate_argnums=(0,) if donate else ())

    def run(state: LearnerState, batch: Batch):
        batch = place_batch(batch, mesh, rules)
        with use_mesh(mesh):
            return jitted(state, batch)

    return run


def jit_logprobs(cfg: LearnerConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None, *,
                 rules=RULES) -> Callable[[Any, Batch], jax.Array]:
    """`learner_logprobs(params, batch)` jitted once; with a mesh the batch is placed like a train step's
    (B over the "batch" rule) and the params keep their shardings. Returns [B, T] float32."""
    fn = jax.jit(functools.partial(learner_logprobs, config=cfg, model_config=model_config))
    if mesh is None:
        return fn

    def run(params: Any, batch: Batch) -> jax.Array:
        batch = place_batch(batch, mesh, rules)
        with use_mesh(mesh):
            return fn(params, batch)

    return run


def shard_state(state: LearnerState, cfg: LearnerConfig, model_config: ModelConfig, mesh: jax.sharding.Mesh,
                rules=RULES) -> LearnerState:
    """Places a LearnerState on `mesh` with `state_shardings` (host or local leaves become global
    arrays when the mesh spans several processes)."""
    return jax.tree.map(put_global, state, state_shardings(cfg, model_config, mesh, rules))
