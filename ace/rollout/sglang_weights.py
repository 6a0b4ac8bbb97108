"""The weights an SGLang engine pushes: versioned HF folders and the architecture check.

`SGLangEngine.update_weights` exports the learner's params to `<export_dir>/v00000042` (one folder
per version, config.json + safetensors), refuses a folder whose `architectures` differ from what a
server serves (`ArchitectureMismatch`: loading it would crash the server), and prunes old folders.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence


class ArchitectureMismatch(ValueError):
    """Exported weights are for another architecture than the server serves (SGLang would crash)."""


def read_architectures(model_path: str | os.PathLike) -> tuple[str, ...]:
    """`architectures` of an HF checkpoint's config.json, e.g. ("Qwen3MoeForCausalLM",)."""
    path = Path(model_path, "config.json")
    try:
        archs = json.loads(path.read_text()).get("architectures")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing: the exporter must write an HF config.json") from None
    if not archs:
        raise ValueError(f"{path} has no 'architectures' entry")
    return tuple(archs)


def export_weights(exporter: Callable[[Any, Path], None], params: Any, export_dir: Path, version: int) -> Path:
    """`exporter(params, folder)` into a fresh `export_dir/v{version:08d}` (a stale one is replaced); the folder."""
    path = export_dir / f"v{version:08d}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    exporter(params, path)
    return path


def served_architectures(server: Any) -> tuple[str, ...] | None:
    """What `server` serves: from its HF folder, else from its /model_info (None when it does not answer)."""
    if server.model_path is not None:
        return read_architectures(server.model_path)
    try:
        archs = server.model_info().get("architectures")
    except Exception:  # noqa: BLE001 - a down server is checked when it comes back
        return None
    return tuple(archs) if archs else None


def check_architectures(path: Path, servers: Sequence[Any]) -> None:
    """Raises ArchitectureMismatch when the folder `path` names other architectures than a server serves."""
    exported = read_architectures(path)
    for s in servers:
        served = served_architectures(s)
        if served is not None and served != exported:
            raise ArchitectureMismatch(
                f"exported weights {path} are {list(exported)} but server {s.url} serves "
                f"{list(served)} from {s.model_path}; loading them would crash the server")


def prune_exports(export_dir: Path, keep_versions: int, current: Path) -> None:
    """Deletes all but the newest `keep_versions` version folders, never `current` (the served one)."""
    versions = sorted(p for p in export_dir.glob("v*") if p.is_dir())
    for old in versions[:-keep_versions]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
