"""Start-up checks of the scale path: each bad input fails before any server or device work, with
a message that names the file or key, the value found and what was expected."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ace.rollout.sglang_pool import SGLangPool
from ace.rollout.sglang_pool_config import PoolConfigError, SGLangPoolConfig, parse_device_list
from ace.train.devices import restrict_learner_gpus
from ace.train.dry_run import DEVICE_MEMORY_GIB, FIT_FRACTION, GIB, run_dry_run
from ace.train.experiment import load_competitions, run_experiment
from ace.train.policy import PolicyError, check_hf_folder
from tests.support.mlebench_data import THREE_LITE, write_mlebench_folder
from tests.support.tiny_hf import save_tiny_qwen3, save_tiny_tokenizer

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "hydra_configs")


def _cfg(overrides) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "policy"
    tok = save_tiny_tokenizer(path)
    save_tiny_qwen3(path, moe=True, vocab_size=tok.vocab_size)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_good_hf_folder_passes_and_gives_its_config(hf_folder):
    config, tokenizer = check_hf_folder(hf_folder)
    assert config.is_moe and config.num_experts == 4 and config.vocab_size == tokenizer.vocab_size


def test_tokenizer_ids_beyond_the_vocabulary_are_refused(hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "small_vocab")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 100  # the tokenizer has 352 ids
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyError, match=r"token ids reach 351.*vocab_size=100"):
        check_hf_folder(bad)


def test_a_truncated_shard_is_refused(hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "cut")
    shard = bad / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyError, match=r"model.safetensors.*truncated"):
        check_hf_folder(bad)


def test_a_missing_shard_is_refused(hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "sharded")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(PolicyError, match="model-00001-of-00002.safetensors: shard listed in the index is missing"):
        check_hf_folder(bad)


def test_an_unknown_architecture_is_refused(hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "llama")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyError, match=r"architectures=\['LlamaForCausalLM'\].*Qwen3MoeForCausalLM"):
        check_hf_folder(bad)


def test_a_server_url_that_does_not_answer_is_refused(tmp_path):
    from ace.rollout.sglang_server import find_free_port

    cfg = SGLangPoolConfig.from_cfg({"urls": [f"http://127.0.0.1:{find_free_port()}"]})
    with pytest.raises(PoolConfigError, match="rollout.urls: server http://127.0.0.1:.* does not answer"):
        SGLangPool.start(cfg, model_path=tmp_path, exporter=lambda p, d: None, out_dir=tmp_path)


def test_data_dir_without_prepared_competitions_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _cfg(["env=mlebench", f"env.data_dir={tmp_path / 'empty'}"])
    with pytest.raises(FileNotFoundError, match="holds no prepared competition"):
        load_competitions(cfg)


def test_mlebench_competitions_and_held_out_lists(tmp_path):
    data = write_mlebench_folder(tmp_path / "mleb")
    cfg = _cfg(["env=mlebench", f"env.data_dir={data}", f"env.competitions=[{THREE_LITE[0]},{THREE_LITE[1]}]",
                f"env.held_out=[{THREE_LITE[2]}]"])
    train, held = load_competitions(cfg)
    assert [c.comp_id for c in train] == list(THREE_LITE[:2]) and [c.comp_id for c in held] == [THREE_LITE[2]]
    same, held2 = load_competitions(_cfg(["env=mlebench", f"env.data_dir={data}"]))
    assert sorted(c.comp_id for c in same) == sorted(THREE_LITE) and held2 == same


@pytest.mark.parametrize("key, value", [("learner.gpus", "0-3"), ("rollout.gpus", "4-7")])
def test_a_device_split_asking_for_absent_gpus_is_refused(key, value):
    cfg = _cfg(["+exp=ace30b", "learner.gpus=null", "rollout.gpus=null", f"{key}={value}"])
    with pytest.raises(PoolConfigError, match=rf"{key}=\[.*\] asks for GPUs .* but this host has 0 GPU"):
        restrict_learner_gpus(cfg)


def test_bad_inputs_fail_in_run_experiment_before_anything_starts(hf_folder, tmp_path):
    # An HF folder whose tokenizer overflows the vocabulary, with a rollout pool that would launch:
    # the error comes first, and no out_dir, server log or device work is made.
    bad = _copy(hf_folder, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    data = write_mlebench_folder(tmp_path / "mleb")
    out = tmp_path / "out"
    cfg = _cfg(["+exp=ace30b", f"model.hf_path={bad}", f"env.data_dir={data}", "learner.gpus=null",
                "rollout.device=cpu", "rollout.gpus=null", f"out_dir={out}"])
    with pytest.raises(PolicyError, match="vocab_size=64"):
        run_experiment(cfg)
    assert not out.exists()


@pytest.mark.parametrize("spec, want", [("0-3", (0, 1, 2, 3)), ("0,2,4-5", (0, 2, 4, 5)), (3, (3,)),
                                        ([1, 0], (1, 0)), (None, None), ("", None)])
def test_parse_device_list(spec, want):
    assert parse_device_list(spec, key="k") == want


@pytest.mark.parametrize("spec", ["0-x", "3-1", "0,0", [-1], True])
def test_parse_device_list_refuses_bad_specs(spec):
    with pytest.raises(PoolConfigError, match="k="):
        parse_device_list(spec, key="k")


def test_pool_config_assigns_gpus_per_server_and_refuses_too_few():
    cfg = SGLangPoolConfig.from_cfg({"num_servers": 2, "tp_size": 2, "gpus": "4-7"})
    assert cfg.server_gpus() == [(4, 5), (6, 7)] and cfg.uses_router
    with pytest.raises(PoolConfigError, match=r"rollout.gpus=\[4, 5, 6\]: 2 servers of tp_size 2 need 4"):
        SGLangPoolConfig.from_cfg({"num_servers": 2, "tp_size": 2, "gpus": "4-6"}).server_gpus()
    assert not SGLangPoolConfig.from_cfg({"num_servers": 1}).uses_router
    with pytest.raises(PoolConfigError, match="rollout.device='tpu'"):
        SGLangPoolConfig.from_cfg({"device": "tpu"})


def test_ace30b_dry_run_fits_the_h200_it_names_and_says_so(capsys):
    report = run_dry_run(_cfg(["+exp=ace30b", "dry_run=true"]))
    out = capsys.readouterr().out
    assert report.mesh_shape == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    fits = report.fits()
    # The verdict is the arithmetic of the printed total against each device's usable memory.
    for name, cap in DEVICE_MEMORY_GIB.items():
        assert fits[name] == (report.total_bytes <= FIT_FRACTION * cap * GIB)
    assert fits["H200 141 GB"] and not fits["H100 80 GB"]
    assert "fit per device: H100 80 GB: does NOT fit" in out and "H200 141 GB: fits" in out
    # 16 bytes of learner state per param (f32 master + f32 grads + bf16 mu + f32 nu) + bf16 compute copy.
    per_param = (report.params_master_bytes + report.grads_bytes + report.opt_state_bytes
                 + report.params_compute_bytes) * 4 / report.num_params
    np.testing.assert_allclose(per_param, 4 + 4 + 2 + 4 + 2, rtol=1e-3)


def test_validation_split_sets_training_competitions_aside(tmp_path):
    data = write_mlebench_folder(tmp_path / "mleb")
    cfg = _cfg(["env=mlebench", f"env.data_dir={data}", "eval.split=validation", f"env.validation=[{THREE_LITE[1]}]"])
    train, held = load_competitions(cfg)
    assert [c.comp_id for c in held] == [THREE_LITE[1]]
    assert sorted(c.comp_id for c in train) == sorted({*THREE_LITE} - {THREE_LITE[1]})
    builtin_train, builtin_val = load_competitions(_cfg(["eval.split=validation"]))
    default_val = ["friedman-response", "moons-noisy", "gaussian-quantiles"]
    assert [c.comp_id for c in builtin_val] == default_val
    assert len(builtin_train) == 9 and not {c.comp_id for c in builtin_train} & set(default_val)
    with pytest.raises(ValueError, match=r"env.validation.*'digits-parity'"):
        load_competitions(_cfg(["eval.split=validation", "env.validation=[digits-parity]"]))
    with pytest.raises(ValueError, match="eval.split='test'"):
        load_competitions(_cfg(["eval.split=test"]))
