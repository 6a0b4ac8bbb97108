"""The learner's Batch: its arrays, and how a step's groups become one (group advantages, sample
weights, one row per action, padded to fixed shapes).

Token alignment. Row b of a batch holds prompt + completion tokens; column t of every per-token
array ([B, T]) refers to the token at t + 1, which the model predicts at position t. So
`loss_mask[b, t] = 1` means "tokens[b, t + 1] is a completion token".

The shapes are fixed so that a run compiles a handful of learner programs, not one per step
(docs/architecture.md, "Invariants", 6): every batch has the same number of rows, `batch_rows`, and
its row length is the longest row rounded up to a bucket of SEQ_BUCKET tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import numpy as np

from ace.rl import duration_weights, group_advantages
from ace.train.queue import Group, Sample

SEQ_BUCKET = 512  # learner rows are padded to a multiple of this many tokens (few compiles)


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


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def batch_rows(*, tasks_per_step: int, group_size: int, actions_per_rollout: int, micro_batches: int,
               minibatches: int) -> int:
    """Rows of every learner batch: one per action of the N * G rollouts, rounded up so that the
    batch splits evenly into `minibatches` optimizer steps of `micro_batches` slices each."""
    return round_up(tasks_per_step * group_size * actions_per_rollout, micro_batches * minibatches)


def learner_batch(groups: Sequence[Group], group_weights: np.ndarray, *, group_size: int, advantage: str,
                  duration_weighting: bool, rows: int, max_len: int) -> tuple[Batch, int]:
    """The learner Batch of N groups: advantages within each group, one row per action.

    Args:
      groups: N complete groups of G samples; each sample's `extra["turns"]` holds its actions.
      group_weights: [N] float loss weight of each group (staleness reweighting; 1 when fresh).
      group_size: G.
      advantage: an `ace.rl` advantage mode ("grpo", "dr_grpo", "rloo").
      duration_weighting: weight each sample by its duration over the batch mean (Yang et al. 2025).
      rows: the fixed row count B (`batch_rows`); filler rows have weight 0.
      max_len: the longest possible row, prompt + completion tokens.
    Returns:
      (Batch of [B, T] arrays, T the longest row rounded up to SEQ_BUCKET and capped at max_len;
      the number of real rows).
    Raises:
      RuntimeError when the actions need more than `rows` rows.
    """
    rewards = np.asarray([[s.reward for s in g.samples] for g in groups], np.float32)
    adv = np.asarray(group_advantages(rewards, group_size, mode=advantage).advantages)
    if duration_weighting:
        dur = np.asarray(duration_weights(np.asarray([s.duration_s for g in groups for s in g.samples]),
                                          normalize="batch_mean")).reshape(rewards.shape)
    else:
        dur = np.ones_like(rewards)
    samples, row_adv, row_w = [], [], []
    for i, g in enumerate(groups):
        for j, s in enumerate(g.samples):
            turns = s.extra["turns"]
            for prompt, output, logp, routing in turns:
                samples.append(Sample(task_id=g.task_id, prompt_ids=prompt, output_ids=output, rollout_logprobs=logp,
                                      reward=s.reward, duration_s=s.duration_s, policy_version=s.policy_version,
                                      routing=routing))
                row_adv.append(adv[i, j])
                # Every turn of an episode shares its advantage; together they weigh as one sample.
                row_w.append(dur[i, j] * group_weights[i] / len(turns))
    if len(samples) > rows:
        raise RuntimeError(f"{len(samples)} learner rows exceed the fixed batch of {rows}")
    pad = rows - len(samples)
    filler = Sample(task_id=-1, prompt_ids=[0], output_ids=[], rollout_logprobs=[], reward=0.0, duration_s=0.0,
                    policy_version=0)
    # Rows are padded to the longest one rounded up to a bucket, not to the longest possible
    # row: attention cost grows with T^2, and a few buckets compile only a few step variants.
    longest = max(len(r.prompt_ids) + len(r.output_ids) for r in samples)
    pad_to = min(max_len, round_up(longest, SEQ_BUCKET))
    batch = make_batch(samples + [filler] * pad, np.asarray(row_adv + [0.0] * pad, np.float32), pad_to=pad_to,
                       sample_weights=np.asarray(row_w + [0.0] * pad, np.float32))
    return batch, len(samples)
