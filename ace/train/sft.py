"""Stage 1 of the main job: exploration-enriched supervised fine-tuning, in the manner of ML-Agent.

The corpus comes from real runs. For each training competition the whole reference population
(`ace.env.reference_solutions`) is rewritten as compact scripts (same model, preprocessing, feature
choice and output rule as the reference, in ~700 characters instead of ~4500, so that a complete
script fits the tiny policy's generation budget); a diverse subset (distinct model families first,
then distinct preprocessing / feature choices) is run in the sandbox through `MLEEnv` and graded,
and the graded runs become (state -> action) pairs of three kinds:

    initial  the fresh state -> <execute_code> of a run better than the leaderboard median
    improve  the state after a weaker (or failed) run -> <execute_code> of a better run
    submit   a state whose best valid score came from a good run -> <submit/>

A byte-level BPE is trained on the rendered corpus, the tiny Qwen3-MoE policy (vocab rounded up to
a multiple of 64) is fine-tuned by cross-entropy on the action tokens, and corpus, tokenizer and
params are cached under `<cache_root>/<corpus key>/<train key>/`, so a second run skips the stage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ace.env.agent import PromptConfig, render_prompt
from ace.env.suites import SUITE_VERSION
from ace.models import checkpoint, qwen3
from ace.models.configs import TINY, ModelConfig, get_config
from ace.models.logprobs import model_token_logprobs
from ace.models.sharding import RULES, logical_to_sharding, use_mesh
from ace.models.tokenizer import SPLIT_PATTERNS, Tokenizer, train_tiny_tokenizer
from ace.train.learner import LearnerConfig, LearnerState, init_learner, make_optimizer, state_shardings
from ace.train.learner import _schedule as learning_rate_schedule  # the optimizer's own schedule, for logging
from ace.train.sft_corpus import (EXAMPLE_KINDS, SFTExample, build_sft_corpus,  # noqa: F401
                                  corpus_stats, load_or_build_corpus)
from ace.train.sft_corpus import _publish
from ace.train.sft_scripts import CandidateScript, compact_script, select_diverse  # noqa: F401

# Bump when the corpus layout, script rendering or example construction changes (invalidates caches).
# 2: prompts without wall-clock durations or workspace paths; 3: sft.wrong_kind_first; 4: sft.infer_task
SFT_FORMAT_VERSION = 4

# Prompt limits that keep a state (with one or two past scripts) near 1k tokens of the tiny BPE.
# Attention over [T, T] dominates the tiny model's cost, so the description is cut to its title,
# story and task type (the status line repeats the metric; the data summary shows the columns).
COMPACT_PROMPT = PromptConfig(description_chars=360, stdout_tail_chars=160, stderr_tail_chars=400,
                              code_chars=1200, note_chars=300, head_rows=0, max_columns=8)

# Wider and deeper than TINY so that it can memorise complete scripts; same architecture otherwise.
SFT_TINY = dataclasses.replace(TINY, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                               moe_intermediate_size=64, max_position_embeddings=4096)


# --- tokens -----------------------------------------------------------------------------------

def _chatml(messages: Sequence[Mapping[str, str]]) -> str:
    """The text `train_tiny_tokenizer`'s ChatML template renders, before the tokenizer exists."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def train_corpus_tokenizer(examples: Sequence[SFTExample], *, vocab_size: int, out_dir: str | Path | None,
                           split: str = "qwen") -> Tokenizer:
    """A byte-level BPE (`train_tiny_tokenizer`, ChatML) trained on the rendered prompts and actions.

    Each distinct prompt counts once, so the repeated system prompt does not crowd out code merges.
    """
    if not examples:
        raise ValueError("train_corpus_tokenizer needs at least one example")
    texts = sorted({_chatml(e.messages) for e in examples}) + [e.action + "<|im_end|>" for e in examples]
    return train_tiny_tokenizer(texts, vocab_size, out_dir, split=split)


def tokenize_examples(tokenizer: Tokenizer, examples: Sequence[SFTExample], *,
                      max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids (exactly what `render_prompt` gives the policy) followed by the action ids and EOS.

    Args:
      tokenizer: a ChatML tokenizer with an EOS token (`<|im_end|>`, the sampler's stop id).
      examples: [N] pairs.
      max_len: the longest allowed row; T is the longest row rounded up to a multiple of 8.
    Returns:
      tokens [N, T] int32, right-padded with the pad id; loss_mask [N, T] int32, aligned with tokens:
      1 where tokens[n, t] is an action token or the closing EOS (predicted from tokens[n, :t]).
    Raises:
      ValueError: an example is longer than max_len (names it and its length).
    """
    if tokenizer.eos_id is None or tokenizer.pad_id is None:
        raise ValueError("tokenize_examples needs a tokenizer with eos and pad tokens")
    if not examples:
        raise ValueError("tokenize_examples needs at least one example")
    rows = []
    for i, e in enumerate(examples):
        prompt = render_prompt(tokenizer, e.messages)
        action = tokenizer.encode(e.action) + [tokenizer.eos_id]
        if len(prompt) + len(action) > max_len:
            raise ValueError(f"example {i} ({e.comp_id}, {e.kind}) has {len(prompt)} prompt + {len(action)} "
                             f"action tokens, over max_len={max_len}")
        rows.append((prompt, action))
    t = -(-max(len(p) + len(a) for p, a in rows) // 8) * 8
    tokens = np.full((len(rows), t), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, (p, a) in enumerate(rows):
        tokens[i, :len(p) + len(a)] = p + a
        mask[i, len(p):len(p) + len(a)] = 1
    return tokens, mask


# --- training ---------------------------------------------------------------------------------

def sft_loss(params, model_config: ModelConfig, tokens: jax.Array, loss_mask: jax.Array, *,
             aux_loss_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of the masked tokens, plus the MoE load-balancing loss.

    Args:
      tokens: [B, T] int32; loss_mask: [B, T], 1 = tokens[b, t] is a target (predicted at t - 1).
      aux_loss_coef: weight of the router's load-balancing loss (0 for dense models).
    Returns:
      (loss scalar, {"ce", "aux_loss", "tokens", "token_prob"}); token_prob is the mean probability
      the model gives each target token.
    """
    if loss_mask.shape != tokens.shape or tokens.ndim != 2:
        raise ValueError(f"sft_loss: tokens and loss_mask must both be [B, T], got {tokens.shape} and {loss_mask.shape}")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    # Segment 0 marks padding, which the router's load-balancing statistics must ignore.
    last = jnp.max(jnp.where(loss_mask > 0, jnp.arange(t)[None, :], -1), axis=1)
    segment_ids = (jnp.arange(t)[None, :] <= last[:, None]).astype(jnp.int32)
    logp, aux = model_token_logprobs(params, model_config, tokens, positions, targets, segment_ids=segment_ids)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    ce = -jnp.sum(logp * weights) / count
    loss = ce + aux_loss_coef * aux.aux_loss
    return loss, {"ce": ce, "aux_loss": aux.aux_loss, "tokens": jnp.sum(weights),
                  "token_prob": jnp.sum(jnp.exp(logp) * weights) / count}


def sft_step(state: LearnerState, batch: tuple[jax.Array, jax.Array], *, model_config: ModelConfig,
             optimizer, aux_loss_coef: float) -> tuple[LearnerState, dict[str, jax.Array]]:
    """One AdamW step on `sft_loss`; pure (jit it with `functools.partial` over the keywords).

    Args:
      state: LearnerState (float32 params, optax state, int32 step, PRNG key).
      batch: (tokens [B, T] int32, loss_mask [B, T] int32) as `tokenize_examples` makes them.
    Returns:
      (new state, {"loss", "ce", "aux_loss", "tokens", "token_prob", "grad_norm"} float32 scalars).
    """
    tokens, loss_mask = batch
    grad_fn = jax.value_and_grad(functools.partial(sft_loss, model_config=model_config, aux_loss_coef=aux_loss_coef),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens=tokens, loss_mask=loss_mask)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    rng, _ = jax.random.split(state.rng)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.global_norm(grads)}
    return (LearnerState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1, rng=rng),
            {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})


def _batches(lengths: np.ndarray, batch_size: int, epochs: int, seed: int,
             buckets: int) -> list[tuple[np.ndarray, int]]:
    """(row indices, row length) of every step.

    Rows are split by length into `buckets` groups of about equal count, each padded only to its own
    longest row (rounded up to 8), since [T, T] attention makes padding costly; each group compiles
    once. Every epoch reshuffles rows within groups and the order of all batches; a group's last
    batch is filled with row -1 (no loss) so that shapes stay fixed.
    """
    rng = np.random.default_rng(seed)
    groups = [g for g in np.array_split(np.argsort(lengths, kind="stable"), buckets) if len(g)]
    widths = [int(-(-lengths[g].max() // 8) * 8) for g in groups]
    out = []
    for _ in range(epochs):
        epoch = []
        for g, width in zip(groups, widths):
            order = rng.permutation(g)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                epoch.append((np.concatenate([rows, np.full(batch_size - len(rows), -1)]), width))
        out.extend(epoch[i] for i in rng.permutation(len(epoch)))
    return out


def sft_train(params, model_config: ModelConfig, tokens: np.ndarray, loss_mask: np.ndarray, *, epochs: int,
              batch_size: int, lr: float, seed: int, mesh: jax.sharding.Mesh | None = None, log_every: int = 10,
              warmup_steps: int = 5, max_grad_norm: float = 1.0, length_buckets: int = 2,
              progress: bool = True) -> tuple[Any, list[dict]]:
    """Fine-tune `params` on (tokens, loss_mask) with AdamW and a warmup + cosine learning rate.

    Args:
      params: the model's params tree; model_config: its config.
      tokens: [N, T] int32; loss_mask: [N, T] (see `tokenize_examples`).
      epochs, batch_size: passes over the N rows and rows per step (a partial last batch is padded
        with loss-free rows).
      lr: peak learning rate; seed: shuffling.
      mesh: when given, params and optimizer state are sharded by the rules table and the batch's
        rows over the "batch" rule's mesh axes.
      log_every: steps between progress-bar updates and history entries.
      warmup_steps, max_grad_norm: linear warmup length and global gradient-norm clip.
      length_buckets: groups of rows padded to their own length (one compilation each).
    Returns:
      (params, history): history is a list of {"step", "epoch", "loss", "ce", "token_prob", "grad_norm",
      "lr", "tokens"} dicts, one every `log_every` steps and one for the last step.
    """
    tokens, loss_mask = np.asarray(tokens, np.int32), np.asarray(loss_mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must both be [N, T], got {tokens.shape} and {loss_mask.shape}")
    if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={model_config.vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"sft_train: {name} must be an int >= 1, got {value!r}")
    lengths = np.max(np.where(loss_mask > 0, np.arange(tokens.shape[1])[None, :] + 1, 1), axis=1)
    steps = _batches(lengths, batch_size, epochs, seed, length_buckets)
    cfg = LearnerConfig(lr=lr, warmup_steps=min(warmup_steps, len(steps) - 1), schedule="cosine",
                        total_steps=max(len(steps), 1 + min(warmup_steps, len(steps) - 1)),
                        max_grad_norm=max_grad_norm)
    optimizer = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    step_fn = functools.partial(sft_step, model_config=model_config, optimizer=optimizer,
                                aux_loss_coef=model_config.router_aux_loss_coef if model_config.is_moe else 0.0)
    # A copy, because the jitted step donates its state and the caller keeps `params`.
    state = init_learner(jax.tree.map(jnp.array, params), cfg, jax.random.key(seed))
    if mesh is None:
        jitted = jax.jit(step_fn, donate_argnums=(0,))
        place = lambda x: x  # noqa: E731
        context = contextlib.nullcontext
    else:
        shardings = state_shardings(cfg, model_config, mesh)
        state = jax.device_put(state, shardings)
        row = logical_to_sharding(("batch", None), mesh, RULES, (batch_size, tokens.shape[1]))
        # Rows only split over the batch axes, so one sharding serves every bucket width.
        jitted = jax.jit(step_fn, in_shardings=(shardings, (row, row)), donate_argnums=(0,),
                         out_shardings=(shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        place = lambda x: jax.device_put(x, row)  # noqa: E731
        context = functools.partial(use_mesh, mesh)
    padded_tokens = np.concatenate([tokens, np.zeros_like(tokens[:1])])  # row -1: loss-free padding
    padded_mask = np.concatenate([loss_mask, np.zeros_like(loss_mask[:1])])
    history: list[dict] = []
    per_epoch = len(steps) // epochs
    bar = tqdm(total=len(steps), desc="sft", disable=not progress, leave=False)
    try:
        with context():
            for i, (rows, width) in enumerate(steps):
                batch = (place(padded_tokens[rows, :width]), place(padded_mask[rows, :width]))
                state, metrics = jitted(state, batch)
                if (i + 1) % log_every == 0 or i + 1 == len(steps):
                    entry = {"step": i + 1, "epoch": i // per_epoch + 1, "lr": float(schedule(i)),
                             **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                    history.append(entry)
                    bar.set_postfix(ce=f"{entry['ce']:.3f}", p=f"{entry['token_prob']:.2f}")
                bar.update(1)
    finally:
        bar.close()
    return state.params, history


# --- the stage --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The `sft:` section of the Hydra config, validated at construction.

    scripts_per_comp: scripts run per training competition; vocab_size: BPE budget (the policy's
    vocab is the trained size rounded up to 64); max_len: longest (prompt + action) row;
    tokenizer_split: the BPE's pre-tokenizer split (`ace.models.tokenizer.SPLIT_PATTERNS`);
    seed: seed of the corpus, the init and the shuffling (None = the run's seed), so RL runs
    with several seeds can start from one SFT policy;
    wrong_kind_first: each competition first runs a script of the wrong kind, a state the corpus
    then shows recovering from (`ace.train.sft_corpus.build_sft_corpus`);
    infer_task: the corpus's scripts read the task type and output rule from the competition's
    files instead of having them written in (`ace.train.sft_scripts.compact_script`);
    model: ModelConfig field overrides applied on top of SFT_TINY (for the `tiny` model).
    """

    enabled: bool = True
    epochs: int = 6
    lr: float = 2e-3
    batch_size: int = 8
    warmup_steps: int = 10
    scripts_per_comp: int = 6
    improve_per_comp: int = 3
    vocab_size: int = 2048
    tokenizer_split: str = "qwen"
    max_len: int = 1536
    workers: int = 2
    seed: int | None = None
    wrong_kind_first: bool = False
    infer_task: bool = True
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "scripts_per_comp", "improve_per_comp", "vocab_size", "max_len", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sft.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"sft.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"sft.lr must be > 0, got {self.lr!r}")
        for name in ("wrong_kind_first", "infer_task"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sft.{name} must be true or false, got {getattr(self, name)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"sft.seed must be an int or null, got {self.seed!r}")
        if self.tokenizer_split not in SPLIT_PATTERNS:
            raise ValueError(f"sft.tokenizer_split must be one of {sorted(SPLIT_PATTERNS)}, "
                             f"got {self.tokenizer_split!r}")
        unknown = set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"sft.model has unknown ModelConfig fields {sorted(unknown)}")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> "SFTConfig":
        section = dict(section or {})
        unknown = set(section) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sft config keys {sorted(unknown)}; expected some of "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        if "model" in section:
            section["model"] = dict(section["model"] or {})
        return cls(**section)


@dataclasses.dataclass(frozen=True)
class SFTResult:
    """What stage 1 hands to RL: the fine-tuned params, their config, the tokenizer, the prompt
    limits the corpus was rendered with (use them in RL too) and statistics for the log."""

    params: Any
    model_config: ModelConfig
    tokenizer: Tokenizer
    corpus_stats: dict[str, Any]
    prompt_cfg: PromptConfig = COMPACT_PROMPT


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base_model_config(cfg_dict: Mapping[str, Any], sft: SFTConfig) -> ModelConfig:
    model = dict(cfg_dict.get("model") or {})
    if model.get("hf_path"):
        raise ValueError("run_sft_stage trains the tiny policy from scratch with its own tokenizer; "
                         f"model.hf_path={model['hf_path']!r} is set, so disable it with sft.enabled=false")
    name = model.get("name", "tiny")
    base = SFT_TINY if name == "tiny" else get_config(name)
    return dataclasses.replace(base, **sft.model)


def _source_digest(source: str) -> str:
    """A pretrained folder's identity for the cache key: its path and its files' sizes and times."""
    folder = Path(source).expanduser()
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return _digest({"path": str(folder.resolve()), "files": files})


def run_sft_stage(cfg_dict: Mapping[str, Any], comps: Sequence[Any], sandbox, *, cache_root: str | Path,
                  progress: bool = True, train: bool = True, initial: tuple | None = None) -> SFTResult:
    """Stage 1: corpus (real runs), tokenizer, and SFT of the tiny policy, each cached on disk.

    Args:
      cfg_dict: the resolved Hydra config as a dict; reads `sft`, `seed`, `model` and `env`
        (`max_steps`, `exec_timeout_s`, `suite_seed`).
      comps: the training competitions.
      sandbox: runs the corpus scripts (only when the corpus is not cached).
      cache_root: e.g. ~/.cache/ace/sft; the corpus lives in `<root>/<corpus key>/` and the trained
        tokenizer and params in `<root>/<corpus key>/train-<train key>/`, keys being hashes of every
        setting they depend on plus SUITE_VERSION and SFT_FORMAT_VERSION.
      train: False stops after the tokenizer: the params are the model's random init (RL from scratch).
      initial: (params, model_config, tokenizer, source) of a pretrained policy (an HF folder) to
        fine-tune instead of the tiny model: its tokenizer is kept, and `source` (the folder, with
        its weight files' sizes and times) enters the cache key.
    Returns:
      SFTResult; `corpus_stats` also says whether each part came from the cache.
    """
    sft = SFTConfig.from_dict(cfg_dict.get("sft"))
    seed = int(cfg_dict.get("seed", 0)) if sft.seed is None else sft.seed
    env = dict(cfg_dict.get("env") or {})
    max_steps, exec_timeout_s = int(env.get("max_steps", 4)), float(env.get("exec_timeout_s", 60))
    if initial is not None:
        init_params, base, init_tokenizer, source = initial
    else:
        base = _base_model_config(cfg_dict, sft)
    corpus_key = _digest({"format": SFT_FORMAT_VERSION, "suite": SUITE_VERSION, "suite_seed": env.get("suite_seed", 0),
                          "comps": [c.comp_id for c in comps], "scripts_per_comp": sft.scripts_per_comp,
                          "improve_per_comp": sft.improve_per_comp, "wrong_kind_first": sft.wrong_kind_first,
                          "infer_task": sft.infer_task,
                          "seed": seed, "prompt": dataclasses.asdict(COMPACT_PROMPT), "max_steps": max_steps})
    corpus_dir = Path(cache_root).expanduser() / corpus_key
    t0 = time.perf_counter()
    cached_corpus = (corpus_dir / "corpus.jsonl").is_file()
    examples = load_or_build_corpus(corpus_dir, comps, sandbox, scripts_per_comp=sft.scripts_per_comp,
                                    improve_per_comp=sft.improve_per_comp, seed=seed,
                                    prompt_cfg=COMPACT_PROMPT, max_steps=max_steps, exec_timeout_s=exec_timeout_s,
                                    workers=sft.workers, wrong_kind_first=sft.wrong_kind_first,
                                    infer_task=sft.infer_task)
    corpus_s = time.perf_counter() - t0
    if not train:
        tokenizer = train_corpus_tokenizer(examples, vocab_size=sft.vocab_size, out_dir=None, split=sft.tokenizer_split)
        model_config = dataclasses.replace(base, vocab_size=-(-tokenizer.vocab_size // 64) * 64,
                                           max_position_embeddings=max(base.max_position_embeddings, sft.max_len))
        stats = {**corpus_stats(examples), "corpus_s": corpus_s, "tokenizer_vocab": tokenizer.vocab_size,
                 "trained": False, "model_config": dataclasses.asdict(model_config), "cached_corpus": cached_corpus}
        return SFTResult(qwen3.init_params(model_config, jax.random.key(seed)), model_config, tokenizer, stats)
    source_key = None if initial is None else _source_digest(source)
    train_key = _digest({"corpus": corpus_key, "seed": seed, "model": dataclasses.asdict(base), "source": source_key,
                         **{k: v for k, v in dataclasses.asdict(sft).items() if k not in ("enabled", "workers", "seed")}})
    train_dir = corpus_dir / f"train-{train_key}"
    if (train_dir / "stats.json").is_file():
        stats = json.loads((train_dir / "stats.json").read_text())
        model_config = ModelConfig(**stats["model_config"])
        params, _ = checkpoint.restore(train_dir / "params")
        stats.update(cached_corpus=True, cached_params=True)
        return SFTResult(params, model_config, Tokenizer.from_dir(train_dir / "tokenizer"), stats)

    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=corpus_dir))
    try:
        if initial is not None:
            tokenizer, model_config, params = init_tokenizer, base, init_params
            tokenizer.save(tmp / "tokenizer")
        else:
            tokenizer = train_corpus_tokenizer(examples, vocab_size=sft.vocab_size, out_dir=tmp / "tokenizer",
                                               split=sft.tokenizer_split)
            model_config = dataclasses.replace(base, vocab_size=-(-tokenizer.vocab_size // 64) * 64,
                                               max_position_embeddings=max(base.max_position_embeddings, sft.max_len))
            params = qwen3.init_params(model_config, jax.random.key(seed))
        tokens, loss_mask = tokenize_examples(tokenizer, examples, max_len=sft.max_len)
        t1 = time.perf_counter()
        params, history = sft_train(params, model_config, tokens, loss_mask, epochs=sft.epochs,
                                    batch_size=sft.batch_size, lr=sft.lr, seed=seed, warmup_steps=sft.warmup_steps,
                                    log_every=5, progress=progress)
        prompt_lens = (loss_mask.argmax(axis=1)).astype(int)
        action_lens = loss_mask.sum(axis=1).astype(int)
        stats = {**corpus_stats(examples), "corpus_s": corpus_s, "train_s": time.perf_counter() - t1,
                 "tokenizer_vocab": tokenizer.vocab_size, "rows": int(tokens.shape[0]), "row_len": int(tokens.shape[1]),
                 "max_prompt_tokens": int(prompt_lens.max()), "max_action_tokens": int(action_lens.max()),
                 "mean_action_tokens": float(action_lens.mean()), "history": history,
                 "final_ce": history[-1]["ce"], "model_config": dataclasses.asdict(model_config)}
        checkpoint.save(tmp / "params", 0, params, {"model_config": dataclasses.asdict(model_config)})
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        _publish(tmp, train_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats.update(cached_corpus=cached_corpus, cached_params=False)
    return SFTResult(params, model_config, tokenizer, stats)
