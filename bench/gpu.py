"""One-GPU throughput of the learner and the sampler against the device's own measured limits.

Run on one NVIDIA H100 / H200 (JAX with CUDA, torch + transformers for part 3), in under 5 minutes:

0. Device limits, measured here: peak bf16 matmul rate (a jitted chain of `--matmul-n`-square bf16
   `jnp.dot`s, median of several calls after a warm-up) and memory bandwidth (`x + 1` over a
   `--copy-gib` float32 array: bytes read + written / time).
1. Learner train-step MFU: `ace.train.learner.jit_train_step` (GRPO loss, AdamW, float32 master
   weights, bfloat16 compute, MoE dispatch `moe_impl`) on a Qwen3-MoE scaled to one device.
   MFU = model FLOPs per step / step time / measured peak, where model FLOPs per step =
   6 * N_active * tokens  +  6 * L * H * Dh * T * tokens  (the causal half of the T x T attention
   score and value matmuls, forward + backward); N_active counts the matmul weights one token
   uses (attention projections, router, k of E experts, lm_head; not the embedding lookup).
   Rematerialised recompute is not model FLOPs, so `--remat` lowers MFU. When the compiled step
   does not fit the memory left on the device (by XLA's memory analysis, or an out-of-memory
   error), it is retried with remat, then with half the rows; the output says what was measured.
   Note: unless XLA:GPU lowers `jax.lax.ragged_dot` natively (cuDNN), it rewrites it to a padded
   dense dot, which costs E/k times the expert FLOPs and shows up as a low MFU.
2. `ace.rollout.jax_sampler.JaxSampler` decode tokens/s (temperature 1, no top-k / top-p, every
   row generates exactly `--new-tokens`), end to end (prefill included, as bench/sampler.py) and
   decode only ((t(N new) - t(1 new)) over the N - 1 decode forwards), against the bandwidth bound
   bandwidth / bytes read per decode step * batch, where bytes per step = bf16 weights (the
   embedding table only for the B rows looked up; expert weights scaled by the expected share of
   experts a batch of B tokens touches, 1 - (1 - k/E)^B) + the KV cache of every slot (the
   sampler's masked attention reads all `prompt + new` slots each step).
3. transformers `generate` of the same config (`config.to_hf_config()`, bf16, CUDA) on the same
   prompts and lengths, and the ratio ace/transformers (end to end). A transformers failure is
   printed and the script goes on.

Without a GPU it exits with a message; `--cpu-smoke` runs every part at a tiny size on the CPU
instead (ace.models.configs.TINY, batch 2, a 256-square matmul) to exercise the code paths.

Usage: python bench/gpu.py [--layers 16] [--batch 2] [--seq 2048] [--steps 10] [--budget-s 240]
       python bench/gpu.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # `timing` sits beside this script (bench/timing.py)
    sys.path.insert(0, _HERE)
if os.path.dirname(_HERE) not in sys.path:  # the repo root, for `ace` when it is not pip-installed
    sys.path.append(os.path.dirname(_HERE))

GIB = 1024 ** 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every part at a tiny size on the CPU (no GPU needed); figures are meaningless")
    m = p.add_argument_group("model (Qwen3-MoE scaled to one device)")
    m.add_argument("--layers", type=int, default=16)
    m.add_argument("--hidden", type=int, default=2048)
    m.add_argument("--heads", type=int, default=32)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--head-dim", type=int, default=128)
    m.add_argument("--experts", type=int, default=32)
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--moe-intermediate", type=int, default=384)
    m.add_argument("--vocab", type=int, default=151936, help="default: the Qwen3 tokenizer's")
    m.add_argument("--moe-impl", choices=("ragged", "grouped", "dense", "auto"), default="ragged")
    m.add_argument("--attention", choices=("auto", "reference", "blockwise", "cudnn"), default="auto",
                   help="auto: cudnn when a probe forward+backward works on this device, else blockwise")
    t = p.add_argument_group("learner")
    t.add_argument("--batch", type=int, default=2, help="learner rows per step")
    t.add_argument("--seq", type=int, default=2048, help="learner tokens per row")
    t.add_argument("--steps", type=int, default=10, help="timed steps after compile (median; >= 5 unless over budget)")
    t.add_argument("--micro-batches", type=int, default=1)
    t.add_argument("--remat", action="store_true")
    t.add_argument("--chunk", type=int, default=512, help="LearnerConfig.logprob_chunk_size")
    s = p.add_argument_group("sampler")
    s.add_argument("--sample-batch", type=int, default=32)
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=128)
    s.add_argument("--sample-layers", type=int, default=None, help="sampler model layers (default: --layers)")
    s.add_argument("--reps", type=int, default=3, help="timed sampler / transformers calls (median)")
    s.add_argument("--skip-transformers", action="store_true")
    d = p.add_argument_group("device limits and budget")
    d.add_argument("--matmul-n", type=int, default=8192)
    d.add_argument("--copy-gib", type=float, default=2.0)
    d.add_argument("--mem-fraction", type=float, default=0.85,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION unless already set; the rest is left to torch")
    d.add_argument("--budget-s", type=float, default=240.0,
                   help="wall-clock budget; timed loops stop early and later parts are skipped past it")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.seq, args.steps = 2, 32, 5
        args.sample_batch, args.prompt_len, args.new_tokens, args.reps = 2, 8, 4, 2
        args.matmul_n, args.copy_gib = 256, 1 / 64
    if args.seq < 2 or args.prompt_len < 1 or args.new_tokens < 2:
        p.error("need --seq >= 2, --prompt-len >= 1, --new-tokens >= 2")
    return args


def si(x: float, unit: str = "") -> str:
    """x with an SI prefix and 3 significant digits: si(2.13e9, "B") == "2.13 GB"."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


class Budget:
    """Wall-clock budget: `share(f)` is the deadline after fraction f of it, `over()` past all of it."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def share(self, fraction: float) -> float:
        return self.start + fraction * self.seconds

    def over(self) -> bool:
        return self.elapsed() > self.seconds


def timed_calls(fn, reps: int, *, deadline: float, hard_deadline: float, min_reps: int = 1) -> list[float]:
    """Wall times of up to `reps` calls of `fn` (already warmed up); stops once past `deadline` with at
    least `min_reps` times, or past `hard_deadline` with at least one."""
    times: list[float] = []
    while len(times) < reps:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        now = time.perf_counter()
        if (now > deadline and len(times) >= min_reps) or now > hard_deadline:
            break
    return times


def model_config(args):
    from ace.models.configs import TINY, ModelConfig

    if args.cpu_smoke:
        base = TINY.replace(max_position_embeddings=4096)
    else:
        base = ModelConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate_size=6144,
            num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
            norm_topk_prob=True, rope_theta=1_000_000.0, tie_word_embeddings=False, max_position_embeddings=40960)
    return base.replace(dtype="bfloat16", moe_impl=args.moe_impl,
                        attention_block_q=512, attention_block_kv=512)


def param_counts(config) -> dict[str, int]:
    """total (every param), active (matmul weights one token uses, see the module docstring),
    embed (the embedding table), experts (all expert weights), other (norm scales: total minus the rest)."""
    import jax

    from ace.models import abstract_params

    c = config
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(c)))
    d = c.hidden_size
    attn = d * c.num_heads * c.head_dim * 2 + d * c.num_kv_heads * c.head_dim * 2
    if c.is_moe:
        per_expert = 3 * d * c.moe_intermediate_size
        mlp_active, mlp_all = d * c.num_experts + c.num_experts_per_tok * per_expert, d * c.num_experts
        experts = c.num_layers * c.num_experts * per_expert
    else:
        mlp_active = mlp_all = 3 * d * c.intermediate_size
        experts = 0
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    active = c.num_layers * (attn + mlp_active) + c.vocab_size * d
    other = total - (c.num_layers * (attn + mlp_all) + experts + embed + head)
    return {"total": total, "active": active, "embed": embed, "experts": experts, "other": other}


def train_flops_per_step(config, counts, batch: int, seq: int) -> tuple[float, float]:
    """(model FLOPs of one fwd+bwd step, of which attention scores/values), see the module docstring."""
    tokens = batch * seq
    attention = 6.0 * config.num_layers * config.num_heads * config.head_dim * seq * tokens
    return 6.0 * counts["active"] * tokens + attention, attention


def pick_attention(args, config) -> tuple[str, str]:
    """The attention implementation and why: cudnn when a forward+backward probe of the model's head
    layout runs on this device, else blockwise (exact, O(T) memory); `--attention` overrides."""
    if args.attention != "auto":
        return args.attention, "--attention"
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        return "blockwise", f"auto: backend {jax.default_backend()} has no cuDNN"
    try:
        shape_q = (1, 256, config.num_heads, config.head_dim)
        shape_kv = (1, 256, config.num_kv_heads, config.head_dim)
        q, k, v = (jnp.ones(s, jnp.bfloat16) for s in (shape_q, shape_kv, shape_kv))

        def f(q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            return jnp.sum(out.astype(jnp.float32))

        jax.block_until_ready(jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))
        return "cudnn", "auto: cuDNN fused attention probe (fwd+bwd, GQA) ran"
    except Exception as err:  # noqa: BLE001 - any failure means: use the pure-JAX path
        return "blockwise", f"auto: cuDNN probe failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"


# ----- 0. device limits ----------------------------------------------------------------------------

def peak_matmul_flops(n: int, chain: int, reps: int) -> float:
    """FLOP/s of bf16 [n, n] x [n, n] matmuls (f32 accumulation), `chain` dependent ones per jitted call."""
    import jax
    import jax.numpy as jnp

    from timing import median_seconds

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    w = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)  # keeps |x| ~ 1

    @jax.jit
    def run(a, w):
        return jax.lax.fori_loop(0, chain, lambda _, x: jnp.dot(x, w), a)

    secs = median_seconds(lambda: jax.block_until_ready(run(a, w)), reps)
    return 2.0 * n ** 3 * chain / secs


def copy_bandwidth(gib: float, reps: int) -> float:
    """Bytes/s of `x + 1` over a float32 array of `gib` GiB (read once, written once)."""
    import jax
    import jax.numpy as jnp

    from timing import median_seconds

    n = int(gib * GIB) // 4
    x = jnp.zeros((n,), jnp.float32)
    add = jax.jit(lambda x: x + 1)
    secs = median_seconds(lambda: jax.block_until_ready(add(x)), reps)
    return 2.0 * n * 4 / secs


# ----- 1. learner ----------------------------------------------------------------------------------

def _is_oom(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "resource_exhausted" in text or "out of memory" in text


def learner_attempts(args) -> list[tuple[int, bool]]:
    """(batch, remat) settings to try in order: as asked, then with remat, then half the rows (3 at most)."""
    out = [(args.batch, args.remat)]
    if not args.remat:
        out.append((args.batch, True))
    half = args.batch // 2
    if half >= args.micro_batches and half % args.micro_batches == 0:
        out.append((half, True))
    return out[:3]


def bench_learner(args, config, budget: Budget) -> dict:
    """Compiles `jit_train_step` (AOT, so the compile time is its own), checks that the compiled step's
    memory fits what this device has left (else recompiles with remat, then with half the rows), then
    times `--steps` steps. Returns the timings and the batch / remat actually used."""
    import jax
    import numpy as np

    from ace.models import init_params
    from ace.train.batches import make_batch
    from ace.train.learner import LearnerConfig, init_learner, jit_train_step
    from ace.train.queue import Sample

    def make_cfg(remat):
        return LearnerConfig(lr=1e-6, total_steps=1000, compute_dtype="bfloat16", micro_batches=args.micro_batches,
                             remat=remat, logprob_chunk_size=args.chunk)

    def fresh_state():
        state = init_learner(init_params(config, jax.random.key(0)), make_cfg(args.remat), jax.random.key(1))
        return jax.block_until_ready(state)

    t0 = time.perf_counter()
    state = fresh_state()
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    prompt = max(1, min(args.prompt_len, args.seq // 2))
    samples = [Sample(task_id=i, prompt_ids=rng.integers(1, config.vocab_size, prompt).tolist(),
                      output_ids=rng.integers(1, config.vocab_size, args.seq - prompt).tolist(),
                      rollout_logprobs=(-1.0 - rng.random(args.seq - prompt)).tolist(), reward=0.0,
                      duration_s=1.0, policy_version=0)
               for i in range(args.batch)]
    full_batch = make_batch(samples, rng.normal(size=args.batch), pad_to=args.seq)

    notes: list[str] = []
    compile_total = 0.0
    step = metrics = None
    for attempt, (rows, remat) in enumerate(learner_attempts(args)):
        if attempt and budget.over():
            raise RuntimeError("over the time budget before a learner step fit in memory; " + "; ".join(notes))
        batch = jax.device_put(jax.tree.map(lambda x: x[:rows], full_batch))
        try:
            t0 = time.perf_counter()
            step = jit_train_step(make_cfg(remat), config, donate=True).lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            compile_total += compile_s
            stats = jax.devices()[0].memory_stats() or {}
            analysis = step.memory_analysis()
            if stats.get("bytes_limit") and analysis is not None:
                need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
                free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                print(f"  [batch {rows}, remat={remat}] compiled in {compile_s:.1f} s; step needs {need / GIB:.1f} GiB "
                      f"beyond the state, {free / GIB:.1f} GiB free", flush=True)
                if need > 0.97 * free:
                    notes.append(f"batch {rows} remat={remat} needs {need / GIB:.1f} GiB > {free / GIB:.1f} GiB free")
                    step = None
                    continue
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            first_s = time.perf_counter() - t0
            break
        except Exception as err:  # noqa: BLE001 - only an out-of-memory error is retried
            if not _is_oom(err):
                raise
            notes.append(f"batch {rows} remat={remat}: {type(err).__name__} (out of memory)")
            print(f"  [batch {rows}, remat={remat}] out of memory: {str(err).splitlines()[0][:160]}", flush=True)
            step = metrics = None
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
                state = fresh_state()  # the failed call had been given the state to donate
    if step is None or metrics is None:
        raise RuntimeError("no learner setting fit in device memory: " + "; ".join(notes))

    def one():
        nonlocal state, metrics
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))

    times = timed_calls(one, args.steps, deadline=budget.share(0.55), hard_deadline=budget.share(1.0),
                        min_reps=min(5, args.steps))
    loss = float(metrics["loss"])
    mem = jax.devices()[0].memory_stats() or {}
    state = batch = step = metrics = None  # free the device buffers before the sampler runs
    gc.collect()
    return {"init_s": init_s, "compile_s": compile_s, "compile_total_s": compile_total, "first_s": first_s,
            "times": times, "step_s": statistics.median(times), "loss": loss, "rows": rows, "remat": remat,
            "notes": notes, "peak_bytes": mem.get("peak_bytes_in_use")}


# ----- 2. sampler ----------------------------------------------------------------------------------

def decode_bytes_per_step(config, counts, batch: int, cache_len: int) -> dict[str, float]:
    """Bytes one decode step must read (bf16 weights and cache), see the module docstring."""
    itemsize = 2
    c = config
    touched = 1.0 - (1.0 - c.num_experts_per_tok / c.num_experts) ** batch if c.is_moe else 1.0
    weights = (counts["total"] - counts["embed"] - counts["experts"]) + counts["experts"] * touched
    weights = weights * itemsize + batch * c.hidden_size * itemsize  # + the B embedding rows
    kv = 2 * c.num_layers * batch * cache_len * c.num_kv_heads * c.head_dim * itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv, "expert_share_touched": touched}


def bench_sampler(args, config, prompts, budget: Budget) -> dict:
    import jax

    from ace.models import init_params
    from ace.rollout.engine import SamplingParams
    from ace.rollout.jax_sampler import JaxSampler

    b, p = prompts.shape
    n = args.new_tokens
    sampler = JaxSampler(init_params(config, jax.random.key(0)), config, max_batch=b, max_prompt_len=p,
                         max_new_tokens=n, prompt_buckets=())
    prompt_list = prompts.tolist()

    def requests(new):
        return [SamplingParams(max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, seed=i) for i in range(b)]

    full, one = requests(n), requests(1)

    def run(reqs, want):
        gens = sampler.generate(prompt_list, reqs)
        assert all(len(g.output_ids) == want for g in gens), "every row must generate exactly its max_new_tokens"

    t0 = time.perf_counter()
    run(full, n)  # compiles prefill and the decode loop (row_max_new is dynamic: no recompile for `one`)
    compile_s = time.perf_counter() - t0
    run(one, 1)
    hard = budget.share(1.0)
    full_t = timed_calls(lambda: run(full, n), args.reps, deadline=budget.share(0.8), hard_deadline=hard)
    one_t = timed_calls(lambda: run(one, 1), args.reps, deadline=budget.share(0.8), hard_deadline=hard)
    compiles = dict(sampler.trace_counts)
    sampler = None
    gc.collect()
    full_s, one_s = statistics.median(full_t), statistics.median(one_t)
    return {"compile_s": compile_s, "full_s": full_s, "one_s": one_s, "e2e_tok_s": b * n / full_s,
            "decode_s": full_s - one_s, "traces": compiles, "reps": len(full_t)}


# ----- 3. transformers -----------------------------------------------------------------------------

def bench_transformers(args, config, prompts, budget: Budget) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    config_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if config.is_moe else (Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 on the device: no f32 copy anywhere
    try:
        with torch.device(device):
            model = model_cls(config_cls(**config.to_hf_config())).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.to(device=device, dtype=torch.bfloat16)
    impl = (f"attn={getattr(model.config, '_attn_implementation', '?')}, "
            f"experts={getattr(model.config, '_experts_implementation', '?')}")
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    n = args.new_tokens

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        assert tuple(out.shape) == (prompts.shape[0], prompts.shape[1] + n), tuple(out.shape)

    t0 = time.perf_counter()
    run()
    warm_s = time.perf_counter() - t0
    times = timed_calls(run, args.reps, deadline=budget.share(0.95), hard_deadline=budget.share(1.0))
    model = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    secs = statistics.median(times)
    return {"warm_s": warm_s, "s": secs, "tok_s": prompts.shape[0] * n / secs, "impl": impl,
            "torch": torch.__version__}


# ----- main ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{args.mem_fraction:.2f}")
    import jax
    import numpy as np

    budget = Budget(args.budget_s)
    backend = jax.default_backend()
    if backend != "gpu" and not args.cpu_smoke:
        raise SystemExit(f"bench/gpu.py: no GPU found (JAX backend {backend!r}, devices {jax.devices()}); "
                         "run it on a GPU machine, or pass --cpu-smoke for a tiny CPU run of every code path.")
    dev = jax.devices()[0]
    device = dev.device_kind
    print(f"device: {device} ({backend}, {len(jax.devices())} device(s), using {dev}); jax {jax.__version__}"
          f"{'  [CPU SMOKE: tiny sizes, figures meaningless]' if args.cpu_smoke else ''}", flush=True)

    config = model_config(args)
    attention, why = pick_attention(args, config)
    config = config.replace(attention_impl=attention)
    counts = param_counts(config)
    print(f"model: Qwen3-MoE L={config.num_layers} D={config.hidden_size} H={config.num_heads}/K={config.num_kv_heads}"
          f" Dh={config.head_dim} E={config.num_experts} top-{config.num_experts_per_tok} "
          f"I_moe={config.moe_intermediate_size} V={config.vocab_size}; params {si(counts['total'])} total, "
          f"{si(counts['active'])} active matmul ({counts['active']:,}); moe_impl={config.moe_impl}", flush=True)
    print(f"attention: {attention} ({why}) for prefill and training; decode steps use "
          "ace.models.decode.cached_attention (one query over the cache, read in place)", flush=True)
    if abs(counts["other"]) > 0.01 * counts["total"]:
        print(f"WARNING: {counts['other']:,} params are neither matmul weights nor the embedding: "
              "the active-parameter formula may be stale", flush=True)

    results: dict[str, str] = {}

    # 0. device limits
    chain = 2 if args.cpu_smoke else 20
    peak = peak_matmul_flops(args.matmul_n, chain, reps=10)
    bandwidth = copy_bandwidth(args.copy_gib, reps=10)
    print(f"peak bf16 matmul (measured, {args.matmul_n}^2 x {chain} chained): {si(peak, 'FLOP/s')}", flush=True)
    print(f"memory bandwidth (measured, x + 1 over {args.copy_gib:g} GiB f32): {si(bandwidth, 'B/s')}", flush=True)
    results["peak bf16 matmul"] = si(peak, "FLOP/s")
    results["memory bandwidth"] = si(bandwidth, "B/s")

    # 1. learner
    def flops_formula(rows: int) -> tuple[float, str]:
        tokens = rows * args.seq
        flops, attn = train_flops_per_step(config, counts, rows, args.seq)
        return flops, (f"model FLOPs/step = 6*N_active*tokens + 6*L*H*Dh*T*tokens = 6*{counts['active']:,}*{tokens:,}"
                       f" + 6*{config.num_layers}*{config.num_heads}*{config.head_dim}*{args.seq}*{tokens:,} = "
                       f"{si(flops, 'FLOP')} ({attn / flops:.1%} attention)")

    flops, formula = flops_formula(args.batch)
    print(f"learner: batch {args.batch} x seq {args.seq} = {args.batch * args.seq:,} tokens/step, f32 master weights, "
          f"bf16 compute, remat={args.remat}, micro_batches={args.micro_batches}", flush=True)
    print(f"  {formula}", flush=True)
    try:
        lr = bench_learner(args, config, budget)
        if lr["notes"]:
            print(f"  did not fit: {'; '.join(lr['notes'])}; measured batch {lr['rows']}, remat={lr['remat']}",
                  flush=True)
            flops, formula = flops_formula(lr["rows"])
            print(f"  {formula}", flush=True)
        tokens = lr["rows"] * args.seq
        mfu = flops / lr["step_s"] / peak
        peak_mem = f", peak device memory {lr['peak_bytes'] / GIB:.1f} GiB" if lr["peak_bytes"] else ""
        print(f"  init {lr['init_s']:.1f} s, compile {lr['compile_s']:.1f} s (all attempts {lr['compile_total_s']:.1f} s),"
              f" first step {lr['first_s']:.2f} s{peak_mem}; loss {lr['loss']:.4f}", flush=True)
        stopped = " (stopped early: budget)" if len(lr["times"]) < args.steps else ""
        print(f"  step {lr['step_s'] * 1e3:.1f} ms (median of {len(lr['times'])}{stopped}), {tokens / lr['step_s']:,.0f} "
              f"tokens/s, {si(flops / lr['step_s'], 'FLOP/s')}, MFU {mfu:.1%} of the measured peak", flush=True)
        results["learner setting"] = (f"batch {lr['rows']} x seq {args.seq}, remat={lr['remat']}, "
                                      f"micro_batches={args.micro_batches}")
        results["learner compile"] = f"{lr['compile_s']:.1f} s"
        results["learner step"] = f"{lr['step_s'] * 1e3:.1f} ms (median of {len(lr['times'])}{stopped})"
        results["learner tokens/s"] = f"{tokens / lr['step_s']:,.0f}"
        results["learner MFU"] = f"{mfu:.1%}  ({si(flops / lr['step_s'], 'FLOP/s')} model / {si(peak, 'FLOP/s')} measured peak)"
    except Exception as err:  # noqa: BLE001 - report and go on to the sampler
        print(f"  learner FAILED: {type(err).__name__}: {str(err)[:500]}", flush=True)
        results["learner MFU"] = f"FAILED ({type(err).__name__})"
    gc.collect()

    # 2. sampler
    sample_config = config if args.sample_layers is None else config.replace(num_layers=args.sample_layers)
    sample_counts = param_counts(sample_config)
    prompts = np.random.default_rng(1).integers(1, sample_config.vocab_size, (args.sample_batch, args.prompt_len))
    cache_len = args.prompt_len + args.new_tokens
    per_step = decode_bytes_per_step(sample_config, sample_counts, args.sample_batch, cache_len)
    bound = bandwidth / per_step["total"] * args.sample_batch
    print(f"sampler decode: L={sample_config.num_layers}, batch {args.sample_batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens each, temperature 1, no top-k/top-p", flush=True)
    print(f"  bound = bandwidth / bytes per step * batch = {si(bandwidth, 'B/s')} / "
          f"({si(per_step['weights'], 'B')} weights [{per_step['expert_share_touched']:.1%} of experts touched] + "
          f"{si(per_step['kv'], 'B')} KV over {cache_len} slots) * {args.sample_batch} = {bound:,.0f} tokens/s",
          flush=True)
    ace_e2e_s = None
    if budget.over():
        print("  skipped: over the time budget", flush=True)
        results["sampler decode tokens/s"] = "skipped (budget)"
    else:
        try:
            sr = bench_sampler(args, sample_config, prompts, budget)
            ace_e2e_s = sr["full_s"]
            decode_forwards = args.sample_batch * (args.new_tokens - 1)
            print(f"  compile+first call {sr['compile_s']:.1f} s; traces {sr['traces']}", flush=True)
            print(f"  end to end (prefill included): {sr['e2e_tok_s']:,.0f} tokens/s ({sr['full_s'] * 1e3:.1f} ms "
                  f"per batch, median of {sr['reps']})", flush=True)
            if sr["decode_s"] > 0:
                decode_tok_s = decode_forwards / sr["decode_s"]
                decode, ratio = f"{decode_tok_s:,.0f}", f"{decode_tok_s / bound:.1%}"
            else:  # only at toy sizes, where timing noise exceeds the decode time
                decode, ratio = "n/a", "n/a (t(N new) <= t(1 new): timing noise)"
            print(f"  decode only: {decode} tokens/s ({sr['decode_s'] * 1e3:.1f} ms for {args.new_tokens - 1} steps = "
                  f"t({args.new_tokens} new) - t(1 new)); achieved/bound = {ratio}", flush=True)
            results["sampler decode tokens/s"] = f"{decode} decode only, {sr['e2e_tok_s']:,.0f} end to end"
            results["sampler decode bound"] = f"{bound:,.0f} tokens/s (achieved/bound {ratio})"
        except Exception as err:  # noqa: BLE001
            print(f"  sampler FAILED: {type(err).__name__}: {err}", flush=True)
            results["sampler decode tokens/s"] = f"FAILED ({type(err).__name__})"
    gc.collect()

    # 3. transformers
    if args.skip_transformers:
        results["transformers generate"] = "skipped (--skip-transformers)"
    elif budget.over():
        print("transformers generate: skipped: over the time budget", flush=True)
        results["transformers generate"] = "skipped (budget)"
    else:
        try:
            hr = bench_transformers(args, sample_config, prompts, budget)
            print(f"transformers generate (torch {hr['torch']}, {hr['impl']}): {hr['tok_s']:,.0f} tokens/s "
                  f"({hr['s'] * 1e3:.1f} ms per batch, first call {hr['warm_s']:.1f} s)", flush=True)
            results["transformers generate"] = f"{hr['tok_s']:,.0f} tokens/s end to end ({hr['impl']})"
            if ace_e2e_s:
                results["decode ratio ace/transformers"] = f"{hr['s'] / ace_e2e_s:.2f}x (end to end)"
        except Exception as err:  # noqa: BLE001 - transformers is optional here
            print(f"transformers generate FAILED: {type(err).__name__}: {err}", flush=True)
            results["transformers generate"] = f"FAILED ({type(err).__name__}: {str(err).splitlines()[0][:100]})"

    print("\n===== bench/gpu.py summary =====")
    print(f"device: {device}{' (CPU SMOKE: meaningless figures)' if args.cpu_smoke else ''}")
    print(f"model: {config.num_layers} layers, {si(counts['total'])} params, {si(counts['active'])} active; attention {attention}; "
          f"moe_impl {config.moe_impl}")
    print(f"MFU = {formula}; / step time / measured peak bf16 matmul")
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"  {key.ljust(width)}  {value}")
    print(f"  {'wall time'.ljust(width)}  {budget.elapsed():.0f} s (budget {args.budget_s:.0f} s)")
    failed = [k for k in ("learner MFU", "sampler decode tokens/s") if results.get(k, "").startswith("FAILED")]
    if failed:
        raise SystemExit(f"bench/gpu.py: {' and '.join(failed)} failed (see above)")


if __name__ == "__main__":
    main()
