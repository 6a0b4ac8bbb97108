"""Chooses a sandbox backend by name: the one place that knows every backend.

The factory lives here, beside neither backend, so that the base module (`ace.env.sandbox`: the
protocol and the helpers the backends share) never imports the backends that import it
(`ace.env.subprocess_sandbox`, `ace.env.docker_sandbox`). Importing this module does not import the docker SDK; only starting a
`DockerSandbox` does.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

from ace.env.docker_sandbox import DockerSandbox
from ace.env.sandbox import Sandbox
from ace.env.subprocess_sandbox import SubprocessSandbox

BACKENDS = {"subprocess": SubprocessSandbox, "docker": DockerSandbox}


def make_sandbox(kind: Literal["subprocess", "docker"], **kwargs) -> Sandbox:
    """Builds the sandbox backend named by config (``env.sandbox``), passing `kwargs` to it."""
    try:
        backend = BACKENDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"sandbox kind {kind!r}: expected {' or '.join(map(repr, BACKENDS))}") from None
    return backend(**kwargs)


def sandbox_from_config(env: Mapping[str, Any]) -> Sandbox:
    """The sandbox that the ``env`` config group asks for: ``env.sandbox`` names the backend;
    ``env.fork_server`` (default true) and ``env.preload`` (a list of modules, null for
    `ace.env.fork_server.DEFAULT_PRELOAD`) set up its fork server (one zygote per sandbox)."""
    kind = env["sandbox"]
    kwargs: dict[str, Any] = {}
    if kind in BACKENDS:
        fork_server = env.get("fork_server", True)
        if not isinstance(fork_server, bool):
            raise ValueError(f"env.fork_server={fork_server!r}: expected true or false")
        kwargs["fork_server"] = fork_server
        preload = env.get("preload")
        if preload is not None:
            if isinstance(preload, str) or not all(isinstance(m, str) and m for m in preload):
                raise ValueError(f"env.preload={preload!r}: expected a list of module names, or null")
            kwargs["preload"] = tuple(preload)
    return make_sandbox(kind, **kwargs)
