"""SGLang engine: an HTTP client per server and a RolloutEngine over a pool of servers.

Wire format (SGLang HTTP server, 0.5.x):
  POST /generate {"input_ids": [[...], ...], "sampling_params": [{...}, ...], "return_logprob": true}
    -> one object per prompt: {"output_ids": [...], "meta_info": {"output_token_logprobs":
       [[logprob, token_id, text], ...], "finish_reason": {"type": "stop"|"length"|"abort", ...},
       "weight_version": "<str>"}}
  POST /update_weights_from_disk {"model_path", "weight_version"} -> {"success", "message"}
  POST /pause_generation {"mode"}, POST /continue_generation, POST /flush_cache, GET /health.
Weight versions travel as strings; a server that was never updated reports "default".
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from ace.rollout.engine import Generation, SamplingParams
from ace.rollout.sglang_server import SGLangServer

PAUSE_MODES = ("abort", "retract", "in_place")


class ServerUnavailable(RuntimeError):
    """The server did not answer (connection refused, reset, timeout, 5xx): retry elsewhere."""


class SGLangRequestError(RuntimeError):
    """The server answered and refused the request (4xx, or success=false): retrying won't help."""


class ArchitectureMismatch(ValueError):
    """Exported weights are for another architecture than the server serves (SGLang would crash)."""


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


def parse_generation(obj: dict, *, initial_version: int) -> Generation:
    """One /generate result -> Generation; logprobs come from `output_token_logprobs` triples."""
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
    return Generation(output_ids=ids, logprobs=[float(t[0]) for t in triples], finish_reason=kind,
                      weight_version=parse_weight_version(meta.get("weight_version"),
                                                          initial_version=initial_version))


def read_architectures(model_path: str | os.PathLike) -> tuple[str, ...]:
    """`architectures` of an HF checkpoint's config.json, e.g. ("Qwen3MoeForCausalLM",)."""
    path = Path(model_path, "config.json")
    try:
        archs = json.loads(path.read_text()).get("architectures")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing: the exporter must write an HF config.json") from None
    if not archs:
        raise ValueError(f"{path} has no 'architectures' entry")
    return tuple(archs)


class SGLangClient:
    """HTTP client for one server. Raises ServerUnavailable or SGLangRequestError."""

    def __init__(self, base_url: str, *, timeout_s: float = 600.0, initial_version: int = 0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.initial_version = initial_version
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
        payload = {"input_ids": [[int(t) for t in p] for p in prompts],
                   "sampling_params": [to_sglang_sampling_params(p) for p in params],
                   "return_logprob": True}
        out = self._post("/generate", payload).json()
        if isinstance(out, dict):
            out = [out]
        if len(out) != len(prompts):
            raise SGLangRequestError(f"/generate returned {len(out)} results for {len(prompts)} prompts")
        return [parse_generation(o, initial_version=self.initial_version) for o in out]

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


class SGLangEngine:
    """RolloutEngine over a pool of SGLang servers.

    Each prompt goes to the server with the fewest requests in flight. A request that fails
    (ServerUnavailable) is retried on another server, and the failed server is restarted in the
    background, then brought to the current weights. A request that comes back aborted because a
    weight update paused its server (pause mode "abort") is retried under the new weights, so a
    Generation never mixes versions. `update_weights` may run while other threads generate
    (`supports_concurrent_update`): each server is paused only for its own weight load.

    Args:
      servers: started SGLangServer objects; the engine restarts them but the caller stops them.
      exporter: `exporter(params, path)` writes an HF checkpoint (config.json + safetensors) into
        the folder `path` (e.g. ace.models.hf.save_hf_checkpoint).
      export_dir: parent of the versioned folders `v00000001`, ...
      initial_version: the version of the weights the servers were launched with.
      max_attempts: tries per request before the error is raised.
      pause_mode: SGLang's /pause_generation mode used around a weight load.
      keep_versions: exported folders kept on disk (the served one is never deleted).
      request_timeout_s: HTTP timeout of one /generate.
      restart_timeout_s: how long a request waits for some server to be healthy again.
    """

    supports_concurrent_update = True

    def __init__(self, servers: Sequence[SGLangServer], *, exporter: Callable[[Any, Path], None],
                 export_dir: str | os.PathLike, initial_version: int = 0, max_attempts: int = 3,
                 pause_mode: str = "abort", keep_versions: int = 2, request_timeout_s: float = 600.0,
                 restart_timeout_s: float = 600.0, max_concurrency: int = 64):
        if not servers:
            raise ValueError("SGLangEngine needs at least one server")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.servers = list(servers)
        self.exporter = exporter
        self.export_dir = Path(export_dir)
        self.max_attempts, self.pause_mode, self.keep_versions = max_attempts, pause_mode, keep_versions
        self.restart_timeout_s = restart_timeout_s
        self._clients = [SGLangClient(s.url, timeout_s=request_timeout_s, initial_version=initial_version)
                         for s in self.servers]
        self._version = initial_version
        self._initial_version = initial_version
        self._lock = threading.Condition()
        self._in_flight = [0] * len(self.servers)
        self._down: set[int] = set()
        self._update_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="sglang-req")
        self.recovery_errors: list[str] = []  # why a server could not be brought back
        self.stats = {"requests": 0, "retries": 0, "aborted_retries": 0, "restarts": 0}

    @property
    def weight_version(self) -> int:
        return self._version

    def in_flight(self) -> list[int]:
        """Requests in flight on each server now (a snapshot, indexed like `servers`)."""
        with self._lock:
            return list(self._in_flight)

    def down(self) -> set[int]:
        """Indices of the servers taken out of dispatch until their recovery finishes (a snapshot)."""
        with self._lock:
            return set(self._down)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]:
        """prompts: B token-id lists; params: one SamplingParams or B of them. Returns B Generations."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        futures = [self._executor.submit(self._generate_one, p, sp) for p, sp in zip(prompts, params)]
        return [f.result() for f in futures]

    def _acquire_server(self, exclude: set[int]) -> int:
        deadline = time.monotonic() + self.restart_timeout_s
        with self._lock:
            while True:
                up = [i for i in range(len(self.servers)) if i not in self._down]
                # Prefer a server this request has not failed on; fall back to any healthy one.
                candidates = [i for i in up if i not in exclude] or up
                if candidates:
                    i = min(candidates, key=lambda k: self._in_flight[k])
                    self._in_flight[i] += 1
                    return i
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerUnavailable(f"no SGLang server healthy for {self.restart_timeout_s} s; "
                                            f"recovery errors: {self.recovery_errors[-3:]}")
                self._lock.wait(remaining)

    def _release_server(self, i: int) -> None:
        with self._lock:
            self._in_flight[i] -= 1
            self._lock.notify_all()

    def _generate_one(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        failed: set[int] = set()
        errors: list[str] = []
        aborts = 0
        attempts = 0
        while attempts < self.max_attempts:
            i = self._acquire_server(failed)
            try:
                gen = self._clients[i].generate([prompt], [params])[0]
            except ServerUnavailable as e:
                attempts += 1
                failed.add(i)
                errors.append(str(e))
                self._mark_down(i)
                with self._lock:
                    self.stats["retries"] += 1
                continue
            finally:
                self._release_server(i)
            if gen.finish_reason == "abort" and aborts < 2 * self.max_attempts:
                # Aborted by a weight update's pause: wait for the update to finish, then redo.
                aborts += 1
                with self._lock:
                    self.stats["aborted_retries"] += 1
                with self._update_lock:
                    pass
                continue
            with self._lock:
                self.stats["requests"] += 1
            return gen
        raise ServerUnavailable(f"request failed on {self.max_attempts} attempts: {errors}")

    def _mark_down(self, i: int) -> None:
        with self._lock:
            if i in self._down:
                return
            self._down.add(i)
        threading.Thread(target=self._recover, args=(i,), name=f"sglang-restart-{i}", daemon=True).start()

    def _recover(self, i: int) -> None:
        server = self.servers[i]
        try:
            if not (server.alive() and server.healthy()):
                server.restart()  # outside the update lock: a publish need not wait for a restart
                with self._lock:
                    self.stats["restarts"] += 1
            # An update may have happened while the server was down or restarting: bring it to
            # the newest folder and version tag (a load from disk takes milliseconds).
            with self._update_lock:
                if self._version != self._initial_version:
                    self._clients[i].update_weights_from_disk(server.model_path, self._version)
        except Exception as e:  # noqa: BLE001 - the server stays down; requests use the others
            with self._lock:
                self.recovery_errors.append(f"{server.url}: {e!r}")
                self._lock.notify_all()
            return
        with self._lock:
            self._down.discard(i)
            self._lock.notify_all()

    # ------------------------------------------------------------------ weights
    def update_weights(self, params: Any, version: int) -> None:
        """Exports `params` to `export_dir/v{version}` and loads it on every healthy server.

        Raises ArchitectureMismatch before touching any server if the exported config.json names
        other architectures than a server serves.
        """
        with self._update_lock:
            if version <= self._version:
                raise ValueError(f"version must grow: got {version}, engine holds {self._version}")
            path = self.export_dir / f"v{version:08d}"
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            self.exporter(params, path)
            exported = read_architectures(path)
            for s in self.servers:
                served = read_architectures(s.model_path)
                if served != exported:
                    raise ArchitectureMismatch(
                        f"exported weights {path} are {list(exported)} but server {s.url} serves "
                        f"{list(served)} from {s.model_path}; loading them would crash the server")
            with self._lock:
                up = [i for i in range(len(self.servers)) if i not in self._down]
            for i in up:
                client = self._clients[i]
                try:
                    client.pause_generation(self.pause_mode)
                    try:
                        client.update_weights_from_disk(path, version)
                        client.flush_cache()
                    finally:
                        client.continue_generation()
                except ServerUnavailable:
                    # Its recovery waits for this update (the lock), then loads the new folder.
                    self._mark_down(i)
            # Down servers load the new folder when they are restarted.
            for s in self.servers:
                s.model_path = path
            self._version = version
            self._prune_exports(path)

    def _prune_exports(self, current: Path) -> None:
        versions = sorted(p for p in self.export_dir.glob("v*") if p.is_dir())
        for old in versions[:-self.keep_versions]:
            if old != current:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "SGLangEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
