"""Rollout workers: take a task, run its episodes against the engine, push the group to the queue.

The pool owns its worker threads (start, health via `check()`, stop on every exit path). The
learner thread publishes new weights with `publish(params, version)`.

Weight-publishing contract. An engine may declare `supports_concurrent_update = True`: it then
accepts `update_weights` while other threads are inside `generate` and handles the switch itself
(the SGLang engine pauses and resumes its servers). For any other engine the pool puts a
reader/writer gate around the engine: `publish` waits for the `generate` calls already running to
return, holds back new ones for the duration of `update_weights`, then lets them through. Workers
are never stopped between episodes or between the turns of an episode, only while the engine is
being updated, and only if they call `generate` during that window. An episode whose turns span a
publish therefore mixes versions; `rollout_fn` must record the oldest version it saw
(`Generation.weight_version`) as the samples' `policy_version`, so that the queue's staleness bound
judges it by its oldest token.
"""
from __future__ import annotations

import contextlib
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from ace.rollout.engine import Generation, RolloutEngine, SamplingParams
from ace.train.queue import Group, QueueClosed, RolloutQueue


class RolloutWorkerError(RuntimeError):
    """A worker thread failed; the original exception is the `__cause__`."""


class _UpdateGate:
    """Reader/writer lock that favours the writer, so a publish is not starved by busy workers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer_waiting = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writing or self._writer_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._writer_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writer_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _GatedEngine:
    """What `rollout_fn` sees: the engine's `generate` behind the pool's update gate."""

    def __init__(self, engine: RolloutEngine, gate: _UpdateGate | None):
        self._engine = engine
        self._gate = gate

    @property
    def weight_version(self) -> int:
        return self._engine.weight_version

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]:
        if self._gate is None:
            return self._engine.generate(prompts, params)
        with self._gate.reading():
            return self._engine.generate(prompts, params)

    def update_weights(self, params: Any, version: int) -> None:
        raise RuntimeError("rollout_fn must not update weights; the learner calls RolloutPool.publish")


class RolloutPool:
    """Worker threads that turn tasks into complete groups on the queue.

    Args:
      engine: the RolloutEngine shared by all workers.
      task_source: `task_source() -> task`, called under a lock (it need not be thread-safe);
        raising StopIteration ends the worker that called it (a finite task list).
      rollout_fn: `rollout_fn(engine, task) -> Group`, runs the G episodes of one task; `engine`
        is a gated view of the pool's engine.
      queue: where complete groups go; a full queue blocks the worker (backpressure).
      workers: number of threads.
      poll_s: how often a worker blocked on a full queue re-checks for `stop()`.

    A failure in `task_source` or `rollout_fn` stops the pool: the queue is closed so a learner
    blocked in `get_batch` wakes with QueueClosed, and `check()` / `stop()` re-raise the error as
    RolloutWorkerError.
    """

    def __init__(self, engine: RolloutEngine, task_source: Callable[[], Any],
                 rollout_fn: Callable[[Any, Any], Group], queue: RolloutQueue, *, workers: int,
                 poll_s: float = 0.05):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.engine = engine
        self.task_source = task_source
        self.rollout_fn = rollout_fn
        self.queue = queue
        self.num_workers = workers
        self.poll_s = poll_s
        concurrent = bool(getattr(engine, "supports_concurrent_update", False))
        self._gate = None if concurrent else _UpdateGate()
        self._view = _GatedEngine(engine, self._gate)
        self._task_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._error: tuple[str, BaseException, str] | None = None
        self._stats = {"groups_pushed": 0, "groups_discarded_on_stop": 0, "rollout_s": 0.0,
                       "publish_s": 0.0, "publishes": 0}
        self.version = int(engine.weight_version)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "RolloutPool":
        if self._threads:
            raise RuntimeError("RolloutPool already started")
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, name=f"rollout-worker-{i}", daemon=True)
                         for i in range(self.num_workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Signals the workers, joins them (each finishes the episode it is running), re-raises.

        Raises RolloutWorkerError if a worker failed, RuntimeError if a worker is still running
        after `timeout` seconds (a rollout_fn that never returns).
        """
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if not alive:
            self._threads = []
        self.check()
        if alive:
            raise RuntimeError(f"rollout workers still running after {timeout} s: {alive}")

    def __enter__(self) -> "RolloutPool":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except Exception:
            # The exception already propagating is the one the caller needs; a worker failure
            # that follows from it would only mask it.
            if exc_type is None:
                raise

    def check(self) -> None:
        """Re-raises the first worker failure, if any, as RolloutWorkerError."""
        if self._error is not None:
            name, exc, tb = self._error
            raise RolloutWorkerError(f"{name} failed: {exc!r}\n{tb}") from exc

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ weights
    def publish(self, params: Any, version: int) -> None:
        """Pushes `params` to the engine as `version` (see the module docstring for the contract)."""
        if version <= self.version:
            raise ValueError(f"publish version must grow: got {version}, engine holds {self.version}")
        self.check()
        t0 = time.monotonic()
        if self._gate is None:
            self.engine.update_weights(params, version)
        else:
            with self._gate.writing():
                self.engine.update_weights(params, version)
        self.version = version
        with self._stats_lock:
            self._stats["publish_s"] += time.monotonic() - t0
            self._stats["publishes"] += 1

    def metrics(self) -> dict[str, float]:
        with self._stats_lock:
            out = {k: float(v) for k, v in self._stats.items()}
        out["version"] = float(self.version)
        out["workers_alive"] = float(sum(t.is_alive() for t in self._threads))
        return out

    # ------------------------------------------------------------------ worker body
    def _run(self) -> None:
        name = threading.current_thread().name
        try:
            while not self._stop.is_set():
                with self._task_lock:
                    try:
                        task = self.task_source()
                    except StopIteration:
                        return
                t0 = time.monotonic()
                group = self.rollout_fn(self._view, task)
                if not isinstance(group, Group):
                    raise TypeError(f"rollout_fn must return a Group, got {type(group).__name__}")
                with self._stats_lock:
                    self._stats["rollout_s"] += time.monotonic() - t0
                if not self._push(group):
                    return
        except QueueClosed:
            return
        except BaseException as exc:  # noqa: BLE001 - surfaced through check()/stop()
            with self._stats_lock:
                if self._error is None:
                    self._error = (name, exc, traceback.format_exc())
            self._stop.set()
            self.queue.close()

    def _push(self, group: Group) -> bool:
        while True:
            if self._stop.is_set():
                with self._stats_lock:
                    self._stats["groups_discarded_on_stop"] += 1
                return False
            try:
                self.queue.put_group(group, timeout=self.poll_s)
            except TimeoutError:
                continue
            with self._stats_lock:
                self._stats["groups_pushed"] += 1
            return True
