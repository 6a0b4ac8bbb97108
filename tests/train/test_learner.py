"""The learner's train_step: sharded vs unsharded, micro-batch accumulation, loss terms vs NumPy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import TINY, TINY_DENSE, init_params
from ace.models.sharding import make_mesh
from ace.models.qwen3 import forward
from ace.train.batches import Batch, make_batch
from ace.train.learner import (LearnerConfig, init_learner, jit_train_step, learner_logprobs, ppo_update,
                               routing_disagreement, shard_state, train_step)
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


def test_proximal_from_step_equals_recomputed_proximal_logprobs():
    # One optimizer step per batch: taking the proximal logprobs from the step's own forward must give
    # the update that recomputing them with learner_logprobs gives (MoE, 2 micro-batches, with TIS).
    cfg = LearnerConfig(lr=1e-3, total_steps=10, micro_batches=2, tis_cap=2.0, kl_coef=0.1)
    state = init_learner(init_params(MOE, jax.random.key(3)), cfg, jax.random.key(1))
    batch = _batch(5)
    batch = batch.replace(ref_logp=batch.rollout_logp + 0.05)
    recomputed = batch.replace(old_logp=learner_logprobs(state.params, batch, config=cfg, model_config=MOE))
    want_state, want = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=MOE))(state, recomputed)
    in_step = dataclasses.replace(cfg, proximal_from_step=True)
    # old_logp left at the behaviour logprobs: proximal_from_step must not read it.
    got_state, got = jax.jit(lambda s, b: train_step(s, b, config=in_step, model_config=MOE))(state, batch)
    _assert_trees_close(got_state.params, want_state.params, atol=1e-6)
    for name in ("loss", "pg_loss", "kl", "grad_norm", "ratio_max", "ratio_min", "clip_frac"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="LearnerConfig.proximal_from_step"):
        LearnerConfig(minibatches=2, proximal_from_step=True)


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


def test_entropy_metric_and_bonus_match_full_logits_at_the_sampling_temperature():
    """entropy = token mean over the loss mask of −Σ p log p with p = softmax(logits / T) from the
    full forward logits; the bonus subtracts entropy_coef · entropy from the loss."""
    params = init_params(DENSE, jax.random.key(5))
    temperature = 0.7
    cfg = LearnerConfig(lr=1e-3, total_steps=10, temperature=temperature, entropy_coef=0.3, aux_loss_coef=0.0)
    batch = _batch(3)
    batch = batch.replace(old_logp=np.asarray(learner_logprobs(params, batch, config=cfg, model_config=DENSE)))
    state = init_learner(params, cfg, jax.random.key(0))
    _, metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(state, batch)
    logits, _ = forward(params, DENSE, jnp.asarray(batch.tokens), jnp.asarray(batch.positions))
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    mask = batch.loss_mask != 0
    np.testing.assert_allclose(float(metrics["entropy"]), entropy[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["pg_loss"]) - 0.3 * entropy[mask].mean(),
                               rtol=1e-5, atol=1e-6)
    # The proximal logprobs were taken at the same temperature: every ratio is 1.
    np.testing.assert_allclose(float(metrics["ratio_max"]), 1.0, atol=1e-5)


def test_constant_norm_len_normalises_by_batch_times_norm_len():
    params = init_params(DENSE, jax.random.key(6))
    cfg = LearnerConfig(lr=1e-3, total_steps=10, agg="seq_mean_token_sum_norm", norm_len=40, micro_batches=2,
                        aux_loss_coef=0.0)
    batch = _batch(4)
    batch = batch.replace(old_logp=np.asarray(learner_logprobs(params, batch, config=cfg, model_config=DENSE)))
    _, metrics = jax.jit(lambda s, b: train_step(s, b, config=cfg, model_config=DENSE))(
        init_learner(params, cfg, jax.random.key(0)), batch)
    want = -np.sum(batch.advantages[:, None] * batch.sample_weights[:, None] * batch.loss_mask) / (8 * 40)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="norm_len"):
        LearnerConfig(norm_len=40)  # only meaningful for seq_mean_token_sum_norm


def test_ppo_update_takes_one_step_per_minibatch_against_the_same_proximal_logprobs():
    """minibatches=2 equals two train_steps on rows 0,2,4,.. then 1,3,5,.. with the proximal
    logprobs of the start; the second step's ratio is no longer 1, so the clip can act."""
    params = init_params(DENSE, jax.random.key(7))
    cfg = LearnerConfig(lr=3e-2, total_steps=10, minibatches=2, eps_low=0.01, eps_high=0.01, aux_loss_coef=0.0)
    batch = _batch(5)
    batch = batch.replace(old_logp=np.asarray(learner_logprobs(params, batch, config=cfg, model_config=DENSE)))
    state = init_learner(params, cfg, jax.random.key(0))
    got_state, metrics = jax.jit(lambda s, b: ppo_update(s, b, config=cfg, model_config=DENSE))(state, batch)
    one = dataclasses.replace(cfg, minibatches=1)
    step = jax.jit(lambda s, b: train_step(s, b, config=one, model_config=DENSE))
    halves = [jax.tree.map(lambda x: None if x is None else np.asarray(x)[i::2], batch) for i in (0, 1)]
    want_state, m0 = step(state, halves[0])
    want_state, m1 = step(want_state, halves[1])
    _assert_trees_close(got_state.params, want_state.params, atol=1e-6)
    assert int(got_state.step) == 2
    np.testing.assert_allclose(float(metrics["loss"]), (float(m0["loss"]) + float(m1["loss"])) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(m0["ratio_max"]), 1.0, atol=1e-5)
    assert abs(float(m1["ratio_mean"]) - 1.0) > 1e-4 and float(m1["clip_frac"]) > 0
    assert float(metrics["tokens"]) == float(m0["tokens"]) + float(m1["tokens"])
    with pytest.raises(ValueError, match="not a multiple of minibatches"):
        ppo_update(state, _batch(5, n=6), config=dataclasses.replace(cfg, minibatches=4), model_config=DENSE)


def test_sharded_ppo_update_with_minibatches_equals_unsharded():
    cfg = LearnerConfig(lr=1e-3, total_steps=10, minibatches=2, micro_batches=2, adam_eps=1e-6, tis_cap=2.0)
    state = init_learner(init_params(MOE, jax.random.key(0)), cfg, jax.random.key(1))
    batch = _batch(6)
    want_state, want = jax.jit(lambda s, b: ppo_update(s, b, config=cfg, model_config=MOE))(state, batch)
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    got_state, got = jit_train_step(cfg, MOE, mesh)(shard_state(state, cfg, MOE, mesh), batch)
    assert int(got_state.step) == 2
    _assert_trees_close(got_state.params, want_state.params, atol=1e-6)
    for name in ("loss", "grad_norm", "entropy", "clip_frac", "ratio_max"):
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_routing_disagreement_counts_token_layer_pairs_whose_expert_sets_differ():
    rng = np.random.default_rng(0)
    given = np.stack([rng.permutation(6)[:2] for _ in range(3 * 2 * 4)]).reshape(3, 2, 4, 2)
    own = given[..., ::-1].copy()  # the same sets in another order never count
    own[0, 0, 1] = [5, 4] if set(given[0, 0, 1]) != {4, 5} else [0, 1]
    own[2, 1, 3, 0] = [x for x in range(6) if x not in given[2, 1, 3]][0]
    own[1, 1, 0, 1] = [x for x in range(6) if x not in given[1, 1, 0]][0]  # outside the mask below
    mask = np.ones((2, 4), np.float32)
    mask[1, 0] = 0
    got = float(routing_disagreement(jnp.asarray(given), jnp.asarray(own), jnp.asarray(mask)))
    np.testing.assert_allclose(got, 2 / (3 * 7))


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
