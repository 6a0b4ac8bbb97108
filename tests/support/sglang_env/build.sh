#!/usr/bin/env bash
# Builds the virtual environment that runs a real SGLang server on a CPU-only machine, for
# tests/rollout/test_sglang_real.py. SGLang lives apart from .venv because it pins its own
# transformers / tokenizers and CUDA wheels; the test talks to it over HTTP only.
#
# Prebuild (from the repository root, e.g. in .ci/run before `make test`; no make needed):
#     tests/support/sglang_env/build.sh
# The test fixture runs the same script when the environment is missing, so prebuilding only moves
# the ~3 GB / few-minute install out of the test's time. A second run is a no-op: the stamp file
# records a hash of this script and requirements-cpu.txt, and any change to either rebuilds.
#
# What it installs: the CPU build torch==2.13.0 (from the machine's local wheel folder, which pip's
# config points at), the runtime requirements of SGLang that its CPU path imports
# (requirements-cpu.txt), then `pip install --no-deps sglang==0.5.23` (its metadata pins CUDA-only
# packages). The two remaining CPU gaps (sgl_kernel, torchvision's ops schema) are covered at run
# time by the import shim in ./shim, which the server gets on PYTHONPATH.
#
# Environment: ACE_SGLANG_VENV (default <repo>/.venv-sglang), PYTHON (default python3, >= 3.11).
# Exit codes: 0 built or already up to date; 75 the package index could not be reached (the caller
# may skip outside CI); anything else is a real failure.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="${ACE_SGLANG_VENV:-$ROOT/.venv-sglang}"
PYTHON="${PYTHON:-python3}"
SGLANG_SPEC="sglang==0.5.23"
TORCH_SPEC="torch==2.13.0+cpu"
STAMP="$VENV/.ace-sglang-stamp"
EX_NO_NETWORK=75

want="$(cat "$HERE/build.sh" "$HERE/requirements-cpu.txt" | sha256sum | cut -d' ' -f1)"
up_to_date() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; }

if up_to_date; then
    echo "sglang_env: $VENV is up to date" >&2
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
# Concurrent callers (a CI prebuild and a test fixture) wait for one build instead of racing.
flock 9
if up_to_date; then
    echo "sglang_env: $VENV was built by a concurrent run" >&2
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ace-sglang-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Fetch the sglang wheel first: a failure here means no package index, which callers tell apart.
if ! "$PYTHON" -m pip download --quiet --no-deps "$SGLANG_SPEC" -d "$WORK/wheels" >"$WORK/download.log" 2>&1; then
    tail -n 20 "$WORK/download.log" >&2
    echo "sglang_env: could not download $SGLANG_SPEC (no package index reachable?)" >&2
    exit $EX_NO_NETWORK
fi

echo "sglang_env: building $VENV (a few minutes, ~3 GB)" >&2
rm -rf "$VENV"  # a half-built or stale environment is rebuilt from scratch
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
# The constraint keeps every later resolution on the CPU torch: an unpinned dependency on torch
# would otherwise pull a multi-GB CUDA build.
echo "$TORCH_SPEC" >"$WORK/constraints.txt"
"${PIP[@]}" install --quiet -c "$WORK/constraints.txt" "$TORCH_SPEC" -r "$HERE/requirements-cpu.txt"
"${PIP[@]}" install --quiet --no-deps "$WORK"/wheels/sglang-*.whl

# Smoke test with the shim on the path: the two CPU gaps must be covered.
PYTHONPATH="$HERE/shim" SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c '
import torch, torchvision, sglang, sgl_kernel
assert torch.version.cuda is None, torch.__version__
from sglang.srt.entrypoints import http_server  # noqa: F401  (imports the whole server stack)
print("sglang_env: sglang", sglang.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__)
' >&2

echo "$want" >"$STAMP"
echo "sglang_env: built $VENV" >&2
