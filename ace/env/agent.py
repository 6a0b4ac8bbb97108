"""The agent scaffold: the episode state as data, the action format, and the prompt.

An episode is MLE-Dojo-like: each turn the model sees the competition, a data summary and the
history of its actions with their feedback, and answers with exactly one tagged action:

    <request_info>data</request_info>            topics: see INFO_TOPICS
    <validate_code>```python ...```</validate_code>  run on a train subsample, check validity only
    <execute_code>```python ...```</execute_code>    run in full, grade, report validity and score
    <submit/>                                        end with the best submission so far

`AgentState` is a frozen dataclass that serialises to JSON, so an episode can start from any
intermediate state (the Evolving Data Buffer stores them). The episode loop lives in `ace.env.gym`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ACTION_KINDS = ("request_info", "validate_code", "execute_code", "submit")
INFO_TOPICS = ("data", "description", "metric", "files", "sample_submission")
STATE_FORMAT_VERSION = 1

_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_OPEN_RE = re.compile(r"<(request_info|validate_code|execute_code|submit)\s*(/?)>")
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

ACTION_FORMAT = """\
Answer with exactly one action, in one of these forms:
<request_info>TOPIC</request_info>  where TOPIC is one of: {topics}
<validate_code>
```python
# a complete script
```
</validate_code>  (runs your script on a small subsample of train.csv and checks that it writes a valid submission; no score)
<execute_code>
```python
# a complete script
```
</execute_code>  (runs your script on the full data, grades ./submission/submission.csv and reports validity and score)
<submit/>  (ends the episode; your best valid submission is the final one)""".format(
    topics=", ".join(INFO_TOPICS))


@dataclasses.dataclass(frozen=True)
class Action:
    """A parsed action. `argument` is the topic (request_info), the code (validate/execute) or ""."""

    kind: str
    argument: str = ""

    def __post_init__(self):
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"action kind must be one of {ACTION_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class FormatError:
    """Model output that holds no well-formed action; `message` tells the model what was expected."""

    message: str
    text: str = ""


def parse_action(text: str) -> Action | FormatError:
    """Parse the first action in a model's output. Never raises.

    Text outside the action (reasoning, `<think>` blocks) is ignored. The code of validate/execute
    is the first fenced block inside the tag, or the whole tag body when it holds no fence.

    Args:
      text: the model's raw output (str).

    Returns:
      an `Action`, or a `FormatError` whose message names the problem and the expected format.
    """
    if not isinstance(text, str):
        return FormatError(f"expected text, got {type(text).__name__}", "")
    body = _THINK_RE.sub("", text)
    match = _OPEN_RE.search(body)
    if match is None:
        return FormatError("no action found; expected one of <request_info>, <validate_code>, "
                           "<execute_code> or <submit/>", text)
    kind, self_closing = match.group(1), match.group(2)
    if kind == "submit":
        return Action("submit")
    if self_closing:
        return FormatError(f"<{kind}/> needs a body: <{kind}>...</{kind}>", text)
    close = body.find(f"</{kind}>", match.end())
    if close < 0:
        return FormatError(f"unclosed <{kind}> tag; expected <{kind}>...</{kind}>", text)
    inner = body[match.end():close]
    if kind == "request_info":
        topic = inner.strip().lower()
        if topic not in INFO_TOPICS:
            return FormatError(f"unknown request_info topic {topic[:40]!r}; expected one of "
                               f"{', '.join(INFO_TOPICS)}", text)
        return Action(kind, topic)
    fence = _FENCE_RE.search(inner)
    code = fence.group(1) if fence else inner.replace("```", "")
    if not code.strip():
        return FormatError(f"<{kind}> holds no code; put a complete Python script in a "
                           "```python fenced block inside the tag", text)
    return Action(kind, code.strip("\n") + "\n")


def format_action(action: Action) -> str:
    """The canonical text of an action (what a perfect model would write); inverse of parse_action."""
    if action.kind == "submit":
        return "<submit/>"
    if action.kind == "request_info":
        return f"<request_info>{action.argument}</request_info>"
    code = action.argument.rstrip("\n")
    return f"<{action.kind}>\n```python\n{code}\n```\n</{action.kind}>"


# --- state -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one past action did, as shown back to the agent.

    `valid` and `score` are None when the action did not produce a graded submission;
    `note` holds a format-error message or the request_info answer (tail).
    """

    kind: str                      # an ACTION_KINDS entry, or "format_error"
    content: str                   # code, topic, or the (truncated) malformed output
    stdout_tail: str = ""
    stderr_tail: str = ""
    valid: bool | None = None
    score: float | None = None
    invalid_reason: str | None = None
    note: str = ""
    duration_s: float = 0.0
    timed_out: bool = False
    returncode: int | None = None
    milestones: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AgentState:
    """The state of an episode: plain data, serialisable, hashable into the curriculum.

    `step` counts actions taken so far (format errors included); the episode ends when the agent
    submits, when `step == max_steps`, or when `time_used_s` reaches `time_limit_s` (None = no limit).
    """

    comp_id: str
    max_steps: int
    step: int = 0
    history: tuple[StepRecord, ...] = ()
    best_score: float | None = None
    best_code: str | None = None
    best_step: int | None = None
    submitted: bool = False
    time_used_s: float = 0.0
    time_limit_s: float | None = None

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.step <= self.max_steps:
            raise ValueError(f"step must be in [0, max_steps={self.max_steps}], got {self.step}")
        if len(self.history) != self.step:
            raise ValueError(f"history has {len(self.history)} records but step is {self.step}")
        if (self.best_score is None) != (self.best_code is None):
            raise ValueError("best_score and best_code must be both set or both None")

    @property
    def done(self) -> bool:
        out_of_time = self.time_limit_s is not None and self.time_used_s >= self.time_limit_s
        return self.submitted or self.step >= self.max_steps or out_of_time

    @property
    def steps_left(self) -> int:
        return self.max_steps - self.step

    @classmethod
    def initial(cls, comp_id: str, *, max_steps: int, time_limit_s: float | None = None) -> "AgentState":
        return cls(comp_id=comp_id, max_steps=max_steps, time_limit_s=time_limit_s)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["version"] = STATE_FORMAT_VERSION
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AgentState":
        data = json.loads(text)
        version = data.pop("version", None)
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"AgentState JSON version {version!r}, expected {STATE_FORMAT_VERSION}")
        records = []
        for rec in data.pop("history"):
            rec["milestones"] = tuple(rec.get("milestones", ()))
            records.append(StepRecord(**rec))
        return cls(history=tuple(records), **data)

    def state_key(self) -> str:
        """A stable hex digest of what makes two states the same task.

        Wall-clock durations are left out so that two episodes taking the same actions with the
        same feedback map to one key; scores are rounded to 9 significant digits.
        """
        def rnd(x):
            return None if x is None else float(f"{x:.9g}")
        canon = {
            "comp_id": self.comp_id, "max_steps": self.max_steps, "step": self.step,
            "best_score": rnd(self.best_score), "submitted": self.submitted,
            "history": [[r.kind, r.content.strip(), r.valid, rnd(r.score), r.invalid_reason,
                         r.timed_out, r.returncode] for r in self.history],
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


# --- prompt ----------------------------------------------------------------------------------

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
