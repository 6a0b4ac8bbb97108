"""Benchmark: one curriculum round on a full 1,000,000-row table, jitted vs a plain-Python baseline.

A round is what the trainer does per step: `sample(n=256)` tasks by Learnability Potential,
`update_stats` with their [256, 8] group rewards, `insert` 64 children (8 of them duplicates of
live tasks) into the full table, protecting the tasks being rolled out. The jitted path runs the
round as one compiled function with the table donated (updated in place), as the trainer's hot
loop would; the baseline does the same work on a list of dicts with a hash -> row dict for
deduplication. Prints ms per round and the ratio. Target: < 10 ms per round, >= 50x the baseline.

Run: python bench/curriculum.py [--capacity 1000000] [--rounds 50] [--baseline-rounds 3]
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

from ace.curriculum import TaskRows, TaskTable, init_table, insert, sample, update_stats

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


def jax_round(table, key, step, rewards, success, hashes):
    idx = sample(key, table, N_SAMPLE, temperature=TEMPERATURE, eps_uniform=EPS,
                 potential="success_variance", optimistic_value=OPTIMISTIC, step=step)
    table = update_stats(table, idx, rewards, success, step)
    rows = TaskRows(valid=jnp.ones(N_INSERT, bool), parent_id=idx[:N_INSERT],
                    competition_id=jnp.zeros(N_INSERT, jnp.int32), depth=jnp.ones(N_INSERT, jnp.int32),
                    state_hash=hashes)
    table, result = insert(table, rows, step=step, protected=idx, potential="success_variance",
                           optimistic_value=OPTIMISTIC)
    return table, result.status


def bench_jax(table, inputs, rounds: int) -> tuple[float, dict]:
    rewards, success, hashes = (jnp.asarray(x) for x in inputs)
    step_fn = jax.jit(jax_round, donate_argnums=0)
    keys = jax.random.split(jax.random.key(0), rounds + 1)
    table, status = step_fn(table, keys[0], jnp.int32(0), rewards[0], success[0], hashes[0])  # warm-up
    jax.block_until_ready(table)
    times, cpu = [], []
    counts = np.zeros(5, int)
    for i in range(1, rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        table, status = step_fn(table, keys[i], jnp.int32(i), rewards[i], success[i], hashes[i])
        jax.block_until_ready((table, status))
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


def py_round(rows, index, next_id, rng: random.Random, step, rewards, success, hashes):
    valid_rows = [i for i, r in enumerate(rows) if r["valid"]]
    weights = [math.exp(py_potential(rows[i]) / TEMPERATURE) for i in valid_rows]
    z = sum(weights)
    probs = [(1 - EPS) * w / z + EPS / len(valid_rows) for w in weights]
    # Weighted sampling without replacement: top n of keys u^(1/p), in logs to avoid underflow
    # (Efraimidis & Spirakis 2006).
    keyed = ((math.log(1.0 - rng.random()) / p, i) for p, i in zip(probs, valid_rows))
    idx = [i for _, i in heapq.nlargest(N_SAMPLE, keyed)]

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
    fresh, merged_targets = [], set()
    for h in hashes:
        h = tuple(h)
        if h in index:
            merged_targets.add(index[h])
        elif h not in fresh:
            fresh.append(h)
    free = [i for i, r in enumerate(rows) if not r["valid"]][:len(fresh)]
    need = len(fresh) - len(free)
    evict = heapq.nsmallest(need, ((py_potential(r), i) for i, r in enumerate(rows)
                                   if r["valid"] and i not in protected and i not in merged_targets))
    slots = free + [i for _, i in evict]
    for h, slot, parent in zip(fresh, slots, idx):
        old = rows[slot]
        if old["valid"]:
            del index[old["state_hash"]]
        rows[slot] = dict(valid=True, task_id=next_id, parent_id=parent, competition_id=0, depth=1, visits=0,
                          successes=0, reward_mean=0.0, reward_var=0.0, recent_success_rate=0.0,
                          recent_reward_std=0.0, last_sampled_step=-1, created_step=step, state_hash=h)
        index[h] = slot
        next_id += 1
    return next_id


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--baseline-rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = full_table(args.capacity, rng)
    inputs = round_inputs(rng, np.asarray(table.state_hash), max(args.rounds, args.baseline_rounds))

    py_table = jax.tree_util.tree_map(np.asarray, table)  # the jitted path donates its copy
    t_jax, counts = bench_jax(table, inputs, args.rounds)
    print(f"capacity={args.capacity:,} sample n={N_SAMPLE} G={GROUP} insert R={N_INSERT} "
          f"({N_DUP} duplicates) backend={jax.default_backend()}")
    print(f"jitted round:      {t_jax * 1e3:8.2f} ms  (median of {args.rounds - 1}; min {counts['min'] * 1e3:.2f} ms; "
          f"process CPU time {counts['cpu'] * 1e3:.2f} ms; rows added {counts['added']}, merged {counts['merged']})")
    t_py = bench_python(TaskTable(*py_table), inputs, args.baseline_rounds)
    print(f"plain-Python round:{t_py * 1e3:8.1f} ms  (median of {args.baseline_rounds})")
    print(f"speed-up: {t_py / t_jax:.0f}x   target: < 10 ms per round and >= 50x "
          f"-> {'met' if t_jax < 0.010 and t_py / t_jax >= 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
