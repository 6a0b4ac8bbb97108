"""The block index: the same tables and insert results as the full-table functions, and the same
sampling distribution, over many rounds (free rows, eviction, ties, duplicates, a hash rebuild)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.curriculum import init_table, insert, make_rows, sample, sampling_probs, update_stats
from ace.curriculum.block_index import (MAX_LOAD, _lookup, build_index, check_index, insert_indexed,
                                        sample_indexed, update_stats_indexed)
from ace.curriculum.buffer import ADDED, DROPPED, MERGED
from ace.curriculum.potential import POTENTIALS

KW = dict(temperature=0.1, potential="success_variance", optimistic_value=0.25)


def assert_tables_equal(a, b, msg):
    for name, x, y in zip(a._fields, a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{msg}: column {name}")


def assert_index_matches_table(index, table, msg):
    """Block summaries equal a fresh build's; every live row is found by its hash."""
    fresh = build_index(table, **KW, evict=index.evict, block=index.block, super_block=index.super_block)
    for name in ("block_logz", "block_valid", "block_evict", "super_logz", "super_valid", "super_evict"):
        np.testing.assert_array_equal(np.asarray(getattr(index, name)), np.asarray(getattr(fresh, name)),
                                      err_msg=f"{msg}: {name}")
    live = np.asarray(table.valid)
    found = np.asarray(_lookup(index.hash_rows, table, table.state_hash, table.valid))
    np.testing.assert_array_equal(found[live], np.flatnonzero(live), err_msg=f"{msg}: hash lookups")
    assert int(index.hash_used) == int((np.asarray(index.hash_rows) >= 0).sum())


def random_rows(rng, table, r, step):
    """R candidates: fresh states, repeats of live states, repeats within the batch, padding, deep rows."""
    live = np.flatnonzero(np.asarray(table.valid))
    hashes = rng.integers(0, 2**32, (r, 2), dtype=np.uint64).astype(np.uint32)
    dup_live = rng.random(r) < 0.25
    if live.size:
        hashes[dup_live] = np.asarray(table.state_hash)[rng.choice(live, dup_live.sum())]
    dup_batch = rng.random(r) < 0.15
    hashes[dup_batch] = hashes[rng.integers(0, r, dup_batch.sum())]
    rows = make_rows(rng.integers(-1, 50, r), rng.integers(0, 3, r), rng.integers(0, 5, r), hashes)
    return rows._replace(valid=jnp.asarray(rng.random(r) < 0.9))


@pytest.mark.parametrize("capacity, block, super_block, evict, max_depth", [
    (512, 4, 2, "potential", None),  # 64 super-blocks: more than the 2R + P the insert keeps
    (300, 4, 3, "potential", 3),     # a short last block and a short last super-block
    (256, 2, 4, "oldest", None),
])
def test_rounds_through_the_index_equal_the_full_table_functions(capacity, block, super_block, evict, max_depth):
    rng = np.random.default_rng(capacity + block)
    r, n = 16, 12
    table = init_table(capacity)
    n0 = int(0.8 * capacity)  # the table fills within the rounds: eviction and drops run
    table, _ = insert(table, make_rows(-1, 0, 0, rng.integers(0, 2**32, (n0, 2), dtype=np.uint64).astype(np.uint32)),
                      step=0)
    index = build_index(table, **KW, evict=evict, block=block, super_block=super_block)
    full = table
    seen, evicted = set(), 0
    rebuilds = 0
    for step in range(1, 80 if capacity == 256 else 45):
        live = np.flatnonzero(np.asarray(table.valid))
        # The rows rolled out this round; success rates in eighths, so potentials tie often.
        idx = rng.choice(live, min(n, live.size), replace=False).astype(np.int32)
        success = rng.random((idx.size, 8)) < rng.choice([0.0, 0.5, 1.0], idx.size)[:, None]
        rewards = success + rng.random(success.shape).astype(np.float32) * 0.1
        full = update_stats(full, idx, rewards, success, step)
        table, index = update_stats_indexed(table, index, idx, rewards, success, step)
        assert_tables_equal(table, full, f"step {step} update_stats")

        rows = random_rows(rng, table, r, step)
        protected = np.concatenate([idx, -np.ones(n - idx.size, np.int32)])
        if step % 6 == 0:  # every row is being rolled out: new candidates must be dropped
            protected = np.arange(capacity, dtype=np.int32)
        used_before = int(index.hash_used)
        full, expected = insert(full, rows, step=step, protected=protected, evict=evict, max_depth=max_depth)
        table, index, got = insert_indexed(table, index, rows, step=step, protected=protected, max_depth=max_depth)
        for name, x, y in zip(got._fields, got, expected):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"step {step} InsertResult.{name}")
        assert_tables_equal(table, full, f"step {step} insert")
        assert_index_matches_table(index, table, f"step {step}")
        n_added = int((np.asarray(got.status) == ADDED).sum())
        if used_before + n_added > MAX_LOAD * index.hash_rows.shape[0]:  # rebuilt: only live entries left
            assert int(index.hash_used) == int(np.asarray(table.valid).sum())
            rebuilds += 1
        else:
            assert int(index.hash_used) == used_before + n_added
        seen.update(np.asarray(got.status).tolist())
        evicted += int((np.asarray(got.evicted_task_id) >= 0).sum())
    assert {ADDED, MERGED, DROPPED} <= seen and evicted > 0, (seen, evicted)
    if capacity == 256:  # H = 512 slots: the load limit is reached within the rounds
        assert rebuilds >= 1, "the hash index never reached its load limit: the rebuild went untested"
    assert int(index.hash_used) <= MAX_LOAD * index.hash_rows.shape[0]


def _table_with_levels(rng, capacity, n_empty):
    """A full-ish table whose potentials take a few levels (some rows never tried)."""
    table = init_table(capacity)
    table, _ = insert(table, make_rows(-1, 0, 0, rng.integers(0, 2**32, (capacity, 2), dtype=np.uint64)
                                       .astype(np.uint32)), step=0)
    p = rng.choice([0.0, 0.25, 0.5, 1.0], capacity).astype(np.float32)
    visits = np.where(rng.random(capacity) < 0.8, 8, 0).astype(np.int32)
    valid = np.ones(capacity, bool)
    valid[rng.choice(capacity, n_empty, replace=False)] = False
    return table._replace(recent_success_rate=jnp.asarray(p), visits=jnp.asarray(visits), valid=jnp.asarray(valid))


def test_first_draws_follow_the_sampling_probabilities():
    rng = np.random.default_rng(0)
    table = _table_with_levels(rng, 60, 10)  # 30 blocks of 2 in 10 super-blocks, some with empty rows
    index = build_index(table, **KW, block=2, super_block=3)
    q = np.asarray(sampling_probs(table, eps_uniform=0.2, **KW))
    draws = 40_000
    keys = jax.random.split(jax.random.key(1), draws)
    got = np.asarray(jax.jit(jax.vmap(lambda k: sample_indexed(k, table, index, 3, eps_uniform=0.2)))(keys))
    assert (np.sort(got, axis=1)[:, 1:] != np.sort(got, axis=1)[:, :-1]).all(), "a row was drawn twice"
    assert np.asarray(table.valid)[got].all(), "an empty row was drawn"
    freq = np.bincount(got[:, 0], minlength=60) / draws
    sigma = np.sqrt(q * (1 - q) / draws)
    assert (np.abs(freq - q) <= 5 * sigma + 1e-9).all(), np.abs(freq - q).max()
    # Second draws: P(second = j) = sum_i q_i q_j / (1 - q_i), by the chain rule without replacement.
    second = np.bincount(got[:, 1], minlength=60) / draws
    expect = np.array([sum(q[i] * q[j] / (1 - q[i]) for i in range(60) if i != j) for j in range(60)])
    assert (np.abs(second - expect) <= 5 * np.sqrt(expect * (1 - expect) / draws) + 1e-9).all()


def test_inclusion_frequencies_match_the_full_table_sampler():
    rng = np.random.default_rng(1)
    table = _table_with_levels(rng, 512, 40)
    index = build_index(table, **KW, block=4, super_block=4)  # 128 blocks, 32 super-blocks: n = 16 < 32
    draws = 2000
    keys = jax.random.split(jax.random.key(2), draws)
    a = np.asarray(jax.jit(jax.vmap(lambda k: sample_indexed(k, table, index, 16, eps_uniform=0.1)))(keys))
    b = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, table, 16, eps_uniform=0.1, **KW)))(keys))
    lp = np.where(np.asarray(table.visits) > 0, np.asarray(table.recent_success_rate) * (1 - np.asarray(
        table.recent_success_rate)), 0.25)
    valid = np.asarray(table.valid)
    hits_a, hits_b = np.bincount(a.ravel(), minlength=512), np.bincount(b.ravel(), minlength=512)
    for level in np.unique(lp[valid]):
        rows = valid & (lp == level)
        fa, fb = hits_a[rows].mean() / draws, hits_b[rows].mean() / draws
        assert abs(fa - fb) < 0.02 + 0.05 * fb, (level, fa, fb)


def test_a_one_million_row_round_matches_insert():
    """At the bench's size: one indexed round leaves the table `insert` leaves."""
    rng = np.random.default_rng(3)
    c = 1 << 20
    table = init_table(c)._replace(valid=jnp.ones(c, bool), task_id=jnp.arange(c, dtype=jnp.int32),
                                   visits=jnp.asarray(rng.integers(0, 3, c) * 8, jnp.int32),
                                   recent_success_rate=jnp.asarray(rng.integers(0, 9, c) / 8, jnp.float32),
                                   state_hash=jnp.asarray(np.stack([rng.integers(0, 2**32, c, dtype=np.uint64)
                                                                    .astype(np.uint32),
                                                                    np.arange(c, dtype=np.uint32)], 1)),
                                   next_task_id=jnp.int32(c))
    index = build_index(table, **KW)
    idx = sample_indexed(jax.random.key(0), table, index, 256, eps_uniform=0.1)
    assert len(set(np.asarray(idx).tolist())) == 256
    rows = random_rows(rng, table, 64, 1)
    full, expected = insert(table, rows, step=1, protected=idx)
    new, index, got = insert_indexed(table, index, rows, step=1, protected=idx)
    for x, y in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert_tables_equal(new, full, "1M rows")


def test_bad_arguments_raise_naming_the_problem(monkeypatch):
    table = init_table(32)

    def age(table, *, optimistic_value, step=None):  # depends on the step: not row-local
        return (step - table.created_step).astype(jnp.float32)

    monkeypatch.setitem(POTENTIALS._fns, "test_age_potential", age)  # registered for this test only
    with pytest.raises(ValueError, match="'test_age_potential' is not row-local"):
        build_index(table, temperature=0.1, potential="test_age_potential", optimistic_value=0.25)
    with pytest.raises(ValueError, match="block must be an int >= 2"):
        build_index(table, **KW, block=1)
    index = build_index(table, **KW, block=8)
    with pytest.raises(ValueError, match="capacity 64 needs 8 blocks"):
        check_index(init_table(64), index)
    with pytest.raises(ValueError, match="only 0 valid rows"):
        sample_indexed(jax.random.key(0), table, index, 2, eps_uniform=0.1)
    with pytest.raises(ValueError, match="temperature"):
        build_index(table, temperature=0.0, potential="success_variance", optimistic_value=0.25)
    with pytest.raises(TypeError, match="TaskRows"):
        insert_indexed(table, index, tuple(range(5)), step=0)
