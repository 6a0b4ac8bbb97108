"""RolloutQueue: whole groups only, nothing lost or duplicated, staleness policy, backpressure."""
import collections
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ace.train.queue import Group, QueueClosed, RolloutQueue, Sample


def _sample(task_id, *, version=0, gid=None, j=0, n_tokens=3):
    return Sample(task_id=task_id, prompt_ids=[1, 2], output_ids=list(range(n_tokens)),
                  rollout_logprobs=[-0.5] * n_tokens, reward=float(j), duration_s=0.01,
                  policy_version=version, extra={"gid": gid, "j": j})


def _group(gid, *, g=4, version=0, versions=None):
    versions = versions or [version] * g
    return Group(task_id=gid % 7, group_size=g, group_id=gid,
                 samples=[_sample(gid % 7, version=v, gid=gid, j=j) for j, v in enumerate(versions)])


def test_no_sample_lost_or_duplicated_under_concurrent_producers():
    n_groups, g, n_producers = 48, 4, 8
    q = RolloutQueue(4, max_staleness=0, policy="drop")  # small capacity: producers hit backpressure
    # Producer p owns sample slot p % g of the groups with gid % 2 == p // g, so every group is
    # assembled by g different threads.
    def produce(p):
        for gid in range(n_groups):
            if gid % 2 == p // g:
                q.put_sample(_sample(gid % 7, gid=gid, j=p % g), group_id=gid, group_size=g, timeout=20)

    got, errors = [], []

    def consume():
        try:
            for _ in range(n_groups // 3):
                got.append(q.get_batch(3, current_version=0, timeout=20))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    threads.append(threading.Thread(target=consume))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    seen = collections.Counter((s.extra["gid"], s.extra["j"]) for b in got for s in b.samples)
    expected = collections.Counter((gid, j) for gid in range(n_groups) for j in range(g))
    assert seen == expected  # every sample exactly once
    for b in got:
        for grp in b.groups:
            assert len(grp.samples) == g and {s.extra["gid"] for s in grp.samples} == {grp.group_id}
    m = q.metrics()
    assert m["samples_put"] == m["samples_released"] == n_groups * g
    assert m["groups_released"] == n_groups and m["dropped_stale"] == 0
    assert len(q) == 0 and m["open_groups"] == 0


@settings(max_examples=25, deadline=None)
@given(st.permutations([(gid, j) for gid in range(5) for j in range(3)]), st.integers(1, 3))
def test_group_released_only_when_complete_and_never_split(order, n_per_batch):
    q = RolloutQueue(8, max_staleness=0, policy="drop")
    released = []
    completed = set()
    for gid, j in order:
        q.put_sample(_sample(gid, gid=gid, j=j), group_id=gid, group_size=3)
        if sum(1 for g2, _ in order[:order.index((gid, j)) + 1] if g2 == gid) == 3:
            completed.add(gid)
        # Brute-force reference: the queue may release exactly the completed, unreleased groups.
        while len(completed) - len(released) >= n_per_batch:
            b = q.get_batch(n_per_batch, current_version=0, timeout=1)
            released.extend(g.group_id for g in b.groups)
            for grp in b.groups:
                assert sorted(s.extra["j"] for s in grp.samples) == [0, 1, 2]
                assert {s.extra["gid"] for s in grp.samples} == {grp.group_id}
        assert set(released) <= completed
    assert len(q) == len(completed) - len(released) < n_per_batch
    if len(q) < n_per_batch:
        with pytest.raises(TimeoutError, match=f"of {n_per_batch} groups ready"):
            q.get_batch(n_per_batch, current_version=0, timeout=0.01)


def test_drop_policy_discards_groups_older_than_max_staleness():
    rng = np.random.default_rng(0)
    q = RolloutQueue(32, max_staleness=2, policy="drop")
    oldest = rng.integers(0, 10, size=20)
    for gid, v in enumerate(oldest):
        versions = [int(v)] + [int(v + rng.integers(0, 3))] * 3  # group's staleness is set by its oldest sample
        q.put_group(_group(gid, versions=versions))
    current = 11
    keep = [gid for gid, v in enumerate(oldest) if current - v <= 2]
    b = q.get_batch(len(keep), current_version=current, timeout=1)
    assert [g.group_id for g in b.groups] == keep
    assert not b.is_stale.any() and np.all(b.staleness_weight == 1.0)
    ref_stale = np.array([[current - s.policy_version for s in g.samples] for g in b.groups])
    np.testing.assert_array_equal(b.sample_staleness, ref_stale)
    np.testing.assert_array_equal(b.staleness, ref_stale.max(axis=1))
    m = q.metrics()
    assert m["dropped_stale"] == 20 - len(keep) and m["samples_dropped_stale"] == 4 * (20 - len(keep))
    assert m["mean_staleness"] == pytest.approx(ref_stale.mean())
    assert m["max_staleness"] == ref_stale.max() and m["reweighted"] == 0
    assert len(q) == 0


def test_reweight_policy_keeps_stale_groups_and_marks_them():
    q = RolloutQueue(8, max_staleness=1, policy="reweight", reweight_decay=0.5)
    versions = [5, 4, 2, 0]
    for gid, v in enumerate(versions):
        q.put_group(_group(gid, version=v))
    b = q.get_batch(4, current_version=5, timeout=1)
    staleness = 5 - np.array(versions)
    np.testing.assert_array_equal(b.staleness, staleness)
    np.testing.assert_array_equal(b.is_stale, staleness > 1)
    ref_w = np.where(staleness > 1, 0.5 ** (staleness - 1.0), 1.0)
    np.testing.assert_allclose(b.staleness_weight, ref_w)
    m = q.metrics()
    assert m["reweighted"] == 2 and m["dropped_stale"] == 0 and m["max_staleness"] == 5


def test_put_blocks_when_full_and_resumes_when_consumer_frees_room():
    q = RolloutQueue(2, max_staleness=0, policy="drop")
    q.put_group(_group(0))
    q.put_group(_group(1))
    with pytest.raises(TimeoutError, match="full"):
        q.put_group(_group(2), timeout=0.05)
    # A sample for an open group never blocks, even at capacity.
    q2 = RolloutQueue(1, max_staleness=0, policy="drop")
    q2.put_sample(_sample(0, gid=9, j=0), group_id=9, group_size=2)
    assert q2.put_sample(_sample(0, gid=9, j=1), group_id=9, group_size=2, timeout=0.01)

    done = threading.Event()

    def producer():
        q.put_group(_group(2), timeout=5)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.05)
    assert not done.is_set()
    q.get_batch(1, current_version=0, timeout=1)
    t.join(5)
    assert done.is_set() and q.metrics()["producer_block_s"] > 0.03


def test_close_unblocks_blocked_producer_and_consumer():
    q = RolloutQueue(1, max_staleness=0, policy="drop")
    q.put_group(_group(0))
    errors = []

    def run(fn):
        try:
            fn()
        except QueueClosed as e:
            errors.append(e)

    q2 = RolloutQueue(1, max_staleness=0, policy="drop")  # empty: its consumer blocks
    ts = [threading.Thread(target=run, args=(lambda: q.put_group(_group(1)),)),
          threading.Thread(target=run, args=(lambda: q2.get_batch(1, current_version=0),))]
    for t in ts:
        t.start()
    time.sleep(0.05)
    q.close()
    q2.close()
    for t in ts:
        t.join(5)
    assert len(errors) == 2 and not any(t.is_alive() for t in ts)
    with pytest.raises(QueueClosed):
        q.put_sample(_sample(0), group_id=5, group_size=1)


def test_learner_wait_time_is_measured_for_idle_fraction():
    q = RolloutQueue(4, max_staleness=0, policy="drop")
    threading.Timer(0.2, lambda: q.put_group(_group(0))).start()
    q.get_batch(1, current_version=0, timeout=5)
    time.sleep(0.2)  # learner "compute" between two gets
    q.put_group(_group(1))
    q.get_batch(1, current_version=0, timeout=5)
    m = q.metrics()
    assert 0.15 <= m["learner_wait_s"] < 0.4
    assert 0.25 < m["learner_idle_fraction"] < 0.75


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="3 output ids but 2 rollout_logprobs"):
        Sample(0, [1], [1, 2, 3], [0.0, 0.0], 0.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"policy must be one of .* got 'keep'"):
        RolloutQueue(4, max_staleness=1, policy="keep")
    with pytest.raises(ValueError, match="capacity_groups must be >= 1, got 0"):
        RolloutQueue(0, max_staleness=1, policy="drop")
    q = RolloutQueue(4, max_staleness=1, policy="drop")
    with pytest.raises(ValueError, match="complete group"):
        q.put_group(Group(task_id=0, group_size=2, samples=[_sample(0)]))
    q.put_sample(_sample(0), group_id="a", group_size=1)
    with pytest.raises(ValueError, match="already"):
        q.put_sample(_sample(0), group_id="a", group_size=1)  # duplicate of a ready group's sample
    q.put_sample(_sample(0), group_id="c", group_size=2)
    with pytest.raises(ValueError, match="task 1 added to a group of task 0"):
        q.put_sample(_sample(1), group_id="c", group_size=2)
    q.put_sample(_sample(0), group_id="c", group_size=2)
    q.get_batch(2, current_version=0)
    with pytest.raises(ValueError, match="already complete, released"):
        q.put_sample(_sample(0), group_id="a", group_size=1)
    q.put_group(_group(7, version=3))
    with pytest.raises(ValueError, match="newer than current_version=2"):
        q.get_batch(1, current_version=2)
    assert len(q) == 1  # the failed get left the group queued
    with pytest.raises(ValueError, match="n_groups=5 can never be served"):
        q.get_batch(5, current_version=3)
