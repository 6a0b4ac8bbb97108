"""kl_penalty against Schulman's formulas in NumPy and a Monte Carlo check of unbiasedness."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ace.rl import kl_penalty

KINDS = ("k1", "k2", "k3")


def reference_kl(logp, ref_logp, kind):
    log_r = np.asarray(ref_logp, np.float64) - np.asarray(logp, np.float64)
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": np.exp(log_r) - 1 - log_r}[kind]


@functools.partial(jax.jit, static_argnames="kind")
def _per_token(logp, ref_logp, *, kind):
    return kl_penalty(logp, ref_logp, kind=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_per_token_matches_numpy(kind):
    rng = np.random.default_rng(0)
    logp = np.log(rng.uniform(0.01, 1, (2, 6))).astype(np.float32)
    ref_logp = np.log(rng.uniform(0.01, 1, (2, 6))).astype(np.float32)
    out = _per_token(logp, ref_logp, kind=kind)
    assert out.shape == (2, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference_kl(logp, ref_logp, kind), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_with_mask_is_masked_token_mean_without_masked_gradient(kind):
    rng = np.random.default_rng(1)
    logp = np.log(rng.uniform(0.01, 1, (2, 6))).astype(np.float32)
    ref_logp = np.log(rng.uniform(0.01, 1, (2, 6))).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1]], bool)
    expected = reference_kl(logp, ref_logp, kind)[mask].mean()
    dirty_logp = np.where(mask, logp, -np.inf)
    value, grad = jax.value_and_grad(lambda lp: kl_penalty(lp, ref_logp, kind=kind, mask=mask))(
        dirty_logp)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.isfinite(grad))


@settings(max_examples=25, deadline=None)
@given(logp=arrays(np.float32, (2, 6), elements=st.floats(-10, 0, width=32)),
       ref_logp=arrays(np.float32, (2, 6), elements=st.floats(-10, 0, width=32)))
def test_k2_and_k3_are_non_negative_and_zero_only_at_equal_logprobs(logp, ref_logp):
    for kind in ("k2", "k3"):
        out = np.asarray(_per_token(logp, ref_logp, kind=kind))
        assert np.all(out >= 0), kind
        np.testing.assert_array_equal(out[logp == ref_logp], 0.0)
    np.testing.assert_allclose(_per_token(logp, logp, kind="k1"), 0.0)


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    true_kl = np.sum(p * np.log(p / q))
    samples = rng.choice(6, size=(64, 512), p=p)
    logp, ref_logp = np.log(p)[samples].astype(np.float32), np.log(q)[samples].astype(np.float32)
    for kind in ("k1", "k3"):
        estimate = float(kl_penalty(logp, ref_logp, kind=kind, mask=np.ones_like(logp)))
        np.testing.assert_allclose(estimate, true_kl, rtol=0.05, err_msg=kind)


def test_k3_gradient_matches_analytic_form_and_works_under_vmap():
    rng = np.random.default_rng(3)
    logp = np.log(rng.uniform(0.05, 1, (3, 4))).astype(np.float32)
    ref_logp = np.log(rng.uniform(0.05, 1, (3, 4))).astype(np.float32)
    grad = jax.grad(lambda lp: kl_penalty(lp, ref_logp, kind="k3").sum())(logp)
    # d/dlogp [(r − 1) − log r] with r = exp(ref − logp) is 1 − r.
    np.testing.assert_allclose(grad, 1 - np.exp(ref_logp - logp.astype(np.float64)), rtol=1e-5)
    batched = jax.vmap(lambda a, b: kl_penalty(a, b, kind="k2", mask=jnp.ones_like(a)))(logp,
                                                                                      ref_logp)
    np.testing.assert_allclose(batched, reference_kl(logp, ref_logp, "k2").mean(axis=1),
                               rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="k4"), "unknown KL estimator 'k4'; valid names: k1, k2, k3"),
    (dict(ref_logp=np.zeros((2, 5))), "ref_logp must have shape the shape of logp"),
    (dict(mask=np.ones(6)), "mask must have shape the shape of logp"),
    (dict(logp=np.float32(0.0), ref_logp=np.float32(0.0)), "logp must have shape"),
])
def test_kl_penalty_rejects_bad_input(kwargs, message):
    args = dict(logp=np.zeros((2, 6)), ref_logp=np.zeros((2, 6)), kind="k3")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kl_penalty(**args)
