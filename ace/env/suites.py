"""The built-in offline suite: 18 competitions made from data that scikit-learn ships.

Every competition is generated deterministically from the suite seed (bundled datasets are
shuffled and split with it; generators draw from it) and written to
`<root>/builtin/seed-<seed>/<comp_id>/` where root is `cache_dir`, else `$ACE_CACHE_DIR`, else
`~/.cache/ace`:

    public/   train.csv (id, features, targets), test.csv (id, features),
              sample_submission.csv (a constant, valid prediction), description.md
    private/  answers.csv (same layout as a submission)
    meta.json competition fields, leaderboard, reference scores, SUITE_VERSION

The leaderboard of each competition holds the scores of its whole reference-solution
population (`ace.env.reference_solutions`, >= 50 scripts), run in-process at build time.
A competition is rebuilt when its meta.json is missing or was written by another
SUITE_VERSION; builds go to a temporary folder renamed into place, so concurrent builders
never see half-written data.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ace.env.grading import score_submission
from ace.env.metrics import get_metric
from ace.env.reference_solutions import reference_scripts, run_in_process
from ace.env.task import Competition, SubmissionRules

# Bump when data generation, the reference population or the file layout changes.
# 2: scikit-learn's metrics (log loss clipped at float64 eps, not renormalised), rows that must sum to one.
# 3: reference probabilities clipped to [1e-3, 1 - 1e-3] under every metric, not only log loss.
SUITE_VERSION = 3
MIN_LEADERBOARD = 50
SPLITS = ("train", "held_out", "all")


@dataclass(frozen=True)
class CompetitionData:
    """Generated tables of one competition, before they are written to disk."""

    train: pd.DataFrame  # [N_train, 1 + F + T]
    test: pd.DataFrame  # [N_test, 1 + F]
    answers: pd.DataFrame  # [N_test, 1 + K]
    sample_submission: pd.DataFrame  # [N_test, 1 + K]
    target_columns: tuple[str, ...]  # submission columns (K)


@dataclass(frozen=True)
class BuiltinSpec:
    """How to make one built-in competition.

    make(rng) returns (X [N, F] float, y [N] labels or [N, T] floats, feature names,
    train target names [T]).
    """

    comp_id: str
    split: str
    task_type: str
    metric: str
    title: str
    story: str
    make: Callable[[np.random.Generator], tuple]
    test_fraction: float = 0.35


def _state(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _bundled(loader_name: str, target: str, relabel=None, subsample: int | None = None):
    def make(rng):
        from sklearn import datasets

        ds = getattr(datasets, loader_name)()
        X, y = np.asarray(ds.data, float), np.asarray(ds.target)
        names = [str(n).replace(" ", "_") for n in getattr(ds, "feature_names", [])]
        if not names or len(names) != X.shape[1]:
            names = [f"px_{i}" for i in range(X.shape[1])]
        if subsample is not None:
            keep = rng.permutation(len(X))[:subsample]
            X, y = X[keep], y[keep]
        if relabel is not None:
            y = relabel(ds, y)
        targets = [target] if y.ndim == 1 else [f"{target}_{n}" for n in ds.target_names]
        return X, y, names, targets

    return make


def _generated(fn_name: str, target: str, relabel=None, extra_noise: int = 0, **kwargs):
    def make(rng):
        from sklearn import datasets

        X, y = getattr(datasets, fn_name)(random_state=_state(rng), **kwargs)
        if extra_noise:
            X = np.hstack([X, rng.normal(size=(len(X), extra_noise))])
        if relabel is not None:
            y = relabel(y)
        names = [f"f{i}" for i in range(X.shape[1])]
        targets = [target] if np.ndim(y) == 1 else [f"{target}_{i}" for i in range(y.shape[1])]
        return X, y, names, targets

    return make


BUILTIN_SPECS: tuple[BuiltinSpec, ...] = (
    BuiltinSpec("iris-species", "train", "multiclass", "accuracy", "Iris species",
                "Predict the species of an iris flower from four measurements.",
                _bundled("load_iris", "species", lambda ds, y: ds.target_names[y]), 0.4),
    BuiltinSpec("wine-cultivar", "train", "multiclass", "log_loss", "Wine cultivar",
                "Give the probability of each of three cultivars for a wine's chemical analysis.",
                _bundled("load_wine", "cultivar", lambda ds, y: np.array([f"cultivar_{v}" for v in y]))),
    BuiltinSpec("breast-cancer-diagnosis", "train", "binary", "roc_auc", "Breast cancer diagnosis",
                "Give the probability that a breast mass is malignant (1) from cell-nucleus features.",
                _bundled("load_breast_cancer", "malignant", lambda ds, y: 1 - y)),
    BuiltinSpec("digits-recognition", "train", "image", "accuracy", "Handwritten digits",
                "Recognise the digit (0-9) in an 8x8 grey-level image given as 64 pixel columns.",
                _bundled("load_digits", "digit", subsample=600)),
    BuiltinSpec("diabetes-progression", "train", "regression", "rmse", "Diabetes progression",
                "Predict a quantitative measure of disease progression one year after baseline.",
                _bundled("load_diabetes", "progression")),
    BuiltinSpec("friedman-response", "train", "regression", "mae", "Friedman response",
                "Predict a smooth non-linear response of five relevant and five irrelevant inputs.",
                _generated("make_friedman1", "response", n_samples=600, noise=1.0)),
    BuiltinSpec("hastie-signal", "train", "binary", "accuracy", "Hastie signal",
                "Classify points as signal (1) or background (0); the boundary is a sphere in 10-D.",
                _generated("make_hastie_10_2", "signal", lambda y: (y > 0).astype(int), n_samples=800)),
    BuiltinSpec("moons-noisy", "train", "binary", "log_loss", "Noisy moons",
                "Give the probability that a point belongs to the upper moon (1); four inputs are noise.",
                _generated("make_moons", "upper", None, 4, n_samples=600, noise=0.3)),
    BuiltinSpec("synthetic-multiclass", "train", "multiclass", "macro_f1", "Synthetic classes",
                "Assign each row to one of four classes from twenty partly informative features.",
                _generated("make_classification", "label", n_samples=700, n_features=20,
                           n_informative=6, n_redundant=4, n_classes=4, flip_y=0.05)),
    BuiltinSpec("sparse-regression", "train", "regression", "rmse", "Sparse linear response",
                "Predict a noisy linear response of which only eight of forty inputs matter.",
                _generated("make_regression", "y", n_samples=500, n_features=40,
                           n_informative=8, noise=10.0)),
    BuiltinSpec("multi-target-regression", "train", "multioutput", "mcrmse", "Three targets",
                "Predict three correlated responses from fifteen inputs.",
                _generated("make_regression", "target", n_samples=500, n_features=15,
                           n_informative=6, n_targets=3, noise=5.0, effective_rank=5)),
    BuiltinSpec("gaussian-quantiles", "train", "multiclass", "accuracy", "Gaussian shells",
                "Classify points into three concentric shells of a 4-D Gaussian.",
                _generated("make_gaussian_quantiles", "shell", n_samples=600, n_features=4,
                           n_classes=3)),
    BuiltinSpec("digits-parity", "held_out", "image", "roc_auc", "Odd digits",
                "Give the probability that the digit in an 8x8 image is odd (1).",
                _bundled("load_digits", "odd", lambda ds, y: (y % 2).astype(int), subsample=600)),
    BuiltinSpec("twin-response", "held_out", "multioutput", "mcrmse", "Twin responses",
                "Predict two responses, one linear and one folded (absolute value), from ten inputs.",
                _generated("make_regression", "response",
                           lambda y: np.column_stack([y[:, 0], np.abs(y[:, 1])]),
                           n_samples=500, n_features=10, n_informative=5, n_targets=2, noise=8.0)),
    BuiltinSpec("circles-ring", "held_out", "binary", "roc_auc", "Inner ring",
                "Give the probability that a point lies on the inner circle (1); two inputs are noise.",
                _generated("make_circles", "inner", None, 2, n_samples=600, noise=0.15, factor=0.5)),
    BuiltinSpec("friedman-product", "held_out", "regression", "rmse", "Friedman impedance",
                "Predict the impedance of an alternating-current circuit from four inputs.",
                _generated("make_friedman2", "impedance", n_samples=600, noise=10.0)),
    BuiltinSpec("imbalanced-screening", "held_out", "binary", "macro_f1", "Imbalanced screening",
                "Flag the rare positive cases (1); about 15% of rows are positive.",
                _generated("make_classification", "positive", n_samples=800, n_features=12,
                           n_informative=5, weights=[0.85, 0.15], flip_y=0.02)),
    BuiltinSpec("friedman-arctan", "held_out", "regression", "mae", "Friedman phase",
                "Predict the phase angle of an alternating-current circuit from four inputs.",
                _generated("make_friedman3", "phase", n_samples=600, noise=0.05)),
)
_SPECS_BY_ID = {s.comp_id: s for s in BUILTIN_SPECS}


def _rng(seed: int, comp_id: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(comp_id.encode())]))


def make_competition_data(spec: BuiltinSpec, seed: int) -> CompetitionData:
    """Generate the tables of one built-in competition; a pure function of (spec, seed)."""
    rng = _rng(seed, spec.comp_id)
    X, y, features, targets = spec.make(rng)
    n = len(X)
    order = rng.permutation(n)
    n_test = int(round(n * spec.test_fraction))
    test_rows, train_rows = order[:n_test], order[n_test:]
    # Ids are a shuffled range so that row order and id carry no label information.
    ids = rng.permutation(n) + 1000
    feats = pd.DataFrame(np.round(X, 6), columns=features)
    feats.insert(0, "id", ids)
    y2 = np.asarray(y).reshape(n, -1) if np.ndim(y) > 1 else np.asarray(y)
    labels = pd.DataFrame(y2 if y2.ndim == 2 else {targets[0]: y2}, columns=targets)
    if y2.ndim == 2:
        labels = labels.round(6)
    train = pd.concat([feats, labels], axis=1).iloc[train_rows].sort_values("id").reset_index(drop=True)
    test_full = pd.concat([feats, labels], axis=1).iloc[test_rows].sort_values("id").reset_index(drop=True)
    test = test_full[["id", *features]]
    kind = get_metric(spec.metric).kind
    if kind == "probability" and y2.ndim == 1 and not np.isin(y2, [0, 1]).all():
        # Multi-class probabilities: one submission column per class, one-hot answers.
        classes = sorted(pd.unique(y2).astype(str))
        onehot = (test_full[targets[0]].astype(str).to_numpy()[:, None] == np.array(classes)).astype(int)
        answers = pd.DataFrame(onehot, columns=classes)
        sample = pd.DataFrame(np.full(onehot.shape, round(1.0 / len(classes), 6)), columns=classes)
        target_columns = tuple(classes)
    else:
        answers = test_full[targets].copy()
        if kind == "label":
            constant = sorted(pd.unique(train[targets[0]]))[0]
            sample = pd.DataFrame({targets[0]: [constant] * len(test)})
        elif kind == "probability":
            sample = pd.DataFrame({targets[0]: [0.5] * len(test)})
        else:
            sample = pd.DataFrame(0.0, index=range(len(test)), columns=targets)
        target_columns = tuple(targets)
    answers.insert(0, "id", test["id"].to_numpy())
    sample.insert(0, "id", test["id"].to_numpy())
    return CompetitionData(train, test, answers, sample, target_columns)


def _description(spec: BuiltinSpec, data: CompetitionData) -> str:
    metric = get_metric(spec.metric)
    direction = "higher is better" if metric.higher_is_better else "lower is better"
    train_targets = [c for c in data.train.columns if c not in data.test.columns]
    n_feat = data.test.shape[1] - 1
    if metric.kind == "probability" and len(data.target_columns) > 1:
        fmt = f"one probability column per class ({', '.join(data.target_columns)}); rows are renormalised"
    elif metric.kind == "probability":
        fmt = f"`{data.target_columns[0]}`: the probability that it is 1"
    elif metric.kind == "label":
        fmt = f"`{data.target_columns[0]}`: a predicted label, one of the labels seen in train.csv"
    else:
        fmt = ", ".join(f"`{c}`" for c in data.target_columns) + ": real-valued predictions"
    example = data.sample_submission.head(3).to_csv(index=False)
    return (
        f"# {spec.title}\n\n{spec.story}\n\n"
        f"Task type: {spec.task_type}.\n\n## Data\n"
        f"- `data/train.csv`: {len(data.train)} rows; `id`, {n_feat} numeric features, "
        f"target column(s) {', '.join(f'`{c}`' for c in train_targets)}.\n"
        f"- `data/test.csv`: {len(data.test)} rows; `id` and the same features, no targets.\n"
        f"- `data/sample_submission.csv`: the expected layout, with a constant prediction.\n\n"
        f"## Evaluation\nMetric: **{spec.metric}** ({direction}).\n\n"
        f"## Submission\nWrite `submission/submission.csv` with columns `id`, {fmt}; "
        f"one row per test id.\n\n```\n{example}```\n"
    )


def cache_root(seed: int, cache_dir: Path | str | None = None) -> Path:
    """Folder of the built-in suite for `seed`: <root>/builtin/seed-<seed>."""
    root = cache_dir or os.environ.get("ACE_CACHE_DIR") or Path.home() / ".cache" / "ace"
    return Path(root).expanduser() / "builtin" / f"seed-{seed}"


def _competition_from_meta(comp_dir: Path, meta: dict) -> Competition:
    return Competition(
        comp_id=meta["comp_id"],
        description=(comp_dir / "public" / "description.md").read_text(),
        public_dir=comp_dir / "public",
        private_dir=comp_dir / "private",
        metric=meta["metric"],
        higher_is_better=meta["higher_is_better"],
        id_column="id",
        target_columns=tuple(meta["target_columns"]),
        leaderboard=tuple(meta["leaderboard"]),
        task_type=meta["task_type"],
        rules=builtin_rules(meta["metric"], len(meta["target_columns"])),
    )


def builtin_rules(metric: str, n_targets: int) -> SubmissionRules:
    """The built-in suite's rules: strict (`SubmissionRules()` defaults), and, as on MLE-bench's
    log-loss competitions, class probabilities that sum to one."""
    return SubmissionRules(sum_to_one=metric == "log_loss" and n_targets > 1)


def _build(spec: BuiltinSpec, seed: int, comp_dir: Path) -> None:
    data = make_competition_data(spec, seed)
    comp_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.comp_id}.", dir=comp_dir.parent))
    try:
        public, private = tmp / "public", tmp / "private"
        public.mkdir()
        private.mkdir()
        data.train.to_csv(public / "train.csv", index=False)
        data.test.to_csv(public / "test.csv", index=False)
        data.sample_submission.to_csv(public / "sample_submission.csv", index=False)
        (public / "description.md").write_text(_description(spec, data))
        data.answers.to_csv(private / "answers.csv", index=False)
        metric = get_metric(spec.metric)
        meta = {
            "suite_version": SUITE_VERSION, "seed": seed, "comp_id": spec.comp_id,
            "split": spec.split, "task_type": spec.task_type, "metric": spec.metric,
            "higher_is_better": metric.higher_is_better,
            "target_columns": list(data.target_columns), "leaderboard": [],
        }
        unranked = _competition_from_meta(tmp, meta)
        scores: dict[str, float] = {}
        failures: dict[str, str] = {}
        for script in reference_scripts(unranked, seed=seed):
            sub_path = tmp / "scratch" / f"{script.name}.csv"
            sub_path.parent.mkdir(exist_ok=True)
            try:
                run_in_process(script, public).to_csv(sub_path, index=False)
            except Exception as exc:  # noqa: BLE001 - a failing reference is reported below
                failures[script.name] = f"{type(exc).__name__}: {exc}"
                continue
            score, invalid = score_submission(unranked, sub_path)
            if invalid is not None:
                failures[script.name] = f"invalid: {invalid.reason}: {invalid.detail}"
            else:
                scores[script.name] = score
        if len(scores) < MIN_LEADERBOARD:
            raise RuntimeError(
                f"{spec.comp_id}: only {len(scores)} reference solutions scored "
                f"(need {MIN_LEADERBOARD}); failures: {failures}"
            )
        shutil.rmtree(tmp / "scratch")
        ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=metric.higher_is_better)
        meta["leaderboard"] = [s for _, s in ranked]
        meta["reference_scores"] = dict(ranked)
        meta["reference_failures"] = failures
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if comp_dir.exists():
            shutil.rmtree(comp_dir, ignore_errors=True)
        try:
            tmp.rename(comp_dir)
        except OSError:
            # Another process renamed its identical build into place first; keep that one.
            if not (comp_dir / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(comp_dir: Path) -> dict | None:
    try:
        meta = json.loads((comp_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("suite_version") != SUITE_VERSION:
        return None
    needed = [comp_dir / "public" / f for f in ("train.csv", "test.csv", "sample_submission.csv",
                                                 "description.md")] + [comp_dir / "private" / "answers.csv"]
    return meta if all(p.is_file() for p in needed) else None


def reference_leaderboard(comp_id: str, *, seed: int = 0, cache_dir: Path | str | None = None) -> dict[str, float]:
    """Score of every reference solution of a built-in competition, best first."""
    get_competition(comp_id, seed=seed, cache_dir=cache_dir)
    meta = _read_meta(cache_root(seed, cache_dir) / comp_id)
    return dict(meta["reference_scores"])


def get_competition(comp_id: str, *, seed: int = 0, cache_dir: Path | str | None = None) -> Competition:
    """One built-in competition, built (with its leaderboard) on first use and cached on disk."""
    if comp_id not in _SPECS_BY_ID:
        raise KeyError(f"unknown built-in competition {comp_id!r}, expected one of {sorted(_SPECS_BY_ID)}")
    comp_dir = cache_root(seed, cache_dir) / comp_id
    meta = _read_meta(comp_dir)
    if meta is None:
        _build(_SPECS_BY_ID[comp_id], seed, comp_dir)
        meta = _read_meta(comp_dir)
    return _competition_from_meta(comp_dir, meta)


def competition_ids(split: str = "all") -> list[str]:
    """Ids of the built-in competitions in `split` ("train" | "held_out" | "all")."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {SPLITS}")
    return [s.comp_id for s in BUILTIN_SPECS if split == "all" or s.split == split]


def load_suite(split: str = "train", *, seed: int = 0, cache_dir: Path | str | None = None) -> list[Competition]:
    """The built-in competitions of `split`, building any that are missing or out of date."""
    return [get_competition(c, seed=seed, cache_dir=cache_dir) for c in competition_ids(split)]
