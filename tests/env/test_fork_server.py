"""The sandbox's fork server: forked runs behave as fresh interpreters, share nothing, see nothing of the
zygote, and survive the zygote's death. The hostile corpus runs under both (tests/env/test_sandbox.py)."""
import textwrap
import time

import pytest

import ace.env.subprocess_sandbox as subprocess_sandbox
from ace.env.sandbox_guards import mask_workspace_path
from ace.env.sandboxes import sandbox_from_config
from ace.env.subprocess_sandbox import SubprocessSandbox

from tests.env.test_determinism import UNSEEDED

# Prints whether the run is a fork of the zygote: there, scikit-learn's estimators are imported already.
FORKED_PROBE = "import sys\nprint('FORKED' if 'sklearn.ensemble' in sys.modules else 'FRESH')\n"

# What a program may change in its interpreter; none of it may reach the next run.
TAMPER = textwrap.dedent("""
    import builtins, sys, os, random
    import numpy, pandas
    print("before", hasattr(builtins, "ace_leak"), numpy.mean([1, 2]), os.environ.get("ACE_LEAK"),
          "ace_leak_module" in sys.modules, pandas.DataFrame.__name__, random.random())
    builtins.ace_leak = True
    numpy.mean = lambda *a, **k: "patched"
    pandas.DataFrame.__name__ = "Patched"
    os.environ["ACE_LEAK"] = "1"
    sys.modules["ace_leak_module"] = sys
    sys.path.insert(0, "/nowhere")
    random.seed(12345)
""")


@pytest.fixture
def data(tmp_path):
    (tmp_path / "train.csv").write_text("a\n1\n")
    return tmp_path


def _isolations(monkeypatch, isolation):
    if isolation == "fallback":
        # As root on a host whose interpreter sits under /root (0700), the fallback runs programs as
        # another uid that could not import from the zygote's sys.path, so the sandbox starts fresh
        # interpreters there. These programs import only what the zygote preloaded.
        monkeypatch.setattr(subprocess_sandbox, "_world_traversable", lambda path: True)


@pytest.mark.parametrize("isolation", ["auto", "fallback"])
def test_no_state_leaks_from_one_run_to_the_next(isolation, data, monkeypatch):
    _isolations(monkeypatch, isolation)
    with SubprocessSandbox(isolation=isolation) as sandbox:
        ws = sandbox.create_workspace(data)
        assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == "FORKED"
        first, second = (sandbox.run(ws, TAMPER, timeout_s=60) for _ in range(2))
    assert first.ok and second.ok, (first.stderr, second.stderr)
    assert first.stdout == second.stdout
    assert first.stdout.startswith("before False 1.5 None False DataFrame ")


def test_forked_runs_print_what_fresh_interpreters_print(data):
    programs = [UNSEEDED, "import sys\nprint(sys.argv == [__file__], __name__)\nx = 1 / 0\n",
                "print('unclosed'\n", "import sys\nsys.exit('bye')\n", "raise SystemExit(3)\n",
                "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('joined'))).start()\n",
                "import atexit\natexit.register(print, 'at exit')\n", "import os\nprint(os.getcwd() == os.environ['HOME'])\n"]
    seen = {}
    for fork_server in (True, False):
        with SubprocessSandbox(fork_server=fork_server) as sandbox:
            ws = sandbox.create_workspace(data)
            assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == ("FORKED" if fork_server else "FRESH")
            seen[fork_server] = []
            for code in programs:
                r = sandbox.run(ws, code, timeout_s=60)
                seen[fork_server].append((r.returncode, r.stdout, mask_workspace_path(r.stderr, ws.root)))
    assert seen[True] == seen[False]
    assert [rc for rc, _, _ in seen[True]] == [0, 1, 1, 1, 3, 0, 0, 0]
    assert "ZeroDivisionError" in seen[True][1][2] and "zygote" not in seen[True][1][2]


def test_a_forked_program_holds_no_descriptor_of_the_zygote(data):
    code = "import os\nprint(sorted(int(f) for f in os.listdir('/proc/self/fd')))\n"
    with SubprocessSandbox() as sandbox:
        ws = sandbox.create_workspace(data)
        fds = eval(sandbox.run(ws, code).stdout)
    # 0-2 and the descriptor listdir itself holds open; the zygote's socket and the status pipe are gone.
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4


def test_a_dead_zygote_falls_back_to_fresh_runs_and_is_restarted(data):
    with SubprocessSandbox() as sandbox:
        ws = sandbox.create_workspace(data)
        assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == "FORKED"
        sandbox.fork_server.kill()
        assert not sandbox.fork_server.alive
        fallback = sandbox.run(ws, FORKED_PROBE)
        assert fallback.ok and fallback.stdout.strip() == "FRESH"
        deadline = time.monotonic() + 120
        while not sandbox.fork_server.alive and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sandbox.fork_server.alive and sandbox.fork_server.starts == 2
        assert sandbox.run(ws, FORKED_PROBE).stdout.strip() == "FORKED"


def test_preloads_that_fail_are_reported_and_skipped(data):
    with SubprocessSandbox(preload=("numpy", "ace_no_such_module")) as sandbox:
        assert sandbox.fork_server.loaded == ["numpy"]
        assert "ModuleNotFoundError" in sandbox.fork_server.failed["ace_no_such_module"]
        ws = sandbox.create_workspace(data)
        r = sandbox.run(ws, "import sys\nprint('numpy' in sys.modules, 'pandas' in sys.modules)\n")
    assert r.ok and r.stdout.strip() == "True False"


def test_config_builds_the_fork_server_and_checks_its_keys():
    with sandbox_from_config({"sandbox": "subprocess", "fork_server": False}) as sandbox:
        assert sandbox.fork_server is None
    with sandbox_from_config({"sandbox": "subprocess", "preload": ["numpy"]}) as sandbox:
        assert sandbox.fork_server.loaded == ["numpy"]
    with pytest.raises(ValueError, match=r"env.fork_server='yes': expected true or false"):
        sandbox_from_config({"sandbox": "subprocess", "fork_server": "yes"})
    with pytest.raises(ValueError, match=r"env.preload='numpy': expected a list of module names"):
        sandbox_from_config({"sandbox": "subprocess", "preload": "numpy"})
