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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Literal

from ace.env import namespace_launcher, supervision
from ace.env.fork_server import DEFAULT_PRELOAD, ForkServer
from ace.env.namespace_launcher import (
    MS_BIND, MS_NODEV, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, libc_handle, mount, umount,
)
from ace.env.sandbox import (
    SCRIPT_NAME, ExecResult, SandboxError, SandboxLimits, Workspace, interpreter_roots, sandbox_env, stage_script,
)
from ace.env.sandbox_guards import (
    SEEDING_SITECUSTOMIZE, UID_BASE, UID_SPAN, kill_uid, processes_matching, remove_escaping_symlinks,
    tree_world_readable, write_sitecustomize,
)


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
        fork_server: fork each run from a zygote that imported `preload` once (`ace.env.fork_server`),
            isolated as above; False (or a zygote that is down) starts a fresh interpreter per run.
        preload: modules the zygote imports (failures are skipped: ``self.fork_server.failed``).
    """

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, root: Path | str | None = None,
                 python: str = sys.executable, isolation: str = "auto", fork_server: bool = True,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD):
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
        self.fork_server: ForkServer | None = None
        if fork_server and self.isolation == "fallback" and self._is_root and not all(
                _world_traversable(r) for r in self._interpreter_roots):
            # A forked program keeps the zygote's sys.path, but here it runs as another uid on the host's
            # filesystem, which may not let it read the interpreter (a pyenv under /root): its later
            # imports would fail. A fresh interpreter finds a readable prefix by itself.
            fork_server = False
        if fork_server:
            # Everything a program's interpreter reads at start-up only (threads, hash seed) is fixed here.
            env = {k: v for k, v in sandbox_env(self._root, python, limits, "/tmp").items() if k != "PYTHONPATH"}
            self.fork_server = ForkServer(python, tuple(preload), env, cwd=self._root,
                                          log_path=self._root / ".zygote.log")
            try:
                self.fork_server.start()
            except RuntimeError as e:
                warnings.warn(f"{e}; runs use a fresh interpreter until it restarts", RuntimeWarning, stacklevel=2)
        # Workspaces hold host mounts: they are destroyed even when the owner forgets close().
        self._finalizer = weakref.finalize(
            self, _destroy_all, self.isolation, self._workspaces, self._root, root is None, self.fork_server)

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
        newroot = self._root / ".newroot"
        newroot.mkdir(mode=0o700, exist_ok=True)
        spec = self._spec(ws, uid, script, "/tmp")
        spec.update(newroot=str(newroot), ro_binds=[str(p) for p in self._interpreter_roots] + [str(self._site)],
                    tmp_mb=self.limits.max_file_mb)
        forked = self._run_forked(ws, script, uid, timeout, spec)
        if forked is not None:
            return forked
        status_r, status_w = os.pipe()
        cmd = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--propagation", "private",
               sys.executable, "-I", "-S", namespace_launcher.__file__, "--init", str(status_w), json.dumps(spec)]
        return self._run_fresh(cmd, ws, uid, timeout, (status_r, status_w), env={"PATH": "/usr/sbin:/usr/bin:/bin"})

    def _run_fallback(self, ws: Workspace, script: Path, uid: int, timeout: float) -> ExecResult:
        spec = self._spec(ws, uid if self._is_root else None, script, str(ws.root / ".tmp"))
        forked = self._run_forked(ws, script, uid, timeout, spec)
        if forked is not None:
            return forked
        r = spec["rlimits"]
        cmd = [shutil.which("prlimit") or "prlimit", f"--as={r['AS']}", f"--nproc={r['NPROC']}",
               f"--fsize={r['FSIZE']}", f"--cpu={r['CPU'][0]}:{r['CPU'][1]}", "--core=0", "--"]
        setpriv = shutil.which("setpriv")
        if self._is_root and setpriv:
            cmd += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
        elif setpriv:
            cmd += [setpriv, "--no-new-privs", "--"]
        cmd += spec["argv"]
        return self._run_fresh(cmd, ws, uid, timeout, None, env=spec["env"])

    def _spec(self, ws: Workspace, uid: int | None, script: Path, tmpdir: str) -> dict:
        """What both ways of starting a program (fresh or forked) need to build its sandbox."""
        env = {**sandbox_env(ws.root, self.python, self.limits, tmpdir), "PYTHONPATH": str(self._site)}
        return {"workspace": str(ws.root), "uid": uid, "rlimits": _rlimits(self.limits),
                "argv": [self.python, str(script)], "env": env}

    def _run_forked(self, ws: Workspace, script: Path, uid: int, timeout: float, spec: dict) -> ExecResult | None:
        """The run as a fork of the zygote; None when there is no zygote to ask (run a fresh interpreter)."""
        if self.fork_server is None:
            return None
        (out_r, out_w), (err_r, err_w), (status_r, status_w) = os.pipe(), os.pipe(), os.pipe()
        request = {"isolation": self.isolation, "spec": spec, "script": str(script), "site": str(self._site)}
        try:
            leader = self.fork_server.fork(request, (out_w, err_w, status_w))
        finally:
            for fd in (out_w, err_w, status_w):
                os.close(fd)
        if leader is None:
            for fd in (out_r, err_r, status_r):
                os.close(fd)
            return None
        w = None
        try:
            w = supervision.watch(out_r, err_r, status_r, self.limits, timeout, exited=None,
                                  quota_root=ws.root if self.isolation == "fallback" else None)
        finally:
            for fd in (out_r, err_r, status_r):
                os.close(fd)
            # The leader's group holds what is left: the namespace's init when the host cuts the run
            # short, or (fallback) daemons. After a normal end under namespaces the kernel has killed
            # the namespace already, and the leader (reaped by the zygote) is not signalled, so that a
            # reused pid is never hit; a group with members keeps its id.
            if w is None or w.timed_out or w.forced or self.isolation == "fallback":
                _killpg(leader)
            self._kill_uid(uid, ws)
        return supervision.result(w, None if w.timed_out or w.forced else supervision.parse_status(
            w.status, w.stderr, who="the sandbox's forked run"))

    def _run_fresh(self, cmd: list[str], ws: Workspace, uid: int, timeout: float,
                   status: tuple[int, int] | None, *, env: dict) -> ExecResult:
        """The run as a fresh interpreter started by `cmd` (its status on the `status` pipe, if any)."""
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=ws.root, env=env, start_new_session=True,
                                pass_fds=() if status is None else (status[1],))
        if status is not None:
            os.close(status[1])
        try:
            w = supervision.watch(proc.stdout.fileno(), proc.stderr.fileno(), None if status is None else status[0],
                                  self.limits, timeout, exited=lambda: proc.poll() is not None,
                                  quota_root=ws.root if self.isolation == "fallback" else None)
        finally:
            _killpg(proc.pid)
            proc.wait()
            self._kill_uid(uid, ws)
            proc.stdout.close()
            proc.stderr.close()
            if status is not None:
                os.close(status[0])
        if status is None or w.timed_out or w.forced:
            return supervision.result(w, proc.returncode)
        return supervision.result(w, supervision.parse_status(
            w.status, w.stderr, who=f"the namespace launcher (exit {proc.returncode})"))

    def _kill_uid(self, uid: int, ws: Workspace) -> None:
        """Kills whatever of the workspace's programs outlived its run."""
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


def _world_traversable(path: Path) -> bool:
    """Whether any uid can read `path` and reach it through its parents."""
    try:
        return (path.stat().st_mode & 0o005) == 0o005 and all(p.stat().st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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


def _destroy_all(isolation: str, workspaces: dict, root: Path, owns_root: bool,
                 fork_server: ForkServer | None) -> None:
    if fork_server is not None:
        fork_server.close()
    for ws in list(workspaces.values()):
        _destroy_workspace(isolation, ws)
    workspaces.clear()
    if owns_root:
        shutil.rmtree(root, ignore_errors=True)
