"""The scale path end to end: `experiments/run.py +exp=ace30b` with overrides only, on this CPU.

The policy is a tiny Qwen3-MoE HF folder written here (random weights, a tokenizer trained on the
spot), the data three MLE-bench-Lite competitions in `mlebench prepare`'s layout, the rollouts two
real SGLang 0.5.23 CPU servers behind sglang-router (both launched by ace), the learner 8 fake CPU
devices as fsdp 2 x expert 4, the sandbox the subprocess one. Run 1 trains 3 steps; run 2 resumes it
to 5 steps and one server is killed with SIGKILL in the middle. What is checked comes from the run's
own records (metrics.jsonl, rollout/servers.json, stdout) and from the processes themselves.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rollout.test_sglang_real import ENV_DIR, sglang_python  # noqa: F401 - the session fixture
from tests.support.mlebench_data import THREE_LITE, write_mlebench_folder
from tests.support.tiny_hf import save_tiny_qwen3, save_tiny_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOGPROB_ATOL = 1e-4
MAX_STALENESS = 1
RUN_TIMEOUT_S = 1500


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_path")
    policy = root / "policy"
    tokenizer = save_tiny_tokenizer(policy)
    save_tiny_qwen3(policy, moe=True, vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    data = write_mlebench_folder(root / "mlebench")
    return root, policy, data


def _overrides(out_dir: Path, policy: Path, data: Path, python: Path, *, steps: int, resume: bool) -> list[str]:
    launch = ["--attention-backend", "torch_native", "--dtype", "float32", "--max-total-tokens", "16384",
              "--max-running-requests", "16", "--chunked-prefill-size", "1024", "--context-length", "2048"]
    return [
        "+exp=ace30b", f"model.hf_path={policy}", f"env.data_dir={data}",
        f"env.competitions=[{','.join(THREE_LITE)}]", "env.sandbox=subprocess", "env.max_steps=2",
        "env.exec_timeout_s=60", "+env.prompt.description_chars=400", "+env.prompt.head_rows=2",
        "+env.prompt.stdout_tail_chars=300", "+env.prompt.stderr_tail_chars=300", "+env.prompt.code_chars=600",
        "learner.gpus=null", "mesh.devices=8", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "mesh.tensor=1",
        "rollout.device=cpu", "rollout.gpus=null", "rollout.num_servers=2", "rollout.tp_size=1",
        f"rollout.python={python}", "+rollout.env.SGLANG_USE_CPU_ENGINE='1'",
        f"+rollout.env.PYTHONPATH={ENV_DIR / 'shim'}",
        "rollout.extra_args=[" + ",".join(f"'{a}'" for a in launch) + "]",
        "rollout.workers=2", "rollout.max_concurrency=16", "rollout.max_new_tokens=24",
        "rollout.max_prompt_tokens=1536", "rollout.check_logprobs=true", "rollout.startup_timeout_s=600",
        "rollout.request_timeout_s=300",
        f"train.steps={steps}", "train.group_size=4", "train.tasks_per_step=2", "train.micro_batches=1",
        "train.compute_dtype=float32", "train.remat=false", "train.adam_mu_dtype=null",
        f"train.max_staleness={MAX_STALENESS}", "train.staleness_policy=drop", "train.checkpoint_every=1",
        "train.lr=1e-4", "train.warmup_steps=0", "eval.seeds=[0]",
        f"out_dir={out_dir}", "progress=false", f"resume={str(resume).lower()}",
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"run failed with {proc.returncode}:\n{text[-6000:]}"
    return text


def _rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _check_pushes(rows: list[dict], steps: range) -> None:
    by_step = {int(r["step"]): r for r in rows}
    for step in steps:
        r = by_step[step]
        # Version step is what the learner pushed after its step-th update.
        assert r["engine_version"] == step, r
        assert r["servers_at_version"] == 2, f"step {step}: not every server holds version {step}: {r}"
        assert r["server0_version"] == r["server1_version"] == step
        assert r["probe_logprob_max_diff"] <= LOGPROB_ATOL, f"step {step}: {r['probe_logprob_max_diff']}"
        assert r["staleness_max"] <= MAX_STALENESS
        assert r["weight_push_s"] > 0


def test_ace30b_experiment_runs_on_cpu_with_real_sglang_and_resumes_after_a_server_kill(inputs, sglang_python):
    root, policy, data = inputs
    out_dir = root / "run"

    # Run 1: three AceGRPO steps from the HF folder, on MLE-bench data, through two servers and a router.
    log1 = root / "run1.log"
    text = _finish(_start(_overrides(out_dir, policy, data, sglang_python, steps=3, resume=False), log1), log1)
    assert "fsdp=2 x expert=4" in text and "2 SGLang server(s) on the CPU" in text
    assert "Held-out evaluation (3 competitions x 1 seeds" in text and "valid submission rate" in text
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    _check_pushes(rows, range(1, 4))
    status = json.loads((out_dir / "rollout" / "servers.json").read_text())
    assert status["router"]["url"] and len(status["servers"]) == 2
    assert all(_gone(s["pid"]) for s in status["servers"]) and _gone(status["router"]["pid"]), \
        "servers or router outlived the run"

    # Run 2: resume to 5 steps; SIGKILL one server (its whole process group) once step 4 is logged.
    log2 = root / "run2.log"
    proc = _start(_overrides(out_dir, policy, data, sglang_python, steps=5, resume=True), log2)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not any(r["step"] == 4 for r in _rows(out_dir)):
            assert proc.poll() is None, log2.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "step 4 never logged"
            time.sleep(0.5)
        victim = json.loads((out_dir / "rollout" / "servers.json").read_text())["servers"][1]
        os.killpg(victim["pid"], signal.SIGKILL)
    except BaseException:
        proc.kill()
        raise
    text = _finish(proc, log2)
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], "resume must continue at step 4, not start over"
    _check_pushes(rows, range(1, 5))
    last = rows[-1]
    assert last["staleness_max"] <= MAX_STALENESS and last["engine_version"] == 5
    status = json.loads((out_dir / "rollout" / "servers.json").read_text())
    killed = status["servers"][1]
    assert killed["restarts"] >= 1 and killed["pid"] != victim["pid"], status
    assert [s["weight_version"] for s in status["servers"]] == [5, 5], "the restarted server must serve version 5"
    assert "Held-out evaluation (3 competitions x 1 seeds" in text
    assert all(_gone(s["pid"]) for s in status["servers"])


def test_the_cpu_job_runs_with_an_sglang_server_from_a_fresh_init(tmp_path, sglang_python):
    """Sensible combinations off the ace30b path: the built-in suite with a real SGLang CPU server
    (`rollout=sglang_cpu`), and a tiny policy without SFT (its random init and the corpus BPE)."""
    out_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    args = ["+exp=tiny_smoke", "rollout=sglang_cpu", f"rollout.python={sglang_python}", "sft.enabled=false",
            "rollout.check_logprobs=true", f"out_dir={out_dir}", "progress=false",
            f"sft.cache_dir={tmp_path / 'sft-cache'}"]
    text = _finish(_start(args, log), log)
    assert "policy (init) ready" in text and "1 SGLang server(s) on the CPU" in text
    assert "Held-out evaluation (1 competitions x 1 seeds" in text
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["servers_at_version"] == 1 and r["server0_version"] == r["step"]
        assert r["probe_logprob_max_diff"] <= LOGPROB_ATOL
    status = json.loads((out_dir / "rollout" / "servers.json").read_text())
    assert status["router"] is None and len(status["servers"]) == 1  # one server: no router in between
    assert _gone(status["servers"][0]["pid"])


def _start_process(args: list[str], log: Path, *, process_id: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1",
           "JAX_PLATFORMS": "cpu"}
    dist = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
            f"distributed.process_id={process_id}"]
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *args, *dist], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def test_two_processes_train_one_global_mesh_and_resume(inputs, sglang_python, tmp_path):
    """A multi-host run rehearsed on one machine: two JAX processes of 4 CPU devices each (gloo
    collectives) hold one fsdp 2 x expert 4 mesh, fsdp spanning the processes. Process 0 alone
    launches the server and rolls out; the weights it pushes are gathered from both processes, and
    the server's logprobs of the probe must equal the learner's. A second launch resumes."""
    from ace.rollout.sglang_server import find_free_port

    _, policy, data = inputs
    out_dir = tmp_path / "run"

    def launch(steps: int, resume: bool, tag: str) -> list[str]:
        args = _overrides(out_dir, policy, data, sglang_python, steps=steps, resume=resume)
        args = [a for a in args if not a.startswith(("mesh.devices=", "rollout.num_servers="))]
        args += ["mesh.devices=-1", "rollout.num_servers=1"]
        port = find_free_port()
        logs = [tmp_path / f"{tag}_p{i}.log" for i in range(2)]
        procs = [_start_process(args, logs[i], process_id=i, port=port) for i in range(2)]
        texts = []
        for proc, log in zip(procs, logs):
            try:
                texts.append(_finish(proc, log))
            except BaseException:
                for p in procs:
                    p.kill()
                raise
        return texts

    lead, follower = launch(2, False, "run1")
    assert "8 cpu device(s) (data=1 x fsdp=2 x expert=4 x tensor=1, 2 hosts)" in lead
    assert "Held-out evaluation (3 competitions x 1 seeds" in lead and "Held-out" not in follower
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["servers_at_version"] == 1 and r["server0_version"] == r["step"]
        assert r["probe_logprob_max_diff"] <= LOGPROB_ATOL, r["probe_logprob_max_diff"]
    lead, _ = launch(3, True, "run2")
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["server0_version"] == 3 and rows[-1]["probe_logprob_max_diff"] <= LOGPROB_ATOL
