"""HF safetensors checkpoints <-> ace params, both directions.

An HF folder holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensor names follow transformers' Qwen3 / Qwen3-MoE: torch Linear
weights are [out, in], attention projections fold heads into one axis, and every expert has its own
`mlp.experts.{e}.{gate,up,down}_proj.weight`. ace stacks layers (and experts) on leading axes:
q_proj [L, D, H, Dh], gate_proj [L, E, D, Fe], ... (see `ace.models.qwen3`).

Loading streams one shard at a time and copies each tensor into its slice of a preallocated stacked
host array, so the checkpoint is never held twice in host memory; a leaf goes to its devices (with the
sharding from `ace.models.qwen3.param_shardings` when a mesh is given) as soon as its last slice
arrives, and its host buffer is dropped. transformers 5 keeps experts fused in memory
(`mlp.experts.gate_up_proj` [E, 2*Fe, D], `mlp.experts.down_proj` [E, D, Fe]); a folder saved in that
layout (`save_original_format=False`) is detected by its key names and loads too. Export always
writes the per-expert layout, which transformers and SGLang both load.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ace.models.configs import ModelConfig
from ace.models.qwen3 import abstract_params, param_shardings
from ace.models.sharding import to_host

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Buffers some older exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where (part of) one HF tensor goes: `params[leaf][index] = to_ace(hf_array)`."""

    leaf: LeafPath
    index: tuple[int, ...]
    to_ace: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor: its name, shape, the params slices it fills and (if exportable) its inverse."""

    name: str
    hf_shape: tuple[int, ...]
    targets: tuple[_Target, ...]
    to_hf: Callable[[np.ndarray], np.ndarray] | None = None


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _plain(name, hf_shape, leaf, index, to_ace=_identity, to_hf=_identity) -> _Tensor:
    return _Tensor(name, tuple(hf_shape), (_Target(leaf, index, to_ace),), to_hf)


def _linear(name, out_features, in_features, leaf, index) -> _Tensor:
    """A torch Linear weight [out, in] stored by ace as [in, out]."""
    return _plain(name, (out_features, in_features), leaf, index, _transpose, _transpose)


def _tensor_specs(config: ModelConfig, *, fused_experts: bool = False) -> list[_Tensor]:
    """Every HF tensor of `config`, in layer order, with how it maps onto the params tree."""
    c = config
    D, H, K, Dh, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    specs = [_plain("model.embed_tokens.weight", (V, D), ("embed", "embedding"), ())]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        at = ("layers", "attn")
        specs += [
            _plain(p + "input_layernorm.weight", (D,), ("layers", "input_norm", "scale"), (i,)),
            _plain(p + "post_attention_layernorm.weight", (D,), ("layers", "post_attn_norm", "scale"), (i,)),
            _plain(p + "self_attn.q_norm.weight", (Dh,), at + ("q_norm",), (i,)),
            _plain(p + "self_attn.k_norm.weight", (Dh,), at + ("k_norm",), (i,)),
            # q/k/v: torch [heads*Dh, D] -> [D, heads, Dh]; o: torch [D, H*Dh] -> [H, Dh, D].
            _plain(p + "self_attn.q_proj.weight", (H * Dh, D), at + ("q_proj",), (i,),
                   lambda w: w.T.reshape(D, H, Dh), lambda a: a.reshape(D, H * Dh).T),
            _plain(p + "self_attn.k_proj.weight", (K * Dh, D), at + ("k_proj",), (i,),
                   lambda w: w.T.reshape(D, K, Dh), lambda a: a.reshape(D, K * Dh).T),
            _plain(p + "self_attn.v_proj.weight", (K * Dh, D), at + ("v_proj",), (i,),
                   lambda w: w.T.reshape(D, K, Dh), lambda a: a.reshape(D, K * Dh).T),
            _plain(p + "self_attn.o_proj.weight", (D, H * Dh), at + ("o_proj",), (i,),
                   lambda w: w.T.reshape(H, Dh, D), lambda a: a.reshape(H * Dh, D).T),
        ]
        mlp = ("layers", "mlp")
        if not c.is_moe:
            F = c.intermediate_size
            specs += [
                _linear(p + "mlp.gate_proj.weight", F, D, mlp + ("gate_proj",), (i,)),
                _linear(p + "mlp.up_proj.weight", F, D, mlp + ("up_proj",), (i,)),
                _linear(p + "mlp.down_proj.weight", D, F, mlp + ("down_proj",), (i,)),
            ]
            continue
        E, Fe = c.num_experts, c.moe_intermediate_size
        specs.append(_linear(p + "mlp.gate.weight", E, D, mlp + ("router",), (i,)))
        if fused_experts:
            # transformers 5 in-memory layout: gate_up [E, 2*Fe, D] whose first Fe rows are the gate
            # (it splits with `.chunk(2, dim=-1)` after the matmul), down [E, D, Fe].
            specs.append(_Tensor(p + "mlp.experts.gate_up_proj", (E, 2 * Fe, D), (
                _Target(mlp + ("gate_proj",), (i,), lambda w: w[:, :Fe, :].transpose(0, 2, 1)),
                _Target(mlp + ("up_proj",), (i,), lambda w: w[:, Fe:, :].transpose(0, 2, 1)),
            )))
            specs.append(_Tensor(p + "mlp.experts.down_proj", (E, D, Fe), (
                _Target(mlp + ("down_proj",), (i,), lambda w: w.transpose(0, 2, 1)),)))
            continue
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            specs += [
                _linear(q + "gate_proj.weight", Fe, D, mlp + ("gate_proj",), (i, e)),
                _linear(q + "up_proj.weight", Fe, D, mlp + ("up_proj",), (i, e)),
                _linear(q + "down_proj.weight", D, Fe, mlp + ("down_proj",), (i, e)),
            ]
    specs.append(_plain("model.norm.weight", (D,), ("final_norm", "scale"), ()))
    if not c.tie_word_embeddings:
        specs.append(_linear("lm_head.weight", V, D, ("lm_head",), ()))
    return specs


def _flat_leaves(tree: dict) -> dict[LeafPath, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(leaves: dict[LeafPath, Any]) -> dict:
    out: dict = {}
    for path, leaf in leaves.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` of an HF folder as a dict."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: an HF model folder needs a config.json")
    return json.loads(file.read_text())


def _weight_map(path: Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index or the single-file checkpoint."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object")
        for file in sorted(set(weight_map.values())):
            if not (path / file).is_file():
                raise FileNotFoundError(f"{index} lists shard {file!r}, which is not in {path}")
        return weight_map
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="numpy") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _preview(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def load_hf_params(path: str | os.PathLike, config: ModelConfig | None = None, *,
                   mesh: jax.sharding.Mesh | None = None, dtype: Any = None) -> tuple[dict, ModelConfig]:
    """Loads an HF Qwen3 / Qwen3-MoE folder into an ace params tree, one shard at a time.

    Args:
      path: folder with config.json and model.safetensors (or sharded with an index).
      config: the ModelConfig to load into; default: built from config.json.
      mesh: when given, each leaf is placed with `param_shardings(config, mesh)`, every device
        receiving only its slice; otherwise leaves go to the default device.
      dtype: param dtype (name or dtype); default `config.dtype`. Tensors are cast on the host.
    Returns:
      (params, config): params as in `ace.models.qwen3.init_params`, and the config with `dtype`
      set to the params' dtype.
    Raises:
      FileNotFoundError: missing config.json / weights / a shard listed in the index.
      ValueError: a tensor is missing, unexpected, or has the wrong shape (the message names it).
    """
    path = Path(path)
    if config is None:
        name = None if dtype is None else jnp.dtype(dtype).name
        config = ModelConfig.from_hf_config(read_hf_config(path), **({"dtype": name} if name else {}))
    elif dtype is not None:
        config = config.replace(dtype=jnp.dtype(dtype).name)
    target_dtype = config.param_dtype

    weight_map = _weight_map(path)
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in weight_map)
    specs = {s.name: s for s in _tensor_specs(config, fused_experts=fused)}
    ignored = {n for n in weight_map if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints still carry a copy of the embedding
    missing = specs.keys() - weight_map.keys()
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors expected for this config are missing: "
                         f"{_preview(missing)}")
    unexpected = weight_map.keys() - specs.keys() - ignored
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors do not belong to this config "
                         f"(is config.json right?): {_preview(unexpected)}")

    shapes = {k: v.shape for k, v in _flat_leaves(abstract_params(config)).items()}
    shardings = {}
    if mesh is not None:
        shardings = _flat_leaves(param_shardings(config, mesh))
    pending = {leaf: 0 for leaf in shapes}
    for spec in specs.values():
        for t in spec.targets:
            pending[t.leaf] += 1
    host: dict[LeafPath, np.ndarray] = {}
    placed: dict[LeafPath, jax.Array] = {}
    seen: set[str] = set()

    for file in sorted(set(weight_map[n] for n in specs)):
        with safe_open(str(path / file), framework="numpy") as f:
            for name in f.keys():
                spec = specs.get(name)
                if spec is None or weight_map.get(name) != file:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != spec.hf_shape:
                    raise ValueError(f"{path / file}: tensor {name} has shape {list(shape)}, "
                                     f"expected {list(spec.hf_shape)} for this config")
                array = f.get_tensor(name)
                for t in spec.targets:
                    if t.leaf not in host:
                        host[t.leaf] = np.empty(shapes[t.leaf], target_dtype)
                    host[t.leaf][t.index] = t.to_ace(array).astype(target_dtype, copy=False)
                    pending[t.leaf] -= 1
                    if pending[t.leaf] == 0:
                        placed[t.leaf] = _place(host.pop(t.leaf), shardings.get(t.leaf))
                seen.add(name)
                del array
    unseen = specs.keys() - seen
    if unseen:
        raise ValueError(f"{path}: {len(unseen)} tensors listed in the index were not found in their "
                         f"shard: {_preview(unseen)}")
    return _unflatten({leaf: placed[leaf] for leaf in shapes}), config


def _place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    # Each device copies only its own slice, which also works when the mesh spans several hosts.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _check_params(params: dict, config: ModelConfig) -> dict[LeafPath, Any]:
    want = {k: v.shape for k, v in _flat_leaves(abstract_params(config)).items()}
    got = _flat_leaves(params)
    if got.keys() != want.keys():
        extra, lacking = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
        raise ValueError(f"params do not match the config: missing {lacking}, unexpected {extra}")
    for leaf, shape in want.items():
        if tuple(got[leaf].shape) != tuple(shape):
            raise ValueError(f"params leaf {'/'.join(leaf)} has shape {tuple(got[leaf].shape)}, "
                             f"expected {tuple(shape)} for this config")
    return got


class _LayerSlices:
    """Fetches params to the host one layer slice at a time, so export never holds more than a layer."""

    def __init__(self, leaves: dict[LeafPath, Any]):
        self._leaves = leaves
        self._layer: int | None = None
        self._cache: dict[LeafPath, np.ndarray] = {}

    def get(self, leaf: LeafPath, index: tuple[int, ...]) -> np.ndarray:
        # `to_host` gathers a slice spread over several hosts (collective: every process exports).
        if not index:
            return to_host(self._leaves[leaf])
        if index[0] != self._layer:
            self._layer, self._cache = index[0], {}
        if leaf not in self._cache:
            self._cache[leaf] = to_host(self._leaves[leaf][index[0]])
        return self._cache[leaf][index[1:]]


def _shard_plan(specs: list[_Tensor], itemsizes: dict[LeafPath, int], max_shard_bytes: int
                ) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.hf_shape) * itemsizes[spec.targets[0].leaf]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def save_hf_checkpoint(params: dict, config: ModelConfig, path: str | os.PathLike, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: Any = None,
                       overwrite: bool = False) -> list[str]:
    """Writes params as an HF folder: config.json, safetensors shards (+ index when more than one).

    Tensors keep the params' dtype and use the per-expert names, so `transformers` and SGLang load the
    folder directly. Each shard is assembled from one layer slice at a time on the host.

    Args:
      params: params tree of `config` (any sharding).
      config: its ModelConfig.
      path: output folder (created).
      max_shard_bytes: start a new shard when the next tensor would pass this size.
      tokenizer: optional `ace.models.tokenizer.Tokenizer` to save into the same folder.
      overwrite: replace existing safetensors files in `path`; without it they raise.
    With several JAX processes, all of them must call this (slices spread over hosts are gathered)
    and only process 0 writes; `path` is not used on the others.
    Returns:
      The shard file names written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    leaves = _check_params(params, config)
    # With several JAX processes every one gathers the slices (collective) and process 0 writes.
    writer = jax.process_index() == 0
    if writer:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        old = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
        if old and not overwrite:
            raise FileExistsError(f"{path} already holds {old}; pass overwrite=True to replace them")
        for name in old:
            (path / name).unlink()

    specs = _tensor_specs(config)
    itemsizes = {leaf: np.dtype(a.dtype).itemsize for leaf, a in leaves.items()}
    shards = _shard_plan(specs, itemsizes, max_shard_bytes)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    slices = _LayerSlices(leaves)
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        tensors = {}
        for spec in shard:
            (target,) = spec.targets
            tensors[spec.name] = np.ascontiguousarray(spec.to_hf(slices.get(target.leaf, target.index)))
            weight_map[spec.name] = file
            total += tensors[spec.name].nbytes
        if writer:
            save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
    if not writer:
        return files
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))

    hf_config = config.to_hf_config()
    dtypes = {np.dtype(a.dtype).name for a in leaves.values()}
    dtype_name = dtypes.pop() if len(dtypes) == 1 else config.dtype
    hf_config["torch_dtype"] = dtype_name
    hf_config["dtype"] = dtype_name
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save(path)
    return files


def iter_hf_names(config: ModelConfig) -> Iterator[str]:
    """The HF tensor names `save_hf_checkpoint` writes for `config`, in order."""
    return (spec.name for spec in _tensor_specs(config))
