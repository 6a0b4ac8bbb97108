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

This module holds the stage: its config (`SFTConfig`), its result and `run_sft_stage`, which caches
each part. The parts live beside it: the corpus in `ace.train.sft_corpus` (its scripts in
`ace.train.sft_scripts`), the tokenizer and token rows in `ace.train.sft_tokens`, and the
fine-tuning loop in `ace.train.sft_training`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from ace.env.prompt import PromptConfig
from ace.env.suites import SUITE_VERSION
from ace.models import checkpoint, qwen3
from ace.models.configs import TINY, ModelConfig, get_config
from ace.models.tokenizer import SPLIT_PATTERNS, Tokenizer
from ace.train.sft_corpus import (EXAMPLE_KINDS, SFTExample, build_sft_corpus,  # noqa: F401
                                  corpus_stats, load_or_build_corpus)
from ace.train.sft_corpus import _publish
from ace.train.sft_scripts import CandidateScript, compact_script, select_diverse  # noqa: F401
from ace.train.sft_tokens import tokenize_examples, train_corpus_tokenizer
from ace.train.sft_training import sft_train

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
