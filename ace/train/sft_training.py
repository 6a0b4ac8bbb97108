"""Supervised fine-tuning: cross-entropy on the action tokens, the AdamW step and the loop.

`sft_loss` is the masked cross-entropy (plus the MoE load-balancing loss), `sft_step` one AdamW
step on it, and `sft_train` the loop over length-bucketed batches of the rows `ace.train.sft_tokens`
makes, on one device or sharded over a mesh. The stage that calls it is `ace.train.sft`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ace.models.configs import ModelConfig
from ace.models.logprobs import model_token_logprobs
from ace.models.sharding import RULES, logical_to_sharding, use_mesh
from ace.train.learner import LearnerConfig, LearnerState, init_learner, make_optimizer, state_shardings
from ace.train.learner import _schedule as learning_rate_schedule  # the optimizer's own schedule, for logging


def sft_loss(params, model_config: ModelConfig, tokens: jax.Array, loss_mask: jax.Array, *,
             aux_loss_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the masked tokens, plus the MoE load-balancing loss.

    Args:
      tokens: [B, T] int32; loss_mask: [B, T], 1 = tokens[b, t] is a target (predicted at t - 1).
      aux_loss_coef: weight of the router's load-balancing loss (0 for dense models).
    Returns:
      (loss scalar, {"ce", "aux_loss", "tokens", "token_prob"}); token_prob is the mean probability
      the model gives each target token.
    """
    if loss_mask.shape != tokens.shape or tokens.ndim != 2:
        raise ValueError(f"sft_loss: tokens and loss_mask must both be [B, T], got {tokens.shape} and {loss_mask.shape}")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    # Segment 0 marks padding, which the router's load-balancing statistics must ignore.
    last = jnp.max(jnp.where(loss_mask > 0, jnp.arange(t)[None, :], -1), axis=1)
    segment_ids = (jnp.arange(t)[None, :] <= last[:, None]).astype(jnp.int32)
    logp, aux = model_token_logprobs(params, model_config, tokens, positions, targets, segment_ids=segment_ids)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    ce = -jnp.sum(logp * weights) / count
    loss = ce + aux_loss_coef * aux.aux_loss
    return loss, {"ce": ce, "aux_loss": aux.aux_loss, "tokens": jnp.sum(weights),
                  "token_prob": jnp.sum(jnp.exp(logp) * weights) / count}


def sft_step(state: LearnerState, batch: tuple[jax.Array, jax.Array], *, model_config: ModelConfig,
             optimizer, aux_loss_coef: float) -> tuple[LearnerState, dict[str, jax.Array]]:
    """One AdamW step on `sft_loss`; pure (jit it with `functools.partial` over the keywords).

    Args:
      state: LearnerState (float32 params, optax state, int32 step, PRNG key).
      batch: (tokens [B, T] int32, loss_mask [B, T] int32) as `tokenize_examples` makes them.
    Returns:
      (new state, {"loss", "ce", "aux_loss", "tokens", "token_prob", "grad_norm"} float32 scalars).
    """
    tokens, loss_mask = batch
    grad_fn = jax.value_and_grad(functools.partial(sft_loss, model_config=model_config, aux_loss_coef=aux_loss_coef),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens=tokens, loss_mask=loss_mask)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    rng, _ = jax.random.split(state.rng)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}
    return (LearnerState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1, rng=rng),
            {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})


def _batches(lengths: np.ndarray, batch_size: int, epochs: int, seed: int,
             buckets: int) -> list[tuple[np.ndarray, int]]:
    """(row indices, row length) of every step.

    Rows are split by length into `buckets` groups of about equal count, each padded only to its own
    longest row (rounded up to 8), since [T, T] attention makes padding costly; each group compiles
    once. Every epoch reshuffles rows within groups and the order of all batches; a group's last
    batch is filled with row -1 (no loss) so that shapes stay fixed.
    """
    rng = np.random.default_rng(seed)
    groups = [g for g in np.array_split(np.argsort(lengths, kind="stable"), buckets) if len(g)]
    widths = [int(-(-lengths[g].max() // 8) * 8) for g in groups]
    out = []
    for _ in range(epochs):
        epoch = []
        for g, width in zip(groups, widths):
            order = rng.permutation(g)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                epoch.append((np.concatenate([rows, np.full(batch_size - len(rows), -1)]), width))
        out.extend(epoch[i] for i in rng.permutation(len(epoch)))
    return out


def sft_train(params, model_config: ModelConfig, tokens: np.ndarray, loss_mask: np.ndarray, *, epochs: int,
              batch_size: int, lr: float, seed: int, mesh: jax.sharding.Mesh | None = None, log_every: int = 10,
              warmup_steps: int = 5, max_grad_norm: float = 1.0, length_buckets: int = 2,
              progress: bool = True) -> tuple[Any, list[dict]]:
    """Fine-tune `params` on (tokens, loss_mask) with AdamW and a warmup + cosine learning rate.

    Args:
      params: the model's params tree; model_config: its config.
      tokens: [N, T] int32; loss_mask: [N, T] (see `tokenize_examples`).
      epochs, batch_size: passes over the N rows and rows per step (a partial last batch is padded
        with loss-free rows).
      lr: peak learning rate; seed: shuffling.
      mesh: when given, params and optimizer state are sharded by the rules table and the batch's
        rows over the "batch" rule's mesh axes.
      log_every: steps between progress-bar updates and history entries.
      warmup_steps, max_grad_norm: linear warmup length and global gradient-norm clip.
      length_buckets: groups of rows padded to their own length (one compilation each).
    Returns:
      (params, history): history is a list of {"step", "epoch", "loss", "ce", "token_prob", "grad_norm",
      "lr", "tokens"} dicts, one every `log_every` steps and one for the last step.
    """
    tokens, loss_mask = np.asarray(tokens, np.int32), np.asarray(loss_mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must both be [N, T], got {tokens.shape} and {loss_mask.shape}")
    if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={model_config.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"sft_train: {name} must be an int >= 1, got {value!r}")
    lengths = np.max(np.where(loss_mask > 0, np.arange(tokens.shape[1])[None, :] + 1, 1), axis=1)
    steps = _batches(lengths, batch_size, epochs, seed, length_buckets)
    cfg = LearnerConfig(lr=lr, warmup_steps=min(warmup_steps, len(steps) - 1), schedule="cosine",
                        total_steps=max(len(steps), 1 + min(warmup_steps, len(steps) - 1)),
                        max_grad_norm=max_grad_norm)
    optimizer = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    step_fn = functools.partial(sft_step, model_config=model_config, optimizer=optimizer,
                                aux_loss_coef=model_config.router_aux_loss_coef if model_config.is_moe else 0.0)
    # A copy, because the jitted step donates its state and the caller keeps `params`.
    state = init_learner(jax.tree.map(jnp.array, params), cfg, jax.random.key(seed))
    if mesh is None:
        jitted = jax.jit(step_fn, donate_argnums=(0,))
        place = lambda x: x  # noqa: E731
        context = contextlib.nullcontext
    else:
        shardings = state_shardings(cfg, model_config, mesh)
        state = jax.device_put(state, shardings)
        row = logical_to_sharding(("batch", None), mesh, RULES, (batch_size, tokens.shape[1]))
        # Rows only split over the batch axes, so one sharding serves every bucket width.
        jitted = jax.jit(step_fn, in_shardings=(shardings, (row, row)), donate_argnums=(0,),
                         out_shardings=(shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        place = lambda x: jax.device_put(x, row)  # noqa: E731
        context = functools.partial(use_mesh, mesh)
    padded_tokens = np.concatenate([tokens, np.zeros_like(tokens[:1])])  # row -1: loss-free padding
    padded_mask = np.concatenate([loss_mask, np.zeros_like(loss_mask[:1])])
    history: list[dict] = []
    per_epoch = len(steps) // epochs
    bar = tqdm(total=len(steps), desc="sft", disable=not progress, leave=False)
    try:
        with context():
            for i, (rows, width) in enumerate(steps):
                batch = (place(padded_tokens[rows, :width]), place(padded_mask[rows, :width]))
                state, metrics = jitted(state, batch)
                if (i + 1) % log_every == 0 or i + 1 == len(steps):
                    entry = {"step": i + 1, "epoch": i // per_epoch + 1, "lr": float(schedule(i)),
                             **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                    history.append(entry)
                    bar.set_postfix(ce=f"{entry['ce']:.3f}", p=f"{entry['token_prob']:.2f}")
                bar.update(1)
    finally:
        bar.close()
    return state.params, history
