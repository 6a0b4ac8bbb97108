"""Samplers: empirical frequencies against the formula, without replacement, jit/vmap, bad input."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from ace.curriculum import get_sampler, sample, sample_uniform, sampling_probs, update_stats
from ace.curriculum.sampler import SAMPLERS

TAU, EPS = 0.1, 0.2
DRAWS = 20_000


def frontier_table(make_filled_table):
    """8 rows, 6 valid: success rates 0, 1/4, 1/2, 3/4, 1 and one never tried."""
    table, _ = make_filled_table(8, 6)
    success = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    return update_stats(table, jnp.arange(5), success.astype(np.float32), success, 1)


def numpy_probs(table, tau, eps, optimistic=0.25):
    valid = np.asarray(table.valid)
    p = np.asarray(table.recent_success_rate)
    lp = np.where(np.asarray(table.visits) > 0, p * (1 - p), optimistic)[valid]
    soft = np.exp(lp / tau) / np.exp(lp / tau).sum()
    q = np.zeros(valid.shape)
    q[valid] = (1 - eps) * soft + eps / valid.sum()
    return q


def draw_many(table, n, keys, **kw):
    fn = jax.jit(jax.vmap(lambda k: sample(k, table, n, potential="success_variance", step=2, **kw)))
    return np.asarray(fn(keys))


def test_sampling_probs_match_the_numpy_formula(make_filled_table):
    table = frontier_table(make_filled_table)
    for tau, eps in [(TAU, EPS), (1.0, 0.0), (0.05, 1.0)]:
        q = sampling_probs(table, temperature=tau, eps_uniform=eps, potential="success_variance")
        np.testing.assert_allclose(np.asarray(q), numpy_probs(table, tau, eps), rtol=1e-5, atol=1e-7)


def test_ordered_pair_frequencies_match_successive_draws_without_replacement(make_filled_table):
    table = frontier_table(make_filled_table)
    idx = draw_many(table, 2, jax.random.split(jax.random.key(0), DRAWS), temperature=TAU, eps_uniform=EPS)
    assert (idx[:, 0] != idx[:, 1]).all()
    q = numpy_probs(table, TAU, EPS)
    valid = np.flatnonzero(q > 0)
    cells = list(itertools.permutations(valid, 2))
    # P(first = i, second = j) of successive draws without replacement (Plackett-Luce).
    expected = np.array([q[i] * q[j] / (1 - q[i]) for i, j in cells]) * DRAWS
    lookup = {c: k for k, c in enumerate(cells)}
    observed = np.bincount([lookup[(a, b)] for a, b in idx], minlength=len(cells))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert sps.chi2.sf(chi2, len(cells) - 1) > 1e-3, (observed, expected.round())
    # The test has power: the same draws are far from the uniform pair distribution.
    flat = np.full(len(cells), DRAWS / len(cells))
    assert sps.chi2.sf(((observed - flat) ** 2 / flat).sum(), len(cells) - 1) < 1e-9


def test_uniform_sampler_draws_every_valid_row_equally(make_filled_table):
    table = frontier_table(make_filled_table)
    fn = jax.jit(jax.vmap(lambda k: sample_uniform(k, table, 3)))
    idx = np.asarray(fn(jax.random.split(jax.random.key(1), DRAWS)))
    first = np.bincount(idx[:, 0], minlength=8)
    assert first[6:].sum() == 0
    assert sps.chisquare(first[:6]).pvalue > 1e-3
    assert all(len(set(r)) == 3 for r in idx[:100])


def test_draws_are_distinct_valid_rows_and_cover_the_table(make_filled_table):
    table = frontier_table(make_filled_table)
    for name in SAMPLERS.names():
        idx = np.asarray(get_sampler(name)(jax.random.key(5), table, 6, temperature=TAU, eps_uniform=EPS,
                                           potential="success_variance", step=2))
        assert idx.dtype == np.int32 and sorted(idx.tolist()) == list(range(6)), name


def test_jit_equals_eager_and_outer_jit_pads_with_minus_one(make_filled_table):
    table = frontier_table(make_filled_table)
    key = jax.random.key(7)
    kw = dict(temperature=TAU, eps_uniform=EPS, potential="success_variance", step=2)
    eager = sample(key, table, 4, **kw)
    jitted = jax.jit(lambda k, t: sample(k, t, 4, **kw))(key, table)
    np.testing.assert_array_equal(eager, jitted)
    # Inside an outer jit the valid count is unknown: positions past it are -1, not empty rows.
    over = np.asarray(jax.jit(lambda k, t: sample(k, t, 8, **kw))(key, table))
    assert sorted(over[:6].tolist()) == list(range(6)) and over[6:].tolist() == [-1, -1]


def test_vmap_over_tables_and_keys(make_filled_table):
    t1 = frontier_table(make_filled_table)
    t2 = t1._replace(valid=t1.valid.at[0].set(False))
    tables = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), t1, t2)
    fn = jax.jit(jax.vmap(lambda k, t: sample(k, t, 5, temperature=TAU, eps_uniform=EPS,
                                                potential="success_variance", step=2)))
    out = np.asarray(fn(jax.random.split(jax.random.key(2), 2), tables))
    assert sorted(out[1].tolist()) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(out[0], sample(jax.random.split(jax.random.key(2), 2)[0], t1, 5,
                                                 temperature=TAU, eps_uniform=EPS,
                                                 potential="success_variance", step=2))


@pytest.mark.parametrize("kwargs, n, message", [
    ({}, 7, "n=7 tasks without replacement: the table holds only 6 valid rows"),
    ({}, 9, "n=9 tasks without replacement from a table of capacity 8"),
    ({}, 0, "n must be a positive int"),
    ({"temperature": 0.0}, 2, "temperature must be > 0"),
    ({"eps_uniform": 1.5}, 2, "eps_uniform must be <= 1"),
    ({"temperature": float("nan")}, 2, "temperature must be finite"),
    ({"potential": "nope"}, 2, "unknown curriculum.potential 'nope'"),
])
def test_bad_sample_arguments_raise_naming_the_problem(make_filled_table, kwargs, n, message):
    table = frontier_table(make_filled_table)
    kw = dict(temperature=TAU, eps_uniform=EPS, potential="success_variance", step=2) | kwargs
    with pytest.raises(ValueError, match=message):
        sample(jax.random.key(0), table, n, **kw)


def test_non_key_and_unknown_sampler_are_rejected(make_filled_table):
    table = frontier_table(make_filled_table)
    with pytest.raises(TypeError, match="key must be a jax.random key"):
        sample_uniform(np.float32(3.0), table, 2)
    with pytest.raises(ValueError, match="unknown curriculum.sampler 'greedy'"):
        get_sampler("greedy")


def test_large_table_draws_equal_the_one_level_gumbel_top_k():
    # 8192 rows, n = 8: `sample` selects through block maxima; the reference scores every row and
    # runs one lax.top_k, as the sampler's docstring describes (top-n of q_i / E_i).
    from ace.curriculum import init_table
    from ace.curriculum.sampler import row_uniforms

    c, n, rng = 8192, 8, np.random.default_rng(4)
    table = init_table(c)
    table = table._replace(valid=jnp.asarray(rng.random(c) < 0.9), visits=jnp.asarray(rng.integers(0, 2, c), jnp.int32),
                           recent_success_rate=jnp.asarray(rng.integers(0, 5, c) / 4, jnp.float32))
    kw = dict(temperature=TAU, eps_uniform=EPS, potential="success_variance")
    q = sampling_probs(table, **kw)
    for seed in range(3):
        key = jax.random.key(seed)
        e = -jnp.log(row_uniforms(key, c))
        _, want = jax.lax.top_k(jnp.where(q > 0, q / e, -1.0), n)
        np.testing.assert_array_equal(np.asarray(sample(key, table, n, step=1, **kw)), np.asarray(want))
