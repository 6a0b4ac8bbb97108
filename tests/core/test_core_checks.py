"""ace.core.checks: one message style for every pure function's arguments; traced values pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.core.checks import (as_float_array, check_indices, check_rank, check_scalar, check_shape, check_static_int,
                             is_concrete)


@pytest.mark.parametrize("value, kwargs, error, message", [
    (0.0, dict(low=0.0, low_inclusive=False), ValueError, "x must be > 0.0, got 0.0"),
    (-1, dict(low=0), ValueError, "x must be >= 0, got -1"),
    (1.0, dict(high=1.0, high_inclusive=False), ValueError, "x must be < 1.0, got 1.0"),
    (2.5, dict(high=1.0), ValueError, "x must be <= 1.0, got 2.5"),
    (float("nan"), {}, ValueError, "x must be finite, got nan"),
    (np.ones(2), {}, ValueError, r"x must be a scalar, got shape \(2,\)"),
    (True, {}, TypeError, "x must be a real number, got bool"),
    ("0.2", {}, TypeError, "x must be a real number, got str"),
    (jnp.float32(-0.5), dict(low=0.0), ValueError, "x must be >= 0.0, got -0.5"),  # a concrete array is read
])
def test_check_scalar_names_the_argument_the_bound_and_the_value(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_scalar(value, "x", **kwargs)


def test_check_scalar_passes_good_and_traced_values():
    check_scalar(0.5, "x", low=0.0, high=1.0)
    check_scalar(np.int32(3), "x", low=0)
    # Under jit the value cannot be read: the check is skipped, not failed.
    assert float(jax.jit(lambda v: (check_scalar(v, "x", low=0.0), v)[1])(-1.0)) == -1.0


def test_is_concrete_looks_into_pytrees():
    assert is_concrete(1.0, {"a": np.zeros(2)})
    seen = []
    jax.jit(lambda x: seen.append(is_concrete({"a": x}, 1.0)) or x)(1.0)
    assert seen == [False]


def test_shape_rank_int_and_index_checks():
    with pytest.raises(ValueError, match=r"m must have shape \[B, T\] \(rank 2\), got shape \(3,\)"):
        check_rank(jnp.zeros(3), 2, "m", "[B, T]")
    with pytest.raises(ValueError, match=r"m must have shape \[B\] = \(2,\), got \(3,\)"):
        check_shape(jnp.zeros(3), (2,), "m", "[B]")
    with pytest.raises(ValueError, match="n must be a Python int"):
        check_static_int(2.0, "n", low=1)
    assert check_static_int(np.int64(3), "n", low=1) == 3
    with pytest.raises(IndexError, match=r"idx\[1\] = 4 is out of range \[0, 4\)"):
        check_indices([0, 4], 4, "idx")
    check_indices([-1, 3], 4, "idx", allow_padding=True)
    assert as_float_array(np.ones(2, np.int32), "a").dtype == jnp.float32
    assert as_float_array(jnp.ones(2, jnp.bfloat16), "a").dtype == jnp.float32
