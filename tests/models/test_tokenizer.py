"""Tokenizer: ids and chat rendering equal transformers' AutoTokenizer; decode inverts encode."""
import json

import jinja2
import pytest
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from ace.models.tokenizer import (CHAT_TEMPLATE_FILE, CHATML_TEMPLATE, TOKENIZER_CONFIG_FILE, Tokenizer,
                                  train_tiny_tokenizer)
from tests.support.tiny_hf import TOKENIZER_CORPUS, save_tiny_tokenizer

VARIED_TEXTS = [
    "Hello, world! It's a test... isn't it?",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "\tindented\twith\ttabs\r\nand CRLF\r\n",
    "   leading and trailing spaces   ",
    "numbers 1234567890 and 3.14e-10, hex 0xFF",
    "unseen words: zygomorphic quixotic",
    "unicode: naïve café 日本語 🚀 Ελληνικά",
    "specials inline <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a careful ML engineer."},
    {"role": "user", "content": "Train a model on train.csv and write submission.csv."},
    {"role": "assistant", "content": "```python\nimport pandas as pd\n```"},
    {"role": "user", "content": "Validation score: 0.81. Improve it."},
]

# Exercises what real templates (Qwen3's included) use: namespace, loop vars, tojson, string methods,
# tools, raise_exception, extra kwargs and the {% generation %} tag.
RICH_TEMPLATE = """{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}\
{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
  {%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m.content | trim }}\
{% endgeneration %}{{ '<|im_end|>\\n' }}
  {%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}{% if loop.index0 == ns.last_user %} [last]\
{% endif %}{{ '<|im_end|>\\n' }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and \
not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    ours = save_tiny_tokenizer(path)
    return path, ours, AutoTokenizer.from_pretrained(str(path))


def test_ids_and_special_tokens_match_transformers(tiny):
    path, ours, theirs = tiny
    assert ours.vocab_size == len(theirs)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id)
    assert ours.eos_id == ours.token_to_id("<|im_end|>") and ours.pad_id == ours.token_to_id("<|endoftext|>")
    for text in VARIED_TEXTS + TOKENIZER_CORPUS[:8]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(VARIED_TEXTS) == [ours.encode(t) for t in VARIED_TEXTS]
    # The BPE really learned merges: frequent words are single tokens and the corpus compresses.
    assert len(ours.encode("import")) == 1 and len(ours.encode(" the")) == 1
    corpus = TOKENIZER_CORPUS[:8]
    assert sum(map(len, ours.encode_batch(corpus))) < 0.7 * sum(len(t.encode()) for t in corpus)


@pytest.mark.parametrize("text", VARIED_TEXTS + TOKENIZER_CORPUS[:8])
def test_decode_inverts_encode_on_prose_code_and_unicode(tiny, text):
    _, ours, _ = tiny
    assert ours.decode(ours.encode(text)) == text


# A module-level tokenizer: hypothesis tests cannot take function-scoped fixtures.
_SHARED = train_tiny_tokenizer(TOKENIZER_CORPUS, 300)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_decode_inverts_encode_on_arbitrary_text(text):
    assert _SHARED.decode(_SHARED.encode(text)) == text


_LINE_SPLIT = train_tiny_tokenizer(TOKENIZER_CORPUS * 3, 600, split="lines")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_line_split_decode_inverts_encode_on_arbitrary_text(text):
    assert _LINE_SPLIT.decode(_LINE_SPLIT.encode(text)) == text


@pytest.mark.parametrize("split", ["words", "lines"])
def test_coarse_splits_match_transformers_and_merge_across_spaces(split, tmp_path):
    texts = ["x = make_pipeline(StandardScaler(), Ridge())\n" * 3 + "print(x)\n"] * 40 + TOKENIZER_CORPUS
    ours = train_tiny_tokenizer(texts, 600, tmp_path, split=split)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in VARIED_TEXTS + texts[:1]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    # A corpus line spans spaces; Qwen's split could never merge across " = " or ", ".
    line = "x = make_pipeline(StandardScaler(), Ridge())\n"
    qwen = train_tiny_tokenizer(texts, 600)
    assert len(ours.encode(line)) < len(qwen.encode(line))
    if split == "lines":
        assert len(ours.encode(line)) == 1


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match=r"split must be one of \['lines', 'qwen', 'words'\], got 'chars'"):
        train_tiny_tokenizer(["abc"], 300, split="chars")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_rendering_matches_transformers(tiny, add_generation_prompt):
    _, ours, theirs = tiny
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    want = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == want
    assert text.startswith("<|im_start|>system\nYou are a careful ML engineer.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    hf_ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert ids == list(hf_ids)
    assert ids.count(ours.eos_id) == len(MESSAGES)


def test_folder_template_renders_like_transformers(tiny, tmp_path):
    path, ours, _ = tiny
    ours.save(tmp_path)
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(RICH_TEMPLATE)
    mine = Tokenizer.from_dir(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    tools = [{"type": "function", "function": {"name": "run_python", "description": "Runs code <safely> & "
                                                "returns stdout", "parameters": {"code": "str"}}}]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}, {"tools": tools, "enable_thinking": True}):
        got = mine.apply_chat_template(MESSAGES, add_generation_prompt=True, **kwargs)
        want = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs)
        assert got == want, kwargs
    assert "[last]" in got and 'code <safely> & returns' in got and "<think>" not in got
    bad = MESSAGES + [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        mine.apply_chat_template(bad)


def test_template_sources_and_fallback(tiny, tmp_path):
    path, ours, _ = tiny
    config = json.loads((path / TOKENIZER_CONFIG_FILE).read_text())
    assert config["chat_template"] == CHATML_TEMPLATE
    (tmp_path / "named").mkdir()
    ours.save(tmp_path / "named")
    config_named = dict(config, chat_template=[{"name": "tool_use", "template": "T"},
                                               {"name": "default", "template": "{{ messages[0].content }}!"}])
    (tmp_path / "named" / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config_named))
    assert Tokenizer.from_dir(tmp_path / "named").apply_chat_template(MESSAGES[:1]) == MESSAGES[0]["content"] + "!"
    (tmp_path / "none").mkdir()
    ours.save(tmp_path / "none")
    (tmp_path / "none" / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    fallback = Tokenizer.from_dir(tmp_path / "none")
    assert fallback.chat_template == CHATML_TEMPLATE and fallback.eos_id == ours.eos_id
    assert fallback.pad_id is None


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match=r"vocab_size must be >= 259 .* got 100"):
        train_tiny_tokenizer(["abc"], 100)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_tiny_tokenizer([], 300)
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with a string 'role'"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TypeError, match="messages must be a list of dicts"):
        ours.apply_chat_template("hello")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    ours.save(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(ValueError, match=r"eos_token='<\|not_there\|>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
