"""RolloutPool: every task becomes one group, errors surface, weights publish at a version boundary."""
import collections
import itertools
import threading
import time

import pytest

from ace.rollout.engine import Generation, RolloutEngine, SamplingParams
from ace.train.pool import RolloutPool, RolloutWorkerError
from ace.train.queue import Group, QueueClosed, RolloutQueue, Sample

G = 3


class CountingEngine:
    """Engine double: output = prompt + weight version; records overlap of generate and update."""

    def __init__(self, *, generate_s=0.002, update_s=0.0, concurrent=False):
        self.supports_concurrent_update = concurrent
        self._version = 0
        self._lock = threading.Lock()
        self.in_generate = 0
        self.overlaps = 0  # generate calls in flight while update_weights ran
        self.generate_s, self.update_s = generate_s, update_s
        self.calls = 0
        self.updating = threading.Event()

    @property
    def weight_version(self):
        return self._version

    def generate(self, prompts, params):
        with self._lock:
            self.in_generate += 1
            self.calls += 1
            if self.updating.is_set():
                self.overlaps += 1
        try:
            time.sleep(self.generate_s)
            v = self._version
            return [Generation(output_ids=[p[0] + v], logprobs=[-0.1], finish_reason="stop", weight_version=v)
                    for p in prompts]
        finally:
            with self._lock:
                self.in_generate -= 1

    def update_weights(self, params, version):
        self.updating.set()
        with self._lock:
            self.overlaps += self.in_generate
        time.sleep(self.update_s)
        self._version = version
        self.updating.clear()


def episodes(engine, task):
    gens = engine.generate([[task]] * G, SamplingParams(max_new_tokens=1))
    version = min(g.weight_version for g in gens)
    return Group(task_id=task, group_size=G, group_id=("task", task), samples=[
        Sample(task_id=task, prompt_ids=[task], output_ids=g.output_ids, rollout_logprobs=g.logprobs,
               reward=float(g.output_ids[0] == task), duration_s=0.0, policy_version=version)
        for g in gens])


def finite_tasks(n):
    it = iter(range(n))
    return lambda: next(it)


def test_engine_double_satisfies_protocol():
    assert isinstance(CountingEngine(), RolloutEngine)


def test_every_task_becomes_exactly_one_complete_group():
    n_tasks = 40
    q = RolloutQueue(6, max_staleness=0, policy="drop")  # small: workers meet backpressure
    got = []
    with RolloutPool(CountingEngine(), finite_tasks(n_tasks), episodes, q, workers=4) as pool:
        for _ in range(n_tasks // 5):
            got.extend(q.get_batch(5, current_version=0, timeout=10).groups)
    assert sorted(g.task_id for g in got) == list(range(n_tasks))
    assert all(len(g.samples) == G for g in got)
    assert pool.metrics()["groups_pushed"] == n_tasks and not pool.running


def test_worker_error_is_reraised_and_wakes_the_learner():
    def rollout(engine, task):
        if task == 5:
            raise ZeroDivisionError("bad episode 5")
        return episodes(engine, task)

    q = RolloutQueue(64, max_staleness=0, policy="drop")
    pool = RolloutPool(CountingEngine(), itertools.count().__next__, rollout, q, workers=2).start()
    # The learner blocked on more groups than will ever arrive is woken by the failure.
    with pytest.raises(QueueClosed):
        q.get_batch(60, current_version=0, timeout=10)
    with pytest.raises(RolloutWorkerError, match="bad episode 5") as info:
        pool.check()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(RolloutWorkerError, match="bad episode 5"):
        pool.stop(timeout=5)
    assert not pool.running


def test_rollout_fn_returning_a_non_group_is_an_error():
    q = RolloutQueue(4, max_staleness=0, policy="drop")
    pool = RolloutPool(CountingEngine(), finite_tasks(3), lambda e, t: [t], q, workers=1).start()
    with pytest.raises(RolloutWorkerError, match="must return a Group, got list"):
        pool.stop(timeout=5)


@pytest.mark.parametrize("concurrent", [False, True])
def test_publish_switches_version_for_later_rollouts(concurrent):
    engine = CountingEngine(generate_s=0.005, update_s=0.05, concurrent=concurrent)
    q = RolloutQueue(256, max_staleness=10, policy="drop")
    with RolloutPool(engine, itertools.count().__next__, episodes, q, workers=4) as pool:
        q.get_batch(4, current_version=0, timeout=10)
        calls_before = engine.calls
        pool.publish({"w": 1}, 1)
        pushed_before = int(pool.metrics()["groups_pushed"]) - 4  # FIFO position of the publish
        b = q.get_batch(pushed_before + 12, current_version=1, timeout=10)
        with pytest.raises(ValueError, match="must grow"):
            pool.publish({"w": 1}, 1)
    after = b.groups[pushed_before:]
    versions = [g.samples[0].policy_version for g in after]
    # Only episodes already running at the publish (at most one per worker) may carry version 0.
    assert versions.count(0) <= 4 and versions.count(1) >= 8
    assert all(s.output_ids == [g.task_id + s.policy_version] for g in b.groups for s in g.samples)
    assert engine.calls > calls_before  # workers kept generating around the publish
    if concurrent:
        # The engine promised to handle concurrent updates: the pool did not gate it.
        assert engine.overlaps > 0
    else:
        assert engine.overlaps == 0
    assert pool.metrics()["publishes"] == 1 and pool.version == 1


def test_publish_waits_only_for_in_flight_generate_not_whole_episodes():
    """An episode of many turns keeps its worker busy; publish must not wait for it to end."""
    engine = CountingEngine(generate_s=0.01)
    turns_done = collections.Counter()

    def long_episode(eng, task):
        for _ in range(50):  # ~0.5 s of turns
            eng.generate([[task]], SamplingParams(max_new_tokens=1))
            turns_done[task] += 1
        return episodes(eng, task)

    q = RolloutQueue(8, max_staleness=10, policy="drop")
    with RolloutPool(engine, itertools.count().__next__, long_episode, q, workers=2) as pool:
        time.sleep(0.05)
        t0 = time.monotonic()
        pool.publish(None, 1)
        publish_s = time.monotonic() - t0
        assert sum(turns_done.values()) < 100  # both episodes were still mid-way
    assert publish_s < 0.25
    assert engine.overlaps == 0


def test_stop_returns_promptly_when_workers_are_blocked_on_a_full_queue():
    q = RolloutQueue(1, max_staleness=0, policy="drop")
    pool = RolloutPool(CountingEngine(), itertools.count().__next__, episodes, q, workers=3, poll_s=0.01)
    pool.start()
    deadline = time.monotonic() + 5
    while len(q) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    t0 = time.monotonic()
    pool.stop(timeout=5)
    assert time.monotonic() - t0 < 1.0
    m = pool.metrics()
    assert m["groups_pushed"] == 1 and m["groups_discarded_on_stop"] >= 1 and m["workers_alive"] == 0


def test_bad_arguments_are_rejected():
    q = RolloutQueue(1, max_staleness=0, policy="drop")
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        RolloutPool(CountingEngine(), finite_tasks(1), episodes, q, workers=0)
    pool = RolloutPool(CountingEngine(), finite_tasks(1), episodes, q, workers=1)
    with pytest.raises(ValueError, match="got 0, engine holds 0"):
        pool.publish(None, 0)
