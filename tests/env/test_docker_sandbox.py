"""DockerSandbox against a real engine (provisioned by .ci/docker.sh): no network, scikit-learn runs,
memory/pids limits hold, and a timed-out exec leaves no process behind.

Under CI=true a missing engine or image is a failure, elsewhere a skip.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ace.env.sandbox import SandboxError, SandboxLimits
from ace.env.sandboxes import make_sandbox

pytestmark = pytest.mark.slow

LIMITS = SandboxLimits(wall_time_s=60, cpu_time_s=60, memory_mb=384, max_processes=32, max_file_mb=8,
                       max_output_bytes=4000, max_workspace_mb=64)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the docker backend cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    d = tmp_path_factory.mktemp("public")
    rows = ["id,x1,x2,y"] + [f"{i},{i % 7 / 7:.3f},{(i * 3) % 5 / 5:.3f},{int(i % 7 > 3)}" for i in range(40)]
    (d / "train.csv").write_text("\n".join(rows) + "\n")
    (d / "test.csv").write_text("id,x1,x2\n100,0.9,0.2\n101,0.1,0.4\n")
    os.chmod(d, 0o755)
    return d


@pytest.fixture(scope="module", params=[True, False], ids=["forked", "fresh"])
def sandbox(request):
    """Both ways of starting a program: forks of the container's zygote, and fresh interpreters."""
    try:
        sb = make_sandbox("docker", limits=LIMITS, fork_server=request.param)
    except SandboxError as e:
        _unavailable(str(e))
    with sb:
        assert sb.zygote_ready == request.param
        yield sb


def _leftovers(sb, ws) -> list:
    uid = str(ws.root.stat().st_uid)
    top = sb.container.top(ps_args="-eo uid,pid,args")
    return [p for p in top["Processes"] if p[0] == uid]


def test_clear_error_when_no_engine_answers():
    with pytest.raises(SandboxError, match="no Docker engine at unix:///nonexistent/docker.sock: start dockerd "
                                           "or use sandbox=subprocess"):
        make_sandbox("docker", base_url="unix:///nonexistent/docker.sock")


def test_container_has_no_network(sandbox, public):
    ws = sandbox.create_workspace(public)
    code = textwrap.dedent("""
        import socket
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2); print("CONNECTED")
        except OSError as e:
            print("REFUSED", e.errno)
        print(sorted(n for _, n in socket.if_nameindex()))
    """)
    res = sandbox.run(ws, code)
    assert res.ok, res
    assert "CONNECTED" not in res.stdout and "REFUSED 101" in res.stdout  # ENETUNREACH
    assert "['lo']" in res.stdout  # network "none": loopback only
    sandbox.destroy_workspace(ws)


def test_runs_scikit_learn_like_the_host(sandbox, public, tmp_path):
    code = textwrap.dedent("""
        import pandas as pd
        from sklearn.linear_model import LogisticRegression
        train, test = pd.read_csv("data/train.csv"), pd.read_csv("data/test.csv")
        model = LogisticRegression().fit(train[["x1", "x2"]], train["y"])
        proba = model.predict_proba(test[["x1", "x2"]])[:, 1]
        pd.DataFrame({"id": test["id"], "y": proba.round(10)}).to_csv("submission/submission.csv", index=False)
        try:
            open("data/train.csv", "a").write("tamper")
            print("DATA WRITABLE")
        except OSError:
            print("data read-only")
    """)
    ws = sandbox.create_workspace(public)
    res = sandbox.run(ws, code)
    assert res.ok, res
    assert res.stdout.strip() == "data read-only"
    # Reference: the same script with the host interpreter in a plain directory.
    (tmp_path / "submission").mkdir()
    os.symlink(public, tmp_path / "data")
    subprocess.run([sys.executable, "-c", code.replace('open("data/train.csv", "a")', 'open("/nonexistent/x", "a")')],
                   cwd=tmp_path, check=True, capture_output=True)
    assert ws.submission_path.read_text() == (tmp_path / "submission" / "submission.csv").read_text()
    assert "tamper" not in (public / "train.csv").read_text()
    sandbox.destroy_workspace(ws)


def test_memory_limit_kills_a_memory_bomb_and_the_container_survives(sandbox, public):
    ws = sandbox.create_workspace(public)
    res = sandbox.run(ws, "hog = []\nwhile True:\n    hog.append(bytearray(32 * 2**20))\n", timeout_s=30)
    assert not res.ok and not res.timed_out, res
    assert res.killed_reason in ("killed", "memory"), res  # cgroup OOM kill (SIGKILL) or MemoryError
    assert sandbox.run(ws, "print(6 * 7)").stdout.strip() == "42"
    sandbox.destroy_workspace(ws)


def test_pids_limit_stops_a_fork_bomb_and_nothing_survives(sandbox, public):
    ws = sandbox.create_workspace(public)
    code = textwrap.dedent("""
        import os
        n = 0
        while True:
            try:
                os.fork(); n += 1
            except OSError:
                pass
    """)
    res = sandbox.run(ws, code, timeout_s=3)
    assert res.timed_out and res.killed_reason == "timeout"
    assert _leftovers(sandbox, ws) == []
    assert sandbox.run(ws, "import os; print(len(os.sched_getaffinity(0)) > 0)").stdout.strip() == "True"
    sandbox.destroy_workspace(ws)


def test_timed_out_exec_leaves_no_process_behind(sandbox, public):
    ws = sandbox.create_workspace(public)
    code = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        while True:
            pass
    """)
    res = sandbox.run(ws, code, timeout_s=2)
    assert res.timed_out and res.returncode == -9 and res.killed_reason == "timeout", res
    assert _leftovers(sandbox, ws) == []
    sandbox.destroy_workspace(ws)


FORKED_PROBE = "import sys\nprint('FORKED' if 'sklearn.ensemble' in sys.modules else 'FRESH')\n"
TAMPER = ("import builtins, numpy\nprint(hasattr(builtins, 'ace_leak'), numpy.mean([1, 2]))\n"
          "builtins.ace_leak = True\nnumpy.mean = lambda *a, **k: 'patched'\n")


@pytest.mark.parametrize("sandbox", [True], indirect=True, ids=["forked"])
def test_zygote_runs_share_nothing_and_survive_a_container_restart(sandbox, public):
    ws = sandbox.create_workspace(public)
    try:
        assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == "FORKED"
        first, second = (sandbox.run(ws, TAMPER) for _ in range(2))
        assert first.ok and first.stdout == second.stdout == "False 1.5\n", (first, second)
        # The uid of a forked program is the workspace's, and it holds no capability.
        ident = sandbox.run(ws, "import os\nprint(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n")
        assert ident.stdout.split() == [str(ws.root.stat().st_uid), "0000000000000000"]
        sandbox.container.restart(timeout=0)  # kills the zygote, as a crash would
        fallback = sandbox.run(ws, FORKED_PROBE)
        assert fallback.ok and fallback.stdout.strip() == "FRESH", fallback
        deadline = time.monotonic() + 120
        while not sandbox.zygote_ready and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == "FORKED"
    finally:
        sandbox.destroy_workspace(ws)
