"""Tokenizer from an HF model folder (tokenizer.json + tokenizer_config.json), with chat templates.

`Tokenizer` wraps the Rust `tokenizers.Tokenizer` that HF fast tokenizers are built on, so ids equal
`transformers.AutoTokenizer` ids without importing transformers (or torch). Chat templates are
rendered with jinja2 in a sandbox, the way transformers renders them (same environment options,
`tojson`, `raise_exception`, `strftime_now`, the `{% generation %}` tag), falling back to ChatML
when the folder has none. `train_tiny_tokenizer` trains a byte-level BPE with Qwen's
pre-tokenizer split on the spot and saves it in the same HF format, for the tiny CPU model.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML as Qwen writes it: one `<|im_start|>role\ncontent<|im_end|>\n` block per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The pre-tokenizer split of Qwen2/Qwen3's tokenizer.json (GPT-4-style: single digits, contractions).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Coarser splits for a tokenizer trained on one narrow corpus (the tiny CPU policy's): merges may
# then span words ("words": a run of non-space characters with its leading space) or whole lines
# ("lines": a line with its newline), so a script the corpus repeats costs few tokens.
WORD_SPLIT_PATTERN = r" ?[^\s]+|\s+"
LINE_SPLIT_PATTERN = r"[^\r\n]*[\r\n]+|[^\r\n]+"
SPLIT_PATTERNS = {"qwen": QWEN_SPLIT_PATTERN, "words": WORD_SPLIT_PATTERN, "lines": LINE_SPLIT_PATTERN}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: the jinja default escapes HTML characters, which chat templates must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or {{'content': ...}}, got {value!r}")


def _clean_up_tokenization(text: str) -> str:
    # transformers' `clean_up_tokenization`, applied when the folder asks for it.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """Encode / decode and chat templates of one HF tokenizer folder.

    Attributes:
      bos_token, eos_token, pad_token, unk_token: special token strings (None when the folder has none).
      bos_id, eos_id, pad_id, unk_id: their ids (None when absent).
      chat_template: the jinja source in use (the folder's, or ChatML).
    """

    def __init__(self, backend: _Backend, *, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template or _template_from_config(self.config) or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.unk_token = _token_str(self.config.get("unk_token"))
        for field in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, field)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"tokenizer config {field}={token!r} is not in the vocabulary")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads tokenizer.json, tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja)."""
        path = Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the folder needs a fast-tokenizer tokenizer.json")
        backend = _Backend.from_file(str(file))
        config: dict[str, Any] = {}
        special_map = path / SPECIAL_TOKENS_MAP_FILE
        if special_map.is_file():
            config.update(json.loads(special_map.read_text()))
        config_file = path / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            config.update({k: v for k, v in json.loads(config_file.read_text()).items() if v is not None
                           or k not in config})
        template_file = path / CHAT_TEMPLATE_FILE
        template = template_file.read_text() if template_file.is_file() else None
        return cls(backend, config=config, chat_template=template)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included; embeddings need at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special added tokens (what `skip_special_tokens` drops)."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ---- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it map to their ids.

        `add_special_tokens` runs the folder's post-processor (e.g. a BOS prefix); chat-rendered
        text already holds its special tokens, hence the default False.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D int array)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces", False):
            text = _clean_up_tokenization(text)
        return text

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ---- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            *, tokenize: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                            **template_kwargs) -> str | list[int]:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Args:
          messages: the conversation; every message needs a string "role".
          add_generation_prompt: append the header that starts the assistant's turn.
          tokenize: return token ids instead of text.
          tools: tool schemas, for templates that render them.
          **template_kwargs: extra template variables (e.g. enable_thinking for Qwen3).
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        variables = {
            "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "", "unk_token": self.unk_token or "",
            **template_kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "tools": None if tools is None else list(tools),
        }
        text = self._template.render(**variables)
        return self.encode(text) if tokenize else text

    # ---- persistence ------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (with the chat template) into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out_dir / TOKENIZER_FILE))
        config = dict(self.config)
        config["chat_template"] = self.chat_template
        (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        # transformers prefers chat_template.jinja when present; keep a stale one from shadowing ours.
        if (out_dir / CHAT_TEMPLATE_FILE).is_file():
            (out_dir / CHAT_TEMPLATE_FILE).write_text(self.chat_template)


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"chat_template lists {sorted(map(str, named))} but no 'default' template")
    raise ValueError(f"chat_template must be a string or a list of named templates, got {type(template).__name__}")


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None,
                         *, min_frequency: int = 2, split: str = "qwen") -> Tokenizer:
    """Trains a byte-level BPE and saves it as an HF folder.

    Byte-level means every string encodes (no unknown token) and decode(encode(x)) == x exactly.
    Special tokens `<|endoftext|>` (pad, id 0), `<|im_start|>` (1), `<|im_end|>` (eos, 2) come first;
    the template is ChatML. The vocabulary may come out smaller than `vocab_size` when the texts do
    not offer that many merges.

    Args:
      texts: training corpus.
      vocab_size: at most this many ids, specials and the 256 byte symbols included.
      out_dir: when given, tokenizer.json and tokenizer_config.json are written there.
      min_frequency: a pair must occur this often to become a merge.
      split: the pre-tokenizer split, a SPLIT_PATTERNS key: "qwen" (Qwen3's own), "words" or "lines".
    """
    if split not in SPLIT_PATTERNS:
        raise ValueError(f"split must be one of {sorted(SPLIT_PATTERNS)}, got {split!r}")
    minimum = 256 + len(CHATML_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (256 bytes + {len(CHATML_SPECIAL_TOKENS)} "
                         f"special tokens), got {vocab_size}")
    texts = list(texts)
    if not texts or not any(texts):
        raise ValueError("train_tiny_tokenizer needs at least one non-empty text")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERNS[split]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(CHATML_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    added = {
        str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
        for t in CHATML_SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
    }
    tokenizer = Tokenizer(backend, config=config, chat_template=CHATML_TEMPLATE)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer
