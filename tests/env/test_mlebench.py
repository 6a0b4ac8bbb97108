"""The MLE-bench loader on folders laid out as `mlebench prepare` leaves them (made here)."""
import math

import numpy as np
import pandas as pd
import pytest

from ace.env.grading import grade_submission
from ace.env.medals import medal_thresholds
from ace.env.mlebench import load_mlebench_competition, load_mlebench_suite


def _prepare_spooky(data_dir, meta_dir, n_teams=120):
    """A small spooky-author-identification: one-hot answers in private/test.csv, leaderboard
    and description in the mle-bench repo's competition folder (meta_dir)."""
    root = data_dir / "spooky-author-identification" / "prepared"
    (root / "public").mkdir(parents=True)
    (root / "private").mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = [f"id{i:05d}" for i in range(40)]
    authors = rng.choice(["EAP", "HPL", "MWS"], size=40)
    pd.DataFrame({"id": ids[:20], "text": "x", "author": authors[:20]}).to_csv(root / "public" / "train.csv", index=False)
    pd.DataFrame({"id": ids[20:], "text": "y"}).to_csv(root / "public" / "test.csv", index=False)
    sample = pd.DataFrame({"id": ids[20:], "EAP": 0.403, "HPL": 0.287, "MWS": 0.31})
    sample.to_csv(root / "public" / "sample_submission.csv", index=False)
    onehot = pd.get_dummies(pd.Series(authors[20:])).astype(int)
    answers = pd.concat([pd.DataFrame({"id": ids[20:]}), onehot[["EAP", "HPL", "MWS"]]], axis=1)
    answers.to_csv(root / "private" / "test.csv", index=False)
    comp_meta = meta_dir / "spooky-author-identification"
    comp_meta.mkdir(parents=True)
    scores = np.sort(rng.uniform(0.15, 1.2, size=n_teams))
    board = pd.DataFrame({"scoreNullable": scores, "teamId": range(n_teams), "score": scores.astype(object)})
    board.loc[n_teams - 1, "score"] = None  # a team without a score is dropped
    board.to_csv(comp_meta / "leaderboard.csv", index=False)
    (comp_meta / "description.md").write_text("# Spooky Author Identification\nPredict the author.")
    return answers, scores[:-1]


def test_loader_reads_a_prepared_mle_bench_folder(tmp_path):
    data, meta = tmp_path / "data", tmp_path / "mlebench-competitions"
    answers, scores = _prepare_spooky(data, meta)
    comp = load_mlebench_competition(data, "spooky-author-identification", competitions_dir=meta)
    assert comp.metric == "log_loss" and not comp.higher_is_better
    assert comp.id_column == "id" and comp.target_columns == ("EAP", "HPL", "MWS")
    assert comp.answers_file == "test.csv" and comp.task_type == "text"
    assert comp.description.startswith("# Spooky") and comp.leaderboard == tuple(scores)
    assert "test.csv" in {p.name for p in comp.public_dir.iterdir()}

    # The sample submission is valid; its score is the log loss written out by hand, rounded to
    # 5 decimals as MLE-bench's grader rounds it.
    sample = grade_submission(comp, comp.sample_submission_path)
    probs = np.array([0.403, 0.287, 0.31])
    truth = answers[["EAP", "HPL", "MWS"]].to_numpy()
    want = -np.mean(np.log((truth * probs).sum(axis=1)))
    assert sample.valid and sample.score == round(want, 5)

    # 119 scored teams fall under the 100-249 rule: gold is the 10th best score.
    perfect = answers.copy()
    perfect[["EAP", "HPL", "MWS"]] = truth * 0.97 + 0.01
    path = tmp_path / "submission.csv"
    perfect.to_csv(path, index=False)
    best = grade_submission(comp, path)
    assert best.valid and best.gold and best.human_rank == 1.0
    assert medal_thresholds(comp.leaderboard, False).gold == scores[9]
    wrong = answers.copy()
    wrong[["EAP", "HPL", "MWS"]] = (1 - truth) * 0.5
    wrong.to_csv(path, index=False)
    worst = grade_submission(comp, path)
    assert worst.valid and worst.medal is None and worst.human_rank == 0.0 and not worst.above_median


def test_loader_uses_config_yaml_grader_and_infers_task_type(tmp_path):
    root = tmp_path / "my-comp"
    (root / "prepared" / "public").mkdir(parents=True)
    (root / "prepared" / "private").mkdir(parents=True)
    pd.DataFrame({"key": [1, 2, 3], "fare": [0.0, 0.0, 0.0]}).to_csv(
        root / "prepared" / "public" / "sample_submission.csv", index=False)
    pd.DataFrame({"key": [1, 2, 3], "fare": [1.0, 2.0, 4.0]}).to_csv(
        root / "prepared" / "private" / "gold.csv", index=False)
    pd.DataFrame({"score": [0.5, 1.0, 2.0, 3.0]}).to_csv(root / "leaderboard.csv", index=False)
    (root / "config.yaml").write_text(
        "id: my-comp\ndataset:\n  answers: my-comp/prepared/private/gold.csv\n"
        "grader:\n  name: rmse\n")
    comp = load_mlebench_competition(tmp_path, "my-comp")
    assert (comp.metric, comp.task_type, comp.answers_file) == ("rmse", "regression", "gold.csv")
    assert comp.description == "# my-comp\n"
    result = grade_submission(comp, comp.sample_submission_path)
    assert result.score == pytest.approx(math.sqrt((1 + 4 + 16) / 3))
    assert [c.comp_id for c in load_mlebench_suite(tmp_path, "all")] == ["my-comp"]
    assert load_mlebench_suite(tmp_path, "lite") == []


def test_loader_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepared"):
        load_mlebench_competition(tmp_path, "nope")
    root = tmp_path / "odd" / "prepared"
    (root / "public").mkdir(parents=True)
    (root / "private").mkdir(parents=True)
    with pytest.raises(ValueError, match="no metric known"):
        load_mlebench_competition(tmp_path, "odd")
    pd.DataFrame({"id": [1], "y": [0.0]}).to_csv(root / "public" / "sample_submission.csv", index=False)
    pd.DataFrame({"id": [1], "y": [0.0]}).to_csv(root / "private" / "answers.csv", index=False)
    with pytest.raises(FileNotFoundError, match="leaderboard.csv"):
        load_mlebench_competition(tmp_path, "odd", metric="mae")
    with pytest.raises(ValueError, match="comp_ids='some'"):
        load_mlebench_suite(tmp_path, "some")
