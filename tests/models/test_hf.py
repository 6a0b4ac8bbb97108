"""HF interop: load transformers Qwen3 / Qwen3-MoE folders into ace, match logits, export back."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ace.models import hf
from ace.models.qwen3 import abstract_params, forward, param_shardings
from ace.models.sharding import make_mesh, use_mesh
from ace.models.tokenizer import Tokenizer
from tests.support.tiny_hf import save_tiny_qwen3, save_tiny_tokenizer

B, T, VOCAB = 2, 12, 96


def _tokens(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return tokens, positions


def _torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """Dense, tied embeddings, saved in 20KB shards so the index path is exercised."""
    path = tmp_path_factory.mktemp("dense")
    model = save_tiny_qwen3(path, moe=False, tie_word_embeddings=True, max_shard_size="20KB", seed=1)
    return path, model


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    model = save_tiny_qwen3(path, moe=True, norm_topk_prob=True, seed=2)
    return path, model


def test_dense_tied_sharded_folder_logits_match_transformers(dense_dir):
    path, model = dense_dir
    assert (path / hf.INDEX_FILE).is_file()
    params, config = hf.load_hf_params(path)
    assert not config.is_moe and config.tie_word_embeddings and "lm_head" not in params
    tokens, positions = _tokens()
    logits, _ = forward(params, config, jnp.asarray(tokens), jnp.asarray(positions))
    ref = _torch_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)


def test_moe_logits_match_transformers_when_loaded_onto_a_mesh(moe_dir):
    path, model = moe_dir
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    params, config = hf.load_hf_params(path, mesh=mesh)
    assert config.is_moe and config.num_experts == 4 and config.norm_topk_prob
    want = param_shardings(config, mesh)
    for got_leaf, want_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got_leaf.sharding == want_sharding
    tokens, positions = _tokens(1)
    with use_mesh(mesh):
        logits, _ = jax.jit(lambda p, t, q: forward(p, config, t, q))(params, tokens, positions)
    ref = _torch_logits(model, tokens)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)


def test_fused_expert_layout_loads_the_same_params(moe_dir, tmp_path):
    path, model = moe_dir
    model.save_pretrained(str(tmp_path), save_original_format=False)
    with safe_open(str(tmp_path / hf.SINGLE_FILE), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names  # really the fused layout
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in names
    fused, _ = hf.load_hf_params(tmp_path)
    per_expert, _ = hf.load_hf_params(path)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(per_expert)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Independent check of one expert against torch's own in-memory fused tensor.
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()  # [E, 2*Fe, D]
    np.testing.assert_array_equal(np.asarray(fused["layers"]["mlp"]["up_proj"][1, 3]), gate_up[3, 16:, :].T)


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_export_reloads_in_transformers_with_identical_tensors(which, dense_dir, moe_dir, tmp_path):
    path, model = dense_dir if which == "dense" else moe_dir
    params, config = hf.load_hf_params(path)
    files = hf.save_hf_checkpoint(params, config, tmp_path, max_shard_bytes=16_000)
    assert len(files) > 1 and (tmp_path / hf.INDEX_FILE).is_file()
    index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(hf.iter_hf_names(config))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    want, got = model.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    # And the export loads back into ace bit for bit.
    again, again_config = hf.load_hf_params(tmp_path)
    assert again_config == config
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_export_and_load_keep_the_dtype(moe_dir, tmp_path):
    path, _ = moe_dir
    params, config = hf.load_hf_params(path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert {np.dtype(x.dtype).name for x in jax.tree.leaves(params)} == {"bfloat16"}
    f32, _ = hf.load_hf_params(path)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]),
                                  np.asarray(f32["lm_head"]).astype(jnp.bfloat16))
    hf.save_hf_checkpoint(params, config, tmp_path)
    assert json.loads((tmp_path / hf.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    embed = reloaded.state_dict()["model.embed_tokens.weight"].float().numpy()
    np.testing.assert_array_equal(embed, np.asarray(params["embed"]["embedding"]).astype(np.float32))


def test_load_errors_name_the_tensor(dense_dir, tmp_path):
    path, _ = dense_dir
    params, config = hf.load_hf_params(path)
    single = tmp_path / "single"
    hf.save_hf_checkpoint(params, config, single)
    with safe_open(str(single / hf.SINGLE_FILE), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def write_variant(name, tensors_variant):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(single / hf.CONFIG_FILE, folder / hf.CONFIG_FILE)
        save_file(tensors_variant, str(folder / hf.SINGLE_FILE), metadata={"format": "pt"})
        return folder

    missing = write_variant("missing", {k: v for k, v in tensors.items() if "layers.1.self_attn.k_norm" not in k})
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.self_attn\.k_norm\.weight"):
        hf.load_hf_params(missing)
    extra = write_variant("extra", {**tensors, "model.layers.9.mlp.up_proj.weight": tensors["model.norm.weight"]})
    with pytest.raises(ValueError, match=r"do not belong to this config.*model\.layers\.9\.mlp\.up_proj"):
        hf.load_hf_params(extra)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.o_proj.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match=r"o_proj\.weight has shape \[32, 32\], expected \[32, 64\]"):
        hf.load_hf_params(write_variant("bad_shape", bad))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(single / hf.CONFIG_FILE, no_weights / hf.CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        hf.load_hf_params(no_weights)


def test_export_checks_params_and_refuses_to_mix_with_old_shards(tmp_path):
    from ace.models.configs import TINY_DENSE

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract_params(TINY_DENSE))
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    hf.save_hf_checkpoint(params, TINY_DENSE, tmp_path, tokenizer=tokenizer)
    # The folder is a complete HF model folder: the tokenizer loads from it in both libraries.
    assert Tokenizer.from_dir(tmp_path).encode("import numpy") == tokenizer.encode("import numpy")
    assert AutoTokenizer.from_pretrained(str(tmp_path)).encode("import numpy") == tokenizer.encode("import numpy")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_hf_checkpoint(params, TINY_DENSE, tmp_path)
    hf.save_hf_checkpoint(params, TINY_DENSE, tmp_path, overwrite=True, max_shard_bytes=50_000)
    assert not (tmp_path / hf.SINGLE_FILE).exists()  # the stale single file was removed
    params["layers"]["attn"]["q_proj"] = params["layers"]["attn"]["q_proj"][:, :, :2]
    with pytest.raises(ValueError, match=r"layers/attn/q_proj has shape \(2, 64, 2, 16\), expected \(2, 64, 4, 16\)"):
        hf.save_hf_checkpoint(params, TINY_DENSE, tmp_path / "other")
