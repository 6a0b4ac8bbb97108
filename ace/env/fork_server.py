"""The host side of the sandbox's fork server: starts the zygote (`ace/env/zygote.py`), asks it for
one forked run at a time, and restarts it when it dies.

Why: almost all of a CPU RL step is sandbox time, and almost all of a sandbox run is the program
importing numpy, pandas and scikit-learn (about 1.2 s of a 1.3 s reference solution). The zygote pays
those imports once; each run is a fork of it, isolated by the same namespaces, uid, rlimits, chroot and
tmpfs quota as a fresh interpreter (`ace.env.subprocess_sandbox` builds both from one spec).

While the zygote is starting or dead, `fork` returns None and the sandbox runs a fresh interpreter; a
dead zygote is restarted in the background.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

# Run by path with the program's interpreter: it imports nothing of ace.
ZYGOTE = Path(__file__).with_name("zygote.py")

# What the built-in competitions' solutions import (numpy, pandas and the scikit-learn families that
# the reference solutions and SFT scripts use); `env.preload` overrides it.
DEFAULT_PRELOAD = (
    "numpy", "pandas", "sklearn.compose", "sklearn.cross_decomposition", "sklearn.decomposition",
    "sklearn.discriminant_analysis", "sklearn.dummy", "sklearn.ensemble", "sklearn.impute",
    "sklearn.kernel_ridge", "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection",
    "sklearn.multioutput", "sklearn.naive_bayes", "sklearn.neighbors", "sklearn.neural_network",
    "sklearn.pipeline", "sklearn.preprocessing", "sklearn.svm", "sklearn.tree",
)


class ForkServer:
    """One zygote process of `python`, preloading `preload`, started with environment `env`.

    `env` must hold everything that a program's interpreter reads only at start-up and that is the same
    for every run (thread counts, hash seed, unbuffered output, malloc arenas); per-run variables
    (HOME, TMPDIR, PYTHONPATH) are set in each child. `log_path` receives the zygote's own output.
    """

    def __init__(self, python: str, preload: tuple[str, ...], env: dict[str, str], *, cwd: Path,
                 log_path: Path, start_timeout_s: float = 300.0):
        self.python, self.preload, self.env = python, tuple(preload), dict(env)
        self.cwd, self.log_path, self.start_timeout_s = cwd, log_path, start_timeout_s
        self.loaded: list[str] = []
        self.failed: dict[str, str] = {}
        self.starts = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._restarting: threading.Thread | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._sock is not None and self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Starts the zygote and waits until its preloads are imported. Raises RuntimeError if it fails."""
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    [self.python, str(ZYGOTE), str(child.fileno()), json.dumps(list(self.preload))],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.cwd, env=self.env,
                    pass_fds=(child.fileno(),), start_new_session=True)
        finally:
            child.close()
        host.settimeout(self.start_timeout_s)
        try:
            ready = json.loads(host.recv(1 << 20) or b"null")
        except (OSError, ValueError) as e:
            ready = None
            why = f"{type(e).__name__}: {e}"
        else:
            why = "it exited"
        if not isinstance(ready, dict) or not ready.get("ready"):
            proc.kill()
            proc.wait()
            host.close()
            raise RuntimeError(f"the sandbox's fork server did not start ({why}); its log: {self.log_path}")
        host.settimeout(None)
        with self._lock:
            self._proc, self._sock = proc, host
            self.loaded, self.failed = ready["loaded"], ready["failed"]
            self.starts += 1

    def fork(self, request: dict, fds: tuple[int, int, int]) -> int | None:
        """Asks the zygote to start one run; returns the pid leading its process group.

        `fds` are the write ends of the run's stdout, stderr and status pipes (the caller keeps and
        closes its own copies). None means the zygote is not serving: run a fresh interpreter instead.
        """
        with self._lock:
            if not self.alive:
                if self._sock is not None:
                    self._stop_locked()  # a zygote that died between runs
                self._restart_later()
                return None
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], list(fds))
                reply = json.loads(self._sock.recv(4096) or b"null")
            except (OSError, ValueError):
                reply = None
            if not isinstance(reply, dict):
                self._stop_locked()
                self._restart_later()
                return None
            return reply.get("pid")  # None: the zygote could not fork this time (a process limit)

    def _restart_later(self) -> None:
        """Starts a new zygote in the background (once at a time); runs meanwhile use fresh interpreters."""
        if self._closed or (self._restarting is not None and self._restarting.is_alive()):
            return

        def restart():
            try:
                self.start()
            except RuntimeError:
                pass  # the next fork asks again

        self._restarting = threading.Thread(target=restart, name="ace-zygote-restart", daemon=True)
        self._restarting.start()

    def _stop_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the zygote reads end-of-file and exits
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._sock = self._proc = None

    def kill(self) -> None:
        """Kills the zygote (as a crash would); the next `fork` falls back and restarts it."""
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()

    def close(self) -> None:
        """Stops the zygote for good; runs already started are not affected."""
        self._closed = True
        restarting = self._restarting
        if restarting is not None:
            restarting.join()
        with self._lock:
            self._stop_locked()
