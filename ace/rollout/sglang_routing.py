"""Routed experts from SGLang (MoE routing replay): the model's layout and the wire format.

A server launched with `--enable-return-routed-experts` records, for every token it runs through
the model, the top-k expert ids each decoder layer picked; a /generate request with
`"return_routed_experts": true` gets them back in `meta_info.routed_experts`.

Wire format (sglang 0.5.23), read from its source:
  * srt/state_capturer/base.py `BaseTopkCapturer.get_topk`: rows `req_to_token[start_len:seqlen-1]`
    of the int32 host buffer [num_tokens, num_layers, top_k] -> [seqlen - 1, num_layers, top_k],
    token-major, one row per position the model ran on. seqlen = prompt + output tokens
    (scheduler_components/batch_result_processor.py `_maybe_collect_routed_experts`); the last
    output token was sampled but never fed back, so it has no row. `num_layers` is
    `num_hidden_layers` (state_capturer/routed_experts.py), dense layers included (never written).
  * managers/detokenizer_manager.py `_b64_encode_per_request`: base64 of `tensor.numpy().tobytes()`
    (native byte order: little-endian on x86 and arm); tokenizer_manager.py puts the string in
    `meta_info["routed_experts"]`. The decoding SGLang itself suggests is
    `np.frombuffer(b64decode(s), np.int32)` (state_capturer/routed_experts.py
    `extract_routed_experts_from_meta_info`).
  * The request flag is one bool for the whole batch (a list is refused with HTTP 400).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class RoutingFormatError(ValueError):
    """`meta_info.routed_experts` does not fit the request it came with (size, encoding, ids)."""


@dataclasses.dataclass(frozen=True)
class RoutingLayout:
    """What the routed experts SGLang returns for one model look like.

    num_layers: rows per token in SGLang's capture buffer: every decoder layer, MoE or not
      (`num_hidden_layers`).
    top_k: expert ids per token and layer (`num_experts_per_tok`).
    num_experts: ids lie in [0, num_experts).
    moe_layers: the layers with experts, in order: the ones `Generation.routing` keeps.
    """

    num_layers: int
    top_k: int
    num_experts: int
    moe_layers: tuple[int, ...]

    def __post_init__(self):
        if self.num_layers < 1 or self.top_k < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"RoutingLayout: need num_layers >= 1 and 1 <= top_k <= num_experts, got {self}")
        if not self.moe_layers or any(not 0 <= i < self.num_layers for i in self.moe_layers):
            raise ValueError(f"RoutingLayout: moe_layers {self.moe_layers} must be non-empty layer indices "
                             f"in [0, {self.num_layers})")

    @classmethod
    def from_hf_config(cls, model_path: str | os.PathLike) -> "RoutingLayout":
        """From an HF Qwen3-MoE folder's config.json (raises ValueError for a dense model)."""
        path = Path(model_path, "config.json")
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} missing: routed experts need the served model's config") from None
        num_experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
        top_k = int(cfg.get("num_experts_per_tok", 0) or 0)
        if num_experts <= 0 or top_k <= 0:
            raise ValueError(f"{path} is not an MoE model (num_experts={num_experts}, num_experts_per_tok="
                             f"{top_k}): it has no routed experts to return")
        num_layers = int(cfg["num_hidden_layers"])
        # Qwen3-MoE's rule for which layers have experts (transformers' Qwen3MoeDecoderLayer).
        dense = set(cfg.get("mlp_only_layers") or ())
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        moe = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        return cls(num_layers=num_layers, top_k=top_k, num_experts=num_experts, moe_layers=moe)


def parse_routed_experts(raw: Any, *, num_positions: int, layout: RoutingLayout) -> np.ndarray:
    """`meta_info.routed_experts` -> [len(moe_layers), num_positions, top_k] int32.

    Args:
      raw: the base64 string of an int32 [num_positions - 1, num_layers, top_k] tensor.
      num_positions: P + T, the request's prompt plus output tokens.
      layout: the served model's layout.
    Returns:
      The recorded expert ids, layer-major as the learner replays them; position num_positions - 1
      (the last sampled token, never run through the model) is -1.
    Raises:
      RoutingFormatError naming the offending size or value.
    """
    if not isinstance(raw, str):
        raise RoutingFormatError(f"meta_info.routed_experts must be a base64 string, got {type(raw).__name__}")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RoutingFormatError(f"meta_info.routed_experts is not valid base64: {e}") from None
    if len(data) % 4:
        raise RoutingFormatError(f"meta_info.routed_experts has {len(data)} bytes, not a whole number of int32")
    flat = np.frombuffer(data, dtype="<i4")
    rows, per_row = num_positions - 1, layout.num_layers * layout.top_k
    if rows < 0 or flat.size != rows * per_row:
        raise RoutingFormatError(
            f"meta_info.routed_experts holds {flat.size} ids = {flat.size / per_row:g} rows of "
            f"[num_layers={layout.num_layers}, top_k={layout.top_k}]; expected shape "
            f"[P + T - 1, {layout.num_layers}, {layout.top_k}] = [{rows}, {layout.num_layers}, {layout.top_k}] "
            f"for {num_positions} prompt + output tokens")
    recorded = flat.reshape(rows, layout.num_layers, layout.top_k)[:, list(layout.moe_layers), :]
    bad = (recorded < 0) | (recorded >= layout.num_experts)
    if bad.any():
        pos, layer, _ = np.argwhere(bad)[0]
        raise RoutingFormatError(f"meta_info.routed_experts: ids {recorded[pos, layer].tolist()} at position {pos}, "
                                 f"layer {layout.moe_layers[layer]} are not all in [0, {layout.num_experts})")
    out = np.full((len(layout.moe_layers), num_positions, layout.top_k), -1, np.int32)
    out[:, :rows] = recorded.transpose(1, 0, 2)
    return out
