"""The AceGRPO loop on a toy environment: exact resume, buffer switches, batch math, async mode, metrics.

The toy environment is deterministic and cheap (no sandbox): an action's reward is the fraction of
'a' characters in the model's text, so a random tiny policy gets varied rewards and GRPO has signal.
"""
import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from ace.curriculum import CurriculumConfig
from ace.env.agent import AgentState, StepRecord
from ace.env.gym import StepOutcome
from ace.models import init_params
from ace.models.configs import TINY_DENSE
from ace.models.tokenizer import train_tiny_tokenizer
from ace.rollout.jax_sampler import JaxSampler
from ace.train.metrics import curriculum_metrics, group_metrics, plot_training, read_jsonl
from ace.train.tasks import curriculum_index
from ace.train.trainer import AceTrainer, TrainerConfig

MODEL = TINY_DENSE.replace(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=64, max_position_embeddings=128)
PROMPT_TOKENS, NEW_TOKENS = 48, 8
COMPS = [types.SimpleNamespace(comp_id=f"toy-{i}") for i in range(3)]


class ToyEnv:
    """MLEEnv's interface with a text reward: the fraction of 'a' in the action; >= 0.2 is 'valid'."""

    def __init__(self, comp, max_steps=2):
        self.comp, self.max_steps, self.state = comp, max_steps, None

    def reset(self, state=None):
        self.state = state or AgentState.initial(self.comp.comp_id, max_steps=self.max_steps)

    def messages(self, count_tokens=None, max_prompt_tokens=None):
        return [{"role": "user", "content": f"{self.comp.comp_id} step {self.state.step} a b"}]

    def step(self, text):
        frac = text.count("a") / max(len(text), 1)
        valid = frac >= 0.2
        rec = StepRecord("execute_code", text, valid=valid, score=frac if valid else None,
                         duration_s=1.0 + len(text))  # a text-determined "execution time"
        better = valid and (self.state.best_score is None or frac > self.state.best_score)
        best = dict(best_score=frac, best_code=text, best_step=self.state.step) if better else {}
        after = dataclasses.replace(self.state, step=self.state.step + 1, history=self.state.history + (rec,), **best)
        self.state = after
        grade = types.SimpleNamespace(medal="bronze" if frac >= 0.5 else None, valid=valid, score=frac)
        return StepOutcome(state_after=after, observation="", reward=frac, done=after.done,
                           grade=grade if valid else None, exec=None, duration_s=rec.duration_s, milestones=frozenset(),
                           outcome="valid" if valid else "runtime_error")

    def final_grade(self):
        return None

    best_grade = None

    def close(self):
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(["toy-0 step 0 a b aaaa bbb abab"] * 4, 300)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0))


def _cfg(**kw):
    base = dict(steps=3, group_size=4, tasks_per_step=2, lr=3e-3, max_new_tokens=NEW_TOKENS,
                max_prompt_tokens=PROMPT_TOKENS, max_steps=2, sync=True, checkpoint_every=1, stepwise=True,
                warmup_steps=0, schedule="constant", workers=2, exec_workers=1)
    base.update(kw)
    return TrainerConfig.from_keys(**base)


CURRICULUM = CurriculumConfig(sampler="learnability", potential="success_variance", temperature=0.1,
                              uniform_mix=0.1, optimistic_value=0.25, capacity=32, max_depth=3)


def _trainer(cfg, params, tokenizer, out_dir, curriculum=CURRICULUM):
    engine = JaxSampler(params, MODEL, max_batch=cfg.group_size, max_prompt_len=PROMPT_TOKENS,
                        max_new_tokens=NEW_TOKENS, prompt_buckets=(), seed=0)
    return AceTrainer(cfg, curriculum, params=params, model_config=MODEL, tokenizer=tokenizer, comps=COMPS,
                      engine=engine, env_factory=ToyEnv, out_dir=out_dir, progress=False)


DETERMINISTIC_KEYS = ("reward_mean", "reward_std", "valid_rate", "loss", "pg_loss", "grad_norm", "table_size",
                      "lp_mean", "learner_rows", "rollout_tokens")


def test_resumed_run_next_step_equals_uninterrupted_run(tmp_path, params, tokenizer):
    cfg = _cfg(steps=2)
    full = _trainer(cfg, params, tokenizer, tmp_path / "full")
    full_history = full.run()
    assert len(full_history) == 2
    killed = _trainer(cfg, params, tokenizer, tmp_path / "killed")
    assert len(killed.run(stop_after=1)) == 1  # the process "dies" right after the step-1 checkpoint
    resumed = _trainer(cfg, params, tokenizer, tmp_path / "killed")
    resumed_history = resumed.run(resume=True)
    assert len(resumed_history) == 1 and resumed.step == 2
    for key in DETERMINISTIC_KEYS:
        assert resumed_history[0][key] == pytest.approx(full_history[1][key], rel=1e-5, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(full.learner.params), jax.tree.leaves(resumed.learner.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full.learner.opt_state), jax.tree.leaves(resumed.learner.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(full.table.task_id), np.asarray(resumed.table.task_id))
    np.testing.assert_allclose(np.asarray(full.table.reward_mean), np.asarray(resumed.table.reward_mean), rtol=1e-6)
    assert full.store.state_dict() == resumed.store.state_dict()
    assert np.array_equal(np.asarray(full.key), np.asarray(resumed.key))
    # The resumed run appends to the killed run's metrics file: steps 1..2 exactly once.
    assert [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == [1, 2]


def test_one_step_batch_math_children_and_the_no_buffer_switch(tmp_path, params, tokenizer):
    trainer = _trainer(_cfg(steps=1, duration_weighting=True, advantage="grpo"), params, tokenizer, tmp_path / "a")
    seen, captured = {}, []
    step, rollout = trainer._train_step, trainer.rollout_group

    def spy_step(state, batch):
        seen["batch"] = batch
        return step(state, batch)

    def spy_rollout(engine, task, seed):
        captured.append((rollout(engine, task, seed), task))
        return captured[-1][0]

    trainer._train_step, trainer.rollout_group = spy_step, spy_rollout
    history = trainer.run()
    groups = [g for g, _ in captured]

    # GRPO advantages and duration weights against NumPy formulas.
    batch = seen["batch"]
    rewards = np.asarray([[s.reward for s in g.samples] for g in groups], np.float64)
    durations = np.asarray([[s.duration_s for s in g.samples] for g in groups], np.float64)
    centred = rewards - rewards.mean(1, keepdims=True)
    std = rewards.std(1, ddof=1, keepdims=True)
    expected_adv = np.where(std > 0, centred / np.where(std > 0, std + 1e-6, 1.0), 0.0).ravel()
    n = rewards.size
    np.testing.assert_allclose(np.asarray(batch.advantages)[:n], expected_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.sample_weights)[:n], (durations / durations.mean()).ravel(),
                               rtol=1e-5)
    # Step-wise mode: one row per rollout, padded to the fixed N*G rows with zero weight.
    assert batch.tokens.shape == (trainer.rows_per_batch, PROMPT_TOKENS + NEW_TOKENS)
    assert np.all(np.asarray(batch.sample_weights)[n:] == 0)

    # Each rollout executed one step from a root (max_steps=2, so not final): every distinct
    # resulting state is a depth-1 child of the root it came from.
    table = trainer.table
    live = np.asarray(table.valid)
    depths, parents = np.asarray(table.depth)[live], np.asarray(table.parent_id)[live]
    distinct = {s.extra["children"][0][1].state_key() for g in groups for s in g.samples}
    assert history[0]["table_size"] == live.sum() == len(COMPS) + len(distinct)
    assert set(depths) == {0, 1}
    assert set(parents[depths == 1]) == {t.task_id for _, t in captured}
    trainer.store.check_consistent(table)
    visits = np.asarray(table.visits)[live][depths == 0]
    assert sorted(visits) == sorted([0] * (len(COMPS) - len(groups)) + [trainer.cfg.group_size] * len(groups))

    # The same groups leave the table alone under the no_buffer ablation (stats still update).
    no_buffer = _trainer(_cfg(steps=1, children=False), params, tokenizer, tmp_path / "b")
    no_buffer.apply_groups(groups, {id(g): t for g, t in captured})
    assert int(np.asarray(no_buffer.table.valid).sum()) == len(COMPS)
    assert int(np.asarray(no_buffer.table.visits).sum()) == trainer.cfg.group_size * len(groups)

    # The trainer's curriculum runs through the block index by default; the full-table functions
    # leave the same table and store from the same groups, and the index stays that of the table.
    full_path = _trainer(_cfg(steps=1), params, tokenizer, tmp_path / "c",
                         curriculum=dataclasses.replace(CURRICULUM, block_index=False))
    assert trainer.index is not None and full_path.index is None
    full_path.apply_groups(groups, {id(g): t for g, t in captured})
    for name, a, b in zip(table._fields, trainer.table, full_path.table):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert trainer.store.state_dict() == full_path.store.state_dict()
    fresh = curriculum_index(trainer.table, CURRICULUM)
    for name in ("block_logz", "block_valid", "block_evict", "super_logz", "super_valid", "super_evict"):
        np.testing.assert_array_equal(np.asarray(getattr(trainer.index, name)), np.asarray(getattr(fresh, name)))


def test_episode_mode_trains_on_every_turn_and_async_mode_runs(tmp_path, params, tokenizer):
    cfg = _cfg(steps=2, stepwise=False, sync=False, children=False)
    trainer = _trainer(cfg, params, tokenizer, tmp_path,
                       curriculum=dataclasses.replace(CURRICULUM, sampler="uniform", uniform_mix=1.0))
    history = trainer.run()
    assert len(history) == 2 and trainer.version == 2
    for m in history:
        # Whole episodes from initial states (no children) of max_steps=2 actions: 2 rows per rollout.
        assert m["learner_rows"] == cfg.tasks_per_step * cfg.group_size * 2
        assert 0.0 <= m["learner_idle_fraction"] <= 1.0
        assert m["staleness_mean"] >= 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("reward_mean", "reward_std", "valid_rate", "medal_rate", "table_size", "depth_0", "lp_mean",
                "staleness_mean", "learner_idle_fraction", "tokens_per_s", "step_time_s"):
        assert key in records[-1], key
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_the_loop_raises_the_toy_reward(tmp_path, params, tokenizer):
    """Sampler, curriculum, buffer and learner together: GRPO must learn to write 'a's."""
    trainer = _trainer(_cfg(steps=30, group_size=8, lr=1e-2, checkpoint_every=100), params, tokenizer, tmp_path)
    rewards = [m["reward_mean"] for m in trainer.run()]
    # A random policy writes ~5% 'a'; the trained one must clearly prefer tokens made of 'a's.
    assert np.mean(rewards[-5:]) >= np.mean(rewards[:5]) + 0.3, rewards


def test_trainer_config_rejects_bad_values_with_their_names():
    with pytest.raises(ValueError, match="group_size"):
        _cfg(group_size=1)
    with pytest.raises(ValueError, match="staleness_policy"):
        _cfg(staleness_policy="keep")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainerConfig.from_cfg({"train": {"bogus": 1}, "rollout": {}, "env": {}, "ablation": {}, "seed": 0})
    # The learner's settings are checked by LearnerConfig, but named by the train.* key the user wrote.
    with pytest.raises(ValueError, match=r"^train\.loss_agg='sum'"):
        _cfg(loss_agg="sum")
    with pytest.raises(ValueError, match=r"^train\.micro_batches=0"):
        _cfg(micro_batches=0)
    with pytest.raises(ValueError, match=r"^rollout\.temperature=-1"):
        _cfg(temperature=-1.0)


def test_trainer_config_holds_the_learner_config_of_the_train_keys():
    cfg = _cfg(steps=5, lr=1e-3, loss_agg="seq_mean_token_sum_norm", adam_mu_dtype="bfloat16", temperature=0.7)
    learner = cfg.learner
    assert (learner.lr, learner.agg, learner.mu_dtype, learner.temperature) == (1e-3, "seq_mean_token_sum_norm",
                                                                                "bfloat16", 0.7)
    assert learner.total_steps == 5 and learner.norm_len == NEW_TOKENS  # Dr. GRPO's constant: the longest action
    with pytest.raises(ValueError, match="rollout.temperature"):  # one distribution for every logprob
        dataclasses.replace(cfg, temperature=1.0)


def test_group_metrics_match_numpy():
    rewards = np.array([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    outcomes = [["valid", "runtime_error", "valid"], ["invalid"] * 3]
    medals = [["gold", None, None], [None] * 3]
    m = group_metrics(rewards, outcomes, medals, np.array([[1, 0, 1], [0, 0, 0]], bool))
    assert m["reward_mean"] == pytest.approx(rewards.mean())
    assert m["reward_std"] == pytest.approx(rewards.std())
    assert m["zero_variance_frac"] == 0.5
    assert m["valid_rate"] == pytest.approx(2 / 6) and m["medal_rate"] == pytest.approx(1 / 6)
    assert m["outcome_invalid"] == pytest.approx(0.5)
    assert "reward_mean_depth0" not in m  # without depths, no split


def test_group_metrics_split_initial_states_from_deeper_ones():
    rng = np.random.default_rng(2)
    rewards = rng.normal(size=(5, 4))
    outcomes = [[("valid", "invalid", "runtime_error")[j] for j in rng.integers(0, 3, 4)] for _ in range(5)]
    depths = np.array([0, 2, 0, 1, 3])
    m = group_metrics(rewards, outcomes, [[None] * 4] * 5, np.zeros((5, 4), bool), depths=depths)
    valid = np.array([[o == "valid" for o in row] for row in outcomes], float)
    assert m["reward_mean_depth0"] == pytest.approx(rewards[[0, 2]].mean())
    assert m["reward_mean_deeper"] == pytest.approx(rewards[[1, 3, 4]].mean())
    assert m["valid_rate_depth0"] == pytest.approx(valid[[0, 2]].mean())
    assert m["valid_rate_deeper"] == pytest.approx(valid[[1, 3, 4]].mean())
    only_initial = group_metrics(rewards, outcomes, [[None] * 4] * 5, np.zeros((5, 4), bool), depths=[0] * 5)
    assert "reward_mean_deeper" not in only_initial and only_initial["reward_mean_depth0"] == pytest.approx(
        rewards.mean())
    with pytest.raises(ValueError, match="depths must be"):
        group_metrics(rewards, outcomes, [[None] * 4] * 5, np.zeros((5, 4), bool), depths=[0, 1])


def test_curriculum_metrics_depth_histogram_matches_brute_force():
    rng = np.random.default_rng(0)
    valid = rng.random(20) < 0.7
    depth = rng.integers(0, 6, 20)
    table = types.SimpleNamespace(valid=valid, depth=depth, visits=rng.integers(0, 3, 20))
    lp = rng.random(20)
    m = curriculum_metrics(table, lp, np.array([0, 3]), max_depth=4)
    for d in range(5):
        expected = sum(1 for v, x in zip(valid, depth) if v and min(x, 4) == d)
        assert m[f"depth_{d}"] == expected
    assert m["table_size"] == valid.sum()
    assert m["lp_mean"] == pytest.approx(lp[valid].mean())
    assert m["lp_sampled_mean"] == pytest.approx(lp[[0, 3]].mean())
    assert (m["lp_sampled_min"], m["lp_sampled_max"]) == (pytest.approx(lp[[0, 3]].min()), pytest.approx(lp[[0, 3]].max()))
    assert m["lp_q50"] == pytest.approx(np.median(lp[valid]))
    assert m["sampled_depth_mean"] == pytest.approx(depth[[0, 3]].mean())
    for d in range(5):
        assert m[f"sampled_depth_{d}"] == sum(min(depth[r], 4) == d for r in (0, 3))


def test_plot_training_writes_a_png(tmp_path):
    records = [{"step": i, "reward_mean": -1 + i / 10, "valid_rate": i / 20, "table_size": 3 + i, "lp_mean": 0.1,
                "reward_mean_depth0": -1 + i / 8, "sampled_depth_mean": i / 5} for i in range(1, 11)]
    before = {"valid_rate": 0.1, "steps_to_first_valid_censored": 7.0, "mean_reward": -1.5}
    after = {"valid_rate": 0.3, "steps_to_first_valid_censored": 3.0, "mean_reward": -0.5}
    out = plot_training(records, before, after, tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(records)


def test_kl_reference_sharded_learner_sync_every_and_after_publish(tmp_path, params, tokenizer):
    """kl_coef > 0 keeps a frozen reference (the initial params); the learner state lives on the mesh;
    weights go out every `sync_every` steps and at the last one, each push followed by the hook."""
    from ace.models.sharding import make_mesh

    mesh = make_mesh({"fsdp": -1})
    pushes = []

    def after_publish(version, pushed):
        pushes.append(version)
        return {"hook_param_sum": float(sum(np.sum(np.asarray(x)) for x in jax.tree.leaves(pushed)))}

    cfg = _cfg(steps=3, kl_coef=0.05, kl_kind="k3", sync_every=2)
    engine = JaxSampler(params, MODEL, max_batch=cfg.group_size, max_prompt_len=PROMPT_TOKENS,
                        max_new_tokens=NEW_TOKENS, prompt_buckets=(), seed=0)
    trainer = AceTrainer(cfg, CURRICULUM, params=params, model_config=MODEL, tokenizer=tokenizer, comps=COMPS,
                         engine=engine, env_factory=ToyEnv, out_dir=tmp_path, progress=False, mesh=mesh,
                         after_publish=after_publish)
    assert all(x.sharding.num_devices == len(jax.devices()) for x in jax.tree.leaves(trainer.learner.params))
    history = trainer.run()
    # Step 1 trains the reference itself: KL 0 (to rounding). Afterwards the policy has moved away from it.
    assert abs(history[0]["kl"]) < 1e-10 and history[2]["kl"] > 1e-8
    for a, b in zip(jax.tree.leaves(trainer.ref_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert pushes == [2, 3] and engine.weight_version == 3
    assert history[0]["weight_push_s"] == 0.0 and "hook_param_sum" in history[1] and "hook_param_sum" in history[2]
    want = float(sum(np.sum(np.asarray(x, np.float32)) for x in jax.tree.leaves(trainer.learner.params)))
    assert history[2]["hook_param_sum"] == pytest.approx(want, rel=1e-5)


MOE_MODEL = MODEL.replace(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                          tie_word_embeddings=False)


def test_off_policy_machinery_on_an_moe_policy(tmp_path, tokenizer, monkeypatch):
    """Async MoE run at temperature 0.7 with routing replay, two minibatches, an entropy bonus, dual
    clip, stale groups down-weighted: the proximal logprobs are the learner's own at the sampling
    temperature with the engine's routing replayed, and every off-policy metric is logged."""
    import ace.train.loops as loops_mod
    from ace.train.learner import learner_logprobs

    queues = []

    class RecordingQueue(loops_mod.RolloutQueue):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            queues.append(self)

    monkeypatch.setattr(loops_mod, "RolloutQueue", RecordingQueue)
    params = init_params(MOE_MODEL, jax.random.key(1))
    cfg = _cfg(steps=2, sync=False, temperature=0.7, routing_replay=True, minibatches=2, entropy_coef=0.01,
               dual_clip=3.0, tis_cap=1.5, staleness_policy="reweight", staleness_decay=0.25, max_staleness=0)
    engine = JaxSampler(params, MOE_MODEL, max_batch=cfg.group_size, max_prompt_len=PROMPT_TOKENS,
                        max_new_tokens=NEW_TOKENS, prompt_buckets=(), seed=0, return_routing=True)
    trainer = AceTrainer(cfg, CURRICULUM, params=params, model_config=MOE_MODEL, tokenizer=tokenizer, comps=COMPS,
                         engine=engine, env_factory=ToyEnv, out_dir=tmp_path, progress=False)
    seen = []
    step = trainer._train_step

    def spy_step(state, batch):
        seen.append((state.params, batch))
        return step(state, batch)

    trainer._train_step = spy_step
    history = trainer.run()
    assert queues[0].reweight_decay == 0.25 and queues[0].policy == "reweight"
    lcfg = trainer.cfg.learner
    assert lcfg.temperature == 0.7 and lcfg.routing_replay and lcfg.dual_clip == 3.0
    for start_params, batch in seen:
        assert batch.routing is not None and batch.routing.shape[0] == MOE_MODEL.num_layers
        mask = np.asarray(batch.loss_mask) != 0
        # Proximal = the update's starting params, at the sampling temperature, routing replayed.
        want = np.asarray(learner_logprobs(start_params, batch, config=lcfg, model_config=MOE_MODEL))
        np.testing.assert_allclose(np.asarray(batch.old_logp)[mask], want[mask], atol=1e-5)
    # Step 1's data was sampled by the same params: behaviour = proximal to float32 rounding.
    first = seen[0][1]
    mask = np.asarray(first.loss_mask) != 0
    np.testing.assert_allclose(np.asarray(first.old_logp)[mask], np.asarray(first.rollout_logp)[mask], atol=1e-4)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("entropy", "tis_weight_mean", "tis_truncated_frac", "routing_disagreement", "clip_frac",
                "dual_clip_frac", "kl"):
        assert key in records[-1], key
    assert history[0]["entropy"] > 0
    assert all(0.0 <= m["routing_disagreement"] <= 1.0 for m in history)
    # Step 1's routing is the sampler's own: the learner's routers, before any step, agree with it.
    from ace.models.qwen3 import forward
    from ace.train.learner import routing_disagreement
    _, aux = forward(seen[0][0], MOE_MODEL, first.tokens, first.positions, return_routing=True)
    assert float(routing_disagreement(first.routing, aux.routing, first.loss_mask)) == 0.0
