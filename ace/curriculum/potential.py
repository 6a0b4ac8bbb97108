"""Learnability Potentials: how much a task is worth practising now, one formula per function.

Every potential has the signature `fn(table, *, optimistic_value, step) -> [C] float32` and is
registered in `POTENTIALS` under the name the config uses (`curriculum.potential`; a new one
plugs in with `register_potential`). Values on empty rows are meaningless (0); samplers and
eviction mask them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ace.core.registry import Registry
from ace.curriculum.table import TaskTable, check_table

# p(1-p) peaks at p = 1/2 with value 1/4; a never-tried task is assumed to sit at the frontier.
DEFAULT_OPTIMISTIC_VALUE = 0.25

Potential = Callable[..., jax.Array]
# Config key `curriculum.potential` -> potential; `register_potential` adds one.
POTENTIALS = Registry("curriculum.potential")


# Potentials whose value on a row is a function of that row's own columns only (not of `step`,
# not of other rows): `ace.curriculum.block_index` may cache them per block and recompute only the
# blocks whose rows changed.
ROW_LOCAL_POTENTIALS: set[str] = set()


def register_potential(name: str, *, row_local: bool = False):
    """Decorator: registers `fn(table, *, optimistic_value, step) -> [C] float32` as potential `name`.

    row_local=True declares that a row's value depends on that row's columns only (not on `step` or
    on other rows), which the block index (`ace.curriculum.block_index`) needs.
    """
    register = POTENTIALS.register(name)

    def decorator(fn):
        fn = register(fn)
        if row_local:
            ROW_LOCAL_POTENTIALS.add(name)
        return fn

    return decorator


def get_potential(name: str) -> Potential:
    """The potential registered under `name` (config key `curriculum.potential`); an unknown name
    raises listing the registered ones."""
    return POTENTIALS.get(name)


@register_potential("success_variance", row_local=True)
def success_variance_potential(table: TaskTable, *, optimistic_value: float, step=None) -> jax.Array:
    """LP = p(1 - p), p = success rate of the task's latest group of attempts.

    p(1-p) is the variance of a Bernoulli success: it is 0 for tasks always or never solved (their
    GRPO group advantages are all zero, so they teach nothing) and peaks at the frontier p = 1/2
    (docs/architecture.md, "Learnability Potential"). A task never tried gets `optimistic_value`.

    Args:
      table: TaskTable of capacity C.
      optimistic_value: LP of a task with `visits == 0`.
      step: unused; part of the common potential signature.

    Returns:
      [C] float32.
    """
    del step
    p = table.recent_success_rate
    return jnp.where(table.visits > 0, p * (1.0 - p), jnp.float32(optimistic_value)).astype(jnp.float32)


@register_potential("reward_std", row_local=True)
def reward_std_potential(table: TaskTable, *, optimistic_value: float, step=None) -> jax.Array:
    """LP = population std of the rewards of the task's latest group (continuous variant).

    With partial-credit rewards a group can disagree without any success flip; its reward spread is
    what gives GRPO a non-zero advantage. For 0/1 rewards this is sqrt(p(1-p)). A task never tried
    gets `optimistic_value`.

    Args:
      table: TaskTable of capacity C.
      optimistic_value: LP of a task with `visits == 0`.
      step: unused; part of the common potential signature.

    Returns:
      [C] float32.
    """
    del step
    return jnp.where(table.visits > 0, table.recent_reward_std,
                     jnp.float32(optimistic_value)).astype(jnp.float32)


def learnability(table: TaskTable, *, potential: str, optimistic_value: float, step=None) -> jax.Array:
    """The Learnability Potential of every row, by registered name.

    Args:
      table: TaskTable of capacity C.
      potential: a registered potential name (`POTENTIALS`).
      optimistic_value: LP of never-tried tasks.
      step: current trainer step (for potentials that depend on age); may be None.

    Returns:
      [C] float32; 0 on empty rows.
    """
    check_table(table)
    fn = get_potential(potential)
    lp = fn(table, optimistic_value=optimistic_value, step=step)
    return jnp.where(table.valid, lp, 0.0)
