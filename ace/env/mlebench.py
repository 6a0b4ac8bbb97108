"""Load competitions from a prepared MLE-bench data folder and grade them with our rules.

Expected layout (what `mlebench prepare` writes, plus the competition's metadata files from
the mle-bench repository's `mlebench/competitions/<id>/` folder):

    <data_dir>/<id>/prepared/public/    sample_submission.csv, train/test data, description.md
    <data_dir>/<id>/prepared/private/   the answers (test.csv or answers.csv)
    <meta>/<id>/leaderboard.csv         Kaggle's final leaderboard, with a `score` column
    <meta>/<id>/description.md          (optional if public/ has one)
    <meta>/<id>/config.yaml             (optional) dataset.answers, dataset.sample_submission,
                                        grader.name

where <meta> is `competitions_dir` when given, else `data_dir` itself. Submissions use the
sample submission's layout: its first column is the id column, the rest are targets.

MLE-bench grades each competition with its own code; here only competitions whose grader is
one of the generic metrics in `ace.env.grading.METRICS` can be loaded. `KNOWN_METRICS`
names them for MLE-bench-Lite; others need `metric=` (and the answers in submission layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ace.env.grading import METRICS, get_metric
from ace.env.task import Competition

# The 22 competitions of MLE-bench-Lite (the "low complexity" split of the MLE-bench paper).
MLEBENCH_LITE = (
    "aerial-cactus-identification", "aptos2019-blindness-detection", "denoising-dirty-documents",
    "detecting-insults-in-social-commentary", "dog-breed-identification",
    "dogs-vs-cats-redux-kernels-edition", "histopathologic-cancer-detection",
    "jigsaw-toxic-comment-classification-challenge", "leaf-classification", "mlsp-2013-birds",
    "new-york-city-taxi-fare-prediction", "nomad2018-predict-transparent-conductors",
    "plant-pathology-2020-fgvc7", "random-acts-of-pizza", "ranzcr-clip-catheter-line-classification",
    "siim-isic-melanoma-classification", "spooky-author-identification",
    "tabular-playground-series-dec-2021", "tabular-playground-series-may-2022",
    "text-normalization-challenge-english-language", "text-normalization-challenge-russian-language",
    "the-icml-2013-whale-challenge-right-whale-redux",
)

# (metric, task_type) for MLE-bench-Lite competitions whose grader is a generic column metric
# over the sample-submission layout (column-wise mean ROC AUC included).
KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "aerial-cactus-identification": ("roc_auc", "image"),
    "histopathologic-cancer-detection": ("roc_auc", "image"),
    "plant-pathology-2020-fgvc7": ("roc_auc", "image"),
    "jigsaw-toxic-comment-classification-challenge": ("roc_auc", "binary"),
    "random-acts-of-pizza": ("roc_auc", "binary"),
    "tabular-playground-series-may-2022": ("roc_auc", "binary"),
    "tabular-playground-series-dec-2021": ("accuracy", "multiclass"),
    "spooky-author-identification": ("log_loss", "multiclass"),
    "leaf-classification": ("log_loss", "multiclass"),
    "dog-breed-identification": ("log_loss", "image"),
    "new-york-city-taxi-fare-prediction": ("rmse", "regression"),
}

# MLE-bench grader names (config.yaml `grader.name`) that map onto our metrics.
GRADER_ALIASES = {
    "auc-roc": "roc_auc", "auc": "roc_auc", "roc-auc": "roc_auc", "accuracy": "accuracy",
    "log-loss": "log_loss", "multi-class-log-loss": "log_loss", "logloss": "log_loss",
    "rmse": "rmse", "mae": "mae", "macro-f1": "macro_f1", "f1-macro": "macro_f1", "mcrmse": "mcrmse",
}


def _read_config(meta_dir: Path) -> dict:
    path = meta_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _pick_answers(private: Path, config: dict) -> str:
    named = (config.get("dataset") or {}).get("answers")
    if named and (private / Path(named).name).is_file():
        return Path(named).name
    for candidate in ("answers.csv", "test.csv"):
        if (private / candidate).is_file():
            return candidate
    csvs = sorted(p.name for p in private.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise FileNotFoundError(
        f"cannot tell the answers file in {private}: found {csvs}; expected answers.csv, test.csv "
        "or config.yaml dataset.answers"
    )


def _pick_sample(public: Path, config: dict) -> str:
    named = (config.get("dataset") or {}).get("sample_submission")
    if named and (public / Path(named).name).is_file():
        return Path(named).name
    if (public / "sample_submission.csv").is_file():
        return "sample_submission.csv"
    csvs = sorted(p.name for p in public.glob("*.csv") if "sample" in p.name.lower())
    if len(csvs) == 1:
        return csvs[0]
    raise FileNotFoundError(f"no sample submission in {public}: expected sample_submission.csv")


def read_leaderboard(path: Path) -> tuple[float, ...]:
    """Team scores from a Kaggle/MLE-bench leaderboard CSV (`score` column; blanks dropped)."""
    frame = pd.read_csv(path)
    if "score" not in frame.columns:
        raise ValueError(f"{path} has columns {list(frame.columns)[:10]}; expected a 'score' column")
    scores = pd.to_numeric(frame["score"], errors="coerce").to_numpy(float)
    return tuple(float(s) for s in scores[np.isfinite(scores)])


def _infer_task_type(metric: str, n_targets: int) -> str:
    kind = get_metric(metric).kind
    if kind == "value":
        return "multioutput" if n_targets > 1 else "regression"
    if kind == "probability" and n_targets == 1:
        return "binary"
    return "multiclass"


def load_mlebench_competition(
    data_dir: Path | str,
    comp_id: str,
    *,
    competitions_dir: Path | str | None = None,
    metric: str | None = None,
    task_type: str | None = None,
) -> Competition:
    """One competition from a prepared MLE-bench folder (layout in the module docstring).

    Args:
      data_dir: the folder holding `<comp_id>/prepared/{public,private}`.
      comp_id: the MLE-bench competition id.
      competitions_dir: where `<comp_id>/leaderboard.csv` (and description.md, config.yaml)
        live; defaults to `data_dir`.
      metric: a name in METRICS; default from KNOWN_METRICS, else config.yaml's grader name.
      task_type: default from KNOWN_METRICS, else inferred from the metric and target count.
    """
    root = Path(data_dir).expanduser() / comp_id
    public, private = root / "prepared" / "public", root / "prepared" / "private"
    for folder in (public, private):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{comp_id}: {folder} is missing; expected a prepared MLE-bench folder "
                f"<data_dir>/{comp_id}/prepared/{{public,private}} (run `mlebench prepare`)"
            )
    meta_dir = Path(competitions_dir).expanduser() / comp_id if competitions_dir else root
    config = _read_config(meta_dir)
    known_metric, known_type = KNOWN_METRICS.get(comp_id, (None, None))
    grader = ((config.get("grader") or {}).get("name") or "").lower()
    metric = metric or known_metric or GRADER_ALIASES.get(grader)
    if metric is None:
        raise ValueError(
            f"{comp_id}: no metric known (grader {grader!r}); pass metric= one of "
            f"{sorted(METRICS)}"
        )
    spec = get_metric(metric)
    sample_file = _pick_sample(public, config)
    columns = list(pd.read_csv(public / sample_file, nrows=0).columns)
    if len(columns) < 2:
        raise ValueError(f"{comp_id}: {sample_file} has columns {columns}; expected an id and targets")
    lb_path = next(
        (p for p in (meta_dir / "leaderboard.csv", root / "leaderboard.csv") if p.is_file()), None
    )
    if lb_path is None:
        raise FileNotFoundError(f"{comp_id}: no leaderboard.csv in {meta_dir} or {root}")
    description_path = next(
        (p for p in (meta_dir / "description.md", public / "description.md") if p.is_file()), None
    )
    return Competition(
        comp_id=comp_id,
        description=description_path.read_text() if description_path else f"# {comp_id}\n",
        public_dir=public,
        private_dir=private,
        metric=metric,
        higher_is_better=spec.higher_is_better,
        id_column=columns[0],
        target_columns=tuple(columns[1:]),
        leaderboard=read_leaderboard(lb_path),
        task_type=task_type or known_type or _infer_task_type(metric, len(columns) - 1),
        answers_file=_pick_answers(private, config),
        sample_submission_file=sample_file,
    )


def load_mlebench_suite(
    data_dir: Path | str,
    comp_ids: Sequence[str] | str = "lite",
    *,
    competitions_dir: Path | str | None = None,
) -> list[Competition]:
    """Several MLE-bench competitions.

    comp_ids: a list of ids; "lite" for the MLE-bench-Lite competitions in KNOWN_METRICS that
    are prepared under data_dir; "all" for every prepared folder under data_dir.
    """
    root = Path(data_dir).expanduser()
    if isinstance(comp_ids, str):
        prepared = sorted(p.parent.parent.name for p in root.glob("*/prepared/public"))
        if comp_ids == "lite":
            comp_ids = [c for c in MLEBENCH_LITE if c in KNOWN_METRICS and c in prepared]
        elif comp_ids == "all":
            comp_ids = prepared
        else:
            raise ValueError(f"comp_ids={comp_ids!r}, expected a list of ids, 'lite' or 'all'")
    return [load_mlebench_competition(root, c, competitions_dir=competitions_dir) for c in comp_ids]
