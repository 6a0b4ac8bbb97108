"""The Evolving Data Buffer: insert child tasks (merging duplicates, evicting when full), update stats.

Both operations are pure functions of a `TaskTable`; the public functions check their arguments
(shapes always, values when concrete) and call a jitted kernel, so an eager call from the trainer
is compiled, and a call inside the caller's own jit / vmap inlines the kernel.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ace.core.checks import check_indices, check_scalar, is_concrete
from ace.curriculum.potential import DEFAULT_OPTIMISTIC_VALUE, get_potential, learnability
from ace.curriculum.table import NO_TASK, TaskRows, TaskTable, check_table
from ace.curriculum.topk import top_k

# InsertResult.status codes, one per candidate row.
PADDING = 0  # rows.valid was False: nothing happened.
ADDED = 1  # written into the table as a new task.
MERGED = 2  # duplicate of a live task (or of an earlier row of the same batch): not written.
DROPPED = 3  # no free or evictable row was left (all remaining rows protected).
TOO_DEEP = 4  # depth > max_depth.
STATUS_NAMES = {PADDING: "padding", ADDED: "added", MERGED: "merged", DROPPED: "dropped",
                TOO_DEEP: "too_deep"}

EVICTION_ORDERS = ("potential", "oldest")


class InsertResult(NamedTuple):
    """What `insert` did with each of the R candidate rows, for the host-side `TaskStore`.

    Fields (all [R] int32):
      status: one of PADDING, ADDED, MERGED, DROPPED, TOO_DEEP.
      task_id: ADDED: the new task's id; MERGED: id of the task it duplicates; else NO_TASK.
      slot: ADDED / MERGED: the table row holding that task; else -1.
      evicted_task_id: ADDED into an occupied row: id of the task it evicted; else NO_TASK.
    """

    status: jax.Array
    task_id: jax.Array
    slot: jax.Array
    evicted_task_id: jax.Array


def _first_occurrence(rows_valid: jax.Array, h0: jax.Array, h1: jax.Array) -> jax.Array:
    """[R] int32: index of the first valid row with the same state hash (its own index if unique)."""
    r = rows_valid.shape[0]
    ridx = jnp.arange(r, dtype=jnp.int32)
    # lexsort's last key is the primary one: valid rows first, then by hash, ties by input index.
    order = jnp.lexsort((ridx, h1, h0, ~rows_valid)).astype(jnp.int32)
    sv, s0, s1 = rows_valid[order], h0[order], h1[order]
    same_prev = jnp.concatenate([jnp.zeros((1,), bool), sv[1:] & sv[:-1] & (s0[1:] == s0[:-1])
                                 & (s1[1:] == s1[:-1])])
    run_start = jax.lax.cummax(jnp.where(same_prev, 0, ridx))
    return jnp.zeros((r,), jnp.int32).at[order].set(order[run_start])


def _query_buckets(query: jax.Array, h0: jax.Array, h1: jax.Array):
    """A direct-mapped hash table of the R query hashes: each table row checks one bucket.

    A [C, R] comparison costs 64M compares at C = 1M, R = 64. Instead each query takes the bucket
    given by the low bits of its first hash word (B >= 256 (R - 1) buckets, a power of two:
    128 KiB at R = 64, so the table stays in cache), and each table row compares its hash with its bucket's two words. An
    empty bucket j holds a first word whose low bits are not j, so no row matches it. A query whose
    bucket a lower-index query took (about R^2 / 2B queries per call, ~0.1 at R = 64) is an
    overflow query, matched by its own pass over the table (`_mark_overflow_duplicates`).

    Args:
      query: [R] bool, rows to look up (distinct hashes).
      h0, h1: [R] uint32 hash words.

    Returns:
      (bucket_h0 [B] uint32, bucket_h1 [B] uint32, overflow [R] bool).
    """
    r = query.shape[0]
    nb = 1 << max(10, (r - 1).bit_length() + 8)
    ridx = jnp.arange(r, dtype=jnp.int32)
    qb = jnp.where(query, (h0 & jnp.uint32(nb - 1)).astype(jnp.int32), nb)
    owner = jnp.full((nb,), r, jnp.int32).at[qb].min(ridx, mode="drop")
    is_owner = query & (owner[jnp.minimum(qb, nb - 1)] == ridx)
    # Scatters (not a select over `owner`) so that the tables are stored before the [C] pass; a
    # select would be fused into it and re-gathered per table row.
    w = jnp.where(is_owner, qb, nb)
    bucket_h0 = (jnp.arange(nb, dtype=jnp.uint32) ^ jnp.uint32(1)).at[w].set(h0, mode="drop")
    bucket_h1 = jnp.zeros((nb,), jnp.uint32).at[w].set(h1, mode="drop")
    return bucket_h0, bucket_h1, query & ~is_owner


def _is_duplicate(table: TaskTable, bucket_h0: jax.Array, bucket_h1: jax.Array) -> jax.Array:
    """[C] bool: live rows whose state hash is a query's (overflow queries excepted)."""
    nb = bucket_h0.shape[0]
    t0, t1 = table.state_hash[:, 0], table.state_hash[:, 1]
    tb = t0 & jnp.uint32(nb - 1)  # unsigned: no negative-index wrap-around in the gather
    return table.valid & (bucket_h0[tb] == t0) & (bucket_h1[tb] == t1)


def _eviction_key(table: TaskTable, evict: str, potential: str, optimistic_value, step) -> jax.Array:
    """[C] float32, higher = evicted first: lowest potential, or oldest, first."""
    if evict == "potential":
        key = -learnability(table, potential=potential, optimistic_value=optimistic_value, step=step)
    else:
        key = -table.created_step.astype(jnp.float32)
    # -0.0 -> +0.0: `top_k` ranks the two zeros alike (ties by row index, as documented in `insert`).
    return jnp.where(key == 0.0, jnp.float32(0.0), key)


def _mark_overflow_duplicates(table, h0, h1, overflow_order, i, score):
    """Sets score = +inf on the live row duplicating the i-th overflow query (see `_query_buckets`)."""
    q = overflow_order[i]
    hit = table.valid & (table.state_hash[:, 0] == h0[q]) & (table.state_hash[:, 1] == h1[q])
    return jnp.where(hit, jnp.inf, score)


def write_candidates(table, rows, step, live, too_deep, first, existing, cand_slot, n_free):
    """The end of `insert`, shared by the full-table and block-index kernels: writes the new tasks.

    Args:
      table: TaskTable of capacity C; rows: the R candidates; step: [] int32.
      live: [R] bool, valid and not too deep; too_deep: [R] bool.
      first: [R] int32, `_first_occurrence` of each candidate.
      existing: [R] int32, for first occurrences the live row holding the same state hash, else -1.
      cand_slot: [R] int32, the rows new tasks go to, best first (empty rows, then evictable ones).
      n_free: [] int, how many leading entries of cand_slot may be used.

    Returns:
      (new table, InsertResult).
    """
    c = table.capacity
    r = rows.valid.shape[0]
    is_first = live & (first == jnp.arange(r, dtype=jnp.int32))
    to_add = is_first & (existing < 0)
    add_rank = jnp.cumsum(to_add) - 1
    added = to_add & (add_rank < n_free)
    add_slot = cand_slot[jnp.clip(add_rank, 0, r - 1)]
    new_id = table.next_task_id + add_rank.astype(jnp.int32)

    first_status = jnp.where(added, ADDED, jnp.where(existing >= 0, MERGED, DROPPED))
    first_slot = jnp.where(added, add_slot, jnp.where(existing >= 0, existing, -1))
    first_task = jnp.where(added, new_id,
                           jnp.where(existing >= 0, table.task_id[jnp.maximum(existing, 0)], NO_TASK))
    # A later duplicate within the batch follows its first occurrence: merged into it, or dropped.
    fs, fslot, ftask = first_status[first], first_slot[first], first_task[first]
    dup_status = jnp.where(fs == DROPPED, DROPPED, MERGED)
    status = jnp.where(is_first, first_status,
                       jnp.where(live, dup_status, jnp.where(too_deep, TOO_DEEP, PADDING)))
    slot = jnp.where(live & (status != DROPPED), jnp.where(is_first, first_slot, fslot), -1)
    task_id = jnp.where(live & (status != DROPPED), jnp.where(is_first, first_task, ftask), NO_TASK)
    safe_slot = jnp.maximum(add_slot, 0)
    evicted = jnp.where(added & table.valid[safe_slot], table.task_id[safe_slot], NO_TASK)

    w = jnp.where(added, add_slot, c)  # out of range: dropped by the scatters below

    def put(col, values):
        return col.at[w].set(values, mode="drop")

    zeros_f = jnp.zeros((r,), jnp.float32)
    new_table = TaskTable(
        valid=put(table.valid, True),
        task_id=put(table.task_id, new_id),
        parent_id=put(table.parent_id, rows.parent_id),
        competition_id=put(table.competition_id, rows.competition_id),
        depth=put(table.depth, rows.depth),
        visits=put(table.visits, 0),
        successes=put(table.successes, 0),
        reward_mean=put(table.reward_mean, zeros_f),
        reward_var=put(table.reward_var, zeros_f),
        recent_success_rate=put(table.recent_success_rate, zeros_f),
        recent_reward_std=put(table.recent_reward_std, zeros_f),
        last_sampled_step=put(table.last_sampled_step, -1),
        created_step=put(table.created_step, jnp.broadcast_to(step, (r,)).astype(jnp.int32)),
        state_hash=table.state_hash.at[w].set(rows.state_hash, mode="drop"),
        next_task_id=table.next_task_id + added.sum().astype(jnp.int32),
    )
    result = InsertResult(status=status.astype(jnp.int32), task_id=task_id.astype(jnp.int32),
                          slot=slot.astype(jnp.int32), evicted_task_id=evicted.astype(jnp.int32))
    return new_table, result


@functools.partial(jax.jit, static_argnames=("evict", "potential", "max_depth"))
def _insert_kernel(table, rows, step, protected, evict, potential, optimistic_value, max_depth):
    c = table.capacity
    r = rows.valid.shape[0]
    ridx = jnp.arange(r, dtype=jnp.int32)
    h0, h1 = rows.state_hash[:, 0], rows.state_hash[:, 1]
    too_deep = rows.valid & (rows.depth > max_depth) if max_depth is not None else jnp.zeros((r,), bool)
    live = rows.valid & ~too_deep

    first = _first_occurrence(live, h0, h1)
    is_first = live & (first == ridx)
    bucket_h0, bucket_h1, overflow = _query_buckets(is_first, h0, h1)

    # One top-k ranks every row: rows a candidate duplicates (kept, reported as merge targets), then
    # empty rows, then evictable rows by eviction key; protected rows are never chosen. The whole
    # [C] score is one fused pass over the table; ties rank by lowest row index.
    evict_key = _eviction_key(table, evict, potential, optimistic_value, step)
    score = jnp.where(_is_duplicate(table, bucket_h0, bucket_h1), jnp.inf,
                      jnp.where(~table.valid, jnp.finfo(jnp.float32).max, evict_key))
    score = jax.lax.fori_loop(0, overflow.sum(), functools.partial(_mark_overflow_duplicates, table, h0, h1,
                                                                   jnp.argsort(~overflow, stable=True)), score)
    # Protected rows go to the bottom unless empty or a merge target; a scatter of P entries
    # instead of a [C] protected mask read by the pass above.
    p_ok = (protected >= 0) & (protected < c)
    p_safe = jnp.where(p_ok, protected, 0)
    p_score = score[p_safe]
    score = score.at[jnp.where(p_ok, protected, c)].set(
        jnp.where(table.valid[p_safe] & (p_score != jnp.inf), -jnp.inf, p_score), mode="drop")
    k = min(2 * r, c)
    vals, rank_rows = top_k(score, k)
    merge_target = vals == jnp.inf
    n_matched = merge_target.sum()
    # Which query each merge target duplicates: a [k, R] compare of the few ranked rows' hashes.
    ranked_hash = table.state_hash[rank_rows]
    same = (is_first[None, :] & (ranked_hash[:, 0:1] == h0[None, :]) & (ranked_hash[:, 1:2] == h1[None, :]))
    match_rank = jnp.where(same.any(axis=1), jnp.argmax(same, axis=1), r).astype(jnp.int32)
    existing = jnp.full((r,), -1, jnp.int32).at[jnp.where(merge_target, match_rank, r)].set(
        rank_rows, mode="drop")

    cand_pos = n_matched + ridx
    cand_ok = (cand_pos < k) & (vals[jnp.minimum(cand_pos, k - 1)] > -jnp.inf)
    cand_slot = rank_rows[jnp.minimum(cand_pos, k - 1)]
    return write_candidates(table, rows, step, live, too_deep, first, existing, cand_slot, cand_ok.sum())


def _check_rows(rows: TaskRows) -> int:
    if not isinstance(rows, TaskRows):
        raise TypeError(f"rows must be a TaskRows (see make_rows), got {type(rows).__name__}")
    r = rows.valid.shape[0] if rows.valid.ndim == 1 else None
    if r is None or r < 1:
        raise ValueError(f"rows.valid must have shape [R] with R >= 1, got {tuple(rows.valid.shape)}")
    for name in ("parent_id", "competition_id", "depth"):
        col = getattr(rows, name)
        if tuple(col.shape) != (r,) or not jnp.issubdtype(col.dtype, jnp.integer):
            raise ValueError(f"rows.{name} must be an int [R] = ({r},) array, got {tuple(col.shape)} {col.dtype}")
    if tuple(rows.state_hash.shape) != (r, 2) or rows.state_hash.dtype != jnp.uint32:
        raise ValueError(f"rows.state_hash must be uint32 [R, 2] = ({r}, 2), got "
                         f"{tuple(rows.state_hash.shape)} {rows.state_hash.dtype}")
    if rows.valid.dtype != jnp.bool_:
        raise ValueError(f"rows.valid must be bool, got {rows.valid.dtype}")
    return r


def check_insert_args(table: TaskTable, rows: TaskRows, step, protected, max_depth) -> jax.Array:
    """Checks the arguments `insert` and `insert_indexed` share; returns `protected` as int32 [P]."""
    capacity = check_table(table)
    _check_rows(rows)
    check_scalar(step, "step", low=0)
    if max_depth is not None and (not isinstance(max_depth, (int, np.integer)) or max_depth < 0):
        raise ValueError(f"max_depth must be a non-negative int or None, got {max_depth!r}")
    if protected is None:
        protected = jnp.full((1,), -1, jnp.int32)
    protected = jnp.asarray(protected)
    if protected.ndim != 1 or not jnp.issubdtype(protected.dtype, jnp.integer):
        raise ValueError(f"protected must be an int [P] array of row indices, got {tuple(protected.shape)} "
                         f"{protected.dtype}")
    check_indices(protected, capacity, "protected", allow_padding=True)
    if is_concrete(rows.depth) and (np.asarray(rows.depth) < 0).any():
        raise ValueError(f"rows.depth must be >= 0, got {np.asarray(rows.depth).min()}")
    return protected.astype(jnp.int32)


def insert(table: TaskTable, rows: TaskRows, *, step, protected=None, evict: str = "potential",
           potential: str = "success_variance", optimistic_value=DEFAULT_OPTIMISTIC_VALUE,
           max_depth: int | None = None) -> tuple[TaskTable, InsertResult]:
    """Inserts candidate tasks, merging duplicates by state hash and evicting when full.

    A candidate whose state hash equals a live task's, or an earlier candidate's of the same batch,
    is merged (not written). New tasks go into empty rows first; when none is left, the live rows
    with the lowest potential (`evict="potential"`) or the oldest (`evict="oldest"`) are evicted,
    ties by lowest row index. Rows listed in `protected` (the tasks being rolled out now) and rows a
    candidate was merged into are never evicted; a candidate for which no row is left is dropped.

    Args:
      table: TaskTable of capacity C.
      rows: TaskRows with R candidates (see `make_rows`).
      step: [] int, the trainer step, stored as `created_step`.
      protected: [P] int32 row indices never evicted (-1 entries are padding), or None.
      evict: "potential" or "oldest".
      potential: name of the potential whose lowest values are evicted first.
      optimistic_value: LP of never-tried tasks (so fresh tasks are not evicted first).
      max_depth: candidates deeper than this get status TOO_DEEP; None = no limit.

    Returns:
      (new table, InsertResult with [R] arrays). Added tasks get consecutive ids from
      `table.next_task_id`, in row order.
    """
    if evict not in EVICTION_ORDERS:
        raise ValueError(f"evict must be one of {EVICTION_ORDERS}, got {evict!r}")
    if evict == "potential":
        get_potential(potential)
    check_scalar(optimistic_value, "optimistic_value")
    protected = check_insert_args(table, rows, step, protected, max_depth)
    return _insert_kernel(table, rows, jnp.asarray(step, jnp.int32), protected,
                          evict, potential, optimistic_value,
                          None if max_depth is None else int(max_depth))


@jax.jit
def _update_stats_kernel(table, idx, rewards, success, step):
    c = table.capacity
    g = rewards.shape[1]
    r = rewards.astype(jnp.float32)
    s = success.astype(jnp.float32)
    g_mean = r.mean(axis=1)
    g_m2 = jnp.square(r - g_mean[:, None]).sum(axis=1)
    # Groups of one call that hit the same row are pooled first, then pooled with the row's
    # history: Chan et al. (1979) parallel variance update. Runs of equal rows come from a sort of
    # the n indices; an [n, n] equality matrix was as exact but cost ~0.3 ms per call on XLA:CPU
    # with several CPU devices (elementwise [n, n] passes split across its thread pool).
    n = idx.shape[0]
    order = jnp.argsort(idx, stable=True)
    sorted_idx = idx[order]
    run = jnp.cumsum(jnp.concatenate([jnp.ones((1,), jnp.int32),
                                      (sorted_idx[1:] != sorted_idx[:-1]).astype(jnp.int32)])) - 1
    seg = jnp.zeros((n,), jnp.int32).at[order].set(run)

    def pool(x):  # [n] -> the sum over each row's run, per position
        return jax.ops.segment_sum(x, seg, num_segments=n)[seg]

    copies = pool(jnp.ones((n,), jnp.float32))
    cnt = copies * g
    mean_u = pool(g_mean) / copies
    m2_u = pool(g_m2 + g * jnp.square(g_mean - mean_u))
    succ_u = pool(s.sum(axis=1))

    safe = jnp.clip(idx, 0, c - 1)
    n_a = table.visits[safe].astype(jnp.float32)
    mean_a = table.reward_mean[safe]
    n_t = n_a + cnt
    delta = mean_u - mean_a
    mean = mean_a + delta * cnt / n_t
    m2 = table.reward_var[safe] * n_a + m2_u + jnp.square(delta) * n_a * cnt / n_t

    ok = (idx >= 0) & (idx < c) & table.valid[safe]  # under an outer jit bad indices are skipped
    w = jnp.where(ok, idx, c)

    def put(col, values):
        return col.at[w].set(values, mode="drop")

    return table._replace(
        visits=put(table.visits, table.visits[safe] + cnt.astype(jnp.int32)),
        successes=put(table.successes, table.successes[safe] + jnp.round(succ_u).astype(jnp.int32)),
        reward_mean=put(table.reward_mean, mean),
        reward_var=put(table.reward_var, jnp.maximum(m2, 0.0) / n_t),
        recent_success_rate=put(table.recent_success_rate, succ_u / cnt),
        recent_reward_std=put(table.recent_reward_std, jnp.sqrt(jnp.maximum(m2_u, 0.0) / cnt)),
        last_sampled_step=put(table.last_sampled_step, jnp.broadcast_to(step, idx.shape).astype(jnp.int32)),
    )


def update_stats(table: TaskTable, idx, group_rewards, group_success, step) -> TaskTable:
    """Adds one group of G attempts per sampled task to the running statistics.

    visits and successes accumulate; reward mean and population variance are updated exactly as if
    computed over every reward so far; `recent_*` become this call's success rate and reward std
    (pooled if a row appears several times in `idx`); `last_sampled_step` becomes `step`.

    Args:
      table: TaskTable of capacity C.
      idx: [N] int32 rows that were rolled out (each must be a valid row).
      group_rewards: [N, G] float rewards, finite.
      group_success: [N, G] bool (or 0/1) success flags.
      step: [] int trainer step.

    Returns:
      The updated TaskTable. Under an outer jit (no eager check) rows out of range or empty are
      left unchanged.
    """
    idx, rewards, success, step = check_update_args(table, idx, group_rewards, group_success, step)
    return _update_stats_kernel(table, idx, rewards, success, step)


def check_update_args(table: TaskTable, idx, group_rewards, group_success, step):
    """Checks `update_stats`'s arguments; returns (idx int32, rewards, success, step int32) as arrays."""
    capacity = check_table(table)
    idx = jnp.asarray(idx)
    rewards = jnp.asarray(group_rewards)
    success = jnp.asarray(group_success)
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an int [N] array, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    n = idx.shape[0]
    if rewards.ndim != 2 or rewards.shape[0] != n or rewards.shape[1] < 1:
        raise ValueError(f"group_rewards must have shape [N, G] = ({n}, G>=1) to match idx [N], "
                         f"got {tuple(rewards.shape)}")
    if tuple(success.shape) != tuple(rewards.shape):
        raise ValueError(f"group_success must have the shape of group_rewards {tuple(rewards.shape)}, "
                         f"got {tuple(success.shape)}")
    if not (jnp.issubdtype(rewards.dtype, jnp.floating) or jnp.issubdtype(rewards.dtype, jnp.integer)):
        raise TypeError(f"group_rewards must be numeric, got dtype {rewards.dtype}")
    check_scalar(step, "step", low=0)
    check_indices(idx, capacity, "idx")
    if is_concrete(rewards):
        bad = ~np.isfinite(np.asarray(rewards, np.float64))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"group_rewards[{i}, {j}] = {np.asarray(rewards)[i, j]} is not finite "
                             f"(task row idx[{i}] = {int(np.asarray(idx)[i])})")
    if is_concrete(success) and success.dtype != jnp.bool_:
        vals = np.asarray(success)
        bad = (vals != 0) & (vals != 1)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(f"group_success[{i}, {j}] = {vals[i, j]}; expected a bool or 0/1")
    if is_concrete(idx, table.valid):
        valid = np.asarray(table.valid)[np.asarray(idx)]
        if not valid.all():
            i = int(np.flatnonzero(~valid)[0])
            raise IndexError(f"idx[{i}] = {int(np.asarray(idx)[i])} points to an empty table row")
    return idx.astype(jnp.int32), rewards, success, jnp.asarray(step, jnp.int32)
