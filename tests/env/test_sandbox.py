"""SubprocessSandbox: workspace contract, limits, isolation level, and the hostile-program corpus."""
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ace.env.namespace_launcher
import ace.env.sandbox_guards
import ace.env.subprocess_sandbox
from ace.env.sandbox_guards import BoundedOutput
from ace.env.sandbox import SandboxLimits, Workspace
from ace.env.sandboxes import make_sandbox
from ace.env.subprocess_sandbox import SubprocessSandbox

LIMITS = SandboxLimits(wall_time_s=10, cpu_time_s=10, memory_mb=512, max_processes=32, max_file_mb=8,
                       max_output_bytes=4000, max_workspace_mb=32)
SECRET = "S3CRET-" + os.urandom(6).hex()
ENV_SECRET = "ENVSECRET-" + os.urandom(6).hex()
REPO = Path(__file__).resolve().parents[2]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _survivors(ws: Workspace) -> list[str]:
    """Processes (host view) that belong to the workspace: its uid, or its path in their command line."""
    uid = ws.root.stat().st_uid
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            owner = os.stat(f"/proc/{d}").st_uid
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if (owner == uid and uid != os.getuid()) or str(ws.root).encode() in cmd:
            found.append(f"{d}: {cmd!r}")
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Public data, private answers a hostile program could guess the path of, and a fake grader file."""
    base = tmp_path_factory.mktemp("world")
    public = base / "public"
    public.mkdir()
    (public / "train.csv").write_text("id,x,y\n1,0.5,1\n2,0.7,0\n")
    (public / "test.csv").write_text("id,x\n3,0.1\n")
    private = base / "private"
    private.mkdir()
    (private / "answers.csv").write_text(f"id,y\n3,{SECRET}\n")
    os.chmod(private / "answers.csv", 0o644)
    grader = base / "grader"
    grader.mkdir()
    (grader / "grade.py").write_text("def grade():\n    return 0.5\n")
    # Deliberately world-writable: only isolation, not permissions, may protect it.
    os.chmod(grader, 0o777)
    os.chmod(grader / "grade.py", 0o666)
    for d in (base, public):
        os.chmod(d, 0o755)
    return {"base": base, "public": public, "private": private, "grader": grader}


@pytest.fixture(scope="module", params=[True, False], ids=["forked", "fresh"])
def sandbox(request):
    """Both ways of starting a program: forks of the fork server's zygote, and fresh interpreters."""
    with SubprocessSandbox(LIMITS, fork_server=request.param) as sb:
        assert (sb.fork_server is not None and sb.fork_server.alive) == request.param
        yield sb


def test_limits_reject_non_positive_values_naming_the_field():
    with pytest.raises(ValueError, match="memory_mb=0"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="kind 'vm'"):
        make_sandbox("vm")


def test_bounded_output_keeps_head_and_tail_like_slicing():
    rng = __import__("random").Random(0)
    data = bytes(rng.randrange(97, 123) for _ in range(10_000))
    out = BoundedOutput(1000)
    for i in range(0, len(data), 77):
        out.feed(data[i:i + 77])
    assert out.total == len(data)
    text = out.text()
    assert text.startswith(data[:500].decode()) and text.endswith(data[-500:].decode())
    assert "[... 9000 bytes truncated ...]" in text
    small = BoundedOutput(1000)
    small.feed(b"hello")
    assert small.text() == "hello"


def test_workspace_contract_and_same_output_as_bare_subprocess(sandbox, world, tmp_path):
    code = textwrap.dedent("""
        import os, csv
        rows = list(csv.reader(open("data/train.csv")))
        print(len(rows), sorted(os.listdir("data")), os.path.exists("submission"))
        with open("submission/submission.csv", "w") as f:
            f.write("id,y\\n3,1\\n")
        try:
            open("data/new.csv", "w")
            print("data writable")
        except OSError:
            print("data read-only")
    """)
    ws = sandbox.create_workspace(world["public"])
    try:
        res = sandbox.run(ws, code)
        assert res.ok and res.killed_reason is None and not res.timed_out, res
        # Reference: the same program in a plain copy of the layout, with a plain subprocess.run.
        ref_root = tmp_path / "ref"
        (ref_root / "submission").mkdir(parents=True)
        (ref_root / "data").mkdir()
        for p in world["public"].iterdir():
            (ref_root / "data" / p.name).write_bytes(p.read_bytes())
        ref = subprocess.run([sys.executable, "-c", code], cwd=ref_root, capture_output=True, text=True)
        assert res.stdout.splitlines()[0] == ref.stdout.splitlines()[0]
        assert res.stdout.splitlines()[1] == "data read-only"
        assert ws.submission_path.read_text() == (ref_root / "submission" / "submission.csv").read_text()
        assert ws.data_dir == ws.root / "data" and ws.submission_path == ws.root / "submission" / "submission.csv"
    finally:
        sandbox.destroy_workspace(ws)
    assert not ws.root.exists()


def test_isolation_level_is_reported_and_network_refused_under_it(sandbox, world):
    probe = textwrap.dedent("""
        import os, socket
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            print("CONNECTED")
        except PermissionError as e:
            print("REFUSED-BY-HOOK", e)
        except OSError as e:
            print("REFUSED-ERRNO", e.errno)
        print("PIDS", len([p for p in os.listdir("/proc") if p.isdigit()]))
    """)
    namespaces_possible = os.geteuid() == 0 and subprocess.run(
        ["unshare", "--net", "--pid", "--mount", "--fork", "true"], capture_output=True).returncode == 0
    assert sandbox.isolation == ("namespaces" if namespaces_possible else "fallback")
    ws = sandbox.create_workspace(world["public"])
    try:
        out = sandbox.run(ws, probe).stdout
    finally:
        sandbox.destroy_workspace(ws)
    assert "CONNECTED" not in out
    if sandbox.isolation == "namespaces":
        assert "REFUSED-ERRNO 101" in out  # ENETUNREACH: the namespace has no route at all
        # A fresh pid namespace: the launcher and the program, nothing of the host.
        assert int(out.split("PIDS")[1]) <= 3
    with SubprocessSandbox(LIMITS, isolation="fallback") as fb:
        assert fb.isolation == "fallback"
        ws = fb.create_workspace(world["public"])
        out = fb.run(ws, probe).stdout
        assert "REFUSED-BY-HOOK" in out and "CONNECTED" not in out
        assert int(out.split("PIDS")[1]) > 3  # no pid namespace: the host's processes are visible


def test_timeout_kills_the_whole_process_group(sandbox, world):
    ws = sandbox.create_workspace(world["public"])
    try:
        code = ("import subprocess, sys, time\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)\n")
        t0 = time.monotonic()
        res = sandbox.run(ws, code, timeout_s=1.0)
        assert res.timed_out and res.killed_reason == "timeout" and res.returncode == -9 and not res.ok
        assert time.monotonic() - t0 < 5
        assert _survivors(ws) == []
    finally:
        sandbox.destroy_workspace(ws)


# ------------------------------------------------------------------------------------------ hostile corpus
# Each program tries one attack and prints "ESCAPED" if it worked; "DONE" proves that it ran to the end
# where it should. After each one the test checks that nothing of the episode survives, that the host
# side shows no harm, and that the sandbox still serves the next episode.

HOSTILE = {
    "network": ("""
        import socket
        for addr in [("1.1.1.1", 53), ("8.8.8.8", 443), ("127.0.0.1", 22)]:
            try:
                socket.create_connection(addr, timeout=1); print("ESCAPED", addr)
            except OSError:
                pass
        try:
            socket.getaddrinfo("example.com", 80); print("ESCAPED dns")
        except OSError:
            pass
        print("DONE")
    """, {}),
    "read_private_answers": ("""
        import glob, os
        guesses = [PRIVATE + "/answers.csv", "../private/answers.csv", "../../private/answers.csv"]
        guesses += glob.glob("/tmp/**/answers.csv", recursive=True) + glob.glob("/root/**/answers.csv", recursive=True)
        for top in ["/tmp", "/root", "/work", "/home", "/mnt", "/var", "/srv", "/opt"] + os.listdir("/"):
            if top in ("usr", "proc", "sys", "lib", "bin", "sbin"):
                continue
            for dirpath, _, files in os.walk(os.path.join("/", top)):
                guesses += [os.path.join(dirpath, f) for f in files if "answer" in f]
        for g in guesses:
            try:
                if SECRET_PREFIX in open(g, errors="replace").read(): print("ESCAPED", g)
            except OSError:
                pass
        print("DONE")
    """, {"timeout_s": 60}),  # walks every visible folder: slow on a loaded CI machine
    "write_outside_workspace": ("""
        import os
        try:  # the sandbox may give the program a private /tmp; the host-side check says if it leaked
            open(TOKEN_FILE, "w").write("x")
        except OSError:
            pass
        for path in [PUBLIC + "/evil.csv", os.path.dirname(os.getcwd()) + "/evil", "/root/evil",
                     "/etc/evil", "/usr/evil", GRADER + "/evil.py", "/evil"]:
            try:
                open(path, "w").write("x"); print("WROTE", path)
            except OSError:
                pass
        print("DONE")
    """, {}),
    "fork_bomb": ("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, {"timeout_s": 3}),
    "memory_bomb": ("""
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))
    """, {"reason": "memory"}),
    "fill_the_disk": ("""
        import os
        try:
            with open("big.bin", "wb") as f:
                while True: f.write(b"x" * 2**20)
        except OSError as e:
            print("big stopped", e)
        for i in range(1000):
            try:
                with open(f"chunk{i}.bin", "wb") as f: f.write(b"x" * 4 * 2**20)
            except OSError:
                break
        print("DONE")
    """, {}),
    "infinite_loop": ("while True:\n    pass\n", {"timeout_s": 1, "reason": "timeout"}),
    "ignore_sigterm": ("""
        import signal, time
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            time.sleep(0.01)
    """, {"timeout_s": 1, "reason": "timeout"}),
    "double_fork_daemon": ("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for i in range(100):
                    with open("heartbeat.txt", "a") as f: f.write("beat\\n")
                    time.sleep(0.05)
            os._exit(0)
        time.sleep(0.2)
        print("DONE")
    """, {}),
    "read_environment_secrets": ("""
        import os, glob
        print(dict(os.environ))
        for p in glob.glob("/proc/*/environ"):
            try: print(open(p, "rb").read())
            except OSError: pass
        print("DONE")
    """, {}),
    "print_gigabytes": ("""
        import sys
        block = "y" * 2**20
        for _ in range(4096):
            sys.stdout.write(block)
    """, {"reason": "output_limit"}),
    "kill_the_parent": ("""
        import os, signal
        for pid in (os.getppid(), 1, HOST_PID):
            try: os.kill(pid, signal.SIGKILL)
            except OSError: pass
        try: os.kill(-1, signal.SIGKILL)
        except OSError: pass
        print("DONE")
    """, {}),
    "change_the_grader": ("""
        import os, sys
        for path in [GRADER + "/grade.py", REPO + "/ace/env/grading.py", SANDBOX_FILE, LAUNCHER_FILE,
                     os.path.join(os.path.dirname(os.__file__), "evil.py"), sys.executable]:
            try:
                open(path, "a").write("\\nESCAPED = True\\n"); print("MODIFIED", path)
            except OSError:
                pass
        print("DONE")
    """, {}),
    "symlink_out_of_workspace": ("""
        import os
        os.symlink("/", "rootlink")
        os.symlink(PRIVATE + "/answers.csv", "submission/submission.csv")
        try:
            if SECRET_PREFIX in open("rootlink" + PRIVATE + "/answers.csv").read(): print("ESCAPED")
        except OSError:
            pass
        print("DONE")
    """, {}),
    "overwrite_public_data": ("""
        import os, shutil
        attempts = [lambda: open("data/train.csv", "w").write("id,x,y\\n"), lambda: os.remove("data/train.csv"),
                    lambda: os.chmod("data/train.csv", 0o777), lambda: os.rename("data", "data_old"),
                    lambda: shutil.rmtree("data"), lambda: open(PUBLIC + "/train.csv", "w").write("")]
        for attempt in attempts:
            try:
                attempt(); print("ESCAPED", attempt)
            except OSError:
                pass
        print("DONE")
    """, {}),
    "read_another_workspace": ("""
        import glob
        for p in [OTHER_WS + "/notes.txt"] + glob.glob("/tmp/ace-sandbox-*/*/notes.txt"):
            try:
                print("ESCAPED", open(p).read())
            except OSError:
                pass
        print("DONE")
    """, {}),
    "become_root": ("""
        import os, subprocess
        for f in (lambda: os.setuid(0), lambda: os.setgid(0)):
            try: f()
            except OSError: pass
        for cmd in (["su", "-c", "id -u"], ["mount", "-t", "tmpfs", "x", "/mnt"]):
            try: subprocess.run(cmd, timeout=2, capture_output=True)
            except Exception: pass
        if os.getuid() == 0 or os.geteuid() == 0: print("ESCAPED")
        print("DONE")
    """, {}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_fails_safely(name, sandbox, world, monkeypatch):
    monkeypatch.setenv("ACE_HOSTILE_SECRET", ENV_SECRET)
    body, opts = HOSTILE[name]
    token_file = Path(f"/tmp/ace-escape-{os.urandom(4).hex()}")
    other = sandbox.create_workspace(world["public"])
    (other.root / "notes.txt").write_text(SECRET)
    consts = dict(PRIVATE=str(world["private"]), PUBLIC=str(world["public"]), GRADER=str(world["grader"]),
                  SECRET_PREFIX=SECRET[:12], TOKEN_FILE=str(token_file), HOST_PID=os.getpid(), REPO=str(REPO),
                  SANDBOX_FILE=ace.env.subprocess_sandbox.__file__, LAUNCHER_FILE=ace.env.namespace_launcher.__file__,
                  OTHER_WS=str(other.root))
    code = "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + textwrap.dedent(body)
    guarded = [world["public"], world["grader"], REPO / "ace" / "env"]
    before = {p: _tree_digest(p) for p in guarded}
    ws = sandbox.create_workspace(world["public"])
    data_before = _tree_digest(ws.data_dir)
    try:
        res = sandbox.run(ws, code, timeout_s=opts.get("timeout_s", 10))
        out = res.stdout + res.stderr
        # Markers are checked on stdout only: a traceback on stderr quotes the source line that prints them.
        assert not any(m in res.stdout for m in ("ESCAPED", "WROTE", "MODIFIED")), out[-3000:]
        assert SECRET not in out and ENV_SECRET not in out
        if "DONE" in body:
            assert "DONE" in res.stdout, out[-3000:]
        if "reason" in opts:
            assert res.killed_reason == opts["reason"] and not res.ok, res
        assert _survivors(ws) == [], "a process of the episode outlived it"
        # Host-side harm checks.
        assert {p: _tree_digest(p) for p in guarded} == before
        assert _tree_digest(ws.data_dir) == data_before
        assert not token_file.exists()
        assert not ws.submission_path.is_symlink()
        if ws.submission_path.exists():
            assert SECRET not in ws.submission_path.read_text()
        assert ace.env.sandbox_guards.tree_size(ws.root) <= (LIMITS.max_workspace_mb + 1) * 2**20
        if name == "double_fork_daemon":
            beat = ws.root / "heartbeat.txt"
            size = beat.stat().st_size if beat.exists() else 0
            time.sleep(0.3)
            assert (beat.stat().st_size if beat.exists() else 0) == size, "the daemon is still writing"
        if name == "print_gigabytes":
            assert len(res.stdout) <= LIMITS.max_output_bytes + 100
    finally:
        sandbox.destroy_workspace(ws)
        sandbox.destroy_workspace(other)
    # The environment keeps serving the next episode.
    nxt = sandbox.create_workspace(world["public"])
    try:
        res = sandbox.run(nxt, "print(open('data/train.csv').read().count('\\n'))")
        assert res.ok and res.stdout.strip() == "3", res
    finally:
        sandbox.destroy_workspace(nxt)
