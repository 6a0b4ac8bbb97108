"""Named model configs for the Qwen3 family (dense and MoE), one typed dataclass for all sizes."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ace.models.attention import ATTENTION_IMPLS
from ace.models.moe import MOE_IMPLS

# Key under which `to_hf_config` records the attention choice; HF loaders ignore unknown keys.
HF_ATTENTION_KEY = "ace_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen3 decoder; `num_experts == 0` means a dense MLP in every layer.

    Every field is validated at construction so that a bad value fails at start-up with its name.
    `dtype` is the parameter (and compute) dtype name; logits and router math are float32 regardless.
    `attention_impl` picks `ace.models.attention`'s path: "reference" materialises [B, H, T, T] scores
    (fine for tiny models), "blockwise" tiles them by `attention_block_q` x `attention_block_kv`
    (O(T) memory, needed for long contexts), "cudnn" uses the fused GPU kernel where it applies,
    "auto" picks per backend and length at trace time (`ace.models.autoselect`).
    `moe_impl` picks the expert dispatch of `ace.models.moe.moe_mlp`: "ragged" (`jax.lax.ragged_dot`,
    native on GPU/TPU), "grouped" (routed tokens in tiles of at most `moe_tile` rows, batched
    matmuls: the fast path where ragged_dot has no kernel, e.g. CPU), "dense" (reference, every
    expert on every token) or "auto" (by backend and token count). All paths are exact.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    router_aux_loss_coef: float = 0.001
    moe_impl: str = "auto"
    moe_tile: int = 256
    dtype: str = "float32"
    attention_impl: str = "auto"
    attention_block_q: int = 512
    attention_block_kv: int = 512

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "max_position_embeddings", "attention_block_q", "attention_block_kv", "moe_tile")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts < 0:
            raise ValueError(f"ModelConfig.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"ModelConfig.moe_intermediate_size must be positive for an MoE model, "
                                 f"got {self.moe_intermediate_size}")
        elif self.intermediate_size <= 0:
            raise ValueError(f"ModelConfig.intermediate_size must be positive for a dense model, "
                             f"got {self.intermediate_size}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"ModelConfig.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be positive, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"ModelConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"ModelConfig.dtype must name a float dtype, got {self.dtype!r}") from err
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"ModelConfig.dtype must name a float dtype, got {self.dtype!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, dtype: str = "float32", moe_impl: str = "auto",
                       attention_impl: str | None = None) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (model_type "qwen3" or "qwen3_moe").

        Accepts both the transformers 4 spelling (`rope_theta`, `num_experts`) and the
        transformers 5 one (`rope_parameters`, `num_local_experts`). Layouts this code path does
        not implement (dense layers inside an MoE model, RoPE scaling, sliding window) raise.
        The attention path is `attention_impl` when given, else the `ace_attention` entry that
        `to_hf_config` writes, else "blockwise": a published checkpoint is a long-context model, and
        blockwise attention is exact at O(T) memory.
        """
        model_type = hf.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"from_hf_config expects model_type 'qwen3' or 'qwen3_moe', got {model_type!r}")
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or hf.get("rope_scaling"):
            raise ValueError(f"only default RoPE is supported, got rope_parameters={rope!r} "
                             f"rope_scaling={hf.get('rope_scaling')!r}")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported")
        if hf.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported (Qwen3 has no biases)")
        num_experts = 0
        if model_type == "qwen3_moe":
            num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
            if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
                raise ValueError(f"every layer must be MoE; got mlp_only_layers={hf.get('mlp_only_layers')!r} "
                                 f"decoder_sparse_step={hf.get('decoder_sparse_step')!r}")
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        ace_attention = hf.get(HF_ATTENTION_KEY) or {}
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads", heads)),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf.get("intermediate_size", 0)),
            num_experts=num_experts,
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 0)) if num_experts else 0,
            moe_intermediate_size=int(hf.get("moe_intermediate_size", 0)) if num_experts else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            moe_impl=moe_impl,
            dtype=dtype,
            attention_impl=attention_impl or str(ace_attention.get("impl", "blockwise")),
            attention_block_q=int(ace_attention.get("block_q", 512)),
            attention_block_kv=int(ace_attention.get("block_kv", 512)),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict: `Qwen3Config` for a dense model, `Qwen3MoeConfig` for MoE."""
        hf: dict[str, Any] = {
            "model_type": "qwen3_moe" if self.is_moe else "qwen3",
            "architectures": ["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": self.dtype,
            HF_ATTENTION_KEY: {"impl": self.attention_impl, "block_q": self.attention_block_q,
                               "block_kv": self.attention_block_kv},
        }
        if self.is_moe:
            hf.update({
                "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob,
                "router_aux_loss_coef": self.router_aux_loss_coef,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            })
        return hf


TINY = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    norm_topk_prob=True, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
)

TINY_DENSE = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048,
)

# Numbers from Qwen/Qwen3-30B-A3B config.json (hidden 2048 with 32 heads of 128: head_dim is not D/H).
QWEN3_30B_A3B = ModelConfig(
    vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
    intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    max_position_embeddings=40960, router_aux_loss_coef=0.001, dtype="bfloat16",
    # [B, H, T, T] scores at 32K tokens do not fit any device; 512 x 512 tiles are the usual
    # FlashAttention-2 size for Dh = 128.
    attention_impl="blockwise", attention_block_q=512, attention_block_kv=512,
)

NAMED_CONFIGS = {"tiny": TINY, "tiny-dense": TINY_DENSE, "qwen3-30b-a3b": QWEN3_30B_A3B}


def get_config(name: str) -> ModelConfig:
    """Looks up a named config; the error lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    if key not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; valid names: {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[key]
