"""Benchmark: one curriculum round on a full 1,000,000-row table, jitted vs vectorised NumPy and plain Python.

A round is what the trainer does per step: `sample(n=256)` tasks by Learnability Potential,
`update_stats` with their [256, 8] group rewards, `insert` 64 children (8 of them duplicates of
live tasks) into the full table, protecting the tasks being rolled out. Two jitted paths run the
round as one compiled function with the table donated (updated in place), as the trainer's hot
loop would:
  - full table: `sample`, `update_stats`, `insert`, each a pass over all C rows;
  - block index (`ace.curriculum.block_index`, the trainer's path): the same results from
    per-block sums and a hash index, reading a few thousand rows per round.
Two baselines do the same work:
  - vectorised NumPy (the fair one): the table as a dict of NumPy columns, the potential and the
    eps-uniform softmax as array passes into preallocated buffers, sampling without replacement
    as the top n of q / Exp(1) keys by `np.partition` (Gumbel-top-k / Efraimidis-Spirakis),
    update_stats by fancy indexing (the same Chan et al. merge), a hash -> row dict for
    deduplication, eviction of the unprotected rows of lowest potential (`np.partition`);
  - plain Python: a list of dicts with a hash -> row dict.
Every run first checks, on a 1000-row table, that the NumPy round, the list-of-dicts round, the
jitted update_stats + insert and the block-index ones leave the same table given the same sampled
rows, and that the NumPy and block-index samplers' inclusion frequencies match the jitted sampler's.

Timings are for one CPU device, as `make bench` runs it (with XLA_FLAGS unset). Under the 8 fake
CPU devices that `make test` exports for sharding tests, XLA:CPU adds ~10 us of dispatch to every
op, and the block-index round (a few hundred small ops) takes ~1.3 ms instead of ~0.9 ms; the
header prints the device count.

Prints ms per round for each path and the ratios. Targets: jitted < 10 ms per round, >= 50x the
list-of-dicts baseline, >= 10x the vectorised NumPy baseline.

Run: python bench/curriculum.py [--capacity 1000000] [--rounds 50] [--numpy-rounds 10] [--baseline-rounds 3]
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from ace.curriculum import (TaskRows, TaskTable, init_table, insert, learnability, sample, sampling_probs,
                            update_stats)
from ace.curriculum.block_index import (build_index, insert_indexed, maybe_rehash, sample_indexed,
                                        update_stats_indexed)

N_SAMPLE, GROUP, N_INSERT, N_DUP = 256, 8, 64, 8
TEMPERATURE, EPS, OPTIMISTIC = 0.1, 0.1, 0.25


def full_table(capacity: int, rng: np.random.Generator) -> TaskTable:
    """A table with every row live and tried, with varied success rates."""
    t = init_table(capacity)
    visits = rng.integers(0, 5, capacity) * GROUP
    p = rng.integers(0, GROUP + 1, capacity) / GROUP
    hashes = np.stack([rng.integers(0, 2**32, capacity, dtype=np.uint32),
                       np.arange(capacity, dtype=np.uint32)], axis=1)  # second word: unique
    return t._replace(
        valid=jnp.ones(capacity, bool), task_id=jnp.arange(capacity, dtype=jnp.int32),
        visits=jnp.asarray(visits, jnp.int32),
        successes=jnp.asarray(np.round(visits * p), jnp.int32),
        reward_mean=jnp.asarray(p, jnp.float32), reward_var=jnp.asarray(p * (1 - p), jnp.float32),
        recent_success_rate=jnp.asarray(np.where(visits > 0, p, 0), jnp.float32),
        recent_reward_std=jnp.asarray(np.where(visits > 0, np.sqrt(p * (1 - p)), 0), jnp.float32),
        state_hash=jnp.asarray(hashes), next_task_id=jnp.int32(capacity))


def round_inputs(rng: np.random.Generator, table_hashes: np.ndarray, rounds: int):
    """Per round: rewards [N, G], successes [N, G], new-row hashes [R, 2] (first N_DUP duplicate live tasks)."""
    rewards = rng.random((rounds, N_SAMPLE, GROUP)).astype(np.float32)
    success = rewards > 0.5
    hashes = rng.integers(0, 2**32, (rounds, N_INSERT, 2), dtype=np.uint32)
    hashes[:, :, 1] |= np.uint32(1 << 31)  # disjoint from the table's second words: fresh states
    dup_rows = rng.integers(0, len(table_hashes), (rounds, N_DUP))
    hashes[:, :N_DUP] = table_hashes[dup_rows]
    return rewards, success, hashes


def jax_apply(table, idx, step, rewards, success, hashes):
    """update_stats and insert for the sampled rows idx: the round after sampling."""
    table = update_stats(table, idx, rewards, success, step)
    rows = TaskRows(valid=jnp.ones(N_INSERT, bool), parent_id=idx[:N_INSERT],
                    competition_id=jnp.zeros(N_INSERT, jnp.int32), depth=jnp.ones(N_INSERT, jnp.int32),
                    state_hash=hashes)
    return insert(table, rows, step=step, protected=idx, potential="success_variance",
                  optimistic_value=OPTIMISTIC)


def jax_round(table, key, step, rewards, success, hashes):
    idx = sample(key, table, N_SAMPLE, temperature=TEMPERATURE, eps_uniform=EPS,
                 potential="success_variance", optimistic_value=OPTIMISTIC, step=step)
    table, result = jax_apply(table, idx, step, rewards, success, hashes)
    return table, result.status


def indexed_round(table, index, key, step, rewards, success, hashes):
    """The round through the block index (`ace.curriculum.block_index`): same table, same statuses."""
    idx = sample_indexed(key, table, index, N_SAMPLE, eps_uniform=EPS)
    table, index = update_stats_indexed(table, index, idx, rewards, success, step)
    rows = TaskRows(valid=jnp.ones(N_INSERT, bool), parent_id=idx[:N_INSERT],
                    competition_id=jnp.zeros(N_INSERT, jnp.int32), depth=jnp.ones(N_INSERT, jnp.int32),
                    state_hash=hashes)
    table, index, result = insert_indexed(table, index, rows, step=step, protected=idx)
    return table, index, result.status


def make_index(table):
    return build_index(table, temperature=TEMPERATURE, potential="success_variance", optimistic_value=OPTIMISTIC)


def bench_jax(table, inputs, rounds: int, indexed: bool = False) -> tuple[float, dict]:
    """Median wall time of `rounds - 1` jitted rounds (after a warm-up), the table (and index) donated.

    Inputs are split into per-round device arrays before timing, so a round's time is its call.
    With `indexed`, the index is built first (not timed) and `maybe_rehash` runs after every round
    (timed: a scalar read, and the hash rebuild when one falls due).
    """
    rewards, success, hashes = (list(jnp.asarray(x)) for x in inputs)
    keys = list(jax.random.split(jax.random.key(0), rounds + 1))
    steps = [jnp.int32(i) for i in range(rounds + 1)]
    if indexed:
        index = make_index(table)
        fn = jax.jit(indexed_round, donate_argnums=(0, 1))

        def step_fn(state, i):
            table, index, status = fn(*state, keys[i], steps[i], rewards[i], success[i], hashes[i])
            return (table, maybe_rehash(table, index)), status
        state = (table, index)
    else:
        fn = jax.jit(jax_round, donate_argnums=0)

        def step_fn(state, i):
            return fn(state, keys[i], steps[i], rewards[i], success[i], hashes[i])
        state = table
    state, status = step_fn(state, 0)  # warm-up
    jax.block_until_ready((state, status))
    times, cpu = [], []
    counts = np.zeros(5, int)
    for i in range(1, rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        state, status = step_fn(state, i)
        jax.block_until_ready((state, status))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        counts += np.bincount(np.asarray(status), minlength=5)
    return float(np.median(times)), {"added": int(counts[1]), "merged": int(counts[2]),
                                      "min": float(np.min(times)), "cpu": float(np.median(cpu))}


# ---- plain-Python baseline: the same round on a list of dicts ---------------------------------

def python_table(table: TaskTable) -> tuple[list[dict], dict]:
    cols = {k: np.asarray(v).tolist() for k, v in table._asdict().items() if k != "next_task_id"}
    rows = []
    for i in range(len(cols["valid"])):
        row = {k: cols[k][i] for k in cols if k != "state_hash"}
        row["state_hash"] = tuple(cols["state_hash"][i])
        rows.append(row)
    return rows, {r["state_hash"]: i for i, r in enumerate(rows) if r["valid"]}


def py_potential(row) -> float:
    if row["visits"] == 0:
        return OPTIMISTIC
    p = row["recent_success_rate"]
    return p * (1 - p)


def py_sample(rows, rng: random.Random) -> list[int]:
    valid_rows = [i for i, r in enumerate(rows) if r["valid"]]
    weights = [math.exp(py_potential(rows[i]) / TEMPERATURE) for i in valid_rows]
    z = sum(weights)
    probs = [(1 - EPS) * w / z + EPS / len(valid_rows) for w in weights]
    # Weighted sampling without replacement: top n of keys u^(1/p), in logs to avoid underflow
    # (Efraimidis & Spirakis 2006).
    keyed = ((math.log(1.0 - rng.random()) / p, i) for p, i in zip(probs, valid_rows))
    return [i for _, i in heapq.nlargest(N_SAMPLE, keyed)]


def py_apply(rows, index, next_id, idx, step, rewards, success, hashes) -> int:
    """update_stats and insert for the sampled rows `idx` (distinct); returns the next task id."""
    for j, i in enumerate(idx):
        r, s = rewards[j], success[j]
        row, g = rows[i], len(r)
        g_mean = sum(r) / g
        g_m2 = sum((x - g_mean) ** 2 for x in r)
        n_a = row["visits"]
        n_t = n_a + g
        delta = g_mean - row["reward_mean"]
        m2 = row["reward_var"] * n_a + g_m2 + delta * delta * n_a * g / n_t
        row.update(visits=n_t, successes=row["successes"] + sum(s), reward_mean=row["reward_mean"] + delta * g / n_t,
                   reward_var=m2 / n_t, recent_success_rate=sum(s) / g, recent_reward_std=math.sqrt(g_m2 / g),
                   last_sampled_step=step)

    protected = set(idx)
    fresh, merged_targets = {}, set()  # fresh: hash -> position of its first candidate
    for pos, h in enumerate(hashes):
        h = tuple(h)
        if h in index:
            merged_targets.add(index[h])
        elif h not in fresh:
            fresh[h] = pos
    free = [i for i, r in enumerate(rows) if not r["valid"]][:len(fresh)]
    need = len(fresh) - len(free)
    evict = heapq.nsmallest(need, ((py_potential(r), i) for i, r in enumerate(rows)
                                   if r["valid"] and i not in protected and i not in merged_targets))
    slots = free + [i for _, i in evict]
    for (h, pos), slot in zip(fresh.items(), slots):
        old = rows[slot]
        if old["valid"]:
            del index[old["state_hash"]]
        rows[slot] = dict(valid=True, task_id=next_id, parent_id=idx[pos], competition_id=0, depth=1, visits=0,
                          successes=0, reward_mean=0.0, reward_var=0.0, recent_success_rate=0.0,
                          recent_reward_std=0.0, last_sampled_step=-1, created_step=step, state_hash=h)
        index[h] = slot
        next_id += 1
    return next_id


def py_round(rows, index, next_id, rng: random.Random, step, rewards, success, hashes):
    idx = py_sample(rows, rng)
    return py_apply(rows, index, next_id, idx, step, rewards, success, hashes)


# ---- vectorised NumPy baseline: the same round on NumPy columns ------------------------------

def hash_keys(hashes: np.ndarray) -> list[int]:
    """[R, 2] uint32 state hashes -> R Python ints (h0 << 32 | h1), the dedup dict's keys."""
    return ((hashes[:, 0].astype(np.uint64) << np.uint64(32)) | hashes[:, 1]).tolist()


def smallest(x: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k smallest finite entries of x, ascending by (value, row): ties go to the lowest row,
    as in `insert` and the list-of-dicts baseline.

    With v the k-th smallest value, that is every row below v and the first rows equal to v (a
    partition picks among ties arbitrarily, so those come from a scan from the front). When at
    least k rows hold the minimum, v is the minimum and no partition is needed: tables hold many
    rows of potential 0 (tasks always or never solved), and eviction takes those.
    """
    k = min(k, len(x))
    if k <= 0:
        return np.zeros(0, np.int64)
    v = x.min()
    if np.count_nonzero(x == v) >= k:
        below = np.zeros(0, np.int64)
    else:
        v = np.partition(x, k - 1)[k - 1]
        below = np.flatnonzero(x < v)
    rest, ties, found, chunk = k - len(below), [], 0, 1 << 16
    for start in range(0, len(x), chunk):
        ties.append(np.flatnonzero(x[start:start + chunk] == v) + start)
        found += len(ties[-1])
        if found >= rest:
            break
    chosen = np.concatenate([below, np.concatenate(ties)[:rest]])
    chosen = chosen[np.lexsort((chosen, x[chosen]))]
    return chosen[np.isfinite(x[chosen])]


class NumpyCurriculum:
    """The round on a dict of NumPy columns (TaskTable's), with a hash -> row dict for deduplication.

    [C] scratch buffers are allocated once: a fresh 4 MB temporary per pass would page-fault on
    every round. The round is sample() then apply(); apply() reuses the potentials sample() left in
    `self.lp` for eviction, which is exact: the only rows whose potential update_stats changes are
    the sampled ones, and those are protected from eviction.
    """

    def __init__(self, table: TaskTable, seed: int = 0):
        self.t = {k: np.array(v) for k, v in table._asdict().items()}
        self.t["next_task_id"] = int(self.t["next_task_id"])
        live = np.flatnonzero(self.t["valid"])
        self.index = dict(zip(hash_keys(self.t["state_hash"][live]), live.tolist()))
        self.rng = np.random.default_rng(seed)
        c = len(self.t["valid"])
        self.lp, self.w, self.key = (np.zeros(c, np.float32) for _ in range(3))
        self.mask = np.zeros(c, bool)

    def potential(self) -> np.ndarray:
        """success_variance LP of every row into self.lp: p(1-p), OPTIMISTIC if never visited."""
        p, lp, mask, buf = self.t["recent_success_rate"], self.lp, self.mask, self.key
        np.subtract(1.0, p, out=lp)
        np.multiply(lp, p, out=lp)
        # Arithmetic select, bit-exact: a masked copy (np.copyto(where=), lp[mask] = ...) costs ~3 ms
        # per 1M rows for its branchy loop, about three times the four passes below.
        np.greater(self.t["visits"], 0, out=mask)
        np.multiply(lp, mask, out=lp)
        np.logical_not(mask, out=mask)
        np.multiply(mask, np.float32(OPTIMISTIC), out=buf)
        np.add(lp, buf, out=lp)
        return lp

    def sample(self, n: int = N_SAMPLE) -> np.ndarray:
        """n distinct valid rows in draw order, first-draw probabilities
        q = (1 - eps) softmax(LP / T) + eps / N_valid: top n of q / E, E ~ Exp(1) (Gumbel-top-k,
        i.e. Efraimidis-Spirakis in logs)."""
        valid, lp, w, key = self.t["valid"], self.potential(), self.w, self.key
        n_valid = np.count_nonzero(valid)
        full = n_valid == len(valid)
        if n > n_valid:
            raise ValueError(f"cannot draw {n} rows without replacement from {n_valid} valid rows")
        m = lp.max() if full else lp.max(where=valid, initial=-np.inf)
        np.divide(lp, np.float32(TEMPERATURE), out=w)
        np.subtract(w, np.float32(m / TEMPERATURE), out=w)
        np.exp(w, out=w)
        if not full:
            np.multiply(w, valid, out=w)  # empty rows weigh 0
        # q = (1-eps) w / z + eps / N = ((1-eps) / z) (w + c): the positive factor does not change
        # the ranking, so one pass adds c.
        z = w.sum(dtype=np.float32)
        np.add(w, np.float32(EPS * z / ((1.0 - EPS) * n_valid)), out=w)
        if not full:
            np.multiply(w, valid, out=w)
        self.rng.random(dtype=np.float32, out=key)
        with np.errstate(divide="ignore"):
            np.log(key, out=key)  # -E (a u of exactly 0, p = 2**-24 per row, gives -inf: never drawn)
        np.divide(w, key, out=key)  # -q / E; empty rows -0.0, never drawn while n <= N_valid
        # The n smallest keys: a partition (no index array) for the n-th value, then one compare
        # pass, is ~0.5 ms faster per 1M rows than np.argpartition.
        top = np.flatnonzero(key <= np.partition(key, n - 1)[n - 1])
        return top[np.argsort(key[top], kind="stable")][:n]

    def update_stats(self, idx: np.ndarray, rewards: np.ndarray, success: np.ndarray, step: int) -> None:
        """Chan et al. merge of one [G] group per row into the running stats; idx rows distinct."""
        t, g = self.t, rewards.shape[1]
        g_mean = rewards.mean(axis=1, dtype=np.float32)
        g_m2 = np.square(rewards - g_mean[:, None]).sum(axis=1)
        succ = success.sum(axis=1)
        n_a = t["visits"][idx].astype(np.float32)
        mean_a = t["reward_mean"][idx]
        n_t = n_a + g
        delta = g_mean - mean_a
        m2 = t["reward_var"][idx] * n_a + g_m2 + np.square(delta) * n_a * g / n_t
        t["visits"][idx] += g
        t["successes"][idx] += succ.astype(np.int32)
        t["reward_mean"][idx] = mean_a + delta * g / n_t
        t["reward_var"][idx] = np.maximum(m2, 0.0) / n_t
        t["recent_success_rate"][idx] = succ / np.float32(g)
        t["recent_reward_std"][idx] = np.sqrt(np.maximum(g_m2, 0.0) / g)
        t["last_sampled_step"][idx] = step

    def insert(self, idx: np.ndarray, hashes: np.ndarray, step: int) -> tuple[int, int]:
        """Children of idx[:R] with `hashes`: merge duplicates of live rows (and of earlier
        candidates), fill empty rows, then evict the lowest-potential unprotected rows. Needs
        self.lp from sample() this round. Returns (added, merged)."""
        t, index = self.t, self.index
        keys = hash_keys(hashes)
        fresh, merged = {}, []  # fresh: key -> position of its first candidate
        for pos, k in enumerate(keys):
            row = index.get(k)
            if row is not None:
                merged.append(row)
            elif k not in fresh:
                fresh[k] = pos
        valid = t["valid"]
        full = np.count_nonzero(valid) == len(valid)
        free = np.zeros(0, np.int64) if full else np.flatnonzero(~valid)[:len(fresh)]
        evict = np.zeros(0, np.int64)
        if len(fresh) > len(free):
            ek = self.lp  # potentials of this round; rows update_stats changed are protected below
            ek[idx] = np.inf
            ek[merged] = np.inf
            if not full:
                np.copyto(ek, np.inf, where=~valid)
            evict = smallest(ek, len(fresh) - len(free))
        slots = np.concatenate([free, evict])
        m = len(slots)
        for k in hash_keys(t["state_hash"][evict]):
            del index[k]
        new_keys, pos = list(fresh)[:m], np.fromiter(fresh.values(), np.int64, len(fresh))[:m]
        index.update(zip(new_keys, slots.tolist()))
        nid = t["next_task_id"]
        for name, value in (("valid", True), ("task_id", np.arange(nid, nid + m)), ("parent_id", idx[pos]),
                            ("competition_id", 0), ("depth", 1), ("visits", 0), ("successes", 0),
                            ("reward_mean", 0.0), ("reward_var", 0.0), ("recent_success_rate", 0.0),
                            ("recent_reward_std", 0.0), ("last_sampled_step", -1), ("created_step", step),
                            ("state_hash", hashes[pos])):
            t[name][slots] = value
        t["next_task_id"] = nid + m
        return m, len(keys) - len(fresh)

    def apply(self, idx, step, rewards, success, hashes) -> tuple[int, int]:
        self.update_stats(idx, rewards, success, step)
        return self.insert(idx, hashes, step)

    def round(self, step, rewards, success, hashes, phases: list | None = None) -> tuple[int, int]:
        t0 = time.perf_counter()
        idx = self.sample()
        t1 = time.perf_counter()
        self.update_stats(idx, rewards, success, step)
        t2 = time.perf_counter()
        counts = self.insert(idx, hashes, step)
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return counts


def bench_numpy(table, inputs, rounds: int) -> tuple[float, dict]:
    """Median wall time of `rounds` NumPy rounds (after one warm-up round), with a phase breakdown."""
    npc = NumpyCurriculum(table)
    rewards, success, hashes = inputs
    npc.round(0, rewards[0], success[0], hashes[0])  # warm-up: touches the scratch buffers
    times, cpu, phases = [], [], []
    counts = np.zeros(2, int)
    for i in range(1, rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        counts += npc.round(i, rewards[i], success[i], hashes[i], phases)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    sample_s, update_s, insert_s = np.median(np.array(phases), axis=0)
    return float(np.median(times)), {"min": float(np.min(times)), "cpu": float(np.median(cpu)),
                                      "added": int(counts[0]), "merged": int(counts[1]), "sample": sample_s,
                                      "update": update_s, "insert": insert_s}


def bench_python(table, inputs, rounds: int) -> float:
    rows, index = python_table(table)
    rewards, success, hashes = (x.tolist() for x in inputs)
    rng = random.Random(0)
    next_id = len(rows)
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        next_id = py_round(rows, index, next_id, rng, i, rewards[i], success[i], hashes[i])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---- correctness checks (small table, every run) -----------------------------------------------

def _columns_agree(name: str, cols: dict, ref: dict) -> None:
    for k in TaskTable._fields[:-1]:  # every column but next_task_id
        a, b = np.asarray(cols[k]), np.asarray(ref[k])
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            bad = ~np.isclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            bad = a != b
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(a), -1).any(axis=1))
            raise AssertionError(f"{name}: column {k} differs on {len(rows)} rows, e.g. row {rows[0]}: "
                                 f"{a[rows[0]]} vs {b[rows[0]]}")


def check_rounds(capacity: int = 1000, rounds: int = 4) -> str:
    """The NumPy round, the list-of-dicts round and the jitted update_stats + insert, from the same
    table with the same sampled rows (the NumPy sampler's), leave the same table: statistics (to
    float32 tolerance), ids, and which hashes are live. The table starts with 40 empty rows, and a
    candidate of each batch repeats another, so free rows, eviction and in-batch merges all run."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 3000).astype(np.float32)
    x[rng.choice(3000, 300, replace=False)] = np.inf
    for k in (1, 40, 600, 2900):  # eviction order: both of smallest()'s paths against a full sort
        ref = np.lexsort((np.arange(3000), x))[:k]
        assert np.array_equal(smallest(x, k), ref[np.isfinite(x[ref])]), f"smallest(x, {k})"
    table = full_table(capacity, rng)
    valid = np.ones(capacity, bool)
    valid[rng.choice(capacity, 40, replace=False)] = False
    table = table._replace(valid=jnp.asarray(valid))
    rewards, success, hashes = round_inputs(rng, np.asarray(table.state_hash), rounds)
    hashes[:, N_DUP + 1] = hashes[:, N_DUP]
    npc = NumpyCurriculum(table, seed=1)
    rows, index = python_table(table)
    next_id = capacity
    apply_jit = jax.jit(jax_apply)
    jt, added = table, 0
    it, bindex = table, build_index(table, temperature=TEMPERATURE, potential="success_variance",
                                    optimistic_value=OPTIMISTIC, block=8, super_block=4)  # 125 blocks, 32 groups
    for i in range(rounds):
        idx = npc.sample()
        assert len(set(idx.tolist())) == N_SAMPLE and npc.t["valid"][idx].all(), "NumPy sampler: bad rows"
        next_id = py_apply(rows, index, next_id, idx.tolist(), i, rewards[i].tolist(), success[i].tolist(),
                           hashes[i].tolist())
        added += npc.apply(idx, i, rewards[i], success[i], hashes[i])[0]
        jt, jax_result = apply_jit(jt, jnp.asarray(idx, jnp.int32), jnp.int32(i), rewards[i], success[i], hashes[i])
        it, bindex = update_stats_indexed(it, bindex, idx, rewards[i], success[i], i)
        cands = TaskRows(valid=jnp.ones(N_INSERT, bool), parent_id=jnp.asarray(idx[:N_INSERT], jnp.int32),
                         competition_id=jnp.zeros(N_INSERT, jnp.int32), depth=jnp.ones(N_INSERT, jnp.int32),
                         state_hash=jnp.asarray(hashes[i]))
        it, bindex, result = insert_indexed(it, bindex, cands, step=i, protected=idx)
        assert all(np.array_equal(a, b) for a, b in zip(result, jax_result)), "indexed vs jitted InsertResult"
        _columns_agree(f"round {i}: block index vs jitted", it._asdict(), jt._asdict())
        py_cols = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        _columns_agree(f"round {i}: NumPy vs list-of-dicts", npc.t, py_cols)
        _columns_agree(f"round {i}: NumPy vs jitted", npc.t, jt._asdict())
        assert npc.t["next_task_id"] == next_id == int(jt.next_task_id), "next task ids differ"
        assert npc.index == {h[0] << 32 | h[1]: r for h, r in index.items()}, "live hash -> row dicts differ"
    return (f"check: NumPy == list-of-dicts == jitted update_stats + insert == block index after {rounds} rounds "
            f"on capacity {capacity} ({added} rows added) - ok")


def check_sampler(capacity: int = 1000, draws: int = 200) -> str:
    """The NumPy sampler's probabilities are `sampling_probs`, and its inclusion frequencies per
    potential level match the jitted sampler's over `draws` draws of N_SAMPLE rows each. A tenth of
    the rows are empty: neither sampler may draw them."""
    rng = np.random.default_rng(2)
    table = full_table(capacity, rng)
    valid = np.ones(capacity, bool)
    valid[rng.choice(capacity, capacity // 10, replace=False)] = False
    table = table._replace(valid=jnp.asarray(valid))
    npc = NumpyCurriculum(table, seed=2)
    npc.sample()
    q = npc.w / npc.w.sum(dtype=np.float64)
    q_jax = np.asarray(sampling_probs(table, temperature=TEMPERATURE, eps_uniform=EPS, potential="success_variance",
                                      optimistic_value=OPTIMISTIC))
    assert np.allclose(q, q_jax, rtol=1e-4, atol=1e-9), \
        f"NumPy sampling probabilities: max error {np.abs(q - q_jax).max()}"
    lp = npc.potential().copy()
    lp_jax = np.asarray(learnability(table, potential="success_variance", optimistic_value=OPTIMISTIC))
    assert np.array_equal(lp[valid], lp_jax[valid]), "NumPy potential"
    hits_np = np.zeros(capacity)
    for _ in range(draws):
        hits_np[npc.sample()] += 1
    draw = jax.jit(jax.vmap(lambda k: sample(k, table, N_SAMPLE, temperature=TEMPERATURE, eps_uniform=EPS,
                                             potential="success_variance", optimistic_value=OPTIMISTIC)))
    hits_jax = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(3), draws))).ravel(),
                           minlength=capacity)
    index = build_index(table, temperature=TEMPERATURE, potential="success_variance", optimistic_value=OPTIMISTIC,
                        block=4, super_block=4)
    draw_indexed = jax.jit(jax.vmap(lambda k: sample_indexed(k, table, index, N_SAMPLE, eps_uniform=EPS)))
    hits_idx = np.bincount(np.asarray(draw_indexed(jax.random.split(jax.random.key(4), draws))).ravel(),
                           minlength=capacity)
    assert not hits_np[~valid].any() and not hits_jax[~valid].any() and not hits_idx[~valid].any(), \
        "an empty row was drawn"
    levels = np.unique(lp[valid])
    f_np, f_jax, f_idx = (np.array([h[valid & (lp == v)].mean() / draws for v in levels])
                          for h in (hits_np, hits_jax, hits_idx))
    assert np.abs(f_np - f_jax).max() < 0.03, f"inclusion frequency by level: NumPy {f_np}, jitted {f_jax}"
    assert np.abs(f_idx - f_jax).max() < 0.03, f"inclusion frequency by level: indexed {f_idx}, jitted {f_jax}"
    assert all((np.diff(f) > 0).all() for f in (f_np, f_jax, f_idx)), "higher potential must be drawn more"
    pairs = ", ".join(f"{v:.3f}: {a:.3f}/{b:.3f}/{c:.3f}" for v, a, b, c in zip(levels, f_np, f_jax, f_idx))
    return (f"check: sampler inclusion by LP level (NumPy/jitted/indexed, {draws} draws of {N_SAMPLE} of "
            f"{capacity}) {pairs} - ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--numpy-rounds", type=int, default=10)
    parser.add_argument("--baseline-rounds", type=int, default=3)
    args = parser.parse_args()
    print(check_rounds())
    print(check_sampler())
    rng = np.random.default_rng(0)
    table = full_table(args.capacity, rng)
    inputs = round_inputs(rng, np.asarray(table.state_hash),
                          max(args.rounds, args.baseline_rounds, args.numpy_rounds + 1))

    py_table = jax.tree_util.tree_map(np.asarray, table)  # the jitted paths donate their copies
    print(f"capacity={args.capacity:,} sample n={N_SAMPLE} G={GROUP} insert R={N_INSERT} "
          f"({N_DUP} duplicates) backend={jax.default_backend()} devices={jax.device_count()}")
    t_full, counts = bench_jax(table, inputs, args.rounds)
    print(f"jitted, full table:{t_full * 1e3:8.2f} ms  (median of {args.rounds - 1}; min {counts['min'] * 1e3:.2f} ms; "
          f"process CPU time {counts['cpu'] * 1e3:.2f} ms; rows added {counts['added']}, merged {counts['merged']})")
    t_jax, counts = bench_jax(TaskTable(*(jnp.asarray(x) for x in py_table)), inputs, args.rounds, indexed=True)
    print(f"jitted, block index:{t_jax * 1e3:7.2f} ms  (median of {args.rounds - 1}; min {counts['min'] * 1e3:.2f} ms; "
          f"process CPU time {counts['cpu'] * 1e3:.2f} ms; rows added {counts['added']}, merged {counts['merged']})")
    t_np, st = bench_numpy(TaskTable(*py_table), inputs, args.numpy_rounds)
    print(f"vectorised NumPy:  {t_np * 1e3:8.2f} ms  (median of {args.numpy_rounds}; min {st['min'] * 1e3:.2f} ms; "
          f"process CPU time {st['cpu'] * 1e3:.2f} ms; rows added {st['added']}, merged {st['merged']}; "
          f"phases: sample {st['sample'] * 1e3:.2f}, update_stats {st['update'] * 1e3:.2f}, "
          f"insert {st['insert'] * 1e3:.2f} ms)")
    t_py = bench_python(TaskTable(*py_table), inputs, args.baseline_rounds)
    print(f"plain-Python round:{t_py * 1e3:8.1f} ms  (median of {args.baseline_rounds})")
    print(f"block index vs list-of-dicts: {t_py / t_jax:.0f}x   target: < 10 ms per round and >= 50x "
          f"-> {'met' if t_jax < 0.010 and t_py / t_jax >= 50 else 'NOT met'}")
    print(f"jitted (block index) vs vectorised NumPy: {t_np / t_jax:.1f}x (target >= 10x) "
          f"-> {'met' if t_np / t_jax >= 10 else 'NOT met'}; the full-table jitted round: {t_np / t_full:.1f}x")


if __name__ == "__main__":
    main()
