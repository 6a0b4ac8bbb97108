"""The GRPO learner: state, batch construction, and `train_step` as a pure, shardable function.

`train_step(state, batch) -> (state, metrics)` recomputes the learner's logprobs of the batch with
the chunked logprob function, takes the clipped GRPO loss of `ace.rl.policy_loss` (plus an
optional KL to a reference policy, an entropy bonus and the MoE load-balancing loss), accumulates
gradients over micro-batches with `lax.scan`, and applies AdamW with global-norm clipping.
`ppo_update(state, batch)` splits the batch into `minibatches` and takes one `train_step` on each
(verl's PPO mini-batches), all anchored to the same proximal logprobs `Batch.old_logp`, which the
caller computes once with `learner_logprobs` before the update (decoupled PPO, see
`ace.rl.losses`). `jit_train_step` compiles `ppo_update` once with params and optimizer state
sharded by the rules table.

Every logprob (behaviour, proximal, current, reference) is of the same distribution: softmax of
the logits divided by the sampling temperature (`LearnerConfig.temperature`), before top-k/top-p
truncation, which is what both rollout engines return.

Token alignment. Row b of a batch holds prompt + completion tokens; column t of every per-token
array ([B, T]) refers to the token at t + 1, which the model predicts at position t. So
`loss_mask[b, t] = 1` means "tokens[b, t + 1] is a completion token".
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

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
from ace.rl.registry import KL_ESTIMATORS
from ace.train.multihost import put_global

SCHEDULES = ("cosine", "constant")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
COMPUTE_DTYPES = ("float32", "bfloat16")


class LearnerConfigError(ValueError):
    """A LearnerConfig field out of range. `field`, `value` and `expected` are kept apart so that a
    caller that built the config from other names (the trainer, from Hydra's `train.*` keys) can
    name the key its user wrote."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"LearnerConfig.{field} must be {expected}, got {value!r}")
        self.field, self.value, self.expected = field, value, expected


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Optimiser and loss settings, validated at construction.

    lr, warmup_steps, schedule ("cosine" decays to lr * min_lr_ratio at total_steps, "constant"),
    weight_decay (AdamW, applied to matrices only, not to norm scales), max_grad_norm (global clip),
    micro_batches (gradient accumulation; the batch size must be a multiple of it),
    eps_low / eps_high / agg / dual_clip / tis_cap: see `ace.rl.policy_loss` (tis_cap set = truncated
    importance weights against the rollout engine's logprobs), kl_coef / kl_kind: KL(pi || pi_ref)
    penalty (needs `Batch.ref_logp` when kl_coef > 0), compute_dtype: forward/backward dtype (params
    stay float32 masters), logprob_chunk_size: positions per chunk of the logprob function,
    routing_replay: replay `Batch.routing` in MoE layers, aux_loss_coef: MoE load-balancing weight
    (None = the model config's `router_aux_loss_coef`), remat: recompute layers in the backward,
    mu_dtype: dtype of Adam's first moment (None = the params'; "bfloat16" saves 2 bytes a param,
    what lets the 30B learner fit four 141 GB devices, see hydra_configs/exp/ace30b.yaml),
    temperature: the sampling temperature every logprob is computed at (0 = greedy sampling, whose
    logprobs the engines report at temperature 1), entropy_coef: weight of the entropy bonus
    (loss −= entropy_coef · token-mean entropy), norm_len: the constant normaliser of
    agg="seq_mean_token_sum_norm" (None = the padded row length T, which varies with the batch),
    minibatches: optimizer steps per batch in `ppo_update` (the batch is split into this many).
    """

    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine"
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    micro_batches: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token_mean"
    dual_clip: float | None = None
    tis_cap: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    compute_dtype: str = "float32"
    logprob_chunk_size: int = 512
    routing_replay: bool = False
    aux_loss_coef: float | None = None
    remat: bool = False
    mu_dtype: str | None = None
    temperature: float = 1.0
    entropy_coef: float = 0.0
    norm_len: int | None = None
    minibatches: int = 1

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise LearnerConfigError(name, getattr(self, name), expected)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(self.lr > 0, "lr", "> 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(is_int(self.total_steps) and self.total_steps > self.warmup_steps, "total_steps",
             f"an int > warmup_steps ({self.warmup_steps})")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "> 0")
        need(0.0 <= self.adam_b1 < 1.0, "adam_b1", "in [0, 1)")
        need(0.0 <= self.adam_b2 < 1.0, "adam_b2", "in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "> 0")
        need(is_int(self.micro_batches) and self.micro_batches >= 1, "micro_batches", "an int >= 1")
        need(0.0 <= self.eps_low < 1.0, "eps_low", "in [0, 1)")
        need(self.eps_high >= 0, "eps_high", ">= 0")
        # Only modes whose value is a sum over micro-batches accumulate exactly (see _loss_shares).
        need(self.agg in AGGREGATIONS, "agg", f"one of {AGGREGATIONS}")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip", "None or > 1")
        need(self.tis_cap is None or self.tis_cap > 0, "tis_cap", "None or > 0")
        need(self.kl_coef >= 0, "kl_coef", ">= 0")
        need(self.kl_kind in KL_ESTIMATORS, "kl_kind", f"a registered KL estimator {KL_ESTIMATORS.names()}")
        need(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {COMPUTE_DTYPES}")
        need(is_int(self.logprob_chunk_size) and self.logprob_chunk_size > 0, "logprob_chunk_size",
             "a positive int")
        need(self.aux_loss_coef is None or self.aux_loss_coef >= 0, "aux_loss_coef", "None or >= 0")
        need(self.mu_dtype in (None, "float32", "bfloat16"), "mu_dtype", "None, 'float32' or 'bfloat16'")
        need(self.temperature >= 0, "temperature", ">= 0")
        need(self.entropy_coef >= 0, "entropy_coef", ">= 0")
        need(self.norm_len is None or (is_int(self.norm_len) and self.norm_len > 0), "norm_len",
             "None or an int > 0")
        need(self.norm_len is None or self.agg == "seq_mean_token_sum_norm", "norm_len",
             f"None with agg={self.agg!r} (it is the normaliser of 'seq_mean_token_sum_norm')")
        need(is_int(self.minibatches) and self.minibatches >= 1, "minibatches", "an int >= 1")

    @property
    def logprob_temperature(self) -> float:
        """The temperature logprobs are computed at: the sampling one, or 1 for greedy sampling."""
        return self.temperature if self.temperature > 0 else 1.0


@flax.struct.dataclass
class LearnerState:
    """params: float32 master weights; opt_state: optax state; step: int32 scalar; rng: PRNG key."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


@flax.struct.dataclass
class Batch:
    """One learner batch of B sequences of T tokens (see the module docstring for the alignment).

    tokens: [B, T] int32 prompt + completion, right-padded with 0.
    positions: [B, T] int32 RoPE positions.
    loss_mask: [B, T] float32, 1 where tokens[:, t + 1] is a completion token.
    old_logp: [B, T] float32 proximal logprob of tokens[:, t + 1]: the learner's, with the params
      at the start of this update (`learner_logprobs`); the PPO clip is relative to it.
    rollout_logp: [B, T] float32 behaviour logprob of the same tokens returned by the rollout engine.
    advantages: [B] float32. sample_weights: [B] float32 loss multipliers (duration, staleness).
    ref_logp: optional [B, T] float32 logprobs of the reference policy (for the KL term).
    routing: optional [L, B, T, k] int32 routed experts to replay (MoE).
    """

    tokens: jax.Array
    positions: jax.Array
    loss_mask: jax.Array
    old_logp: jax.Array
    rollout_logp: jax.Array
    advantages: jax.Array
    sample_weights: jax.Array
    ref_logp: jax.Array | None = None
    routing: jax.Array | None = None

    def check(self) -> None:
        """Raises ValueError naming the first field whose shape disagrees with tokens [B, T]."""
        if self.tokens.ndim != 2:
            raise ValueError(f"Batch.tokens must be [B, T], got {self.tokens.shape}")
        b, t = self.tokens.shape
        for name in ("positions", "loss_mask", "old_logp", "rollout_logp", "ref_logp"):
            value = getattr(self, name)
            if value is not None and value.shape != (b, t):
                raise ValueError(f"Batch.{name} must be [B, T] = {(b, t)}, got {value.shape}")
        for name in ("advantages", "sample_weights"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"Batch.{name} must be [B] = {(b,)}, got {getattr(self, name).shape}")
        if self.routing is not None and (self.routing.ndim != 4 or self.routing.shape[1:3] != (b, t)):
            raise ValueError(f"Batch.routing must be [L, B, T, k] with B, T = {(b, t)}, got {self.routing.shape}")


def _stack_routing(samples: Sequence[Any], pad_to: int) -> np.ndarray | None:
    """[L, B, T] x k routed experts from the samples' own `routing` ([L, P + T, k] each), or None
    when no sample has any. Positions with no known experts (-1: a sample's last token, padding,
    samples without routing) get experts 0..k-1: any valid set will do, since no loss token is
    predicted from them and causal attention keeps them from earlier positions."""
    known = [np.asarray(s.routing) for s in samples if getattr(s, "routing", None) is not None]
    if not known:
        return None
    n_layers, _, k = known[0].shape
    out = np.broadcast_to(np.arange(k, dtype=np.int32), (n_layers, len(samples), pad_to, k)).copy()
    for i, s in enumerate(samples):
        if getattr(s, "routing", None) is None:
            continue
        r = np.asarray(s.routing, np.int32)
        if r.shape[0] != n_layers or r.shape[2] != k:
            raise ValueError(f"make_batch: sample {i} routing has shape {r.shape}, expected [L={n_layers}, P + T, "
                             f"k={k}] like the other samples")
        have = np.all(r >= 0, axis=-1)  # [L, n]
        rows = out[:, i, :r.shape[1]]
        rows[have] = r[have]
    return out


def make_batch(samples: Sequence[Any], advantages, *, pad_to: int, sample_weights=None,
               routing=None) -> Batch:
    """Builds a Batch on the host from queue `Sample`s (prompt_ids, output_ids, rollout_logprobs).

    Args:
      samples: B samples; sample b becomes row b.
      advantages: [B] floats, one per sample.
      pad_to: T, the row length; prompt + completion of every sample must fit.
      sample_weights: optional [B] floats (default 1).
      routing: optional [L, B, T, k] ints to attach; by default built from the samples' own
        `routing` when any has it (see `_stack_routing`).
    Returns:
      A Batch of numpy arrays; old_logp starts as a copy of rollout_logp (fill it with
      `learner_logprobs` to use the learner's own numbers).
    """
    b = len(samples)
    if b == 0:
        raise ValueError("make_batch: got no samples")
    advantages = np.asarray(advantages, np.float32)
    if advantages.shape != (b,):
        raise ValueError(f"make_batch: advantages must be [B] = ({b},), got shape {advantages.shape}")
    weights = np.ones(b, np.float32) if sample_weights is None else np.asarray(sample_weights, np.float32)
    if weights.shape != (b,):
        raise ValueError(f"make_batch: sample_weights must be [B] = ({b},), got shape {weights.shape}")
    tokens = np.zeros((b, pad_to), np.int32)
    mask = np.zeros((b, pad_to), np.float32)
    rollout_logp = np.zeros((b, pad_to), np.float32)
    for i, s in enumerate(samples):
        prompt, output = list(s.prompt_ids), list(s.output_ids)
        if not prompt:
            raise ValueError(f"make_batch: sample {i} (task {s.task_id}) has an empty prompt; the first "
                             "completion token needs a prompt token to be predicted from")
        n = len(prompt) + len(output)
        if n > pad_to:
            raise ValueError(f"make_batch: sample {i} (task {s.task_id}) has {n} tokens, more than pad_to={pad_to}")
        tokens[i, :n] = prompt + output
        # Completion token j sits at len(prompt) + j and is predicted one position earlier.
        cols = slice(len(prompt) - 1, n - 1)
        mask[i, cols] = 1.0
        rollout_logp[i, cols] = np.asarray(s.rollout_logprobs, np.float32)
    positions = np.broadcast_to(np.arange(pad_to, dtype=np.int32), (b, pad_to)).copy()
    if routing is None:
        routing = _stack_routing(samples, pad_to)
    batch = Batch(tokens=tokens, positions=positions, loss_mask=mask, old_logp=rollout_logp.copy(),
                  rollout_logp=rollout_logp, advantages=advantages, sample_weights=weights,
                  routing=None if routing is None else np.asarray(routing, np.int32))
    batch.check()
    return batch


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
        pg, metrics = policy_loss(logp, mb.old_logp, mb.advantages, mb.loss_mask, eps_low=cfg.eps_low,
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
