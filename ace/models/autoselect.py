"""What `attention_impl="auto"` and `moe_impl="auto"` resolve to, per backend and size, at trace time.

Every path is exact (equal to its reference in forward and gradient, see tests/models), so the choice
is speed and memory only. The thresholds come from these medians, measured on the 2-core CPU host
this repository is developed on (XLA:CPU, float32, jax 0.10.2; the host is shared with other jobs
and runs differ by up to 2x, so only large gaps decide):

Attention, B=8, H=4, K=2, Dh=32, causal, fwd / fwd+bwd ms:
  T=S     reference      blockwise 64    blockwise 128   blockwise 512
  128     2.3 / 4.3      -               2.6 / 12.3      2.4 / 6.7
  256     10.5 / 22.5    6.3 / 20.9      8.3 / 22.5      8.9 / 37.9
  512     105 / 154      25.8 / 112      25.4 / 73       144 / 270
  1024    776 / 995      86 / 375        94 / 307        277 / 913
  decode (T=1): S=512 reference 0.49 vs blockwise 0.59-1.16; S=8192 11.8 vs 33-40.
  So on CPU: reference while T*S <= 256*256 score entries per (row, head) (decode always), else
  blockwise with blocks of at most 128 (512 tiles, the GPU default, lose to reference on CPU).
MoE experts, D=F=128, E=8, k=2, fwd / grad ms (N tokens):
  N       dense          ragged          grouped
  8       0.34 / 0.84    0.38 / 1.08     0.39 / 1.24
  32      0.57 / 1.32    0.94 / 2.07     0.51 / 1.64
  128     1.43 / 4.14    2.28 / 8.61     0.87 / 2.37
  512     4.4 / 20.4     7.8 / 28.0      2.0 / 5.6
  4096    32 / 161       50 / 153        13 / 39
  `jax.lax.ragged_dot` has no CPU kernel (it lowers to a masked dense matmul, k times the dense
  path's flops), so on CPU: dense below 8 (token, expert) pairs per expert, grouped above.
Whole models (bench/model.py, 8 x 512 tokens, fwd / fwd+bwd over ragged + reference): the 2M MoE
2.41x / 2.14x with auto (grouped + blockwise 128), the dense model of its shape 1.65x / 1.45x.
Not measured here (no accelerator): GPU/TPU take `ragged_dot`'s native grouped kernels and, on GPU,
cuDNN's fused attention where its mask and dtype apply (as bench/gpu.py's probe picks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Largest T * S (score entries per row and head) for which the plain reference path is used.
REFERENCE_MAX_SCORES = 256 * 256
CPU_ATTENTION_BLOCK = 128
# Below this many (token, expert) pairs per expert the dense path beats sorting (CPU).
GROUPED_MIN_PAIRS_PER_EXPERT = 8


def choose_attention(impl: str, *, q_len: int, kv_len: int, dtype, head_dim: int, cudnn_mask: bool,
                     block_q: int, block_kv: int, backend: str | None = None) -> tuple[str, int, int]:
    """(impl, block_q, block_kv) to run; anything but "auto" is returned unchanged.

    cudnn_mask: the mask is the plain causal triangle over token indices (what cuDNN expresses).
    backend: `jax.default_backend()` when None.
    """
    if impl != "auto":
        return impl, block_q, block_kv
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and cudnn_mask and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn", block_q, block_kv
    if q_len * kv_len <= REFERENCE_MAX_SCORES:
        return "reference", block_q, block_kv
    if backend == "cpu":
        return "blockwise", min(block_q, CPU_ATTENTION_BLOCK), min(block_kv, CPU_ATTENTION_BLOCK)
    return "blockwise", block_q, block_kv


def choose_moe(impl: str, *, num_pairs: int, num_experts: int, backend: str | None = None) -> str:
    """The MoE dispatch to run for `num_pairs` = tokens * k; anything but "auto" is returned unchanged."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend in ("gpu", "tpu"):
        return "ragged"
    return "dense" if num_pairs < GROUPED_MIN_PAIRS_PER_EXPERT * num_experts else "grouped"
