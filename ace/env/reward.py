"""The unified step reward of the MLE environment, and partial credit from instrumentation.

One function, `step_reward`, maps the outcome of one agent action to a scalar. The order of the
outcomes is an invariant checked when a `RewardConfig` is built:

    format error < runtime error (+ partial credit) < invalid submission < valid submission

A valid submission earns `valid_base` plus the sigmoid-squashed improvement over the state's best
score so far, normalised by the spread of the leaderboard (the reward scaling of ML-Agent,
Liu et al. 2025, "ML-Agent: Reinforcing LLM Agents for Autonomous Machine Learning Engineering"),
plus a medal bonus. A failed run earns a little credit for each progress milestone it reached
before failing (Yang et al. 2025, "Reinforcement Learning for Machine Learning Engineering
Agents"), so a script that crashes while writing predictions scores above one that dies at import.

Milestones are detected from markers that `instrument(code)` makes the script print to stderr.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re
import threading
from typing import Iterable, Sequence

MILESTONES = ("imports", "data_loaded", "model_trained", "predictions_written")
OUTCOMES = ("format_error", "info", "submit", "runtime_error", "invalid", "validated", "valid")
MEDALS = ("gold", "silver", "bronze")
MARKER_PREFIX = "[ace-milestone]"
_MARKER_RE = re.compile(r"^\[ace-milestone\] (\w+)[ \t]*$", re.MULTILINE)
_MARKER_LINE_RE = re.compile(r"(?:^|\n)\[ace-milestone\] \w+[ \t]*(?=\n|$)")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Every constant of the step reward.

    The improvement term is `improvement_scale * sigmoid(z / sigmoid_temperature)` with
    `z = (score - baseline) / spread` signed so that positive means better; `baseline` is the
    state's best score so far, or the leaderboard median before the first valid submission, and
    `spread` is the leaderboard's standard deviation (at least `min_spread`).
    """

    format_error: float = -1.0
    runtime_error: float = -0.6
    invalid_submission: float = -0.2
    info: float = 0.0            # request_info: neither rewarded nor punished
    submit: float = 0.0          # submit when a valid submission exists
    submit_without_valid: float = -0.2
    validated: float = 0.05      # validate_code produced a valid submission (not scored)
    valid_base: float = 0.2
    improvement_scale: float = 0.6
    sigmoid_temperature: float = 1.0
    min_spread: float = 1e-6
    gold_bonus: float = 0.6
    silver_bonus: float = 0.4
    bronze_bonus: float = 0.2
    partial_credit_per_milestone: float = 0.08
    partial_credit_cap: float = 0.3
    reward_cap: float = 2.0

    def __post_init__(self):
        if self.sigmoid_temperature <= 0:
            raise ValueError(f"sigmoid_temperature must be > 0, got {self.sigmoid_temperature}")
        if self.min_spread <= 0:
            raise ValueError(f"min_spread must be > 0, got {self.min_spread}")
        if self.partial_credit_per_milestone < 0 or self.partial_credit_cap < 0:
            raise ValueError("partial_credit_per_milestone and partial_credit_cap must be >= 0, got "
                             f"{self.partial_credit_per_milestone} and {self.partial_credit_cap}")
        if min(self.gold_bonus, self.silver_bonus, self.bronze_bonus, self.improvement_scale) < 0:
            raise ValueError("medal bonuses and improvement_scale must be >= 0")
        # The ordering of outcomes is the point of the reward; refuse configs that break it.
        failed_max = self.runtime_error + self.partial_credit_cap
        if not self.format_error < self.runtime_error:
            raise ValueError(f"need format_error < runtime_error, got {self.format_error} >= "
                             f"{self.runtime_error}")
        if not failed_max < self.invalid_submission:
            raise ValueError("need runtime_error + partial_credit_cap < invalid_submission, got "
                             f"{failed_max} >= {self.invalid_submission}")
        if not self.invalid_submission < self.valid_base:
            raise ValueError(f"need invalid_submission < valid_base, got {self.invalid_submission} "
                             f">= {self.valid_base}")
        if self.reward_cap < self.valid_base:
            raise ValueError(f"reward_cap ({self.reward_cap}) must be >= valid_base ({self.valid_base})")


def leaderboard_spread(leaderboard: Sequence[float], *, min_spread: float) -> float:
    """Standard deviation of the leaderboard scores, floored at `min_spread` (1.0 if < 2 teams)."""
    scores = [float(s) for s in leaderboard if s is not None and math.isfinite(float(s))]
    if len(scores) < 2:
        return 1.0
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return max(std, min_spread)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def step_reward(outcome: str, *, cfg: RewardConfig, score: float | None = None,
                best_before: float | None = None, leaderboard: Sequence[float] = (),
                higher_is_better: bool = True, medal: str | None = None,
                milestones: Iterable[str] = ()) -> tuple[float, dict[str, float]]:
    """The reward of one action.

    Args:
      outcome: one of OUTCOMES. "format_error": unparseable output; "info": request_info;
        "submit": submit with a valid submission on record; "runtime_error": the script failed
        or timed out; "invalid": it ran but the submission is missing or invalid; "validated":
        validate_code produced a valid (unscored) submission; "valid": a scored valid submission.
      cfg: the constants.
      score: the submission's score (required for "valid").
      best_before: the state's best score before this action; None before the first valid one.
      leaderboard: team scores, for the baseline (median) and the spread (std).
      higher_is_better: the metric's direction.
      medal: "gold" | "silver" | "bronze" | None, for "valid".
      milestones: milestones reached by a failed run (names from MILESTONES), for partial credit.

    Returns:
      (reward, terms): the float reward, capped at `cfg.reward_cap`, and its named terms
      (`base`, `improvement`, `medal_bonus`, `partial_credit`, `z`).
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    terms = {"base": 0.0, "improvement": 0.0, "medal_bonus": 0.0, "partial_credit": 0.0, "z": 0.0}
    if outcome == "format_error":
        terms["base"] = cfg.format_error
    elif outcome == "info":
        terms["base"] = cfg.info
    elif outcome == "submit":
        terms["base"] = cfg.submit
    elif outcome == "validated":
        terms["base"] = cfg.validated
    elif outcome == "invalid":
        terms["base"] = cfg.invalid_submission
    elif outcome == "runtime_error":
        reached = set(milestones)
        unknown = reached - set(MILESTONES)
        if unknown:
            raise ValueError(f"unknown milestones {sorted(unknown)}; expected names from {MILESTONES}")
        terms["base"] = cfg.runtime_error
        terms["partial_credit"] = min(cfg.partial_credit_cap,
                                      cfg.partial_credit_per_milestone * len(reached))
    else:  # valid
        if score is None or not math.isfinite(float(score)):
            raise ValueError(f"a valid outcome needs a finite score, got {score!r}")
        if medal is not None and medal not in MEDALS:
            raise ValueError(f"medal must be one of {MEDALS} or None, got {medal!r}")
        if best_before is not None:
            baseline = float(best_before)
        elif len(leaderboard):
            baseline = _median(leaderboard)
        else:
            baseline = float(score)
        spread = leaderboard_spread(leaderboard, min_spread=cfg.min_spread)
        sign = 1.0 if higher_is_better else -1.0
        z = sign * (float(score) - baseline) / spread
        terms["z"] = z
        terms["base"] = cfg.valid_base
        terms["improvement"] = cfg.improvement_scale * _sigmoid(z / cfg.sigmoid_temperature)
        terms["medal_bonus"] = {"gold": cfg.gold_bonus, "silver": cfg.silver_bonus,
                                "bronze": cfg.bronze_bonus}.get(medal, 0.0)
    total = terms["base"] + terms["improvement"] + terms["medal_bonus"] + terms["partial_credit"]
    return min(total, cfg.reward_cap), terms


def _sigmoid(x: float) -> float:
    # Split by sign so that exp never overflows.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# --- instrumentation -------------------------------------------------------------------------

# Calls whose completion marks a milestone. Matching is by the called name (`pd.read_csv(...)`,
# `model.fit(...)`), so it works for any library without importing it in the harness.
_MILESTONE_CALLS = {
    "data_loaded": {"read_csv", "read_parquet", "read_table", "read_json", "read_feather",
                    "read_excel", "loadtxt", "genfromtxt", "load", "fromfile", "imread"},
    "model_trained": {"fit", "fit_predict", "partial_fit", "train", "cross_val_score",
                      "cross_validate", "cross_val_predict"},
    "predictions_written": {"to_csv", "savetxt", "to_parquet", "write_csv"},
}

# Runs inside the sandbox. The transform keeps the original line numbers (inserted statements
# copy the location of the statement they follow) and registers the source with linecache, so a
# traceback the agent reads points at its own lines, not at this wrapper.
_WRAPPER = '''\
import ast as _ace_ast, linecache as _ace_lc, sys as _ace_sys, types as _ace_types
_ACE_SRC = {src!r}
_ACE_CALLS = {calls!r}
_ACE_SEEN = set()


def _ace_mark(name):
    if name not in _ACE_SEEN:
        _ACE_SEEN.add(name)
        _ace_sys.stderr.write("\\n{prefix} " + name + "\\n")
        _ace_sys.stderr.flush()


def _ace_called_names(node):
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, _ace_ast.Call):
            f = n.func
            if isinstance(f, _ace_ast.Attribute):
                yield f.attr
            elif isinstance(n.func, _ace_ast.Name):
                yield f.id
        for child in _ace_ast.iter_child_nodes(n):
            if not isinstance(child, (_ace_ast.FunctionDef, _ace_ast.AsyncFunctionDef,
                                      _ace_ast.ClassDef, _ace_ast.Lambda)):
                stack.append(child)


def _ace_mark_stmt(name, after):
    call = _ace_ast.Expr(_ace_ast.Call(_ace_ast.Name("_ace_mark", _ace_ast.Load()),
                                       [_ace_ast.Constant(name)], []))
    return _ace_ast.copy_location(call, after)


def _ace_transform(body):
    imports = [i for i, s in enumerate(body) if isinstance(s, (_ace_ast.Import, _ace_ast.ImportFrom))]
    out = []
    for i, stmt in enumerate(body):
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], _ace_ast.stmt):
                setattr(stmt, field, _ace_transform(inner))
        for handler in getattr(stmt, "handlers", []):
            handler.body = _ace_transform(handler.body)
        for case in getattr(stmt, "cases", []):
            case.body = _ace_transform(case.body)
        out.append(stmt)
        if isinstance(stmt, (_ace_ast.Return, _ace_ast.Raise, _ace_ast.Break, _ace_ast.Continue)):
            continue
        if imports and i == imports[-1]:
            out.append(_ace_mark_stmt("imports", stmt))
        if isinstance(stmt, (_ace_ast.FunctionDef, _ace_ast.AsyncFunctionDef, _ace_ast.ClassDef)):
            continue
        names = set(_ace_called_names(stmt))
        for milestone, calls in _ACE_CALLS.items():
            if names & set(calls):
                out.append(_ace_mark_stmt(milestone, stmt))
    return out


_ace_tree = _ace_ast.parse(_ACE_SRC, "<solution>")
_ace_tree.body = _ace_transform(_ace_tree.body)
_ace_ast.fix_missing_locations(_ace_tree)
_ace_lc.cache["<solution>"] = (len(_ACE_SRC), None, _ACE_SRC.splitlines(True), "<solution>")
_ace_code = compile(_ace_tree, "<solution>", "exec")
_ace_main = _ace_types.ModuleType("__main__")
_ace_main.__dict__["_ace_mark"] = _ace_mark
_ace_main.__dict__["__file__"] = "solution.py"
_ace_sys.modules["__main__"] = _ace_main
try:
    exec(_ace_code, _ace_main.__dict__)
except SystemExit:
    raise
except BaseException as _ace_exc:
    import traceback as _ace_tb
    # Drop this wrapper's frame: the agent should see only its own code.
    _ace_tb.print_exception(type(_ace_exc), _ace_exc, _ace_exc.__traceback__.tb_next)
    _ace_sys.stderr.flush()
    _ace_sys.exit(1)
'''


# CPython 3.11's ast.parse keeps its recursion depth in interpreter-wide state: two threads parsing
# at once (rollout workers instrumenting scripts side by side) can fail with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905). One parse at a time.
_PARSE_LOCK = threading.Lock()


def instrument(code: str) -> str:
    """Wrap a solution script so that it reports progress milestones on stderr.

    The returned script parses `code`, inserts a marker after the last import of each block and
    after each statement that calls a data loader, a fit/train call or a prediction writer, and
    runs it as `__main__`. Line numbers in tracebacks are those of `code`. Code that does not
    parse is returned unchanged: it fails at once and reaches no milestone.

    Args:
      code: the agent's Python script.

    Returns:
      the instrumented script (a str).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    try:
        with _PARSE_LOCK:
            ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    calls = {k: sorted(v) for k, v in _MILESTONE_CALLS.items()}
    return _WRAPPER.format(src=code, calls=calls, prefix=MARKER_PREFIX)


def milestones_reached(*outputs: str) -> frozenset[str]:
    """The milestones whose markers appear in any of `outputs` (stdout, stderr text)."""
    found = set()
    for text in outputs:
        if text:
            found.update(m for m in _MARKER_RE.findall(text) if m in MILESTONES)
    return frozenset(found)


def strip_markers(text: str) -> str:
    """`text` without the milestone marker lines (what the agent is shown)."""
    return _MARKER_LINE_RE.sub("", text) if text else text
