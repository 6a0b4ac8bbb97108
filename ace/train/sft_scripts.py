"""Compact solution scripts for the SFT corpus, rewritten from the reference population.

A reference script (`ace.env.reference_solutions`) is ~4.5k characters of generic scaffolding; the
tiny policy generates at most ~100 tokens. `compact_script` rewrites one as a short script with the
same predictions, either with the task written in (the estimator's kind and the output rule fixed
for its competition) or reading both from the competition's files (`infer_task=True`), so that the
policy learns one way of reading a task rather than one script per competition. `select_diverse`
picks a subset spread over model families.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import random
import re
from typing import Any, Sequence

from ace.env.reference_solutions import ReferenceScript


@dataclasses.dataclass(frozen=True)
class CandidateScript:
    """A complete compact solution script and what makes it different from its siblings."""

    name: str
    code: str
    family: str                    # the estimator class (the inner one of a target transformer)
    preprocess: tuple[str, ...]    # preprocessing step classes, in order
    features: str                  # all | half | first | first2


_FEATURE_LINES = {"all": None, "half": "feats = feats[: max(1, len(feats) // 2)]",
                  "first": "feats = feats[:1]", "first2": "feats = feats[:2]"}


def _script_constants(code: str) -> tuple[dict, dict]:
    """Module-level literal constants and `from m import name` bindings of a reference script."""
    constants, imports = {}, {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                imports[alias.asname or alias.name] = node.module
    return constants, imports


def _called_names(expr: str) -> list[str]:
    return [n.func.id for n in ast.walk(ast.parse(expr, mode="eval"))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]


# Size names a reference expression may use, as the compact script computes them.
_SIZE_NAMES = {"n_features": "len(feats)", "n_samples": "len(train)"}


def _bind_sizes(expr: str) -> str:
    return re.sub(r"\b(" + "|".join(_SIZE_NAMES) + r")\b", lambda m: _SIZE_NAMES[m.group(1)], expr)


# The estimator of the other kind, for scripts that choose regressor or classifier from the data.
# A class maps to its counterpart and keeps the keyword arguments the counterpart accepts; the
# linear models translate regularisation (C = 1 / alpha). Every name is imported by the reference
# scripts, so the compact script's imports come from the same table.
_REGRESSOR_OF = {
    "LogisticRegression": "Ridge", "SGDClassifier": "Ridge", "GaussianNB": "BayesianRidge",
    "LinearDiscriminantAnalysis": "LinearRegression", "QuadraticDiscriminantAnalysis": "BayesianRidge",
    "SVC": "SVR", "DummyClassifier": "DummyRegressor",
    **{f"{f}Classifier": f"{f}Regressor" for f in ("KNeighbors", "DecisionTree", "RandomForest", "ExtraTrees",
                                                   "HistGradientBoosting", "GradientBoosting", "AdaBoost", "MLP")},
}
_CLASSIFIER_OF = {
    "Ridge": "LogisticRegression", "LinearRegression": "LogisticRegression", "Lasso": "LogisticRegression",
    "ElasticNet": "LogisticRegression", "HuberRegressor": "LogisticRegression", "LinearSVR": "LogisticRegression",
    "KernelRidge": "LogisticRegression", "BayesianRidge": "GaussianNB", "PLSRegression": "LinearDiscriminantAnalysis",
    "SVR": "SVC", "DummyRegressor": "DummyClassifier",
    **{f"{f}Regressor": f"{f}Classifier" for f in ("KNeighbors", "DecisionTree", "RandomForest", "ExtraTrees",
                                                  "HistGradientBoosting", "GradientBoosting", "AdaBoost", "MLP")},
}
# Regressors that fit one target at a time (MultiOutputRegressor around them for several targets).
_SINGLE_TARGET = {"HistGradientBoostingRegressor", "GradientBoostingRegressor", "AdaBoostRegressor", "SVR",
                  "BayesianRidge", "HuberRegressor", "LinearSVR"}


def _accepted_kwargs(class_name: str, module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), class_name)().get_params(deep=False))


def _estimator_call(expr: str) -> ast.Call:
    """The estimator call of a model expression (the inner one of a TransformedTargetRegressor)."""
    call = ast.parse(expr, mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise ValueError(f"model expression {expr!r} is not a call of an estimator class")
    if call.func.id == "TransformedTargetRegressor":
        inner = next((k.value for k in call.keywords if k.arg == "regressor"), None)
        if not isinstance(inner, ast.Call):
            raise ValueError(f"model expression {expr!r}: TransformedTargetRegressor without regressor=")
        return inner
    return call


def _counterpart(expr: str, imports: dict[str, str]) -> str:
    """The model expression of the other kind: `RandomForestRegressor(n_estimators=25)` for
    `RandomForestClassifier(n_estimators=25)`, `LogisticRegression(C=0.1, max_iter=2000)` for
    `Ridge(alpha=10.0)`; a classifier counterpart always supports `predict_proba`."""
    call = _estimator_call(expr)
    name = call.func.id
    other = _REGRESSOR_OF.get(name) or _CLASSIFIER_OF.get(name)
    if other is None:
        raise ValueError(f"model expression {expr!r}: no counterpart of {name} in the compact-script table")
    kwargs = {k.arg: k.value for k in call.keywords}
    if other == "Ridge" and "C" in kwargs and isinstance(kwargs["C"], ast.Constant):
        kwargs = {"alpha": ast.Constant(1.0 / float(kwargs["C"].value))}
    elif other == "LogisticRegression":
        alpha = kwargs.get("alpha")
        kwargs = {"max_iter": ast.Constant(2000)}
        if name == "Ridge" and isinstance(alpha, ast.Constant):
            kwargs = {"C": ast.Constant(1.0 / float(alpha.value)), **kwargs}
    else:
        accepted = _accepted_kwargs(other, imports[other])
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if other == "SVC":
            kwargs.update(probability=ast.Constant(True), random_state=ast.Constant(0))
    new = ast.Call(func=ast.Name(other, ast.Load()), args=[],
                   keywords=[ast.keyword(arg=k, value=v) for k, v in kwargs.items()])
    return ast.unparse(new)


def _with_probability(expr: str) -> str:
    """A classifier expression that supports `predict_proba` (SVC's probability=True; its `predict`
    is unchanged, it still takes the decision function)."""
    return expr.replace("probability=False", "probability=True")


def compact_script(script: ReferenceScript, comp: Any, *, infer_task: bool = False) -> CandidateScript:
    """Rewrite a reference script as a short script with the same predictions.

    Keeps the reference's estimator, preprocessing expressions, feature selection and output rule
    (labels, P(class 1) as the last `predict_proba` column, renormalised class probabilities with
    the log-loss clip, or values); only the generic `solve` scaffolding is dropped.

    Args:
      script: a reference script of `comp` (`ace.env.reference_solutions.reference_scripts`).
      comp: its competition.
      infer_task: False writes the task as the reference knew it (the estimator's kind and the
        output rule fixed). True writes a script that reads both from the competition's files: a
        real-valued target with more than 20 distinct values is a regression (the reference's
        estimator or its counterpart of the other kind, `_counterpart`); otherwise a submission
        with several columns gets class probabilities, a real-valued sample-submission column gets
        P(class 1) and an integer or text one gets labels. On the competition it was written for,
        the script predicts what the reference predicts.
    """
    constants, imports = _script_constants(script.code)
    missing = {"MODE", "CLIP", "FEATURES", "MULTI_NATIVE", "PREPROCESS", "MODEL"} - set(constants)
    if missing:
        raise ValueError(f"reference script {script.name!r} lacks the constants {sorted(missing)}")
    mode, clip = constants["MODE"], float(constants["CLIP"])
    if mode not in ("label", "value", "proba_binary", "proba_multi"):
        raise ValueError(f"reference script {script.name!r}: MODE={mode!r}, expected label | value | "
                         "proba_binary | proba_multi")
    if constants["FEATURES"] not in _FEATURE_LINES:
        raise ValueError(f"reference script {script.name!r}: FEATURES={constants['FEATURES']!r}, expected "
                         f"one of {sorted(_FEATURE_LINES)}")
    pre = [_bind_sizes(e) for e in constants["PREPROCESS"]]
    model = _bind_sizes(constants["MODEL"])
    head = ['train = pd.read_csv("data/train.csv")', 'test = pd.read_csv("data/test.csv")',
            'sub = pd.read_csv("data/sample_submission.csv")', "out = list(sub.columns[1:])",
            "feats = [c for c in test.columns if c != sub.columns[0]]"]
    if _FEATURE_LINES[constants["FEATURES"]]:
        head.append(_FEATURE_LINES[constants["FEATURES"]])
    head.append("target = [c for c in train.columns if c not in test.columns]")
    if infer_task:
        body, used = _inferred_body(model, pre, mode, constants, imports)
    else:
        body, used = _fixed_body(model, pre, mode, clip, constants, comp)
    called = sorted({n for e in used for n in _called_names(e) if n in imports})
    by_module: dict[str, list[str]] = {}
    for name in called:
        by_module.setdefault(imports[name], []).append(name)
    lines = ["import os", "import pandas as pd", "from sklearn.pipeline import make_pipeline",
             *(f"from {m} import {', '.join(ns)}" for m, ns in sorted(by_module.items())), "", *head, *body,
             'os.makedirs("submission", exist_ok=True)', 'sub.to_csv("submission/submission.csv", index=False)']
    estimator = _called_names(constants["MODEL"])
    family = estimator[1] if estimator[0] == "TransformedTargetRegressor" and len(estimator) > 1 else estimator[0]
    steps = tuple(n for e in constants["PREPROCESS"] for n in _called_names(e)[:1])
    return CandidateScript(name=script.name, code="\n".join(lines) + "\n", family=family, preprocess=steps,
                           features=constants["FEATURES"])


def _fixed_body(model: str, pre: list[str], mode: str, clip: float, constants: dict, comp: Any
                ) -> tuple[list[str], list[str]]:
    if mode == "value" and len(comp.target_columns) > 1 and not constants["MULTI_NATIVE"]:
        model = f"MultiOutputRegressor({model})"
    lines = [f"model = make_pipeline({', '.join([*pre, model])})",
             "model.fit(train[feats].values, train[target].values.squeeze())",
             "X = test[feats].values"]
    if mode == "label":
        lines.append("sub[out[0]] = model.predict(X)")
    elif mode == "value":
        lines.append("sub[out] = model.predict(X).reshape(len(X), -1)")
    elif mode == "proba_binary":
        lines.append("sub[out[0]] = model.predict_proba(X)[:, -1]" + (f".clip({clip}, {1 - clip})" if clip else ""))
    else:
        lines += ["proba = pd.DataFrame(model.predict_proba(X), columns=[str(c) for c in model.classes_])",
                  "proba = proba.reindex(columns=out, fill_value=0.0)" + (f".clip({clip}, 1.0)" if clip else ""),
                  "sub[out] = proba.div(proba.sum(axis=1), axis=0).values"]
    return lines, [*pre, model]


# Probabilities are clipped as the reference scripts clip them (ace.env.reference_solutions._render).
_INFERRED_CLIP = 1e-3


def _inferred_body(model: str, pre: list[str], mode: str, constants: dict, imports: dict[str, str]
                   ) -> tuple[list[str], list[str]]:
    if mode == "value":
        regressor, classifier = model, _counterpart(model, imports)
        single_target = not constants["MULTI_NATIVE"]
    else:
        regressor, classifier = _counterpart(model, imports), _with_probability(model)
        single_target = _estimator_call(regressor).func.id in _SINGLE_TARGET
    c = _INFERRED_CLIP
    lines = ["y = train[target].values.squeeze()",
             "reg = y.dtype.kind == \"f\" and len(set(y.ravel())) > 20",
             f"est = {regressor} if reg else {classifier}"]
    if single_target:
        lines += ["if reg and y.ndim > 1:", "    est = MultiOutputRegressor(est)"]
    lines += [f"model = make_pipeline({', '.join([*pre, 'est'])})",
              "model.fit(train[feats].values, y)",
              "X = test[feats].values",
              "if reg:", "    sub[out] = model.predict(X).reshape(len(X), -1)",
              "elif len(out) > 1:",
              "    proba = pd.DataFrame(model.predict_proba(X), columns=[str(c) for c in model.classes_])",
              f"    proba = proba.reindex(columns=out, fill_value=0.0).clip({c}, 1.0)",
              "    sub[out] = proba.div(proba.sum(axis=1), axis=0).values",
              "elif sub[out[0]].dtype.kind == \"f\":",
              f"    sub[out[0]] = model.predict_proba(X)[:, -1].clip({c}, {1 - c})",
              "else:", "    sub[out[0]] = model.predict(X)"]
    used = [*pre, regressor, classifier] + (["MultiOutputRegressor(est)"] if single_target else [])
    return lines, used


def select_diverse(candidates: Sequence[CandidateScript], n: int, *, seed: int) -> list[CandidateScript]:
    """Pick `n` scripts, spreading over model families first, then over (preprocessing, features).

    Round r takes, in a seeded random order, one unseen (family, preprocess, features) variant of
    each family that still has one, so the first min(n, #families) picks are distinct families.
    Dummy predictors are left out: they teach nothing a first attempt should do.
    """
    pool = [c for c in candidates if not c.family.startswith("Dummy")]
    if not 1 <= n <= len(pool):
        raise ValueError(f"n={n}, expected 1 <= n <= {len(pool)} (non-dummy candidates)")
    rng = random.Random(seed)
    by_family: dict[str, list[CandidateScript]] = {}
    for c in rng.sample(pool, len(pool)):
        by_family.setdefault(c.family, []).append(c)
    for name, family in by_family.items():
        # Distinct (preprocess, features) variants first, repeats of a variant (other hyperparameters) last.
        distinct, repeats, seen = [], [], set()
        for c in family:
            (repeats if (c.preprocess, c.features) in seen else distinct).append(c)
            seen.add((c.preprocess, c.features))
        by_family[name] = distinct + repeats
    picked: list[CandidateScript] = []
    families = rng.sample(sorted(by_family), len(by_family))
    while len(picked) < n:
        for family in families:
            if by_family[family] and len(picked) < n:
                picked.append(by_family[family].pop(0))
    return picked
