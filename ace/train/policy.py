"""Where a run's policy comes from: an HF folder, stage-1 SFT of the tiny model, or a fresh init.

`check_hf_folder` validates an HF folder without reading a weight (config.json of a known
architecture, every safetensors shard present and complete, a tokenizer whose ids fit the model's
vocabulary), so a bad folder fails before any server or device work. `load_policy` returns the
params (placed with the learner's shardings when a mesh is given), the ModelConfig, the tokenizer
and the prompt limits the policy was trained with:

  model.hf_path set, sft.enabled=false   the HF checkpoint, streamed shard by shard onto the mesh;
  model.hf_path set, sft.enabled=true    the HF checkpoint fine-tuned on the stage-1 corpus;
  no hf_path, sft.enabled=true           the tiny model, SFT from scratch with a corpus BPE (CPU job);
  no hf_path, sft.enabled=false          the tiny model at its random init, with the corpus BPE.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from ace.env.prompt import PromptConfig
from ace.models.configs import ModelConfig
from ace.models.tokenizer import TOKENIZER_FILE, Tokenizer

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


class PolicyError(ValueError):
    """An HF folder or policy setting that cannot work; the message names the file or key."""


@dataclasses.dataclass
class Policy:
    """params: pytree (see `ace.models.qwen3`); hf_dir: the folder it was read from (None if made here)."""

    params: Any
    model_config: ModelConfig
    tokenizer: Tokenizer
    prompt_cfg: PromptConfig
    hf_dir: Path | None
    source: str
    stats: dict


def _shard_files(path: Path) -> list[str]:
    from ace.models.hf import INDEX_FILE, SINGLE_FILE

    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PolicyError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        return sorted(set(weight_map.values()))
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise PolicyError(f"model.hf_path={str(path)!r}: no {SINGLE_FILE} or {INDEX_FILE}; expected the HF "
                      "checkpoint's safetensors weights there")


def check_safetensors_complete(file: Path) -> None:
    """Raises PolicyError if `file` is missing or shorter than its own header says (a cut download)."""
    if not file.is_file():
        raise PolicyError(f"{file}: shard listed in the index is missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PolicyError(f"{file}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise PolicyError(f"{file}: header of {n} bytes but the file has {size} (truncated)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PolicyError(f"{file}: the safetensors header is not valid JSON (corrupt?)") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise PolicyError(f"{file}: tensors end at byte {8 + n + end} but the file has {size} bytes (truncated); "
                          "download the shard again")


def check_hf_folder(path: str | Path, *, dtype: str | None = None) -> tuple[ModelConfig, Tokenizer]:
    """Validates an HF policy folder without loading weights; returns its ModelConfig and tokenizer."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise PolicyError(f"model.hf_path={str(path)!r}: no such folder")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise PolicyError(f"model.hf_path={str(path)!r}: no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise PolicyError(f"{cfg_file}: not valid JSON ({e})") from None
    archs = hf.get("architectures") or []
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise PolicyError(f"{cfg_file}: architectures={archs} (model_type {hf.get('model_type')!r}); this model code "
                          f"implements {list(SUPPORTED_ARCHITECTURES)}")
    name = dtype or str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    try:
        config = ModelConfig.from_hf_config(hf, dtype=name)
    except (ValueError, KeyError) as e:
        raise PolicyError(f"{cfg_file}: {e}") from None
    for file in _shard_files(path):
        check_safetensors_complete(path / file)
    if not (path / TOKENIZER_FILE).is_file():
        raise PolicyError(f"model.hf_path={str(path)!r}: no {TOKENIZER_FILE}; expected the model's tokenizer beside it")
    tokenizer = Tokenizer.from_dir(path)
    top = max([tokenizer.vocab_size - 1, *tokenizer.special_ids])
    if top >= config.vocab_size:
        raise PolicyError(f"{path / TOKENIZER_FILE}: token ids reach {top}, but config.json has vocab_size="
                          f"{config.vocab_size} (ids 0..{config.vocab_size - 1}); the embedding would be indexed "
                          "out of range. Use the tokenizer the model was trained with")
    return config, tokenizer


def load_policy(cfg: Mapping[str, Any], comps: Sequence[Any], sandbox: Any, *,
                mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> Policy:
    """The run's policy (see the module docstring for the four cases)."""
    model, sft = cfg["model"], dict(cfg.get("sft") or {})
    hf_path = model.get("hf_path")
    enabled = bool(sft.get("enabled", True))
    if hf_path:
        config, tokenizer = check_hf_folder(hf_path, dtype=model.get("dtype"))
        from ace.models.hf import load_hf_params

        params, config = load_hf_params(Path(hf_path).expanduser(), config, mesh=mesh)
        policy = Policy(params, config, tokenizer, PromptConfig(), Path(hf_path).expanduser(), "hf", {})
        if enabled:
            from ace.train.sft import run_sft_stage

            res = run_sft_stage(_with_cache(cfg), comps, sandbox, cache_root=_cache_root(cfg), progress=progress,
                                initial=(policy.params, config, tokenizer, str(hf_path)))
            policy = Policy(res.params, res.model_config, res.tokenizer, res.prompt_cfg, policy.hf_dir, "hf+sft",
                            res.corpus_stats)
        return policy
    from ace.train.sft import run_sft_stage

    res = run_sft_stage(_with_cache(cfg), comps, sandbox, cache_root=_cache_root(cfg), progress=progress,
                        train=enabled)
    return Policy(res.params, res.model_config, res.tokenizer, res.prompt_cfg, None,
                  "sft" if enabled else "init", res.corpus_stats)


def _cache_root(cfg: Mapping[str, Any]) -> str:
    return (cfg.get("sft") or {}).get("cache_dir") or str(Path.home() / ".cache" / "ace" / "sft")


def _with_cache(cfg: Mapping[str, Any]) -> dict:
    sft = dict(cfg.get("sft") or {})
    sft.pop("cache_dir", None)
    return {**cfg, "sft": sft}
