"""The SFT corpus as tokens: the BPE trained on its texts and the (tokens, loss mask) rows.

`train_corpus_tokenizer` trains the tiny policy's byte-level BPE (ChatML) on the rendered prompts
and actions of `ace.train.sft_corpus`; `tokenize_examples` turns each example into one row, the
prompt exactly as `ace.env.prompt.render_prompt` gives it to the policy, then the action and EOS,
with the loss on the action tokens only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ace.env.prompt import render_prompt
from ace.models.tokenizer import Tokenizer, train_tiny_tokenizer
from ace.train.sft_corpus import SFTExample


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
