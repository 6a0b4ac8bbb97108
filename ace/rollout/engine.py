"""The one rollout protocol every engine implements (embedded JAX sampler, SGLang pool)."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

FINISH_REASONS = ("stop", "length", "abort")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. `top_k=0` and `top_p=1.0` disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class Generation:
    """One finished request.

    `logprobs[i]` is the log-probability of `output_ids[i]` under the distribution it was sampled
    from: log softmax(logits / temperature)[token], after temperature and before top-k / top-p
    truncation (both engines report this, and the learner recomputes the same quantity);
    `weight_version` is the policy version that produced it.

    `routing` (MoE models, when the engine was asked for it): [L, P + T, k] int32, the k experts
    each of the L layers routed each position to, prompt positions first (P = prompt length,
    T = len(output_ids)); -1 where the engine never ran that position through the model (the last
    sampled token). The learner replays it (`train.routing_replay`).
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    routing: Any = None

    def __post_init__(self):
        if len(self.output_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.output_ids)} output ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.routing is not None:
            shape = getattr(self.routing, "shape", None)
            if shape is None or len(shape) != 3 or shape[1] < len(self.output_ids):
                raise ValueError(f"routing must be [L, P + T, k] with T = {len(self.output_ids)} output tokens, "
                                 f"got shape {shape}")


@runtime_checkable
class RolloutEngine(Protocol):
    """Turns prompts into generations with behaviour logprobs, and takes new weights by version."""

    @property
    def weight_version(self) -> int: ...

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]: ...

    def update_weights(self, params: Any, version: int) -> None: ...
