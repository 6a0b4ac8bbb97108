"""bench/learning.py's statistics on made-up runs: the table, the paired differences, CSV and figure."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from ace.eval import MeanSE, paired_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.learning import FULL, HEADLINE, format_summary, plot_ablations, summarize, write_csv  # noqa: E402


def _run(rng, shift):
    after = {k: MeanSE(float(rng.random()) + shift, 0.0, 3) for k, _, _ in HEADLINE}
    before = {k: MeanSE(float(rng.random()), 0.0, 3) for k, _, _ in HEADLINE}
    return {"after": after, "before": before}


def test_summary_rows_are_means_over_seeds_and_paired_differences(tmp_path):
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3, 4]
    results = {FULL: [_run(rng, 0.5) for _ in seeds], "no_buffer": [_run(rng, 0.0) for _ in seeds]}
    rows = summarize(results, seeds=seeds)
    assert len(rows) == 2 * len(HEADLINE)
    cell = {(r["variant"], r["metric"]): r for r in rows}
    for key, _, _ in HEADLINE:
        full = [r["after"][key].mean for r in results[FULL]]
        abl = [r["after"][key].mean for r in results["no_buffer"]]
        assert cell[FULL, key]["mean"] == pytest.approx(np.mean(full))
        assert cell[FULL, key]["se"] == pytest.approx(np.std(full, ddof=1) / np.sqrt(5))
        assert cell[FULL, key]["diff"] is None
        want = paired_bootstrap(full, abl)
        assert (cell["no_buffer", key]["diff"], cell["no_buffer", key]["diff_low"], cell["no_buffer", key]["diff_high"]) \
            == (want.mean, want.low, want.high)
    table = format_summary(rows)
    assert "difference from AceGRPO" in table and "no_buffer" in table.split("difference")[1]
    path = write_csv(rows, tmp_path / "table.csv")
    with open(path) as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(rows) and set(read[0]) >= {"variant", "metric", "mean", "se", "diff_low", "diff_high"}
    png = plot_ablations(rows, {FULL: [[0.1, 0.2], [0.0, 0.3]], "no_buffer": [[0.1, 0.1]]}, tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="runs for 4 seeds"):
        summarize(results, seeds=[0, 1, 2, 3])
