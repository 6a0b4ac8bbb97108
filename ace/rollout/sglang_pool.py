"""The SGLang rollout pool of a run: servers (launched or given by URL), sglang-router, the engine.

`SGLangPoolConfig.from_cfg(cfg["rollout"])` (`ace.rollout.sglang_pool_config`) reads the `rollout:`
section of a `rollout=sglang` run; `SGLangPool.start(...)` checks it against the machine, launches
(or connects), waits until every server is healthy and returns the pool, whose `engine` is an
`ace.rollout.sglang.SGLangEngine`.
`close()` stops what ace launched on every exit path (also at interpreter exit).

Topology:
  * `urls` empty: ace launches `num_servers` servers of `tp_size` devices each, server i on the GPUs
    `gpus[i * tp_size:(i + 1) * tp_size]` (`CUDA_VISIBLE_DEVICES`), or on the CPU with
    `device: cpu`; ports from `base_port` (0 = free ports).
  * `urls` given: those servers are used as they are (never restarted by ace).
  * More than one server: requests go through sglang-router, launched by ace (`router: auto`) or
    given by `router_url`. Weight loads always go to each server directly.
  * `return_routing: true` (MoE routing replay): servers launch with --enable-return-routed-experts
    and every Generation carries its routed experts. sglang-router drops that request field, so
    the engine then balances over the servers itself (`router: auto` launches none).

Weights travel as HF folders: the learner's params are exported to `<export_dir>/v00000042` and
loaded with `/update_weights_from_disk` under their version. `export_dir` defaults to a folder in
/dev/shm (a tmpfs: no disk round trip) when ace launched the servers and it has room for three
versions, else `<out_dir>/weights` (servers given by URL may be on other hosts: put out_dir, or
`export_dir`, on storage they see).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from ace.rollout.sglang import SGLangEngine
from ace.rollout.sglang_pool_config import PoolConfigError, SGLangPoolConfig, count_host_gpus, resolve_repo_path
from ace.rollout.sglang_routing import RoutingLayout
from ace.rollout.sglang_server import (ExternalServer, ServerStartError, SGLangRouter, SGLangServer, find_free_port,
                                       _port_is_free)


def _check_url_answers(url: str, what: str) -> None:
    try:
        code = requests.get(f"{url.rstrip('/')}/health", timeout=10).status_code
    except requests.RequestException as e:
        raise PoolConfigError(f"{what} {url} does not answer /health: {e}") from None
    if code != 200:
        raise PoolConfigError(f"{what} {url} answers /health with HTTP {code}; expected 200")


def default_export_dir(out_dir: Path, bytes_per_version: int) -> Path:
    """/dev/shm/ace-weights-<name> when the tmpfs holds three versions, else <out_dir>/weights."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        free = shutil.disk_usage(shm).free
        if free > 3 * bytes_per_version:
            return shm / f"ace-weights-{os.getpid()}-{Path(out_dir).resolve().name}"
    return Path(out_dir) / "weights"


class SGLangPool:
    """What a run holds of its SGLang rollout side: servers, router, engine, and where they log."""

    def __init__(self, cfg: SGLangPoolConfig, servers: Sequence[Any], router: SGLangRouter | None,
                 engine: SGLangEngine, export_dir: Path, owns_export_dir: bool, log_dir: Path):
        self.cfg, self.servers, self.router, self.engine = cfg, list(servers), router, engine
        self.export_dir, self._owns_export_dir, self.log_dir = export_dir, owns_export_dir, log_dir

    @classmethod
    def start(cls, cfg: SGLangPoolConfig, *, model_path: str | os.PathLike, exporter: Callable[[Any, Path], None],
              out_dir: str | os.PathLike, initial_version: int = 0, bytes_per_version: int = 0) -> "SGLangPool":
        """Checks the config, launches or connects to the servers (and router), returns the pool.

        Args:
          model_path: the HF folder the launched servers load first (holding `initial_version`).
          exporter: `exporter(params, folder)` writes an HF checkpoint (see SGLangEngine).
          out_dir: the run's folder: server logs go to `<out_dir>/rollout/`, and `servers.json` there
            lists each server's URL and process id.
        """
        out_dir = Path(out_dir)
        log_dir = out_dir / "rollout"
        log_dir.mkdir(parents=True, exist_ok=True)
        python = resolve_repo_path(cfg.python) or _default_python()
        env = {k: (resolve_repo_path(v) if k == "PYTHONPATH" else v) for k, v in cfg.env.items()}
        # Check everything that can fail without starting a process first.
        for url in cfg.urls:
            _check_url_answers(url, "rollout.urls: server")
        if cfg.router_url:
            _check_url_answers(cfg.router_url, "rollout.router_url: router")
        gpus = cfg.server_gpus() if cfg.launches else []
        if cfg.launches and cfg.device == "cuda":
            _check_gpus_exist([g for gs in gpus for g in gs], key="rollout.gpus")
        servers: list[Any] = []
        router = None
        ports = _ports(cfg, (cfg.num_servers if cfg.launches else 0) + 1)
        try:
            if cfg.launches:
                extra = list(cfg.extra_args)
                if cfg.device == "cpu" and "--device" not in extra:
                    extra = ["--device", "cpu", *extra]
                for i in range(cfg.num_servers):
                    server_env = dict(env)
                    if gpus[i] is not None:
                        server_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus[i])
                    servers.append(SGLangServer(model_path, port=ports[i], host=cfg.host, tp_size=cfg.tp_size,
                                                extra_args=extra, log_path=log_dir / f"server_{i}.log",
                                                python=python, env=server_env, weight_version=initial_version,
                                                startup_timeout_s=cfg.startup_timeout_s,
                                                return_routing=cfg.return_routing))
                _start_all(servers)
            else:
                servers = [ExternalServer(u) for u in cfg.urls]
            router_url = cfg.router_url
            if router_url is None and cfg.uses_router:
                router = SGLangRouter([s.url for s in servers], port=ports[-1], host=cfg.host, policy=cfg.router_policy,
                                      extra_args=cfg.router_args, log_path=log_dir / "router.log", python=python,
                                      health_check_interval_s=cfg.router_health_interval_s,
                                      env=env, startup_timeout_s=min(cfg.startup_timeout_s, 600.0))
                router.start()
                router_url = router.url
                _wait_router_admits_workers(router_url, timeout_s=min(cfg.startup_timeout_s, 300.0))
            if cfg.export_dir:
                export_dir, owns = Path(resolve_repo_path(cfg.export_dir)), False
            elif cfg.launches:
                export_dir = default_export_dir(out_dir, bytes_per_version)
                owns = str(export_dir).startswith("/dev/shm/")
            else:
                # Servers given by URL may run on other hosts: this host's tmpfs is not theirs.
                export_dir, owns = out_dir / "weights", False
            engine = SGLangEngine(servers, exporter=exporter, export_dir=export_dir, initial_version=initial_version,
                                  keep_versions=cfg.keep_versions, pause_mode=cfg.pause_mode,
                                  request_timeout_s=cfg.request_timeout_s, restart_timeout_s=cfg.startup_timeout_s,
                                  max_concurrency=cfg.max_concurrency, router_url=router_url,
                                  monitor_interval_s=cfg.monitor_interval_s, return_routing=cfg.return_routing,
                                  routing_layout=RoutingLayout.from_hf_config(model_path) if cfg.return_routing
                                  else None)
        except BaseException:
            for p in [router, *servers]:
                if p is not None:
                    p.stop()
            raise
        pool = cls(cfg, servers, router, engine, export_dir, owns, log_dir)
        pool.write_status()
        return pool

    def write_status(self, versions: list[int | None] | None = None) -> dict:
        """`<out_dir>/rollout/servers.json`: URL, pid, restarts and reported version of each server
        (`versions`: what the servers reported just now, if the caller asked them already)."""
        versions = self.engine.server_versions() if versions is None else versions
        status = {"router": None if self.router is None and not self.engine.router_url else {
                      "url": self.engine.router_url, "pid": getattr(getattr(self.router, "process", None), "pid", None)},
                  "servers": [{"url": s.url, "pid": getattr(s.process, "pid", None), "restarts": s.restarts,
                               "weight_version": v, "log": str(getattr(s, "log_path", ""))}
                              for s, v in zip(self.servers, versions)],
                  "engine_version": self.engine.weight_version, "stats": dict(self.engine.stats)}
        tmp = self.log_dir / "servers.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.log_dir / "servers.json")
        return status

    def close(self) -> None:
        """Stops the engine's threads, the router and every launched server; removes a tmpfs export."""
        try:
            self.engine.close()
        finally:
            for p in [self.router, *self.servers]:
                if p is not None:
                    p.stop()
            if self._owns_export_dir:
                shutil.rmtree(self.export_dir, ignore_errors=True)

    def __enter__(self) -> "SGLangPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait_router_admits_workers(url: str, *, timeout_s: float) -> None:
    """The router answers /health before its own health checks admit a worker; wait until a
    one-token /generate goes through, so the first rollouts do not burn their retries."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.post(f"{url}/generate", json={"input_ids": [0], "sampling_params": {"max_new_tokens": 1}},
                              timeout=60)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code} {r.text[:200]}"
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.5)
    raise ServerStartError(f"sglang-router {url} admitted no worker in {timeout_s} s: {last}")


def _default_python() -> str:
    import sys

    return sys.executable


def _ports(cfg: SGLangPoolConfig, n: int) -> list[int]:
    """n ports: base_port, base_port + 1, ... (each must be free), or free ones when base_port is 0."""
    if cfg.base_port:
        ports = [cfg.base_port + i for i in range(n)]
        busy = [p for p in ports if not _port_is_free(cfg.host, p)]
        if busy:
            raise PoolConfigError(f"rollout.base_port={cfg.base_port}: ports {busy} on {cfg.host} are in use")
        return ports
    ports: list[int] = []
    while len(ports) < n:
        p = find_free_port(cfg.host)
        if p not in ports:
            ports.append(p)
    return ports


def _check_gpus_exist(ids: Sequence[int], *, key: str) -> None:
    have = count_host_gpus()
    missing = [i for i in ids if i >= have]
    if missing:
        raise PoolConfigError(f"{key} asks for GPUs {list(ids)}, but this host has {have} GPU(s) "
                              f"(ids 0..{have - 1}); {missing} are not there. Set {key} to ids below {have}"
                              + (" or rollout.device=cpu" if key.startswith("rollout") else ""))


def _start_all(servers: Sequence[SGLangServer]) -> None:
    """Starts the servers concurrently (a cold start loads the model: minutes on big ones)."""
    errors: list[BaseException] = []

    def start(server):
        try:
            server.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,), name=f"start-{s.port}") for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise ServerStartError(f"{len(errors)} of {len(servers)} SGLang servers failed to start; first: {errors[0]}")
