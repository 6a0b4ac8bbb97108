"""SGLang engine: `SGLangEngine`, a RolloutEngine over a pool of SGLang servers.

It balances requests over the servers (or sends them through an sglang-router), retries failed
and aborted requests, restarts dead servers, and pushes weights to every server as versioned HF
folders. The HTTP client of one server and the wire format are in `ace.rollout.sglang_client`.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ace.rollout.engine import Generation, SamplingParams
from ace.rollout.sglang_client import (PAUSE_MODES, SGLangClient, SGLangRequestError, ServerUnavailable,
                                       parse_weight_version)
from ace.rollout.sglang_routing import RoutingLayout
from ace.rollout.sglang_server import SGLangServer
from ace.rollout.sglang_weights import check_architectures, export_weights, prune_exports


def _resolve_routing_layout(servers: Sequence[Any], given: RoutingLayout | None) -> RoutingLayout:
    """`given`, else the layout of the first server's HF folder (raises when no server has one)."""
    if given is not None:
        return given
    for server in servers:
        if getattr(server, "model_path", None) is not None:
            return RoutingLayout.from_hf_config(server.model_path)
    raise ValueError("return_routing=True but no server has a model_path to read the MoE layout from (servers "
                     "given by URL): pass routing_layout=RoutingLayout.from_hf_config(<the served HF folder>)")


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
      max_concurrency: requests in flight from this engine.
      router_url: an sglang-router over `servers`; when given, every /generate goes through it (the
        router balances and retries), while weight loads, health and restarts stay per server.
      monitor_interval_s: when given, a thread checks every server this often and restarts a dead
        one even when no request of ours has hit it (with a router, ours never do).
      return_routing: MoE only: ask every request for its routed experts and fill
        `Generation.routing` [L, P + T, k] (servers launched with --enable-return-routed-experts;
        sglang-router 0.3 drops the request field, so do not combine with `router_url`).
      routing_layout: the served model's layout of routed experts; default: from the config.json
        of the first server that has a `model_path` (servers given by URL have none: pass it).
    """

    supports_concurrent_update = True

    def __init__(self, servers: Sequence[SGLangServer], *, exporter: Callable[[Any, Path], None],
                 export_dir: str | os.PathLike, initial_version: int = 0, max_attempts: int = 3,
                 pause_mode: str = "abort", keep_versions: int = 2, request_timeout_s: float = 600.0,
                 restart_timeout_s: float = 600.0, max_concurrency: int = 64, router_url: str | None = None,
                 monitor_interval_s: float | None = None, return_routing: bool = False,
                 routing_layout: RoutingLayout | None = None):
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
        self.return_routing = bool(return_routing)
        self.routing_layout = _resolve_routing_layout(self.servers, routing_layout) if return_routing else None
        self._clients = [SGLangClient(s.url, timeout_s=request_timeout_s, initial_version=initial_version,
                                      routing=self.routing_layout) for s in self.servers]
        self._version = initial_version
        self._initial_version = initial_version
        self._current_path: Path | None = None  # the folder of the served version, once one was pushed
        self._lock = threading.Condition()
        self._in_flight = [0] * len(self.servers)
        self._down: set[int] = set()
        self._update_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="sglang-req")
        self.recovery_errors: list[str] = []  # why a server could not be brought back
        self.stats = {"requests": 0, "retries": 0, "aborted_retries": 0, "restarts": 0}
        self.router_url = router_url
        self._router = (SGLangClient(router_url, timeout_s=request_timeout_s, initial_version=initial_version,
                                     routing=self.routing_layout) if router_url else None)
        self._closed = threading.Event()
        self._monitor = None
        if monitor_interval_s is not None:
            if monitor_interval_s <= 0:
                raise ValueError(f"monitor_interval_s must be > 0, got {monitor_interval_s}")
            self._monitor = threading.Thread(target=self._watch, args=(float(monitor_interval_s),),
                                             name="sglang-monitor", daemon=True)
            self._monitor.start()

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
                self._wait_for_health_locked(deadline)

    def _release_server(self, i: int) -> None:
        with self._lock:
            self._in_flight[i] -= 1
            self._lock.notify_all()

    def _generate_one(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        if self._router is not None:
            return self._generate_via_router(prompt, params)
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
            if not self._finished(gen, aborts):
                aborts += 1
                continue
            return gen
        raise ServerUnavailable(f"request failed on {self.max_attempts} attempts: {errors}")

    def _finished(self, gen: Generation, aborts: int) -> bool:
        """False when `gen` was aborted by a weight update's pause (after waiting for the update to
        finish, so that the caller redoes it under the new weights); True when it is the answer."""
        if gen.finish_reason == "abort" and aborts < 2 * self.max_attempts:
            with self._lock:
                self.stats["aborted_retries"] += 1
            with self._update_lock:
                pass
            return False
        with self._lock:
            self.stats["requests"] += 1
        return True

    def _generate_via_router(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        """One request through the router; a 5xx (no healthy worker, a worker killed mid-request
        after the router's own retries) is retried here with backoff once some server is up."""
        errors: list[str] = []
        aborts = 0
        # The router answers 5xx while its health checks have not (re)admitted a worker: that
        # lasts seconds, so the budget here is several backoffs (~1 min), not max_attempts quick tries.
        attempts = max(self.max_attempts, 8)
        for attempt in range(attempts):
            self._wait_until_any_up()
            try:
                gen = self._router.generate([prompt], [params])[0]
            except ServerUnavailable as e:
                errors.append(str(e))
                with self._lock:
                    self.stats["retries"] += 1
                self._closed.wait(min(0.5 * 2 ** attempt, 10.0))
                continue
            if not self._finished(gen, aborts):
                aborts += 1
                continue
            return gen
        raise ServerUnavailable(f"request through router {self.router_url} failed {attempts} times: {errors[-3:]}")

    def _wait_until_any_up(self) -> None:
        deadline = time.monotonic() + self.restart_timeout_s
        with self._lock:
            while len(self._down) == len(self.servers):
                self._wait_for_health_locked(deadline)

    def _wait_for_health_locked(self, deadline: float) -> None:
        """With the lock held: waits for the monitor to report a change of health, or raises at `deadline`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerUnavailable(f"no SGLang server healthy for {self.restart_timeout_s} s; "
                                    f"recovery errors: {self.recovery_errors[-3:]}")
        self._lock.wait(remaining)

    def _watch(self, interval_s: float) -> None:
        """The monitor thread: a server whose process died (or, given by URL, stopped answering)
        is taken out of dispatch and recovered."""
        while not self._closed.wait(interval_s):
            for i, server in enumerate(self.servers):
                if i in self.down():
                    continue
                dead = (not server.alive()) if server.process is not None else not server.healthy(timeout_s=5.0)
                if dead and not self._closed.is_set():
                    self._mark_down(i)

    def _mark_down(self, i: int) -> None:
        with self._lock:
            if i in self._down:
                return
            self._down.add(i)
        threading.Thread(target=self._recover, args=(i,), name=f"sglang-restart-{i}", daemon=True).start()

    def _recover(self, i: int) -> None:
        server = self.servers[i]
        try:
            if server.process is None:
                # Given by URL: only its owner can restart it; wait for it to answer again.
                deadline = time.monotonic() + self.restart_timeout_s
                while not server.healthy(timeout_s=5.0):
                    if time.monotonic() > deadline or self._closed.wait(1.0):
                        raise ServerUnavailable(f"{server.url} did not come back in {self.restart_timeout_s} s")
            elif not (server.alive() and server.healthy()):
                server.restart()  # outside the update lock: a publish need not wait for a restart
                with self._lock:
                    self.stats["restarts"] += 1
            # An update may have happened while the server was down or restarting: bring it to
            # the newest folder and version tag (a load from disk takes milliseconds).
            with self._update_lock:
                if self._version != self._initial_version and self.server_version(i) != self._version:
                    self._clients[i].update_weights_from_disk(self._current_path or server.model_path,
                                                              self._version)
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

        Raises ArchitectureMismatch (`ace.rollout.sglang_weights`) before touching any server if the
        exported config.json names other architectures than a server serves.
        """
        with self._update_lock:
            if version <= self._version:
                raise ValueError(f"version must grow: got {version}, engine holds {self._version}")
            path = export_weights(self.exporter, params, self.export_dir, version)
            check_architectures(path, self.servers)
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
            # Down servers load the new folder, under the new tag, when they are restarted.
            for s in self.servers:
                if s.process is not None or s.model_path is not None:
                    s.model_path = path
                s.weight_version = version
            self._version = version
            self._current_path = path
            prune_exports(self.export_dir, self.keep_versions, path)

    # ------------------------------------------------------------------ inspection
    def server_version(self, i: int) -> int | None:
        """The weight version server `i` reports on /model_info now (None when it does not answer)."""
        try:
            raw = self._clients[i].model_info().get("weight_version")
        except (ServerUnavailable, SGLangRequestError):
            return None
        return parse_weight_version(raw, initial_version=self._initial_version)

    def server_versions(self) -> list[int | None]:
        """`server_version` of every server, indexed like `servers`."""
        return [self.server_version(i) for i in range(len(self.servers))]

    def probe_logprobs(self, token_ids: Sequence[int]) -> list[np.ndarray | None]:
        """Each server's logprobs of `token_ids[1:]` given the tokens before them (teacher-forced,
        temperature 1), straight from the server, not through the router; None for a server that
        does not answer. Compare with the learner's to check that a push really reached a server."""
        out = []
        for client in self._clients:
            try:
                out.append(client.score(token_ids))
            except (ServerUnavailable, SGLangRequestError):
                out.append(None)
        return out

    def wait_all_up(self, timeout_s: float | None = None) -> bool:
        """Blocks until no server is down (recovered) or `timeout_s` passed; returns whether all are up."""
        deadline = time.monotonic() + (self.restart_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            while self._down:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 1.0))
        return True

    def close(self) -> None:
        self._closed.set()
        if self._monitor is not None:
            self._monitor.join(timeout=30)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "SGLangEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
