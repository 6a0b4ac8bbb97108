"""Turning a step's groups into the learner's Batch: group advantages, sample weights, one row per
action, padded to fixed shapes.

The shapes are fixed so that a run compiles a handful of learner programs, not one per step
(docs/architecture.md, "Invariants", 6): every batch has the same number of rows, `batch_rows`, and
its row length is the longest row rounded up to a bucket of SEQ_BUCKET tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ace.rl import duration_weights, group_advantages
from ace.train.learner import Batch, make_batch
from ace.train.queue import Group, Sample

SEQ_BUCKET = 512  # learner rows are padded to a multiple of this many tokens (few compiles)


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
