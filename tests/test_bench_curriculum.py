"""bench/curriculum.py: its correctness checks pass, the NumPy round's eviction helper breaks ties by
row, and the script runs end to end on a small table, printing every path's time and both ratios."""
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import curriculum  # noqa: E402


def test_numpy_round_matches_list_of_dicts_jitted_and_block_index():
    assert curriculum.check_rounds(capacity=600, rounds=3).endswith("ok")


def test_numpy_and_block_index_samplers_match_jitted_sampler():
    assert curriculum.check_sampler(capacity=600, draws=100).endswith("ok")


def test_smallest_takes_ties_by_lowest_row_and_skips_inf():
    x = np.array([3.0, 0.0, np.inf, 0.0, 1.0, 0.0, np.inf], np.float32)
    assert curriculum.smallest(x, 2).tolist() == [1, 3]
    assert curriculum.smallest(x, 4).tolist() == [1, 3, 5, 4]
    assert curriculum.smallest(x, 7).tolist() == [1, 3, 5, 4, 0]  # inf rows are never evicted
    assert curriculum.smallest(x, 0).tolist() == []


def test_script_runs_on_a_small_table():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "curriculum.py"), "--capacity", "20000",
                           "--rounds", "3", "--numpy-rounds", "2", "--baseline-rounds", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-4000:]
    for line in ("check: NumPy == list-of-dicts == jitted update_stats + insert == block index",
                 "check: sampler inclusion by LP level (NumPy/jitted/indexed", "jitted, full table:",
                 "jitted, block index:", "vectorised NumPy:", "plain-Python round:", "block index vs list-of-dicts:",
                 "jitted (block index) vs vectorised NumPy:"):
        assert line in out, out
