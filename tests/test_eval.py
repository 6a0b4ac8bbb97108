"""Evaluation metrics against NumPy, over episodes and over seeds."""
import dataclasses

import numpy as np
import pytest

from ace.env.task import GradeResult
from ace.eval import (LITE_ROWS, METRICS, EpisodeSummary, MeanSE, evaluate, evaluate_episodes,
                      format_lite_table, format_table, mean_se, summarize_episode)


def _random_summaries(rng, n, seeds):
    out = []
    for i in range(n):
        valid = bool(rng.random() < 0.7)
        medal = rng.choice([None, "gold", "silver", "bronze"], p=[0.5, 0.1, 0.2, 0.2]) if valid else None
        out.append(EpisodeSummary(
            comp_id=f"c{i % 3}", seed=int(rng.choice(seeds)), valid=valid, medal=medal,
            above_median=valid and bool(rng.random() < 0.5),
            human_rank=float(rng.random()) if valid else None,
            steps_to_first_valid=int(rng.integers(1, 6)) if valid else None, num_steps=6, max_steps=6))
    return out


def _numpy_columns(rows):
    return {
        "valid_rate": np.array([r.valid for r in rows], float),
        "gold_rate": np.array([r.medal == "gold" for r in rows], float),
        "silver_rate": np.array([r.medal == "silver" for r in rows], float),
        "bronze_rate": np.array([r.medal == "bronze" for r in rows], float),
        "any_medal_rate": np.array([r.medal is not None for r in rows], float),
        "above_median_rate": np.array([r.above_median for r in rows], float),
        "human_rank": np.array([r.human_rank if r.valid else 0.0 for r in rows], float),
        "steps_to_first_valid": np.array([r.steps_to_first_valid for r in rows if r.valid], float),
        "steps_to_first_valid_censored": np.array([r.steps_to_first_valid if r.valid else 7 for r in rows], float),
    }


def _np_mean_se(x):
    return x.mean(), (x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_single_seed_metrics_match_numpy_over_episodes(seed):
    rows = _random_summaries(np.random.default_rng(seed), 40, seeds=[0])
    got = evaluate(rows)
    assert set(got) == set(METRICS)
    for name, col in _numpy_columns(rows).items():
        mean, se = _np_mean_se(col)
        assert got[name].mean == pytest.approx(mean) and got[name].se == pytest.approx(se), name
        assert got[name].n == len(col)


def test_several_seeds_average_within_seed_then_take_se_over_seeds():
    rows = _random_summaries(np.random.default_rng(5), 90, seeds=[0, 1, 2])
    got = evaluate(rows)
    for name in METRICS:
        per_seed = np.array([_numpy_columns([r for r in rows if r.seed == s])[name].mean() for s in (0, 1, 2)])
        mean, se = _np_mean_se(per_seed)
        assert got[name].mean == pytest.approx(mean) and got[name].se == pytest.approx(se), name
        assert got[name].n == 3


def test_summary_of_an_episode_uses_its_final_grade():
    class Ep:
        comp_id, steps, steps_to_first_valid = "c", (1, 2, 3), 2
        final_grade = GradeResult(valid=True, reason=None, detail="", score=0.9, medal="silver",
                                  above_median=True, human_rank=0.8)

    class Failed(Ep):
        final_grade, steps_to_first_valid = None, None

    s = summarize_episode(Ep(), seed=4)
    assert (s.valid, s.medal, s.above_median, s.human_rank, s.num_steps, s.seed) == (True, "silver", True, 0.8, 3, 4)
    res = evaluate_episodes({0: [Ep(), Failed()]})
    assert res["valid_rate"].mean == 0.5 and res["silver_rate"].mean == 0.5
    assert res["human_rank"].mean == pytest.approx(0.4) and res["steps_to_first_valid"].n == 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        evaluate([])
    with pytest.raises(ValueError, match="'platinum'"):
        EpisodeSummary("c", 0, True, "platinum", False, None, None, 1)
    with pytest.raises(ValueError, match="no medal"):
        EpisodeSummary("c", 0, False, "gold", False, None, None, 1)
    assert mean_se([]).n == 0 and str(mean_se([])) == "n/a"


def test_format_table_lists_every_metric_for_every_run():
    a = evaluate(_random_summaries(np.random.default_rng(0), 10, seeds=[0]))
    b = {k: MeanSE(0.25, 0.125, 4) for k in a}
    table = format_table({"base": a, "ace": b})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "ace"]
    for name in METRICS:
        assert any(line.startswith(name) and "0.250 ± 0.125 (n=4)" in line for line in lines), name
    assert format_table(a).splitlines()[0].split() == ["metric", "result"]


def test_lite_table_shows_the_paper_rows_in_order():
    a = {**evaluate(_random_summaries(np.random.default_rng(1), 10, seeds=[0, 1])), "mean_reward": MeanSE(1, 0, 2)}
    lines = format_lite_table(a).splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == list(LITE_ROWS) == [
        "valid_rate", "any_medal_rate", "above_median_rate", "human_rank", "steps_to_first_valid",
        "steps_to_first_valid_censored"]
    full = {ln.split()[0]: ln for ln in format_table(a).splitlines()[2:]}
    assert lines[2:] == [full[name] for name in LITE_ROWS]   # the same cells as the full table
    assert "mean_reward" not in format_lite_table(a) and " ± " in lines[2]
    with pytest.raises(ValueError, match="rows="):
        format_table(a, rows=[])


def test_steps_to_first_valid_is_reported_as_the_paper_counts_it_and_censored():
    fast = EpisodeSummary("a", 0, True, None, False, 0.5, 2, 3, max_steps=4)
    failed = EpisodeSummary("b", 0, False, None, False, None, None, 4, max_steps=4)
    res = evaluate([fast, failed])
    # The paper's count ignores the failed episode; censored, it costs max_steps + 1 = 5.
    assert (res["steps_to_first_valid"].mean, res["steps_to_first_valid"].n) == (2.0, 1)
    assert (res["steps_to_first_valid_censored"].mean, res["steps_to_first_valid_censored"].n) == (3.5, 2)
    # Failing more often cannot look faster: a policy that fails the slow competition instead of
    # solving it at step 4 has the same uncensored mean but a worse censored one.
    solved = EpisodeSummary("b", 0, True, None, False, 0.1, 4, 4, max_steps=4)
    assert evaluate([fast, solved])["steps_to_first_valid_censored"].mean == 3.0
    # Without the episode limit the censored value is unknown, not guessed.
    unknown = evaluate([dataclasses.replace(failed, max_steps=None)])
    assert unknown["steps_to_first_valid_censored"].n == 0
    with pytest.raises(ValueError, match="max_steps=0"):
        dataclasses.replace(failed, max_steps=0)


def test_paired_bootstrap_interval_follows_the_paired_differences():
    from ace.eval import paired_bootstrap

    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 5.0, size=8)          # shared by both variants of a seed
    a = seed_effect + rng.normal(0, 0.1, size=8)
    b = seed_effect + 1.0 + rng.normal(0, 0.1, size=8)
    diff = paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert diff.mean == pytest.approx(np.mean(b - a)) and diff.n == 8
    # Pairing cancels the large seed effect: the interval is narrow and excludes 0.
    assert 0.8 < diff.low < diff.mean < diff.high < 1.2
    # The same resamples written out: percentiles of the means of resampled differences.
    idx = np.random.default_rng(1).integers(0, 8, size=(4000, 8))
    means = (b - a)[idx].mean(axis=1)
    assert (diff.low, diff.high) == tuple(pytest.approx(q) for q in np.quantile(means, [0.025, 0.975]))
    same = paired_bootstrap(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([np.nan], [1.0]).n == 0 and str(paired_bootstrap([], [])) == "n/a"
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0, 2.0], [1.0])
