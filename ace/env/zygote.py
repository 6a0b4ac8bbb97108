"""The fork server's zygote: an interpreter that has imported the heavy libraries once and forks a
child per execution, each isolated as a fresh ``python script.py`` would be.

Started by `ace.env.fork_server.ForkServer` as ``PYTHON zygote.py SOCKET_FD PRELOAD_JSON`` with the
program's interpreter (so the preloads are the program's numpy, pandas, scikit-learn) and only the
standard library besides them; it runs as root under the namespaces isolation, outside any namespace.
Protocol over the SOCK_SEQPACKET socket FD, one JSON message each way per run:

    zygote -> host   {"ready": true, "loaded": [...], "failed": {name: error}}        once, at start
    host -> zygote   {"isolation", "spec", "script", "site"} with three fds: stdout, stderr, status
    zygote -> host   {"pid": P}   P leads the run's process group (the host kills the group on timeout)

Per run (all in forked children; the zygote itself never runs a program and never changes):

* P, the run's leader: a new session; fds 0-2 become /dev/null and the run's stdout/stderr pipes, fd 3
  the status pipe, and every other fd is closed (the zygote's socket above all: a program that could
  reach it could ask a root process for anything).
* ``namespaces``: P unshares mount, pid and network namespaces and forks pid 1 of them, which runs
  `namespace_launcher.namespace_init` (new root, chroot, the program as the workspace's uid under rlimits,
  reap, report status) exactly as the fresh-interpreter path does; P waits for it.
* ``fallback``: P forks the program (rlimits, uid when root, no_new_privs) and reports its status.
* The program's process resets what a fresh interpreter would start with (environment, argv, sys.path,
  ``__main__``, tempfile's directory, the seeded generators through the sandbox's sitecustomize) and
  executes the script in-process. Its exit code, tracebacks and shutdown (non-daemon threads joined,
  atexit handlers, flushed streams) are those of ``python script.py``; only the teardown of the
  preloaded modules is skipped.

Nothing flows back from a child into the zygote, so no run sees what another run set or patched.
"""
import importlib
import importlib.util
import json
import os
import signal
import socket
import sys

# The zygote's own folder (ace/env) must not shadow the preloads' imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)


def _load_launcher():
    spec = importlib.util.spec_from_file_location("_ace_namespace_launcher",
                                                  os.path.join(_HERE, "namespace_launcher.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


def preload_modules(preload: list) -> dict:
    """Imports `preload`; returns the ready message (what loaded, what failed and why)."""
    loaded, failed = [], {}
    for name in preload:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as e:  # noqa: BLE001 - a missing preload only costs its import time later
            failed[name] = f"{type(e).__name__}: {e}"
    # Run leaders are reaped by the kernel: the zygote never waits, and no zombie accumulates.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    return {"ready": True, "loaded": loaded, "failed": failed}


def serve(sock: socket.socket, preload: list) -> int:
    """Preloads, reports ready, then forks one run per request until the host closes the socket.

    Returns 0 in the zygote when the host is gone, and the program's exit code in a program's process.
    """
    sock.send(json.dumps(preload_modules(preload)).encode())
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except OSError:
            return 0
        if not message:
            return 0
        pid = _fork(sock)
        if pid == 0:
            return run_leader(json.loads(message), fds)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid} if pid > 0 else {"error": "fork failed"}).encode())


def serve_listening(path: str, preload: list) -> int:
    """The docker backend's zygote (one per container): requests come from `zygote_client.py`, one
    connection each, on a socket at `path` that only root may open; ``path + ".ready"`` announces it.

    The client passes its own stdout and stderr (those of its ``docker exec``) and a status pipe.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    ready = preload_modules(preload)
    with open(path + ".ready.tmp", "w") as f:
        json.dump(ready, f)
    os.replace(path + ".ready.tmp", path + ".ready")
    while True:
        conn, _ = listener.accept()
        try:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        except OSError:
            conn.close()
            continue
        if not message or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        pid = _fork(listener, conn)
        if pid == 0:
            return run_leader(json.loads(message), fds)
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid} if pid > 0 else {"error": "fork failed"}).encode())
        conn.close()


def _fork(*sockets: socket.socket) -> int:
    """Forks; the child gives up the zygote's sockets at once (run_leader closes every other fd).

    Returns -1 when the kernel refuses the fork (a process limit reached): the zygote lives on, and
    the host runs that program as a fresh interpreter.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        return -1
    if pid == 0:
        for sock in sockets:
            os.close(sock.detach())
    return pid


def run_leader(request: dict, fds: list) -> int:
    """P: the run's process group and file descriptors, then the isolation the request names."""
    out_w, err_w, status_w = fds
    os.setsid()
    try:
        # Under memory pressure the kernel (or a container's cgroup) kills the run, not the zygote.
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    for src, dst in ((null, 0), (out_w, 1), (err_w, 2), (status_w, 3)):
        os.dup2(src, dst)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    spec, libc = request["spec"], launcher.libc_handle()
    if request["isolation"] == "namespaces":
        try:
            if libc.unshare(launcher.CLONE_NEWNS | launcher.CLONE_NEWPID | launcher.CLONE_NEWNET) != 0:
                raise OSError(launcher.ctypes.get_errno(), "unshare(mount, pid, net)")
            # Mounts made for this run stay in its namespace.
            launcher.mount(libc, None, "/", None, launcher.MS_REC | launcher.MS_PRIVATE, None)
        except OSError as e:
            os.write(3, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            os._exit(1)
        init = os.fork()
        if init == 0:  # pid 1 of the new pid namespace
            return launcher.namespace_init(3, spec, program=lambda: run_program(request))
        launcher.wait_status(init, reap_orphans=False)
        os._exit(0)
    program = os.fork()
    if program == 0:
        try:
            os.close(3)
            launcher.drop_privileges(libc, spec)
            # As the workspace's uid: in a container, root holds no capability to enter it.
            os.chdir(spec["workspace"])
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"[sandbox] could not start the program: {type(e).__name__}: {e}\n".encode())
            os._exit(127)
        return run_program(request)
    os.write(3, json.dumps(launcher.wait_status(program, reap_orphans=False)).encode())
    os._exit(0)


def run_program(request: dict) -> int:
    """Runs the script in this process as ``python script.py`` would, and returns its exit code.

    A ``SystemExit`` propagates (`exit_as_python_would` turns its code into the exit status); any other
    exception prints the traceback from the script's own frames, as the interpreter would, and gives 1.
    """
    import builtins
    import importlib.machinery
    import tempfile
    import types

    script = request["script"]
    os.environ.clear()
    os.environ.update(request["spec"]["env"])
    tempfile.tempdir = None
    sys.argv = [script]
    sys.path.insert(0, os.path.dirname(script))
    if request.get("site"):
        # The sandbox's sitecustomize: seeds the generators the preloads imported, and guards the rest.
        sys.path.insert(1, request["site"])
        importlib.import_module("sitecustomize")
    elif "numpy.random" in sys.modules:
        # No seeding asked for: numpy's global generator starts from fresh entropy, as in a fresh
        # interpreter, not from the state every fork would share. (`random` reseeds itself at fork.)
        sys.modules["numpy.random"].seed()
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    try:
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec")
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - reported as the interpreter reports an uncaught error
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        return 1
    return 0


def exit_as_python_would(code) -> None:
    """Ends a program's process as the interpreter ends ``python script.py`` (join non-daemon threads,
    run atexit handlers, flush the streams, the same exit status for a SystemExit code), except that it
    does not tear the preloaded modules down: that teardown takes about 0.3 s and nothing observes it."""
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--listen":
            code = serve_listening(sys.argv[2], json.loads(sys.argv[3]))
        else:
            code = serve(socket.socket(fileno=int(sys.argv[1])), json.loads(sys.argv[2]))
    except SystemExit as e:
        code = e.code
    exit_as_python_would(code)
