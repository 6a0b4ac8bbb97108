"""Chooses a sandbox backend by name: the one place that knows every backend.

The factory lives here, beside neither backend, so that the base module (`ace.env.sandbox`: the
protocol and the helpers the backends share) never imports the backends that import it
(`ace.env.subprocess_sandbox`, `ace.env.docker_sandbox`). Importing this module does not import the docker SDK; only starting a
`DockerSandbox` does.
"""
from __future__ import annotations

from typing import Literal

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
