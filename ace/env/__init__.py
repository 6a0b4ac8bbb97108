"""The MLE environment: competitions, grading, sandboxes, the agent scaffold and the reward.

Importing this package is cheap: names are resolved from their modules on first access, so
`import ace.env` pulls in neither pandas nor scikit-learn.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # ace.env.task
    "Competition": "ace.env.task",
    "GradeResult": "ace.env.task",
    "INVALID_REASONS": "ace.env.task",
    "TASK_TYPES": "ace.env.task",
    # ace.env.grading
    "METRICS": "ace.env.metrics",
    "MedalThresholds": "ace.env.grading",
    "grade_submission": "ace.env.grading",
    "human_rank": "ace.env.grading",
    "medal_thresholds": "ace.env.grading",
    # ace.env.suites
    "get_competition": "ace.env.suites",
    "load_suite": "ace.env.suites",
    # ace.env.mlebench
    "load_mlebench_competition": "ace.env.mlebench",
    "load_mlebench_suite": "ace.env.mlebench",
    # ace.env.reference_solutions
    "ReferenceScript": "ace.env.reference_solutions",
    "reference_scripts": "ace.env.reference_solutions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ace.env' has no attribute {name!r}")
