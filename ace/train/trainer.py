"""The AceGRPO loop: curriculum → rollouts → Evolving Data Buffer → queue → GRPO learner → weights.

One learner step:
  1. the learnability sampler draws N tasks from the TaskTable (initial states and the children
     earlier steps produced) (`ace.train.tasks`);
  2. each task gets a group of G rollouts from its state: one action (step-wise mode, the
     step-wise RL of ML-Agent) or a whole episode (`ace.train.rollouts`);
  3. the buffer updates the stats of the sampled tasks and inserts every executed step's resulting
     state as a child task (unless the `no_buffer` ablation switches children off);
  4. group-relative advantages (optionally duration-weighted) make the learner's batch
     (`ace.train.batches`) for one GRPO update: the learner recomputes the proximal logprobs of the
     batch once (the params before the update, at the sampling temperature, replaying the engine's
     MoE routing when `routing_replay`), then takes `minibatches` optimizer steps clipped against
     them, each token weighted by the truncated behaviour weight min(π_prox / π_behav, tis_cap)
     (decoupled PPO, `ace.rl.losses`);
  5. the learner publishes its weights as version step + 1.

`AceTrainer` owns the run's state and these parts; `ace.train.loops` runs them, synchronously (the
`sync` ablation) or with rollout workers ahead of the learner (the default). A checkpoint holds the
whole run state (`ace.train.run_state`).
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

from ace.curriculum import CurriculumConfig, get_sampler, learnability
from ace.models.checkpoint import Checkpointer
from ace.models.configs import ModelConfig
from ace.train import loops
from ace.train.batches import batch_rows, learner_batch
from ace.train.learner import init_learner, jit_logprobs, jit_train_step, shard_state
from ace.train.metrics import MetricsLogger, curriculum_metrics
from ace.train.multihost import barrier, is_controller, tree_to_host
from ace.train.queue import Group
from ace.train.rollouts import rollout_group, rollout_metrics
from ace.train.run_state import RunState, restore_run, save_run
from ace.train.tasks import TaskRef, apply_groups, curriculum_index, draw_tasks, initial_curriculum
from ace.train.trainer_config import TrainerConfig


def is_due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (and at the last) is due after step `step` (1-based)."""
    return step % every == 0 or step == last


def cast_floats(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating leaf cast to `dtype` (integer leaves unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


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
        in `ace.train.rollouts.make_env_factory`); the trainer closes it after use.
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
        # One optimizer step per batch: the update's own forward gives the proximal logprobs (exact,
        # see LearnerConfig.proximal_from_step), one forward per batch fewer than recomputing them.
        learner_cfg = cfg.learner
        if cfg.recompute_proximal and learner_cfg.minibatches == 1:
            learner_cfg = dataclasses.replace(learner_cfg, proximal_from_step=True)
        self._proximal_in_step = learner_cfg.proximal_from_step
        self._train_step = jit_train_step(learner_cfg, model_config, mesh)
        self._old_logp = jit_logprobs(cfg.learner, model_config, mesh)
        self.after_publish = after_publish
        self._potential = jax.jit(functools.partial(
            learnability, potential=curriculum.potential, optimistic_value=curriculum.optimistic_value))
        self.rows_per_batch = batch_rows(tasks_per_step=cfg.tasks_per_step, group_size=cfg.group_size,
                                         actions_per_rollout=cfg.actions_per_rollout,
                                         micro_batches=cfg.learner.micro_batches, minibatches=cfg.learner.minibatches)
        self.seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens
        self.lock = threading.Lock()  # the curriculum and key: task draws (workers) vs learner updates
        key = jax.random.PRNGKey(cfg.seed)
        learner_key, self.key = jax.random.split(key)
        self.learner = init_learner(params, cfg.learner, learner_key)
        if mesh is not None:
            self.learner = shard_state(self.learner, cfg.learner, model_config, mesh)
        # The KL reference stays frozen for the whole run (a compute-dtype copy, as the dry run counts).
        self.ref_params = None
        if cfg.learner.kl_coef > 0:
            src = params if ref_params is None else ref_params
            self.ref_params = cast_floats(src, jnp.dtype(cfg.learner.compute_dtype))
        self.table, self.store = initial_curriculum([c.comp_id for c in self.comps], curriculum)
        # Derived from the table (never checkpointed): rebuilt on restore.
        self.index = curriculum_index(self.table, curriculum)
        self.step = 0
        self.version = int(engine.weight_version)

    # ------------------------------------------------------------------ the parts of a step
    def draw(self, key: jax.Array, n: int) -> list[TaskRef]:
        """n distinct tasks from the table (see `ace.train.tasks.draw_tasks`)."""
        return draw_tasks(self.sampler, key, self.table, self.store, n, step=self.step, curriculum=self.curriculum,
                          index=self.index)

    def rollout_group(self, engine: Any, task: TaskRef, seed: int) -> Group:
        """G rollouts of `task` as a Group (see `ace.train.rollouts.rollout_group`)."""
        return rollout_group(engine, task, seed, comp=self.comps[task.comp_index], env_factory=self.env_factory,
                             tokenizer=self.tokenizer, sampling=self.sampling, cfg=self.cfg)

    def apply_groups(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> None:
        """update_stats for the sampled tasks still in the table, then insert their children."""
        cfg = self.cfg
        self.table, self.index = apply_groups(
            self.table, self.store, groups, tasks, step=self.step, curriculum=self.curriculum,
            comp_ids=[c.comp_id for c in self.comps], children=cfg.children,
            max_children=cfg.tasks_per_step * cfg.group_size * cfg.actions_per_rollout, n_protected=cfg.tasks_per_step,
            index=self.index)

    def group_metrics(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> dict[str, float]:
        return rollout_metrics(groups, tasks)

    def learn(self, groups: Sequence[Group], group_weights: np.ndarray, stale: np.ndarray) -> dict[str, float]:
        """One GRPO update on the groups' batch; returns the learner's metrics.

        Args:
          groups: the step's N groups; group_weights: [N] loss weights; stale: [N] bool, groups
            older than max_staleness (counted in `stale_groups`).
        """
        cfg = self.cfg
        batch, n_rows = learner_batch(groups, group_weights, group_size=cfg.group_size, advantage=cfg.advantage,
                                      duration_weighting=cfg.duration_weighting, rows=self.rows_per_batch,
                                      max_len=self.seq_len)
        if cfg.learner.routing_replay and batch.routing is None:
            raise RuntimeError("train.routing_replay=true but the rollout engine returned no routing: it needs an "
                               "MoE policy and an engine asked for routed experts (rollout.return_routing)")
        if cfg.recompute_proximal and not self._proximal_in_step:
            # The proximal policy of decoupled PPO: these params, before any step of this update.
            batch = batch.replace(old_logp=self._old_logp(self.learner.params, batch))
        if self.ref_params is not None:
            batch = batch.replace(ref_logp=self._old_logp(self.ref_params, batch))
        self.learner, metrics = self._train_step(self.learner, batch)
        out = {k: float(v) for k, v in tree_to_host(metrics).items()}
        out["learner_rows"] = float(n_rows)
        out["stale_groups"] = float(np.sum(stale))
        return out

    def _policy_params(self) -> Any:
        """The learner's float32 masters in the model's own dtype, as the rollout engine holds them."""
        return cast_floats(self.learner.params, self.model_config.param_dtype)

    def publish(self, push: Callable[[Any, int], None]) -> dict[str, float]:
        """Pushes the new weights as version `self.version + 1` every `sync_every` steps (and at the
        last step); returns the push's metrics (time, engine and after-publish checks)."""
        version = self.version + 1
        if not is_due(self.step + 1, self.cfg.sync_every, self.cfg.steps):
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

    def finish_step(self, ckpt: Checkpointer, logger: Any, metrics: dict, t_step: float,
                    tasks: Sequence[TaskRef]) -> dict:
        """Counts the step, adds the curriculum's metrics, logs, and checkpoints when due."""
        self.step += 1
        self.version += 1
        metrics.update(curriculum_metrics(self.table, np.asarray(self._potential(self.table, step=self.step)),
                                          np.asarray([t.row for t in tasks]), max_depth=self.curriculum.max_depth))
        metrics["step_time_s"] = time.perf_counter() - t_step
        metrics["version"] = float(self.version)
        logger.log(self.step, metrics)
        if is_due(self.step, self.cfg.checkpoint_every, self.cfg.steps):
            self.save(ckpt)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def run_state(self) -> RunState:
        return RunState(learner=self.learner, table=self.table, store=self.store, key=self.key, step=self.step,
                        version=self.version)

    def save(self, ckpt: Checkpointer) -> None:
        save_run(ckpt, self.run_state(), self.mesh)

    def restore(self, ckpt: Checkpointer) -> bool:
        """Loads the latest checkpoint if there is one, then brings the engine to its version;
        returns whether it did."""
        state = restore_run(ckpt, self.run_state(), self.mesh)
        if state is None:
            return False
        self.learner, self.table, self.store, self.key = state.learner, state.table, state.store, state.key
        self.index = curriculum_index(self.table, self.curriculum)
        self.step, self.version = state.step, state.version
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
                loop = loops.run_sync if self.cfg.sync else loops.run_async
                return loop(self, ckpt, logger, stop_after)
        finally:
            ckpt.close()


class _NoLogger:
    """The metrics logger of a non-controller process: the controller alone writes metrics."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def __enter__(self) -> "_NoLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass
