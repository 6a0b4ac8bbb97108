"""The init process of a sandbox's namespaces, and the mount syscalls that the sandbox needs.

Started by ``SubprocessSandbox`` (ace/env/subprocess_sandbox.py) as
``unshare --net --pid --mount --fork --kill-child python -I -S namespace_launcher.py --init FD SPEC``:
it runs as root and as pid 1 of the fresh pid namespace, with only the standard library (no site-packages,
so it starts fast and trusts nothing of the program's interpreter). It builds a new root holding only what
the program may see, chroots, forks the program as the workspace's unprivileged uid under rlimits, reaps
orphans until the program ends, reports ``{"exit": n}``, ``{"signal": n}`` or ``{"error": msg}`` as one
JSON object on pipe FD, and exits; its exit makes the kernel kill every process left in the namespace.

The fork server's zygote (`ace/env/zygote.py`) runs the same steps from a forked child of itself
(`enter_new_root`, `drop_privileges`, `namespace_init` with an in-process program), so both ways of
starting a program build one and the same sandbox.
"""
import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38


def libc_handle():
    return ctypes.CDLL(None, use_errno=True)


def mount(libc, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount({src!r} -> {dst!r}, {fstype!r}, {data!r}): {os.strerror(err)}")


def umount(libc, path) -> None:
    libc.umount2(str(path).encode(), MNT_DETACH)


def enter_new_root(libc, spec: dict) -> None:
    """Builds the new root that `spec` describes in this (fresh) mount namespace and chroots into it.

    Runs as root. `spec`: ``newroot`` (an empty directory), ``ro_binds`` (interpreter roots and the
    sitecustomize folder, bound read-only), ``workspace`` (bound read-write, the working directory
    afterwards) and ``tmp_mb`` (the private /tmp's size).
    """
    new = spec["newroot"].rstrip("/")
    mount(libc, "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")

    def bind(src: str, ro: bool, flags: int = MS_NOSUID | MS_NODEV) -> None:
        dst = new + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        mount(libc, src, dst, None, MS_BIND | MS_REC, None)
        mount(libc, None, dst, None, MS_REMOUNT | MS_BIND | flags | (MS_RDONLY if ro else 0), None)

    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"):
        if os.path.islink(top):
            os.symlink(os.readlink(top), new + top)
        elif os.path.isdir(top):
            bind(top, ro=True)
    # The private /tmp comes before the interpreter binds, so an interpreter installed under /tmp
    # (a checkout in /tmp) stays visible inside it instead of being hidden by it.
    os.makedirs(new + "/tmp", exist_ok=True)
    mount(libc, "tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmp_mb']}m,mode=1777")
    for root in spec["ro_binds"]:
        if not any(root == t or root.startswith(t + "/") for t in ("/usr", "/etc")):
            bind(root, ro=True)
    os.makedirs(new + "/proc")
    mount(libc, "proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV, None)
    os.makedirs(new + "/dev")
    mount(libc, "tmpfs", new + "/dev", "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for dev in ("null", "zero", "full", "random", "urandom"):
        bind("/dev/" + dev, ro=False, flags=MS_NOSUID)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    os.makedirs(new + "/dev/shm")
    mount(libc, "tmpfs", new + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    # Bound last so that a workspace under /tmp lands inside the private /tmp, not under it.
    bind(spec["workspace"], ro=False)
    os.chroot(new)
    os.chdir(spec["workspace"])


def drop_privileges(libc, spec: dict) -> None:
    """Applies `spec`'s rlimits, sets no_new_privs and, when ``spec["uid"]`` is set, becomes that uid.

    From root to a non-root uid every capability is dropped; the process can never regain them.
    """
    import resource

    for name, value in spec["rlimits"].items():
        soft, hard = value if isinstance(value, list) else (value, value)
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid = spec.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def wait_status(pid: int, *, reap_orphans: bool) -> dict:
    """Waits for `pid` (reaping any other child on the way when this process is an init) and returns
    ``{"exit": n}`` or ``{"signal": n}``."""
    while True:
        try:
            done, wstatus = os.waitpid(-1 if reap_orphans else pid, 0)
        except ChildProcessError:
            wstatus = 127 << 8
            break
        if done == pid:
            break
    return {"signal": os.WTERMSIG(wstatus)} if os.WIFSIGNALED(wstatus) else {"exit": os.WEXITSTATUS(wstatus)}


def namespace_init(status_fd: int, spec: dict, program=None):
    """Pid 1 of the sandbox's namespaces: new root, then the program as the workspace's uid, then report.

    `program` None execs ``spec["argv"]`` (a fresh interpreter). Otherwise it is called in the program's
    process once privileges are dropped (the fork server's in-process run); whatever it returns is
    returned from here in that process only (its exit code), while this process reports and exits.
    """
    libc = libc_handle()
    try:
        enter_new_root(libc, spec)
    except Exception as e:  # noqa: BLE001 - any setup failure is reported to the host verbatim
        os.write(status_fd, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        os._exit(1)

    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_fd)
            os.setsid()
            drop_privileges(libc, spec)
            if program is None:
                os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"[sandbox] could not start the program: {type(e).__name__}: {e}\n".encode())
            os._exit(127)
        return program()
    # As init, reap every orphan until the program itself ends; leaving then kills the rest.
    os.write(status_fd, json.dumps(wait_status(pid, reap_orphans=True)).encode())
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--init":
    namespace_init(int(sys.argv[2]), json.loads(sys.argv[3]))
