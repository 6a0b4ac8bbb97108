"""The subprocess backend of the Sandbox protocol (`ace.env.sandbox`): each run an isolated
subprocess of this host.

Two isolation levels for ``SubprocessSandbox`` (``.isolation`` says which one is active):

``"namespaces"`` (root and a kernel that allows it; the default on our machines)
    * Each workspace is a size-limited tmpfs (disk quota) owned by a fresh unprivileged uid; its
      ``data/`` is a read-only bind mount of the public data (a mount point, so it cannot be renamed away).
    * Each run starts ``unshare --net --pid --mount --fork``: an empty network namespace (connect fails with
      ENETUNREACH), a pid namespace whose init is the launcher (`ace.env.namespace_launcher`), and a mount
      namespace in which the launcher builds a new root holding only /usr, /etc, the interpreter's prefixes
      (read-only, nosuid), a private /tmp, /dev and /proc, and the workspace, then chroots into it. Private
      answers, other workspaces, /root, the repository and the grader are simply not there.
    * The program runs as the workspace's uid with no capabilities, ``no_new_privs`` and rlimits (address
      space, processes, file size, CPU time). When it exits or the wall clock runs out, the namespace's
      init exits and the kernel kills every process left in it, so a double-forked daemon cannot survive.
``"fallback"`` (no root or no namespaces)
    * rlimits through ``prlimit``, a new session killed as a whole, a scrubbed environment, a private
      copy of the data made read-only, and a ``sitecustomize`` audit hook that refuses non-Unix sockets
      and name lookups. This stops Python-level networking only (a C extension or a child binary could
      still connect) and cannot hide world-readable files: use namespaces or the docker backend for
      untrusted models.

Both levels start the program the same way every time, so that replaying an episode with the same
sampling seeds replays its feedback (`ace.train.experiment.evaluate_policy` relies on it): the
hash seed is fixed (``PYTHONHASHSEED``), and a ``sitecustomize`` on the program's PYTHONPATH (bound
read-only under namespaces) seeds ``random`` and ``numpy.random``'s global generator right after
their first import (``ace.env.sandbox_guards.SEEDING_SITECUSTOMIZE``). BLAS runs one thread
(``SandboxLimits.threads``), so sums come out in one order. Whatever the program reads from the clock
(``time.time()``, its own timing prints, a time budget) still varies, and so does the wall time the
sandbox reports in ``ExecResult.duration_s``; the agent's prompt never shows the latter.
"""
from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Literal

from ace.env import namespace_launcher
from ace.env.namespace_launcher import (
    MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, libc_handle, mount, umount,
)
from ace.env.sandbox import (
    SCRIPT_NAME, ExecResult, SandboxError, SandboxLimits, Workspace, interpreter_roots, sandbox_env, stage_script,
)
from ace.env.sandbox_guards import (
    SEEDING_SITECUSTOMIZE, UID_BASE, UID_SPAN, BoundedOutput, classify_exit, kill_uid,
    processes_matching, remove_escaping_symlinks, tree_size, tree_world_readable, write_sitecustomize,
)

# A program that prints more than this many times max_output_bytes is killed: the bound keeps the
# reader's CPU from being spent draining gigabytes that would be thrown away.
_OUTPUT_KILL_FACTOR = 1000
_GRACE_AFTER_EXIT_S = 0.2


_FALLBACK_SITECUSTOMIZE = '''"""Installed by ace.env.subprocess_sandbox (fallback isolation): refuse network access from Python."""
import sys

def _ace_refuse_network(event, args):
    # AF_UNIX (1) stays allowed: multiprocessing and joblib use local socketpairs.
    if event == "socket.__new__" and args[1] != 1:
        raise PermissionError(f"network access is disabled in this sandbox (socket family {args[1]})")
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and not isinstance(
        args[1], (str, bytes)
    ):
        raise PermissionError(f"network access is disabled in this sandbox ({event} {args[1]!r})")
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError("network access is disabled in this sandbox (name lookup)")

sys.addaudithook(_ace_refuse_network)
'''


# ------------------------------------------------------------------------------------------ the backend


class SubprocessSandbox:
    """Runs each execution as a subprocess of this host, isolated as the module docstring describes.

    Args:
        limits: resource limits of every execution.
        root: directory holding the workspaces (created; default a fresh temporary directory).
        python: interpreter that runs the programs (its packages are what programs can import).
        isolation: "auto" (namespaces when available), "namespaces" (error when unavailable) or "fallback".
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, root: Path | str | None = None,
                 python: str = sys.executable, isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "fallback"):
            raise ValueError(f"isolation={isolation!r}: expected 'auto', 'namespaces' or 'fallback'")
        self.limits = limits
        self.python = python
        self._root = Path(tempfile.mkdtemp(prefix="ace-sandbox-") if root is None else root).resolve()
        self._root.mkdir(parents=True, exist_ok=True)
        self._is_root = os.geteuid() == 0
        if self._is_root:
            # Sandbox uids may traverse to their workspace but not list the others.
            os.chmod(self._root, 0o711)
        available, why = self._namespaces_available()
        if isolation == "namespaces" and not available:
            raise SandboxError(f"isolation='namespaces' requested but unavailable: {why}")
        self.isolation: Literal["namespaces", "fallback"] = (
            "namespaces" if available and isolation != "fallback" else "fallback")
        self.unavailable_reason = None if available else why
        self._interpreter_roots = interpreter_roots(python)
        self._workspaces: dict[Path, Workspace] = {}
        self._lock = threading.Lock()
        # The program's sitecustomize: fixed seeds, and in the fallback the Python-level network guard.
        self._site = write_sitecustomize(self._root / ".site", SEEDING_SITECUSTOMIZE,
                                         *([_FALLBACK_SITECUSTOMIZE] if self.isolation == "fallback" else []))
        # Workspaces hold host mounts: they are destroyed even when the owner forgets close().
        self._finalizer = weakref.finalize(
            self, _destroy_all, self.isolation, self._workspaces, self._root, root is None)

    # -- lifecycle
    def __enter__(self) -> "SubprocessSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Destroys every workspace this sandbox created (and its root when it made one)."""
        self._finalizer()

    def _namespaces_available(self) -> tuple[bool, str]:
        if not self._is_root:
            return False, "not running as root (needed for mounts and unprivileged uids)"
        if shutil.which("unshare") is None:
            return False, "the unshare binary (util-linux) is missing"
        probe = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "true"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            return False, f"unshare failed: {probe.stderr.strip()}"
        test_dir = Path(tempfile.mkdtemp(dir=self._root, prefix=".probe-"))
        try:
            mount(libc_handle(), "tmpfs", str(test_dir), "tmpfs", 0, "size=1m")
            umount(libc_handle(), test_dir)
        except OSError as e:
            return False, f"cannot mount a tmpfs: {e}"
        finally:
            test_dir.rmdir()
        return True, ""

    # -- workspaces
    def create_workspace(self, public_dir: Path) -> Workspace:
        """A fresh workspace holding a read-only view of ``public_dir`` and an empty submission folder."""
        public_dir = Path(public_dir).resolve()
        if not public_dir.is_dir():
            raise ValueError(f"public_dir={public_dir}: expected an existing directory of public data")
        root = Path(tempfile.mkdtemp(prefix="ws-", dir=self._root))
        ws = Workspace(root=root, data_dir=root / "data", submission_dir=root / "submission")
        with self._lock:
            self._workspaces[root] = ws
        if self.isolation == "namespaces":
            self._populate_namespaced(ws, public_dir)
        else:
            self._populate_fallback(ws, public_dir)
        return ws

    def _populate_namespaced(self, ws: Workspace, public_dir: Path) -> None:
        libc = libc_handle()
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        mount(libc, "tmpfs", str(ws.root), "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={self.limits.max_workspace_mb}m,mode=0700,uid={uid},gid={uid}")
        ws.data_dir.mkdir(mode=0o755)
        ws.submission_dir.mkdir()
        os.chown(ws.submission_dir, uid, uid)
        source = public_dir
        if not tree_world_readable(public_dir):
            # The program's uid could not read the data through a bind mount: give it a readable copy.
            shutil.copytree(public_dir, ws.data_dir, dirs_exist_ok=True)
            for dirpath, _, filenames in os.walk(ws.data_dir):
                os.chmod(dirpath, 0o755)
                for name in filenames:
                    os.chmod(os.path.join(dirpath, name), 0o444)
            source = ws.data_dir
        mount(libc, str(source), str(ws.data_dir), None, MS_BIND | MS_REC, None)
        mount(libc, None, str(ws.data_dir), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
               None)

    def _populate_fallback(self, ws: Workspace, public_dir: Path) -> None:
        shutil.copytree(public_dir, ws.data_dir)
        ws.submission_dir.mkdir()
        (ws.root / ".tmp").mkdir()
        for dirpath, _, filenames in os.walk(ws.data_dir):
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
            os.chmod(dirpath, 0o555)
        if self._is_root:
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            for p in (ws.root, ws.submission_dir, ws.root / ".tmp"):
                os.chown(p, uid, uid)
            os.chmod(ws.root, 0o700)

    def destroy_workspace(self, workspace: Workspace) -> None:
        """Kills anything left of the workspace's programs and deletes it."""
        with self._lock:
            self._workspaces.pop(workspace.root, None)
        _destroy_workspace(self.isolation, workspace)

    # -- execution
    def run(self, workspace: Workspace, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Runs ``code`` as ``python script.py`` with cwd = workspace root, under the sandbox's limits."""
        timeout, uid, script = stage_script(workspace, code, timeout_s, known=self._workspaces,
                                            default_timeout_s=self.limits.wall_time_s)
        if self.isolation == "namespaces":
            result = self._run_namespaced(workspace, script, uid, timeout)
        else:
            result = self._run_fallback(workspace, script, uid, timeout)
        removed = remove_escaping_symlinks(workspace.root)
        if removed:
            note = f"\n[sandbox] removed symlinks pointing outside the workspace: {', '.join(removed)}\n"
            result = ExecResult(result.returncode, result.stdout, result.stderr + note, result.duration_s,
                                result.timed_out, result.killed_reason)
        return result

    def _run_namespaced(self, ws: Workspace, script: Path, uid: int, timeout: float) -> ExecResult:
        lim = self.limits
        newroot = self._root / ".newroot"
        newroot.mkdir(mode=0o700, exist_ok=True)
        spec = {
            "newroot": str(newroot),
            "ro_binds": [str(p) for p in self._interpreter_roots] + [str(self._site)],
            "workspace": str(ws.root),
            "tmp_mb": lim.max_file_mb,
            "uid": uid,
            "rlimits": _rlimits(lim),
            "argv": [self.python, str(script)],
            "env": {**sandbox_env(ws.root, self.python, lim, "/tmp"), "PYTHONPATH": str(self._site)},
        }
        status_r, status_w = os.pipe()
        cmd = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--propagation", "private",
               sys.executable, "-I", "-S", namespace_launcher.__file__, "--init", str(status_w), json.dumps(spec)]
        return self._supervise(cmd, ws, uid, timeout, status_r, status_w, env={"PATH": "/usr/sbin:/usr/bin:/bin"})

    def _run_fallback(self, ws: Workspace, script: Path, uid: int, timeout: float) -> ExecResult:
        lim = self.limits
        r = _rlimits(lim)
        cmd = [shutil.which("prlimit") or "prlimit", f"--as={r['AS']}", f"--nproc={r['NPROC']}",
               f"--fsize={r['FSIZE']}", f"--cpu={r['CPU'][0]}:{r['CPU'][1]}", "--core=0", "--"]
        setpriv = shutil.which("setpriv")
        if self._is_root and setpriv:
            cmd += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
        elif setpriv:
            cmd += [setpriv, "--no-new-privs", "--"]
        cmd += [self.python, str(script)]
        env = sandbox_env(ws.root, self.python, lim, str(ws.root / ".tmp"))
        env["PYTHONPATH"] = str(self._site)
        return self._supervise(cmd, ws, uid, timeout, None, None, env=env)

    def _supervise(self, cmd, ws, uid, timeout, status_r, status_w, *, env) -> ExecResult:
        lim = self.limits
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=ws.root, env=env, start_new_session=True,
                                pass_fds=() if status_w is None else (status_w,))
        if status_w is not None:
            os.close(status_w)
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        outs = {out_fd: BoundedOutput(lim.max_output_bytes), err_fd: BoundedOutput(lim.max_output_bytes)}
        status = bytearray()
        sel = selectors.DefaultSelector()
        for fd in outs:
            sel.register(fd, selectors.EVENT_READ)
        if status_r is not None:
            sel.register(status_r, selectors.EVENT_READ)
        deadline = start + timeout
        kill_at = _OUTPUT_KILL_FACTOR * lim.max_output_bytes
        quota = lim.max_workspace_mb * 2**20
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
                    elif key.fd == status_r:
                        status += chunk
                    else:
                        outs[key.fd].feed(chunk)
                if sum(o.total for o in outs.values()) > kill_at:
                    forced = "output_limit"
                    break
                if self.isolation == "fallback" and time.monotonic() > next_quota_check:
                    next_quota_check = time.monotonic() + 0.5
                    if tree_size(ws.root) > quota:
                        forced = "disk_quota"
                        break
                if proc.poll() is not None:
                    # A daemon may hold the pipes open forever (fallback only); stop shortly after exit.
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > _GRACE_AFTER_EXIT_S:
                        break
        finally:
            self._kill_tree(proc, uid, ws)
            sel.close()
            proc.stdout.close()
            proc.stderr.close()
            if status_r is not None:
                os.close(status_r)
        duration = time.monotonic() - start
        returncode = proc.returncode
        if status_r is not None:
            if timed_out or forced:
                returncode = -signal.SIGKILL
            else:
                returncode = self._parse_status(bytes(status), proc.returncode, outs[err_fd])
        elif timed_out or forced:
            returncode = -signal.SIGKILL
        stdout, stderr = outs[out_fd].text(), outs[err_fd].text()
        reason = classify_exit(returncode, stderr, timed_out=timed_out, forced=forced)
        return ExecResult(returncode, stdout, stderr, duration, timed_out, reason)

    @staticmethod
    def _parse_status(status: bytes, unshare_rc: int, stderr: BoundedOutput) -> int:
        try:
            msg = json.loads(status.decode() or "null")
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise SandboxError(f"the namespace launcher died without a status (exit {unshare_rc}): "
                               f"{stderr.text()[-2000:]}")
        if "error" in msg:
            raise SandboxError(f"the namespace launcher failed: {msg['error']}")
        return -msg["signal"] if "signal" in msg else msg["exit"]

    def _kill_tree(self, proc: subprocess.Popen, uid: int, ws: Workspace) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if uid >= UID_BASE:
            if not kill_uid(uid):
                raise SandboxError(f"processes of uid {uid} (workspace {ws.root}) survived SIGKILL")
        else:
            # Unprivileged fallback: our own uid, so find leftovers by the script path in their argv.
            for pid in processes_matching(needle=str(ws.root / SCRIPT_NAME)):
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _rlimits(lim: SandboxLimits) -> dict:
    mb = 2**20
    return {"AS": lim.memory_mb * mb, "NPROC": lim.max_processes, "FSIZE": lim.max_file_mb * mb,
            # SIGXCPU at the soft limit, SIGKILL one second later.
            "CPU": [lim.cpu_time_s, lim.cpu_time_s + 1], "CORE": 0, "NOFILE": 4096}


def _destroy_workspace(isolation: str, ws: Workspace) -> None:
    if not ws.root.exists():
        return
    uid = ws.root.stat().st_uid
    if uid >= UID_BASE:
        kill_uid(uid)
    if isolation == "namespaces":
        libc = libc_handle()
        umount(libc, ws.data_dir)
        umount(libc, ws.root)
    else:
        for dirpath, _, _ in os.walk(ws.root):
            os.chmod(dirpath, 0o755)
    shutil.rmtree(ws.root, ignore_errors=True)


def _destroy_all(isolation: str, workspaces: dict, root: Path, owns_root: bool) -> None:
    for ws in list(workspaces.values()):
        _destroy_workspace(isolation, ws)
    workspaces.clear()
    if owns_root:
        shutil.rmtree(root, ignore_errors=True)
