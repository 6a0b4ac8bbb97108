"""The MLE environment as a gym-style object: `reset`, `messages`, `step`, grading.

The policy interface and the episode loop are `ace.env.episode`. `MLEEnv` owns one workspace per episode (created on `reset`, destroyed on the next reset or
`close`); the sandbox that runs code belongs to the caller. Grading happens here, outside the
sandbox: the grader reads `<workspace>/submission/submission.csv` and the private answers, which
never enter a workspace.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ace.env.actions import FormatError, parse_action
from ace.env.agent import AgentState, StepRecord
from ace.env.prompt import PromptConfig, build_messages, data_summary, render_record
from ace.env.reward import RewardConfig, instrument as instrument_code
from ace.env.reward import milestones_reached, step_reward, strip_markers
from ace.env.sandbox_guards import mask_workspace_path

# Output kept in a StepRecord: the state is stored per task, so it stays bounded; the prompt
# shows a shorter tail still (PromptConfig).
RECORD_TAIL_CHARS = 4000


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What one `MLEEnv.step` did. `grade` and `exec` are None for actions that run no code."""

    state_after: AgentState
    observation: str
    reward: float
    done: bool
    grade: Any | None            # ace.env.task.GradeResult
    exec: Any | None             # ace.env.sandbox.ExecResult
    duration_s: float
    milestones: frozenset[str]
    outcome: str                 # an ace.env.reward.OUTCOMES entry
    reward_terms: dict[str, float] = dataclasses.field(default_factory=dict)


def _default_grader(comp, path):
    from ace.env.grading import grade_submission
    return grade_submission(comp, path)


class MLEEnv:
    """A multi-turn MLE episode on one competition.

    Args:
      comp: an `ace.env.task.Competition`.
      sandbox: an `ace.env.sandbox.Sandbox` (owned by the caller).
      reward_cfg: the reward constants.
      max_steps: actions per episode (used for fresh states).
      exec_timeout_s: wall-clock limit of one execute_code run.
      instrument: wrap scripts to detect progress milestones (partial credit).
      prompt_cfg: prompt size limits.
      validate_rows: rows of train.csv kept for validate_code.
      validate_timeout_s: limit of one validate_code run (default: exec_timeout_s).
      time_limit_s: wall-clock budget of an episode (None = steps only), for fresh states.
      grader: `(comp, submission_path) -> GradeResult`; default `ace.env.grading.grade_submission`.
    """

    def __init__(self, comp, sandbox, *, reward_cfg: RewardConfig, max_steps: int,
                 exec_timeout_s: float, instrument: bool, prompt_cfg: PromptConfig = PromptConfig(),
                 validate_rows: int = 200, validate_timeout_s: float | None = None,
                 time_limit_s: float | None = None,
                 grader: Callable[[Any, Path], Any] = _default_grader):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if exec_timeout_s <= 0:
            raise ValueError(f"exec_timeout_s must be > 0, got {exec_timeout_s}")
        if validate_rows < 1:
            raise ValueError(f"validate_rows must be >= 1, got {validate_rows}")
        self.comp, self.sandbox, self.reward_cfg = comp, sandbox, reward_cfg
        self.max_steps, self.exec_timeout_s, self.instrument = max_steps, exec_timeout_s, instrument
        self.prompt_cfg, self.validate_rows = prompt_cfg, validate_rows
        self.validate_timeout_s = validate_timeout_s or exec_timeout_s
        self.time_limit_s, self.grader = time_limit_s, grader
        self._scratch = Path(tempfile.mkdtemp(prefix="ace-env-"))  # host-only: best submission copy
        self._summary: str | None = None
        self._workspace = None
        self._validate_workspace = None
        self._state: AgentState | None = None
        self._best_grade = None

    # -- lifecycle --
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Destroy the workspaces and the scratch folder (the sandbox stays open)."""
        self._drop_workspaces()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _drop_workspaces(self) -> None:
        for ws in (self._workspace, self._validate_workspace):
            if ws is not None:
                self.sandbox.destroy_workspace(ws)
        self._workspace = self._validate_workspace = None

    @property
    def state(self) -> AgentState:
        if self._state is None:
            raise RuntimeError("call reset() before using the environment")
        return self._state

    @property
    def summary(self) -> str:
        if self._summary is None:
            self._summary = data_summary(self.comp.public_dir, self.prompt_cfg)
        return self._summary

    def reset(self, state: AgentState | None = None) -> list[dict[str, str]]:
        """Start an episode, fresh or from an intermediate `state`; returns the first prompt."""
        if state is None:
            state = AgentState.initial(self.comp.comp_id, max_steps=self.max_steps,
                                       time_limit_s=self.time_limit_s)
        elif state.comp_id != self.comp.comp_id:
            raise ValueError(f"state is for competition {state.comp_id!r}, env runs "
                             f"{self.comp.comp_id!r}")
        self._drop_workspaces()
        (self._scratch / "best_submission.csv").unlink(missing_ok=True)
        self._best_grade = None
        self._workspace = self.sandbox.create_workspace(Path(self.comp.public_dir))
        self._state = state
        return self.messages()

    def messages(self, *, count_tokens: Callable[[list[dict]], int] | None = None,
                 max_prompt_tokens: int | None = None) -> list[dict[str, str]]:
        """The prompt for the next action, trimmed to a token budget when one is given."""
        return build_messages(self.state, self.comp, self.prompt_cfg, count_tokens=count_tokens,
                              max_prompt_tokens=max_prompt_tokens, summary=self.summary)

    # -- step --
    def step(self, action_text: str) -> StepOutcome:
        """Parse and carry out one action; never raises on bad model output.

        A script that exits non-zero or times out is a runtime error even if it wrote a file;
        the submission folder is emptied before each run so no earlier file is credited to it.
        """
        state = self.state
        if state.done:
            raise RuntimeError(f"the episode on {state.comp_id!r} is over; call reset()")
        t0 = time.perf_counter()
        action = parse_action(action_text)
        grade = exec_result = None
        milestones: frozenset[str] = frozenset()
        best = dict(best_score=state.best_score, best_code=state.best_code, best_step=state.best_step)
        submitted = False
        cfg = self.reward_cfg
        if isinstance(action, FormatError):
            outcome = "format_error"
            record = StepRecord("format_error", action_text[:500], note=action.message)
            reward, terms = step_reward(outcome, cfg=cfg)
        elif action.kind == "request_info":
            outcome = "info"
            record = StepRecord("request_info", action.argument, note=self._info(action.argument))
            reward, terms = step_reward(outcome, cfg=cfg)
        elif action.kind == "submit":
            submitted = True
            has_valid = state.best_score is not None
            outcome = "submit"
            grade = self.final_grade() if has_valid else None
            note = (f"Submitted; final score {state.best_score:.6g}." if has_valid
                    else "Submitted without any valid submission.")
            record = StepRecord("submit", "", note=note)
            reward, terms = step_reward(outcome, cfg=cfg) if has_valid else (
                cfg.submit_without_valid, {"base": cfg.submit_without_valid})
        else:
            validate = action.kind == "validate_code"
            exec_result, grade, milestones, outcome = self._run_code(action.argument, validate=validate)
            better = (outcome == "valid" and (state.best_score is None or self._better(
                grade.score, state.best_score)))
            reward, terms = step_reward(
                outcome, cfg=cfg, score=grade.score if outcome == "valid" else None,
                best_before=state.best_score, leaderboard=tuple(self.comp.leaderboard),
                higher_is_better=self.comp.higher_is_better,
                medal=grade.medal if outcome == "valid" else None, milestones=milestones)
            if better:
                best = dict(best_score=float(grade.score), best_code=action.argument,
                            best_step=state.step)
                shutil.copyfile(self._workspace.submission_path, self._scratch / "best_submission.csv")
                self._best_grade = grade
            record = StepRecord(
                action.kind, action.argument,
                stdout_tail=strip_markers(exec_result.stdout)[-RECORD_TAIL_CHARS:],
                stderr_tail=strip_markers(exec_result.stderr)[-RECORD_TAIL_CHARS:],
                valid=None if grade is None else bool(grade.valid),
                score=(float(grade.score) if outcome == "valid" else None),
                invalid_reason=None if grade is None or grade.valid else grade.reason,
                note=self._exec_note(exec_result, grade, outcome),
                duration_s=float(exec_result.duration_s), timed_out=bool(exec_result.timed_out),
                returncode=int(exec_result.returncode), milestones=tuple(sorted(milestones)))
        duration = time.perf_counter() - t0
        record = dataclasses.replace(record, duration_s=record.duration_s or duration)
        new_state = dataclasses.replace(
            state, step=state.step + 1, history=state.history + (record,), submitted=submitted,
            time_used_s=state.time_used_s + duration, **best)
        self._state = new_state
        return StepOutcome(state_after=new_state,
                           observation=render_record(state.step, record, self.prompt_cfg),
                           reward=float(reward), done=new_state.done, grade=grade, exec=exec_result,
                           duration_s=duration, milestones=milestones, outcome=outcome,
                           reward_terms=dict(terms))

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.comp.higher_is_better else a < b

    def _run_code(self, code: str, *, validate: bool):
        """Run `code` (on the subsample when validating) and grade; returns (exec, grade, milestones, outcome)."""
        workspace = self._ensure_validate_workspace() if validate else self._workspace
        # A stale file from an earlier run must not be credited to this one.
        for stale in Path(workspace.submission_dir).glob("*"):
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
            else:
                shutil.rmtree(stale, ignore_errors=True)
        script = instrument_code(code) if self.instrument else code
        timeout = self.validate_timeout_s if validate else self.exec_timeout_s
        result = self.sandbox.run(workspace, script, timeout_s=timeout)
        # The workspace's random host path must not reach the prompt (see mask_workspace_path).
        result = dataclasses.replace(result, stdout=mask_workspace_path(result.stdout, workspace.root),
                                     stderr=mask_workspace_path(result.stderr, workspace.root))
        milestones = milestones_reached(result.stdout, result.stderr) if self.instrument else frozenset()
        if not result.ok:
            return result, None, milestones, "runtime_error"
        grade = self.grader(self.comp, Path(workspace.submission_path))
        grade = dataclasses.replace(grade, detail=mask_workspace_path(grade.detail, workspace.root))
        if not grade.valid:
            return result, grade, milestones, "invalid"
        if validate:
            # Validation checks the format only; the score of a subsample model is not shown.
            grade = dataclasses.replace(grade, score=None, medal=None, above_median=False,
                                        human_rank=None)
            return result, grade, milestones, "validated"
        return result, grade, milestones, "valid"

    def _ensure_validate_workspace(self):
        if self._validate_workspace is None:
            self._validate_workspace = self.sandbox.create_workspace(self._subsampled_public_dir())
        return self._validate_workspace

    def _subsampled_public_dir(self) -> Path:
        import pandas as pd

        target = self._scratch / "validate_public"
        if target.exists():
            return target
        shutil.copytree(self.comp.public_dir, target)
        train = target / "train.csv"
        if train.exists():
            df = pd.read_csv(train)
            if len(df) > self.validate_rows:
                df = df.sample(n=self.validate_rows, random_state=0).sort_index()
                df.to_csv(train, index=False)
        return target

    def _exec_note(self, result, grade, outcome: str) -> str:
        if outcome == "runtime_error":
            if result.timed_out:
                return "The script was stopped: it ran past its time limit."
            return (f"The script failed ({result.killed_reason})." if result.killed_reason
                    else "The script failed.")
        return grade.detail if grade is not None and not grade.valid else ""

    def _info(self, topic: str) -> str:
        comp = self.comp
        public = Path(comp.public_dir)
        if topic == "description":
            return comp.description
        if topic in ("data", "files"):
            text = self.summary
            return text if topic == "data" else text.split("\n\n")[0]
        if topic == "sample_submission":
            # pandas reads a zipped sample (MLE-bench's text-normalization ships only zips).
            import pandas as pd

            head = pd.read_csv(public / comp.sample_submission_file, nrows=5, dtype=str, keep_default_na=False)
            return f"{comp.sample_submission_file} (first lines):\n" + head.to_csv(index=False)
        # metric
        board = sorted(float(s) for s in comp.leaderboard)
        direction = "higher is better" if comp.higher_is_better else "lower is better"
        if not board:
            return f"Metric: {comp.metric} ({direction}); no leaderboard."
        best = board[-1] if comp.higher_is_better else board[0]
        median = board[len(board) // 2]
        return (f"Metric: {comp.metric} ({direction}). Leaderboard of {len(board)} teams: "
                f"best {best:.6g}, median {median:.6g}.")

    def save_best_submission(self, dest: Path | str) -> bool:
        """Copies this episode's best submission file (the one `submit` hands in) to `dest`.

        Creates `dest`'s parent folders. Returns False, and writes nothing, when the episode has
        no valid submission on disk yet.
        """
        best = self._scratch / "best_submission.csv"
        if not best.is_file():
            return False
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, dest)
        return True

    @property
    def best_grade(self):
        """The grade of the best submission of this episode so far, without re-running anything."""
        return self._best_grade

    def final_grade(self):
        """The grade of the best submission so far (the one `submit` hands in), or None.

        After a `reset(state)` from a stored state the best file is not on disk; its script is
        run once more to rebuild it.
        """
        if self._best_grade is not None or self.state.best_code is None:
            return self._best_grade
        result, grade, _, outcome = self._run_code(self.state.best_code, validate=False)
        if outcome == "valid":
            self._best_grade = grade
            shutil.copyfile(self._workspace.submission_path, self._scratch / "best_submission.csv")
        return self._best_grade
