"""The embedded JAX sampler against a no-cache forward, the learner's logprobs, and NumPy filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models import TINY, TINY_DENSE, forward, init_params
from ace.models.sharding import make_mesh
from ace.rollout.engine import RolloutEngine, SamplingParams
from ace.rollout.jax_sampler import (JaxSampler, apply_top_k, apply_top_p, filter_candidates, filter_logits, first_argmax,
                                     sample_tokens)
from ace.train.batches import make_batch
from ace.train.learner import LearnerConfig, learner_logprobs
from ace.train.queue import Sample

CONFIG = TINY_DENSE.replace(vocab_size=64)
MAX_NEW = 6
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 11, 4], [12], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def sampler(params):
    return JaxSampler(params, CONFIG, max_batch=4, max_prompt_len=12, max_new_tokens=MAX_NEW, prompt_buckets=(8,))


@jax.jit
def _full_forward_logits(params, tokens):
    """No-cache forward of [1, 16] right-padded tokens; causal, so padding never reaches earlier rows."""
    logits, _ = forward(params, CONFIG, tokens, jnp.arange(tokens.shape[1])[None])
    return logits[0]


def _next_logits(params, seq):
    padded = np.zeros((1, 16), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_full_forward_logits(params, jnp.asarray(padded))[len(seq) - 1], np.float64)


def _numpy_top_k(logits, k):
    out = np.full_like(logits, -np.inf)
    for i, row in enumerate(logits):
        keep = np.argsort(-row)[: (k[i] if 0 < k[i] <= row.size else row.size)]
        out[i, keep] = row[keep]
    return out


def _numpy_top_p(logits, p):
    out = np.full_like(logits, -np.inf)
    for i, row in enumerate(logits):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        total = 0.0
        for idx in np.argsort(-row):
            out[i, idx] = row[idx]
            total += probs[idx]
            if total >= p[i]:
                break
    return out


def test_top_k_and_top_p_filters_match_numpy():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (6, 40)) * 3, np.float32)
    k = np.array([0, 1, 3, 10, 40, 100], np.int32)
    p = np.array([1.0, 0.05, 0.3, 0.5, 0.9, 0.99], np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(apply_top_k)(logits, k)), _numpy_top_k(logits, k))
    np.testing.assert_array_equal(np.asarray(jax.jit(apply_top_p)(logits, p)), _numpy_top_p(logits, p))
    with pytest.raises(ValueError, match="top_k"):
        apply_top_k(jnp.asarray(logits), jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_sort_free_filter_equals_the_sort_based_reference(scale):
    # Flat rows (scale 0.3) put the nucleus beyond the candidates: the batch falls back to the sort.
    vocab = 300
    logits = np.array(jax.random.normal(jax.random.key(2), (8, vocab)) * scale, np.float32)
    logits[7, :5] = logits[7].max() + 1.0  # ties at the top-k threshold are kept, as in the reference
    for k, p in [(np.array([0, 1, 3, 10, 64, 0, 0, 5]), np.array([1.0, 0.05, 0.3, 0.5, 0.9, 0.99, 0.7, 1.0])),
                 (np.zeros(8, int), np.full(8, 0.95)), (np.full(8, 4), np.ones(8))]:
        k, p = k.astype(np.int32), p.astype(np.float32)
        candidates = filter_candidates(k, p, vocab)
        want = np.asarray(apply_top_p(apply_top_k(jnp.asarray(logits), k), p))
        got = np.asarray(jax.jit(filter_logits, static_argnames="candidates")(logits, k, p, candidates=candidates))
        np.testing.assert_array_equal(got, want)
    assert filter_candidates(np.zeros(4, np.int32), np.ones(4, np.float32), vocab) is None
    assert filter_candidates(np.array([0, 0, 0, vocab]), np.ones(4, np.float32), vocab) is None
    assert filter_candidates(np.array([0, 200, 0, 0]), np.ones(4, np.float32), vocab) == 200


def test_sampling_without_filters_draws_what_the_reference_draws():
    # Skipping filters that are off must not change a single draw.
    logits = jax.random.normal(jax.random.key(3), (8, 500)) * 2.0
    keys = jax.vmap(jax.random.key)(jnp.arange(8, dtype=jnp.uint32))
    t, p, k = jnp.full(8, 0.8), jnp.ones(8), jnp.zeros(8, jnp.int32)
    ref = sample_tokens(logits, keys, t, p, k, candidates=0)
    skip = sample_tokens(logits, keys, t, p, k, candidates=None)
    fast = sample_tokens(logits, keys, t, jnp.full(8, 0.9), jnp.full(8, 20, jnp.int32), candidates=64)
    slow = sample_tokens(logits, keys, t, jnp.full(8, 0.9), jnp.full(8, 20, jnp.int32), candidates=0)
    for a, b in ((ref, skip), (fast, slow)):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_draws_are_jax_random_categorical_and_greedy_rows_are_argmax():
    # The sampler's Gumbel-max draw must be exactly jax.random.categorical's, row by row.
    logits = jax.random.normal(jax.random.key(4), (16, 300)) * 3.0
    logits = logits.at[3, 7].set(logits[3].max()).at[3, 9].set(logits[3].max())  # a tie: first index wins
    keys = jax.vmap(jax.random.key)(jnp.arange(16, dtype=jnp.uint32))
    temperature = jnp.where(jnp.arange(16) % 4 == 3, 0.0, 0.7)
    tokens, _ = jax.jit(sample_tokens, static_argnames="candidates")(
        logits, keys, temperature, jnp.ones(16), jnp.zeros(16, jnp.int32), candidates=None)
    want = jax.vmap(jax.random.categorical)(keys, logits / 0.7)
    want = jnp.where(temperature <= 0, jnp.argmax(logits, axis=-1), want)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    assert int(tokens[3]) == 7
    np.testing.assert_array_equal(np.asarray(first_argmax(logits)), np.asarray(jnp.argmax(logits, axis=-1)))


def test_sampler_implements_the_rollout_protocol(sampler):
    assert isinstance(sampler, RolloutEngine)


def test_greedy_decoding_equals_stepwise_argmax_of_full_forward(sampler, params):
    gens = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
    for prompt, gen in zip(PROMPTS, gens):
        seq, want_logp = list(prompt), []
        for _ in range(MAX_NEW):
            last = _next_logits(params, seq)
            seq.append(int(np.argmax(last)))
            want_logp.append(last[seq[-1]] - np.log(np.sum(np.exp(last - last.max()))) - last.max())
        assert gen.output_ids == seq[len(prompt):]
        assert gen.finish_reason == "length"
        np.testing.assert_allclose(gen.logprobs, want_logp, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_learner_recomputed_logprobs_at_the_sampling_temperature(sampler, params,
                                                                                       temperature):
    """Both sides report log softmax(logits / T) before top-k / top-p: equal within 1e-4 in float32."""
    requests = [SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature, top_k=k, top_p=p, seed=i)
                for i, (k, p) in enumerate([(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.9)])]
    gens = sampler.generate(PROMPTS, requests)
    samples = [Sample(task_id=i, prompt_ids=p, output_ids=g.output_ids, rollout_logprobs=g.logprobs, reward=0.0,
                      duration_s=0.0, policy_version=g.weight_version) for i, (p, g) in enumerate(zip(PROMPTS, gens))]
    batch = make_batch(samples, np.zeros(len(samples)), pad_to=16)
    recomputed = learner_logprobs(params, batch, config=LearnerConfig(logprob_chunk_size=8, temperature=temperature),
                                  model_config=CONFIG)
    mask = batch.loss_mask != 0
    assert mask.sum() == sum(len(g.output_ids) for g in gens)
    np.testing.assert_allclose(np.asarray(recomputed)[mask], batch.rollout_logp[mask], atol=1e-4)


def test_fixed_seed_is_reproducible_and_other_seeds_differ(sampler):
    prompt = [PROMPTS[1]]
    runs = [sampler.generate(prompt, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.5, seed=s))[0].output_ids
            for s in (3, 3, 4, 5)]
    assert runs[0] == runs[1]
    assert runs[2] != runs[0] or runs[3] != runs[0]


def test_top_k_one_sampling_is_greedy(sampler):
    greedy = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
    topk1 = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, temperature=2.0, top_k=1, seed=9))
    assert [g.output_ids for g in greedy] == [g.output_ids for g in topk1]


def test_a_request_does_not_depend_on_its_batch_mates(sampler):
    mine = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.3, top_p=0.95, seed=11)
    alone = sampler.generate([PROMPTS[0]], mine)[0]
    others = [SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=(1,)),
              SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_k=4, seed=2),
              SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0)]
    crowded = sampler.generate([PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                               [others[0], others[1], mine, others[2]])
    assert crowded[2].output_ids == alone.output_ids
    np.testing.assert_allclose(crowded[2].logprobs, alone.logprobs, atol=1e-5)


def test_stop_ids_end_a_sequence_and_max_tokens_give_length(sampler):
    greedy = sampler.generate([PROMPTS[1]], SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))[0].output_ids
    stop_token = greedy[2]
    first = greedy.index(stop_token)
    stopped = sampler.generate([PROMPTS[1]], SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0,
                                                            stop_token_ids=(63, stop_token)))[0]
    assert stopped.output_ids == greedy[:first + 1]
    assert stopped.finish_reason == "stop"
    short = sampler.generate([PROMPTS[1]], SamplingParams(max_new_tokens=2, temperature=0.0))[0]
    assert short.output_ids == greedy[:2] and short.finish_reason == "length"


def test_requests_in_one_bucket_compile_prefill_and_decode_once(params):
    engine = JaxSampler(params, CONFIG, max_batch=2, max_prompt_len=12, max_new_tokens=3, prompt_buckets=(4, 8))
    for prompts in ([[1, 2]], [[1, 2, 3], [4]], [[5, 6, 7, 8], [9], [10, 11]]):
        engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0.7, top_k=3))
    assert engine.trace_counts == {"prefill": 1, "decode": 1}
    # Filters off (top-k 0, top-p 1) is the one other decode program: it skips filtering.
    engine.generate([[1]], SamplingParams(max_new_tokens=1, temperature=0.0, stop_token_ids=(2,)))
    assert engine.trace_counts == {"prefill": 1, "decode": 2}
    engine.generate([[1] * 7], SamplingParams(max_new_tokens=2))
    assert engine.trace_counts == {"prefill": 2, "decode": 2}


def test_sampler_on_a_mesh_equals_the_unsharded_sampler(sampler, params):
    sharded = JaxSampler(params, CONFIG, max_batch=4, max_prompt_len=12, max_new_tokens=MAX_NEW, prompt_buckets=(8,),
                         mesh=make_mesh({"fsdp": 2, "expert": 4}))
    assert not sharded._params["layers"]["mlp"]["gate_proj"].sharding.is_fully_replicated
    requests = [SamplingParams(max_new_tokens=MAX_NEW, temperature=t, seed=i) for i, t in enumerate([0, 1, 0.5, 0])]
    want, got = sampler.generate(PROMPTS, requests), sharded.generate(PROMPTS, requests)
    assert [g.output_ids for g in got] == [g.output_ids for g in want]
    np.testing.assert_allclose(np.concatenate([g.logprobs for g in got]),
                               np.concatenate([g.logprobs for g in want]), atol=1e-5)


def test_update_weights_swaps_params_and_bumps_version(params):
    engine = JaxSampler(params, CONFIG, max_batch=1, max_prompt_len=4, max_new_tokens=2, prompt_buckets=())
    before = engine.generate([[3, 4]], SamplingParams(max_new_tokens=2, temperature=0.0))[0]
    new = init_params(CONFIG, jax.random.key(42))
    engine.update_weights(new, 3)
    after = engine.generate([[3, 4]], SamplingParams(max_new_tokens=2, temperature=0.0))[0]
    assert (before.weight_version, after.weight_version, engine.weight_version) == (0, 3, 3)
    assert after.output_ids[0] == int(np.argmax(_next_logits(new, [3, 4])))
    with pytest.raises(ValueError, match="version must not go back"):
        engine.update_weights(new, 2)
    with pytest.raises(ValueError, match="tree, shapes and dtypes"):
        engine.update_weights({"embed": new["embed"]}, 4)


def test_bad_requests_raise_with_the_offending_value(sampler):
    with pytest.raises(ValueError, match="13 tokens; expected 1..12"):
        sampler.generate([[1] * 13], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="max_new_tokens=7"):
        sampler.generate([[1]], SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        sampler.generate([[64]], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        sampler.generate([[1], [2]], [SamplingParams()])


# A tiny MoE with many experts, so that a short sequence leaves some experts of every layer unused.
MOE = TINY.replace(vocab_size=64, num_experts=16, num_experts_per_tok=2)


def _boost_unused_experts(params, routing: np.ndarray, key) -> dict:
    """Router columns of the experts `routing` ([L, N, k]) never used, per layer, replaced by large
    random vectors: fresh top-k now picks them, while the used experts' logits (hence the gates of a
    replay, renormalised over the replayed experts only) are unchanged."""
    router = np.array(params["layers"]["mlp"]["router"])  # [L, D, E]
    for layer in range(router.shape[0]):
        used = set(np.unique(routing[layer][routing[layer] >= 0]).tolist())
        unused = [e for e in range(router.shape[2]) if e not in used]
        assert unused, f"layer {layer} used every expert; the test needs a longer tail of experts"
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, layer), (router.shape[1], len(unused))))
        router[layer][:, unused] = 20.0 * np.linalg.norm(router[layer], axis=0).mean() * noise
    new = jax.tree.map(lambda x: x, params)
    new["layers"]["mlp"]["router"] = jnp.asarray(router)
    return new


def test_routing_replay_reproduces_the_samplers_logprobs_exactly_after_the_router_changed():
    params = init_params(MOE, jax.random.key(3))
    sampler = JaxSampler(params, MOE, max_batch=2, max_prompt_len=12, max_new_tokens=MAX_NEW, prompt_buckets=(8,),
                         return_routing=True)
    prompts = PROMPTS[:2]
    gens = sampler.generate(prompts, [SamplingParams(max_new_tokens=MAX_NEW, temperature=0.7, seed=s) for s in (1, 2)])
    k = MOE.num_experts_per_tok
    for prompt, gen in zip(prompts, gens):
        n = len(prompt) + len(gen.output_ids)
        assert gen.routing.shape == (MOE.num_layers, n, k) and gen.routing.dtype == np.int32
        assert np.all(gen.routing[:, -1] == -1) and np.all(gen.routing[:, :-1] >= 0)
    samples = [Sample(task_id=i, prompt_ids=p, output_ids=g.output_ids, rollout_logprobs=g.logprobs, reward=0.0,
                      duration_s=0.0, policy_version=0, routing=g.routing)
               for i, (p, g) in enumerate(zip(prompts, gens))]
    batch = make_batch(samples, np.zeros(2), pad_to=16)
    assert batch.routing.shape == (MOE.num_layers, 2, 16, k)
    mask = batch.loss_mask != 0
    replay = LearnerConfig(logprob_chunk_size=8, temperature=0.7, routing_replay=True)
    free = LearnerConfig(logprob_chunk_size=8, temperature=0.7)

    # Same params: replayed and fresh routing both give the sampler's numbers.
    np.testing.assert_allclose(np.asarray(learner_logprobs(params, batch, config=replay, model_config=MOE))[mask],
                               batch.rollout_logp[mask], atol=1e-5)
    # Perturbed routers: fresh routing moves to the boosted experts, replay stays exact.
    perturbed = _boost_unused_experts(params, np.concatenate([g.routing for g in gens], axis=1), jax.random.key(9))
    replayed = np.asarray(learner_logprobs(perturbed, batch, config=replay, model_config=MOE))
    fresh = np.asarray(learner_logprobs(perturbed, batch, config=free, model_config=MOE))
    np.testing.assert_allclose(replayed[mask], batch.rollout_logp[mask], atol=1e-5)
    assert np.max(np.abs(fresh[mask] - batch.rollout_logp[mask])) > 1e-2
    _, aux = forward(perturbed, MOE, jnp.asarray(batch.tokens), jnp.asarray(batch.positions), return_routing=True)
    own = np.sort(np.asarray(aux.routing), -1)
    differ = np.any(own != np.sort(batch.routing, -1), -1)[:, mask]
    assert differ.mean() > 0.2
