"""The SFT corpus's compact scripts: the ones that infer the task from the files predict what their
reference predicts, and keep working on a competition of the other kind."""
import ast
import warnings

import numpy as np
import pandas as pd
import pytest

from ace.env.grading import grade_submission
from ace.env.reference_solutions import _CLASSIFIERS, _REGRESSORS, reference_scripts, run_in_process
from ace.env.suites import get_competition, competition_ids
from ace.train import sft_scripts
from ace.train.sft_scripts import compact_script, select_diverse


def _run_script(code, public_dir, workdir, monkeypatch):
    """Run a compact script as `python script.py` would, from a workspace whose data/ is public_dir."""
    (workdir / "data").symlink_to(public_dir)
    monkeypatch.chdir(workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "<compact>", "exec"), {"__name__": "__main__"})  # noqa: S102
    return workdir / "submission" / "submission.csv"


@pytest.mark.parametrize("comp_id", competition_ids("all"))
def test_inferred_script_predicts_what_its_reference_predicts(comp_id, tmp_path, monkeypatch):
    comp = get_competition(comp_id)
    refs = {r.name: r for r in reference_scripts(comp)}
    # Four distinct families per competition, SVC and single-target regressors among the candidates.
    picked = select_diverse([compact_script(r, comp, infer_task=True) for r in refs.values()], 4, seed=1)
    for i, script in enumerate(picked):
        work = tmp_path / str(i)
        work.mkdir()
        got = pd.read_csv(_run_script(script.code, comp.public_dir, work, monkeypatch))
        want = run_in_process(refs[script.name], comp.public_dir)
        want = want.astype({c: float for c in want.columns[1:] if want[c].dtype.kind == "f"})
        pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-6, obj=f"{comp_id}/{script.name}")


@pytest.mark.parametrize("source, target", [("iris-species", "friedman-arctan"), ("breast-cancer-diagnosis", "twin-response"),
                                            ("diabetes-progression", "digits-parity"), ("sparse-regression", "imbalanced-screening"),
                                            ("multi-target-regression", "circles-ring"), ("wine-cultivar", "friedman-product")])
def test_an_inferred_script_stays_valid_on_a_competition_of_the_other_kind(source, target, tmp_path, monkeypatch):
    # What the fixed scripts cannot do: a classifier's script on a regression (and the reverse)
    # reads the target, picks the other estimator and writes the output the sample asks for.
    src, dst = get_competition(source), get_competition(target)
    scripts = select_diverse([compact_script(r, src, infer_task=True) for r in reference_scripts(src)], 3, seed=0)
    for i, script in enumerate(scripts):
        work = tmp_path / str(i)
        work.mkdir()
        verdict = grade_submission(dst, _run_script(script.code, dst.public_dir, work, monkeypatch))
        assert verdict.valid, (script.name, verdict.reason, verdict.detail)


def _estimator(expr):
    call = sft_scripts._estimator_call(expr)
    return call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords
                          if isinstance(k.value, ast.Constant)}


def test_counterparts_keep_what_the_other_kind_accepts():
    imports = sft_scripts._script_constants(reference_scripts(get_competition("iris-species"))[0].code)[1]
    assert _estimator(sft_scripts._counterpart("Ridge(alpha=10.0)", imports)) == (
        "LogisticRegression", {"C": 0.1, "max_iter": 2000})
    assert _estimator(sft_scripts._counterpart("LogisticRegression(C=0.01, max_iter=2000)", imports)) == (
        "Ridge", {"alpha": 100.0})
    assert _estimator(sft_scripts._counterpart("RandomForestClassifier(n_estimators=60, max_depth=4, random_state=2)",
                                              imports)) == ("RandomForestRegressor",
                                                            {"n_estimators": 60, "max_depth": 4, "random_state": 2})
    assert _estimator(sft_scripts._counterpart("TransformedTargetRegressor(regressor=SVR(C=10.0), "
                                              "transformer=StandardScaler())", imports)) == (
        "SVC", {"C": 10.0, "probability": True, "random_state": 0})
    # Every estimator of both populations has a counterpart that constructs, and a classifier
    # counterpart can give probabilities.
    namespace = {}
    exec("\n".join(f"from {m} import {n}" for n, m in imports.items()), namespace)  # noqa: S102
    for spec in (*_CLASSIFIERS, *_REGRESSORS):
        expr = spec.model.replace("{proba}", "False")
        expr = expr.replace("n_samples", "100").replace("n_features", "4")
        other = eval(sft_scripts._counterpart(expr, imports), namespace)  # noqa: S307
        if spec in _REGRESSORS:
            assert hasattr(other, "predict_proba"), (spec.name, other)
    with pytest.raises(ValueError, match="no counterpart of Foo"):
        sft_scripts._counterpart("Foo(a=1)", imports)


def test_inferred_rule_reads_the_target_not_the_competition_name(tmp_path, monkeypatch):
    # The same script, two hand-made data folders: integer labels with a real-valued sample column
    # get P(class 1); a real-valued target with many values gets values.
    comp = get_competition("breast-cancer-diagnosis")
    script = compact_script(next(r for r in reference_scripts(comp) if r.name == "forest_25"), comp, infer_task=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    for i, (y, sample_value, expect) in enumerate([((x[:, 0] > 0).astype(int), 0.5, "probability"),
                                                  (x[:, 0] * 3.0 + 0.1, 0.0, "value"),
                                                  ((x[:, 0] > 0).astype(int), 0, "label")]):
        public = tmp_path / f"public{i}"
        public.mkdir()
        frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(id=np.arange(80))
        frame.iloc[:60].assign(t=y[:60]).to_csv(public / "train.csv", index=False)
        frame.iloc[60:].to_csv(public / "test.csv", index=False)
        pd.DataFrame({"id": np.arange(60, 80), "t": sample_value}).to_csv(public / "sample_submission.csv", index=False)
        work = tmp_path / f"work{i}"
        work.mkdir()
        pred = pd.read_csv(_run_script(script.code, public, work, monkeypatch))["t"].to_numpy()
        if expect == "label":
            assert set(np.unique(pred)) <= {0, 1} and pred.dtype.kind == "i"
        elif expect == "probability":
            assert pred.dtype.kind == "f" and np.all((pred >= 1e-3) & (pred <= 1 - 1e-3))
            assert len(np.unique(pred)) > 2
        else:
            assert np.corrcoef(pred, x[60:, 0])[0, 1] > 0.9
