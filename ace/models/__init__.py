"""Qwen3 dense and MoE models: configs, the decoder, MoE dispatch, sharding rules, chunked logprobs."""
from ace.models.configs import QWEN3_30B_A3B, TINY, TINY_DENSE, ModelConfig, get_config
from ace.models.logprobs import model_token_logprobs, output_weight, token_logprobs
from ace.models.qwen3 import (KVCache, ModelAux, Qwen3, abstract_params, forward, init_cache, init_params,
                              param_logical_axes, param_shardings, shard_params)

__all__ = [
    "ModelConfig", "TINY", "TINY_DENSE", "QWEN3_30B_A3B", "get_config",
    "KVCache", "ModelAux", "Qwen3", "abstract_params", "forward", "init_cache", "init_params",
    "param_logical_axes", "param_shardings", "shard_params",
    "model_token_logprobs", "output_weight", "token_logprobs",
]
