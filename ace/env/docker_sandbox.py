"""The docker backend of the Sandbox protocol: one long-lived container per sandbox, ``docker exec`` per run.

The container (``sleep infinity`` under docker's init) has no network, memory/CPU/pids limits, a read-only
root filesystem, no capabilities and ``no-new-privileges``. The host directory ``<root>`` holds
``ws/<id>/`` (workspaces, mounted read-write) and ``data/<id>/`` (public data, mounted read-only), both at
their host paths, so that a workspace's ``data`` symlink (``../../data/<id>``) resolves the same way inside
and outside the container. Each workspace gets its own unprivileged uid; every run executes as that uid,
and when it ends (or times out) ``kill -9 -1`` run as the same uid removes whatever it left behind.

With ``fork_server`` (the default) a zygote runs in the container as root (`ace/env/zygote.py`,
``--listen`` mode: one per container), having imported numpy, pandas and scikit-learn once; each run is
then a ``docker exec`` of `ace/env/zygote_client.py`, which has the zygote fork the program with the
exec's own output streams, as the workspace's uid. The container keeps only the SETUID and SETGID
capabilities for that (the program itself, as a non-root uid under ``no-new-privileges``, holds none).
While the zygote is down a run starts a fresh interpreter, and the zygote is started again. The zygote's
memory counts against the container's limit (its pages are shared with the runs it forks).

The image carries only system libraries (see .ci/docker.sh, which builds ``ace-sandbox:test`` with
``docker import``); the interpreter that runs programs is the host's, mounted read-only at its own paths
(``interpreter_roots``), so the container sees exactly the packages of the host's venv.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

from ace.env import zygote_client
from ace.env.fork_server import DEFAULT_PRELOAD
from ace.env.supervision import OUTPUT_KILL_FACTOR

from ace.env.sandbox import (
    ExecResult, SandboxError, SandboxLimits, Workspace, interpreter_roots, sandbox_env, stage_script,
)
from ace.env.sandbox_guards import (
    UID_BASE, UID_SPAN, BoundedOutput, classify_exit, remove_escaping_symlinks, tree_size,
)

DEFAULT_IMAGE = "ace-sandbox:test"
# Room above the program's own process budget for the exec that cleans up after it.
_PIDS_HEADROOM = 8


def docker_client(base_url: str | None = None):
    """A docker SDK client that has answered a ping, or a SandboxError that says what to do."""
    import docker

    where = base_url or os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001 - the SDK raises several unrelated types for "no engine"
        raise SandboxError(f"no Docker engine at {where}: start dockerd or use sandbox=subprocess ({e})") from e
    return client


class DockerSandbox:
    """Sandbox backend running every execution inside one container owned by this object.

    Args:
        limits: resource limits (memory, processes and CPU apply to the container as a whole).
        image: local image holding the system libraries (default built by .ci/docker.sh).
        root: host directory for workspaces and data copies (default a fresh temporary directory).
        python: host interpreter mounted into the container and used to run programs.
        cpus: CPUs the container may use.
        base_url: docker engine address (default DOCKER_HOST or the local socket).
        fork_server: fork runs from a zygote in the container (see the module docstring).
        preload: modules the zygote imports.
    """

    isolation = "docker"

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *, image: str = DEFAULT_IMAGE,
                 root: Path | str | None = None, python: str = sys.executable, cpus: float = 1.0,
                 base_url: str | None = None, fork_server: bool = True,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, start_timeout_s: float = 120.0):
        import docker

        if cpus <= 0:
            raise ValueError(f"cpus={cpus!r}: expected a positive number of CPUs")
        self.limits, self.image, self.python = limits, image, python
        self.client = docker_client(base_url)
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound as e:
            raise SandboxError(f"docker image {image!r} not found: build it with .ci/docker.sh") from e
        self._owns_root = root is None
        self._root = Path(tempfile.mkdtemp(prefix="ace-docker-") if root is None else root).resolve()
        (self._root / "ws").mkdir(parents=True, exist_ok=True)
        (self._root / "data").mkdir(exist_ok=True)
        for p in (self._root, self._root / "ws", self._root / "data"):
            os.chmod(p, 0o711)
        self._workspaces: dict[Path, Workspace] = {}
        volumes = {str(self._root / "ws"): {"bind": str(self._root / "ws"), "mode": "rw"},
                   str(self._root / "data"): {"bind": str(self._root / "data"), "mode": "ro"}}
        for r in interpreter_roots(python):
            volumes[str(r)] = {"bind": str(r), "mode": "ro"}
        # The zygote's folder: its code, socket and ready file; only root (the zygote, the client) opens it.
        self._ctl = self._root / "ctl"
        self._ctl.mkdir(mode=0o700, exist_ok=True)
        for name in ("zygote.py", "namespace_launcher.py", "zygote_client.py"):
            shutil.copy(Path(zygote_client.__file__).with_name(name), self._ctl / name)
        volumes[str(self._ctl)] = {"bind": str(self._ctl), "mode": "rw"}
        self.preload, self.fork_server = tuple(preload), bool(fork_server)
        mb = 2**20
        self.container = self.client.containers.run(
            image, ["sleep", "infinity"], detach=True, init=True, network_mode="none",
            mem_limit=limits.memory_mb * mb, memswap_limit=limits.memory_mb * mb,
            pids_limit=limits.max_processes + _PIDS_HEADROOM, nano_cpus=int(cpus * 1e9),
            volumes=volumes, read_only=True, tmpfs={"/tmp": f"size={limits.max_file_mb}m,mode=1777"},
            cap_drop=["ALL"], cap_add=["SETUID", "SETGID"] if self.fork_server else [],
            security_opt=["no-new-privileges"], labels={"ace.sandbox": "1"},
            ulimits=[docker.types.Ulimit(name="fsize", soft=limits.max_file_mb * mb, hard=limits.max_file_mb * mb),
                     docker.types.Ulimit(name="nproc", soft=limits.max_processes, hard=limits.max_processes),
                     docker.types.Ulimit(name="core", soft=0, hard=0)],
        )

        if self.fork_server:
            self._start_zygote()
            if not self._zygote_wait(start_timeout_s):
                warnings.warn(f"the docker sandbox's zygote did not start within {start_timeout_s:.0f}s; "
                              "runs use a fresh interpreter until it does", RuntimeWarning, stacklevel=2)

    # -- the zygote
    def _start_zygote(self) -> None:
        for name in ("zygote.sock", "zygote.sock.ready"):
            (self._ctl / name).unlink(missing_ok=True)
        env = sandbox_env(self._ctl, self.python, self.limits, "/tmp")
        self.container.exec_run([self.python, str(self._ctl / "zygote.py"), "--listen", str(self._ctl / "zygote.sock"),
                                 json.dumps(list(self.preload))], user="0:0", detach=True, environment=env,
                                workdir=str(self._ctl))

    def _zygote_wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.zygote_ready and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.zygote_ready

    @property
    def zygote_ready(self) -> bool:
        """Whether runs go through the zygote (it announced itself and no run has found it gone since)."""
        return self.fork_server and (self._ctl / "zygote.sock.ready").exists()

    def __enter__(self) -> "DockerSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Removes the container and every workspace (and the root directory when this object made it)."""
        for ws in list(self._workspaces.values()):
            self.destroy_workspace(ws)
        try:
            self.container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone (engine restarted, closed twice)
            pass
        if self._owns_root:
            shutil.rmtree(self._root, ignore_errors=True)

    # -- workspaces
    def create_workspace(self, public_dir: Path) -> Workspace:
        """A fresh workspace whose ``data`` is a read-only copy of ``public_dir``."""
        public_dir = Path(public_dir).resolve()
        if not public_dir.is_dir():
            raise ValueError(f"public_dir={public_dir}: expected an existing directory of public data")
        ws_id = secrets.token_hex(8)
        uid = UID_BASE + secrets.randbelow(UID_SPAN)
        data = self._root / "data" / ws_id
        shutil.copytree(public_dir, data)
        for dirpath, _, filenames in os.walk(data):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
        root = self._root / "ws" / ws_id
        root.mkdir(mode=0o700)
        os.symlink(f"../../data/{ws_id}", root / "data")
        (root / "submission").mkdir()
        for p in (root, root / "submission"):
            os.chown(p, uid, uid)
        ws = Workspace(root=root, data_dir=root / "data", submission_dir=root / "submission")
        self._workspaces[root] = ws
        return ws

    def destroy_workspace(self, workspace: Workspace) -> None:
        if self._workspaces.pop(workspace.root, None) is None:
            return
        self._kill_uid(workspace.root.stat().st_uid)
        shutil.rmtree(self._root / "data" / workspace.root.name, ignore_errors=True)
        shutil.rmtree(workspace.root, ignore_errors=True)

    # -- execution
    def run(self, workspace: Workspace, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Runs ``code`` as ``python script.py`` in the container, cwd = workspace root, as its uid."""
        timeout, uid, script = stage_script(workspace, code, timeout_s, known=self._workspaces,
                                            default_timeout_s=self.limits.wall_time_s)
        env = sandbox_env(workspace.root, self.python, self.limits, "/tmp")
        if self.zygote_ready:
            request = {"isolation": "docker", "script": str(script), "site": None,
                       "spec": {"workspace": str(workspace.root), "uid": uid, "rlimits": {}, "env": env}}
            result = self._exec(workspace, uid, timeout, [self.python, "-I", "-S", str(self._ctl / "zygote_client.py"),
                                                          str(self._ctl / "zygote.sock"), json.dumps(request)], "0:0", {})
            if not (result.returncode == zygote_client.UNAVAILABLE and "[ace-zygote-unavailable]" in result.stderr):
                return result
            # The zygote is gone (a container restart, a crash): this run starts fresh, the zygote again.
            self._start_zygote()
        return self._exec(workspace, uid, timeout, [self.python, str(script)], f"{uid}:{uid}", env)

    def _exec(self, workspace: Workspace, uid: int, timeout: float, cmd: list[str], user: str,
              env: dict[str, str]) -> ExecResult:
        """One ``docker exec`` of `cmd` as `user`, watched until it ends, times out or hits a limit."""
        api = self.client.api
        start = time.monotonic()
        exec_id = api.exec_create(self.container.id, cmd, user=user, workdir=str(workspace.root),
                                  environment=env)["Id"]
        sock = api.exec_start(exec_id, socket=True)
        raw = getattr(sock, "_sock", sock)
        outs = {1: BoundedOutput(self.limits.max_output_bytes), 2: BoundedOutput(self.limits.max_output_bytes)}
        timed_out, forced = False, None
        try:
            timed_out, forced = self._pump(raw, outs, start + timeout, workspace)
        finally:
            raw.close()
            # Runs on every exit path: a daemon the program double-forked must not outlive the run.
            self._kill_uid(uid)
        duration = time.monotonic() - start
        info = self._wait_exec_done(exec_id)
        returncode = info.get("ExitCode")
        if timed_out or forced:
            returncode = -signal.SIGKILL
        elif returncode is None:
            returncode = -signal.SIGKILL
        elif returncode > 128:  # the shell convention docker reports for a death by signal
            returncode = -(returncode - 128)
        stdout, stderr = outs[1].text(), outs[2].text()
        removed = remove_escaping_symlinks(workspace.root, allowed=(self._root / "data" / workspace.root.name,))
        if removed:
            stderr += f"\n[sandbox] removed symlinks pointing outside the workspace: {', '.join(removed)}\n"
        reason = classify_exit(returncode, stderr, timed_out=timed_out, forced=forced)
        return ExecResult(returncode, stdout, stderr, duration, timed_out, reason)

    def _pump(self, raw, outs: dict[int, BoundedOutput], deadline: float, ws: Workspace):
        """Reads the multiplexed exec stream (8-byte frame headers) until EOF, deadline or a limit."""
        buf = bytearray()
        kill_at = OUTPUT_KILL_FACTOR * self.limits.max_output_bytes
        quota = self.limits.max_workspace_mb * 2**20
        next_quota_check = time.monotonic() + 0.5
        while True:
            now = time.monotonic()
            if now >= deadline:
                return True, None
            ready, _, _ = select.select([raw], [], [], min(0.05, deadline - now))
            if ready:
                chunk = raw.recv(1 << 16)
                if not chunk:
                    return False, None
                buf += chunk
                while len(buf) >= 8:
                    stream, size = buf[0], struct.unpack(">I", buf[4:8])[0]
                    if len(buf) < 8 + size:
                        break
                    outs.get(stream, outs[2]).feed(bytes(buf[8:8 + size]))
                    del buf[:8 + size]
            if outs[1].total + outs[2].total > kill_at:
                return False, "output_limit"
            if time.monotonic() > next_quota_check:
                next_quota_check = time.monotonic() + 0.5
                if tree_size(ws.root) > quota:
                    return False, "disk_quota"

    def _wait_exec_done(self, exec_id: str, timeout_s: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.client.api.exec_inspect(exec_id)
            if not info.get("Running") or time.monotonic() > deadline:
                return info
            time.sleep(0.02)

    def _kill_uid(self, uid: int) -> None:
        """Kills every process of ``uid`` in the container; restarts the container if that cannot run."""
        import docker

        if uid < UID_BASE:
            raise ValueError(f"uid {uid}: refusing to kill processes of a uid below {UID_BASE}")
        # kill(-1) signals every process the caller may signal, i.e. those of its own uid, except itself.
        # One pass is not atomic against a fork bomb (a child forked behind the kernel's walk of the
        # process list survives it), so repeat while any process was signalled; bounded, because a
        # killed process stays signallable as a zombie until the container's init reaps it.
        again = "i=0; while [ $i -lt 50 ] && kill -9 -1 2>/dev/null; do i=$((i+1)); done; exit 0"
        try:
            out = self.container.exec_run(["sh", "-c", again], user=f"{uid}:{uid}")
            if out.exit_code == 0:
                return
        except Exception:  # noqa: BLE001 - e.g. the pids limit is exhausted and no exec can start
            pass
        try:
            self.container.restart(timeout=0)
        except docker.errors.NotFound:  # removed under us: nothing of the uid can be running
            pass
