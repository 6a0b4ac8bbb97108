"""The step reward (ordering, the ML-Agent improvement formula) and instrumentation milestones."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ace.env.reward import (MILESTONES, RewardConfig, instrument, milestones_reached,
                            step_reward, strip_markers)

CFG = RewardConfig()
scores = st.floats(-1e3, 1e3, allow_nan=False)
boards = st.lists(scores, min_size=0, max_size=30)


def _reference_valid_reward(cfg, score, best, board, higher, medal):
    baseline = best if best is not None else (np.median(board) if len(board) else score)
    spread = max(float(np.std(board)), cfg.min_spread) if len(board) >= 2 else 1.0
    z = (score - baseline) / spread * (1 if higher else -1)
    bonus = {"gold": cfg.gold_bonus, "silver": cfg.silver_bonus, "bronze": cfg.bronze_bonus}.get(medal, 0.0)
    with np.errstate(over="ignore"):
        squashed = 1 / (1 + np.exp(-z / cfg.sigmoid_temperature))
    return min(cfg.valid_base + cfg.improvement_scale * squashed + bonus, cfg.reward_cap)


@settings(max_examples=200, deadline=None)
@given(score=scores, best=st.one_of(st.none(), scores), board=boards, higher=st.booleans(),
       medal=st.sampled_from([None, "bronze", "silver", "gold"]))
def test_valid_reward_matches_numpy_sigmoid_formula(score, best, board, higher, medal):
    got, terms = step_reward("valid", cfg=CFG, score=score, best_before=best, leaderboard=board,
                             higher_is_better=higher, medal=medal)
    assert got == pytest.approx(_reference_valid_reward(CFG, score, best, board, higher, medal), abs=1e-9)
    assert set(terms) >= {"base", "improvement", "medal_bonus", "partial_credit"}


@settings(max_examples=200, deadline=None)
@given(score=scores, best=st.one_of(st.none(), scores), board=boards, higher=st.booleans(),
       milestones=st.sets(st.sampled_from(MILESTONES)))
def test_outcome_order_format_lt_runtime_lt_invalid_lt_valid(score, best, board, higher, milestones):
    fmt, _ = step_reward("format_error", cfg=CFG)
    run, _ = step_reward("runtime_error", cfg=CFG, milestones=milestones)
    inv, _ = step_reward("invalid", cfg=CFG)
    val, _ = step_reward("valid", cfg=CFG, score=score, best_before=best, leaderboard=board,
                         higher_is_better=higher)
    assert fmt < run < inv < val


def test_better_score_earns_more_in_the_metric_direction():
    board = [0.1, 0.2, 0.3, 0.4]
    hi = [step_reward("valid", cfg=CFG, score=s, best_before=0.25, leaderboard=board,
                      higher_is_better=True)[0] for s in (0.1, 0.25, 0.4)]
    lo = [step_reward("valid", cfg=CFG, score=s, best_before=0.25, leaderboard=board,
                      higher_is_better=False)[0] for s in (0.1, 0.25, 0.4)]
    assert hi[0] < hi[1] < hi[2] and lo[0] > lo[1] > lo[2]
    # No improvement sits at the sigmoid's midpoint.
    assert hi[1] == pytest.approx(CFG.valid_base + CFG.improvement_scale / 2)


def test_partial_credit_grows_per_milestone_and_is_capped():
    cfg = RewardConfig(partial_credit_per_milestone=0.1, partial_credit_cap=0.25)
    got = [step_reward("runtime_error", cfg=cfg, milestones=MILESTONES[:k])[0] for k in range(5)]
    want = [cfg.runtime_error + min(0.1 * k, 0.25) for k in range(5)]
    assert got == pytest.approx(want)


def test_reward_cap_applies():
    cfg = RewardConfig(reward_cap=0.5)
    r, _ = step_reward("valid", cfg=cfg, score=10.0, best_before=0.0, leaderboard=[0, 1], medal="gold")
    assert r == 0.5


@pytest.mark.parametrize("kwargs, needle", [
    (dict(format_error=-0.1, runtime_error=-0.5), "format_error < runtime_error"),
    (dict(runtime_error=-0.3, partial_credit_cap=0.2, invalid_submission=-0.2), "invalid_submission"),
    (dict(invalid_submission=0.5, valid_base=0.2), "invalid_submission < valid_base"),
    (dict(sigmoid_temperature=0.0), "sigmoid_temperature"),
])
def test_config_refuses_broken_ordering(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RewardConfig(**kwargs)


def test_bad_arguments_raise_with_the_value():
    with pytest.raises(ValueError, match="'crash'"):
        step_reward("crash", cfg=CFG)
    with pytest.raises(ValueError, match="finite score"):
        step_reward("valid", cfg=CFG, score=None)
    with pytest.raises(ValueError, match="'platinum'"):
        step_reward("valid", cfg=CFG, score=1.0, medal="platinum")
    with pytest.raises(ValueError, match="unknown milestones"):
        step_reward("runtime_error", cfg=CFG, milestones={"coffee"})


# --- instrumentation: run the wrapped scripts in a real interpreter ---------------------------

NEAR_MISS = '''
import numpy as np

class Model:
    def fit(self, x, y):
        self.w = float(np.mean(y))
        return self

def main():
    data = np.loadtxt("data.txt")
    model = Model().fit(data, data)
    preds = np.full(3, model.w)
    raise ValueError("wrong shape when writing predictions")

if __name__ == "__main__":
    main()
'''
IMPORT_FAILURE = '''
import numpy as np
import a_module_that_does_not_exist
data = np.loadtxt("data.txt")
'''
COMPLETE = '''
import numpy as np
data = np.loadtxt("data.txt")
w = data.mean()
np.savetxt("out.txt", np.full(2, w))
print("mean", w)
'''


def _run(code, tmp_path):
    (tmp_path / "data.txt").write_text("1\n2\n3\n")
    return subprocess.run([sys.executable, "-c", instrument(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_near_miss_scores_above_import_failure(tmp_path):
    near = _run(NEAR_MISS, tmp_path)
    fail = _run(IMPORT_FAILURE, tmp_path)
    assert near.returncode != 0 and fail.returncode != 0
    near_m = milestones_reached(near.stdout, near.stderr)
    fail_m = milestones_reached(fail.stdout, fail.stderr)
    assert near_m == {"imports", "data_loaded", "model_trained"}
    assert fail_m == set()
    r_near, _ = step_reward("runtime_error", cfg=CFG, milestones=near_m)
    r_fail, _ = step_reward("runtime_error", cfg=CFG, milestones=fail_m)
    assert r_near > r_fail


def test_traceback_points_at_the_agents_own_lines(tmp_path):
    err = _run(NEAR_MISS, tmp_path).stderr
    line = NEAR_MISS.splitlines().index('    raise ValueError("wrong shape when writing predictions")') + 1
    assert f"line {line}, in main" in err
    assert 'raise ValueError("wrong shape' in err  # the source line is shown too
    assert "_ace_" not in strip_markers(err)


def test_instrumented_script_behaves_like_the_original(tmp_path):
    wrapped = _run(COMPLETE, tmp_path)
    out_wrapped = (tmp_path / "out.txt").read_text()
    plain = subprocess.run([sys.executable, "-c", COMPLETE], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert wrapped.returncode == plain.returncode == 0
    assert wrapped.stdout == plain.stdout
    assert (tmp_path / "out.txt").read_text() == out_wrapped
    assert milestones_reached(wrapped.stderr) == set(MILESTONES) - {"model_trained"}
    assert strip_markers(wrapped.stderr).strip() == plain.stderr.strip()


def test_sys_exit_code_is_kept(tmp_path):
    res = _run("import sys\nsys.exit(3)\n", tmp_path)
    assert res.returncode == 3


def test_unparseable_code_is_left_alone():
    code = "def broken(:\n    pass\n"
    assert instrument(code) == code


def test_milestones_ignore_unknown_and_partial_markers():
    text = "[ace-milestone] imports\nxx [ace-milestone] data_loaded\n[ace-milestone] rocket\n"
    assert milestones_reached(text) == {"imports"}
    assert "imports" not in strip_markers(text) and "xx [ace-milestone] data_loaded" in strip_markers(text)


def test_instrument_parses_one_script_at_a_time(monkeypatch):
    # Rollout workers instrument scripts in threads; CPython 3.11's ast.parse is not thread-safe
    # (python/cpython#106905), so no two parses may overlap.
    import ast
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import ace.env.reward as reward

    inside, peak, lock, real_parse = [0], [0], threading.Lock(), ast.parse

    def slow_parse(code, *args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.002)
        with lock:
            inside[0] -= 1
        return real_parse(code, *args, **kwargs)

    monkeypatch.setattr(reward.ast, "parse", slow_parse)
    with ThreadPoolExecutor(8) as pool:
        scripts = list(pool.map(instrument, [f"x = {i}\n" for i in range(64)]))
    assert peak[0] == 1
    assert all("x = " in s for s in scripts)
