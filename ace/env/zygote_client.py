"""One run through the docker backend's zygote: ``python -I -S zygote_client.py SOCKET REQUEST_JSON``.

Started by `ace.env.docker_sandbox.DockerSandbox` as the ``docker exec`` of a run, as root inside the
container, with only the standard library (it starts in milliseconds). It hands the zygote
(`ace/env/zygote.py`, ``--listen`` mode) the request with its own stdout and stderr, so the program
writes straight into the exec's streams, waits for the program's status, and exits with it the way
``docker exec`` reports a program (its exit code, or 128 + the signal that killed it).
Exit code 75 with ``[ace-zygote-unavailable]`` on stderr means the zygote could not be reached and
no program was started: the backend then runs a fresh interpreter instead.
"""
import json
import os
import socket
import sys

UNAVAILABLE = 75  # EX_TEMPFAIL; below 128, so it never reads as a signal


def main(path: str, request: str) -> int:
    status_r, status_w = os.pipe()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        socket.send_fds(sock, [request.encode()], [1, 2, status_w])
        reply = json.loads(sock.recv(4096) or b"{}")
        sock.close()
        if "pid" not in reply:
            raise OSError(reply.get("error", "the zygote closed the connection"))
    except (OSError, ValueError) as e:
        os.write(2, f"[ace-zygote-unavailable] {e}\n".encode())
        return UNAVAILABLE
    os.close(status_w)
    status = b""
    while True:
        chunk = os.read(status_r, 4096)
        if not chunk:
            break
        status += chunk
    try:
        msg = json.loads(status.decode() or "null")
    except ValueError:
        msg = None
    if not isinstance(msg, dict) or "error" in msg:
        os.write(2, f"[sandbox] the forked run failed: {msg}\n".encode())
        return 125
    return 128 + msg["signal"] if "signal" in msg else msg["exit"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
