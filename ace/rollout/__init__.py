"""Rollout engines behind one protocol: the embedded JAX sampler and the SGLang server pool."""
from ace.rollout.engine import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]
