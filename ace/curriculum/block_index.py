"""Block index of a TaskTable: a curriculum round that reads O(n (S + B) + C / (B S)) rows, not all C.

`sample`, `update_stats` and `insert` each make at least one pass over every row of the table
(potentials, the softmax, eviction, duplicate detection). At C = 1M that is most of a round, while
the round changes only the few hundred rows it samples and inserts. The index keeps, beside the
table, what those passes recompute, in two levels: blocks of B consecutive rows and super-blocks
of S consecutive blocks, each with

  - log sum exp(LP / T) over its live rows, and its live-row count: sampling draws super-blocks,
    then blocks inside the n best super-blocks, then rows inside the n best blocks, each level
    conditioned on the level above, which is exactly Gumbel-top-k over all rows (see
    `_sample_kernel`);
  - its highest eviction key: eviction looks only at the groups that can hold the best
    candidates (see `_insert_kernel`);

and a hash index from state hash to row (open addressing, linear probing), so duplicates are
found by probing, not by comparing every row.

After each operation only the groups holding rows it changed are recomputed. The potential must
be row-local (`register_potential(..., row_local=True)`): a row's value may depend only on that row.

Same results as the full-table functions: `insert_indexed` returns the table and InsertResult
that `insert` returns, `update_stats_indexed` the table `update_stats` returns, and
`sample_indexed` draws from the distribution `sample` draws from (with other random numbers).
Typical loop:

    index = build_index(table, temperature=T, potential="success_variance", optimistic_value=v)
    idx = sample_indexed(key, table, index, n, eps_uniform=eps)
    table, index = update_stats_indexed(table, index, idx, rewards, success, step)
    table, index, result = insert_indexed(table, index, rows, step=step, protected=idx)

The index is derived data: a checkpoint stores the table, and `build_index` remakes the index.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ace.core.checks import check_scalar, is_concrete
from ace.curriculum.buffer import (ADDED, EVICTION_ORDERS, InsertResult, _first_occurrence, _update_stats_kernel,
                                   check_insert_args, check_update_args, write_candidates)
from ace.curriculum.potential import ROW_LOCAL_POTENTIALS, get_potential
from ace.curriculum.sampler import _fmix32
from ace.curriculum.table import TaskRows, TaskTable, check_table
from ace.curriculum.topk import top_k

# Rows per block and blocks per super-block. At C = 1M: 31,250 blocks in 977 super-blocks, so a
# round's passes are over ~1k super-blocks and a few thousand blocks and rows.
BLOCK = 32
SUPER_BLOCK = 32
EMPTY = -1  # hash_rows entry of a never-used slot.
# Slots probed per step of a lookup: at load <= 3/4 a linear-probing search ends within 16 slots
# almost always, so a lookup is one vectorised gather.
PROBE_WINDOW = 16
# The hash index is rebuilt from the table when its used slots (live entries and stale ones, left
# by evicted rows) pass this fraction; below it, probe sequences stay short.
MAX_LOAD = 0.75


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["block_logz", "block_valid", "block_evict", "super_logz", "super_valid",
                                "super_evict", "hash_rows", "hash_used", "temperature", "optimistic_value"],
                   meta_fields=["potential", "evict", "block", "super_block"])
@dataclasses.dataclass(frozen=True)
class BlockIndex:
    """Summaries of a TaskTable of capacity C in NB = ceil(C / block) blocks and NS = ceil(NB /
    super_block) super-blocks, and a hash index.

    Fields:
      block_logz:  [NB] float32, log sum over the block's live rows of exp(LP / temperature); -inf if none.
      block_valid: [NB] int32, live rows in the block.
      block_evict: [NB] float32, highest eviction key (`buffer._eviction_key`: higher is evicted
                   first) over the block's live rows; -inf if none.
      super_logz, super_valid, super_evict: [NS], the same over each super-block's blocks.
      hash_rows:   [H] int32, open-addressing slots holding table rows, EMPTY if never used; H a
                   power of two >= 2C. An entry is live when its row is live; a row's key is the
                   row's `state_hash`, so an entry whose row was evicted and refilled is stale.
      hash_used:   [] int32, slots not EMPTY.
      temperature, optimistic_value: [] float32, the sampler's temperature and the potential's value
                   for never-tried tasks, which the sums were made with.
      potential, evict, block, super_block: static; the potential's name, the eviction order, rows
                   per block, blocks per super-block.
    """

    block_logz: jax.Array
    block_valid: jax.Array
    block_evict: jax.Array
    super_logz: jax.Array
    super_valid: jax.Array
    super_evict: jax.Array
    hash_rows: jax.Array
    hash_used: jax.Array
    temperature: jax.Array
    optimistic_value: jax.Array
    potential: str
    evict: str
    block: int
    super_block: int

    @property
    def n_blocks(self) -> int:
        return self.block_logz.shape[0]

    @property
    def n_super(self) -> int:
        return self.super_logz.shape[0]


def _children(parents: jax.Array, width: int, size: int) -> tuple[jax.Array, jax.Array]:
    """[M] group ids (-1: none) -> member ids [M, width] clipped into [0, size), and which are real."""
    ids = parents[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]
    real = (parents[:, None] >= 0) & (ids < size)
    return jnp.clip(ids, 0, size - 1), real


def _row_terms(table: TaskTable, rows: jax.Array, real: jax.Array, meta: dict, temperature, optimistic_value):
    """For rows [N]: (live [N] bool, logits LP / T (-inf off live rows), eviction key [N], -inf off live rows).

    The eviction key is `buffer._eviction_key`'s value, bit for bit (ties must break alike).
    """
    sub = TaskTable(*(col[rows] for col in table[:-1]), table.next_task_id)
    live = real & sub.valid
    lp = get_potential(meta["potential"])(sub, optimistic_value=optimistic_value, step=None).astype(jnp.float32)
    logits = jnp.where(live, lp / temperature, -jnp.inf)
    key = -lp if meta["evict"] == "potential" else -sub.created_step.astype(jnp.float32)
    key = jnp.where(live, jnp.where(key == 0.0, jnp.float32(0.0), key), -jnp.inf)
    return live, logits, key


def _meta(index: BlockIndex) -> dict:
    return {"potential": index.potential, "evict": index.evict}


def _logsumexp_rows(x: jax.Array) -> jax.Array:
    """[M, W] -> [M] log sum exp along rows; -inf for a row of -inf."""
    top = x.max(axis=1)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.log(jnp.exp(x - shift[:, None]).sum(axis=1)) + shift


def _block_stats(table: TaskTable, blocks: jax.Array, meta: dict, block: int, temperature, optimistic_value):
    """Summaries of blocks [M] (-1 entries: garbage, to be dropped): (logz, live count, evict max), each [M]."""
    m = blocks.shape[0]
    rows, real = _children(blocks, block, table.capacity)
    live, logits, key = _row_terms(table, rows.reshape(-1), real.reshape(-1), meta, temperature, optimistic_value)
    return (_logsumexp_rows(logits.reshape(m, block)), live.reshape(m, block).sum(axis=1).astype(jnp.int32),
            key.reshape(m, block).max(axis=1))


def _super_stats(block_logz, block_valid, block_evict, supers: jax.Array, super_block: int):
    """Summaries of super-blocks [M] from their blocks' summaries."""
    blocks, real = _children(supers, super_block, block_logz.shape[0])
    return (_logsumexp_rows(jnp.where(real, block_logz[blocks], -jnp.inf)),
            jnp.where(real, block_valid[blocks], 0).sum(axis=1),
            jnp.where(real, block_evict[blocks], -jnp.inf).max(axis=1))


def _refresh(index: BlockIndex, table: TaskTable, rows: jax.Array) -> BlockIndex:
    """Recomputes the blocks and super-blocks holding `rows` [M] (-1 entries ignored) from the table."""
    nb, ns = index.n_blocks, index.n_super
    blocks = jnp.where(rows >= 0, rows // index.block, -1).astype(jnp.int32)
    logz, valid, evict = _block_stats(table, blocks, _meta(index), index.block, index.temperature,
                                      index.optimistic_value)
    w = jnp.where(blocks >= 0, blocks, nb)
    block_logz = index.block_logz.at[w].set(logz, mode="drop")
    block_valid = index.block_valid.at[w].set(valid, mode="drop")
    block_evict = index.block_evict.at[w].set(evict, mode="drop")
    supers = jnp.where(blocks >= 0, blocks // index.super_block, -1)
    s_logz, s_valid, s_evict = _super_stats(block_logz, block_valid, block_evict, supers, index.super_block)
    w = jnp.where(supers >= 0, supers, ns)
    return dataclasses.replace(
        index, block_logz=block_logz, block_valid=block_valid, block_evict=block_evict,
        super_logz=index.super_logz.at[w].set(s_logz, mode="drop"),
        super_valid=index.super_valid.at[w].set(s_valid, mode="drop"),
        super_evict=index.super_evict.at[w].set(s_evict, mode="drop"))


# ---- the hash index -----------------------------------------------------------------------------

def _hash_home(state_hash: jax.Array, size: int) -> jax.Array:
    """[Q, 2] uint32 state hashes -> [Q] int32 home slots in a table of `size` (a power of two)."""
    x = _fmix32(state_hash[:, 0] ^ _fmix32(state_hash[:, 1] + jnp.uint32(0x9E3779B9)))
    return (x & jnp.uint32(size - 1)).astype(jnp.int32)


def _lookup(hash_rows: jax.Array, table: TaskTable, state_hash: jax.Array, active: jax.Array) -> jax.Array:
    """[Q] int32: the live row whose state hash is state_hash[q] ([Q, 2] uint32), or -1; -1 where ~active.

    Linear probing from the home slot, PROBE_WINDOW slots per step, until the key or an EMPTY slot.
    """
    size = hash_rows.shape[0]
    home = _hash_home(state_hash, size)
    window = jnp.arange(PROBE_WINDOW, dtype=jnp.int32)

    def body(state):
        done, found, offset = state
        row = hash_rows[(home[:, None] + offset[:, None] + window[None, :]) & (size - 1)]
        safe = jnp.maximum(row, 0)
        hit = ((row >= 0) & table.valid[safe] & (table.state_hash[safe, 0] == state_hash[:, 0:1])
               & (table.state_hash[safe, 1] == state_hash[:, 1:2]))
        stop = hit | (row == EMPTY)
        first = jnp.argmax(stop, axis=1)
        ends = stop.any(axis=1) | (offset + PROBE_WINDOW >= size)
        hit_row = jnp.where(jnp.take_along_axis(hit, first[:, None], axis=1)[:, 0],
                            jnp.take_along_axis(row, first[:, None], axis=1)[:, 0], -1)
        found = jnp.where(done, found, hit_row)
        return done | ends, found, jnp.where(done | ends, offset, offset + PROBE_WINDOW)

    q = state_hash.shape[0]
    init = (~active, jnp.full((q,), -1, jnp.int32), jnp.zeros((q,), jnp.int32))
    return jax.lax.while_loop(lambda s: ~s[0].all(), body, init)[1]


def _place(hash_rows: jax.Array, state_hash: jax.Array, rows: jax.Array, active: jax.Array, *, bulk: bool):
    """Writes rows[q] into the first EMPTY slot of state_hash[q]'s probe sequence, for active q.

    Keys must be distinct and absent. Keys that want the same slot go in query order, one per
    step; the others probe on. `bulk` resolves those conflicts with a scatter over the [H] slots
    (a rebuild, Q ~ C), else with a [Q, Q] comparison (a round's few inserts).
    """
    size = hash_rows.shape[0]
    q = state_hash.shape[0]
    home = _hash_home(state_hash, size)
    qidx = jnp.arange(q, dtype=jnp.int32)
    window = jnp.arange(PROBE_WINDOW, dtype=jnp.int32)

    def body(state):
        hash_rows, pending, offset = state
        pos = (home[:, None] + offset[:, None] + window[None, :]) & (size - 1)
        free = hash_rows[pos] == EMPTY
        has_free = free.any(axis=1)
        slot = jnp.take_along_axis(pos, jnp.argmax(free, axis=1)[:, None], axis=1)[:, 0]
        want = pending & has_free
        if bulk:
            owner = jnp.full((size,), q, jnp.int32).at[jnp.where(want, slot, size)].min(qidx, mode="drop")
            won = want & (owner[slot] == qidx)
        else:
            earlier = want[None, :] & (slot[None, :] == slot[:, None]) & (qidx[None, :] < qidx[:, None])
            won = want & ~earlier.any(axis=1)
        hash_rows = hash_rows.at[jnp.where(won, slot, size)].set(rows, mode="drop")
        # A loser probes on from the slot it lost (now taken); a key without a free slot in its
        # window moves to the next window.
        offset = jnp.where(want & ~won, (slot - home) & (size - 1),
                           jnp.where(pending & ~has_free, offset + PROBE_WINDOW, offset))
        return hash_rows, pending & ~won, offset

    init = (hash_rows, active, jnp.zeros((q,), jnp.int32))
    # The offset bound stops the loop if no slot is EMPTY (a jitted caller that never called
    # `maybe_rehash`); `_lookup` is bounded the same way.
    return jax.lax.while_loop(lambda s: (s[1] & (s[2] < size)).any(), body, init)[0]


def _hash_size(capacity: int) -> int:
    return 1 << max(4, (2 * capacity - 1).bit_length())


def _build_hash(table: TaskTable, size: int) -> tuple[jax.Array, jax.Array]:
    """A fresh hash index of the table's live rows: (hash_rows [size], used [])."""
    rows = jnp.arange(table.capacity, dtype=jnp.int32)
    hash_rows = _place(jnp.full((size,), EMPTY, jnp.int32), table.state_hash, rows, table.valid, bulk=True)
    return hash_rows, table.valid.sum().astype(jnp.int32)


# ---- building and checking ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("potential", "evict", "block", "super_block"))
def _build_kernel(table, temperature, optimistic_value, potential, evict, block, super_block):
    nb = -(-table.capacity // block)
    ns = -(-nb // super_block)
    logz, valid, ev = _block_stats(table, jnp.arange(nb, dtype=jnp.int32), {"potential": potential, "evict": evict},
                                   block, temperature, optimistic_value)
    s_logz, s_valid, s_ev = _super_stats(logz, valid, ev, jnp.arange(ns, dtype=jnp.int32), super_block)
    hash_rows, used = _build_hash(table, _hash_size(table.capacity))
    return BlockIndex(block_logz=logz, block_valid=valid, block_evict=ev, super_logz=s_logz, super_valid=s_valid,
                      super_evict=s_ev, hash_rows=hash_rows, hash_used=used, temperature=temperature,
                      optimistic_value=optimistic_value, potential=potential, evict=evict, block=block,
                      super_block=super_block)


def build_index(table: TaskTable, *, temperature, potential: str, optimistic_value, evict: str = "potential",
                block: int = BLOCK, super_block: int = SUPER_BLOCK) -> BlockIndex:
    """The block index of `table`: one pass over the table and a hash build (~0.5 s at C = 1M).

    Args:
      table: TaskTable of capacity C.
      temperature: the sampler's tau > 0.
      potential: a registered row-local potential (`ace.curriculum.potential.ROW_LOCAL_POTENTIALS`).
      optimistic_value: LP of never-tried tasks.
      evict: eviction order of `insert_indexed`, "potential" or "oldest".
      block: rows per block; super_block: blocks per super-block; ints >= 2.

    Returns:
      BlockIndex.
    """
    check_table(table)
    get_potential(potential)
    if potential not in ROW_LOCAL_POTENTIALS:
        raise ValueError(f"potential {potential!r} is not row-local, so the block index cannot cache it; "
                         f"expected one of {sorted(ROW_LOCAL_POTENTIALS)} (or the full-table sample / insert)")
    if evict not in EVICTION_ORDERS:
        raise ValueError(f"evict must be one of {EVICTION_ORDERS}, got {evict!r}")
    for name, value in (("block", block), ("super_block", super_block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    check_scalar(temperature, "temperature", low=0.0, low_inclusive=False)
    check_scalar(optimistic_value, "optimistic_value")
    return _build_kernel(table, jnp.float32(temperature), jnp.float32(optimistic_value), potential, evict,
                         int(block), int(super_block))


def check_index(table: TaskTable, index: BlockIndex) -> int:
    """Raises if `index` cannot belong to `table` (its shapes are another capacity's); returns C."""
    capacity = check_table(table)
    if not isinstance(index, BlockIndex):
        raise TypeError(f"index must be a BlockIndex (see build_index), got {type(index).__name__}")
    nb = -(-capacity // index.block)
    if index.block_logz.shape != (nb,) or index.hash_rows.shape != (_hash_size(capacity),):
        raise ValueError(f"index was built for another table: {index.block_logz.shape[0]} blocks of "
                         f"{index.block} and {index.hash_rows.shape[0]} hash slots, but capacity {capacity} "
                         f"needs {nb} blocks and {_hash_size(capacity)} slots")
    return capacity


# ---- sampling -----------------------------------------------------------------------------------

def _exponentials(seed: jax.Array, size: int) -> jax.Array:
    """[size] float32 Exp(1) draws from a [2] uint32 seed: -log of uniforms in (0, 1).

    The uniforms come from a counter hash (a Weyl sequence through MurmurHash3's finaliser, as
    `sampler.row_uniforms` but one finaliser round): threefry costs several times more per draw on a CPU,
    and this sampler draws ~20k per round. The top 24 bits, centred in their cell, never give 0 or 1.
    """
    x = jnp.arange(size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed[0]
    x = _fmix32(x ^ seed[1])
    return -jnp.log(((x >> 8).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -24))


def _descend(neg_inv_top: jax.Array, inv: jax.Array) -> jax.Array:
    """Keys of the members of the chosen groups, conditioned on each group's maximum.

    With exponential races R = q / E (the ranking of log q + Gumbel), a group's maximum race is
    Q / E for its total Q. Given that maximum T, the members' races are 1 / (1/T + 1/R_i - 1/R_max)
    for unconditioned races R_i: the Gumbel form -log(exp(-T') - exp(-Z) + exp(-G_i)) of
    Maddison et al. 2014 ("A* sampling") through R = exp(G). The argmax member gets T; the rest
    stay below it. Keys are -1/R (higher is better), so 1/T + (1/R_i - 1/R_max) adds two terms >= 0.

    Args:
      neg_inv_top: [M] the groups' keys, -1/T (-inf for a group of mass 0).
      inv: [M, W] 1/R_i of the members (inf for members of mass 0).

    Returns:
      [M, W] keys, -inf for members of mass 0.
    """
    inv_min = inv.min(axis=1, keepdims=True)
    return jnp.where(jnp.isfinite(inv), neg_inv_top[:, None] - (inv - inv_min), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("n",))
def _sample_kernel(key, table, index, n, eps_uniform):
    """Gumbel-top-k in three levels: the n best super-blocks, the n best of their blocks, the n best
    of those blocks' rows. Every row of the n best is in one of the n best blocks, and every such
    block in one of the n best super-blocks (a group's key is its best member's), so this is exact.
    """
    nb, ns, block, sb = index.n_blocks, index.n_super, index.block, index.super_block
    n_valid = jnp.maximum(index.super_valid.sum().astype(jnp.float32), 1.0)
    log_z = jax.nn.logsumexp(index.super_logz)
    # q_i = a exp(LP_i / T - log_z) + c on live rows: the eps-uniform mixture of `sampling_probs`;
    # a group's mass is a exp(logz_g - log_z) + c live_g.
    a, c = 1.0 - eps_uniform, eps_uniform / n_valid
    seeds = jax.random.bits(key, (6,), jnp.uint32)

    def mass(logz, live):
        return a * jnp.exp(logz - log_z) + c * live.astype(jnp.float32)

    inv_super = _exponentials(seeds[0:2], ns) / mass(index.super_logz, index.super_valid)
    top_super, supers = top_k(-inv_super, min(n, ns))

    blocks, real = _children(supers.astype(jnp.int32), sb, nb)
    m_block = jnp.where(real, mass(index.block_logz[blocks], index.block_valid[blocks]), 0.0)
    inv_block = _exponentials(seeds[2:4], blocks.size).reshape(blocks.shape) / m_block
    block_keys = _descend(top_super, inv_block).reshape(-1)
    top_block, pos = top_k(jnp.where(block_keys == 0.0, 0.0, block_keys), min(n, block_keys.shape[0]))
    blocks = jnp.where(top_block > -jnp.inf, blocks.reshape(-1)[pos], -1)

    rows, real = _children(blocks, block, table.capacity)
    live, logits, _ = _row_terms(table, rows.reshape(-1), real.reshape(-1), _meta(index), index.temperature,
                                 index.optimistic_value)
    q = jnp.where(live, a * jnp.exp(logits - log_z) + c, 0.0).reshape(rows.shape)
    inv_row = _exponentials(seeds[4:6], rows.size).reshape(rows.shape) / q
    row_keys = _descend(top_block, inv_row).reshape(-1)
    vals, pos = jax.lax.top_k(row_keys, n)
    return jnp.where(vals > -jnp.inf, rows.reshape(-1)[pos], -1).astype(jnp.int32)


def sample_indexed(key: jax.Array, table: TaskTable, index: BlockIndex, n: int, *, eps_uniform) -> jax.Array:
    """Draws n distinct live rows with first-draw probabilities `sampling_probs(...)`, as `sample` does.

    Reads NS super-block entries, n * super_block block entries and n * block rows.

    Args:
      key: a jax.random key.
      table: TaskTable of capacity C; index: its BlockIndex (temperature and potential come from it).
      n: static number of rows to draw, at most the number of live rows.
      eps_uniform: mixing weight of the uniform distribution, in [0, 1].

    Returns:
      [n] int32 rows, distinct, in draw order (-1 beyond the live rows under an outer jit).
    """
    check_index(table, index)
    check_scalar(eps_uniform, "eps_uniform", low=0.0, high=1.0)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (number of tasks to draw), got {n!r}")
    if is_concrete(table.valid):
        n_valid = int(np.asarray(table.valid).sum())
        if n > n_valid:
            raise ValueError(f"cannot draw n={n} tasks without replacement: the table holds only {n_valid} "
                             "valid rows")
    return _sample_kernel(key, table, index, int(n), jnp.float32(eps_uniform))


# ---- update_stats and insert --------------------------------------------------------------------

@jax.jit
def _update_kernel(table, index, idx, rewards, success, step):
    table = _update_stats_kernel(table, idx, rewards, success, step)
    return table, _refresh(index, table, jnp.where((idx >= 0) & (idx < table.capacity), idx, -1))


def update_stats_indexed(table: TaskTable, index: BlockIndex, idx, group_rewards, group_success, step):
    """`update_stats`, then the groups of the rows it changed. Arguments as `update_stats`.

    Returns:
      (table, index).
    """
    check_index(table, index)
    idx, rewards, success, step = check_update_args(table, idx, group_rewards, group_success, step)
    return _update_kernel(table, index, idx, rewards, success, step)


def _first_true(mask: jax.Array, k: int) -> jax.Array:
    """[k] positions of the first k True entries of mask [M], ascending; -1 past the last one.
    A prefix count and a scatter: no sort or top-k."""
    m = mask.shape[0]
    rank = jnp.cumsum(mask) - 1
    return jnp.full((k,), -1, jnp.int32).at[jnp.where(mask, rank, k)].set(jnp.arange(m, dtype=jnp.int32),
                                                                         mode="drop")


def _group_len(groups: jax.Array, width: int, size: int) -> jax.Array:
    """Members of each group id (the last group may be short)."""
    return jnp.clip(size - groups * width, 0, width)


def _mark_rows(slot_of_block: jax.Array, m: int, block: int, rows: jax.Array) -> jax.Array:
    """[m * block] bool over the candidate rows (m blocks; block b's rows at slot_of_block[b]): True
    at each of `rows` [P] (-1 entries and rows outside the candidate blocks ignored)."""
    b = jnp.where(rows >= 0, rows // block, 0)
    slot = jnp.where(rows >= 0, slot_of_block[b], -1)
    flat = jnp.where(slot >= 0, slot * block + rows % block, m * block)
    return jnp.zeros((m * block,), bool).at[flat].set(True, mode="drop")


def _candidate_blocks(index: BlockIndex, capacity: int, r: int, p: int) -> jax.Array:
    """Ascending block ids (-1 padding, no repeats) holding the R best rows for new tasks.

    `insert` ranks, after its merge targets, empty rows by index, then live rows by eviction key,
    ties by index; protected live rows are excluded. Those R rows lie in
      - the first R blocks with an empty row (inside the first R super-blocks with one), and
      - the R + P + R best blocks by block_evict, inside the R + P + R best super-blocks: a group
        ranked above the group of a row x among the R best holds a row ranked above x, which is
        one of the R - 1 others, or one of the P protected rows or the R merge targets.
    """
    nb, ns, block, sb = index.n_blocks, index.n_super, index.block, index.super_block
    super_ids = jnp.arange(ns, dtype=jnp.int32)
    supers = _first_true(index.super_valid < _group_len(super_ids, sb * block, capacity), min(r, ns))
    blocks, real = _children(supers, sb, nb)
    blocks, real = blocks.reshape(-1), real.reshape(-1)
    has_empty = real & (index.block_valid[blocks] < _group_len(blocks, block, capacity))
    pick = _first_true(has_empty, min(r, blocks.shape[0]))
    empty_blocks = jnp.where(pick >= 0, blocks[jnp.maximum(pick, 0)], -1)

    k_evict = 2 * r + p
    _, supers = top_k(index.super_evict, min(k_evict, ns))
    # Ascending super-blocks, so that block ties below break by lowest block as in `insert`.
    blocks, real = _children(jnp.sort(supers).astype(jnp.int32), sb, nb)
    blocks, real = blocks.reshape(-1), real.reshape(-1)
    keys = jnp.where(real, index.block_evict[blocks], -jnp.inf)
    _, pos = top_k(jnp.where(keys == 0.0, 0.0, keys), min(k_evict, keys.shape[0]))
    evict_blocks = blocks[pos]

    out = jnp.sort(jnp.concatenate([empty_blocks, evict_blocks]).astype(jnp.int32))
    repeat = jnp.concatenate([jnp.zeros((1,), bool), out[1:] == out[:-1]]) | (out < 0)
    return jnp.where(repeat, -1, out)


@functools.partial(jax.jit, static_argnames=("max_depth",))
def _insert_kernel(table, index, rows, step, protected, max_depth):
    c, nb, block = table.capacity, index.n_blocks, index.block
    r = rows.valid.shape[0]
    h0, h1 = rows.state_hash[:, 0], rows.state_hash[:, 1]
    too_deep = rows.valid & (rows.depth > max_depth) if max_depth is not None else jnp.zeros((r,), bool)
    live = rows.valid & ~too_deep
    first = _first_occurrence(live, h0, h1)
    is_first = live & (first == jnp.arange(r, dtype=jnp.int32))
    existing = _lookup(index.hash_rows, table, rows.state_hash, is_first)

    blocks = _candidate_blocks(index, c, r, protected.shape[0])
    m = blocks.shape[0]
    # Candidate rows in ascending row order, so that top-k ties break by lowest row as in `insert`.
    slot_of_block = jnp.full((nb,), -1, jnp.int32).at[jnp.where(blocks >= 0, blocks, nb)].set(
        jnp.arange(m, dtype=jnp.int32), mode="drop")
    cand, real = _children(blocks, block, c)
    cand, real = cand.reshape(-1), real.reshape(-1)
    live_c, _, evict_key = _row_terms(table, cand, real, _meta(index), index.temperature, index.optimistic_value)
    excluded = ((_mark_rows(slot_of_block, m, block, protected) & live_c)
                | _mark_rows(slot_of_block, m, block, existing))
    score = jnp.where(real & ~live_c, jnp.finfo(jnp.float32).max, evict_key)
    score = jnp.where(excluded | ~real, -jnp.inf, score)
    vals, pos = top_k(score, min(r, score.shape[0]))
    if vals.shape[0] < r:  # tiny tables: pad to R candidates
        vals = jnp.concatenate([vals, jnp.full((r - vals.shape[0],), -jnp.inf)])
        pos = jnp.concatenate([pos, jnp.zeros((r - pos.shape[0],), pos.dtype)])
    k = min(2 * r, c)  # `insert` places new tasks among its top 2R ranked rows, merge targets included
    n_free = jnp.minimum(k - (existing >= 0).sum(), (vals > -jnp.inf).sum())
    new_table, result = write_candidates(table, rows, step, live, too_deep, first, existing, cand[pos], n_free)

    added = result.status == ADDED
    slots = jnp.where(added, result.slot, -1)
    hash_rows = _place(index.hash_rows, rows.state_hash, slots, added, bulk=False)
    index = dataclasses.replace(index, hash_rows=hash_rows,
                                hash_used=index.hash_used + added.sum().astype(jnp.int32))
    return new_table, _refresh(index, new_table, slots), result


def insert_indexed(table: TaskTable, index: BlockIndex, rows: TaskRows, *, step, protected=None,
                   max_depth: int | None = None) -> tuple[TaskTable, BlockIndex, InsertResult]:
    """`insert` through the index: the same new table and InsertResult, without a pass over the table.

    It reads the NS super-block summaries, (2R + P) super-blocks' block summaries and the rows of
    at most 3R + P blocks, probes the hash index for the R candidates, then recomputes the groups
    of the rows it wrote.

    The eviction order, potential and optimistic value are the index's (`build_index`).

    Args:
      table: TaskTable of capacity C; index: its BlockIndex.
      rows: TaskRows with R candidates.
      step: [] int trainer step; protected: [P] int32 rows never evicted (-1 is padding) or None;
      max_depth: as `insert`.

    Returns:
      (new table, new index, InsertResult).
    """
    check_index(table, index)
    protected = check_insert_args(table, rows, step, protected, max_depth)
    table, index, result = _insert_kernel(table, index, rows, jnp.asarray(step, jnp.int32), protected,
                                          None if max_depth is None else int(max_depth))
    if is_concrete(index):
        index = maybe_rehash(table, index)
    return table, index, result


@jax.jit
def _rehash_kernel(table, index):
    hash_rows, used = _build_hash(table, index.hash_rows.shape[0])
    return dataclasses.replace(index, hash_rows=hash_rows, hash_used=used)


def maybe_rehash(table: TaskTable, index: BlockIndex) -> BlockIndex:
    """Rebuilds the hash index from the table once its used slots pass MAX_LOAD; else returns `index`.

    Evicted rows leave stale slots behind, so the used count grows by up to R per insert and a
    rebuild (~0.5 s at C = 1M) comes at most once every C / (2 R) inserts. `insert_indexed` calls
    this itself when run eagerly; a caller that jits its own round calls it outside that jit, once
    per round.
    It is host code: it reads `index.hash_used` (a sync), and in jitted code the untaken branch of
    a lax.cond cost XLA:CPU a copy of the slots every round.
    """
    check_index(table, index)
    if int(index.hash_used) > MAX_LOAD * index.hash_rows.shape[0]:
        return _rehash_kernel(table, index)
    return index
