"""Tiny random transformers Qwen3 / Qwen3-MoE models and a trained tokenizer, saved as HF folders.

Weights are drawn with a larger spread than HF's init (std 0.02 would make every logit ~0 and any
parity test pass trivially) and norm scales are perturbed away from 1, so that a transposed or
mis-stacked tensor shows up as a logit difference.
"""
from __future__ import annotations

from pathlib import Path

# A small corpus of prose, chat and code for the tiny BPE tokenizer.
TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159 and isn't 42!",
    "Machine-learning engineering: train a model, validate it, write submission.csv.",
    "import numpy as np\nimport pandas as pd\n\ndef main():\n    df = pd.read_csv('train.csv')\n"
    "    print(df.head())\n    return df.shape\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f\"even {i}\")\n    else: pass  # tabs & spaces\n",
    "class Model(nn.Module):\n    def forward(self, x):\n        return self.linear(x) ** 2\n",
    "Validation accuracy improved from 0.8123 to 0.8456 after tuning the learning rate (1e-3 -> 3e-4).",
    "Ünïcödé test: naïve café, 日本語のテキスト, emoji 🚀✨, Ελληνικά, русский текст.",
    "{\"role\": \"user\", \"content\": \"Please fix the KeyError in line 12.\"}",
] * 4


def tiny_qwen3_config(*, moe: bool, tie_word_embeddings: bool = False, norm_topk_prob: bool = True,
                      vocab_size: int = 96, num_layers: int = 2, max_position_embeddings: int = 256,
                      num_experts: int = 4, num_experts_per_tok: int = 2):
    """A transformers Qwen3Config / Qwen3MoeConfig; head_dim 16 != hidden/heads, like Qwen3-30B-A3B.

    `num_experts` / `num_experts_per_tok` apply to the MoE config only (routing-replay tests want
    experts that a short sequence never routes to, hence more than the default 4).
    """
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=48, rms_norm_eps=1e-6,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    if not moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(**common, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                          moe_intermediate_size=16,
                          norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])


def tiny_qwen3_model(config, *, seed: int = 0):
    """A float32 transformers causal LM of `config` with spread-out random weights, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                fan_in = p.shape[-1]
                p.copy_(noise / fan_in**0.5)
    return model


def save_tiny_qwen3(out_dir: str | Path, *, moe: bool, seed: int = 0, max_shard_size: str | None = None,
                    save_original_format: bool = True, **config_kwargs):
    """Creates a tiny model (see `tiny_qwen3_model`), saves it to `out_dir`; returns the torch model."""
    model = tiny_qwen3_model(tiny_qwen3_config(moe=moe, **config_kwargs), seed=seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), save_original_format=save_original_format, **kwargs)
    return model


def save_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 96 + 256):
    """Trains the tiny BPE tokenizer on `TOKENIZER_CORPUS` and saves it to `out_dir`."""
    from ace.models.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(TOKENIZER_CORPUS, vocab_size, out_dir)
