"""SGLang's HTTP wire format and `SGLangClient`, the client of one server.

Wire format (SGLang HTTP server, 0.5.x):
  POST /generate {"input_ids": [[...], ...], "sampling_params": [{...}, ...], "return_logprob": true,
                  "return_routed_experts": true (MoE, only when asked)}
    -> one object per prompt: {"output_ids": [...], "meta_info": {"output_token_logprobs":
       [[logprob, token_id, text], ...], "finish_reason": {"type": "stop"|"length"|"abort", ...},
       "weight_version": "<str>", "routed_experts": "<base64>" (see parse_routed_experts)}}
  POST /update_weights_from_disk {"model_path", "weight_version"} -> {"success", "message"}
  POST /pause_generation {"mode"}, POST /continue_generation, POST /flush_cache, GET /health.
Weight versions travel as strings; a server that was never updated reports "default".

The engine over a pool of servers is `ace.rollout.sglang.SGLangEngine`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import requests

from ace.rollout.engine import Generation, SamplingParams
from ace.rollout.sglang_routing import RoutingFormatError, RoutingLayout, parse_routed_experts

PAUSE_MODES = ("abort", "retract", "in_place")


class ServerUnavailable(RuntimeError):
    """The server did not answer (connection refused, reset, timeout, 5xx): retry elsewhere."""


class SGLangRequestError(RuntimeError):
    """The server answered and refused the request (4xx, or success=false): retrying won't help."""


def to_sglang_sampling_params(p: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams in SGLang's names; SGLang disables top-k with -1 where we use 0."""
    out = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1,
           "max_new_tokens": p.max_new_tokens, "stop_token_ids": list(p.stop_token_ids)}
    if p.seed is not None:
        out["sampling_seed"] = p.seed
    return out


def parse_weight_version(raw: Any, *, initial_version: int) -> int:
    if raw is None or raw == "default":
        return initial_version
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise SGLangRequestError(f"weight_version {raw!r} is not an integer version") from None


def parse_generation(obj: dict, *, initial_version: int, prompt_len: int | None = None,
                     routing: RoutingLayout | None = None) -> Generation:
    """One /generate result -> Generation; logprobs come from `output_token_logprobs` triples.

    With `routing` (and `prompt_len`, the request's P), `meta_info.routed_experts` becomes
    `Generation.routing` [L, P + T, k]; an aborted request may lack it (it is redone anyway).
    """
    try:
        meta = obj["meta_info"]
        triples = meta["output_token_logprobs"]
    except (KeyError, TypeError):
        raise SGLangRequestError(f"/generate result lacks meta_info.output_token_logprobs "
                                 f"(was return_logprob set?): {str(obj)[:300]}") from None
    ids = [int(t[1]) for t in triples]
    if "output_ids" in obj and list(obj["output_ids"]) != ids:
        raise SGLangRequestError(f"output_ids {obj['output_ids']} disagree with the token ids of "
                                 f"output_token_logprobs {ids}")
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length", "abort"):
        raise SGLangRequestError(f"unknown finish_reason {reason!r}")
    routed = None
    if routing is not None:
        if prompt_len is None:
            raise ValueError("parse_generation: routing needs prompt_len")
        raw = meta.get("routed_experts")
        if raw is not None:
            try:
                routed = parse_routed_experts(raw, num_positions=prompt_len + len(ids), layout=routing)
            except RoutingFormatError as e:
                raise SGLangRequestError(str(e)) from None
        elif kind != "abort":
            raise SGLangRequestError(
                "/generate result has no meta_info.routed_experts although return_routed_experts was asked: "
                "launch the server with --enable-return-routed-experts (rollout.return_routing=true), and "
                "send requests to it directly (sglang-router 0.3 drops the field)")
    return Generation(output_ids=ids, logprobs=[float(t[0]) for t in triples], finish_reason=kind,
                      weight_version=parse_weight_version(meta.get("weight_version"),
                                                          initial_version=initial_version), routing=routed)


class SGLangClient:
    """HTTP client for one server. Raises ServerUnavailable or SGLangRequestError.

    With `routing`, every /generate asks for the routed experts and fills `Generation.routing`.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 600.0, initial_version: int = 0,
                 routing: RoutingLayout | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.initial_version = initial_version
        self.routing = routing
        self._session = requests.Session()

    def _post(self, endpoint: str, payload: dict | None = None, *, timeout_s: float | None = None):
        try:
            r = self._session.post(f"{self.base_url}{endpoint}", json=payload or {},
                                   timeout=timeout_s or self.timeout_s)
        except requests.RequestException as e:
            raise ServerUnavailable(f"{self.base_url}{endpoint}: {e}") from e
        if r.status_code >= 500:
            raise ServerUnavailable(f"{self.base_url}{endpoint}: HTTP {r.status_code} {r.text[:300]}")
        if r.status_code >= 400:
            raise SGLangRequestError(f"{self.base_url}{endpoint}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        """Batched /generate. prompts: B lists of token ids; params: B SamplingParams."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if len(prompts) == 1:
            # One request in the plain form: sglang-router's typed /generate takes only this one.
            payload = {"input_ids": [int(t) for t in prompts[0]],
                       "sampling_params": to_sglang_sampling_params(params[0]), "return_logprob": True}
        else:
            payload = {"input_ids": [[int(t) for t in p] for p in prompts],
                       "sampling_params": [to_sglang_sampling_params(p) for p in params],
                       "return_logprob": True}
        if self.routing is not None:
            payload["return_routed_experts"] = True  # one flag for the whole batch (SGLang takes a bool)
        out = self._post("/generate", payload).json()
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(prompts):
            raise SGLangRequestError(f"/generate returned {len(out)} results for {len(prompts)} prompts")
        return [parse_generation(o, initial_version=self.initial_version, prompt_len=len(p), routing=self.routing)
                for o, p in zip(out, prompts)]

    def model_info(self) -> dict:
        """GET /model_info: model_path, weight_version, architectures, ..."""
        try:
            r = self._session.get(f"{self.base_url}/model_info", timeout=min(self.timeout_s, 30.0))
        except requests.RequestException as e:
            raise ServerUnavailable(f"{self.base_url}/model_info: {e}") from e
        if r.status_code >= 400:
            raise (ServerUnavailable if r.status_code >= 500 else SGLangRequestError)(
                f"{self.base_url}/model_info: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """[len(token_ids) - 1] float32 logprob of each token after the first, teacher-forced."""
        if len(token_ids) < 2:
            raise ValueError(f"score needs at least 2 tokens, got {len(token_ids)}")
        payload = {"input_ids": [int(t) for t in token_ids],
                   "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                   "return_logprob": True, "logprob_start_len": 0}
        out = self._post("/generate", payload).json()
        out = out[0] if isinstance(out, list) else out
        try:
            triples = out["meta_info"]["input_token_logprobs"]
        except (KeyError, TypeError):
            raise SGLangRequestError(f"/generate result lacks meta_info.input_token_logprobs: {str(out)[:300]}") from None
        # The first input token has no logprob (None); the rest score token t given tokens < t.
        values = [t[0] for t in triples][-(len(token_ids) - 1):]
        return np.asarray(values, np.float32)

    def update_weights_from_disk(self, model_path: str | os.PathLike, version: int) -> None:
        out = self._post("/update_weights_from_disk",
                         {"model_path": str(model_path), "weight_version": str(version)}).json()
        if not out.get("success", False):
            raise SGLangRequestError(f"{self.base_url} refused weights {model_path}: {out.get('message')}")

    def pause_generation(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        self._post("/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._post("/continue_generation")

    def flush_cache(self) -> None:
        self._post("/flush_cache")
