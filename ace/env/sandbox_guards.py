"""What both sandbox backends do around a run: bounded output capture, naming why a program ended,
killing what an episode left behind, and checking the workspace afterwards (size, escaping symlinks)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# Unprivileged uids handed to workspaces are drawn above this, far from any real account, so that the
# per-uid process limit and "kill every process of this uid" only ever concern one workspace.
UID_BASE = 1_000_000
UID_SPAN = 1 << 30


class BoundedOutput:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int):
        self.half = max(1, limit // 2)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {dropped} bytes truncated ...]\n".encode() if dropped > 0 else b""
        return (bytes(self.head) + middle + bytes(self.tail)).decode("utf-8", errors="replace")


def classify_exit(returncode: int, stderr: str, *, timed_out: bool, forced: str | None) -> str | None:
    """Names why a program ended abnormally (see ExecResult.killed_reason)."""
    if timed_out:
        return "timeout"
    if forced:
        return forced
    if returncode < 0:
        sig = -returncode
        names = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size", signal.SIGKILL: "killed"}
        return names.get(sig) or f"signal:{signal.Signals(sig).name}"
    if returncode != 0:
        tail = stderr[-2000:]
        if "MemoryError" in tail or "Cannot allocate memory" in tail:
            return "memory"
        if "No space left on device" in tail or "Disk quota exceeded" in tail:
            return "disk_quota"
        if "File too large" in tail:
            return "file_size"
    return None


def processes_matching(*, uid: int | None = None, needle: str | None = None) -> list[int]:
    """Pids (host view) owned by ``uid`` or whose command line contains ``needle``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if uid is not None and os.stat(entry.path).st_uid == uid:
                found.append(int(entry.name))
                continue
            if needle is not None:
                with open(f"{entry.path}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        found.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return found


def kill_uid(uid: int, *, timeout_s: float = 3.0) -> bool:
    """SIGKILLs every process of a sandbox uid until none is left; returns whether none is left."""
    if uid < UID_BASE:
        raise ValueError(f"uid {uid}: refusing to kill processes of a uid below {UID_BASE} (not a sandbox uid)")
    deadline = time.monotonic() + timeout_s
    while True:
        pids = processes_matching(uid=uid)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def tree_world_readable(path: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(path):
        if os.stat(dirpath).st_mode & 0o005 != 0o005:
            return False
        for name in filenames:
            if os.stat(os.path.join(dirpath, name)).st_mode & 0o004 == 0:
                return False
    return True


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def remove_escaping_symlinks(root: Path, allowed: tuple[Path, ...] = ()) -> list[str]:
    """Deletes symlinks under ``root`` that resolve outside it (and outside ``allowed``); returns them.

    Runs after every execution: a ``submission.csv`` linking to the private answers would otherwise be
    followed by the grader, which runs outside the sandbox.
    """
    removed = []
    inside = [os.path.realpath(p) for p in (root, *allowed)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.path.realpath(p)
                if not any(target == r or target.startswith(r + os.sep) for r in inside):
                    os.unlink(p)
                    removed.append(os.path.relpath(p, root))
    return removed
