"""Grading: metrics against sklearn, the MLE-bench medal table at its boundaries, HumanRank,
and every validity check on a toy competition written by the test."""
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from ace.env.grading import grade_submission
from ace.env.medals import human_rank, medal_for, medal_thresholds, ranked_result
from ace.env.metrics import METRICS, metric_for_grader
from ace.env.task import Competition
from tests.support import reference_metrics as ref

RNG = np.random.default_rng(0)


def test_label_metrics_match_their_definitions():
    t = RNG.integers(0, 4, size=(200, 1))
    p = np.where(RNG.random((200, 1)) < 0.6, t, RNG.integers(0, 5, size=(200, 1)))
    assert METRICS["accuracy"].fn(t, p) == pytest.approx(ref.accuracy(t[:, 0], p[:, 0]), abs=1e-12)
    assert METRICS["macro_f1"].fn(t, p) == pytest.approx(ref.macro_f1(t[:, 0], p[:, 0]), abs=1e-12)
    assert METRICS["qwk"].fn(t, p) == pytest.approx(ref.quadratic_kappa(t[:, 0], p[:, 0]), abs=1e-12)
    s = np.array(["a", "b", "a", "c"], dtype=object)[:, None]
    assert METRICS["accuracy"].fn(s, s[::-1]) == 0.0
    with pytest.raises(ValueError, match="one target column"):
        METRICS["accuracy"].fn(np.zeros((3, 2)), np.zeros((3, 2)))


def test_roc_auc_with_ties_and_columns_matches_pair_counting():
    t = RNG.integers(0, 2, size=(300, 3))
    # Rounded scores create many ties, which count one half.
    p = np.round(np.clip(t * 0.3 + RNG.random((300, 3)), 0, 1), 1)
    assert METRICS["roc_auc"].fn(t, p) == pytest.approx(ref.mean_auc(t, p), abs=1e-12)
    assert METRICS["roc_auc"].fn(t[:, :1], p[:, :1]) == pytest.approx(ref.auc(t[:, 0], p[:, 0]), abs=1e-12)


def test_log_loss_clips_at_float64_eps_and_does_not_renormalise():
    t = RNG.integers(0, 2, size=(100, 1))
    p = RNG.uniform(0.01, 0.99, size=(100, 1))
    p[:3] = [[0.0], [1.0], [1.0]]  # confident: clipped at eps, not at 1e-15
    assert METRICS["log_loss"].fn(t, p) == pytest.approx(ref.binary_log_loss(t, p), rel=1e-12)
    onehot = np.eye(3)[RNG.integers(0, 3, size=100)]
    probs = RNG.dirichlet(np.ones(3), size=100)
    assert METRICS["log_loss"].fn(onehot, probs) == pytest.approx(ref.multiclass_log_loss(onehot, probs), abs=1e-12)
    # Rows that do not sum to one are scored as they are (validity is the rules' business).
    assert METRICS["log_loss"].fn(onehot, probs * 0.5) == pytest.approx(
        ref.multiclass_log_loss(onehot, probs * 0.5), abs=1e-12)


def test_regression_metrics_match_formulas():
    t, p = RNG.normal(size=(50, 3)), RNG.normal(size=(50, 3))
    assert METRICS["rmse"].fn(t, p) == pytest.approx(ref.rmse(t, p), abs=1e-12)
    assert METRICS["mae"].fn(t, p) == pytest.approx(ref.mae(t, p), abs=1e-12)
    assert METRICS["mcrmse"].fn(t, p) == pytest.approx(ref.mean_column_rmse(t, p), abs=1e-12)
    pos_t, pos_p = np.abs(t), np.abs(p)
    assert METRICS["mcrmsle"].fn(pos_t, pos_p) == pytest.approx(ref.mean_column_rmsle(pos_t, pos_p), abs=1e-12)


def test_grader_names_map_to_metrics():
    assert metric_for_grader("quadratic-weighted-kappa") == "qwk"
    assert metric_for_grader("root_mean_squared_error") == "rmse"
    assert metric_for_grader("Mean-Column-Wise-RMSLE") == "mcrmsle"
    with pytest.raises(KeyError, match="unknown MLE-bench grader 'bleu'"):
        metric_for_grader("bleu")


# Expected 1-based cut-off positions (gold, silver, bronze), written from the table.
MEDAL_TABLE = {
    1: (1, 1, 1), 5: (1, 1, 2), 99: (9, 19, 39), 100: (10, 20, 40), 249: (10, 49, 99),
    250: (10, 50, 100), 999: (11, 50, 100), 1000: (12, 50, 100), 2600: (15, 130, 260),
}


@pytest.mark.parametrize("teams", sorted(MEDAL_TABLE))
@pytest.mark.parametrize("higher_is_better", [True, False])
def test_medal_thresholds_follow_the_mle_bench_table(teams, higher_is_better):
    best_first = np.arange(teams, 0, -1.0) if higher_is_better else np.arange(1.0, teams + 1)
    shuffled = RNG.permutation(best_first)  # the leaderboard may come in any order
    th = medal_thresholds(shuffled, higher_is_better)
    gold, silver, bronze = MEDAL_TABLE[teams]
    assert (th.gold, th.silver, th.bronze) == (
        best_first[gold - 1], best_first[silver - 1], best_first[bronze - 1])
    assert th.median == np.median(best_first)
    # At a cut-off the medal is won; one step worse it falls to the next tier.
    worse = -1.0 if higher_is_better else 1.0
    assert medal_for(th.gold, th, higher_is_better) == "gold"
    if bronze > gold:
        assert medal_for(th.gold + worse * 0.5, th, higher_is_better) in ("silver", "bronze")
    assert medal_for(th.bronze, th, higher_is_better) == ("gold" if bronze == gold else
                                                          "silver" if bronze == silver else "bronze")
    assert medal_for(th.bronze + worse * 0.5, th, higher_is_better) is None


def test_medal_thresholds_reject_empty_leaderboard():
    with pytest.raises(ValueError, match="num_teams=0"):
        medal_thresholds([], True)


def test_human_rank_matches_brute_force_position():
    board = RNG.integers(0, 20, size=37).astype(float)
    for hib in (True, False):
        for score in np.arange(-1, 22, 0.5):
            position = 1
            for team in board:
                if (team > score) if hib else (team < score):
                    position += 1
            assert human_rank(score, board, hib) == (len(board) - position + 1) / len(board)
    assert human_rank(100.0, board, True) == 1.0 and human_rank(-100.0, board, True) == 0.0


def test_above_median_is_strict():
    board = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert not ranked_result(3.0, board, True).above_median
    assert ranked_result(3.01, board, True).above_median
    assert ranked_result(2.99, board, False).above_median


# --- validity checks on a toy competition --------------------------------------------------

@pytest.fixture()
def toy(tmp_path):
    """A 6-row binary ROC-AUC competition and a 4-row labelled one, written to tmp_path."""
    pub, priv = tmp_path / "public", tmp_path / "private"
    pub.mkdir()
    priv.mkdir()
    answers = pd.DataFrame({"id": [10, 11, 12, 13, 14, 15], "target": [0, 1, 0, 1, 1, 0]})
    answers.to_csv(priv / "answers.csv", index=False)
    answers.assign(target=0.5).to_csv(pub / "sample_submission.csv", index=False)
    auc = Competition("toy-auc", "# toy", pub, priv, "roc_auc", True, "id", ("target",),
                      tuple(np.linspace(0.5, 1.0, 20)), "binary")
    return auc, answers, tmp_path


def _write(tmp_path, frame_or_text, name="sub.csv"):
    path = tmp_path / name
    if isinstance(frame_or_text, str):
        path.write_text(frame_or_text)
    else:
        frame_or_text.to_csv(path, index=False)
    return path


def test_valid_submission_is_scored_and_ranked_in_any_row_order(toy):
    comp, answers, tmp = toy
    pred = np.array([0.1, 0.8, 0.3, 0.7, 0.2, 0.4])
    sub = pd.DataFrame({"id": answers["id"], "target": pred}).iloc[::-1]
    result = grade_submission(comp, _write(tmp, sub))
    assert result.valid and result.reason is None
    assert result.score == pytest.approx(skm.roc_auc_score(answers["target"], pred))
    assert result.human_rank == human_rank(result.score, comp.leaderboard, True)
    # Ids written as floats ("10.0") still match integer ids.
    result2 = grade_submission(comp, _write(tmp, "id,target\n" + "".join(
        f"{i}.0,{p}\n" for i, p in zip(answers["id"], pred))))
    assert result2.valid and result2.score == result.score


def test_sample_submission_is_valid(toy):
    comp, _, _ = toy
    result = grade_submission(comp, comp.sample_submission_path)
    assert result.valid and result.score == 0.5 and result.medal is None


@pytest.mark.parametrize(
    "body, reason",
    [
        (None, "missing_file"),
        ("", "unreadable"),
        ("id,prediction\n10,0.1\n11,0.1\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "wrong_columns"),
        ("id,target,extra\n10,0.1,1\n11,0.1,1\n12,0.1,1\n13,0.1,1\n14,0.1,1\n15,0.1,1\n", "wrong_columns"),
        ("id,target\n10,0.1\n11,0.1\n", "wrong_rows"),
        ("id,target\n10,0.1\n10,0.1\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "duplicate_ids"),
        ("id,target\n10,0.1\n11,0.1\n12,0.1\n13,0.1\n14,0.1\n99,0.1\n", "bad_ids"),
        ("id,target\n10,0.1\n11,\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "nan_values"),
        ("id,target\n10,0.1\n11,NaN\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "nan_values"),
        ("id,target\n10,0.1\n11,high\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "wrong_dtype"),
        ("id,target\n10,0.1\n11,1.5\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "out_of_range"),
        ("id,target\n10,0.1\n11,inf\n12,0.1\n13,0.1\n14,0.1\n15,0.1\n", "out_of_range"),
        ('id,target\n10,"0.1\n11,0.2\n', "unreadable"),
    ],
)
def test_invalid_submissions_give_the_right_reason(toy, body, reason):
    comp, _, tmp = toy
    path = tmp / "missing.csv" if body is None else _write(tmp, body)
    result = grade_submission(comp, path)
    assert not result.valid and result.reason == reason, result.detail
    assert result.score is None and result.medal is None and result.human_rank is None


def test_label_submissions_check_dtype_and_known_labels(tmp_path):
    pub, priv = tmp_path / "public", tmp_path / "private"
    pub.mkdir()
    priv.mkdir()
    pd.DataFrame({"id": [1, 2, 3], "f": [0, 1, 2], "label": [0, 1, 2]}).to_csv(pub / "train.csv", index=False)
    pd.DataFrame({"id": [7, 8], "label": [1, 1]}).to_csv(priv / "answers.csv", index=False)
    comp = Competition("toy-acc", "#", pub, priv, "accuracy", True, "id", ("label",), (0.5, 1.0), "multiclass")
    # Label 2 never appears in the answers but is a known class from train.csv.
    assert grade_submission(comp, _write(tmp_path, "id,label\n7,2\n8,1\n")).score == 0.5
    assert grade_submission(comp, _write(tmp_path, "id,label\n7,1.0\n8,1\n")).score == 1.0
    assert grade_submission(comp, _write(tmp_path, "id,label\n7,1.5\n8,1\n")).reason == "wrong_dtype"
    assert grade_submission(comp, _write(tmp_path, "id,label\n7,cat\n8,1\n")).reason == "wrong_dtype"
    assert grade_submission(comp, _write(tmp_path, "id,label\n7,9\n8,1\n")).reason == "out_of_range"
    gold = grade_submission(comp, _write(tmp_path, "id,label\n7,1\n8,1\n"))
    assert gold.gold and gold.human_rank == 1.0
