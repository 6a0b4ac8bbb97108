"""The learner's settings: `LearnerConfig`, the optimiser and loss of `ace.train.learner`, validated.

The trainer builds it from Hydra's `train.*` keys (`ace.train.trainer_config`); SFT and tests build
it directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ace.rl.registry import KL_ESTIMATORS

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
    minibatches: optimizer steps per batch in `ppo_update` (the batch is split into this many),
    proximal_from_step: take the proximal logprobs from the update's own forward (stop-gradient)
    instead of `Batch.old_logp`. With one optimizer step per batch (minibatches = 1) the proximal
    policy is the params being differentiated, so this is exact and saves the separate proximal
    forward per batch; with several minibatches it would not be, and is refused.
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
    proximal_from_step: bool = False

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
        need(isinstance(self.proximal_from_step, bool), "proximal_from_step", "a bool")
        need(not self.proximal_from_step or self.minibatches == 1, "proximal_from_step",
             f"False with minibatches={self.minibatches} (the proximal policy is the params before the "
             "first of several steps; compute Batch.old_logp with learner_logprobs instead)")

    @property
    def logprob_temperature(self) -> float:
        """The temperature logprobs are computed at: the sampling one, or 1 for greedy sampling."""
        return self.temperature if self.temperature > 0 else 1.0
