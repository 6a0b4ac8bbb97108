"""Two-level top-k: equal to jax.lax.top_k (values, indices, tie order) on tie-heavy vectors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.curriculum.topk import top_k


def tie_heavy(rng, n):
    """Few distinct values (many ties), with +-inf and float32 max sprinkled in; no NaN, no -0.0."""
    x = rng.integers(-3, 4, n).astype(np.float32) / 4
    x[rng.random(n) < 0.05] = np.inf
    x[rng.random(n) < 0.05] = -np.inf
    x[rng.random(n) < 0.02] = np.finfo(np.float32).max
    return np.where(x == 0, np.float32(0.0), x)


@pytest.mark.parametrize("n, k, block", [(1000, 5, 8), (1003, 17, 8), (64 * 20 + 7, 1, 4), (4096, 16, 64),
                                         (50, 7, 4)])
def test_top_k_equals_lax_top_k_including_tie_order(n, k, block):
    rng = np.random.default_rng(n + k)
    fn = jax.jit(lambda v: top_k(v, k, block=block))
    for trial in range(4):
        x = tie_heavy(rng, n) if trial % 2 == 0 else rng.normal(size=n).astype(np.float32)
        want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
        got_v, got_i = fn(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i), err_msg=f"trial {trial}")
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
        # Independent of lax: the k largest by (value desc, index asc).
        np.testing.assert_array_equal(np.asarray(got_i), np.lexsort((np.arange(n), -x.astype(np.float64)))[:k])


def test_top_k_under_vmap_equals_per_row_calls():
    rng = np.random.default_rng(3)
    xs = np.stack([tie_heavy(rng, 999) for _ in range(3)])
    got_v, got_i = jax.jit(jax.vmap(lambda v: top_k(v, 6, block=8)))(jnp.asarray(xs))
    for b in range(3):
        want_v, want_i = jax.lax.top_k(jnp.asarray(xs[b]), 6)
        np.testing.assert_array_equal(np.asarray(got_i[b]), np.asarray(want_i))
        np.testing.assert_array_equal(np.asarray(got_v[b]), np.asarray(want_v))


@pytest.mark.parametrize("x, k, block, message", [
    (np.zeros((4, 4), np.float32), 2, 8, r"top_k takes a vector \[N\], got shape \(4, 4\)"),
    (np.zeros(8, np.float64), 2, 8, "top_k takes float32, got float"),
    (np.zeros(8, np.float32), 9, 8, r"k must be an int in \[1, N=8\], got 9"),
    (np.zeros(8, np.float32), 2, 1, "block must be an int >= 2, got 1"),
])
def test_top_k_bad_arguments_raise_naming_the_problem(x, k, block, message):
    with pytest.raises(ValueError, match=message):
        top_k(jnp.asarray(x) if x.dtype == np.float32 else x, k, block=block)
