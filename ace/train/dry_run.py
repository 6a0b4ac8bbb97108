"""Dry run of a training config: shardings and per-device memory, without allocating any weight.

`python experiments/run.py +exp=ace30b dry_run=true` calls `run_dry_run(cfg)`. It builds the model's
params and the learner's optimizer state as `jax.ShapeDtypeStruct` trees (`jax.eval_shape`), lays
them on a mesh of the configured shape (an `AbstractMesh` when this machine has fewer devices than
the mesh needs, e.g. a 64-device mesh on a laptop), checks that every leaf's mesh axes divide the
dimensions they shard, and prints the bytes one device would hold during training.

What is counted per device (all from the shard shapes of the real sharding rules):
  params (compute dtype)  the `train.compute_dtype` copy the forward/backward reads (the learner
                          casts the float32 masters inside the step),
  params (f32 master)     the float32 masters held in `LearnerState.params`,
  grads (f32)             the float32 gradient accumulator, params-shaped (`train_step` sums
                          micro-batch gradients into it),
  optimizer state         AdamW mu and nu (float32, params-shaped) plus the scalar counters,
  reference params        a compute-dtype copy of the reference policy, only when `train.kl_coef > 0`,
  activations             `activation_breakdown` for one micro-batch (see its docstring).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding

from ace.models.configs import ModelConfig, get_config
from ace.models.qwen3 import abstract_params, param_shardings
from ace.models.sharding import MESH_AXES, RULES, logical_to_spec, make_mesh, resolve_mesh_shape
from ace.train.learner import make_optimizer, optimizer_shardings
from ace.train.learner_config import LearnerConfig

# Devices the fake mesh gets when an axis is -1 ("all remaining devices") in a dry run: 8 hosts of
# 8 accelerators, the layout the ace30b config documents. Override with `+dry_run_devices=N`.
DEFAULT_DRY_RUN_DEVICES = 64

GIB = 1024 ** 3
# Memory a program can use on the devices the project names (what nvidia-smi reports as total).
DEVICE_MEMORY_GIB = {"H100 80 GB": 81559 / 1024, "H200 141 GB": 143771 / 1024}
# Share of a device's memory the plan may take: XLA's temporaries, fragmentation and the CUDA context
# need the rest (run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 so JAX may take that much at all).
FIT_FRACTION = 0.9


class ShardingCheckError(ValueError):
    """A param or optimizer leaf whose sharding's mesh axes do not divide its dimensions."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes one device holds during a training step, plus what they were computed from.

    All `*_bytes` fields are per device. `num_params` counts the elements of the full (unsharded)
    params; `leaves` is the number of param leaves checked, `opt_leaves` of optimizer-state leaves.
    """

    model_name: str
    mesh_shape: dict[str, int]
    abstract_mesh: bool
    num_params: int
    leaves: int
    opt_leaves: int
    compute_dtype: str
    params_compute_bytes: int
    params_master_bytes: int
    grads_bytes: int
    opt_state_bytes: int
    ref_params_bytes: int
    activations: dict[str, int]
    micro_batch_rows: int
    rows_per_device: int
    seq_len: int
    remat: bool

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def total_bytes(self) -> int:
        return (self.params_compute_bytes + self.params_master_bytes + self.grads_bytes + self.opt_state_bytes
                + self.ref_params_bytes + self.activation_bytes)

    def format(self) -> str:
        """A fixed-width table of the per-device figures in GiB."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        kind = "AbstractMesh (no devices used)" if self.abstract_mesh else "Mesh of real devices"
        rows = [
            (f"params ({self.compute_dtype})", self.params_compute_bytes),
            ("params (f32 master)", self.params_master_bytes),
            ("grads (f32)", self.grads_bytes),
            ("optimizer state (AdamW)", self.opt_state_bytes),
        ]
        if self.ref_params_bytes:
            rows.append((f"reference params ({self.compute_dtype})", self.ref_params_bytes))
        rows.append((f"activations ({self.rows_per_device} rows x {self.seq_len} tokens, "
                     f"remat={self.remat})", self.activation_bytes))
        rows += [(f"  of which {name}", value) for name, value in self.activations.items()]
        rows.append(("total", self.total_bytes))
        width = max(len(name) for name, _ in rows)
        lines = [
            f"dry run: model {self.model_name}, {self.num_params:,} params ({self.num_params / 1e9:.2f} B)",
            f"mesh: {mesh} ({math.prod(self.mesh_shape.values())} devices, {kind})",
            f"shardings checked: {self.leaves} param leaves, {self.opt_leaves} optimizer leaves",
            f"micro-batch: {self.micro_batch_rows} rows, {self.rows_per_device} per device",
            "memory per device:",
        ]
        for name, value in rows:
            lines.append(f"  {name.ljust(width)}  {value / GIB:12.3f} GiB  ({value:,} B)")
        lines.append(self.fit_line())
        return "\n".join(lines)

    def fits(self) -> dict[str, bool]:
        """Device name -> whether the per-device total fits FIT_FRACTION of its memory."""
        return {name: self.total_bytes <= FIT_FRACTION * cap * GIB for name, cap in DEVICE_MEMORY_GIB.items()}

    def fit_line(self) -> str:
        parts = []
        for name, ok in self.fits().items():
            budget = FIT_FRACTION * DEVICE_MEMORY_GIB[name]
            parts.append(f"{name}: {'fits' if ok else 'does NOT fit'} ({self.total_bytes / GIB:.1f} of "
                         f"{budget:.1f} GiB usable)")
        return "fit per device: " + "; ".join(parts)


def make_dry_run_mesh(shape: Mapping[str, int]) -> Mesh | AbstractMesh:
    """A real `Mesh` when this process has enough devices, else an `AbstractMesh` of the same shape.

    Shardings on an `AbstractMesh` give shard shapes (and so memory figures) without any device.
    """
    sizes = tuple(int(shape[name]) for name in MESH_AXES)
    needed = math.prod(sizes)
    devices = jax.devices()
    if len(devices) >= needed:
        return make_mesh(dict(zip(MESH_AXES, sizes)), devices[:needed])
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def strict_param_shardings(model_config: ModelConfig, mesh: Mesh | AbstractMesh,
                           rules: Mapping[str, Any] = RULES) -> dict:
    """A NamedSharding per param leaf exactly as the rules table asks, checked for divisibility.

    `ace.models.qwen3.param_shardings` quietly replicates a dimension that a mesh axis does not
    divide; a dry run must instead report it, because on the real cluster that leaf would be copied
    on every device. Raises ShardingCheckError listing every offending leaf.
    """
    shardings = param_shardings(model_config, mesh, rules, drop_indivisible=False)
    check_shardings(abstract_params(model_config), shardings, what="param")
    return shardings


def check_shardings(abstract: Any, shardings: Any, *, what: str) -> int:
    """Checks that each leaf's sharding divides its shape; returns the number of leaves checked.

    Args:
      abstract: a tree of `jax.ShapeDtypeStruct` (or arrays).
      shardings: the same tree structure with a `NamedSharding` per leaf.
      what: a word for the error message ("param", "optimizer").
    Raises:
      ShardingCheckError naming each leaf, its shape, its PartitionSpec and the mesh axis sizes.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat) != len(flat_s):
        raise ShardingCheckError(f"{what}: {len(flat)} leaves but {len(flat_s)} shardings")
    problems = []
    for (path, leaf), sharding in zip(flat, flat_s):
        try:
            sharding.shard_shape(tuple(leaf.shape))
        except ValueError:
            problems.append(f"{what} leaf '{_leaf_name(path)}' of shape {tuple(leaf.shape)} cannot take "
                            f"{sharding.spec} on mesh {dict(sharding.mesh.shape)}: a mesh axis size does not "
                            "divide the dimension it shards")
    if problems:
        raise ShardingCheckError("\n".join(problems))
    return len(flat)


def per_device_bytes(abstract: Any, shardings: Any, dtype: Any = None) -> int:
    """Bytes of one device's shards of every leaf (the largest shard when shards differ in size).

    Args:
      abstract: tree of `jax.ShapeDtypeStruct`; shardings: matching tree of NamedSharding.
      dtype: count every leaf in this dtype instead of its own (e.g. the compute dtype).
    """
    leaves = jax.tree.leaves(abstract)
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = 0
    for leaf, sharding in zip(leaves, flat_s):
        itemsize = jnp.dtype(dtype if dtype is not None else leaf.dtype).itemsize
        total += math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
    return total


def activation_breakdown(model_config: ModelConfig, *, rows: int, seq_len: int, compute_dtype: str,
                         tensor: int, remat: bool, logprob_chunk: int) -> dict[str, int]:
    """Estimated activation bytes one device keeps for the backward pass of one micro-batch, by part.

    An estimate of what `ace.train.learner.train_step` stores, per token of the `rows` rows a device
    holds (c = compute itemsize, heads, kv heads and the vocab divided by the `tensor` axis when it
    divides them, T = seq_len):
      attention_probs (`attention_impl == "reference"`): the [H, T] probabilities of each query,
        which `reference_attention` materialises in full (float32 softmax plus its cast), H*T*(4 + c)
        per layer.
      attention_blockwise (`"blockwise"` or `"cudnn"`): the float32 log-sum-exp the backward keeps,
        H*4 per token per layer, plus one layer's backward working set: the float32 dq accumulator
        H*Dh*4 per token and four float32 [H, block_q, block_kv] tiles per row (scores,
        probabilities, their gradient and dp). Linear in T.
      layers: per layer, the residual input and two normed copies 3*D*c; q, k, v before and after
        norm + RoPE 2*(H + 2K)*Dh*c; the attention output H*Dh*c; MoE router logits and
        probabilities 2*E*4 and, per routed copy (k of them), the dispatched input and the expert
        output 2*D*c plus gate, up and their product 3*Fe*c (a dense MLP: 3*F*c + D*c).
      With remat (`train.remat`) only the L scan carries D*c are kept, plus one layer's working set
        recomputed in the backward; without it all L layers are kept.
      head: the final hidden states D*c per token plus one logprob chunk of float32 logits and their
        gradient, 2 * min(logprob_chunk, T) * V * 4 per row (the logprob function scans over chunks).
    XLA fusion can save some of this and its temporaries can add some; treat it as an estimate.
    """
    c = model_config
    cb = jnp.dtype(compute_dtype).itemsize
    t = seq_len

    def split(n: int) -> float:
        return n / tensor if n % tensor == 0 else n

    h, k, v = split(c.num_heads), split(c.num_kv_heads), split(c.vocab_size)
    attn = 3 * c.hidden_size * cb + 2 * (h + 2 * k) * c.head_dim * cb + h * c.head_dim * cb
    if c.is_moe:
        mlp = 2 * c.num_experts * 4 + c.num_experts_per_tok * (2 * c.hidden_size * cb
                                                                + 3 * split(c.moe_intermediate_size) * cb)
    else:
        mlp = 3 * split(c.intermediate_size) * cb + c.hidden_size * cb
    kept_layers = 1 if remat else c.num_layers
    carries = c.num_layers * c.hidden_size * cb if remat else 0
    if c.attention_impl == "reference":
        attention = {"attention_probs": int(math.ceil(rows * t * kept_layers * h * t * (4 + cb)))}
    else:
        tile = min(c.attention_block_q, t) * min(c.attention_block_kv, t)
        working_set = rows * (t * h * c.head_dim * 4 + 4 * h * tile * 4)
        attention = {"attention_blockwise": int(math.ceil(rows * t * kept_layers * h * 4 + working_set))}
    return {
        **attention,
        "layers": int(math.ceil(rows * t * (kept_layers * (attn + mlp) + carries))),
        "head": int(math.ceil(rows * t * c.hidden_size * cb + rows * 2 * min(logprob_chunk, t) * v * 4)),
    }


def plan_memory(model_config: ModelConfig, learner_config: LearnerConfig, mesh: Mesh | AbstractMesh, *,
                micro_batch_rows: int, seq_len: int, rules: Mapping[str, Any] = RULES,
                with_reference: bool = False, model_name: str = "") -> MemoryReport:
    """Shardings and per-device memory of one training step, from abstract values only.

    Args:
      model_config: the policy's shapes.
      learner_config: optimizer, compute dtype, micro-batching, remat.
      mesh: a Mesh or AbstractMesh with axes ("data", "fsdp", "expert", "tensor").
      micro_batch_rows: sequences in one micro-batch (tasks_per_step * group_size / micro_batches).
      seq_len: tokens per sequence (prompt + completion).
      with_reference: also count a compute-dtype reference model (for a KL penalty).
    Raises:
      ShardingCheckError when a param or optimizer leaf cannot take its sharding.
    """
    if micro_batch_rows <= 0 or seq_len <= 0:
        raise ValueError(f"plan_memory: micro_batch_rows and seq_len must be positive, got "
                         f"micro_batch_rows={micro_batch_rows} seq_len={seq_len}")
    shapes = abstract_params(model_config)
    param_sharding = strict_param_shardings(model_config, mesh, rules)
    master = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    optimizer = make_optimizer(learner_config)
    abstract_opt = jax.eval_shape(optimizer.init, master)
    opt_sharding = optimizer_shardings(optimizer, abstract_opt, param_sharding, mesh)
    opt_leaves = check_shardings(abstract_opt, opt_sharding, what="optimizer")
    mesh_shape = {name: int(mesh.shape[name]) for name in MESH_AXES}
    batch_spec = logical_to_spec(("batch",), mesh_shape, (micro_batch_rows,), rules)
    batch_axes = batch_spec[0] if batch_spec else None
    names = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    rows_per_device = micro_batch_rows // math.prod(mesh_shape[n] for n in names)
    # Heads and vocab shard over "tensor" only when the rules table maps them there.
    tensor = mesh_shape["tensor"] if rules.get("heads") == "tensor" else 1
    compute = learner_config.compute_dtype
    params_compute = per_device_bytes(shapes, param_sharding, compute)
    master_bytes = per_device_bytes(master, param_sharding)
    return MemoryReport(
        model_name=model_name,
        mesh_shape=mesh_shape,
        abstract_mesh=isinstance(mesh, AbstractMesh),
        num_params=sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)),
        leaves=len(jax.tree.leaves(shapes)),
        opt_leaves=opt_leaves,
        compute_dtype=compute,
        params_compute_bytes=params_compute,
        params_master_bytes=master_bytes,
        grads_bytes=master_bytes,
        opt_state_bytes=per_device_bytes(abstract_opt, opt_sharding),
        ref_params_bytes=params_compute if with_reference else 0,
        activations=activation_breakdown(
            model_config, rows=rows_per_device, seq_len=seq_len, compute_dtype=compute, tensor=tensor,
            remat=learner_config.remat, logprob_chunk=learner_config.logprob_chunk_size),
        micro_batch_rows=micro_batch_rows,
        rows_per_device=rows_per_device,
        seq_len=seq_len,
        remat=learner_config.remat,
    )


def _model_config_from_cfg(cfg: Mapping[str, Any]) -> ModelConfig:
    """The named config, or the HF folder's config.json when `model.hf_path` points at one."""
    model = cfg["model"]
    hf_path = model.get("hf_path")
    if hf_path and hf_path != "???" and os.path.isfile(os.path.join(str(hf_path), "config.json")):
        with open(os.path.join(str(hf_path), "config.json")) as f:
            config = ModelConfig.from_hf_config(json.load(f), dtype=str(cfg["train"].get("compute_dtype", "float32")))
    else:
        # The dry run needs shapes only; the named config carries the published numbers.
        config = get_config(str(model["name"]))
    if model.get("attention_impl"):
        config = config.replace(attention_impl=str(model["attention_impl"]))
    return config


def _learner_config_from_cfg(cfg: Mapping[str, Any]) -> LearnerConfig:
    """The learner config the real run would build (`TrainerConfig`, which validates every train.* key)."""
    from ace.train.trainer_config import TrainerConfig

    return TrainerConfig.from_cfg(cfg).learner


def dry_run_device_count(cfg: Mapping[str, Any]) -> tuple[int, str]:
    """How many devices the fake mesh has, and where that number came from.

    Fixed axes alone fix the count. With a -1 axis: `dry_run_devices` when set, else `mesh.devices`
    when it is positive and holds the fixed axes, else DEFAULT_DRY_RUN_DEVICES (the devices of this
    machine say nothing about the cluster the config is for).
    """
    mesh = {k: int(v) for k, v in cfg["mesh"].items() if k != "devices"}
    fixed = math.prod(v for v in mesh.values() if v != -1)
    if all(v != -1 for v in mesh.values()):
        return fixed, "the product of the mesh axes"
    if cfg.get("dry_run_devices"):
        return int(cfg["dry_run_devices"]), "dry_run_devices"
    devices = int(cfg["mesh"].get("devices") or -1)
    if devices > 0 and devices % fixed == 0:
        return devices, "mesh.devices"
    return DEFAULT_DRY_RUN_DEVICES, "the default for a -1 axis (set +dry_run_devices=N to change)"


def run_dry_run(cfg: Mapping[str, Any]) -> MemoryReport:
    """Builds abstract params and optimizer state on a fake mesh of `cfg.mesh`, prints per-device memory.

    Args:
      cfg: the composed Hydra config, a DictConfig or the plain dict of
        `OmegaConf.to_container(cfg, resolve=True)` (`model`, `mesh`, `train`, `rollout`; optional
        `dry_run_devices`, the device count that fills a -1 mesh axis).
    Returns:
      The MemoryReport that was printed. Allocates no weights.
    """
    learner_config = _learner_config_from_cfg(cfg)
    model_config = _model_config_from_cfg(cfg)
    num_devices, source = dry_run_device_count(cfg)
    mesh_cfg = {k: int(v) for k, v in cfg["mesh"].items() if k != "devices"}
    mesh = make_dry_run_mesh(resolve_mesh_shape(mesh_cfg, num_devices))
    t = cfg["train"]
    rows = int(t["tasks_per_step"]) * int(t["group_size"])
    # Each of the `minibatches` optimizer steps takes rows / minibatches, in micro_batches slices.
    micro = learner_config.micro_batches * learner_config.minibatches
    if rows % micro:
        raise ValueError(f"train.tasks_per_step * train.group_size = {rows} is not a multiple of "
                         f"train.micro_batches * train.minibatches = {micro}")
    seq_len = int(cfg["rollout"]["max_prompt_tokens"]) + int(cfg["rollout"]["max_new_tokens"])
    report = plan_memory(model_config, learner_config, mesh, micro_batch_rows=rows // micro, seq_len=seq_len,
                         with_reference=learner_config.kl_coef > 0, model_name=str(cfg["model"]["name"]))
    print(f"dry run: {num_devices} devices from {source}", flush=True)
    print(report.format(), flush=True)
    return report
