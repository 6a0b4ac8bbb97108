"""The dry run of `+exp=ace30b dry_run=true`: shardings on a fake mesh and per-device memory."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from ace.models.configs import QWEN3_30B_A3B, TINY
from ace.models.qwen3 import init_params
from ace.models.sharding import MESH_AXES, make_mesh, resolve_mesh_shape
from ace.train.dry_run import ShardingCheckError, activation_breakdown, make_dry_run_mesh, plan_memory, run_dry_run
from ace.train.learner import LearnerConfig, init_learner, shard_state

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(REPO / "hydra_configs")


def _abstract_mesh(**sizes):
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _hand_param_counts(c):
    """(expert params, norm params, everything else) of a Qwen3-MoE, from the published architecture."""
    L, D, H, K, Dh, V, E, Fe = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                c.vocab_size, c.num_experts, c.moe_intermediate_size)
    experts = L * 3 * E * D * Fe
    norms = L * (2 * D + 2 * Dh) + D
    attn = L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D)
    router = L * D * E
    rest = V * D + (0 if c.tie_word_embeddings else D * V) + attn + router
    return experts, norms, rest


def test_qwen3_30b_memory_matches_hand_computation_from_param_count():
    lcfg = LearnerConfig(lr=1e-6, total_steps=10, compute_dtype="bfloat16", micro_batches=16)
    report = plan_memory(QWEN3_30B_A3B, lcfg, _abstract_mesh(fsdp=8, expert=8), micro_batch_rows=16, seq_len=4096)
    experts, norms, rest = _hand_param_counts(QWEN3_30B_A3B)
    assert report.num_params == experts + norms + rest
    assert 30.0e9 < report.num_params < 31.0e9  # "30B" in the model's name; 3.3B are active per token
    # Experts shard over expert (E) and fsdp (their embed dim); everything else with an embed dim
    # over fsdp only; norm scales are replicated.
    per_device = experts // 64 + rest // 8 + norms
    assert report.params_master_bytes == 4 * per_device
    assert report.params_compute_bytes == 2 * per_device
    assert report.grads_bytes == 4 * per_device
    # AdamW mu and nu are float32 and params-shaped; the rest are a few scalar step counters.
    assert 0 <= report.opt_state_bytes - 2 * 4 * per_device <= 64
    assert report.rows_per_device == 2  # 16 rows over fsdp=8; expert=8 no longer divides what is left
    assert report.total_bytes == (report.params_master_bytes + report.params_compute_bytes + report.grads_bytes
                                  + report.opt_state_bytes + report.activation_bytes)


def test_plan_matches_the_bytes_a_real_sharded_learner_state_holds():
    lcfg = LearnerConfig(lr=1e-3, total_steps=10)
    mesh = make_mesh({"fsdp": 4, "expert": 2}, jax.devices()[:8])
    report = plan_memory(TINY, lcfg, mesh, micro_batch_rows=8, seq_len=32)
    state = shard_state(init_learner(init_params(TINY, jax.random.key(0)), lcfg, jax.random.key(1)), lcfg, TINY, mesh)

    def device0_bytes(tree):
        dev = jax.devices()[0]
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)

    assert report.params_master_bytes == device0_bytes(state.params)
    assert report.opt_state_bytes == device0_bytes(state.opt_state)
    # The same plan on an AbstractMesh of that shape (no devices) gives the same numbers.
    abstract = plan_memory(TINY, lcfg, _abstract_mesh(fsdp=4, expert=2), micro_batch_rows=8, seq_len=32)
    assert abstract.abstract_mesh and not report.abstract_mesh
    assert (abstract.params_master_bytes, abstract.opt_state_bytes, abstract.activations) == (
        report.params_master_bytes, report.opt_state_bytes, report.activations)


def test_indivisible_mesh_axis_raises_naming_the_leaf():
    lcfg = LearnerConfig(lr=1e-3, total_steps=10)
    with pytest.raises(ShardingCheckError) as err:
        plan_memory(TINY, lcfg, _abstract_mesh(tensor=3), micro_batch_rows=3, seq_len=8)
    message = str(err.value)
    # TINY has 4 query heads and 2 kv heads: a tensor axis of 3 divides neither.
    assert "layers/attn/q_proj" in message and "layers/attn/k_proj" in message and "'tensor': 3" in message


def test_activation_estimate_scales_as_documented():
    kw = dict(compute_dtype="bfloat16", tensor=1, logprob_chunk=512)
    c = QWEN3_30B_A3B.replace(attention_impl="reference")
    base = activation_breakdown(c, rows=2, seq_len=1024, remat=False, **kw)
    longer = activation_breakdown(c, rows=2, seq_len=2048, remat=False, **kw)
    wider = activation_breakdown(c, rows=4, seq_len=1024, remat=False, **kw)
    remat = activation_breakdown(c, rows=2, seq_len=1024, remat=True, **kw)
    # Full attention probabilities: quadratic in length, linear in rows; H * T * (4 + 2) bytes per token.
    assert base["attention_probs"] == 2 * 1024 * c.num_layers * c.num_heads * 1024 * 6
    assert longer["attention_probs"] == 4 * base["attention_probs"]
    assert wider["layers"] == 2 * base["layers"] and wider["attention_probs"] == 2 * base["attention_probs"]
    # Remat keeps one layer's working set plus the L scan carries.
    assert remat["attention_probs"] * c.num_layers == base["attention_probs"]
    assert remat["layers"] < base["layers"] / 10
    # Heads sharded over tensor=4 cut the attention part by 4.
    tp = activation_breakdown(c, rows=2, seq_len=1024, remat=False, **{**kw, "tensor": 4})
    assert tp["attention_probs"] * 4 == base["attention_probs"]


def test_blockwise_attention_estimate_is_linear_in_length():
    kw = dict(compute_dtype="bfloat16", tensor=1, logprob_chunk=512, rows=2, remat=False)
    c = QWEN3_30B_A3B  # attention_impl="blockwise"
    short, long = (activation_breakdown(c, seq_len=t, **kw)["attention_blockwise"] for t in (8192, 32768))
    # Log-sum-exp per layer, dq accumulator and four 512 x 512 float32 tiles, all per row.
    h, dh, layers = c.num_heads, c.head_dim, c.num_layers
    assert long == 2 * (32768 * layers * h * 4 + 32768 * h * dh * 4 + 4 * h * 512 * 512 * 4)
    assert long < 4.1 * short
    full = activation_breakdown(c.replace(attention_impl="reference"), seq_len=32768, **kw)["attention_probs"]
    assert full > 1000 * long


def test_resolve_mesh_shape_fills_the_free_axis_and_rejects_bad_counts():
    assert resolve_mesh_shape({"fsdp": -1, "expert": 8}, 64) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    with pytest.raises(ValueError, match="60 devices are not divisible by the fixed axes' product 8"):
        resolve_mesh_shape({"fsdp": -1, "expert": 8}, 60)
    with pytest.raises(ValueError, match="unknown axes \\['pipeline'\\]"):
        resolve_mesh_shape({"pipeline": 2}, 2)
    # More devices than this process has: an AbstractMesh; enough: a real Mesh.
    assert isinstance(make_dry_run_mesh({"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}), AbstractMesh)
    assert isinstance(make_dry_run_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}), jax.sharding.Mesh)


def test_ace30b_dry_run_allocates_no_weights(capsys):
    # The multi-host variant of the config's comment: 64 devices, more than this process has.
    cfg = _compose(["+exp=ace30b", "dry_run=true", "mesh.devices=-1", "mesh.fsdp=-1", "mesh.expert=8",
                    "train.adam_mu_dtype=null"])
    before = {id(a) for a in jax.live_arrays()}
    report = run_dry_run(cfg)
    new_bytes = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
    assert new_bytes < 1 << 20, f"the dry run left {new_bytes} bytes of device arrays alive"
    out = capsys.readouterr().out
    assert "memory per device" in out and "params (bfloat16)" in out
    assert report.num_params > 30e9 and report.abstract_mesh
    assert report.mesh_shape == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}


def test_run_py_ace30b_dry_run_exits_zero_and_prints_memory():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "experiments/run.py", "+exp=ace30b", "dry_run=true",
                           "hydra.run.dir=/tmp/ace_dry_run_hydra", "hydra.output_subdir=null"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory per device" in proc.stdout
    total = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("total")]
    assert total and float(total[0].split()[1]) > 0
