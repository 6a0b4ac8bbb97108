"""The two model shapes of the side-by-side benchmarks (bench/model.py, bench/learner.py and
bench/sampler.py), fixed so that figures from different scripts and sessions compare: A, a Qwen3-MoE
of 2.04M parameters (vocab 1024, hidden 128, 4 layers, 4 heads / 2 KV heads, head dim 32, 8 experts
top-2, expert hidden 128); B, the dense Qwen3 of the same shape with MLP width 256 (0.85M)."""
from __future__ import annotations

_SHAPE = dict(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
              rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048, dtype="float32")
PEER_CONFIGS = {
    "A": dict(_SHAPE, intermediate_size=0, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
              norm_topk_prob=True),
    # MLP width 256 = top-2 x 128: the same MLP work per token as A, and 0.85M parameters.
    "B": dict(_SHAPE, intermediate_size=256),
}


def model_config(name: str):
    """Config A or B, or any config `ace.models.get_config` knows by name."""
    from ace.models import get_config
    from ace.models.configs import ModelConfig

    return ModelConfig(**PEER_CONFIGS[name]) if name in PEER_CONFIGS else get_config(name)


def torch_model(config, **hf_overrides):
    """The transformers torch model (`Qwen3ForCausalLM` or `Qwen3MoeForCausalLM`) of an ace config,
    random weights; `hf_overrides` go into its HF config (e.g. output_router_logits=True)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if config.is_moe else (Qwen3Config, Qwen3ForCausalLM)
    return model_cls(config_cls(**{**config.to_hf_config(), **hf_overrides}))
