"""The action format: what the agent may answer each turn, parsed from and rendered to text.

Each turn the model answers with exactly one tagged action:

    <request_info>data</request_info>            topics: see INFO_TOPICS
    <validate_code>```python ...```</validate_code>  run on a train subsample, check validity only
    <execute_code>```python ...```</execute_code>    run in full, grade, report validity and score
    <submit/>                                        end with the best submission so far

`parse_action` reads the first action of a model's output (never raising: a `FormatError` tells the
model what was expected) and `format_action` writes the canonical text of one.
"""
from __future__ import annotations

import dataclasses
import re

ACTION_KINDS = ("request_info", "validate_code", "execute_code", "submit")
INFO_TOPICS = ("data", "description", "metric", "files", "sample_submission")

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
