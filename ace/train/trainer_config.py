"""The AceGRPO loop's settings: `TrainerConfig`, read from the composed Hydra config and validated.

The learner's own settings are derived from it (`learner_config()`), so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ace.rollout.engine import SamplingParams
from ace.train.learner import LearnerConfig


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything the AceGRPO loop reads, validated at construction (Hydra keys in brackets).

    steps, group_size (G), tasks_per_step (N), micro_batches, lr, warmup_steps, schedule,
    weight_decay, max_grad_norm, advantage, loss_agg, eps_low, eps_high, dual_clip, kl_coef, kl_kind,
    entropy_coef, norm_len, minibatches, recompute_proximal, routing_replay, max_staleness,
    staleness_policy, staleness_decay, tis_cap, duration_weighting, stepwise, checkpoint_every,
    compute_dtype, remat, adam_mu_dtype, exec_workers [train.*]; temperature, top_p, top_k, max_new_tokens,
    max_prompt_tokens, workers, sync_every (push weights every k steps) [rollout.*]; max_steps, exec_timeout_s, instrument [env.*];
    children, sync [ablation.*]; seed.
    """

    steps: int
    group_size: int
    tasks_per_step: int
    lr: float
    max_new_tokens: int
    max_prompt_tokens: int
    max_steps: int
    micro_batches: int = 1
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    advantage: str = "grpo"
    loss_agg: str = "seq_mean_token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    norm_len: int | None = None
    minibatches: int = 1
    recompute_proximal: bool = True
    routing_replay: bool = False
    max_staleness: int = 2
    staleness_policy: str = "drop"
    staleness_decay: float = 0.5
    tis_cap: float | None = 2.0
    duration_weighting: bool = False
    stepwise: bool = True
    checkpoint_every: int = 10
    compute_dtype: str = "float32"
    remat: bool = False
    adam_mu_dtype: str | None = None
    exec_workers: int = 2
    sync_every: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    workers: int = 2
    exec_timeout_s: float = 60.0
    instrument: bool = True
    children: bool = True
    sync: bool = False
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"trainer config {name}={getattr(self, name)!r}: expected {expected}")

        for name in ("steps", "group_size", "tasks_per_step", "max_new_tokens", "max_prompt_tokens", "max_steps",
                     "micro_batches", "minibatches", "checkpoint_every", "exec_workers", "workers", "sync_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1")
        need(self.group_size >= 2, "group_size", ">= 2 (a group of one has no relative advantage)")
        need(self.staleness_policy in ("drop", "reweight"), "staleness_policy", "'drop' or 'reweight'")
        need(self.max_staleness >= 0, "max_staleness", ">= 0")
        need(0.0 < self.staleness_decay <= 1.0, "staleness_decay", "in (0, 1]")
        need(self.norm_len is None or self.loss_agg == "seq_mean_token_sum_norm", "norm_len",
             f"null with loss_agg={self.loss_agg!r} (it is the constant of 'seq_mean_token_sum_norm')")
        need(self.exec_timeout_s > 0, "exec_timeout_s", "> 0")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        # The learner's own checks (lr, clip ranges, aggregation, dtype) run here too.
        self.learner_config()

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        """From the composed Hydra config (as a plain mapping): train.*, rollout.*, env.*, ablation.*, seed."""
        # Only the keys read below are touched: another section may hold a mandatory value ("???")
        # that this run never needs (env.data_dir in a dry run).
        train = dict(cfg["train"])
        rollout, env, ablation = (cfg[k] for k in ("rollout", "env", "ablation"))
        train.pop("competitions", None)  # read by the experiment (which competitions), not the loop
        fields = {f.name for f in dataclasses.fields(cls)}
        renamed = {"loss_agg": train.pop("loss_agg", "seq_mean_token_mean")}
        kwargs = {k: v for k, v in train.items() if k in fields}
        unknown = sorted(set(train) - fields)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}; expected a subset of {sorted(fields)}")
        kwargs.update(renamed)
        kwargs.update({k: rollout[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                               "max_prompt_tokens", "workers")})
        kwargs["sync_every"] = int(rollout.get("sync_every", 1))
        kwargs.update({k: env[k] for k in ("max_steps", "exec_timeout_s", "instrument")})
        kwargs.update(children=bool(ablation["children"]), sync=bool(ablation["sync"]), seed=int(cfg["seed"]))
        return cls(**kwargs)

    def learner_config(self) -> LearnerConfig:
        return LearnerConfig(
            lr=float(self.lr), warmup_steps=int(self.warmup_steps), schedule=self.schedule,
            total_steps=max(int(self.steps), int(self.warmup_steps) + 1), weight_decay=float(self.weight_decay),
            max_grad_norm=float(self.max_grad_norm), micro_batches=int(self.micro_batches),
            eps_low=float(self.eps_low), eps_high=float(self.eps_high), agg=self.loss_agg,
            dual_clip=None if self.dual_clip is None else float(self.dual_clip),
            tis_cap=None if self.tis_cap is None else float(self.tis_cap), kl_coef=float(self.kl_coef),
            kl_kind=self.kl_kind, entropy_coef=float(self.entropy_coef),
            # Dr. GRPO's constant: a row holds one action, so the longest possible row is max_new_tokens.
            norm_len=(int(self.norm_len or self.max_new_tokens) if self.loss_agg == "seq_mean_token_sum_norm"
                      else None),
            minibatches=int(self.minibatches), temperature=float(self.temperature),
            routing_replay=bool(self.routing_replay), compute_dtype=self.compute_dtype, remat=bool(self.remat),
            mu_dtype=self.adam_mu_dtype)

    @property
    def actions_per_rollout(self) -> int:
        return 1 if self.stepwise else self.max_steps

    def sampling(self, stop_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, stop_token_ids=tuple(stop_ids))
