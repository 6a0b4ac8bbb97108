"""The `rollout:` settings of an SGLang pool, validated when `SGLangPoolConfig` is built.

`SGLangPoolConfig.from_cfg(cfg["rollout"])` reads the `rollout:` section of a `rollout=sglang` run
(every key is documented in hydra_configs/rollout/sglang.yaml) and refuses, with `PoolConfigError`
naming the key, a setting that cannot work; `ace.rollout.sglang_pool.SGLangPool.start` then checks
it against the machine and launches. The parsing of GPU id lists and the count of the host's GPUs
serve the learner's device settings too (`ace.train.devices`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

ROUTER_MODES = ("auto", "always", "never")
DEVICES = ("cuda", "cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]


class PoolConfigError(ValueError):
    """A `rollout.*` setting that cannot work on this machine; raised before anything starts."""


def parse_device_list(spec: Any, *, key: str) -> tuple[int, ...] | None:
    """GPU ids from "0-3", "0,2,4-5", 3, [0, 1] or None (= not set). Raises naming `key`."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, bool):
        raise PoolConfigError(f"{key}={spec!r}: expected GPU ids such as '0-3', '0,1' or [0, 1]")
    if isinstance(spec, int):
        return (spec,)
    parts: list[str] = []
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    elif isinstance(spec, (list, tuple)):
        parts = [str(p).strip() for p in spec]
    else:
        raise PoolConfigError(f"{key}={spec!r}: expected GPU ids such as '0-3', '0,1' or [0, 1]")
    ids: list[int] = []
    for part in parts:
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise PoolConfigError(f"{key}={spec!r}: {part!r} is not a GPU id or a range like 0-3") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise PoolConfigError(f"{key}={spec!r}: GPU ids must be distinct and >= 0, got {ids}")
    return tuple(ids)


def resolve_repo_path(value: str | None) -> str | None:
    """A path from the config: absolute as given, relative to the repository root otherwise."""
    if value is None or value == "":
        return None
    path = Path(os.path.expanduser(str(value)))
    return str(path if path.is_absolute() else REPO_ROOT / path)


@dataclasses.dataclass(frozen=True)
class SGLangPoolConfig:
    """The `rollout:` keys of an SGLang pool (see hydra_configs/rollout/sglang.yaml for each)."""

    num_servers: int = 1
    tp_size: int = 1
    device: str = "cuda"
    gpus: tuple[int, ...] | None = None
    urls: tuple[str, ...] = ()
    router: str = "auto"
    router_url: str | None = None
    router_policy: str = "cache_aware"
    router_args: tuple[str, ...] = ()
    router_health_interval_s: int = 5
    python: str | None = None
    host: str = "127.0.0.1"
    base_port: int = 0
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    startup_timeout_s: float = 1800.0
    request_timeout_s: float = 3600.0
    export_dir: str | None = None
    keep_versions: int = 2
    pause_mode: str = "abort"
    max_concurrency: int = 64
    monitor_interval_s: float = 1.0
    sync_every: int = 1
    check_logprobs: bool = False
    return_routing: bool = False

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise PoolConfigError(f"rollout.{name}={getattr(self, name)!r}: expected {expected}")

        need(isinstance(self.num_servers, int) and self.num_servers >= 1, "num_servers", "an int >= 1")
        need(isinstance(self.tp_size, int) and self.tp_size >= 1, "tp_size", "an int >= 1")
        need(self.device in DEVICES, "device", f"one of {DEVICES}")
        need(self.router in ROUTER_MODES, "router", f"one of {ROUTER_MODES}")
        need(0 <= self.base_port < 65536, "base_port", "0 (free ports) or a port number")
        need(self.keep_versions >= 1, "keep_versions", ">= 1")
        need(self.sync_every >= 1, "sync_every", "an int >= 1")
        need(self.monitor_interval_s > 0, "monitor_interval_s", "> 0")
        for url in (*self.urls, *([self.router_url] if self.router_url else [])):
            if not str(url).startswith(("http://", "https://")):
                raise PoolConfigError(f"rollout.urls / rollout.router_url: {url!r} is not an http(s):// URL")
        if self.router == "never" and self.router_url:
            raise PoolConfigError("rollout.router=never but rollout.router_url is set; drop one of them")
        need(isinstance(self.return_routing, bool), "return_routing", "true or false")
        if self.return_routing and (self.router == "always" or self.router_url):
            # sglang-router 0.3 parses /generate into its own request type, which has no
            # return_routed_experts: the field never reaches the servers (meta_info comes back without it).
            raise PoolConfigError("rollout.return_routing=true cannot go through sglang-router (it drops the "
                                  "return_routed_experts field); set rollout.router=auto or never and leave "
                                  "rollout.router_url unset: ace then balances over the servers itself")

    @classmethod
    def from_cfg(cls, rollout: Mapping[str, Any]) -> "SGLangPoolConfig":
        """From the `rollout:` section; keys of the sampler (temperature, ...) are ignored here."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dict(rollout).items() if k in names}
        for key in ("urls", "extra_args", "router_args"):
            if key in kw:
                kw[key] = tuple(str(x) for x in (kw[key] or ()))
        kw["gpus"] = parse_device_list(kw.get("gpus"), key="rollout.gpus")
        kw["env"] = {str(k): str(v) for k, v in dict(kw.get("env") or {}).items()}
        return cls(**kw)

    @property
    def launches(self) -> bool:
        return not self.urls

    @property
    def servers(self) -> int:
        return len(self.urls) if self.urls else self.num_servers

    @property
    def uses_router(self) -> bool:
        if self.router_url:
            return True
        # With return_routing, "auto" means no router: it would drop the routed-experts request field.
        return self.router == "always" or (self.router == "auto" and self.servers > 1 and not self.return_routing)

    def server_gpus(self) -> list[tuple[int, ...] | None]:
        """The GPU ids of each launched server (None on the CPU)."""
        if self.device == "cpu":
            return [None] * self.num_servers
        need = self.num_servers * self.tp_size
        if self.gpus is None or len(self.gpus) < need:
            raise PoolConfigError(f"rollout.gpus={list(self.gpus or [])}: {self.num_servers} servers of tp_size "
                                  f"{self.tp_size} need {need} GPU ids (or set rollout.device=cpu)")
        return [self.gpus[i * self.tp_size:(i + 1) * self.tp_size] for i in range(self.num_servers)]


def count_host_gpus() -> int:
    """NVIDIA GPUs this host has (from the driver's /proc entries or nvidia-smi; 0 when none)."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return len(list(proc.iterdir()))
    smi = shutil.which("nvidia-smi")
    if smi:
        import subprocess

        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return 0
