"""All 22 MLE-bench-Lite competitions, written in their prepared layout, loaded and graded.

Each competition is scored on perfect, noisy and poor submissions against a formula written
here (`tests.support.reference_metrics`, NumPy only), rounded to 5 decimals as MLE-bench's
`Grader` rounds; medals come from the leaderboard.csv the test wrote, by MLE-bench's position
rule for 120 teams. Every validity rule of MLE-bench's graders rejects a submission that breaks
it, and the quirks the graders have (rows paired by position, keys sorted but not compared,
columns taken in file order, -1 rows not scored, NA-like text) are reproduced.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ace.env.actions import Action, format_action
from ace.env.grading import grade_submission
from ace.env.episode import run_episode, scripted_policy
from ace.env.gym import MLEEnv
from ace.env.mlebench import LITE_SPECS, MLEBENCH_LITE, load_mlebench_competition, load_mlebench_suite
from ace.env.reward import RewardConfig
from ace.env.sandbox import SandboxLimits
from ace.env.subprocess_sandbox import SubprocessSandbox
from tests.support import reference_metrics as ref
from tests.support.mlebench_data import LITE_CASES, write_lite_folder

N = 40


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """(data_dir, meta_dir): all 22 competitions, data and the mle-bench repo's files apart."""
    root = tmp_path_factory.mktemp("mlebench")
    write_lite_folder(root / "data", root / "mle-bench-competitions", n=N)
    return root / "data", root / "mle-bench-competitions"


def _load(lite, comp_id):
    return load_mlebench_competition(lite[0], comp_id, competitions_dir=lite[1])


def _answers(comp) -> pd.DataFrame:
    return pd.read_csv(comp.answers_path)  # as MLE-bench's load_answers reads it


def _sample(comp) -> pd.DataFrame:
    return pd.read_csv(comp.private_dir.parent / LITE_CASES[comp.comp_id].sample, keep_default_na=False)


def _truth(comp, answers):
    return answers[list(comp.target_columns)].to_numpy()


def _predictions(case, truth, quality: str, rng) -> np.ndarray:
    """[N, K] predictions of a perfect, noisy or poor submission."""
    t = truth.astype(float) if case.kind != "text_accuracy" else truth
    k = case.kind
    if k in ("auc", "mean_auc", "binary_log_loss"):
        sure = np.where(t == 1, 0.95, 0.05)
        return {"perfect": sure, "noisy": np.clip(0.4 * (t == 1) + 0.6 * rng.random(t.shape), 0, 1),
                "poor": 1 - sure}[quality]
    if k == "multi_log_loss":
        n_cls = t.shape[1]
        if quality == "perfect":
            p = t * 0.9 + 0.1 / n_cls
        elif quality == "noisy":
            p = t * 0.4 + rng.dirichlet(np.ones(n_cls), size=len(t)) * 0.6
        else:
            p = (1 - t) / (n_cls - 1)
        return p / p.sum(axis=1, keepdims=True)
    if k == "qwk":
        return {"perfect": t, "noisy": np.where(rng.random(t.shape) < 0.3, rng.integers(0, 5, t.shape), t),
                "poor": 4 - t}[quality].astype(int)
    if k == "accuracy":
        return {"perfect": t, "noisy": np.where(rng.random(t.shape) < 0.5, rng.integers(1, 8, t.shape), t),
                "poor": t % 7 + 1}[quality].astype(int)
    if k == "rmse":
        return {"perfect": t, "noisy": t + rng.normal(0, 0.1, t.shape), "poor": t + 5}[quality]
    if k == "rmsle":
        return {"perfect": t, "noisy": t * rng.uniform(0.8, 1.2, t.shape), "poor": 3 * t + 1}[quality]
    if k == "text_accuracy":
        wrong = np.full(t.shape, "zzz", dtype=object)
        return {"perfect": t, "noisy": np.where(rng.random(t.shape) < 0.5, wrong, t), "poor": wrong}[quality]
    raise AssertionError(k)


def _reference(case, answers, sub) -> float:
    """The score, from the answers and the submission frames, by the formula of the competition."""
    if case.id_column in sub and case.comp_id != "nomad2018-predict-transparent-conductors":
        key = "__key"
        a = answers.copy().assign(**{key: answers[case.id_column].astype(str)})
        s = sub.copy().assign(**{key: sub[case.id_column].astype(str)})
        if case.comp_id == "new-york-city-taxi-fare-prediction":   # paired after sorting, keys ignored
            a, s = a.sort_values(key, kind="stable"), s.sort_values(key, kind="stable")
        else:
            # Copies of an id pair in order of appearance.
            a = a.assign(__n=a.groupby(key).cumcount()).sort_values([key, "__n"])
            s = s.assign(__n=s.groupby(key).cumcount()).sort_values([key, "__n"])
    else:
        a, s = answers, sub
    t = a[list(case.targets)].to_numpy()
    p = s[list(case.targets)].to_numpy()
    k = case.kind
    if k == "text_accuracy":
        t = np.array(["nan" if pd.isna(v) else str(v) for v in t[:, 0]])
        p = np.array(["nan" if pd.isna(v) else str(v) for v in p[:, 0]])
        return ref.accuracy(t, p)
    t, p = t.astype(float), p.astype(float)
    if k == "auc":
        return ref.auc(t[:, 0], p[:, 0])
    if k == "mean_auc":
        scored = t.sum(axis=1) >= 0  # jigsaw's -1 rows are not scored
        return ref.mean_auc(t[scored], p[scored])
    if k == "multi_log_loss":
        return ref.multiclass_log_loss(t, p)
    if k == "binary_log_loss":
        return ref.binary_log_loss(t[:, 0], p[:, 0])
    if k == "qwk":
        return ref.quadratic_kappa(t[:, 0].astype(int), p[:, 0].astype(int))
    if k == "accuracy":
        return ref.accuracy(t[:, 0], p[:, 0])
    if k == "rmse":
        return ref.rmse(t, p)
    if k == "rmsle":
        return ref.mean_column_rmsle(t, p)
    raise AssertionError(k)


def _medal_by_position(score: float, board: np.ndarray, lower: bool):
    """MLE-bench's rule for 100-249 teams: gold = 10th row, silver = int(0.2 T)th, bronze = int(0.4 T)th."""
    teams = len(board)
    gold, silver, bronze = board[9], board[int(0.2 * teams) - 1], board[int(0.4 * teams) - 1]
    reach = (lambda cut: score <= cut) if lower else (lambda cut: score >= cut)
    medal = "gold" if reach(gold) else "silver" if reach(silver) else "bronze" if reach(bronze) else None
    above = score < np.median(board) if lower else score > np.median(board)
    return medal, bool(above)


def _submission(comp, case, quality, rng, *, shuffle=True) -> pd.DataFrame:
    answers = _answers(comp)
    sub = _sample(comp)
    truth = answers[list(case.targets)].to_numpy() if case.kind != "text_accuracy" else \
        pd.read_csv(comp.answers_path, keep_default_na=False)[list(case.targets)].to_numpy()
    # The sample lists the answers' ids in the answers' order (prepare.py writes both from one frame).
    assert sub[case.id_column].astype(str).tolist() == answers[case.id_column].astype(str).tolist()
    sub[list(case.targets)] = _predictions(case, truth, quality, rng)
    if shuffle and LITE_SPECS[comp.comp_id].rules.pairing == "id":
        sub = sub.sample(frac=1.0, random_state=0)
    return sub.copy()


def test_every_lite_competition_is_covered():
    assert sorted(LITE_SPECS) == sorted(MLEBENCH_LITE) == sorted(LITE_CASES)
    assert len(MLEBENCH_LITE) == 22


@pytest.mark.parametrize("comp_id", MLEBENCH_LITE)
def test_loads_with_the_metric_its_grader_names(lite, comp_id):
    comp, case = _load(lite, comp_id), LITE_CASES[comp_id]
    assert comp.id_column == case.id_column and comp.target_columns == case.targets
    assert comp.higher_is_better == (not case.lower_is_better)
    assert comp.answers_file == case.answers and (comp.public_dir / comp.sample_submission_file).is_file()
    assert len(comp.leaderboard) == 120 and comp.description.startswith(f"# {comp_id}")
    # The sample submission is valid everywhere (the one the agent sees may be zipped).
    shown = pd.read_csv(comp.public_dir / comp.sample_submission_file, nrows=3)
    assert case.id_column in shown.columns
    assert grade_submission(comp, comp.private_dir.parent / case.sample).valid


@pytest.mark.parametrize("comp_id", MLEBENCH_LITE)
def test_perfect_noisy_and_poor_submissions_score_as_the_formula(lite, comp_id, tmp_path):
    comp, case = _load(lite, comp_id), LITE_CASES[comp_id]
    answers = _answers(comp)
    board = pd.read_csv(lite[1] / comp_id / "leaderboard.csv")["score"].to_numpy(float)
    rng = np.random.default_rng(7)
    scores = {}
    for quality in ("perfect", "noisy", "poor"):
        sub = _submission(comp, case, quality, rng)
        path = tmp_path / f"{quality}.csv"
        sub.to_csv(path, index=False)
        result = grade_submission(comp, path)
        assert result.valid, (quality, result.reason, result.detail)
        want = _reference(case, answers, pd.read_csv(path))
        assert result.score == pytest.approx(want, abs=5e-6 + 1e-12), quality
        assert result.score == round(result.score, 5)
        medal, above = _medal_by_position(result.score, board, case.lower_is_better)
        assert (result.medal, result.above_median) == (medal, above), quality
        scores[quality] = result.score if not case.lower_is_better else -result.score
    assert scores["perfect"] > scores["noisy"] > scores["poor"]


def _grade_frame(comp, frame, tmp_path, name="bad.csv"):
    path = tmp_path / name
    if isinstance(frame, str):
        path.write_text(frame)
    else:
        frame.to_csv(path, index=False)
    return grade_submission(comp, path)


@pytest.mark.parametrize("comp_id", MLEBENCH_LITE)
def test_each_validity_rule_rejects_a_submission_that_breaks_it(lite, comp_id, tmp_path):
    comp, case = _load(lite, comp_id), LITE_CASES[comp_id]
    rules = comp.rules
    good = _submission(comp, case, "noisy", np.random.default_rng(3), shuffle=False)
    target = case.targets[0]

    def check(frame, reason, *words):
        result = _grade_frame(comp, frame, tmp_path)
        assert not result.valid and result.reason == reason, (reason, result.reason, result.detail)
        for word in words:
            assert word in result.detail, (word, result.detail)

    check(good.drop(columns=[target]), "wrong_columns", repr(target))
    check(good.iloc[:-1], "wrong_rows", f"expected {len(good)}")
    check("", "unreadable")
    if rules.pairing == "id":
        unknown = good.copy()
        unknown[case.id_column] = unknown[case.id_column].astype(object)
        unknown.iloc[5, unknown.columns.get_loc(case.id_column)] = "no-such-id"
        check(unknown, "bad_ids", "no-such-id")
        twice = good.copy()
        twice.iloc[5, twice.columns.get_loc(case.id_column)] = twice.iloc[6][case.id_column]
        check(twice, "duplicate_ids")
    if case.kind != "text_accuracy":
        word = good.copy()
        word[target] = word[target].astype(object)
        word.iloc[3, word.columns.get_loc(target)] = "high"
        check(word, "wrong_dtype", "'high'")
        hole = good.copy()
        hole[target] = hole[target].astype(object)
        hole.iloc[4, hole.columns.get_loc(target)] = ""
        check(hole, "nan_values", repr(target))
    if case.kind in ("auc", "mean_auc", "binary_log_loss", "multi_log_loss"):
        over = good.copy()
        over.iloc[2, over.columns.get_loc(target)] = 1.5
        check(over, "out_of_range", "[0, 1]", "1.5")
        under = good.copy()
        under[target] = under[target].astype(float)
        under.iloc[2, under.columns.get_loc(target)] = -0.25
        check(under, "out_of_range", "-0.25")
    if rules.sum_to_one:
        scaled = good.copy()
        scaled[list(case.targets)] = scaled[list(case.targets)] * 0.98
        check(scaled, "not_normalized", "sum to 1")
        nudged = good.copy()
        nudged.iloc[0, nudged.columns.get_loc(target)] += 5e-7  # within np.isclose(atol=1e-6)
        assert _grade_frame(comp, nudged, tmp_path).valid
    extra = good.assign(comment="extra column")
    if rules.extra_columns:
        assert _grade_frame(comp, extra, tmp_path).score == _grade_frame(comp, good, tmp_path, "good.csv").score
    else:
        check(extra, "wrong_columns", "'comment'")


def test_jigsaw_scores_columns_in_file_order_and_skips_minus_one_rows(lite, tmp_path):
    comp = _load(lite, "jigsaw-toxic-comment-classification-challenge")
    case = LITE_CASES[comp.comp_id]
    answers = _answers(comp)
    assert (answers[list(case.targets)].sum(axis=1) < 0).sum() == 4
    sub = _submission(comp, case, "noisy", np.random.default_rng(5), shuffle=False)
    swapped = sub[["id", *reversed(case.targets)]]
    result = _grade_frame(comp, swapped, tmp_path)
    # MLE-bench takes the submission's columns in the file's order, whatever their names.
    as_named = swapped.copy()
    as_named.columns = ["id", *case.targets]
    assert result.valid and result.score == pytest.approx(_reference(case, answers, as_named), abs=5e-6)
    assert result.score != _grade_frame(comp, sub, tmp_path, "ordered.csv").score
    # Predictions on the -1 rows do not count.
    scrambled = sub.copy()
    minus = (answers[list(case.targets)].sum(axis=1) < 0).to_numpy()
    scrambled.loc[minus, list(case.targets)] = 0.987
    assert _grade_frame(comp, scrambled, tmp_path).score == _grade_frame(comp, sub, tmp_path, "s.csv").score


def test_nomad_pairs_rows_by_position_and_rejects_logs_of_values_below_minus_one(lite, tmp_path):
    comp = _load(lite, "nomad2018-predict-transparent-conductors")
    case = LITE_CASES[comp.comp_id]
    answers = _answers(comp)
    sub = _submission(comp, case, "perfect", np.random.default_rng(0), shuffle=False)
    flipped = sub.iloc[::-1]
    result = _grade_frame(comp, flipped, tmp_path)
    want = ref.mean_column_rmsle(answers[list(case.targets)].to_numpy(float), flipped[list(case.targets)].to_numpy(float))
    assert result.valid and result.score == pytest.approx(want, abs=5e-6) and result.score > 0.01
    no_ids = sub.drop(columns=["id"])
    assert _grade_frame(comp, no_ids, tmp_path).score == 0.0
    negative = sub.copy()
    negative.iloc[0, 1] = -1.5
    bad = _grade_frame(comp, negative, tmp_path)
    assert bad.reason == "metric_error" and "mcrmsle" in bad.detail


def test_taxi_sorts_by_key_without_comparing_keys(lite, tmp_path):
    comp = _load(lite, "new-york-city-taxi-fare-prediction")
    case = LITE_CASES[comp.comp_id]
    answers = _answers(comp)
    sub = _submission(comp, case, "noisy", np.random.default_rng(1), shuffle=False)
    renamed = sub.assign(key=[f"k{i:03d}" for i in range(len(sub))])
    result = _grade_frame(comp, renamed, tmp_path)
    assert result.valid and result.score == pytest.approx(_reference(case, answers, renamed), abs=5e-6)


def test_insults_pairs_repeated_comments_and_text_normalization_reads_na_tokens(lite, tmp_path):
    insults = _load(lite, "detecting-insults-in-social-commentary")
    answers = _answers(insults)
    assert answers["Comment"].duplicated().sum() >= 1 and "Usage" in answers.columns
    text = _load(lite, "text-normalization-challenge-english-language")
    sub = _sample(text)
    assert (sub["after"].iloc[:2] == ["NA", "null"]).all()
    # The answers' "NA" is read as missing on both sides, so echoing it back is right.
    result = _grade_frame(text, sub.assign(after=pd.read_csv(text.answers_path, keep_default_na=False)["after"]),
                          tmp_path)
    assert result.valid and result.score == 1.0


def test_leaderboard_must_run_best_first_and_lfs_pointers_are_named(lite, tmp_path):
    import shutil

    data, meta = tmp_path / "data", tmp_path / "meta"
    shutil.copytree(lite[0] / "aerial-cactus-identification", data / "aerial-cactus-identification")
    shutil.copytree(lite[1] / "aerial-cactus-identification", meta / "aerial-cactus-identification")
    board = meta / "aerial-cactus-identification" / "leaderboard.csv"
    frame = pd.read_csv(board)
    frame.iloc[::-1].to_csv(board, index=False)
    with pytest.raises(ValueError, match="best first"):
        load_mlebench_competition(data, "aerial-cactus-identification", competitions_dir=meta)
    board.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n")
    with pytest.raises(ValueError, match="git lfs pull"):
        load_mlebench_competition(data, "aerial-cactus-identification", competitions_dir=meta)
    (meta / "aerial-cactus-identification" / "config.yaml").write_text("grader:\n  name: bleu\n")
    with pytest.raises(ValueError, match="unknown MLE-bench grader 'bleu'"):
        load_mlebench_competition(data, "aerial-cactus-identification", competitions_dir=meta)


SCRIPTED = {
    # Class priors from the training labels, in the sample's layout.
    "spooky-author-identification": (
        "import pandas as pd, os\n"
        "train = pd.read_csv('data/train.csv'); sub = pd.read_csv('data/sample_submission.csv')\n"
        "prior = train['author'].value_counts(normalize=True)\n"
        "for c in sub.columns[1:]:\n    sub[c] = prior.get(c, 0.0)\n"
        "sub[sub.columns[1:]] = sub[sub.columns[1:]].div(sub[sub.columns[1:]].sum(axis=1), axis=0)\n"
        "os.makedirs('submission', exist_ok=True); sub.to_csv('submission/submission.csv', index=False)\n"),
    # The public files are zips; the identity baseline (after = before).
    "text-normalization-challenge-english-language": (
        "import pandas as pd, os\n"
        "sub = pd.read_csv('data/en_sample_submission_2.csv.zip', keep_default_na=False)\n"
        "os.makedirs('submission', exist_ok=True); sub.to_csv('submission/submission.csv', index=False)\n"),
    # Training means, rows in test order (nomad pairs by position).
    "nomad2018-predict-transparent-conductors": (
        "import pandas as pd, os\n"
        "train = pd.read_csv('data/train.csv'); test = pd.read_csv('data/test.csv')\n"
        "cols = ['formation_energy_ev_natom', 'bandgap_energy_ev']\n"
        "sub = pd.DataFrame({'id': test['id'], **{c: train[c].mean() for c in cols}})\n"
        "os.makedirs('submission', exist_ok=True); sub.to_csv('submission/submission.csv', index=False)\n"),
}


def test_all_22_load_from_one_folder_and_scripted_episodes_run_on_three(tmp_path):
    # As a user would: one data folder with the competition files copied beside the data.
    write_lite_folder(tmp_path / "mlebench", n=24, seed=1)
    comps = load_mlebench_suite(tmp_path / "mlebench", "lite")
    assert [c.comp_id for c in comps] == list(MLEBENCH_LITE)
    by_id = {c.comp_id: c for c in comps}
    with SubprocessSandbox(SandboxLimits(wall_time_s=120)) as sandbox:
        for comp_id, code in SCRIPTED.items():
            comp = by_id[comp_id]
            actions = ["<request_info>sample_submission</request_info>",
                       format_action(Action("execute_code", code)), "<submit/>"]
            with MLEEnv(comp, sandbox, reward_cfg=RewardConfig(), max_steps=4, exec_timeout_s=120,
                        instrument=True) as env:
                episode = run_episode(env, scripted_policy(actions))
            outcomes = [s.outcome for s in episode.steps]
            assert outcomes == ["info", "valid", "submit"], [s.observation for s in episode.steps]
            assert "id" in episode.steps[0].observation
            grade = episode.final_grade
            assert grade.valid and grade.score is not None and episode.steps_to_first_valid == 2
            if comp_id.startswith("text-normalization"):
                assert grade.score == grade_submission(comp, comp.private_dir / "sample_submission.csv").score
