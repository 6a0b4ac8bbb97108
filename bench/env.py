"""Environment throughput: scripted-agent episodes per minute on the built-in suite, and the
subprocess sandbox's cost per execution against a bare `subprocess.run` of the same script, with
the fork server (runs forked from a zygote that imported numpy, pandas and scikit-learn) and
without it (a fresh interpreter per run, the baseline).

    python bench/env.py [--split all] [--repeats 10]

The scripted agent takes four actions per episode (request_info, validate_code and
execute_code of a fast reference solution, submit), so an episode costs two sandbox runs and
two gradings. The overhead figure runs one script both ways, from the same folder layout,
`--repeats` times each, alternating, and prints the ratio of mean wall times. The last lines
are the ratios of the two sandboxes: episodes per minute, and a reference solution's time
against a bare `subprocess.run`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ace.env.actions import Action, format_action  # noqa: E402
from ace.env.episode import run_episode, scripted_policy  # noqa: E402
from ace.env.gym import MLEEnv  # noqa: E402
from ace.env.reference_solutions import reference_scripts  # noqa: E402
from ace.env.reward import RewardConfig  # noqa: E402
from ace.env.sandbox import SandboxLimits  # noqa: E402
from ace.env.subprocess_sandbox import SubprocessSandbox  # noqa: E402
from ace.env.suites import load_suite  # noqa: E402

FAST = ("logreg_C1.0", "ridge_a1.0")
TRIVIAL = "import os\nos.makedirs('submission', exist_ok=True)\nprint(sum(range(100000)))\n"


def scripted_episodes(comps, sandbox) -> tuple[int, float, int]:
    """Run one scripted episode per competition; returns (episodes, seconds, valid finals)."""
    t0 = time.perf_counter()
    valid = 0
    for comp in comps:
        code = next(s for s in reference_scripts(comp) if s.name in FAST).code
        actions = ["<request_info>data</request_info>", format_action(Action("validate_code", code)),
                   format_action(Action("execute_code", code)), "<submit/>"]
        with MLEEnv(comp, sandbox, reward_cfg=RewardConfig(), max_steps=6, exec_timeout_s=120,
                    instrument=True) as env:
            ep = run_episode(env, scripted_policy(actions))
        valid += int(ep.final_grade is not None and ep.final_grade.valid)
    return len(comps), time.perf_counter() - t0, valid


def execution_overhead(sandbox, public_dir: Path, code: str, repeats: int) -> tuple[float, float]:
    """Mean seconds per execution: (sandbox.run, bare subprocess.run), same script and layout."""
    ws = sandbox.create_workspace(public_dir)
    bare_root = Path(tempfile.mkdtemp(prefix="ace-bench-bare-"))
    try:
        shutil.copytree(public_dir, bare_root / "data")
        script = bare_root / "main.py"
        script.write_text(code)
        sandboxed, bare = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = sandbox.run(ws, code)
            sandboxed.append(time.perf_counter() - t0)
            if not res.ok:
                raise RuntimeError(f"benchmark script failed in the sandbox: {res.stderr[-500:]}")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(script)], cwd=bare_root, capture_output=True, check=True)
            bare.append(time.perf_counter() - t0)
        return statistics.mean(sandboxed), statistics.mean(bare)
    finally:
        sandbox.destroy_workspace(ws)
        shutil.rmtree(bare_root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="all", choices=("train", "held_out", "all"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    comps = load_suite(args.split)
    figures = {}
    for label, fork_server in (("fork server", True), ("fresh interpreter", False)):
        with SubprocessSandbox(SandboxLimits(wall_time_s=120), fork_server=fork_server) as sandbox:
            print(f"-- sandbox: {label} (isolation: {sandbox.isolation})")
            n, seconds, valid = scripted_episodes(comps, sandbox)
            per_min = 60 * n / seconds
            print(f"scripted agent: {n} episodes ({valid} valid) in {seconds:.1f}s = {per_min:.1f} episodes/min")
            sklearn_code = next(s for s in reference_scripts(comps[0]) if s.name in FAST).code
            for name, code, repeats in (("trivial script", TRIVIAL, args.repeats),
                                        (f"reference script ({comps[0].comp_id})", sklearn_code,
                                         max(2, args.repeats // 3))):
                sb, bare = execution_overhead(sandbox, comps[0].public_dir, code, repeats)
                print(f"{name}: sandbox {1000 * sb:.0f} ms vs bare subprocess.run {1000 * bare:.0f} ms "
                      f"per execution: overhead {1000 * (sb - bare):+.0f} ms, ratio {sb / bare:.2f}x "
                      f"(n={repeats})")
            figures[fork_server] = (per_min, sb / bare)
    print(f"fork server vs fresh interpreter: {figures[True][0] / figures[False][0]:.2f}x episodes/min; "
          f"reference script {figures[True][1]:.2f}x a bare subprocess.run "
          f"(fresh interpreter: {figures[False][1]:.2f}x)")


if __name__ == "__main__":
    main()
