"""SGLang processes on loopback: a server or an sglang-router; launch, wait for health, restart, stop.

Both run in their own session (process group) so that `stop()` also ends the processes they fork
(SGLang's scheduler and detokenizer), and both are stopped at interpreter exit if the caller forgot.
"""
from __future__ import annotations

import abc
import atexit
import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import requests


# SGLang's launch flag that makes a server record the experts each MoE layer routes each token to.
ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"


class ServerStartError(RuntimeError):
    """The server process exited or never answered /health; the message carries its log tail."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free right now (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def answers_health(url: str, timeout_s: float = 5.0) -> bool:
    """Whether GET <url>/health answers 200 within `timeout_s`."""
    try:
        return requests.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR, so a port held only by TIME_WAIT connections of a
        # killed predecessor is free for them, and must count as free here too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ManagedProcess(abc.ABC):
    """One long-running HTTP service launched as `python -m <module> <args>` with a /health route.

    Subclasses give `command()`; this class owns start (wait until /health answers 200), restart,
    stop (SIGTERM to the process group, SIGKILL after a grace period) and the log file.
    """

    kind = "process"

    def __init__(self, *, port: int, host: str = "127.0.0.1", log_path: str | os.PathLike,
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 600.0):
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self.host, self.port = host, port
        self.log_path = Path(log_path)
        self.python = python
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that starts the service."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ManagedProcess":
        """Launches the process and blocks until /health answers 200 (raises ServerStartError)."""
        if self.alive():
            raise RuntimeError(f"server on port {self.port} is already running (pid {self.process.pid})")
        if not _port_is_free(self.host, self.port):
            # A foreign process on the port would answer /health in our place.
            raise ServerStartError(f"port {self.port} on {self.host} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== launch: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                        start_new_session=True)
        atexit.register(self.stop)
        try:
            self.wait_healthy(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll() if self.process else None
            if self.process is None or code is not None:
                raise ServerStartError(f"{self.kind} on port {self.port} exited with code {code} "
                                       f"before it was healthy; log {self.log_path}:\n{self.log_tail()}")
            if self.healthy(timeout_s=1.0):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(f"{self.kind} on port {self.port} not healthy after {timeout_s} s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        return answers_health(self.url, timeout_s)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        """Stops whatever is left of the process and starts it again from `model_path`."""
        self.stop()
        self.restarts += 1
        self.start()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; safe to call more than once."""
        proc, self.process = self.process, None
        if proc is not None:
            atexit.unregister(self.stop)
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(grace_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            # The group id equals the pid: start_new_session made the server its group leader.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n_lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = collections.deque(f, maxlen=n_lines)
        except FileNotFoundError:
            return "(no log file)"
        return b"".join(lines).decode(errors="replace")


class SGLangServer(ManagedProcess):
    """Owns one `python -m sglang.launch_server` subprocess.

    The process runs in its own session (process group) so that `stop()` also ends the scheduler
    and detokenizer processes SGLang forks; its stdout and stderr go to `log_path`. `model_path` is
    what a (re)start loads: the engine moves it to the latest exported weights, so a restarted
    server comes back with the current policy.

    Args:
      model_path: HF checkpoint folder (config.json + safetensors).
      port: loopback port; it must be free at start.
      tp_size: tensor-parallel size (`--tp-size`).
      extra_args: further launch flags, e.g. ("--device", "cpu", "--max-total-tokens", "8192").
      log_path: file the server's output is appended to (default: a file named for the port
        under the model folder's parent).
      python: interpreter to launch with (SGLang may live in its own virtual environment).
      env: extra environment variables (e.g. SGLANG_USE_CPU_ENGINE=1, PYTHONPATH for shims).
      module: the module run with `-m`; tests point it at a stand-in server.
      startup_timeout_s: how long `start()` waits for /health.
      return_routing: launch with `--enable-return-routed-experts` (MoE models), so that requests
        may ask for the experts each layer routed each token to (routing replay). On the CPU build
        the server needs the shim of tests/support/sglang_env on PYTHONPATH for it.
    """

    kind = "SGLang server"

    def __init__(self, model_path: str | os.PathLike, *, port: int, tp_size: int = 1,
                 host: str = "127.0.0.1", extra_args: Sequence[str] = (),
                 log_path: str | os.PathLike | None = None, python: str = sys.executable,
                 env: Mapping[str, str] | None = None, module: str = "sglang.launch_server",
                 startup_timeout_s: float = 600.0, weight_version: int | None = None,
                 return_routing: bool = False):
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if not Path(model_path, "config.json").is_file():
            raise FileNotFoundError(f"model_path {model_path} has no config.json")
        super().__init__(port=port, host=host, python=python, env=env, startup_timeout_s=startup_timeout_s,
                         log_path=log_path or Path(model_path).parent / f"sglang_{port}.log")
        self.model_path = Path(model_path)
        self.tp_size = tp_size
        self.extra_args = tuple(str(a) for a in extra_args)
        self.module = module
        # The version tag a (re)start serves under (`--weight-version`); the engine moves it with
        # `model_path`, so a restarted server never answers with the launch-time tag.
        self.weight_version = weight_version
        self.return_routing = return_routing

    def command(self) -> list[str]:
        version = [] if self.weight_version is None else ["--weight-version", str(self.weight_version)]
        routing = [ROUTED_EXPERTS_FLAG] if self.return_routing and ROUTED_EXPERTS_FLAG not in self.extra_args else []
        return [self.python, "-m", self.module, "--model-path", str(self.model_path), "--host", self.host,
                "--port", str(self.port), "--tp-size", str(self.tp_size), *version, *routing, *self.extra_args]


class SGLangRouter(ManagedProcess):
    """`python -m sglang_router.launch_router`: the SGLang project's load balancer over servers.

    Args:
      worker_urls: the servers' base URLs. The router health-checks them itself: a dead server
        leaves the rotation and rejoins once /health answers again (after the engine restarts it).
      policy: the router's `--policy` (cache_aware, round_robin, power_of_two, random).
      extra_args: further launch flags.
      Others as `ManagedProcess`.
    """

    kind = "sglang-router"

    def __init__(self, worker_urls: Sequence[str], *, port: int, host: str = "127.0.0.1",
                 policy: str = "cache_aware", extra_args: Sequence[str] = (), log_path: str | os.PathLike,
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 300.0, health_check_interval_s: int = 5):
        if not worker_urls:
            raise ValueError("SGLangRouter needs at least one worker URL")
        super().__init__(port=port, host=host, log_path=log_path, python=python, env=env,
                         startup_timeout_s=startup_timeout_s)
        self.worker_urls = tuple(worker_urls)
        self.policy = policy
        self.extra_args = tuple(str(a) for a in extra_args)
        self.health_check_interval_s = int(health_check_interval_s)

    def command(self) -> list[str]:
        return [self.python, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port),
                "--worker-urls", *self.worker_urls, "--policy", self.policy,
                "--health-check-interval-secs", str(self.health_check_interval_s), *self.extra_args]


class ExternalServer:
    """A server ace did not launch, given by URL: it is used and health-checked, never restarted.

    It has the attribute surface `SGLangEngine` reads from an `SGLangServer` (`url`, `model_path`,
    `weight_version`, `alive`, `healthy`, `restart`, `stop`).
    """

    kind = "external SGLang server"

    def __init__(self, url: str, *, timeout_s: float = 10.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r}: expected http://host:port")
        self._url = url.rstrip("/")
        self.model_path: Path | None = None
        self.weight_version: int | None = None
        self.restarts = 0
        self.process = None
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self._url

    def healthy(self, timeout_s: float = 5.0) -> bool:
        return answers_health(self.url, timeout_s)

    def alive(self) -> bool:
        return self.healthy()

    def restart(self) -> None:
        raise ServerStartError(f"{self.url} was given by URL: ace cannot restart it; restart it by hand")

    def stop(self, grace_s: float = 0.0) -> None:
        """Nothing to stop: the server belongs to whoever started it."""

    def model_info(self) -> dict:
        """GET /model_info (model_path, weight_version, architectures, ...)."""
        r = requests.get(f"{self.url}/model_info", timeout=self.timeout_s)
        r.raise_for_status()
        return r.json()
