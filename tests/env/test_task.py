"""Competition and GradeResult: construction checks and derived properties."""
from pathlib import Path

import pytest

from ace.env.task import INVALID_REASONS, Competition, GradeResult


def _comp(**overrides):
    fields = dict(
        comp_id="toy", description="# toy", public_dir="pub", private_dir="priv",
        metric="accuracy", higher_is_better=True, id_column="id", target_columns=["label"],
        leaderboard=[0.9, 0.5], task_type="binary",
    )
    fields.update(overrides)
    return Competition(**fields)


def test_competition_normalises_paths_tuples_and_scores():
    comp = _comp()
    assert comp.public_dir == Path("pub") and comp.answers_path == Path("priv/answers.csv")
    assert comp.sample_submission_path == Path("pub/sample_submission.csv")
    assert comp.target_columns == ("label",) and comp.leaderboard == (0.9, 0.5)
    assert comp.num_teams == 2
    hash(comp)  # frozen and hashable once lists became tuples


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(task_type="vision"), "task_type='vision'"),
        (dict(target_columns=()), "target_columns"),
        (dict(target_columns="label"), "target_columns"),
        (dict(target_columns=("id",)), "id_column='id'"),
        (dict(target_columns=("a", "a")), "duplicate"),
        (dict(leaderboard=[1.0, float("nan")]), "non-finite"),
        (dict(comp_id=""), "comp_id"),
    ],
)
def test_competition_rejects_bad_fields_naming_them(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        _comp(**overrides)


def test_grade_result_medal_properties():
    r = GradeResult(True, None, "", 0.9, "silver", True, 0.8)
    assert r.any_medal and r.silver and not r.gold and not r.bronze
    none = GradeResult(True, None, "", 0.1, None, False, 0.1)
    assert not none.any_medal and not (none.gold or none.silver or none.bronze)


def test_grade_result_invalid_constructor_and_checks():
    for reason in INVALID_REASONS:
        r = GradeResult.invalid(reason, "why")
        assert not r.valid and r.reason == reason and r.score is None and not r.any_medal
    with pytest.raises(ValueError, match="reason='bogus'"):
        GradeResult.invalid("bogus", "")
    with pytest.raises(ValueError, match="medal='platinum'"):
        GradeResult(True, None, "", 1.0, "platinum", True, 1.0)
    with pytest.raises(ValueError, match="reason=None"):
        GradeResult(True, "nan_values", "", 1.0, None, True, 1.0)
