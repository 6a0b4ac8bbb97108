"""The SGLang engine against real SGLang servers (sglang 0.5.23, CPU build, float32) on 127.0.0.1.

The servers run from their own virtual environment, built by tests/support/sglang_env/build.sh
(prebuilt in CI; built here on first use), with the CPU import shim of that folder on PYTHONPATH.
References are independent of SGLang: the embedded JAX sampler's greedy tokens and the learner's
recomputed logprobs (`ace.models.logprobs.model_token_logprobs`) on the params loaded from the same
HF checkpoint. Both sides run float32 (`--dtype float32`), so logprobs agree to ~1e-6 and the
tolerance below is 1e-4.

One pair of servers serves the whole module; the tests run in file order and each reads the served
policy from the `policy` fixture, so each also passes alone. The routing-replay test at the end has
its own server: a tiny Qwen3-MoE launched with --enable-return-routed-experts (started only when
that test runs).
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ace.models.configs import ModelConfig
from ace.models.hf import load_hf_params, save_hf_checkpoint
from ace.models.logprobs import model_token_logprobs
from ace.models.qwen3 import forward, init_params
from ace.models.tokenizer import Tokenizer
from ace.rollout.engine import RolloutEngine, SamplingParams
from ace.rollout.jax_sampler import JaxSampler
from ace.rollout.sglang import SGLangEngine
from ace.rollout.sglang_client import SGLangClient
from ace.rollout.sglang_server import SGLangServer, find_free_port
from ace.rollout.sglang_weights import ArchitectureMismatch
from tests.support.tiny_hf import TOKENIZER_CORPUS, save_tiny_qwen3, save_tiny_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV_DIR = REPO / "tests" / "support" / "sglang_env"
VENV = Path(os.environ.get("ACE_SGLANG_VENV", REPO / ".venv-sglang"))
EX_NO_NETWORK = 75  # build.sh's exit code when no package index is reachable
IN_CI = os.environ.get("CI", "").lower() == "true"

# The launch flags known to work on a CPU host. --max-total-tokens keeps the KV cache small (without
# it the server reserves ~15 GB); --context-length matches the tiny model's 256 positions.
CPU_LAUNCH_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
                   "--max-total-tokens", "8192", "--max-running-requests", "16",
                   "--chunked-prefill-size", "512", "--context-length", "256")
STARTUP_TIMEOUT_S = 600.0  # two servers start at once on a shared 2-core machine
LOGPROB_ATOL = 1e-4
MAX_PROMPT = 24
MAX_NEW = 24


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    """The interpreter of the SGLang environment, built by build.sh when missing or stale."""
    log = REPO / ".pytest_cache" / "sglang_env_build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        rc = subprocess.run(["bash", str(ENV_DIR / "build.sh")], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "ACE_SGLANG_VENV": str(VENV)}, timeout=3600).returncode
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    if rc == EX_NO_NETWORK and not IN_CI:
        pytest.skip(f"SGLang environment not built: no package index reachable (log {log}):\n{tail}")
    if rc != 0:
        pytest.fail(f"tests/support/sglang_env/build.sh failed with exit code {rc} (log {log}):\n{tail}")
    return VENV / "bin" / "python"


class Policy:
    """What the servers serve now: params, their version, and the model config and tokenizer."""

    def __init__(self, params: dict, config: ModelConfig, tokenizer: Tokenizer, version: int = 0):
        self.params, self.config, self.tokenizer, self.version = params, config, tokenizer, version
        self.export_config = config  # what the engine's exporter writes; a test may point it elsewhere


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random dense Qwen3 (transformers, spread-out weights) plus tokenizer, as an HF folder."""
    path = tmp_path_factory.mktemp("sglang_real") / "base"
    tokenizer = save_tiny_tokenizer(path)
    # The model's vocabulary is the tokenizer's, so every id SGLang may emit decodes.
    save_tiny_qwen3(path, moe=False, vocab_size=tokenizer.vocab_size)
    return path


@pytest.fixture(scope="module")
def policy(checkpoint) -> Policy:
    params, config = load_hf_params(checkpoint)
    return Policy(params, config, Tokenizer.from_dir(checkpoint))


@pytest.fixture(scope="module")
def servers(sglang_python, checkpoint):
    """Two SGLang servers on loopback, started concurrently; stopped (process groups) at module end."""
    pool = [SGLangServer(checkpoint, port=find_free_port(), python=str(sglang_python),
                         extra_args=CPU_LAUNCH_ARGS, startup_timeout_s=STARTUP_TIMEOUT_S,
                         log_path=checkpoint.parent / f"sglang_{i}.log",
                         env={"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(ENV_DIR / "shim")})
            for i in range(2)]
    errors: list[BaseException] = []

    def start(server):
        try:
            server.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in pool]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pool
    finally:
        for s in pool:
            s.stop()


@pytest.fixture(scope="module")
def engine(servers, policy, checkpoint):
    def exporter(params, path):
        save_hf_checkpoint(params, policy.export_config, path, tokenizer=policy.tokenizer)

    with SGLangEngine(servers, exporter=exporter, export_dir=checkpoint.parent / "exports",
                      request_timeout_s=300.0, restart_timeout_s=STARTUP_TIMEOUT_S) as eng:
        yield eng


@pytest.fixture(scope="module")
def jax_sampler(policy):
    return JaxSampler(policy.params, policy.config, max_batch=8, max_prompt_len=MAX_PROMPT,
                      max_new_tokens=MAX_NEW, prompt_buckets=(8, 16), weight_version=policy.version)


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Real token ids of varied lengths (1 to MAX_PROMPT tokens)."""
    texts = TOKENIZER_CORPUS[:6]
    ids = [policy.tokenizer.encode(t)[: 4 + 4 * i] for i, t in enumerate(texts)]
    return [ids[0][:1]] + ids[1:] + [policy.tokenizer.encode(TOKENIZER_CORPUS[6])[:MAX_PROMPT]]


def greedy(policy: Policy, max_new_tokens: int = 16) -> SamplingParams:
    # SGLang stops at the tokenizer's EOS on its own; the JAX sampler is told the same stop id.
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                          stop_token_ids=(policy.tokenizer.eos_id,))


@functools.partial(jax.jit, static_argnames=("config", "temperature"))
def _padded_logprobs(params, tokens, targets, *, config: ModelConfig, temperature: float):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    lp, _ = model_token_logprobs(params, config, tokens, positions, targets, temperature=temperature)
    return lp


def learner_logprobs(policy: Policy, prompts, outputs, *, temperature: float) -> list[np.ndarray]:
    """log softmax(logits / temperature)[token] [N_i] f32 of each output token, one forward per batch.

    Sequences are right-padded to a fixed [8k, MAX_PROMPT + MAX_NEW] (causal attention: padding
    never reaches earlier positions), so the learner's function compiles once per temperature.
    """
    rows = -(-len(prompts) // 8) * 8
    tokens = np.zeros((rows, MAX_PROMPT + MAX_NEW), np.int32)
    targets = np.zeros_like(tokens)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        seq = list(prompt) + list(out)
        tokens[i, :len(seq) - 1], targets[i, :len(seq) - 1] = seq[:-1], seq[1:]
    lp = np.asarray(_padded_logprobs(policy.params, tokens, targets, config=policy.config,
                                     temperature=temperature))
    return [lp[i, len(p) - 1:len(p) - 1 + len(o)] for i, (p, o) in enumerate(zip(prompts, outputs))]


def top2_margin(policy: Policy, seq) -> float:
    """Gap between the two largest next-token logits after `seq`: tells a near-tie from a real mismatch."""
    positions = jnp.arange(len(seq), dtype=jnp.int32)[None]
    logits, _ = forward(policy.params, policy.config, jnp.asarray([seq], jnp.int32), positions)
    top = np.sort(np.asarray(logits[0, -1], np.float64))[-2:]
    return float(top[1] - top[0])


def assert_same_greedy(policy: Policy, prompts, got, want) -> None:
    for prompt, g, w in zip(prompts, got, want):
        if g.output_ids != w.output_ids:
            n = next((i for i, (a, b) in enumerate(zip(g.output_ids, w.output_ids)) if a != b),
                     min(len(g.output_ids), len(w.output_ids)))
            margin = top2_margin(policy, list(prompt) + w.output_ids[:n])
            pytest.fail(f"greedy tokens differ for prompt {prompt} at step {n} (top-2 logit margin there "
                        f"{margin:.2e}):\n SGLang {g.output_ids}\n JAX    {w.output_ids}")
        assert g.finish_reason == w.finish_reason, (prompt, g.finish_reason, w.finish_reason)


def test_sglang_engine_satisfies_rollout_protocol(engine):
    assert isinstance(engine, RolloutEngine)


def test_sglang_greedy_tokens_equal_jax_sampler_greedy_tokens(engine, jax_sampler, policy, prompts):
    got = engine.generate(prompts, greedy(policy))
    want = jax_sampler.generate(prompts, greedy(policy))
    assert_same_greedy(policy, prompts, got, want)
    assert all(g.weight_version == policy.version for g in got)
    # Non-trivial outputs: a model that always emitted one token would pass the equality too.
    assert len({t for g in got for t in g.output_ids}) > 5


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sglang_logprobs_equal_learner_recomputed_logprobs(engine, policy, prompts, temperature):
    # What SGLang reports at temperature T > 0 (sglang 0.5.23, srt/layers/sampler.py `Sampler.forward`,
    # standard path): logits.div_(temperatures) (line 275), probs = softmax (line 297), logprobs =
    # torch.log(probs) (line 315): log softmax(logits / T), computed before top-k / top-p, which only
    # filter a sorted copy inside `_sample_from_probs`. The learner computes the same quantity.
    # Temperature 0 (greedy) reports the temperature-1 logprobs, as the engine protocol says.
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature, seed=1234)
    gens = engine.generate(prompts, params)
    wants = learner_logprobs(policy, prompts, [g.output_ids for g in gens], temperature=temperature or 1.0)
    for prompt, g, want in zip(prompts, gens, wants):
        assert len(g.output_ids) == len(g.logprobs) > 0
        np.testing.assert_allclose(g.logprobs, want, atol=LOGPROB_ATOL, rtol=0,
                                   err_msg=f"prompt {prompt}, temperature {temperature}")
    if temperature > 0:
        # Sampled, not argmax: some token must have a clearly lower logprob than the greedy choice.
        assert min(min(g.logprobs) for g in gens) < -3.0


def test_sglang_logprobs_at_temperature_are_taken_before_top_k_top_p_truncation(engine, policy, prompts):
    temperature, top_k = 0.7, 8
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature, top_p=0.8, top_k=top_k, seed=99)
    gens = engine.generate(prompts, params)
    wants = learner_logprobs(policy, prompts, [g.output_ids for g in gens], temperature=temperature)
    for prompt, g, want in zip(prompts, gens, wants):
        np.testing.assert_allclose(g.logprobs, want, atol=LOGPROB_ATOL, rtol=0, err_msg=f"prompt {prompt}")
    # The truncation is not a no-op here: renormalising over the top-k alone would move the logprob
    # of some sampled token by far more than the tolerance, so the equality above tells the two apart.
    prompt, g = prompts[-1], gens[-1]
    seq = jnp.asarray([list(prompt) + g.output_ids], jnp.int32)
    logits, _ = forward(policy.params, policy.config, seq, jnp.arange(seq.shape[1], dtype=jnp.int32)[None])
    z = np.asarray(logits[0, len(prompt) - 1:-1], np.float64) / temperature  # [T, V], predicting each output
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    kept_mass = np.sort(probs, axis=-1)[:, -top_k:].sum(axis=-1)  # top-p keeps at most this much
    assert -np.log(kept_mass).max() > 100 * LOGPROB_ATOL, kept_mass


def test_pushed_weights_are_served_under_their_version(engine, jax_sampler, policy, prompts):
    before = engine.generate(prompts, greedy(policy))
    leaves, treedef = jax.tree.flatten(policy.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    # A new policy, not a rounding-level nudge: every tensor moves by half its own spread.
    new_params = jax.tree.unflatten(treedef, [x + 0.5 * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                              for x, k in zip(leaves, keys)])
    version = policy.version + 1
    engine.update_weights(new_params, version)
    policy.params, policy.version = new_params, version
    jax_sampler.update_weights(new_params, version)

    after = engine.generate(prompts, greedy(policy))
    assert engine.weight_version == version
    assert [g.weight_version for g in after] == [version] * len(prompts)
    assert any(a.output_ids != b.output_ids for a, b in zip(after, before)), "new weights changed nothing"
    # The servers run exactly the pushed weights: greedy tokens and logprobs follow the new params.
    assert_same_greedy(policy, prompts, after, jax_sampler.generate(prompts, greedy(policy)))
    wants = learner_logprobs(policy, prompts, [g.output_ids for g in after], temperature=1.0)
    for g, want in zip(after, wants):
        np.testing.assert_allclose(g.logprobs, want, atol=LOGPROB_ATOL, rtol=0)
    # Every server took the version, not just the ones this batch happened to reach.
    for s in engine.servers:
        (direct,) = SGLangClient(s.url).generate([prompts[0]], [greedy(policy)])
        assert direct.weight_version == version and direct.output_ids == after[0].output_ids


def test_moe_weights_are_refused_before_they_reach_a_dense_server(engine, policy, prompts):
    moe = policy.config.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                norm_topk_prob=True)
    # A trainer that exports an MoE model to a dense pool: the exporter writes a valid MoE folder.
    policy.export_config = moe
    try:
        with pytest.raises(ArchitectureMismatch, match="Qwen3MoeForCausalLM"):
            engine.update_weights(init_params(moe, jax.random.key(0)), policy.version + 1)
    finally:
        policy.export_config = policy.config
    assert engine.weight_version == policy.version
    assert all(s.alive() and s.healthy() for s in engine.servers)
    (g,) = engine.generate(prompts[:1], greedy(policy))
    assert g.weight_version == policy.version


def test_server_killed_mid_run_is_restarted_and_pool_keeps_serving(engine, jax_sampler, policy, prompts):
    victim = engine.servers[0]
    old_pid, restarts, retries = victim.process.pid, victim.restarts, engine.stats["retries"]
    batch = prompts * 2
    params = greedy(policy, max_new_tokens=MAX_NEW)
    want = jax_sampler.generate(batch, params)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(gens=engine.generate(batch, params)))
    runner.start()
    # Kill only once the victim holds requests, so that some really are cut off mid-generation.
    deadline = time.monotonic() + 120
    while engine.in_flight()[0] == 0 and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert runner.is_alive(), "the batch finished before the server could be killed"
    os.killpg(old_pid, signal.SIGKILL)  # the whole group: launcher, scheduler and detokenizer
    runner.join(timeout=STARTUP_TIMEOUT_S)
    assert not runner.is_alive(), "generate hung after a server was killed"

    assert engine.stats["retries"] > retries, "no request was cut off by the kill"
    assert_same_greedy(policy, batch, result["gens"], want)
    assert all(g.weight_version == policy.version for g in result["gens"])

    # The victim comes back as a new process with the current weights and version.
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (victim.restarts > restarts and victim.healthy() and 0 not in engine.down()):
        assert time.monotonic() < deadline, f"server not restarted; errors {engine.recovery_errors}"
        time.sleep(0.5)
    assert victim.process.pid != old_pid
    (direct,) = SGLangClient(victim.url).generate([batch[0]], [params])
    assert direct.weight_version == policy.version and direct.output_ids == want[0].output_ids
    # And the pool serves through both servers again.
    again = engine.generate(batch, params)
    assert_same_greedy(policy, batch, again, want)


# ---------------------------------------------------------------------------- MoE routing replay
MOE_EXPERTS = 64  # many experts, top-2: three short sequences leave some unused in every layer
ROUTER_BOOST = 20.0  # norm of the boosted router columns, in units of a column's mean norm


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE (64 experts, top-2, norm_topk_prob) plus tokenizer, as an HF folder."""
    path = tmp_path_factory.mktemp("sglang_real_moe") / "base"
    tokenizer = save_tiny_tokenizer(path)
    save_tiny_qwen3(path, moe=True, vocab_size=tokenizer.vocab_size, num_experts=MOE_EXPERTS,
                    num_experts_per_tok=2, norm_topk_prob=True, seed=3)
    return path


@pytest.fixture(scope="module")
def moe_engine(sglang_python, moe_checkpoint):
    """One MoE server launched with --enable-return-routed-experts, behind an engine that asks for it."""
    server = SGLangServer(moe_checkpoint, port=find_free_port(), python=str(sglang_python),
                          extra_args=CPU_LAUNCH_ARGS, startup_timeout_s=STARTUP_TIMEOUT_S, return_routing=True,
                          log_path=moe_checkpoint.parent / "sglang_moe.log",
                          env={"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(ENV_DIR / "shim")})
    server.start()
    try:
        with SGLangEngine([server], exporter=lambda params, path: None, export_dir=moe_checkpoint.parent / "exports",
                          request_timeout_s=300.0, restart_timeout_s=STARTUP_TIMEOUT_S, return_routing=True) as eng:
            yield eng
    finally:
        server.stop()


@functools.partial(jax.jit, static_argnames=("config", "temperature"))
def _padded_moe_logprobs(params, tokens, targets, routing, *, config: ModelConfig, temperature: float):
    """[B, T] logprobs of `targets`, and the routing [L, B, T, k] of a forward without replay (None
    when `routing` is replayed: under replay the model reports other ids, so the test never reads them)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    lp, aux = model_token_logprobs(params, config, tokens, positions, targets, routing=routing,
                                   temperature=temperature)
    return lp, (aux.routing if routing is None else None)


def pad_moe_batch(prompts, gens, *, top_k: int):
    """Right-padded tokens / targets [8, W] and recorded routing [L, 8, W, k] (W = MAX_PROMPT + MAX_NEW).

    Position i of a row holds token i of prompt + output and predicts token i + 1, so it replays the
    routing SGLang recorded for position i: rows [0, P + T - 1) of `Generation.routing` (the last row,
    -1, belongs to the final token, which is never an input). Padding replays expert 0 (causal: it
    cannot reach earlier positions).
    """
    width = MAX_PROMPT + MAX_NEW
    num_layers = gens[0].routing.shape[0]
    tokens = np.zeros((8, width), np.int32)
    targets = np.zeros_like(tokens)
    routing = np.zeros((num_layers, 8, width, top_k), np.int32)
    for i, (prompt, g) in enumerate(zip(prompts, gens)):
        seq = list(prompt) + g.output_ids
        n = len(seq) - 1
        tokens[i, :n], targets[i, :n] = seq[:-1], seq[1:]
        routing[:, i, :n] = g.routing[:, :n]
    return jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(routing)


def boost_unused_experts(params: dict, recorded: list[np.ndarray], seed: int = 0) -> tuple[dict, list[list[int]]]:
    """Params whose router columns of the experts no recorded position used (per layer) are large
    random vectors: those experts now win fresh top-k choices, while the logits of the recorded
    experts are unchanged. With norm_topk_prob the gate weights of replayed experts are their
    softmax probabilities renormalised over the k replayed ones, exp(l_i) / sum_j exp(l_j) over the
    replayed logits only (the partition function cancels), so replay stays exact.

    recorded: each sequence's valid routing rows [L, n, k]. Returns (params, unused experts per layer).
    """
    router = np.array(params["layers"]["mlp"]["router"], np.float32)  # [L, D, E]
    rng = np.random.default_rng(seed)
    unused = []
    for layer in range(router.shape[0]):
        used = set(np.concatenate([r[layer].ravel() for r in recorded]).tolist())
        unused.append([e for e in range(router.shape[2]) if e not in used])
        scale = ROUTER_BOOST * np.linalg.norm(router[layer], axis=0).mean()
        for e in unused[-1]:
            v = rng.standard_normal(router.shape[1])
            router[layer, :, e] = scale * v / np.linalg.norm(v)
    mlp = {**params["layers"]["mlp"], "router": jnp.asarray(router, params["layers"]["mlp"]["router"].dtype)}
    return {**params, "layers": {**params["layers"], "mlp": mlp}}, unused


def test_routing_replay_reproduces_sglang_moe_logprobs_when_fresh_routing_differs(moe_engine, moe_checkpoint):
    params, config = load_hf_params(moe_checkpoint)
    assert config.num_experts == MOE_EXPERTS and config.norm_topk_prob
    tokenizer = Tokenizer.from_dir(moe_checkpoint)
    prompts = [tokenizer.encode(t)[:n] for t, n in zip(TOKENIZER_CORPUS[2:5], (6, 12, MAX_PROMPT))]
    temperature, k = 0.7, config.num_experts_per_tok
    gens = moe_engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature, seed=4321))
    recorded = []
    for prompt, g in zip(prompts, gens):
        n = len(prompt) + len(g.output_ids) - 1
        assert g.routing.shape == (config.num_layers, n + 1, k) and g.routing.dtype == np.int32
        assert (g.routing[:, n] == -1).all(), "the last sampled token never ran through the model"
        assert ((g.routing[:, :n] >= 0) & (g.routing[:, :n] < MOE_EXPERTS)).all()
        recorded.append(g.routing[:, :n])
    tokens, targets, routing = pad_moe_batch(prompts, gens, top_k=k)

    def logprobs(p, replay):
        lp, fresh = _padded_moe_logprobs(p, tokens, targets, routing if replay else None, config=config,
                                         temperature=temperature)
        per_seq = [np.asarray(lp[i, len(pr) - 1:len(pr) - 1 + len(g.output_ids)])
                   for i, (pr, g) in enumerate(zip(prompts, gens))]
        return per_seq, None if fresh is None else np.asarray(fresh)

    def max_err(per_seq):
        return max(float(np.abs(lp - np.asarray(g.logprobs)).max()) for lp, g in zip(per_seq, gens))

    # Same params: replay and the learner's own routing both reproduce the server.
    assert max_err(logprobs(params, replay=True)[0]) < LOGPROB_ATOL
    assert max_err(logprobs(params, replay=False)[0]) < LOGPROB_ATOL

    boosted, unused = boost_unused_experts(params, recorded)
    assert any(unused), f"every expert was used in every layer; unused per layer: {unused}"
    replayed, _ = logprobs(boosted, replay=True)
    fresh_lp, fresh_routing = logprobs(boosted, replay=False)
    # Replay is exact although the router changed; the learner's own routing is not.
    assert max_err(replayed) < LOGPROB_ATOL, f"replayed logprobs differ from SGLang's by {max_err(replayed):.2e}"
    assert max_err(fresh_lp) > 1e-2, f"the boosted router changed logprobs by only {max_err(fresh_lp):.2e}"
    # Fraction of (layer, token) pairs whose fresh top-k set differs from the recorded one.
    differ = [np.any(np.sort(fresh_routing[:, i, :r.shape[1]], -1) != np.sort(r, -1), axis=-1)
              for i, r in enumerate(recorded)]
    fraction = float(np.concatenate([d.ravel() for d in differ]).mean())
    assert fraction > 0, "fresh routing equals the recorded routing everywhere: the test proves nothing"
