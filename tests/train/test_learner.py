"""The learner's train_step: sharded vs unsharded, micro-batch accumulation, loss terms vs NumPy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import TINY, TINY_DENSE, init_params
from ace.models.sharding import make_mesh
from ace.train.learner import (Batch, LearnerConfig, init_learner, jit_train_step, learner_logprobs, make_batch,
                               shard_state, train_step)
from ace.train.queue import Sample

MOE = TINY.replace(vocab_size=64)
DENSE = TINY_DENSE.replace(vocab_size=64)
PAD = 12


def _samples(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c = int(rng.integers(1, 4)), int(rng.integers(0, 7))
        out.append(Sample(task_id=i // 4, prompt_ids=rng.integers(0, 64, p).tolist(),
                          output_ids=rng.integers(0, 64, c).tolist(),
                          rollout_logprobs=(-4 - rng.random(c)).tolist(), reward=0.0, duration_s=1.0,
                          policy_version=0))
    return out


def _batch(seed: int, n: int = 8) -> Batch:
    rng = np.random.default_rng(seed + 100)
    return make_batch(_samples(seed, n), rng.normal(size=n), pad_to=PAD,
                      sample_weights=rng.uniform(0.5, 1.5, n))


def test_make_batch_aligns_completion_tokens_with_the_position_that_predicts_them():
    s = Sample(task_id=0, prompt_ids=[7, 8, 9], output_ids=[4, 5], rollout_logprobs=[-1.0, -2.0], reward=1.0,
               duration_s=0.0, policy_version=0)
    empty = dataclasses.replace(s, output_ids=[], rollout_logprobs=[])
    b = make_batch([s, empty], [0.5, -0.5], pad_to=6)
    np.testing.assert_array_equal(b.tokens, [[7, 8, 9, 4, 5, 0], [7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 1, 0, 0], [0] * 6])
    # Column t holds the logprob of tokens[t + 1]: token 4 (index 3) is predicted at column 2.
    np.testing.assert_array_equal(b.rollout_logp, [[0, 0, -1, -2, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b.old_logp, b.rollout_logp)
    np.testing.assert_array_equal(b.sample_weights, [1, 1])
    with pytest.raises(ValueError, match="5 tokens, more than pad_to=4"):
        make_batch([s], [0.0], pad_to=4)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(2,\)"):
        make_batch([s, s], [0.0], pad_to=6)


def test_learner_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="LearnerConfig.agg"):
        LearnerConfig(agg="sum")
    with pytest.raises(ValueError, match="LearnerConfig.eps_low"):
        LearnerConfig(eps_low=1.5)
    with pytest.raises(ValueError, match="LearnerConfig.kl_kind"):
        LearnerConfig(kl_kind="k9")
    with pytest.raises(ValueError, match="LearnerConfig.compute_dtype"):
        LearnerConfig(compute_dtype="float16")


def _assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4, err_msg=str(path))


@pytest.fixture(scope="module")
def moe_reference():
    cfg = LearnerConfig(lr=1e-3, total_steps=10, micro_batches=2, adam_eps=1e-6, eps_high=0.28, tis_cap=2.0)
    state = init_learner(init_params(MOE, jax.random.key(0)), cfg, jax.random.key(1))
    batch = _batch(0)
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=MOE))(state, batch)
    return cfg, state, batch, new_state, metrics


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "expert": 4}, {"fsdp": 8}])
def test_sharded_train_step_equals_unsharded(moe_reference, mesh_shape):
    cfg, state, batch, want_state, want_metrics = moe_reference
    mesh = make_mesh(mesh_shape)
    step = jit_train_step(cfg, MOE, mesh)
    got_state, got_metrics = step(shard_state(state, cfg, MOE, mesh), batch)
    gate = got_state.params["layers"]["mlp"]["gate_proj"]
    assert len(gate.sharding.device_set) == 8 and not gate.sharding.is_fully_replicated
    assert int(got_state.step) == 1
    _assert_trees_close(got_state.params, want_state.params, atol=1e-6)
    _assert_trees_close(got_state.opt_state, want_state.opt_state, atol=1e-6)
    assert set(got_metrics) == set(want_metrics)
    for name in want_metrics:
        np.testing.assert_allclose(float(got_metrics[name]), float(want_metrics[name]), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


@pytest.fixture(scope="module")
def dense_reference():
    """One float32 step on the whole batch at once: the reference for accumulation and bfloat16."""
    params = init_params(DENSE, jax.random.key(2))
    batch = _batch(1)
    cfg = LearnerConfig(lr=1e-3, total_steps=10, micro_batches=1, agg="seq_mean_token_mean", adam_eps=1e-6)
    state = init_learner(params, cfg, jax.random.key(0))
    return cfg, state, batch, jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(state, batch)


def test_four_micro_batches_equal_one_big_batch(dense_reference):
    cfg, state, batch, (one_state, one_metrics) = dense_reference
    cfg = dataclasses.replace(cfg, micro_batches=4)
    acc_state, acc_metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(state, batch)
    _assert_trees_close(acc_state.params, one_state.params, atol=1e-6)
    for name in ("loss", "pg_loss", "grad_norm", "approx_kl", "ratio_mean", "ratio_max", "ratio_min", "clip_frac"):
        np.testing.assert_allclose(float(acc_metrics[name]), float(one_metrics[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_bfloat16_compute_keeps_float32_masters_and_tracks_the_float32_loss(dense_reference):
    cfg, state, batch, (_, f32_metrics) = dense_reference
    cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
    np.testing.assert_allclose(float(metrics["loss"]), float(f32_metrics["loss"]), rtol=3e-2)
    assert not np.allclose(float(metrics["loss"]), float(f32_metrics["loss"]), rtol=1e-7, atol=0)


def test_on_policy_loss_and_kl_term_match_numpy():
    """With old_logp = the learner's own logprobs every ratio is 1, so the token-mean GRPO loss is
    -sum(A_b * w_b * mask) / sum(mask); the KL term is the k3 estimate against the reference logprobs."""
    params = init_params(DENSE, jax.random.key(3))
    ref_params = init_params(DENSE, jax.random.key(4))
    cfg = LearnerConfig(lr=1e-3, total_steps=10, micro_batches=2, kl_coef=0.5, kl_kind="k3", aux_loss_coef=0.0)
    batch = _batch(2)
    logp = np.asarray(learner_logprobs(params, batch, config=cfg, model_config=DENSE))
    ref = np.asarray(learner_logprobs(ref_params, batch, config=cfg, model_config=DENSE))
    batch = batch.replace(old_logp=logp, ref_logp=ref)
    state = init_learner(params, cfg, jax.random.key(0))
    _, metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(state, batch)
    mask = batch.loss_mask
    want_pg = -np.sum(batch.advantages[:, None] * batch.sample_weights[:, None] * mask) / mask.sum()
    log_r = (ref - logp)[mask != 0]
    want_kl = np.mean(np.exp(log_r) - 1 - log_r)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want_pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), want_pg + 0.5 * want_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()


def test_train_step_rejects_inconsistent_batches():
    params = init_params(DENSE, jax.random.key(0))
    state = init_learner(params, LearnerConfig(micro_batches=3), jax.random.key(0))
    with pytest.raises(ValueError, match="not a multiple of micro_batches=3"):
        train_step(state, _batch(0), config=LearnerConfig(micro_batches=3), model_config=DENSE)
    with pytest.raises(ValueError, match="needs Batch.ref_logp"):
        train_step(state, _batch(0), config=LearnerConfig(kl_coef=0.1), model_config=DENSE)
    bad = _batch(0).replace(advantages=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"Batch.advantages must be \[B\]"):
        train_step(state, bad, config=LearnerConfig(), model_config=DENSE)
