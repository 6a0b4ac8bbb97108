"""The built-in suite: every competition builds, grades, and has a leaderboard that means
something; reference scripts run the same in a subprocess as in-process; the cache behaves."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ace.env import suites
from ace.env.grading import get_metric, grade_submission
from ace.env.reference_solutions import reference_scripts, run_in_process


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ace_cache")


@pytest.fixture(scope="session")
def suite(cache_dir):
    return suites.load_suite("all", seed=0, cache_dir=cache_dir)


def test_suite_covers_task_types_metrics_and_splits(suite):
    assert len(suite) >= 16
    train = suites.load_suite("train", seed=0, cache_dir=suite[0].public_dir.parents[1].parent.parent)
    held = suites.competition_ids("held_out")
    assert len(train) == 12 and len(held) == 6
    assert not {c.comp_id for c in train} & set(held)
    assert {c.task_type for c in suite} == {"binary", "multiclass", "regression", "multioutput", "image"}
    assert {"accuracy", "log_loss", "roc_auc", "macro_f1", "rmse", "mae"} <= {c.metric for c in suite}


def test_every_competition_keeps_answers_private_and_has_a_spread_leaderboard(suite):
    for comp in suite:
        public = {p.name for p in comp.public_dir.iterdir()}
        assert public == {"train.csv", "test.csv", "sample_submission.csv", "description.md"}, comp.comp_id
        test = pd.read_csv(comp.public_dir / "test.csv")
        answers = pd.read_csv(comp.answers_path)
        assert not set(comp.target_columns) & set(test.columns)
        assert sorted(test["id"]) == sorted(answers["id"])
        assert comp.metric in comp.description and "submission/submission.csv" in comp.description
        board = np.array(comp.leaderboard)
        assert len(board) >= 50, comp.comp_id
        # Sorted best first, with a real gap between the winner and the median team.
        assert np.all(np.diff(board) <= 0) if comp.higher_is_better else np.all(np.diff(board) >= 0)
        assert abs(board[0] - np.median(board)) > 1e-3, comp.comp_id


def _constant_prediction(comp):
    """The best constant a participant could submit without modelling: majority class,
    class frequencies or the training mean."""
    train = pd.read_csv(comp.public_dir / "train.csv")
    ids = pd.read_csv(comp.public_dir / "test.csv")["id"]
    kind = get_metric(comp.metric).kind
    sub = pd.DataFrame({"id": ids})
    if kind == "label":
        col = comp.target_columns[0]
        sub[col] = train[col].mode().iloc[0]
    elif kind == "probability" and len(comp.target_columns) > 1:
        target = [c for c in train.columns if c not in pd.read_csv(comp.public_dir / "test.csv").columns][0]
        freq = train[target].astype(str).value_counts(normalize=True)
        for c in comp.target_columns:
            sub[c] = freq.get(c, 0.0)
    else:
        for c in comp.target_columns:
            sub[c] = train[c].mean()
    return sub


def test_every_competition_grades_sample_broken_constant_and_best(suite, tmp_path):
    for comp in suite:
        sample = grade_submission(comp, comp.sample_submission_path)
        assert sample.valid and sample.medal is None, (comp.comp_id, sample)
        frame = pd.read_csv(comp.sample_submission_path)
        frame.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
        assert grade_submission(comp, tmp_path / "short.csv").reason == "wrong_rows"
        holed = frame.astype({comp.target_columns[0]: object})
        holed.loc[3, comp.target_columns[0]] = None
        holed.to_csv(tmp_path / "holed.csv", index=False)
        assert grade_submission(comp, tmp_path / "holed.csv").reason == "nan_values"
        frame.rename(columns={comp.id_column: "row"}).to_csv(tmp_path / "renamed.csv", index=False)
        assert grade_submission(comp, tmp_path / "renamed.csv").reason == "wrong_columns"

        _constant_prediction(comp).to_csv(tmp_path / "constant.csv", index=False)
        constant = grade_submission(comp, tmp_path / "constant.csv")
        assert constant.valid and constant.medal is None, (comp.comp_id, constant)

        scores = suites.reference_leaderboard(comp.comp_id, seed=0, cache_dir=comp.public_dir.parents[3])
        best_name = next(iter(scores))
        best_script = next(s for s in reference_scripts(comp) if s.name == best_name)
        run_in_process(best_script, comp.public_dir).to_csv(tmp_path / "best.csv", index=False)
        best = grade_submission(comp, tmp_path / "best.csv")
        assert best.valid and best.gold and best.score == comp.leaderboard[0], comp.comp_id


# Class-probability columns with a multi-threaded booster, and a wrapped multi-output SVR.
@pytest.mark.parametrize("comp_id, name", [("wine-cultivar", "hist_gb_lr0.1"),
                                           ("twin-response", "svr_C10_scaled_target")])
def test_rendered_script_in_a_subprocess_scores_as_in_process(suite, tmp_path, comp_id, name):
    comp = next(c for c in suite if c.comp_id == comp_id)
    scores = suites.reference_leaderboard(comp_id, seed=0, cache_dir=comp.public_dir.parents[3])
    for script in [s for s in reference_scripts(comp) if s.name == name]:
        work = tmp_path / script.name
        shutil.copytree(comp.public_dir, work / "data")
        (work / "solution.py").write_text(script.code)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACE_")}
        proc = subprocess.run([sys.executable, "solution.py"], cwd=work, capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = grade_submission(comp, work / "submission" / "submission.csv")
        assert result.valid and result.score == scores[script.name], script.name


def test_reference_population_is_varied_and_seeded(suite):
    by_kind = {}
    for comp in suite:
        by_kind.setdefault(get_metric(comp.metric).kind == "value", comp)
    for comp in by_kind.values():
        scripts = reference_scripts(comp)
        assert len(scripts) >= 50
        assert len({s.name for s in scripts}) == len(scripts)
        assert len({s.code for s in scripts}) == len(scripts)
        families = {s.name.split("_")[0] for s in scripts}
        assert len(families) >= 12 and "dummy" in families
        assert [s.name for s in reference_scripts(comp, 5, seed=1)] == [
            s.name for s in reference_scripts(comp, 5, seed=1)]
        assert [s.name for s in reference_scripts(comp, 5, seed=1)] != [
            s.name for s in reference_scripts(comp, 5, seed=2)]
        with pytest.raises(ValueError, match="n=0"):
            reference_scripts(comp, 0)


def test_competition_data_is_a_function_of_the_seed():
    spec = next(s for s in suites.BUILTIN_SPECS if s.comp_id == "moons-noisy")
    a, b = suites.make_competition_data(spec, 0), suites.make_competition_data(spec, 0)
    c = suites.make_competition_data(spec, 1)
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.answers, b.answers)
    assert not a.train.equals(c.train)


def test_cache_location_env_override_and_version_rebuild(tmp_path, monkeypatch):
    monkeypatch.delenv("ACE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert suites.cache_root(3) == tmp_path / "home" / ".cache" / "ace" / "builtin" / "seed-3"
    monkeypatch.setenv("ACE_CACHE_DIR", str(tmp_path / "env"))
    assert suites.cache_root(0) == tmp_path / "env" / "builtin" / "seed-0"
    assert suites.cache_root(0, tmp_path / "arg") == tmp_path / "arg" / "builtin" / "seed-0"
    # Cache behaviour does not need a full leaderboard: build from three references.
    monkeypatch.setattr(suites, "MIN_LEADERBOARD", 3)
    monkeypatch.setattr(suites, "reference_scripts", lambda comp, seed: reference_scripts(comp, 3, seed=seed))

    comp = suites.get_competition("iris-species", seed=5)
    assert comp.public_dir == tmp_path / "env" / "builtin" / "seed-5" / "iris-species" / "public"
    meta_path = comp.public_dir.parent / "meta.json"
    built = meta_path.stat().st_mtime_ns
    assert suites.get_competition("iris-species", seed=5) == comp
    assert meta_path.stat().st_mtime_ns == built  # a cache hit does not rebuild

    monkeypatch.setattr(suites, "SUITE_VERSION", suites.SUITE_VERSION + 1)
    rebuilt = suites.get_competition("iris-species", seed=5)
    assert json.loads(meta_path.read_text())["suite_version"] == suites.SUITE_VERSION
    assert rebuilt.leaderboard == comp.leaderboard  # same seed, same data, same scores
    (comp.private_dir / "answers.csv").unlink()
    suites.get_competition("iris-species", seed=5)
    assert (comp.private_dir / "answers.csv").is_file()  # missing files trigger a rebuild


def test_bad_split_and_unknown_id_are_rejected():
    with pytest.raises(ValueError, match="split='test'"):
        suites.load_suite("test")
    with pytest.raises(KeyError, match="no-such"):
        suites.get_competition("no-such")
