"""Runs untrusted Python written by a model: the Sandbox protocol, its types, and what backends share.

Workspace layout (the same for every backend): the script runs with cwd = workspace root; public data is
at ``./data/`` (read-only); the script writes ``./submission/submission.csv``; scratch files go anywhere
else in the workspace. Private answers never enter a workspace: the grader runs outside the sandbox.
The backends are `ace.env.subprocess_sandbox` (isolated subprocesses of this host) and
`ace.env.docker_sandbox`; `ace.env.sandboxes.make_sandbox` picks one by name. This module imports
neither (docs/architecture.md, "Packages and what each owns").
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from ace.env.sandbox_guards import PROGRAM_SEED

SCRIPT_NAME = "script.py"


def stage_script(workspace: Workspace, code: str, timeout_s: float | None, *, known,
                 default_timeout_s: float) -> tuple[float, int, Path]:
    """Checks a run's arguments and writes `code` as the workspace's script, owned by its uid.

    Shared by both backends. Returns (timeout in seconds, the workspace's uid, the script path).
    """
    if workspace.root not in known:
        raise ValueError(f"workspace {workspace.root} was not created by this sandbox (or was destroyed)")
    timeout = default_timeout_s if timeout_s is None else timeout_s
    if timeout <= 0:
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    uid = workspace.root.stat().st_uid
    script = workspace.root / SCRIPT_NAME
    script.write_text(code)
    os.chown(script, uid, uid)
    return timeout, uid, script



class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program it ran)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one execution.

    ``max_workspace_mb`` bounds the total size of a workspace (a tmpfs quota under namespaces; polled
    in the fallback); ``threads`` sets OMP/BLAS thread counts so that rlimits stay meaningful.
    """

    wall_time_s: float = 60
    cpu_time_s: int = 120
    memory_mb: int = 2048
    max_processes: int = 64
    max_file_mb: int = 256
    max_output_bytes: int = 64_000
    max_workspace_mb: int = 1024
    threads: int = 1

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxLimits.{f.name}={value!r}: expected a positive number")


@dataclass(frozen=True)
class Workspace:
    """A per-episode directory: ``root/data`` (public, read-only) and ``root/submission``."""

    root: Path
    data_dir: Path
    submission_dir: Path

    @property
    def submission_path(self) -> Path:
        return self.submission_dir / "submission.csv"


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one execution.

    ``returncode`` is the exit status, or minus the signal number that ended the program (-9 when the
    sandbox killed it). ``stdout``/``stderr`` are decoded UTF-8, truncated to ``max_output_bytes`` each
    (head and tail kept). ``killed_reason`` is None for a program that ended by itself without hitting a
    limit, else one of "timeout", "output_limit", "disk_quota", "memory", "cpu_time", "file_size",
    "killed", "signal:<NAME>".
    """

    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool
    killed_reason: str | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class Sandbox(Protocol):
    def create_workspace(self, public_dir: Path) -> Workspace: ...

    def run(self, workspace: Workspace, code: str, *, timeout_s: float | None = None) -> ExecResult: ...

    def destroy_workspace(self, workspace: Workspace) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "Sandbox": ...

    def __exit__(self, *exc) -> None: ...


# ---------------------------------------------------------------------------------------------- helpers
# Shared by the backends.


def interpreter_roots(python: str) -> list[Path]:
    """Directories an interpreter needs to run: its prefixes (venv and base installation), deepest-unique."""
    out = subprocess.run(
        [python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix); print(sys.exec_prefix)"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if out.returncode != 0:
        raise SandboxError(f"interpreter {python!r} does not run: {out.stderr.strip()}")
    roots = {Path(p) for p in out.stdout.split()}
    roots.add(Path(os.path.realpath(python)).parent.parent)
    # Drop roots nested in another root: one mount covers them.
    return sorted(r for r in roots if not any(o != r and o in r.parents for o in roots))


def sandbox_env(workspace_root: Path, python: str, limits: SandboxLimits, tmpdir: str) -> dict[str, str]:
    """A scrubbed environment built from nothing, so no secret of the host leaks in."""
    threads = str(limits.threads)
    return {
        "PATH": f"{Path(python).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workspace_root),
        "TMPDIR": tmpdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # str hashes (set order, dict-of-set output) the same in every run.
        "PYTHONHASHSEED": str(PROGRAM_SEED),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        # glibc reserves 64 MiB of address space per malloc arena; without this bound RLIMIT_AS would
        # count reservations rather than memory.
        "MALLOC_ARENA_MAX": "2",
    }
