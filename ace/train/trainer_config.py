"""The AceGRPO loop's settings: `TrainerConfig`, read from the composed Hydra config and validated.

The learner's settings live in one place, `LearnerConfig`, which the trainer's config holds as
`learner`. The Hydra layout is unchanged: they are `train.*` keys beside the loop's own (some under
another name, `LEARNER_KEYS`), so users' overrides keep working, and an error names the key the
user wrote (`train.loss_agg`, not `LearnerConfig.agg`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ace.rollout.engine import SamplingParams
from ace.train.learner_config import LearnerConfig, LearnerConfigError

# The learner's train.<key> -> its LearnerConfig field.
LEARNER_KEYS = {
    "lr": "lr", "warmup_steps": "warmup_steps", "schedule": "schedule", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "micro_batches": "micro_batches", "loss_agg": "agg",
    "eps_low": "eps_low", "eps_high": "eps_high", "dual_clip": "dual_clip", "tis_cap": "tis_cap",
    "kl_coef": "kl_coef", "kl_kind": "kl_kind", "entropy_coef": "entropy_coef", "norm_len": "norm_len",
    "minibatches": "minibatches", "routing_replay": "routing_replay", "compute_dtype": "compute_dtype",
    "remat": "remat", "adam_mu_dtype": "mu_dtype",
}
# The loop's value of a learner key that is absent, where it differs from LearnerConfig's library
# default (hydra_configs/config.yaml sets them all; these are for configs built by hand).
LEARNER_DEFAULTS = {"schedule": "constant", "loss_agg": "seq_mean_token_mean", "tis_cap": 2.0}
# Learner fields derived from a key of another name: LearnerConfig.total_steps from train.steps,
# LearnerConfig.temperature from rollout.temperature (invariant 5: every logprob is of the
# sampling distribution).
_DERIVED = {"total_steps": "steps", "temperature": "temperature"}
_FLOATS = ("lr", "weight_decay", "max_grad_norm", "eps_low", "eps_high", "kl_coef", "entropy_coef")
_OPTIONAL_FLOATS = ("dual_clip", "tis_cap")
_BOOLS = ("routing_replay", "remat")

# The Hydra section of each loop setting outside `train:` (None: top level).
SECTIONS = {
    **dict.fromkeys(("temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_tokens", "workers",
                     "sync_every"), "rollout"),
    **dict.fromkeys(("max_steps", "exec_timeout_s", "instrument"), "env"),
    **dict.fromkeys(("children", "sync"), "ablation"),
    "seed": None,
}
# train.* keys the experiment reads, not the loop.
_NOT_THE_LOOPS = ("competitions",)


def hydra_key(name: str) -> str:
    """The dotted Hydra key of setting `name` (`train.lr`, `rollout.temperature`, `seed`)."""
    section = SECTIONS.get(name, "train")
    return f"{section}.{name}" if section else name


def learner_config(train: Mapping[str, Any], *, steps: int, temperature: float,
                   max_new_tokens: int) -> LearnerConfig:
    """The LearnerConfig of the learner's `train.*` keys (those in LEARNER_KEYS; others are ignored).

    Args:
      train: Hydra `train:` keys; an absent one takes LEARNER_DEFAULTS, else LearnerConfig's default.
      steps: train.steps, the length of the learning-rate schedule.
      temperature: rollout.temperature, the distribution every logprob is of.
      max_new_tokens: rollout.max_new_tokens, the Dr. GRPO constant when train.norm_len is null.
    Raises:
      ValueError naming the offending Hydra key (`train.loss_agg='sum': expected one of ...`).
    """
    keys = {**LEARNER_DEFAULTS, **{k: v for k, v in train.items() if k in LEARNER_KEYS}}
    if "lr" not in keys:
        raise ValueError("train.lr is missing: the learner needs a learning rate")
    for name in _FLOATS + _OPTIONAL_FLOATS:
        if name in keys and not (keys[name] is None and name in _OPTIONAL_FLOATS):
            keys[name] = _number(name, keys[name])
    for name in _BOOLS:
        if name in keys:
            keys[name] = bool(keys[name])
    agg = keys["loss_agg"]
    if keys.get("norm_len") is not None and agg != "seq_mean_token_sum_norm":
        raise ValueError(f"train.norm_len={keys['norm_len']!r}: expected null with train.loss_agg={agg!r} "
                         "(it is the constant of 'seq_mean_token_sum_norm')")
    if agg == "seq_mean_token_sum_norm":
        # Dr. GRPO's constant: a row holds one action, so the longest possible row is max_new_tokens.
        keys["norm_len"] = keys.get("norm_len") or max_new_tokens
    kwargs = {LEARNER_KEYS[k]: v for k, v in keys.items()}
    warmup = kwargs.get("warmup_steps", 0)
    # A schedule one step longer than its warmup at least (LearnerConfig needs total > warmup).
    kwargs["total_steps"] = max(steps, warmup + 1) if _is_int(steps) and _is_int(warmup) else steps
    kwargs["temperature"] = _number("temperature", temperature)
    try:
        return LearnerConfig(**kwargs)
    except LearnerConfigError as err:
        by_field = {**{f: k for k, f in LEARNER_KEYS.items()}, **_DERIVED}
        name = by_field.get(err.field)
        if name is None:  # a field no key sets: LearnerConfig's own message says it best
            raise
        raise ValueError(f"{hydra_key(name)}={err.value!r}: expected {err.expected}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{hydra_key(name)}={value!r}: expected a number") from None


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Everything the AceGRPO loop reads, validated at construction (Hydra keys in brackets).

    steps, group_size (G), tasks_per_step (N), advantage, recompute_proximal, max_staleness,
    staleness_policy, staleness_decay, duration_weighting, stepwise, checkpoint_every, exec_workers
    [train.*]; temperature, top_p, top_k, max_new_tokens, max_prompt_tokens, workers, sync_every
    (push weights every k steps) [rollout.*]; max_steps, exec_timeout_s, instrument [env.*];
    children, sync [ablation.*]; seed; and `learner`, the optimiser and loss settings, from the
    learner's train.* keys (LEARNER_KEYS). Build it with `from_cfg` (a Hydra config) or `from_keys`
    (flat keys); `learner.temperature` must equal `temperature`.
    """

    steps: int
    group_size: int
    tasks_per_step: int
    max_new_tokens: int
    max_prompt_tokens: int
    max_steps: int
    learner: LearnerConfig
    advantage: str = "grpo"
    recompute_proximal: bool = True
    max_staleness: int = 2
    staleness_policy: str = "drop"
    staleness_decay: float = 0.5
    duration_weighting: bool = False
    stepwise: bool = True
    checkpoint_every: int = 10
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
                raise ValueError(f"{hydra_key(name)}={getattr(self, name)!r}: expected {expected}")

        for name in ("steps", "group_size", "tasks_per_step", "max_new_tokens", "max_prompt_tokens", "max_steps",
                     "checkpoint_every", "exec_workers", "workers", "sync_every"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(self.group_size >= 2, "group_size", ">= 2 (a group of one has no relative advantage)")
        need(self.staleness_policy in ("drop", "reweight"), "staleness_policy", "'drop' or 'reweight'")
        need(self.max_staleness >= 0, "max_staleness", ">= 0")
        need(0.0 < self.staleness_decay <= 1.0, "staleness_decay", "in (0, 1]")
        need(self.exec_timeout_s > 0, "exec_timeout_s", "> 0")
        need(isinstance(self.learner, LearnerConfig), "learner", "a LearnerConfig")
        need(self.learner.temperature == self.temperature, "temperature",
             f"the learner's temperature ({self.learner.temperature!r}): every logprob is of the sampling "
             "distribution")
        need(not self.learner.proximal_from_step or self.recompute_proximal, "learner.proximal_from_step",
             "False when recompute_proximal is False (the proximal logprobs are then the behaviour ones)")

    @classmethod
    def from_keys(cls, **keys: Any) -> "TrainerConfig":
        """From flat keys, each named as in Hydra without its section (`lr`, `loss_agg`, `temperature`,
        `max_steps`, `sync`, ...): the learner's (LEARNER_KEYS) become `learner`, the rest are fields."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"learner"}
        unknown = sorted(set(keys) - fields - set(LEARNER_KEYS))
        if unknown:
            raise ValueError(f"trainer config: unknown keys {unknown}; expected a subset of "
                             f"{sorted(fields | set(LEARNER_KEYS))}")
        own = {k: v for k, v in keys.items() if k in fields}
        learner = learner_config({k: v for k, v in keys.items() if k in LEARNER_KEYS}, steps=keys.get("steps"),
                                 temperature=keys.get("temperature", 1.0), max_new_tokens=keys.get("max_new_tokens"))
        return cls(**own, learner=learner)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        """From the composed Hydra config (as a plain mapping): train.*, rollout.*, env.*, ablation.*, seed."""
        # Only the keys read below are touched: another section may hold a mandatory value ("???")
        # that this run never needs (env.data_dir in a dry run).
        train = {k: v for k, v in cfg["train"].items() if k not in _NOT_THE_LOOPS}
        rollout, env, ablation = (cfg[k] for k in ("rollout", "env", "ablation"))
        expected = ({f.name for f in dataclasses.fields(cls)} - set(SECTIONS) - {"learner"}) | set(LEARNER_KEYS)
        unknown = sorted(set(train) - expected)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}; expected a subset of {sorted(expected)}")
        keys = dict(train)
        keys.update({k: rollout[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                             "max_prompt_tokens", "workers")})
        keys["sync_every"] = int(rollout.get("sync_every", 1))
        keys.update({k: env[k] for k in ("max_steps", "exec_timeout_s", "instrument")})
        keys.update(children=bool(ablation["children"]), sync=bool(ablation["sync"]), seed=int(cfg["seed"]))
        return cls.from_keys(**keys)

    @property
    def actions_per_rollout(self) -> int:
        return 1 if self.stepwise else self.max_steps

    def sampling(self, stop_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, stop_token_ids=tuple(stop_ids))
