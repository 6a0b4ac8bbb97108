"""Curriculum: the Evolving Data Buffer and the Learnability sampler, pure functions over a TaskTable.

The public API is the table, the functions over it and their config; it needs jax and numpy only.
The text of each task lives host-side, in `ace.curriculum.store.TaskStore`, keyed by task id;
`InsertResult`'s status codes are in `ace.curriculum.buffer`.

Typical host loop (`store` a TaskStore):
    table = init_table(cfg.capacity)
    rows = make_rows(parent_ids, competition_ids, depths, [state_hash(p.text()) for p in payloads])
    table, result = insert(table, rows, step=step, protected=idx); store.apply_insert(result, payloads)
    idx = get_sampler(cfg.sampler)(key, table, n, step=step, **cfg.sampler_kwargs())
    table = update_stats(table, idx, group_rewards, group_success, step)

At large capacities the same loop runs through a `BlockIndex` (`ace.curriculum.block_index`):
`sample_indexed`, `update_stats_indexed`, `insert_indexed` give the same tables and results while
reading a few thousand rows per round instead of all of them.
"""
from ace.curriculum.block_index import (BlockIndex, build_index, insert_indexed, maybe_rehash, sample_indexed,
                                        update_stats_indexed)
from ace.curriculum.buffer import InsertResult, insert, update_stats
from ace.curriculum.config import CurriculumConfig
from ace.curriculum.potential import get_potential, learnability, register_potential
from ace.curriculum.sampler import get_sampler, register_sampler, sample, sample_uniform, sampling_probs
from ace.curriculum.table import TaskRows, TaskTable, init_table, make_rows, state_hash, stats

__all__ = [
    "BlockIndex", "build_index", "insert_indexed", "maybe_rehash", "sample_indexed", "update_stats_indexed",
    "CurriculumConfig", "InsertResult", "TaskRows", "TaskTable", "get_potential", "get_sampler", "init_table",
    "insert", "learnability", "make_rows", "register_potential", "register_sampler", "sample", "sample_uniform",
    "sampling_probs", "state_hash", "stats", "update_stats",
]
