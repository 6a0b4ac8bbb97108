"""Model configs: validation, named lookup, HF config round trip, 30B parameter counts."""
import dataclasses
import math

import jax
import pytest
from transformers import Qwen3Config, Qwen3MoeConfig

from ace.models import QWEN3_30B_A3B, TINY, TINY_DENSE, ModelConfig, abstract_params, get_config


def test_get_config_accepts_the_named_configs_and_lists_them_on_error():
    assert get_config("tiny") is TINY
    assert get_config("tiny-dense") is TINY_DENSE
    assert get_config("qwen3-30b-a3b") is QWEN3_30B_A3B
    with pytest.raises(ValueError, match="qwen3-30b-a3b") as err:
        get_config("qwen3-235b")
    assert "'tiny'" in str(err.value) and "'tiny-dense'" in str(err.value)


@pytest.mark.parametrize("field,value", [("num_heads", 5), ("num_experts_per_tok", 9), ("moe_impl", "sparse"),
                                         ("dtype", "int8"), ("head_dim", 15), ("hidden_size", 0),
                                         ("moe_intermediate_size", 0), ("moe_tile", 0), ("attention_impl", "flash")])
def test_bad_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_qwen3_30b_a3b_has_the_published_numbers():
    c = QWEN3_30B_A3B
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (48, 2048, 32, 4, 128)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.vocab_size) == (128, 8, 768, 151936)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6 and c.norm_topk_prob and not c.tie_word_embeddings


def test_qwen3_30b_a3b_parameter_counts_via_eval_shape():
    c = QWEN3_30B_A3B
    shapes = abstract_params(c)
    total = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    experts = sum(math.prod(shapes["layers"]["mlp"][n].shape) for n in ("gate_proj", "up_proj", "down_proj"))
    active = total - experts + experts * c.num_experts_per_tok // c.num_experts
    # Published: 30.5B total, 3.3B activated (Qwen3 technical report / model card).
    assert abs(total / 1e9 - 30.5) < 0.1, total
    assert abs(active / 1e9 - 3.3) < 0.1, active
    # Independent count from the architecture formula.
    d, l, v = c.hidden_size, c.num_layers, c.vocab_size
    attn = d * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 2 * c.head_dim
    per_layer = attn + 2 * d + d * c.num_experts + 3 * c.num_experts * d * c.moe_intermediate_size
    assert total == l * per_layer + 2 * v * d + d


@pytest.mark.parametrize("config,hf_cls", [(TINY, Qwen3MoeConfig), (TINY_DENSE, Qwen3Config),
                                           (QWEN3_30B_A3B, Qwen3MoeConfig)], ids=["tiny", "tiny-dense", "30b"])
def test_hf_config_round_trip_through_transformers(config, hf_cls):
    hf_dict = config.to_hf_config()
    assert hf_dict["model_type"] == hf_cls.model_type
    hf = hf_cls(**hf_dict)
    assert hf.num_hidden_layers == config.num_layers and hf.head_dim == config.head_dim
    assert hf.rope_parameters["rope_theta"] == config.rope_theta
    if config.is_moe:
        assert hf.num_experts == config.num_experts and hf.norm_topk_prob == config.norm_topk_prob
    # transformers 5 writes num_local_experts and rope_parameters; both spellings must load.
    back = ModelConfig.from_hf_config(hf.to_dict(), dtype=config.dtype)
    assert back == config.replace(max_position_embeddings=back.max_position_embeddings,
                                  intermediate_size=back.intermediate_size)
    assert ModelConfig.from_hf_config(hf_dict, dtype=config.dtype) == config


def test_from_hf_config_rejects_layouts_it_does_not_implement():
    hf = TINY.to_hf_config()
    with pytest.raises(ValueError, match="mlp_only_layers"):
        ModelConfig.from_hf_config({**hf, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'llama'"):
        ModelConfig.from_hf_config({**hf, "model_type": "llama"})
