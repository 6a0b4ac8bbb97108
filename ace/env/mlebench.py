"""Competitions from a prepared MLE-bench data folder, graded the way MLE-bench grades them.

Expected layout (what `mlebench prepare` writes, plus the competition's files from the
mle-bench repository's `mlebench/competitions/<id>/` folder):

    <data_dir>/<id>/prepared/public/    what the agent sees (train data, test data, a sample)
    <data_dir>/<id>/prepared/private/   the answers (and for some, the sample submission)
    <meta>/<id>/leaderboard.csv         Kaggle's final leaderboard, best first, `score` column
    <meta>/<id>/config.yaml             dataset.answers, dataset.sample_submission, grader.name
    <meta>/<id>/description.md          the task (or public/description.md)

where <meta> is `competitions_dir` when given, else `data_dir` itself.

The metric comes from config.yaml's `grader.name` (`ace.env.metrics.GRADER_METRICS`). How each of
the 22 MLE-bench-Lite competitions reads its files, pairs rows and judges validity is one row of
`LITE_SPECS`, each with the behaviour of its `grade.py` that it follows. Any other competition
gets the sample submission's layout (first column the id) and `MLEBENCH_RULES`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ace.env.metrics import get_metric, metric_for_grader
from ace.env.task import Competition, SubmissionRules

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

# What MLE-bench's graders share: the target columns must be there, other columns are ignored,
# any value of the answers' type is a label (unknown classes are wrong, not invalid), and the
# score is rounded to 5 decimals (`Grader.__call__`) before it is ranked.
MLEBENCH_RULES = SubmissionRules(extra_columns=True, labels="any", round_digits=5)
_EXACT_COLUMNS = dataclasses.replace(MLEBENCH_RULES, extra_columns=False)


@dataclass(frozen=True)
class LiteSpec:
    """How MLE-bench prepares and grades one competition.

    Attributes:
      grader: config.yaml `grader.name` (the metric, via GRADER_METRICS).
      task_type: one of `ace.env.task.TASK_TYPES`.
      id_column: the column rows are identified by.
      answers: the answers file in prepared/private/.
      sample: the sample submission, relative to prepared/ (MLE-bench's config.yaml).
      target_columns: the scored columns; None: the sample's columns other than the id.
      agent_sample: the sample the agent sees in public/ when `sample` is private (may be zipped).
      rules: how submissions are checked and paired (`SubmissionRules`).
      follows: the behaviour of the competition's grade.py that the rules reproduce.
    """

    grader: str
    task_type: str
    id_column: str
    answers: str
    sample: str = "public/sample_submission.csv"
    target_columns: tuple[str, ...] | None = None
    agent_sample: str | None = None
    rules: SubmissionRules = MLEBENCH_RULES
    follows: str = "target columns numeric, same length, same ids after sorting by id"


def _auc(id_column: str, answers: str = "test.csv", sample: str = "public/sample_submission.csv",
         task_type: str = "image") -> LiteSpec:
    return LiteSpec("auc-roc", task_type, id_column, answers, sample,
                    follows="prepare_for_auroc_metric: numeric target in [0, 1], same length, same ids")


def _text_normalization(lang: str) -> LiteSpec:
    return LiteSpec(
        "accuracy", "text", "id", "answers.csv", "private/sample_submission.csv", ("after",),
        agent_sample=f"{lang}_sample_submission_2.csv.zip",
        follows="same length, same ids after sorting; `after` compared with astype(str) on both sides, "
                "so NA-like tokens read by pandas compare as 'nan'; the sample lives in private/")


LITE_SPECS: dict[str, LiteSpec] = {
    "aerial-cactus-identification": _auc("id"),
    "aptos2019-blindness-detection": LiteSpec(
        "quadratic-weighted-kappa", "image", "id_code", "test.csv",
        follows="same set of id_code; cohen_kappa_score(weights='quadratic') on any numeric labels"),
    "denoising-dirty-documents": LiteSpec(
        "root_mean_squared_error", "image", "id", "answers.csv", "public/sampleSubmission.csv",
        follows="`value` castable to float, same length, same ids after sorting; RMSE over pixels"),
    "detecting-insults-in-social-commentary": LiteSpec(
        "auc-roc", "text", "Comment", "test.csv", "public/sample_submission_null.csv", ("Insult",),
        follows="the comment text is the id (copies pair in order); Date and Usage are not scored"),
    "dog-breed-identification": LiteSpec(
        "multi-class-log-loss", "image", "id", "test.csv",
        rules=dataclasses.replace(MLEBENCH_RULES, sum_to_one=True),
        follows="all 120 breed columns (extra columns ignored), rows sum to 1 (atol 1e-6), values in "
                "[0, 1]; log_loss against the one-hot answers"),
    "dogs-vs-cats-redux-kernels-edition": LiteSpec(
        "log-loss", "image", "id", "answers.csv",
        follows="same id set and length, label in [0, 1]; binary log_loss, no row-sum rule"),
    "histopathologic-cancer-detection": _auc("id", "answers.csv"),
    "jigsaw-toxic-comment-classification-challenge": LiteSpec(
        "column-wise ROC AUC", "text", "id", "test.csv",
        rules=dataclasses.replace(_EXACT_COLUMNS, scored_rows="nonnegative_answers", columns_by_position=True),
        follows="answer rows marked -1 are dropped; every non-id submission column, in file order, is "
                "scored against the answers' columns (so extra columns are invalid); macro ROC AUC"),
    "leaf-classification": LiteSpec(
        "multi-class-log-loss", "multiclass", "id", "test.csv",
        rules=dataclasses.replace(_EXACT_COLUMNS, sum_to_one=True),
        follows="exactly id + the 99 species columns, rows sum to 1 (atol 1e-6), values in [0, 1]"),
    "mlsp-2013-birds": _auc("Id", "answers.csv", task_type="audio"),
    "new-york-city-taxi-fare-prediction": LiteSpec(
        "root-mean-squared-error", "regression", "key", "test.csv",
        rules=dataclasses.replace(MLEBENCH_RULES, pairing="sorted"),
        follows="both sorted by key and paired in that order; keys are not compared"),
    "nomad2018-predict-transparent-conductors": LiteSpec(
        "mean-column-wise-rmsle", "multioutput", "id", "test.csv",
        rules=dataclasses.replace(MLEBENCH_RULES, pairing="position"),
        follows="rows paired by position (no sort, ids unchecked); mean of the two columns' RMSLE"),
    "plant-pathology-2020-fgvc7": LiteSpec(
        "mean-column-wise-roc-auc", "image", "image_id", "test.csv", rules=_EXACT_COLUMNS,
        follows="exactly image_id + the four classes, same ids after sorting; mean of column AUCs"),
    "random-acts-of-pizza": _auc("request_id", sample="public/sampleSubmission.csv", task_type="text"),
    "ranzcr-clip-catheter-line-classification": LiteSpec(
        "auc-roc", "image", "StudyInstanceUID", "test.csv",
        follows="the classes of MLE-bench v1's classes.py, which are the sample's columns (9: the "
                "answers' 'CVC - Normal' and 'Swan Ganz Catheter Present' are not scored); mean of "
                "column AUCs"),
    "siim-isic-melanoma-classification": _auc("image_name"),
    "spooky-author-identification": LiteSpec(
        "multi-class-log-loss", "text", "id", "test.csv",
        rules=dataclasses.replace(_EXACT_COLUMNS, sum_to_one=True),
        follows="shape exactly (rows, 4), rows sum to 1 (atol 1e-6), values in [0, 1]; log_loss"),
    "tabular-playground-series-dec-2021": LiteSpec(
        "multi-class-classification-accuracy", "multiclass", "Id", "test.csv",
        follows="prepare_for_accuracy_metric: same length and ids after sorting; any label value"),
    "tabular-playground-series-may-2022": _auc("id", task_type="binary"),
    "text-normalization-challenge-english-language": _text_normalization("en"),
    "text-normalization-challenge-russian-language": _text_normalization("ru"),
    "the-icml-2013-whale-challenge-right-whale-redux": _auc(
        "clip", sample="public/sampleSubmission.csv", task_type="audio"),
}


def _read_config(meta_dir: Path) -> dict:
    path = meta_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _in_prepared(named: str | None) -> str | None:
    """config.yaml paths ("<id>/prepared/private/test.csv") relative to prepared/."""
    if not named:
        return None
    parts = Path(named).parts
    return str(Path(*parts[parts.index("prepared") + 1:])) if "prepared" in parts else None


def _pick_answers(private: Path, named: str | None) -> str:
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


def _pick_sample(prepared: Path, named: str | None) -> Path:
    if named and (prepared / named).is_file():
        return prepared / named
    public = prepared / "public"
    if (public / "sample_submission.csv").is_file():
        return public / "sample_submission.csv"
    csvs = sorted(p for p in public.glob("*.csv") if "sample" in p.name.lower())
    if len(csvs) == 1:
        return csvs[0]
    raise FileNotFoundError(f"no sample submission in {public}: expected sample_submission.csv "
                            "or config.yaml dataset.sample_submission")


def read_leaderboard(path: Path) -> tuple[float, ...]:
    """Team scores from a Kaggle/MLE-bench leaderboard CSV (`score` column; blanks dropped), in
    file order (best first on MLE-bench's leaderboards)."""
    head = path.read_bytes()[:200]
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(f"{path} is a Git LFS pointer, not the leaderboard: run `git lfs pull` in the "
                         "mle-bench checkout that competitions_dir points into")
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


def _check_direction(comp_id: str, board: tuple[float, ...], metric: str) -> None:
    """MLE-bench reads the direction from the leaderboard (first row better than the last); it
    must agree with the metric's, or medals would be computed upside down."""
    if len(board) < 2 or board[0] == board[-1]:
        return
    lower_first = board[0] < board[-1]
    if lower_first == get_metric(metric).higher_is_better:
        raise ValueError(
            f"{comp_id}: leaderboard.csv runs from {board[0]:g} to {board[-1]:g}, so MLE-bench would take "
            f"{'lower' if lower_first else 'higher'} as better, but {metric} is "
            f"{'higher' if get_metric(metric).higher_is_better else 'lower'}-is-better; expected the "
            "leaderboard best first")


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
      competitions_dir: where `<comp_id>/leaderboard.csv` (and config.yaml, description.md) live;
        defaults to `data_dir`.
      metric: a name in `ace.env.metrics.METRICS`; default: config.yaml's grader, else LITE_SPECS'.
      task_type: default from LITE_SPECS, else inferred from the metric and target count.
    """
    root = Path(data_dir).expanduser() / comp_id
    prepared = root / "prepared"
    public, private = prepared / "public", prepared / "private"
    for folder in (public, private):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{comp_id}: {folder} is missing; expected a prepared MLE-bench folder "
                f"<data_dir>/{comp_id}/prepared/{{public,private}} (run `mlebench prepare`)"
            )
    meta_dir = Path(competitions_dir).expanduser() / comp_id if competitions_dir else root
    config = _read_config(meta_dir)
    spec = LITE_SPECS.get(comp_id)
    grader = (config.get("grader") or {}).get("name") or (spec.grader if spec else None)
    if metric is None:
        if grader is None:
            raise ValueError(f"{comp_id}: no metric known (no config.yaml grader.name); pass metric= a name in "
                             "ace.env.metrics.METRICS")
        try:
            metric = metric_for_grader(grader)
        except KeyError as err:
            raise ValueError(f"{comp_id}: {err.args[0]}; pass metric= a name in ace.env.metrics.METRICS") from None
    get_metric(metric)
    dataset = config.get("dataset") or {}
    sample_path = _pick_sample(prepared, _in_prepared(dataset.get("sample_submission"))
                               or (spec.sample if spec else None))
    columns = [str(c) for c in pd.read_csv(sample_path, nrows=0).columns]
    id_column = spec.id_column if spec else columns[0]
    if id_column not in columns:
        raise ValueError(f"{comp_id}: {sample_path.name} has columns {columns[:10]}; expected the id column "
                         f"{id_column!r}")
    targets = (spec.target_columns if spec and spec.target_columns else
               tuple(c for c in columns if c != id_column))
    if not targets:
        raise ValueError(f"{comp_id}: {sample_path.name} has columns {columns}; expected an id and targets")
    if sample_path.parent == public:
        agent_sample = sample_path.name
    elif spec and spec.agent_sample and (public / spec.agent_sample).is_file():
        agent_sample = spec.agent_sample
    else:
        raise FileNotFoundError(f"{comp_id}: the sample submission {sample_path} is not in public/ and no "
                                f"public copy was found (expected {spec.agent_sample if spec else None})")
    lb_path = next((p for p in (meta_dir / "leaderboard.csv", root / "leaderboard.csv") if p.is_file()), None)
    if lb_path is None:
        raise FileNotFoundError(f"{comp_id}: no leaderboard.csv in {meta_dir} or {root}")
    board = read_leaderboard(lb_path)
    _check_direction(comp_id, board, metric)
    description_path = next(
        (p for p in (meta_dir / "description.md", public / "description.md") if p.is_file()), None
    )
    return Competition(
        comp_id=comp_id,
        description=description_path.read_text() if description_path else f"# {comp_id}\n",
        public_dir=public,
        private_dir=private,
        metric=metric,
        higher_is_better=get_metric(metric).higher_is_better,
        id_column=id_column,
        target_columns=targets,
        leaderboard=board,
        task_type=task_type or (spec.task_type if spec else _infer_task_type(metric, len(targets))),
        answers_file=_pick_answers(private, _in_prepared(dataset.get("answers")) or (spec.answers if spec else None)),
        sample_submission_file=agent_sample,
        rules=spec.rules if spec else MLEBENCH_RULES,
    )


def load_mlebench_suite(
    data_dir: Path | str,
    comp_ids: Sequence[str] | str = "lite",
    *,
    competitions_dir: Path | str | None = None,
) -> list[Competition]:
    """Several MLE-bench competitions.

    comp_ids: a list of ids; "lite" for the MLEBENCH_LITE competitions prepared under data_dir;
    "all" for every prepared folder under data_dir.
    """
    root = Path(data_dir).expanduser()
    if isinstance(comp_ids, str):
        prepared = sorted(p.parent.parent.name for p in root.glob("*/prepared/public"))
        if comp_ids == "lite":
            comp_ids = [c for c in MLEBENCH_LITE if c in prepared]
        elif comp_ids == "all":
            comp_ids = prepared
        else:
            raise ValueError(f"comp_ids={comp_ids!r}, expected a list of ids, 'lite' or 'all'")
    return [load_mlebench_competition(root, c, competitions_dir=competitions_dir) for c in comp_ids]
