"""A population of varied, complete reference solutions for tabular competitions.

Each reference is a full Python script that reads `./data/train.csv`, `./data/test.csv` and
`./data/sample_submission.csv` and writes `./submission/submission.csv`. Scripts differ in model
family, hyperparameters, preprocessing and the features they use; a few are deliberately weak
(dummy predictors, one feature, stumps) so that leaderboards built from them have a spread and
medal thresholds mean something. They serve three users: leaderboard building, a scripted
agent, and the SFT data generator.

The script text is the single source of truth: the suite builder runs the very same text
in-process (`run_in_process`) by executing its `solve` function on data frames, which avoids a
subprocess per fit while giving the score a subprocess run gives.

A script infers its task from the data: target columns are the train columns absent from
test; the submission columns come from the sample submission; how predictions are written
(labels, P(class 1), class probabilities, values) comes from the competition's metric.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ace.env.metrics import get_metric
from ace.env.task import Competition


@dataclass(frozen=True)
class ReferenceScript:
    """A named, complete solution script (Python source text)."""

    name: str
    code: str


@dataclass(frozen=True)
class _Spec:
    name: str
    preprocess: tuple[str, ...]  # expressions evaluated inside solve; may use n_features, n_samples
    model: str  # expression; `{proba}` is replaced by whether probabilities are needed
    features: str = "all"  # all | half | first | first2
    multi_native: bool = True  # regressor accepts a 2-D target without MultiOutputRegressor


_SCALE = ("StandardScaler()",)
_POLY = ("PolynomialFeatures(2) if n_features <= 20 else 'passthrough'", "StandardScaler()")

# Classification population: 55 specs across 16 families, 8 of them deliberately weak.
_CLASSIFIERS = (
    *[_Spec(f"logreg_C{c}", _SCALE, f"LogisticRegression(C={c}, max_iter=2000)")
      for c in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)],
    _Spec("logreg_raw", (), "LogisticRegression(C=1.0, max_iter=300)"),
    _Spec("logreg_pca3", ("StandardScaler()", "PCA(n_components=min(3, n_features))"),
          "LogisticRegression(max_iter=2000)"),
    _Spec("logreg_half_features", _SCALE, "LogisticRegression(max_iter=2000)", features="half"),
    _Spec("logreg_poly2", _POLY, "LogisticRegression(C=0.5, max_iter=3000)"),
    _Spec("logreg_quantile", ("QuantileTransformer(n_quantiles=100, random_state=0)",),
          "LogisticRegression(max_iter=2000)"),
    *[_Spec(f"knn_k{k}", _SCALE, f"KNeighborsClassifier(n_neighbors=min({k}, n_samples))")
      for k in (1, 3, 5, 9, 15, 31)],
    _Spec("knn_raw_k5", (), "KNeighborsClassifier(n_neighbors=5)"),
    _Spec("knn_distance_k7", _SCALE, "KNeighborsClassifier(n_neighbors=7, weights='distance')"),
    _Spec("knn_first_feature", (), "KNeighborsClassifier(n_neighbors=min(15, n_samples))", features="first"),
    *[_Spec(f"tree_depth{d}", (), f"DecisionTreeClassifier(max_depth={d}, random_state=0)")
      for d in (1, 2, 3, 5, 8, None)],
    _Spec("tree_depth2_first2", (), "DecisionTreeClassifier(max_depth=2, random_state=0)",
          features="first2"),
    _Spec("forest_25", (), "RandomForestClassifier(n_estimators=25, random_state=0)"),
    _Spec("forest_60", (), "RandomForestClassifier(n_estimators=60, random_state=1)"),
    _Spec("forest_60_depth4", (), "RandomForestClassifier(n_estimators=60, max_depth=4, random_state=2)"),
    _Spec("forest_40_half", (), "RandomForestClassifier(n_estimators=40, random_state=3)", features="half"),
    _Spec("extra_trees_60", (), "ExtraTreesClassifier(n_estimators=60, random_state=0)"),
    _Spec("extra_trees_30_depth6", (), "ExtraTreesClassifier(n_estimators=30, max_depth=6, random_state=1)"),
    _Spec("hist_gb_lr0.1", (), "HistGradientBoostingClassifier(max_iter=30, learning_rate=0.1, early_stopping=False, random_state=0)"),
    _Spec("hist_gb_lr0.05", (), "HistGradientBoostingClassifier(max_iter=40, learning_rate=0.05, early_stopping=False, random_state=0)"),
    _Spec("hist_gb_depth3", (), "HistGradientBoostingClassifier(max_iter=20, learning_rate=0.2, max_depth=3, early_stopping=False, random_state=0)"),
    _Spec("hist_gb_leaves8_l2", (), "HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=8, l2_regularization=1.0, early_stopping=False, random_state=0)"),
    _Spec("grad_boost_depth2", (), "GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0)"),
    _Spec("adaboost_40", (), "AdaBoostClassifier(n_estimators=40, random_state=0)"),
    _Spec("gaussian_nb", (), "GaussianNB()"),
    _Spec("gaussian_nb_quantile", ("QuantileTransformer(n_quantiles=100, output_distribution='normal', random_state=0)",), "GaussianNB()"),
    _Spec("lda", (), "LinearDiscriminantAnalysis()"),
    _Spec("qda_reg0.5_pca8", ("StandardScaler()", "PCA(n_components=min(8, n_features))"), "QuadraticDiscriminantAnalysis(reg_param=0.5)"),
    *[_Spec(f"svc_rbf_C{c}", _SCALE, f"SVC(C={c}, probability={{proba}}, random_state=0)")
      for c in (0.1, 1.0, 10.0)],
    _Spec("svc_linear", _SCALE, "SVC(kernel='linear', C=0.5, probability={proba}, random_state=0)"),
    _Spec("mlp_32", _SCALE, "MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0)"),
    _Spec("mlp_32_16_alpha1", _SCALE, "MLPClassifier(hidden_layer_sizes=(32, 16), alpha=1.0, max_iter=300, random_state=1)"),
    _Spec("mlp_16_short", _SCALE, "MLPClassifier(hidden_layer_sizes=(16,), max_iter=40, random_state=2)"),
    _Spec("sgd_logistic", _SCALE, "SGDClassifier(loss='log_loss', alpha=1e-3, max_iter=50, random_state=0)"),
    _Spec("nearest_centroid_gnb_pca2", ("StandardScaler()", "PCA(n_components=min(2, n_features))"), "GaussianNB()"),
    _Spec("dummy_prior", (), "DummyClassifier(strategy='prior')"),
    _Spec("dummy_stratified", (), "DummyClassifier(strategy='stratified', random_state=0)"),
    _Spec("dummy_uniform", (), "DummyClassifier(strategy='uniform', random_state=0)"),
)

# Regression population: 54 specs across 18 families, 8 of them deliberately weak.
_TARGET_SCALED = "TransformedTargetRegressor(regressor={inner}, transformer=StandardScaler())"
_REGRESSORS = (
    *[_Spec(f"ridge_a{a}", _SCALE, f"Ridge(alpha={a})") for a in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)],
    _Spec("linear", (), "LinearRegression()"),
    _Spec("ridge_half_features", _SCALE, "Ridge(alpha=1.0)", features="half"),
    _Spec("ridge_poly2", _POLY, "Ridge(alpha=1.0)"),
    _Spec("ridge_spline", ("SplineTransformer(n_knots=5, degree=3)",), "Ridge(alpha=0.1)"),
    *[_Spec(f"lasso_a{a}", _SCALE, f"Lasso(alpha={a}, max_iter=5000)") for a in (0.01, 0.1, 1.0)],
    _Spec("elastic_net", _SCALE, "ElasticNet(alpha=0.1, l1_ratio=0.5, max_iter=5000)"),
    _Spec("bayesian_ridge", _SCALE, "BayesianRidge()", multi_native=False),
    _Spec("huber", _SCALE, "HuberRegressor(max_iter=500)", multi_native=False),
    *[_Spec(f"knn_k{k}", _SCALE, f"KNeighborsRegressor(n_neighbors=min({k}, n_samples))") for k in (1, 3, 5, 10, 20, 40)],
    _Spec("knn_raw_k5", (), "KNeighborsRegressor(n_neighbors=5)"),
    _Spec("knn_distance_k8", _SCALE, "KNeighborsRegressor(n_neighbors=8, weights='distance')"),
    _Spec("knn_first_feature", (), "KNeighborsRegressor(n_neighbors=min(20, n_samples))", features="first"),
    *[_Spec(f"tree_depth{d}", (), f"DecisionTreeRegressor(max_depth={d}, random_state=0)")
      for d in (2, 3, 5, 8, None)],
    _Spec("tree_depth2_first2", (), "DecisionTreeRegressor(max_depth=2, random_state=0)", features="first2"),
    _Spec("forest_25", (), "RandomForestRegressor(n_estimators=25, random_state=0)"),
    _Spec("forest_60_depth6", (), "RandomForestRegressor(n_estimators=60, max_depth=6, random_state=1)"),
    _Spec("forest_40_half", (), "RandomForestRegressor(n_estimators=40, random_state=2)", features="half"),
    _Spec("extra_trees_60", (), "ExtraTreesRegressor(n_estimators=60, random_state=0)"),
    _Spec("extra_trees_30_depth6", (), "ExtraTreesRegressor(n_estimators=30, max_depth=6, random_state=1)"),
    _Spec("hist_gb_lr0.1", (), "HistGradientBoostingRegressor(max_iter=50, learning_rate=0.1, early_stopping=False, random_state=0)", multi_native=False),
    _Spec("hist_gb_depth3", (), "HistGradientBoostingRegressor(max_iter=30, learning_rate=0.2, max_depth=3, early_stopping=False, random_state=0)", multi_native=False),
    _Spec("hist_gb_leaves8_l2", (), "HistGradientBoostingRegressor(max_iter=60, max_leaf_nodes=8, l2_regularization=1.0, early_stopping=False, random_state=0)", multi_native=False),
    _Spec("grad_boost_depth3", (), "GradientBoostingRegressor(n_estimators=60, max_depth=3, random_state=0)", multi_native=False),
    _Spec("grad_boost_depth2_lr0.3", (), "GradientBoostingRegressor(n_estimators=30, max_depth=2, learning_rate=0.3, random_state=0)", multi_native=False),
    _Spec("adaboost_tree", (), "AdaBoostRegressor(n_estimators=30, random_state=0)", multi_native=False),
    _Spec("svr_C1", _SCALE, "SVR(C=1.0)", multi_native=False),
    _Spec("svr_C10_scaled_target", _SCALE, _TARGET_SCALED.format(inner="SVR(C=10.0)"), multi_native=False),
    _Spec("svr_C1_scaled_target", _SCALE, _TARGET_SCALED.format(inner="SVR(C=1.0, epsilon=0.05)"), multi_native=False),
    _Spec("linear_svr", _SCALE, _TARGET_SCALED.format(inner="LinearSVR(C=1.0, max_iter=5000, random_state=0)"), multi_native=False),
    _Spec("kernel_ridge_rbf", _SCALE, _TARGET_SCALED.format(inner="KernelRidge(alpha=0.1, kernel='rbf', gamma=0.1)")),
    _Spec("kernel_ridge_poly", _SCALE, _TARGET_SCALED.format(inner="KernelRidge(alpha=1.0, kernel='poly', degree=2)")),
    _Spec("mlp_64", _SCALE, _TARGET_SCALED.format(inner="MLPRegressor(hidden_layer_sizes=(64,), max_iter=400, random_state=0)")),
    _Spec("mlp_32_16_alpha1", _SCALE, _TARGET_SCALED.format(inner="MLPRegressor(hidden_layer_sizes=(32, 16), alpha=1.0, max_iter=400, random_state=1)")),
    _Spec("pls_2", _SCALE, "PLSRegression(n_components=min(2, n_features))"),
    _Spec("dummy_mean", (), "DummyRegressor(strategy='mean')"),
    _Spec("dummy_median", (), "DummyRegressor(strategy='median')"),
    _Spec("dummy_quantile90", (), "DummyRegressor(strategy='quantile', quantile=0.9)"),
)

_IMPORTS = """\
import os
import warnings

import numpy as np
import pandas as pd
from sklearn.compose import TransformedTargetRegressor
from sklearn.cross_decomposition import PLSRegression
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis, QuadraticDiscriminantAnalysis
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.ensemble import (AdaBoostClassifier, AdaBoostRegressor, ExtraTreesClassifier,
                              ExtraTreesRegressor, GradientBoostingClassifier,
                              GradientBoostingRegressor, HistGradientBoostingClassifier,
                              HistGradientBoostingRegressor, RandomForestClassifier,
                              RandomForestRegressor)
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import (BayesianRidge, ElasticNet, HuberRegressor, Lasso,
                                  LinearRegression, LogisticRegression, Ridge, SGDClassifier)
from sklearn.multioutput import MultiOutputRegressor
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import (PolynomialFeatures, QuantileTransformer, SplineTransformer,
                                   StandardScaler)
from sklearn.svm import SVC, SVR, LinearSVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
from threadpoolctl import threadpool_limits
"""

# The body shared by every script; the per-script constants above it select the behaviour.
_SOLVE = '''

def select_features(columns):
    if FEATURES == "half":
        return columns[: max(1, len(columns) // 2)]
    if FEATURES == "first":
        return columns[:1]
    if FEATURES == "first2":
        return columns[:2]
    return columns


def solve(train, test, sample):
    """Fit on train, predict test, return a frame laid out like the sample submission."""
    id_col = sample.columns[0]
    out_cols = list(sample.columns[1:])
    target_cols = [c for c in train.columns if c not in test.columns]
    feature_cols = select_features([c for c in test.columns if c != id_col])
    n_features = len(feature_cols)
    X = train[feature_cols].to_numpy(dtype=float)
    X_test = test[feature_cols].to_numpy(dtype=float)
    y = train[target_cols[0]].to_numpy() if len(target_cols) == 1 else train[target_cols].to_numpy(float)
    # Spec expressions may size themselves by the data (PCA components, neighbours).
    scope = {"n_features": n_features, "n_samples": len(X)}
    steps = [eval(expr, globals(), scope) for expr in PREPROCESS]
    model = eval(MODEL, globals(), scope)
    if MODE == "value" and y.ndim == 2 and not MULTI_NATIVE:
        model = MultiOutputRegressor(model)
    pipe = make_pipeline(*steps, model)
    # One thread: small data gains nothing from more, and results do not depend on the host.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        pipe.fit(X, y)
        if MODE in ("label", "value"):
            pred = np.asarray(pipe.predict(X_test)).reshape(len(X_test), -1)
            if MODE == "label" and pd.api.types.is_integer_dtype(train[target_cols[0]]):
                pred = pred.astype(np.int64)
        else:
            proba = pipe.predict_proba(X_test)
            classes = list(pipe.classes_)
    if MODE == "proba_binary":
        positive = classes.index(max(classes)) if len(classes) > 1 else None
        p = proba[:, positive] if positive is not None else np.full(len(X_test), float(classes[0] == 1))
        pred = np.clip(p, CLIP, 1 - CLIP).reshape(-1, 1)
    elif MODE == "proba_multi":
        frame = pd.DataFrame(proba, columns=[str(c) for c in classes])
        frame = frame.reindex(columns=out_cols, fill_value=0.0).to_numpy(float)
        frame = np.clip(frame, CLIP, 1.0)
        pred = frame / frame.sum(axis=1, keepdims=True)
    submission = pd.DataFrame(pred, columns=out_cols)
    submission.insert(0, id_col, test[id_col].to_numpy())
    return submission


if __name__ == "__main__":
    train = pd.read_csv("data/train.csv")
    test = pd.read_csv("data/test.csv")
    sample = pd.read_csv("data/sample_submission.csv")
    os.makedirs("submission", exist_ok=True)
    solve(train, test, sample).to_csv("submission/submission.csv", index=False)
    print("wrote submission/submission.csv")
'''


def _mode(comp: Competition) -> str:
    kind = get_metric(comp.metric).kind
    if kind == "label":
        return "label"
    if kind == "value":
        return "value"
    return "proba_binary" if len(comp.target_columns) == 1 else "proba_multi"


def _render(spec: _Spec, comp: Competition) -> ReferenceScript:
    mode = _mode(comp)
    needs_proba = mode.startswith("proba")
    model = spec.model.replace("{proba}", str(needs_proba))
    # Every probability is clipped to [1e-3, 1 - 1e-3]: under log loss one confident mistake would
    # cost -log(eps), and a script that infers its output rule from the files (the SFT corpus's, see
    # ace.train.sft_corpus) cannot tell log loss from AUC, so the rule must not depend on the metric.
    clip = 1e-3 if needs_proba else 0.0
    header = (
        f'"""Reference solution {spec.name!r} for competition {comp.comp_id!r} '
        f"({comp.metric}).\n\nReads ./data/, writes ./submission/submission.csv.\n\"\"\"\n"
    )
    constants = (
        f"\nMODE = {mode!r}  # label | proba_binary | proba_multi | value\n"
        f"CLIP = {clip!r}\n"
        f"FEATURES = {spec.features!r}\n"
        f"MULTI_NATIVE = {spec.multi_native!r}\n"
        f"PREPROCESS = {spec.preprocess!r}\n"
        f"MODEL = {model!r}\n"
    )
    return ReferenceScript(name=spec.name, code=header + _IMPORTS + constants + _SOLVE)


def _population(comp: Competition) -> tuple[_Spec, ...]:
    if _mode(comp) == "value":
        return _REGRESSORS
    return _CLASSIFIERS


def reference_scripts(comp: Competition, n: int | None = None, *, seed: int = 0) -> list[ReferenceScript]:
    """Complete, varied solution scripts for a tabular competition.

    Args:
      comp: a competition whose public data has an id column and numeric features.
      n: how many; None gives the whole population (>= 50). A smaller n takes a seeded random
        subset, so different seeds give different mixes of families.
      seed: order of the subset.
    Returns:
      [n] ReferenceScript(name, code), names unique.
    """
    specs = list(_population(comp))
    if n is not None:
        if not 1 <= n <= len(specs):
            raise ValueError(f"n={n}, expected 1 <= n <= {len(specs)} (population size)")
        specs = random.Random(seed).sample(specs, n)
    return [_render(spec, comp) for spec in specs]


def mismatched_scripts(comp: Competition) -> list[ReferenceScript]:
    """Scripts of the other population: regressors for a classification competition, classifiers
    for a regression one, written for `comp`'s output rule. They fail the way a policy that
    confuses the task fails (a classifier fit on a continuous target, a regressor asked for class
    probabilities or writing non-integer labels), which gives the SFT corpus states to recover from."""
    other = _CLASSIFIERS if _mode(comp) == "value" else _REGRESSORS
    return [_render(spec, comp) for spec in other]


def run_in_process(script: ReferenceScript, public_dir: Path) -> pd.DataFrame:
    """Run a reference script's `solve` in this process on `public_dir`'s CSVs.

    Executes the script text itself (its `__main__` block is skipped), so the result equals
    what `python script.py` writes from a workspace whose `./data/` is `public_dir`.
    Returns:
      the submission frame [N_test, 1 + K].
    """
    namespace: dict = {"__name__": "ace_reference_solution"}
    exec(compile(script.code, f"<reference {script.name}>", "exec"), namespace)  # noqa: S102
    public_dir = Path(public_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return namespace["solve"](
            pd.read_csv(public_dir / "train.csv"),
            pd.read_csv(public_dir / "test.csv"),
            pd.read_csv(public_dir / "sample_submission.csv"),
        )
