"""The prompt: what the agent sees each turn, from its `AgentState` and the competition.

`build_messages` renders the chat messages (system prompt with the action format, the competition,
a data summary, the history of past actions with their feedback, a status footer), fitted to a
token budget; `PromptConfig` caps each part; `render_prompt` turns messages into token ids.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ace.env.actions import ACTION_FORMAT
from ace.env.agent import AgentState, StepRecord


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How much of each part of the task state goes into the prompt (characters unless noted)."""

    description_chars: int = 4000
    stdout_tail_chars: int = 1200
    stderr_tail_chars: int = 1200
    code_chars: int = 3000        # code of past actions, shown head-first
    note_chars: int = 1500
    head_rows: int = 5            # rows of train.csv shown in the data summary
    max_columns: int = 30         # columns listed by name in the data summary

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"PromptConfig.{f.name} must be >= 0, got {getattr(self, f.name)}")


def data_summary(public_dir: Path, cfg: PromptConfig) -> str:
    """Files, and for each CSV its row count, columns and (for train.csv) head, as text."""
    import pandas as pd  # heavy; only needed when the summary is built

    public_dir = Path(public_dir)
    if not public_dir.is_dir():
        raise FileNotFoundError(f"public data folder {public_dir} does not exist")
    lines = ["Files in ./data/:"]
    for path in sorted(public_dir.rglob("*")):
        if path.is_file():
            lines.append(f"- {path.relative_to(public_dir)} ({path.stat().st_size} bytes)")
    for path in sorted(public_dir.glob("*.csv")):
        with open(path, "rb") as fh:
            rows = max(sum(1 for _ in fh) - 1, 0)
        head = pd.read_csv(path, nrows=cfg.head_rows)
        cols = [str(c) for c in head.columns]
        shown = ", ".join(cols[:cfg.max_columns]) + (f", ... ({len(cols)} columns)"
                                                    if len(cols) > cfg.max_columns else "")
        lines.append(f"\n{path.name}: {rows} rows, {len(cols)} columns: {shown}")
        if path.name == "train.csv" and cfg.head_rows:
            lines.append(head.iloc[:, :cfg.max_columns].to_string(index=False, max_colwidth=20))
    return "\n".join(lines)


def _tail(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    return "[...]" + text[len(text) - n:] if n else ""


def _head(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "[...]"


def render_record(i: int, rec: StepRecord, cfg: PromptConfig) -> str:
    """The text of one past action and its feedback, as the agent sees it in the history.

    No wall-clock figure is rendered: `rec.duration_s` stays in the record (the curriculum and the
    duration-weighted loss read it) but not in the prompt, because it measures the machine's load
    as much as the script. A prompt that said "Ran in 1.3s" on a quiet machine and "Ran in 2.1s"
    on a busy one gives other prompt tokens, hence other samples, and evaluation of one checkpoint
    with fixed seeds would not repeat. Coarse buckets ("under 10s") were the alternative; they
    still flip at a bucket edge under load, and the tiny policies gain nothing from them. A run
    that hit its time limit still says "Timed out": that is a fact about the outcome. The status
    footer's time-left line (`build_messages`) appears only when the episode has a time limit;
    such episodes depend on the machine's speed by nature.
    """
    parts = [f"### Step {i + 1}: {rec.kind}"]
    if rec.kind in ("validate_code", "execute_code"):
        parts.append(f"```python\n{_head(rec.content, cfg.code_chars).rstrip()}\n```")
        parts.append("Timed out." if rec.timed_out else f"Exit code {rec.returncode}.")
        if rec.stdout_tail.strip():
            parts.append(f"stdout (tail):\n{_tail(rec.stdout_tail, cfg.stdout_tail_chars)}")
        if rec.stderr_tail.strip():
            parts.append(f"stderr (tail):\n{_tail(rec.stderr_tail, cfg.stderr_tail_chars)}")
        if rec.valid is True:
            scored = f", score {rec.score:.6g}" if rec.score is not None else " (not scored)"
            parts.append(f"Submission: valid{scored}.")
        elif rec.valid is False:
            parts.append(f"Submission: invalid ({rec.invalid_reason}). {rec.note}".rstrip())
    elif rec.kind == "request_info":
        parts.append(f"Topic: {rec.content}\n{_head(rec.note, cfg.note_chars)}")
    elif rec.kind == "format_error":
        parts.append(f"Your output could not be parsed: {rec.note}")
    else:
        parts.append(rec.note)
    return "\n".join(parts)


def system_prompt() -> str:
    return ("You are a machine learning engineer competing in a Kaggle-style competition. "
            "Your scripts run with the working directory set to the workspace root. Public data is "
            "read-only in ./data/ (train.csv, test.csv, sample_submission.csv, ...). A script must "
            "write its predictions to ./submission/submission.csv in the format of "
            "sample_submission.csv. Scripts run without network access; use numpy, pandas and "
            "scikit-learn.\n\n" + ACTION_FORMAT)


def build_messages(state: AgentState, comp: Any, cfg: PromptConfig, *,
                   count_tokens: Callable[[list[dict]], int] | None = None,
                   max_prompt_tokens: int | None = None,
                   summary: str | None = None) -> list[dict[str, str]]:
    """The chat messages for the agent's next action.

    Args:
      state: the episode state.
      comp: an `ace.env.task.Competition` (comp_id, description, public_dir, metric,
        higher_is_better are read).
      cfg: the prompt's size limits.
      count_tokens: counts the tokens of a full message list (as the policy will render it).
      max_prompt_tokens: the budget; the oldest history records are dropped first, then the
        description is shortened. Needs `count_tokens`.
      summary: a precomputed `data_summary(comp.public_dir, cfg)`; computed when None.

    Returns:
      [{"role": "system", "content": ...}, {"role": "user", "content": ...}]: a function of the
      state's actions and their outcomes only, never of wall-clock durations (see `render_record`),
      except for the "Time left" line of an episode with a time limit.

    Raises:
      ValueError: when even the prompt without history and description exceeds the budget.
    """
    if max_prompt_tokens is not None and count_tokens is None:
        raise ValueError("max_prompt_tokens needs count_tokens to measure the prompt")
    if state.comp_id != comp.comp_id:
        raise ValueError(f"state is for competition {state.comp_id!r}, comp is {comp.comp_id!r}")
    summary = data_summary(comp.public_dir, cfg) if summary is None else summary
    records = [render_record(i, r, cfg) for i, r in enumerate(state.history)]
    direction = "higher is better" if comp.higher_is_better else "lower is better"
    best = ("none yet" if state.best_score is None
            else f"{state.best_score:.6g} (from step {(state.best_step or 0) + 1})")
    # Only time-limited episodes show the clock: their course depends on the machine's speed anyway.
    time_left = ("" if state.time_limit_s is None
                 else f" Time left: {max(state.time_limit_s - state.time_used_s, 0.0):.0f}s.")
    footer = (f"## Status\nMetric: {comp.metric} ({direction}). Best valid score so far: {best}. "
              f"Steps left: {state.steps_left} of {state.max_steps}.{time_left}\n"
              "Reply with exactly one action.")

    def make(n_kept: int, description: str) -> list[dict[str, str]]:
        kept = records[len(records) - n_kept:] if n_kept else []
        dropped = len(records) - n_kept
        history = "\n\n".join(([f"[{dropped} earlier step(s) omitted]"] if dropped else []) + kept)
        user = (f"# Competition: {comp.comp_id}\n{description}\n\n## Data\n{summary}\n\n"
                f"## History\n{history or 'No actions yet.'}\n\n{footer}")
        return [{"role": "system", "content": system_prompt()}, {"role": "user", "content": user}]

    description = _head(comp.description, cfg.description_chars)
    messages = make(len(records), description)
    if max_prompt_tokens is None or count_tokens(messages) <= max_prompt_tokens:
        return messages
    # Keeping more records never shortens the prompt, so bisect the largest count that fits.
    lo, hi = 0, len(records)
    if count_tokens(make(0, description)) <= max_prompt_tokens:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(make(mid, description)) <= max_prompt_tokens:
                lo = mid
            else:
                hi = mid - 1
        return make(lo, description)
    while len(description) > 200:
        description = description[:len(description) // 2] + "[...]"
        messages = make(0, description)
        if count_tokens(messages) <= max_prompt_tokens:
            return messages
    raise ValueError(f"prompt needs {count_tokens(make(0, description))} tokens without history, "
                     f"over max_prompt_tokens={max_prompt_tokens}")


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` ready for generation.

    Uses `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` when the tokenizer
    has one (it may return ids, a BatchEncoding-like mapping, or text to encode); otherwise a
    plain role-tagged layout encoded with `tokenizer.encode`.
    """
    messages = [dict(m) for m in messages]
    for m in messages:
        if not {"role", "content"} <= set(m) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a 'role' and a str 'content', got keys {sorted(m)}")
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is not None and getattr(tokenizer, "chat_template", True) is not None:
        out = apply(messages, add_generation_prompt=True)
        if isinstance(out, Mapping) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        if isinstance(out, str):
            return [int(t) for t in _encode(tokenizer, out)]
        return [int(t) for t in out]
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    return [int(t) for t in _encode(tokenizer, text)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # tokenizers without that keyword
        return list(tokenizer.encode(text))
