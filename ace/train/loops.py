"""When each part of a learner step runs: the synchronous schedule, the asynchronous one, and the
asynchronous one as a non-controller process follows it.

The parts themselves (draw tasks, roll out a group, update the curriculum, learn, publish, finish
the step) belong to the trainer (`Stepper` lists them); a loop only orders them and times them.

  sync   (the `sync` ablation) draws the N tasks in the learner's thread, rolls them out with the
         current weights and seeds from the trainer's RNG, then learns: deterministic given the
         checkpointed state, which the resume test relies on.
  async  (the default) runs rollouts on the RolloutPool's worker threads, which draw tasks
         themselves and push whole groups to the bounded-staleness RolloutQueue while the learner
         trains; the learner waits only when fewer than N groups are queued.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ace.train.multihost import broadcast_object, is_controller, multi_process
from ace.train.pool import RolloutPool
from ace.train.queue import Group, QueueClosed, RolloutQueue
from ace.train.tasks import TaskRef
from ace.train.trainer_config import TrainerConfig

POOL_STOP_TIMEOUT_S = 600.0
# Seeds of the asynchronous loop's groups: step * SEED_STRIDE + the draw's count.
SEED_STRIDE = 10_000


class Stepper(Protocol):
    """What a loop needs from the trainer (`ace.train.trainer.AceTrainer`)."""

    cfg: TrainerConfig
    engine: Any
    key: jax.Array
    step: int
    version: int
    lock: Any  # guards the curriculum and key: workers draw while the learner updates

    def draw(self, key: jax.Array, n: int) -> list[TaskRef]: ...

    def rollout_group(self, engine: Any, task: TaskRef, seed: int) -> Group: ...

    def apply_groups(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> None: ...

    def group_metrics(self, groups: Sequence[Group], tasks: Mapping[int, TaskRef]) -> dict[str, float]: ...

    def learn(self, groups: Sequence[Group], group_weights: np.ndarray, stale: np.ndarray) -> dict[str, float]: ...

    def publish(self, push: Callable[[Any, int], None]) -> dict[str, float]: ...

    def finish_step(self, ckpt: Any, logger: Any, metrics: dict, t_step: float,
                    tasks: Sequence[TaskRef]) -> dict: ...


def _more(trainer: Stepper, history: list, stop_after: int | None) -> bool:
    return trainer.step < trainer.cfg.steps and (stop_after is None or len(history) < stop_after)


def run_sync(trainer: Stepper, ckpt: Any, logger: Any, stop_after: int | None) -> list[dict]:
    """Draw, roll out, learn and publish in this thread, step after step; returns each step's metrics."""
    history: list[dict] = []
    while _more(trainer, history, stop_after):
        t0 = time.perf_counter()
        trainer.key, k_draw, k_seed = jax.random.split(trainer.key, 3)
        tasks = trainer.draw(k_draw, trainer.cfg.tasks_per_step)
        seeds = np.asarray(jax.random.randint(k_seed, (len(tasks),), 0, 2 ** 20))
        # The draw is the same on every process; the rollouts happen on the controller only.
        groups = ([trainer.rollout_group(trainer.engine, t, int(s)) for t, s in zip(tasks, seeds)]
                  if is_controller() else None)
        groups = broadcast_object(groups)
        t_roll = time.perf_counter() - t0
        by_group = {id(g): t for g, t in zip(groups, tasks)}
        trainer.apply_groups(groups, by_group)
        metrics = trainer.group_metrics(groups, by_group)
        t1 = time.perf_counter()
        metrics.update(trainer.learn(groups, np.ones(len(groups), np.float32), np.zeros(len(groups), bool)))
        metrics.update(trainer.publish(trainer.engine.update_weights))
        t_learn = time.perf_counter() - t1
        metrics.update(rollout_time_s=t_roll, learner_time_s=t_learn, staleness_mean=0.0, staleness_max=0.0,
                       learner_idle_fraction=t_roll / max(t_roll + t_learn, 1e-9),
                       tokens_per_s=metrics["rollout_tokens"] / max(t_roll, 1e-9))
        history.append(trainer.finish_step(ckpt, logger, metrics, t0, tasks))
    return history


def run_async(trainer: Stepper, ckpt: Any, logger: Any, stop_after: int | None) -> list[dict]:
    """Rollout workers fill the queue while the learner takes N groups a step; returns each step's metrics.

    On a non-controller process this is `follow_async`.
    """
    if not is_controller():
        return follow_async(trainer, ckpt, logger, stop_after)
    cfg = trainer.cfg
    queue = RolloutQueue(max(2 * cfg.tasks_per_step, cfg.workers), max_staleness=cfg.max_staleness,
                         policy=cfg.staleness_policy, reweight_decay=cfg.staleness_decay)
    drawn: dict[int, TaskRef] = {}  # id(group) -> task, filled by the workers
    draw_count = [0]

    def task_source():
        with trainer.lock:
            trainer.key, k = jax.random.split(trainer.key)
            draw_count[0] += 1
            return trainer.draw(k, 1)[0], draw_count[0]

    def rollout_fn(engine, item):
        task, n = item
        group = trainer.rollout_group(engine, task, trainer.step * SEED_STRIDE + n)
        drawn[id(group)] = task
        return group

    history: list[dict] = []
    pool = RolloutPool(trainer.engine, task_source, rollout_fn, queue, workers=cfg.workers)
    pool.version = trainer.version
    t_prev = time.perf_counter()
    pool.start()
    try:
        while _more(trainer, history, stop_after):
            t0 = time.perf_counter()
            try:
                batch = queue.get_batch(cfg.tasks_per_step, current_version=trainer.version)
            except QueueClosed:
                pool.check()  # a failed worker closed the queue: report its error instead
                raise
            t_wait = time.perf_counter() - t0
            tasks = {id(g): drawn.pop(id(g)) for g in batch.groups}
            if multi_process():
                # What the workers observed, for the other processes' tables and keys.
                with trainer.lock:
                    broadcast_object((batch.groups, [tasks[id(g)] for g in batch.groups],
                                      np.asarray(batch.staleness_weight), np.asarray(batch.is_stale),
                                      np.asarray(trainer.key)))
            with trainer.lock:
                trainer.apply_groups(batch.groups, tasks)
            metrics = trainer.group_metrics(batch.groups, tasks)
            t1 = time.perf_counter()
            metrics.update(trainer.learn(batch.groups, np.asarray(batch.staleness_weight), np.asarray(batch.is_stale)))
            metrics.update(trainer.publish(pool.publish))
            qm = queue.metrics()
            metrics.update(learner_time_s=time.perf_counter() - t1, learner_wait_s=t_wait,
                           staleness_mean=float(np.mean(batch.staleness)),
                           staleness_max=float(np.max(batch.staleness)),
                           dropped_stale=qm["dropped_stale"], learner_idle_fraction=qm["learner_idle_fraction"],
                           tokens_per_s=metrics["rollout_tokens"] / max(time.perf_counter() - t_prev, 1e-9))
            t_prev = time.perf_counter()
            with trainer.lock:
                history.append(trainer.finish_step(ckpt, logger, metrics, t0, list(tasks.values())))
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


def follow_async(trainer: Stepper, ckpt: Any, logger: Any, stop_after: int | None) -> list[dict]:
    """The asynchronous loop on a non-controller process: each step takes the groups (and the key
    the controller's workers advanced) from the controller, then does what the controller does."""
    history: list[dict] = []
    while _more(trainer, history, stop_after):
        t0 = time.perf_counter()
        groups, task_list, weights, stale, key = broadcast_object(None)
        trainer.key = jnp.asarray(key)
        trainer.apply_groups(groups, {id(g): t for g, t in zip(groups, task_list)})
        metrics = trainer.learn(groups, weights, stale)
        metrics.update(trainer.publish(trainer.engine.update_weights))
        history.append(trainer.finish_step(ckpt, logger, metrics, t0, task_list))
    return history
