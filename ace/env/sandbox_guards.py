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


# The seed of the program's global random generators, and the hash seed of its interpreter.
PROGRAM_SEED = 0

SEEDING_SITECUSTOMIZE = '''"""Installed by ace.env.sandbox: the program's global random generators start from a fixed seed.

A script that never seeds (random.random(), numpy's global RandomState, which scikit-learn uses for
random_state=None and pandas for DataFrame.sample) then prints and predicts the same on every run,
so an episode replayed with the same sampling seeds gets the same feedback. Each generator is seeded
right after its module's first import, so a script that imports neither pays nothing.
np.random.default_rng() without a seed and the names of temporary files stay random.
"""
import sys as _ace_sys

_ACE_SEED = {seed}


class _AceSeedingLoader:
    """Runs the real loader, then seeds the module; everything else is the real loader's."""

    def __init__(self, loader):
        self._ace_loader = loader

    def __getattr__(self, name):
        return getattr(self._ace_loader, name)

    def create_module(self, spec):
        return self._ace_loader.create_module(spec)

    def exec_module(self, module):
        self._ace_loader.exec_module(module)
        module.seed(_ACE_SEED)
        if module.__name__ == "random":
            _ace_reseed_forks(module)


def _ace_reseed_forks(random):
    """`random` reseeds itself from the OS in a forked child; reseed it again, by fork count."""
    import os

    forks = [0]

    def count():
        forks[0] += 1

    os.register_at_fork(before=count, after_in_child=lambda: random.seed(f"{{_ACE_SEED}}-fork-{{forks[0]}}"))


class _AceSeedAfterImport:
    """A meta path finder that only wraps the loaders of `random` and `numpy.random`."""

    names = {{"random", "numpy.random"}}

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        self.names = self.names - {{name}}
        for finder in _ace_sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AceSeedingLoader(spec.loader)
                return spec
        return None


_ace_finder = _AceSeedAfterImport()
for _ace_name in sorted(_ace_finder.names):
    # Imported before this ran: during start-up, or by the fork server's zygote (ace/env/zygote.py).
    if _ace_name in _ace_sys.modules:
        _ace_sys.modules[_ace_name].seed(_ACE_SEED)
        if _ace_name == "random":
            _ace_reseed_forks(_ace_sys.modules["random"])
        _ace_finder.names = _ace_finder.names - {{_ace_name}}
_ace_sys.meta_path.insert(0, _ace_finder)
'''.format(seed=PROGRAM_SEED)


def write_sitecustomize(folder: Path, *parts: str) -> Path:
    """Writes `parts` as `folder/sitecustomize.py`, readable by every uid, and returns `folder`.

    The program's interpreter imports it at start-up when `folder` is on its PYTHONPATH.
    """
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text("\n\n".join(parts))
    os.chmod(folder, 0o755)
    os.chmod(folder / "sitecustomize.py", 0o644)
    return folder


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


def mask_workspace_path(text: str, root: Path | str) -> str:
    """`text` with the workspace's absolute path written as `.`, the program's working directory.

    A workspace's host path holds random characters (``/tmp/ace-sandbox-x1y2/ws-a3b4``) that
    differ in every process, and tracebacks ("File .../script.py") and grader messages ("no
    submission file at .../submission/submission.csv") quote it; shown back to the agent, it would
    make the prompt tokens, hence the samples, differ between two runs of the same episode.
    """
    if not text:
        return text
    for path in dict.fromkeys((str(root), os.path.realpath(root))):  # as given, then resolved
        text = text.replace(path + os.sep, "." + os.sep).replace(path, ".")
    return text


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
