#!/usr/bin/env bash
# Provision what tests/env/test_docker_sandbox.py needs: a running Docker engine and the local image
# `ace-sandbox:test`. Run by .ci/run as root before the tests; idempotent (a second run does nothing).
#
# No registry can be pulled from, so the image is made with `docker import` from a minimal root filesystem:
# the dynamic libraries that the sandbox's Python interpreter and its packages link against (their ldd
# closure), a shell and a few coreutils. The interpreter itself is NOT in the image: DockerSandbox mounts
# the interpreter's prefixes (the venv and the base installation it points to) read-only into the container
# at their host paths, so the container runs exactly the host's Python and packages.
# After installing a package that needs a new system library, rebuild: `docker rmi ace-sandbox:test`, rerun.
#
# Environment: ACE_SANDBOX_IMAGE (default ace-sandbox:test), ACE_SANDBOX_PYTHON (default .venv/bin/python,
# else python3), ACE_DOCKERD_LOG (default /var/log/ace-dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${ACE_SANDBOX_IMAGE:-ace-sandbox:test}"
LOG="${ACE_DOCKERD_LOG:-/var/log/ace-dockerd.log}"
if [ -n "${ACE_SANDBOX_PYTHON:-}" ]; then PY="$ACE_SANDBOX_PYTHON"
elif [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"
else PY="$(command -v python3)"; fi

engine_up() { docker info >/dev/null 2>&1; }

wait_for_engine() {
    for _ in $(seq 1 60); do engine_up && return 0; sleep 1; done
    return 1
}

if ! engine_up; then
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "docker.sh: installing docker.io" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends docker.io
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        echo "docker.sh: starting dockerd (log: $LOG)" >&2
        nohup dockerd >"$LOG" 2>&1 &
    fi
    if ! wait_for_engine; then
        # Kernels without the netfilter modules stop dockerd at bridge setup; the sandbox only ever uses
        # network "none", so the engine can run without a bridge and without iptables.
        echo "docker.sh: dockerd did not answer; retrying without bridge/iptables" >&2
        if pid="$(pgrep -x dockerd)"; then kill "$pid"; sleep 2; fi
        nohup dockerd --bridge=none --iptables=false --ip6tables=false >>"$LOG" 2>&1 &
        if ! wait_for_engine; then
            echo "docker.sh: dockerd did not start; last lines of $LOG:" >&2
            tail -n 40 "$LOG" >&2
            exit 1
        fi
    fi
fi

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "docker.sh: engine up, image $IMAGE present" >&2
    exit 0
fi

echo "docker.sh: building $IMAGE from a minimal root filesystem (interpreter: $PY)" >&2
ROOTFS="$(mktemp -d /tmp/ace-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

# Interpreter prefixes: everything whose shared objects the image must be able to load.
mapfile -t PREFIXES < <("$PY" -c 'import sys; print(*sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}), sep="\n")')
PYBIN="$(readlink -f "$PY")"
TOOLS=(sh dash bash env cat ls mkdir rm cp mv sleep kill id true false head tail wc sort)
TOOL_PATHS=()
for t in "${TOOLS[@]}"; do
    p="$(command -v "$t" || true)"
    if [ -n "$p" ] && [ -f "$p" ]; then TOOL_PATHS+=("$(readlink -f "$p")"); fi
done

# ldd closure of the interpreter, its extension modules and the tools.
{
    printf '%s\n' "$PYBIN" "${TOOL_PATHS[@]}"
    find "${PREFIXES[@]}" -name '*.so*' -type f 2>/dev/null
} | sort -u | while read -r f; do ldd "$f" 2>/dev/null || true; done \
  | grep -oE '/[^ ]+\.so[^ ]*' | sort -u > "$ROOTFS/.libs"
# Libraries that are loaded with dlopen and so never appear in ldd output.
for pat in 'libgcc_s.so*' 'libstdc++.so*' 'libgomp.so*' 'libnss_files.so*' 'libnss_dns.so*' 'libresolv.so*' \
           'libdl.so*' 'librt.so*' 'libutil.so*' 'libm.so*' 'libpthread.so*' 'libz.so*' 'libffi.so*' 'libssl.so*' \
           'libcrypto.so*' 'libsqlite3.so*' 'libbz2.so*' 'liblzma.so*' 'libuuid.so*' 'libexpat.so*'; do
    find /usr/lib/x86_64-linux-gnu -maxdepth 1 -name "$pat" 2>/dev/null
done >> "$ROOTFS/.libs"
# Host-prefix libraries (inside the mounted interpreter prefixes) are excluded: they arrive with the mount.
prefix_re="$(printf '%s|' "${PREFIXES[@]}")"; prefix_re="^(${prefix_re%|})/"

mkdir -p "$ROOTFS"/{usr/bin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,tmp,proc,sys,dev,workspace}
chmod 1777 "$ROOTFS/tmp"
ln -s usr/bin "$ROOTFS/bin"; ln -s usr/lib "$ROOTFS/lib"; ln -s usr/lib64 "$ROOTFS/lib64"; ln -s usr/bin "$ROOTFS/sbin"
sort -u "$ROOTFS/.libs" | grep -vE "$prefix_re" | while read -r lib; do
    [ -e "$lib" ] || continue
    real="$(readlink -f "$lib")"
    # Copy the file under its resolved /usr path and recreate the name it was asked for as a link.
    dest="$ROOTFS/usr${real#/usr}"; mkdir -p "$(dirname "$dest")"; cp -n "$real" "$dest"
    for name in "$lib" "$(dirname "$real")/$(basename "$lib")"; do
        link="$ROOTFS/usr${name#/usr}"
        case "$name" in /lib/*|/lib64/*) link="$ROOTFS/usr$name";; esac
        [ -e "$link" ] || { mkdir -p "$(dirname "$link")"; ln -s "$real" "$link"; }
    done
done
rm "$ROOTFS/.libs"
for p in "${TOOL_PATHS[@]}"; do cp -n "$p" "$ROOTFS/usr/bin/"; done
[ -e "$ROOTFS/usr/bin/sh" ] || ln -s dash "$ROOTFS/usr/bin/sh"
cp /etc/ld.so.conf "$ROOTFS/etc/" 2>/dev/null || true
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' > "$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$ROOTFS/etc/group"
printf 'hosts: files\n' > "$ROOTFS/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' > "$ROOTFS/etc/hosts"

tar -C "$ROOTFS" -c . | docker import \
    --message "ace sandbox test image: minimal rootfs, host interpreter mounted at run time" - "$IMAGE" >/dev/null
echo "docker.sh: built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)" >&2
