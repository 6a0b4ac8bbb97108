"""Watching one sandboxed run from the host: reading its output within bounds, its deadline, its disk
quota, and the status message its init reports. Shared by the fresh-interpreter and fork-server paths
of `ace.env.subprocess_sandbox`; killing what is left stays with the backend, which knows how."""
from __future__ import annotations

import json
import os
import selectors
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ace.env.sandbox import ExecResult, SandboxError, SandboxLimits
from ace.env.sandbox_guards import BoundedOutput, classify_exit, tree_size

# A program that prints more than this many times max_output_bytes is killed: the bound keeps the
# reader's CPU from being spent draining gigabytes that would be thrown away.
OUTPUT_KILL_FACTOR = 1000
# A daemon may hold the pipes open forever (fallback only): stop this long after the program exits.
GRACE_AFTER_EXIT_S = 0.2


@dataclass
class Watch:
    """What the host saw of one run. ``forced`` names the limit the host enforced ("output_limit",
    "disk_quota"), None when the run ended by itself or timed out."""

    stdout: BoundedOutput
    stderr: BoundedOutput
    status: bytes
    timed_out: bool
    forced: str | None
    start: float


def watch(out_fd: int, err_fd: int, status_fd: int | None, limits: SandboxLimits, timeout: float, *,
          exited: Callable[[], bool] | None, quota_root: Path | None) -> Watch:
    """Reads the run's pipes until they all close, its deadline passes, or a limit is hit.

    ``exited()`` says whether the program has ended (for the grace after exit; None: once the status
    pipe has closed, which its reporter does on exit); ``quota_root`` is polled
    for the workspace size when the kernel does not enforce it (None when a tmpfs does). The caller
    closes the fds and kills what is left.
    """
    start = time.monotonic()
    outs = {out_fd: BoundedOutput(limits.max_output_bytes), err_fd: BoundedOutput(limits.max_output_bytes)}
    status = bytearray()
    status_open = [status_fd is not None]
    sel = selectors.DefaultSelector()
    for fd in (out_fd, err_fd) + (() if status_fd is None else (status_fd,)):
        sel.register(fd, selectors.EVENT_READ)
    deadline = start + timeout
    kill_at = OUTPUT_KILL_FACTOR * limits.max_output_bytes
    quota = limits.max_workspace_mb * 2**20
    timed_out, forced, exited_at, next_quota_check = False, None, None, start + 0.5
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    if key.fd == status_fd:
                        status_open[0] = False
                elif key.fd == status_fd:
                    status += chunk
                else:
                    outs[key.fd].feed(chunk)
            if sum(o.total for o in outs.values()) > kill_at:
                forced = "output_limit"
                break
            if quota_root is not None and time.monotonic() > next_quota_check:
                next_quota_check = time.monotonic() + 0.5
                if tree_size(quota_root) > quota:
                    forced = "disk_quota"
                    break
            if (exited() if exited is not None else status_fd is not None and not status_open[0]):
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > GRACE_AFTER_EXIT_S:
                    break
    finally:
        sel.close()
    return Watch(outs[out_fd], outs[err_fd], bytes(status), timed_out, forced, start)


def parse_status(status: bytes, stderr: BoundedOutput, *, who: str) -> int:
    """The program's return code from its init's status message (minus the signal when killed)."""
    try:
        msg = json.loads(status.decode() or "null")
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise SandboxError(f"{who} died without a status: {stderr.text()[-2000:]}")
    if "error" in msg:
        raise SandboxError(f"{who} failed: {msg['error']}")
    return -msg["signal"] if "signal" in msg else msg["exit"]


def result(w: Watch, returncode: int | None) -> ExecResult:
    """The ExecResult of a watched run; `returncode` is ignored when the host had to kill it."""
    if w.timed_out or w.forced:
        returncode = -signal.SIGKILL
    stderr = w.stderr.text()
    reason = classify_exit(returncode, stderr, timed_out=w.timed_out, forced=w.forced)
    return ExecResult(returncode, w.stdout.text(), stderr, time.monotonic() - w.start, w.timed_out, reason)
