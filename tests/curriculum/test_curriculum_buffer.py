"""Evolving Data Buffer: update_stats against NumPy history, insert against a brute-force reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.curriculum import TaskRows, init_table, insert, learnability, make_rows, stats, update_stats
from ace.curriculum.buffer import ADDED, DROPPED, MERGED, PADDING, TOO_DEEP
from ace.curriculum.table import NO_TASK

ROWS = 8  # candidate batch size, as in the conftest of this folder


def test_update_stats_equals_statistics_over_the_whole_history(make_filled_table):
    table, _ = make_filled_table(8, 4)
    rng = np.random.default_rng(0)
    history = {i: [] for i in range(4)}
    succ_hist = {i: [] for i in range(4)}
    calls = [np.array([0, 1, 2]), np.array([2, 3, 2]), np.array([0, 3, 1])]  # row 2 twice in one call
    for step, idx in enumerate(calls, start=1):
        rewards = rng.normal(size=(3, 5)).astype(np.float32)
        success = rng.random((3, 5)) < 0.4
        table = update_stats(table, idx, rewards, success, step)
        for k, i in enumerate(idx):
            history[i].extend(rewards[k])
            succ_hist[i].extend(success[k])
    last = {0: (2, 0), 3: (1, 1), 1: (2, 2)}  # row: (position in last call, ...) only rows of the last call
    for i in range(4):
        r = np.array(history[i])
        assert int(table.visits[i]) == r.size
        assert int(table.successes[i]) == int(np.sum(succ_hist[i]))
        np.testing.assert_allclose(float(table.reward_mean[i]), r.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(table.reward_var[i]), r.var(), rtol=1e-4, atol=1e-6)
    # recent_* is the latest call; row 2's latest call pooled its two groups.
    assert int(table.last_sampled_step[2]) == 2 and int(table.last_sampled_step[0]) == 3
    r2 = np.array(history[2][-10:])
    np.testing.assert_allclose(float(table.recent_reward_std[2]), r2.std(), rtol=1e-5)
    np.testing.assert_allclose(float(table.recent_success_rate[2]), np.mean(succ_hist[2][-10:]), rtol=1e-6)
    assert set(last) <= set(range(4))


def test_update_stats_with_a_repeated_row_equals_two_sequential_updates(make_filled_table):
    table, _ = make_filled_table(8, 2)
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(2, 3)).astype(np.float32)
    success = rewards > 0
    once = update_stats(table, [1, 1], rewards, success, 1)
    twice = update_stats(update_stats(table, [1], rewards[:1], success[:1], 1), [1], rewards[1:], success[1:], 1)
    for col in ("visits", "successes", "reward_mean", "reward_var"):
        np.testing.assert_allclose(np.asarray(getattr(once, col)), np.asarray(getattr(twice, col)), rtol=1e-5)


def reference_insert(table, rows, step, protected, lp, evict="potential", max_depth=None):
    """Brute-force insert in plain Python, one candidate at a time."""
    valid = np.asarray(table.valid).copy()
    task_id = np.asarray(table.task_id).copy()
    hashes = [tuple(h) for h in np.asarray(table.state_hash)]
    created = np.asarray(table.created_step)
    key = -lp if evict == "potential" else -created.astype(np.float64)
    next_id = int(table.next_task_id)
    prot = {int(p) for p in np.asarray(protected) if p >= 0}
    out = []
    row_h = [tuple(h) for h in np.asarray(rows.state_hash)]
    live_of_hash = {hashes[c]: c for c in range(len(valid)) if valid[c]}
    merged_targets = {live_of_hash[h] for i, h in enumerate(row_h)
                      if rows.valid[i] and (max_depth is None or rows.depth[i] <= max_depth) and h in live_of_hash}
    replaced = set()
    batch_first = {}
    for i in range(len(row_h)):
        if not rows.valid[i]:
            out.append((PADDING, NO_TASK, -1, NO_TASK))
            continue
        if max_depth is not None and rows.depth[i] > max_depth:
            out.append((TOO_DEEP, NO_TASK, -1, NO_TASK))
            continue
        h = row_h[i]
        if h in batch_first:
            st, tid, slot, _ = out[batch_first[h]]
            out.append((DROPPED, NO_TASK, -1, NO_TASK) if st == DROPPED else (MERGED, tid, slot, NO_TASK))
            continue
        batch_first[h] = i
        if h in live_of_hash and live_of_hash[h] not in replaced:
            c = live_of_hash[h]
            out.append((MERGED, int(task_id[c]), c, NO_TASK))
            continue
        free = [c for c in range(len(valid)) if not valid[c] and c not in replaced]
        if free:
            slot = free[0]
        else:
            cands = [c for c in range(len(valid)) if valid[c] and c not in prot and c not in merged_targets
                     and c not in replaced]
            if not cands:
                out.append((DROPPED, NO_TASK, -1, NO_TASK))
                continue
            slot = max(cands, key=lambda c: (key[c], -c))
        evicted = int(task_id[slot]) if valid[slot] else NO_TASK
        replaced.add(slot)
        out.append((ADDED, next_id, slot, evicted))
        next_id += 1
    return np.array(out, dtype=np.int64), next_id


def random_case(rng, capacity, n_live, n_rows):
    table = init_table(capacity)
    hashes = rng.integers(0, 6, size=(n_live, 2)).astype(np.uint32) + np.arange(n_live, dtype=np.uint32)[:, None] * 7
    table, _ = insert(table, make_rows(-1, 0, 0, hashes, pad_to=ROWS if n_live <= ROWS else n_live), step=0)
    live = np.flatnonzero(np.asarray(table.valid))
    # Tie-free success rates (k/16, k <= 8) on ~70% of live rows; the rest stay never tried.
    tried = np.zeros(capacity, bool)
    tried[live] = rng.random(live.size) < 0.7
    rate = np.zeros(capacity)
    rate[tried] = rng.permutation(9)[:tried.sum()] / 16
    table = table._replace(visits=jnp.asarray(tried * 16, jnp.int32),
                           recent_success_rate=jnp.asarray(rate, jnp.float32))
    table = table._replace(created_step=jnp.asarray(rng.permutation(capacity), jnp.int32))
    # Candidates: some duplicate live states, some duplicate each other, some padding.
    pool = np.concatenate([hashes, rng.integers(100, 104, size=(n_rows, 2)).astype(np.uint32)])
    row_h = pool[rng.integers(0, len(pool), n_rows)]
    rows = make_rows(-1, 0, rng.integers(0, 4, n_rows), row_h)
    rows = rows._replace(valid=jnp.asarray(rng.random(n_rows) < 0.85))
    # Sometimes every row is being rolled out, so that new candidates must be dropped.
    protected = np.arange(capacity) if rng.random() < 0.25 else rng.choice(np.arange(-1, capacity), size=capacity)
    return table, rows, protected


@pytest.mark.parametrize("evict, max_depth", [("potential", None), ("oldest", None), ("potential", 2)])
def test_insert_matches_a_brute_force_reference(evict, max_depth):
    rng = np.random.default_rng({"potential": 0, "oldest": 1}[evict] + (max_depth or 0))
    seen, evicted_any = set(), False
    for trial in range(12):
        table, rows, protected = random_case(rng, 8, int(rng.integers(3, 9)), ROWS)
        lp = np.asarray(learnability(table, potential="success_variance", optimistic_value=0.25))
        new, result = insert(table, rows, step=5, protected=protected, evict=evict, max_depth=max_depth)
        expected, next_id = reference_insert(table, rows, 5, protected, lp, evict, max_depth)
        got = np.stack([np.asarray(x) for x in result], axis=1)
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")
        assert int(new.next_task_id) == next_id
        added = expected[expected[:, 0] == ADDED]
        np.testing.assert_array_equal(np.asarray(new.task_id)[added[:, 2]], added[:, 1])
        np.testing.assert_array_equal(np.asarray(new.state_hash)[added[:, 2]],
                                      np.asarray(rows.state_hash)[expected[:, 0] == ADDED])
        untouched = np.setdiff1d(np.arange(8), added[:, 2])
        for col in ("valid", "task_id", "visits", "reward_mean", "state_hash"):
            np.testing.assert_array_equal(np.asarray(getattr(new, col))[untouched],
                                          np.asarray(getattr(table, col))[untouched])
        assert np.asarray(new.visits)[added[:, 2]].sum() == 0
        seen.update(expected[:, 0].tolist())
        evicted_any |= bool((expected[:, 3] >= 0).any())
    assert seen >= {ADDED, MERGED, DROPPED, PADDING} | ({TOO_DEEP} if max_depth else set()), seen
    assert evicted_any


def test_eviction_removes_exactly_the_lowest_potential_unprotected_rows(make_filled_table):
    table, _ = make_filled_table(8, 8)
    rates = np.array([4, 0, 3, 1, 2, 4, 1, 3]) / 8  # LP: .25 0 .23 .11 .19 .25 .11 .23
    success = np.arange(8)[None, :] < (rates * 8)[:, None]
    table = update_stats(table, jnp.arange(8), success.astype(np.float32), success, 1)
    fresh = np.arange(3, dtype=np.uint32)[:, None] + np.array([[7, 9]], np.uint32) * 1000
    new, result = insert(table, make_rows(-1, 0, 1, fresh, pad_to=ROWS), step=2, protected=[1, -1])
    # Row 1 (LP 0) is protected; next lowest: rows 3 and 6 (LP 7/64, tie -> lower row first), then 4.
    assert np.asarray(result.slot)[:3].tolist() == [3, 6, 4]
    assert np.asarray(result.evicted_task_id)[:3].tolist() == [3, 6, 4]
    assert np.asarray(result.task_id)[:3].tolist() == [8, 9, 10]
    assert bool(new.valid.all()) and int(new.task_id[1]) == 1


def test_candidates_are_dropped_when_every_row_is_protected(make_filled_table):
    table, _ = make_filled_table(8, 8)
    fresh = np.array([[1, 2], [3, 4]], np.uint32)
    new, result = insert(table, make_rows(-1, 0, 1, fresh, pad_to=ROWS), step=1, protected=np.arange(8))
    assert np.asarray(result.status)[:2].tolist() == [DROPPED, DROPPED]
    np.testing.assert_array_equal(np.asarray(new.task_id), np.asarray(table.task_id))


def test_insert_jit_and_vmap_equal_eager(make_filled_table):
    t1, _ = make_filled_table(8, 8)
    t2, _ = make_filled_table(8, 5)
    rows = make_rows(-1, 0, 1, np.array([[5, 5], [6, 6], [5, 5]], np.uint32), pad_to=ROWS)
    eager = [insert(t, rows, step=3, protected=[0]) for t in (t1, t2)]
    fn = jax.jit(jax.vmap(lambda t: insert(t, rows, step=3, protected=jnp.array([0]))))
    batched = fn(jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), t1, t2))
    for k in range(2):
        for got, want in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(eager[k])):
            np.testing.assert_array_equal(np.asarray(got)[k], np.asarray(want))


def test_stats_summarise_the_table(make_filled_table):
    table, _ = make_filled_table(8, 4)
    table = update_stats(table, [0, 1], np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[1, 0], [1, 1]]), 1)
    s = jax.jit(stats)(table)
    assert int(s["size"]) == 4 and float(s["fill_fraction"]) == 0.5
    assert float(s["never_tried_fraction"]) == 0.5 and float(s["mean_success_rate"]) == 0.75
    assert float(s["mean_visits"]) == 1.0 and int(s["num_roots"]) == 4


@pytest.mark.parametrize("idx, rewards, success, error, message", [
    ([0, 1], [[0.0, np.nan], [1.0, 1.0]], [[0, 0], [1, 1]], ValueError, r"group_rewards\[0, 1\] = nan is not finite"),
    ([0, 1], [[0.0, 1.0]], [[0, 0]], ValueError, r"group_rewards must have shape \[N, G\] = \(2, G>=1\)"),
    ([0], [[0.0, 1.0]], [[0, 0, 1]], ValueError, "group_success must have the shape of group_rewards"),
    ([0, 9], [[0.0], [1.0]], [[0], [1]], IndexError, r"idx\[1\] = 9 is out of range \[0, 8\)"),
    ([0, 6], [[0.0], [1.0]], [[0], [1]], IndexError, r"idx\[1\] = 6 points to an empty table row"),
    ([0], [[0.0, 1.0]], [[0, 2]], ValueError, r"group_success\[0, 1\] = 2; expected a bool or 0/1"),
])
def test_bad_update_stats_input_raises_naming_the_problem(make_filled_table, idx, rewards, success, error, message):
    table, _ = make_filled_table(8, 4)
    with pytest.raises(error, match=message):
        update_stats(table, jnp.asarray(idx), np.asarray(rewards, np.float32), np.asarray(success), 1)


def test_bad_insert_input_raises_naming_the_problem(make_filled_table):
    table, _ = make_filled_table(8, 4)
    rows = make_rows(-1, 0, 0, np.ones((2, 2), np.uint32), pad_to=ROWS)
    with pytest.raises(IndexError, match=r"protected\[1\] = 8 is out of range \[-1, 8\)"):
        insert(table, rows, step=1, protected=[0, 8])
    with pytest.raises(ValueError, match=r"rows.state_hash must be uint32 \[R, 2\]"):
        insert(table, rows._replace(state_hash=rows.state_hash[:, :1]), step=1)
    with pytest.raises(ValueError, match="evict must be one of"):
        insert(table, rows, step=1, evict="random")
    with pytest.raises(TypeError, match="rows must be a TaskRows"):
        insert(table, {"valid": rows.valid}, step=1)
    with pytest.raises(ValueError, match=r"TaskTable.visits must be \(8,\) int32"):
        insert(table._replace(visits=table.visits[:4]), rows, step=1)
    with pytest.raises(ValueError, match=r"competition_ids has 3 entries, expected R=2"):
        make_rows(-1, [0, 1, 2], 0, np.ones((2, 2), np.uint32))
    with pytest.raises(ValueError, match=r"state_hashes must have shape \[R, 2\]"):
        make_rows(-1, 0, 0, np.ones((2, 3), np.uint32))
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        init_table(0)
    assert isinstance(rows, TaskRows)


def test_duplicates_sharing_a_hash_bucket_are_all_merged(make_filled_table):
    # R = 8 candidates use 2048 buckets keyed by the low 11 bits of the first hash word: these live
    # states all land in bucket 5, so all but one of the queries overflow to the exact fallback pass.
    table, _ = make_filled_table(8, 3)
    live = np.array([[5, 1], [5 + 2048, 2], [5 + 4096, 3]], np.uint32)
    table = table._replace(state_hash=table.state_hash.at[:3].set(live))
    cands = np.concatenate([live[::-1], [[5 + 8192, 4], [5, 9]]]).astype(np.uint32)
    rows = make_rows(-1, 0, 1, cands, pad_to=ROWS)
    lp = np.asarray(learnability(table, potential="success_variance", optimistic_value=0.25))
    new, result = insert(table, rows, step=1)
    expected, next_id = reference_insert(table, rows, 1, np.array([-1]), lp)
    np.testing.assert_array_equal(np.stack([np.asarray(x) for x in result], axis=1), expected)
    assert np.asarray(result.status)[:5].tolist() == [MERGED, MERGED, MERGED, ADDED, ADDED]
    assert np.asarray(result.slot)[:3].tolist() == [2, 1, 0]
    assert int(new.next_task_id) == next_id


def test_insert_into_a_large_full_table_matches_the_brute_force_reference():
    # 4096 rows: eviction ranks through the two-level top-k; LP takes 5 values, so ties abound.
    c, rng = 4096, np.random.default_rng(7)
    table = init_table(c)
    hashes = np.stack([rng.integers(0, 2**32, c, dtype=np.uint32), np.arange(c, dtype=np.uint32)], 1)
    table = table._replace(valid=jnp.ones(c, bool), task_id=jnp.arange(c, dtype=jnp.int32),
                           visits=jnp.asarray(rng.integers(0, 2, c) * 4, jnp.int32),
                           recent_success_rate=jnp.asarray(rng.integers(0, 5, c) / 4, jnp.float32),
                           state_hash=jnp.asarray(hashes), next_task_id=jnp.int32(c))
    lp = np.asarray(learnability(table, potential="success_variance", optimistic_value=0.25))
    for trial in range(3):
        fresh = np.stack([rng.integers(0, 2**32, ROWS, dtype=np.uint32),
                          rng.integers(2**31, 2**32, ROWS, dtype=np.uint32)], 1)
        fresh[:3] = hashes[rng.integers(0, c, 3)]  # duplicates of live tasks
        fresh[5] = fresh[4]  # a duplicate within the batch
        rows = make_rows(-1, 0, 1, fresh)
        lowest = np.flatnonzero(lp == 0)[:20]  # protect some of the first rows eviction would pick
        protected = np.concatenate([lowest[::2], [-1]]).astype(np.int32)
        new, result = insert(table, rows, step=3, protected=protected)
        expected, next_id = reference_insert(table, rows, 3, protected, lp)
        np.testing.assert_array_equal(np.stack([np.asarray(x) for x in result], axis=1), expected,
                                      err_msg=f"trial {trial}")
        assert int(new.next_task_id) == next_id
        assert (expected[:, 3] >= 0).sum() == (expected[:, 0] == ADDED).sum() == 4
