"""Curriculum: the Evolving Data Buffer and the Learnability sampler, pure functions over a TaskTable.

Typical host loop:
    table = init_table(cfg.capacity); store = TaskStore()
    rows = make_rows(parent_ids, competition_ids, depths, [state_hash(p.text()) for p in payloads])
    table, result = insert(table, rows, step=step, protected=idx); store.apply_insert(result, payloads)
    idx = get_sampler(cfg.sampler)(key, table, n, step=step, **cfg.sampler_kwargs())
    table = update_stats(table, idx, group_rewards, group_success, step)
"""
from ace.curriculum.buffer import (ADDED, DROPPED, EVICTION_ORDERS, MERGED, PADDING, STATUS_NAMES,
                                   TOO_DEEP, InsertResult, insert, update_stats)
from ace.curriculum.config import CurriculumConfig
from ace.curriculum.potential import (DEFAULT_OPTIMISTIC_VALUE, POTENTIALS, get_potential, learnability,
                                      reward_std_potential, success_variance_potential)
from ace.curriculum.sampler import SAMPLERS, get_sampler, sample, sample_uniform, sampling_probs
from ace.curriculum.store import TaskPayload, TaskStore, state_hash
from ace.curriculum.table import NEVER, NO_TASK, TaskRows, TaskTable, init_table, make_rows, stats

__all__ = [
    "ADDED", "DROPPED", "EVICTION_ORDERS", "MERGED", "PADDING", "STATUS_NAMES", "TOO_DEEP", "InsertResult",
    "insert", "update_stats", "CurriculumConfig", "DEFAULT_OPTIMISTIC_VALUE", "POTENTIALS", "get_potential",
    "learnability", "reward_std_potential", "success_variance_potential", "SAMPLERS", "get_sampler", "sample",
    "sample_uniform", "sampling_probs", "TaskPayload", "TaskStore", "state_hash", "NEVER", "NO_TASK",
    "TaskRows", "TaskTable", "init_table", "make_rows", "stats",
]
