"""Embedded JAX rollout engine: bucketed batched prefill, then KV-cache decode inside one jitted loop.

Shapes are fixed so that nothing recompiles per request: the batch is padded to `max_batch` rows,
each prompt is right-padded to the smallest prompt bucket that holds the longest prompt of its
chunk, and every bucket shares one KV cache of `max(prompt_buckets) + max_new_tokens` slots, so
prefill compiles once per bucket and the decode loop once per filter setting: top-k and top-p off
(the common case, which skips filtering) or on (`filter_logits`, sort-free, with a static candidate
count). Each decode step is `ace.models.decode.decode_step`, which reads the KV cache in place and
writes it with one scatter per step.

Behaviour logprobs. `Generation.logprobs[i]` is log softmax(logits / temperature)[token]: the
sampling distribution after temperature and *before* top-k / top-p truncation. Truncation is a
sampler heuristic the learner does not model; at temperature 1 these numbers are exactly what the
learner recomputes with `ace.models.logprobs.token_logprobs`. For greedy requests (temperature 0)
the temperature-scaled distribution is a point mass, so the logprob at temperature 1 is returned.

Routing. With `return_routing` on an MoE model, each `Generation.routing` holds the experts every
layer routed every position to ([L, P + T, k]: the prompt from prefill, then each output token
from the decode step that fed it; -1 for the last output token, which is never fed), for the
learner to replay.

Randomness. Request i draws step t from `fold_in(key(seed_i), t)`, so its tokens depend on its own
seed and prompt only, never on which other requests share the batch. A request without a seed
gets one from the engine's own generator.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ace.models import qwen3
from ace.models.configs import ModelConfig
from ace.models.decode import decode_step
from ace.models.logprobs import output_weight
from ace.models.sharding import use_mesh
from ace.rollout.engine import Generation, SamplingParams

_SEED_MODULUS = 2 ** 32  # jax.random.key takes a uint32 seed


def apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keeps the `top_k` largest logits of each row and sets the rest to -inf.

    Args:
      logits: [B, V] float.
      top_k: [B] int; 0 (or >= V) keeps every logit. Logits tied with the k-th largest are kept too.
    Returns:
      [B, V] float, same dtype.
    """
    if logits.ndim != 2 or top_k.shape != logits.shape[:1]:
        raise ValueError(f"apply_top_k: logits must be [B, V] and top_k [B], got {logits.shape} and {top_k.shape}")
    vocab = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)
    ordered = -jnp.sort(-logits, axis=-1)
    threshold = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches `top_p`.

    A token is kept when the probability mass of the strictly more likely tokens is below `top_p`
    (so the most likely token is always kept). Probabilities are softmax(logits) of the row as
    given, so -inf entries from `apply_top_k` are renormalised away first.

    Args:
      logits: [B, V] float.
      top_p: [B] float in (0, 1]; 1 keeps every logit.
    Returns:
      [B, V] float, same dtype, with dropped logits at -inf.
    """
    if logits.ndim != 2 or top_p.shape != logits.shape[:1]:
        raise ValueError(f"apply_top_p: logits must be [B, V] and top_p [B], got {logits.shape} and {top_p.shape}")
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1 because mass_before[0] = 0 < top_p
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    filtered = jnp.where(logits >= threshold, logits, -jnp.inf)
    # p = 1 must be a no-op even when float cumsums fall short of 1.
    return jnp.where((top_p >= 1.0)[:, None], logits, filtered)


# Candidates the fast filter keeps (at least): the nucleus of a trained model's next-token
# distribution almost always lies in its top 64 tokens; rows whose nucleus does not fall back to a sort.
FILTER_CANDIDATES = 64


def filter_candidates(top_k: np.ndarray, top_p: np.ndarray, vocab: int) -> int | None:
    """The static candidate count of `filter_logits` for a batch's settings, or None when every
    row has both filters off (top_k = 0 or >= V, top_p >= 1): then the sampler skips filtering."""
    k = np.where((top_k <= 0) | (top_k >= vocab), 0, top_k)
    if not np.any(k > 0) and not np.any(top_p < 1.0):
        return None
    return int(min(vocab, max(FILTER_CANDIDATES, int(k.max()))))


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, *, candidates: int) -> jax.Array:
    """`apply_top_p(apply_top_k(logits, top_k), top_p)` without sorting the vocabulary.

    `lax.top_k` takes the `candidates` largest logits per row; top-k is a threshold on them, and
    the nucleus is searched among the top-k survivors. Only when some row's nucleus needs more
    than `candidates` tokens does the batch fall back to the sort-based reference, so the result
    equals the reference exactly (ties at a threshold are kept, as there).

    Args:
      logits: [B, V] float. top_k: [B] int, 0 = off, each <= candidates when on. top_p: [B] float in (0, 1].
      candidates: static int in [1, V], >= every row's top_k.
    Returns:
      [B, V] float, same dtype, with dropped logits at -inf.
    """
    vocab = logits.shape[-1]
    values, _ = jax.lax.top_k(logits, candidates)  # [B, K], descending
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k).astype(jnp.int32)
    in_top_k = jnp.arange(candidates)[None, :] < k[:, None]  # [B, K]: candidate survives top-k
    # Renormalise over the top-k survivors (the whole row when top-k is off), as apply_top_p does.
    k_threshold = jnp.where((k <= candidates)[:, None],
                            jnp.take_along_axis(values, jnp.minimum(k, candidates)[:, None] - 1, axis=-1), -jnp.inf)
    row = jnp.where(logits >= k_threshold, logits, -jnp.inf).astype(jnp.float32)
    log_z = jax.nn.logsumexp(row, axis=-1, keepdims=True)
    probs = jnp.where(in_top_k, jnp.exp(values.astype(jnp.float32) - log_z), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(in_top_k & (mass_before < top_p[:, None]), axis=-1)  # >= 1
    # The nucleus may extend past the candidates only when top-k is off for that row.
    overflow = (kept == candidates) & (k > candidates) & (top_p < 1.0) \
        & (jnp.sum(probs, axis=-1) < top_p)
    p_threshold = jnp.take_along_axis(values, kept[:, None] - 1, axis=-1)
    fast = jnp.where(logits >= jnp.maximum(k_threshold, p_threshold), logits, -jnp.inf)
    fast = jnp.where((top_p >= 1.0)[:, None], jnp.where(logits >= k_threshold, logits, -jnp.inf), fast)
    return jax.lax.cond(jnp.any(overflow), lambda: apply_top_p(apply_top_k(logits, top_k), top_p), lambda: fast)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the maximum) for x [B, V] without NaNs, as a max
    and a min reduction: XLA:CPU runs argmax's variadic (value, index) reduce about 4x slower, and a
    decode step takes one per token."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array, *, candidates: int | None = 0) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row and returns its behaviour logprob (see the module docstring).

    The draw is the Gumbel-max trick, argmax(filtered + Gumbel noise from the row's key): exactly
    what `jax.random.categorical(key, filtered)` draws. Greedy rows get no noise, hence the argmax
    of their logits (which every filter keeps).

    Args:
      logits: [B, V] float32 next-token logits.
      keys: [B] typed PRNG keys, one per row.
      temperature: [B] float32, 0 = greedy (argmax).
      top_p: [B] float32 in (0, 1]. top_k: [B] int32, 0 = off.
      candidates: static; 0 filters with the sort-based reference (`apply_top_k`, `apply_top_p`),
        an int > 0 with `filter_logits`, None skips filtering (every row has both filters off;
        see `filter_candidates`).
    Returns:
      (tokens [B] int32, logprobs [B] float32).
    """
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    logp_all = jax.nn.log_softmax(scaled, axis=-1)
    if candidates is None:
        filtered = scaled
    elif candidates == 0:
        filtered = apply_top_p(apply_top_k(scaled, top_k), top_p)
    else:
        filtered = filter_logits(scaled, top_k, top_p, candidates=candidates)
    noise = jax.vmap(jax.random.gumbel, in_axes=(0, None, None))(keys, scaled.shape[-1:], scaled.dtype)
    tokens = first_argmax(filtered + jnp.where(greedy[:, None], 0.0, noise))
    return tokens, jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]


class JaxSampler:
    """`RolloutEngine` that runs the Qwen3 decoder in-process with JAX.

    Args:
      params: the model params tree (see `ace.models.qwen3.init_params`).
      config: the model config.
      max_batch: rows per compiled batch; longer request lists run in chunks of this size.
      max_prompt_len: longest accepted prompt (tokens).
      max_new_tokens: the most tokens any request may generate (its own `max_new_tokens` may be less).
      prompt_buckets: prompt lengths to pad to; `max_prompt_len` is added when missing.
      max_stop_ids: most stop token ids per request (stop ids are padded to this fixed width).
      mesh: optional mesh; params are sharded on it with the rules table and computation runs under it.
      weight_version: the version of `params`.
      seed: seeds the generator that gives seeds to requests without one.
      return_routing: fill `Generation.routing` (MoE models only; ignored for dense ones).
    """

    def __init__(self, params: Any, config: ModelConfig, *, max_batch: int, max_prompt_len: int,
                 max_new_tokens: int, prompt_buckets: Sequence[int] = (32, 128, 512), max_stop_ids: int = 8,
                 mesh: jax.sharding.Mesh | None = None, weight_version: int = 0, seed: int = 0,
                 return_routing: bool = False):
        for name, value in (("max_batch", max_batch), ("max_prompt_len", max_prompt_len),
                            ("max_new_tokens", max_new_tokens), ("max_stop_ids", max_stop_ids)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"JaxSampler: {name} must be a positive int, got {value!r}")
        bad = [b for b in prompt_buckets if not isinstance(b, int) or b < 1]
        if bad:
            raise ValueError(f"JaxSampler: prompt_buckets must be positive ints, got {list(prompt_buckets)}")
        self.buckets = tuple(sorted({b for b in prompt_buckets if b < max_prompt_len} | {max_prompt_len}))
        self.config = config
        self.max_batch = max_batch
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.max_stop_ids = max_stop_ids
        self.cache_len = max_prompt_len + max_new_tokens
        if self.cache_len > config.max_position_embeddings:
            raise ValueError(f"JaxSampler: max_prompt_len + max_new_tokens = {self.cache_len} exceeds "
                             f"config.max_position_embeddings = {config.max_position_embeddings}")
        self.mesh = mesh
        self.return_routing = bool(return_routing) and config.is_moe
        self._lock = threading.Lock()
        self._seed_rng = np.random.default_rng(seed)
        self._params = self._place(params)
        self._version = int(weight_version)
        # Counts traces (= compilations) per jitted function; the tests hold it to one per shape.
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._prefill = jax.jit(functools.partial(self._prefill_impl, config=config, cache_len=self.cache_len,
                                                  routing=self.return_routing))
        self._decode = jax.jit(functools.partial(self._decode_impl, config=config, max_new=max_new_tokens,
                                                 routing=self.return_routing), static_argnames=("candidates",))

    @property
    def weight_version(self) -> int:
        return self._version

    def _place(self, params):
        if self.mesh is None:
            return params
        return qwen3.shard_params(params, self.config, self.mesh)

    def update_weights(self, params: Any, version: int) -> None:
        """Swaps in `params` (same tree, shapes and dtypes) as policy `version` (>= the current one)."""
        want = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), self._params)
        got = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), params)
        if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
            raise ValueError("update_weights: params must have the tree, shapes and dtypes of the current params")
        if int(version) < self._version:
            raise ValueError(f"update_weights: version must not go back, got {version} < {self._version}")
        placed = self._place(params)
        with self._lock:
            self._params, self._version = placed, int(version)

    # ----- jitted bodies ---------------------------------------------------------------------------

    def _prefill_impl(self, params, tokens, lengths, *, config: ModelConfig, cache_len: int, routing: bool):
        """tokens [B, P] right-padded, lengths [B] -> (next-token logits [B, V] f32, KVCache of cache_len,
        routed experts [L, B, P, k] int32 or None)."""
        self.trace_counts["prefill"] += 1
        b, p = tokens.shape
        cache = qwen3.init_cache(config, b, cache_len, dtype=config.param_dtype)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        hidden, aux = qwen3.forward(params, config, tokens, positions, cache=cache, return_hidden=True,
                                    return_routing=routing)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        logits = jnp.einsum("bd,dv->bv", last, output_weight(params, config), preferred_element_type=jnp.float32)
        return logits, aux.cache, aux.routing

    def _decode_impl(self, params, logits, cache, lengths, seeds, temperature, top_p, top_k, stop_ids,
                     row_max_new, active, *, config: ModelConfig, max_new: int, routing: bool,
                     candidates: int | None):
        """The sampling loop as one `lax.while_loop`, ending early once every row is done.

        Args: logits [B, V] f32 after prefill; cache KVCache; lengths [B] int32 prompt lengths;
          seeds [B] uint32; temperature, top_p [B] f32; top_k [B] int32; stop_ids [B, S] int32 (-1 pad);
          row_max_new [B] int32; active [B] bool (False for padding rows); candidates: static, the
          filter's (`filter_candidates`: None when every row has top-k and top-p off).
        Returns: (tokens [B, max_new] int32, logprobs [B, max_new] f32, counts [B] int32, stopped [B] bool,
          routed experts [L, B, max_new, k] int32 of each fed output token (-1 where not fed), or None).
        """
        self.trace_counts["decode"] += 1
        b = logits.shape[0]
        keys = jax.vmap(jax.random.key)(seeds)
        n_routes = (config.num_layers, b, max_new, config.num_experts_per_tok) if routing else (0, b, max_new, 0)

        def cond(state):
            t, _, _, done, *_ = state
            return (t < max_new) & ~jnp.all(done)

        def body(state):
            t, logits, cache, done, counts, stopped, out_tokens, out_logp, routes = state
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
            tokens, logp = sample_tokens(logits, step_keys, temperature, top_p, top_k, candidates=candidates)
            writing = ~done
            out_tokens = out_tokens.at[:, t].set(jnp.where(writing, tokens, 0))
            out_logp = out_logp.at[:, t].set(jnp.where(writing, logp, 0.0))
            counts = counts + writing.astype(jnp.int32)
            hit_stop = writing & jnp.any(tokens[:, None] == stop_ids, axis=-1)
            stopped = stopped | hit_stop
            done = done | hit_stop | (counts >= row_max_new)

            # Feed the sampled tokens, even on the last iteration, when every row may be done: a
            # `lax.cond` that skipped that one step made XLA copy the KV cache on every step (12% slower).
            # The token sampled at step t sits at position prompt_len + t, its cache slot.
            logits, aux = decode_step(params, config, tokens, lengths + t, cache, return_routing=routing)
            cache = aux.cache
            if routing:  # aux.routing [L, B, k]: the experts of the token just fed
                routes = routes.at[:, :, t].set(jnp.where(done[None, :, None], -1, aux.routing))
            return t + 1, logits, cache, done, counts, stopped, out_tokens, out_logp, routes

        init = (jnp.int32(0), logits, cache, ~active, jnp.zeros(b, jnp.int32), jnp.zeros(b, bool),
                jnp.zeros((b, max_new), jnp.int32), jnp.zeros((b, max_new), jnp.float32),
                jnp.full(n_routes, -1, jnp.int32))
        _, _, _, _, counts, stopped, out_tokens, out_logp, routes = jax.lax.while_loop(cond, body, init)
        return out_tokens, out_logp, counts, stopped, (routes if routing else None)

    # ----- host side -------------------------------------------------------------------------------

    def _check_requests(self, prompts, params) -> list[SamplingParams]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"generate: got {len(prompts)} prompts but {len(params)} SamplingParams")
        vocab = self.config.vocab_size
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"generate: params[{i}] must be SamplingParams, got {type(sp).__name__}")
            if not 1 <= len(prompt) <= self.max_prompt_len:
                raise ValueError(f"generate: prompt {i} has {len(prompt)} tokens; expected 1..{self.max_prompt_len}")
            ids = np.asarray(prompt)
            if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"generate: prompt {i} must hold int token ids in [0, {vocab}), "
                                 f"got {list(prompt)[:8]}...")
            if sp.max_new_tokens > self.max_new_tokens:
                raise ValueError(f"generate: request {i} asks max_new_tokens={sp.max_new_tokens}, "
                                 f"this sampler was built for at most {self.max_new_tokens}")
            if len(sp.stop_token_ids) > self.max_stop_ids:
                raise ValueError(f"generate: request {i} has {len(sp.stop_token_ids)} stop ids, "
                                 f"at most max_stop_ids={self.max_stop_ids}")
        return params

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]:
        """Generates one continuation per prompt; see the module docstring for logprobs and seeds."""
        prompts = [list(p) for p in prompts]
        requests = self._check_requests(prompts, params)
        with self._lock:
            model_params, version = self._params, self._version
            seeds = [sp.seed if sp.seed is not None else int(self._seed_rng.integers(_SEED_MODULUS))
                     for sp in requests]
        results: list[Generation] = []
        for start in range(0, len(prompts), self.max_batch):
            stop = start + self.max_batch
            results.extend(self._generate_chunk(model_params, version, prompts[start:stop], requests[start:stop],
                                                seeds[start:stop]))
        return results

    def _generate_chunk(self, model_params, version, prompts, requests, seeds) -> list[Generation]:
        n, b = len(prompts), self.max_batch
        bucket = next(x for x in self.buckets if x >= max(len(p) for p in prompts))
        tokens = np.zeros((b, bucket), np.int32)
        lengths = np.ones(b, np.int32)  # padding rows: a one-token prompt, never sampled from
        stop_ids = np.full((b, self.max_stop_ids), -1, np.int32)
        temperature, top_p = np.ones(b, np.float32), np.ones(b, np.float32)
        top_k, row_max_new = np.zeros(b, np.int32), np.ones(b, np.int32)
        row_seeds = np.zeros(b, np.uint32)
        for i, (prompt, sp) in enumerate(zip(prompts, requests)):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
            stop_ids[i, :len(sp.stop_token_ids)] = sp.stop_token_ids
            temperature[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
            row_max_new[i] = sp.max_new_tokens
            row_seeds[i] = seeds[i] % _SEED_MODULUS
        active = np.arange(b) < n
        with use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            logits, cache, prompt_routes = self._prefill(model_params, tokens, lengths)
            out = self._decode(model_params, logits, cache, lengths, row_seeds, temperature, top_p, top_k,
                               stop_ids, row_max_new, active,
                               candidates=filter_candidates(top_k, top_p, self.config.vocab_size))
        out_tokens, out_logp, counts, stopped, routes = jax.device_get(out)
        prompt_routes = jax.device_get(prompt_routes)

        def row_routing(i: int):
            if routes is None:
                return None
            # The last output token was sampled but never fed: its experts are unknown (-1).
            fed = routes[:, i, :counts[i]].copy()
            if counts[i]:
                fed[:, -1] = -1
            return np.concatenate([prompt_routes[:, i, :lengths[i]], fed], axis=1)

        return [Generation(output_ids=out_tokens[i, :counts[i]].tolist(),
                           logprobs=out_logp[i, :counts[i]].tolist(),
                           finish_reason="stop" if stopped[i] else "length", weight_version=version,
                           routing=row_routing(i))
                for i in range(n)]

