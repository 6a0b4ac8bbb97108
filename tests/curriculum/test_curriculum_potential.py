"""Learnability Potentials against NumPy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.curriculum import get_potential, learnability, register_potential, update_stats
from ace.curriculum.potential import POTENTIALS, reward_std_potential, success_variance_potential


def test_success_variance_is_zero_for_tasks_always_or_never_solved(make_filled_table):
    table, _ = make_filled_table(8, 4)
    g = 6
    success = np.array([[1] * g, [0] * g, [1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    rewards = success.astype(np.float32) * 0.7 + 0.1
    table = update_stats(table, jnp.arange(4), rewards, success, 1)
    lp = np.asarray(learnability(table, potential="success_variance", optimistic_value=0.25))
    p = success.mean(axis=1)
    np.testing.assert_allclose(lp[:4], p * (1 - p), rtol=1e-6)
    assert lp[0] == 0.0 and lp[1] == 0.0
    assert lp[4:].tolist() == [0.0] * 4  # empty rows


def test_never_tried_tasks_get_the_optimistic_value(make_filled_table):
    table, _ = make_filled_table(8, 3)
    table = update_stats(table, jnp.array([1]), jnp.ones((1, 4)), jnp.ones((1, 4), bool), 1)
    for name in POTENTIALS.names():
        lp = np.asarray(learnability(table, potential=name, optimistic_value=0.4))
        assert lp[0] == pytest.approx(0.4) and lp[2] == pytest.approx(0.4), name
        assert lp[1] == 0.0, name  # tried and always solved: no spread


def test_reward_std_potential_is_the_std_of_the_latest_group(make_filled_table):
    table, _ = make_filled_table(8, 5)
    rng = np.random.default_rng(3)
    old = rng.normal(size=(5, 4)).astype(np.float32)
    new = rng.normal(size=(5, 4)).astype(np.float32) * np.arange(1, 6)[:, None]
    table = update_stats(table, jnp.arange(5), old, old > 0, 1)
    table = update_stats(table, jnp.arange(5), new, new > 0, 2)
    lp = np.asarray(reward_std_potential(table, optimistic_value=0.25))
    np.testing.assert_allclose(lp[:5], new.std(axis=1), rtol=1e-5)


def test_potentials_jit_and_vmap_over_tables(make_filled_table):
    tables = [make_filled_table(8, 4)[0] for _ in range(3)]
    rng = np.random.default_rng(0)
    succ = rng.random((3, 4, 5)) < 0.5
    tables = [update_stats(t, jnp.arange(4), s.astype(np.float32), s, 1) for t, s in zip(tables, succ)]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *tables)
    fn = jax.jit(jax.vmap(lambda t: success_variance_potential(t, optimistic_value=0.25)))
    p = succ.mean(axis=2)
    np.testing.assert_allclose(np.asarray(fn(stacked))[:, :4], p * (1 - p), rtol=1e-6)


def test_a_registered_potential_is_used_by_name(make_filled_table):
    name = "test_only_visits"
    if name not in POTENTIALS:
        @register_potential(name)
        def visits(table, *, optimistic_value, step=None):
            return table.visits.astype(jnp.float32)
    table, _ = make_filled_table(8, 3)
    table = update_stats(table, jnp.array([1]), jnp.ones((1, 4)), jnp.ones((1, 4), bool), 1)
    lp = np.asarray(learnability(table, potential=name, optimistic_value=0.25))
    assert lp.tolist() == [0.0, 4.0] + [0.0] * 6
    with pytest.raises(ValueError, match="curriculum.potential 'test_only_visits' is already registered"):
        register_potential(name)(lambda table, **kw: table.visits)


def test_unknown_potential_name_is_rejected():
    with pytest.raises(ValueError, match="unknown curriculum.potential 'entropy'"):
        get_potential("entropy")
