"""TaskStore mirrors the table through random insert/evict sequences and survives a checkpoint."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.curriculum import init_table, insert, make_rows, sample, state_hash, update_stats
from ace.curriculum.buffer import ADDED
from ace.curriculum.store import TaskPayload, TaskStore

ROWS = 8


def test_store_and_table_stay_consistent_through_random_insert_evict_sequences():
    rng = np.random.default_rng(0)
    table, store = init_table(8), TaskStore()
    key = jax.random.key(0)
    texts = [f"prefix {i}" for i in range(40)]  # a small pool, so states recur and merge
    for step in range(25):
        n_valid = int(table.valid.sum())
        idx = None
        if n_valid >= 3:
            key, sub = jax.random.split(key)
            idx = sample(sub, table, 3, temperature=0.5, eps_uniform=0.2, potential="success_variance", step=step)
            succ = rng.random((3, 4)) < 0.5
            table = update_stats(table, idx, succ.astype(np.float32), succ, step)
        n = int(rng.integers(1, ROWS + 1))
        payloads = [TaskPayload(competition="comp", prefix=texts[rng.integers(0, len(texts))]) for _ in range(n)]
        rows = make_rows(-1, 0, 1, np.stack([state_hash(p.text()) for p in payloads]), pad_to=ROWS)
        protected = jnp.full((3,), -1, jnp.int32) if idx is None else idx
        table, result = insert(table, rows, step=step, protected=protected)
        store.apply_insert(result, payloads + [None] * (ROWS - n))
        store.check_consistent(table)
        # Every live row's payload hashes to the row's state hash: nothing was attached to the wrong row.
        for row in np.flatnonzero(np.asarray(table.valid)):
            tid = int(table.task_id[row])
            np.testing.assert_array_equal(state_hash(store[tid].text()), np.asarray(table.state_hash[row]))
    assert int(table.next_task_id) > 8  # evictions happened


def test_state_dict_round_trips_through_json():
    store = TaskStore()
    payloads = [TaskPayload("titanic", "step 1", "print(1)", 0.5), TaskPayload("iris")]
    table, result = insert(init_table(4), make_rows(-1, 0, 0, np.stack([state_hash(p.text()) for p in payloads])),
                           step=0)
    store.apply_insert(result, payloads)
    assert store.update_best(1, code="fit()", score=0.9, higher_is_better=True)
    assert not store.update_best(1, code="worse()", score=0.8, higher_is_better=True)
    restored = TaskStore.from_state_dict(json.loads(json.dumps(store.state_dict())))
    assert restored.ids() == store.ids() == {0, 1}
    assert restored[0] == payloads[0] and restored[1].best_code == "fit()" and restored[1].best_score == 0.9
    restored.check_consistent(table)
    with pytest.raises(ValueError, match="version 1"):
        TaskStore.from_state_dict({"version": 7, "tasks": []})


def test_state_hash_is_stable_and_distinguishes_states():
    h = state_hash("titanic\x00")
    assert h.dtype == np.uint32 and h.shape == (2,)
    # Pinned value: a changed hash would silently un-merge states restored from old checkpoints.
    assert h.tolist() == state_hash("titanic\x00").tolist() == [47776696, 674618033]
    assert state_hash("titanic\x00a").tolist() != h.tolist()
    with pytest.raises(TypeError, match="state_hash takes the task's text state as str"):
        state_hash(b"bytes")


def test_bad_apply_insert_leaves_the_store_unchanged():
    store = TaskStore()
    payloads = [TaskPayload("a"), TaskPayload("b")]
    _, result = insert(init_table(4), make_rows(-1, 0, 0, np.stack([state_hash(p.text()) for p in payloads])), step=0)
    with pytest.raises(ValueError, match="got 1 payloads for an InsertResult of R=2 rows"):
        store.apply_insert(result, payloads[:1])
    with pytest.raises(TypeError, match=r"payloads\[1\] must be a TaskPayload"):
        store.apply_insert(result, [payloads[0], None])
    assert len(store) == 0
    evicting = result._replace(evicted_task_id=jnp.array([42, -1]))
    with pytest.raises(ValueError, match=r"evicts task ids \[42\]"):
        store.apply_insert(evicting, payloads)
    assert len(store) == 0
    store.apply_insert(result, payloads)
    assert np.asarray(result.status).tolist() == [ADDED, ADDED] and len(store) == 2
    with pytest.raises(ValueError, match="competition must be a non-empty str"):
        TaskPayload("")
