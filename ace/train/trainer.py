"""The AceGRPO loop: curriculum → rollouts → Evolving Data Buffer → queue → GRPO learner → weights.

One learner step:
  1. the learnability sampler draws N tasks from the TaskTable (initial states and the children
     earlier steps produced);
  2. each task gets a group of G rollouts from its state: one action (step-wise mode, the
     step-wise RL of ML-Agent) or a whole episode;
  3. the buffer updates the stats of the sampled tasks and inserts every executed step's resulting
     state as a child task (unless the `no_buffer` ablation switches children off);
  4. group-relative advantages (optionally duration-weighted) feed one GRPO update: the learner
     recomputes the proximal logprobs of the batch once (the params before the update, at the
     sampling temperature, replaying the engine's MoE routing when `routing_replay`), then takes
     `minibatches` optimizer steps clipped against them, each token weighted by the truncated
     behaviour weight min(π_prox / π_behav, tis_cap) (decoupled PPO, `ace.rl.losses`);
  5. the learner publishes its weights as version step + 1.

Asynchronous mode runs step 2 on the RolloutPool's worker threads, which draw tasks themselves and
push whole groups to the bounded-staleness RolloutQueue while the learner trains. Synchronous mode
(the `sync` ablation) draws the N tasks in the learner's thread, rolls them out with the current
weights and seeds derived from the trainer's RNG, then trains: it is deterministic given the
checkpointed state, which the resume test relies on.

A checkpoint holds the learner state (params, optimizer, step, RNG), the TaskTable, the trainer's
RNG key (arrays, via orbax) and the TaskStore plus counters (JSON metadata).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ace.curriculum import (CurriculumConfig, get_sampler, init_table, insert, learnability, make_rows, state_hash,
                            update_stats)
from ace.curriculum.buffer import ADDED
from ace.curriculum.store import TaskPayload, TaskStore
from ace.env.agent import AgentState, PromptConfig
from ace.env.reward import RewardConfig
from ace.models.checkpoint import Checkpointer
from ace.models.configs import ModelConfig
from ace.rl import duration_weights, group_advantages
from ace.train.episodes import run_lockstep
from ace.train.learner import init_learner, jit_logprobs, jit_train_step, make_batch, shard_state
from ace.train.metrics import MetricsLogger, curriculum_metrics, group_metrics
from ace.train.multihost import (barrier, broadcast_object, is_controller, localize, multi_process, replicate,
                                tree_to_host)
from ace.train.pool import RolloutPool
from ace.train.queue import Group, QueueClosed, RolloutQueue, Sample
from ace.train.trainer_config import TrainerConfig

EXECUTED = ("runtime_error", "invalid", "validated", "valid")
POOL_STOP_TIMEOUT_S = 600.0
SEQ_BUCKET = 512  # learner rows are padded to a multiple of this many tokens (few compiles)
_MEDAL_ORDER = {None: 0, "bronze": 1, "silver": 2, "gold": 3}


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """A task drawn from the table: its row at draw time, id, competition index, depth and state."""

    row: int
    task_id: int
    comp_index: int
    depth: int
    state: AgentState | None  # None: the competition's initial state


def _episode_outcome(steps) -> str:
    outcomes = [s.outcome for s in steps]
    return "valid" if "valid" in outcomes else outcomes[-1]


def _episode_medal(steps) -> str | None:
    medals = [s.grade.medal for s in steps if s.outcome == "valid" and s.grade is not None]
    return max(medals, key=lambda m: _MEDAL_ORDER[m], default=None)


def _improved(steps) -> bool:
    """Learnability success: a valid submission that beats the task's own best so far."""
    return any(s.outcome == "valid" and s.state_after.best_step == s.state_before.step for s in steps)


class AceTrainer:
    """Owns the curriculum, the learner state, the engine's weights, checkpoints and metrics.

    Args:
      cfg: the loop settings.
      curriculum: sampler, potential and table settings.
      params: initial policy params (the SFT result).
      model_config: the policy's ModelConfig.
      tokenizer: renders prompts and decodes actions; `eos_id` ends a generation.
      comps: the training competitions (`ace.env.task.Competition`); index = competition id.
      engine: the RolloutEngine, holding `params` as version 0 (the trainer publishes later ones).
      env_factory: `env_factory(comp) -> env` for one rollout (an `ace.env.gym.MLEEnv` by default
        in `make_env_factory`); the trainer closes it after use.
      out_dir: metrics.jsonl, tb/ and checkpoints/ go here.
      mesh: optional mesh for the learner step; the learner state is placed on it.
      progress: show the console bar.
      ref_params: the frozen reference policy of the KL term (needed when kl_coef > 0; default:
        the initial params).
      after_publish: `after_publish(version, params) -> metrics` runs after each weight push (e.g. checks
        that every server holds the version and scores a probe sequence like the learner).
    """

    def __init__(self, cfg: TrainerConfig, curriculum: CurriculumConfig, *, params: Any, model_config: ModelConfig,
                 tokenizer: Any, comps: Sequence[Any], engine: Any, env_factory: Callable[[Any], Any],
                 out_dir: str | Path, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                 ref_params: Any = None, after_publish: Callable[[int, Any], Mapping[str, float]] | None = None):
        if not comps:
            raise ValueError("AceTrainer needs at least one training competition")
        if curriculum.capacity < len(comps):
            raise ValueError(f"curriculum.capacity={curriculum.capacity} cannot hold the {len(comps)} initial tasks")
        if cfg.tasks_per_step > len(comps):
            raise ValueError(f"train.tasks_per_step={cfg.tasks_per_step} exceeds the {len(comps)} training "
                             "competitions (the first draw is without replacement among initial states)")
        self.cfg, self.curriculum = cfg, curriculum
        self.model_config, self.tokenizer, self.comps = model_config, tokenizer, list(comps)
        self.engine, self.env_factory, self.mesh = engine, env_factory, mesh
        self.out_dir = Path(out_dir)
        self.progress = progress
        stop = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
        self.sampling = cfg.sampling(stop)
        self.sampler = get_sampler(curriculum.sampler)
        self._train_step = jit_train_step(cfg.learner, model_config, mesh)
        self._old_logp = jit_logprobs(cfg.learner, model_config, mesh)
        self.after_publish = after_publish
        self._potential = jax.jit(functools.partial(
            learnability, potential=curriculum.potential, optimistic_value=curriculum.optimistic_value))
        self.rows_per_batch = self._round_up(cfg.tasks_per_step * cfg.group_size * cfg.actions_per_rollout,
                                             cfg.learner.micro_batches * cfg.learner.minibatches)
        self.seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens
        self._lock = threading.Lock()  # the curriculum: task_source (workers) vs learner updates
        key = jax.random.PRNGKey(cfg.seed)
        learner_key, self.key = jax.random.split(key)
        self.learner = init_learner(params, cfg.learner, learner_key)
        if mesh is not None:
            self.learner = shard_state(self.learner, cfg.learner, model_config, mesh)
        # The KL reference stays frozen for the whole run (a compute-dtype copy, as the dry run counts).
        self.ref_params = None
        if cfg.learner.kl_coef > 0:
            src = params if ref_params is None else ref_params
            dtype = jnp.dtype(cfg.learner.compute_dtype)
            self.ref_params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                           src)
        self.table, self.store = self._initial_curriculum()
        self.step = 0
        self.version = int(engine.weight_version)

    @staticmethod
    def _round_up(x: int, m: int) -> int:
        return -(-x // m) * m

    # ------------------------------------------------------------------ curriculum
    def _initial_curriculum(self):
        table = init_table(self.curriculum.capacity)
        store = TaskStore()
        payloads = [TaskPayload(competition=c.comp_id) for c in self.comps]
        rows = make_rows(-1, np.arange(len(self.comps)), 0, np.stack([state_hash(p.text()) for p in payloads]))
        table, result = insert(table, rows, step=0, potential=self.curriculum.potential,
                               optimistic_value=self.curriculum.optimistic_value)
        store.apply_insert(result, payloads)
        if int(np.sum(np.asarray(result.status) == ADDED)) != len(self.comps):
            raise ValueError("two training competitions share one id; their initial tasks merged")
        return table, store

    def _draw(self, key: jax.Array, n: int) -> list[TaskRef]:
        rows = np.asarray(self.sampler(key, self.table, n, step=jnp.int32(self.step),
                                       **self.curriculum.sampler_kwargs()))
        task_ids = np.asarray(self.table.task_id)[rows]
        comp_ids = np.asarray(self.table.competition_id)[rows]
        depths = np.asarray(self.table.depth)[rows]
        out = []
        for row, tid, cid, depth in zip(rows, task_ids, comp_ids, depths):
            payload = self.store[int(tid)]
            state = AgentState.from_json(payload.prefix) if payload.prefix else None
            out.append(TaskRef(int(row), int(tid), int(cid), int(depth), state))
        return out

    def _apply_groups(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> None:
        """update_stats for the sampled tasks still in the table, then insert their children."""
        task_ids = np.asarray(self.table.task_id)
        valid = np.asarray(self.table.valid)
        sampled_rows, rewards, success = [], [], []
        for g in groups:
            hit = np.flatnonzero(valid & (task_ids == g.task_id))
            if hit.size:  # an in-flight task can be evicted before its group is back
                sampled_rows.append(int(hit[0]))
                rewards.append([s.reward for s in g.samples])
                success.append([s.extra["success"] for s in g.samples])
        if sampled_rows:
            self.table = update_stats(self.table, np.asarray(sampled_rows, np.int32), np.asarray(rewards, np.float32),
                                      np.asarray(success, bool), int(self.step))
        if not self.cfg.children:
            return
        cands: list[tuple[TaskRef, int, AgentState]] = []
        for g in groups:
            task = tasks[id(g)]
            for s in g.samples:
                for offset, state in s.extra["children"]:
                    cands.append((task, task.depth + offset, state))
        if not cands:
            return
        max_children = self.cfg.tasks_per_step * self.cfg.group_size * self.cfg.actions_per_rollout
        cands = cands[:max_children]
        payloads = [TaskPayload(competition=self.comps[t.comp_index].comp_id, prefix=st.to_json(),
                                best_code=st.best_code, best_score=st.best_score) for t, _, st in cands]
        # The hash ignores wall-clock times (state_key), so equal histories merge into one task.
        hashes = np.stack([state_hash(f"{p.competition}\x00{st.state_key()}") for p, (_, _, st) in zip(payloads, cands)])
        rows = make_rows([t.task_id for t, _, _ in cands], [t.comp_index for t, _, _ in cands],
                         [d for _, d, _ in cands], hashes, pad_to=max_children)
        # The tasks just rolled out keep their fresh stats: their rows are never evicted here.
        protected = np.full(self.cfg.tasks_per_step, -1, np.int32)
        kept = sampled_rows[:self.cfg.tasks_per_step]
        protected[:len(kept)] = kept
        self.table, result = insert(self.table, rows, step=int(self.step), protected=protected,
                                    potential=self.curriculum.potential,
                                    optimistic_value=self.curriculum.optimistic_value,
                                    max_depth=self.curriculum.max_depth)
        self.store.apply_insert(result, payloads + [None] * (max_children - len(payloads)))

    # ------------------------------------------------------------------ rollouts
    def rollout_group(self, engine: Any, task: TaskRef, seed: int) -> Group:
        """G rollouts of `task` (one action each in step-wise mode, else whole episodes) as a Group.

        Each sample's `extra` holds `turns` (prompt ids, output ids, logprobs per action),
        `outcome`, `medal`, `success` and `children` ((depth offset, state) of every executed,
        non-final step).
        """
        cfg = self.cfg
        comp = self.comps[task.comp_index]
        envs = [self.env_factory(comp) for _ in range(cfg.group_size)]
        try:
            episodes = run_lockstep(envs, [task.state] * cfg.group_size, engine, self.tokenizer,
                                    sampling=self.sampling, seeds=[seed * cfg.group_size + g for g in range(cfg.group_size)],
                                    max_prompt_tokens=cfg.max_prompt_tokens,
                                    max_actions=1 if cfg.stepwise else None, exec_workers=cfg.exec_workers,
                                    grade_final=False)
        finally:
            for env in envs:
                env.close()
        samples = []
        for ep in episodes:
            if not ep.steps:
                raise RuntimeError(f"task {task.task_id} ({comp.comp_id}) started from a finished state")
            steps = ep.steps
            children = [(i + 1, s.state_after) for i, s in enumerate(steps)
                        if s.outcome in EXECUTED and not s.state_after.done]
            samples.append(Sample(
                task_id=task.task_id, prompt_ids=steps[0].prompt_ids, output_ids=steps[0].output_ids,
                rollout_logprobs=steps[0].logprobs, reward=float(sum(s.reward for s in steps)),
                duration_s=float(sum(s.duration_s for s in steps)),
                policy_version=min(s.weight_version for s in steps),
                extra={"turns": [(s.prompt_ids, s.output_ids, s.logprobs, s.routing) for s in steps],
                       "outcome": _episode_outcome(steps), "medal": _episode_medal(steps),
                       "success": _improved(steps), "children": children}))
        return Group(task_id=task.task_id, group_size=cfg.group_size, samples=samples)

    # ------------------------------------------------------------------ learning
    def _learn(self, groups: Sequence[Group], group_weights: np.ndarray, stale: np.ndarray) -> dict[str, float]:
        cfg = self.cfg
        rewards = np.asarray([[s.reward for s in g.samples] for g in groups], np.float32)
        adv = np.asarray(group_advantages(rewards, cfg.group_size, mode=cfg.advantage).advantages)
        if cfg.duration_weighting:
            dur = np.asarray(duration_weights(np.asarray([s.duration_s for g in groups for s in g.samples]),
                                              normalize="batch_mean")).reshape(rewards.shape)
        else:
            dur = np.ones_like(rewards)
        rows, row_adv, row_w = [], [], []
        for i, g in enumerate(groups):
            for j, s in enumerate(g.samples):
                turns = s.extra["turns"]
                for prompt, output, logp, routing in turns:
                    rows.append(Sample(task_id=g.task_id, prompt_ids=prompt, output_ids=output, rollout_logprobs=logp,
                                       reward=s.reward, duration_s=s.duration_s, policy_version=s.policy_version,
                                       routing=routing))
                    row_adv.append(adv[i, j])
                    # Every turn of an episode shares its advantage; together they weigh as one sample.
                    row_w.append(dur[i, j] * group_weights[i] / len(turns))
        if len(rows) > self.rows_per_batch:
            raise RuntimeError(f"{len(rows)} learner rows exceed the fixed batch of {self.rows_per_batch}")
        pad = self.rows_per_batch - len(rows)
        filler = Sample(task_id=-1, prompt_ids=[0], output_ids=[], rollout_logprobs=[], reward=0.0, duration_s=0.0,
                        policy_version=0)
        # Rows are padded to the longest one rounded up to a bucket, not to the longest possible
        # row: attention cost grows with T^2, and a few buckets compile only a few step variants.
        longest = max(len(r.prompt_ids) + len(r.output_ids) for r in rows)
        pad_to = min(self.seq_len, self._round_up(longest, SEQ_BUCKET))
        batch = make_batch(rows + [filler] * pad, np.asarray(row_adv + [0.0] * pad, np.float32), pad_to=pad_to,
                           sample_weights=np.asarray(row_w + [0.0] * pad, np.float32))
        if cfg.learner.routing_replay and batch.routing is None:
            raise RuntimeError("train.routing_replay=true but the rollout engine returned no routing: it needs an "
                               "MoE policy and an engine asked for routed experts (rollout.return_routing)")
        if cfg.recompute_proximal:
            # The proximal policy of decoupled PPO: these params, before any step of this update.
            batch = batch.replace(old_logp=self._old_logp(self.learner.params, batch))
        if self.ref_params is not None:
            batch = batch.replace(ref_logp=self._old_logp(self.ref_params, batch))
        self.learner, metrics = self._train_step(self.learner, batch)
        out = {k: float(v) for k, v in tree_to_host(metrics).items()}
        out["learner_rows"] = float(len(rows))
        out["stale_groups"] = float(np.sum(stale))
        return out

    def _policy_params(self) -> Any:
        """The learner's float32 masters in the model's own dtype, as the rollout engine holds them."""
        dtype = self.model_config.param_dtype
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            self.learner.params)

    def _publish(self, push: Callable[[Any, int], None]) -> dict[str, float]:
        """Pushes the new weights as version `self.version + 1` every `sync_every` steps (and at the
        last step); returns the push's metrics (time, engine and after-publish checks)."""
        version = self.version + 1
        if (self.step + 1) % self.cfg.sync_every and self.step + 1 != self.cfg.steps:
            return {"weight_push_s": 0.0}
        t0 = time.perf_counter()
        params = self._policy_params()
        push(params, version)
        out = {"weight_push_s": time.perf_counter() - t0, "engine_version": float(version)}
        stats = getattr(self.engine, "stats", None)
        if isinstance(stats, Mapping):
            out.update({f"engine_{k}": float(v) for k, v in stats.items()})
        if self.after_publish is not None:
            # The controller was loading the servers while the others went on: meet before the hook.
            barrier("after-publish")
            out.update({k: float(v) for k, v in self.after_publish(version, params).items()})
        return out

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_state(self) -> dict:
        if multi_process():
            # Every process saves the same tree of global arrays: the table and key, identical on
            # every process, are saved as arrays replicated over the learner's mesh.
            return {"learner": self.learner, "table": replicate(self.table, self.mesh),
                    "key": replicate(self.key, self.mesh)}
        return {"learner": self.learner, "table": self.table, "key": self.key}

    def save(self, ckpt: Checkpointer) -> None:
        ckpt.save(self.step, self._ckpt_state(), metadata={
            "step": self.step, "version": self.version, "store": self.store.state_dict()})
        ckpt.wait()

    def restore(self, ckpt: Checkpointer) -> bool:
        """Loads the latest checkpoint if there is one; returns whether it did."""
        if ckpt.latest_step() is None:
            return False
        target = jax.tree.map(lambda x: x.sharding, self._ckpt_state())
        state, meta = ckpt.restore(target_shardings=target)
        self.learner, self.table, self.key = state["learner"], state["table"], state["key"]
        if multi_process():
            self.table, self.key = localize(self.table), localize(self.key)
        self.store = TaskStore.from_state_dict(meta["store"])
        self.store.check_consistent(self.table)
        self.step, self.version = int(meta["step"]), int(meta["version"])
        if self.version > self.engine.weight_version:
            self.engine.update_weights(self._policy_params(), self.version)
        return True

    # ------------------------------------------------------------------ the loop
    def run(self, *, resume: bool = False, stop_after: int | None = None) -> list[dict[str, float]]:
        """Trains until `cfg.steps` learner steps are done; returns this call's per-step metrics.

        Args:
          resume: continue from the latest checkpoint under out_dir/checkpoints, if any.
          stop_after: return after this many steps of this call (simulates a killed run in tests).
        """
        barrier("trainer-run")  # the controller may still be starting servers or evaluating
        ckpt = Checkpointer(self.out_dir / "checkpoints", max_to_keep=2)
        try:
            if resume:
                self.restore(ckpt)
            if self.step >= self.cfg.steps:
                return []
            logger = (MetricsLogger(self.out_dir, total_steps=self.cfg.steps, start_step=self.step,
                                    progress=self.progress) if is_controller() else _NoLogger())
            with logger:
                loop = self._run_sync if self.cfg.sync else self._run_async
                return loop(ckpt, logger, stop_after)
        finally:
            ckpt.close()

    def _after_step(self, ckpt: Checkpointer, logger: MetricsLogger, metrics: dict, t_step: float,
                    tasks: Sequence[TaskRef]) -> dict:
        self.step += 1
        self.version += 1
        metrics.update(curriculum_metrics(self.table, np.asarray(self._potential(self.table, step=self.step)),
                                          np.asarray([t.row for t in tasks]), max_depth=self.curriculum.max_depth))
        metrics["step_time_s"] = time.perf_counter() - t_step
        metrics["version"] = float(self.version)
        logger.log(self.step, metrics)
        if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
            self.save(ckpt)
        return metrics

    def _follow_async(self, ckpt: Checkpointer, logger: Any, stop_after: int | None) -> list[dict]:
        """The asynchronous loop on a non-controller process: each step takes the groups (and the
        key the controller's workers advanced) from the controller, then does what it does."""
        history = []
        while self.step < self.cfg.steps and (stop_after is None or len(history) < stop_after):
            t0 = time.perf_counter()
            groups, task_list, weights, stale, key = broadcast_object(None)
            self.key = jnp.asarray(key)
            self._apply_groups(groups, {id(g): t for g, t in zip(groups, task_list)})
            metrics = self._learn(groups, weights, stale)
            metrics.update(self._publish(self.engine.update_weights))
            history.append(self._after_step(ckpt, logger, metrics, t0, task_list))
        return history

    def _group_metrics(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> dict[str, float]:
        rewards = np.asarray([[s.reward for s in g.samples] for g in groups])
        out = group_metrics(rewards, [[s.extra["outcome"] for s in g.samples] for g in groups],
                            [[s.extra["medal"] for s in g.samples] for g in groups],
                            np.asarray([[s.extra["success"] for s in g.samples] for g in groups]),
                            depths=[tasks[id(g)].depth for g in groups])
        out["rollout_tokens"] = float(sum(len(t[1]) for g in groups for s in g.samples for t in s.extra["turns"]))
        return out

    def _run_sync(self, ckpt: Checkpointer, logger: MetricsLogger, stop_after: int | None) -> list[dict]:
        history = []
        while self.step < self.cfg.steps and (stop_after is None or len(history) < stop_after):
            t0 = time.perf_counter()
            self.key, k_draw, k_seed = jax.random.split(self.key, 3)
            tasks = self._draw(k_draw, self.cfg.tasks_per_step)
            seeds = np.asarray(jax.random.randint(k_seed, (len(tasks),), 0, 2 ** 20))
            # The draw is the same on every process; the rollouts happen on the controller only.
            groups = ([self.rollout_group(self.engine, t, int(s)) for t, s in zip(tasks, seeds)]
                      if is_controller() else None)
            groups = broadcast_object(groups)
            t_roll = time.perf_counter() - t0
            by_group = {id(g): t for g, t in zip(groups, tasks)}
            self._apply_groups(groups, by_group)
            metrics = self._group_metrics(groups, by_group)
            t1 = time.perf_counter()
            metrics.update(self._learn(groups, np.ones(len(groups), np.float32), np.zeros(len(groups), bool)))
            metrics.update(self._publish(self.engine.update_weights))
            t_learn = time.perf_counter() - t1
            metrics.update(rollout_time_s=t_roll, learner_time_s=t_learn, staleness_mean=0.0, staleness_max=0.0,
                           learner_idle_fraction=t_roll / max(t_roll + t_learn, 1e-9),
                           tokens_per_s=metrics["rollout_tokens"] / max(t_roll, 1e-9))
            history.append(self._after_step(ckpt, logger, metrics, t0, tasks))
        return history

    def _run_async(self, ckpt: Checkpointer, logger: MetricsLogger, stop_after: int | None) -> list[dict]:
        if not is_controller():
            return self._follow_async(ckpt, logger, stop_after)
        cfg = self.cfg
        queue = RolloutQueue(max(2 * cfg.tasks_per_step, cfg.workers), max_staleness=cfg.max_staleness,
                             policy=cfg.staleness_policy, reweight_decay=cfg.staleness_decay)
        drawn: dict[int, TaskRef] = {}  # id(group) -> task, filled by the workers
        draw_count = [0]

        def task_source():
            with self._lock:
                self.key, k = jax.random.split(self.key)
                draw_count[0] += 1
                return self._draw(k, 1)[0], draw_count[0]

        def rollout_fn(engine, item):
            task, n = item
            group = self.rollout_group(engine, task, self.step * 10_000 + n)
            drawn[id(group)] = task
            return group

        history = []
        pool = RolloutPool(self.engine, task_source, rollout_fn, queue, workers=cfg.workers)
        pool.version = self.version
        t_prev = time.perf_counter()
        pool.start()
        try:
            while self.step < cfg.steps and (stop_after is None or len(history) < stop_after):
                t0 = time.perf_counter()
                try:
                    batch = queue.get_batch(cfg.tasks_per_step, current_version=self.version)
                except QueueClosed:
                    pool.check()  # a failed worker closed the queue: report its error instead
                    raise
                t_wait = time.perf_counter() - t0
                tasks = {id(g): drawn.pop(id(g)) for g in batch.groups}
                if multi_process():
                    # What the workers observed, for the other processes' tables and keys.
                    with self._lock:
                        broadcast_object((batch.groups, [tasks[id(g)] for g in batch.groups],
                                          np.asarray(batch.staleness_weight), np.asarray(batch.is_stale),
                                          np.asarray(self.key)))
                with self._lock:
                    self._apply_groups(batch.groups, tasks)
                metrics = self._group_metrics(batch.groups, tasks)
                t1 = time.perf_counter()
                metrics.update(self._learn(batch.groups, np.asarray(batch.staleness_weight), np.asarray(batch.is_stale)))
                metrics.update(self._publish(pool.publish))
                qm = queue.metrics()
                metrics.update(learner_time_s=time.perf_counter() - t1, learner_wait_s=t_wait,
                               staleness_mean=float(np.mean(batch.staleness)),
                               staleness_max=float(np.max(batch.staleness)),
                               dropped_stale=qm["dropped_stale"], learner_idle_fraction=qm["learner_idle_fraction"],
                               tokens_per_s=metrics["rollout_tokens"] / max(time.perf_counter() - t_prev, 1e-9))
                t_prev = time.perf_counter()
                with self._lock:
                    history.append(self._after_step(ckpt, logger, metrics, t0, list(tasks.values())))
        except BaseException:
            # The error in flight is the one to report; a worker failure it caused would mask it.
            try:
                pool.stop(timeout=POOL_STOP_TIMEOUT_S)
            except Exception:  # noqa: BLE001
                pass
            raise
        # Each worker finishes the group it is rolling out; on a loaded CPU that can take a while.
        pool.stop(timeout=POOL_STOP_TIMEOUT_S)
        return history


class _NoLogger:
    """The metrics logger of a non-controller process: the controller alone writes metrics."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def __enter__(self) -> "_NoLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_env_factory(sandbox: Any, *, reward_cfg: RewardConfig, max_steps: int, exec_timeout_s: float,
                     instrument: bool, prompt_cfg: PromptConfig = PromptConfig()) -> Callable[[Any], Any]:
    """`comp -> MLEEnv` with the run's sandbox and reward; every env shares the caller's sandbox."""
    from ace.env.gym import MLEEnv

    def factory(comp):
        return MLEEnv(comp, sandbox, reward_cfg=reward_cfg, max_steps=max_steps, exec_timeout_s=exec_timeout_s,
                      instrument=instrument, prompt_cfg=prompt_cfg)
    return factory
