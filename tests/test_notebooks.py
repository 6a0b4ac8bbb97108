"""notebooks/ablations.ipynb runs end to end (nbclient, the venv's python3 kernel) at the smallest budget."""
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "ablations.ipynb"
VARIANTS = ["AceGRPO", "no_buffer", "uniform_sampling", "sync"]
# The smallest setting: one learner step, two training competitions, one held-out competition and
# one eval seed, one action per episode.
FAST = ["+exp=tiny_smoke", "train.steps=1", "train.competitions=2", "eval.competitions=1", "eval.seeds=[0]",
        "env.max_steps=1"]


def _set_parameters(nb, **values):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    # Appended assignments override the defaults above them, as papermill's injected cell does.
    cells[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())


@pytest.mark.slow
def test_ablations_notebook_runs_the_study_and_plots_every_variant(tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _set_parameters(nb, budget=1, seeds=[0], variants=VARIANTS, out_root=str(tmp_path), extra_overrides=FAST)
    # The kernel inherits this process's environment (conftest: CPU, 8 fake devices). The per-cell
    # timeout is generous because the cell with the four runs takes ~2 min idle and 2-3x that under load.
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()

    # bench/learning.py's outputs, which the notebook read back.
    assert (tmp_path / "table.csv").is_file() and (tmp_path / "ablations.png").is_file()
    for name in ("training_curves.png", "held_out_metrics.png"):
        png = tmp_path / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((tmp_path / "ablations.json").read_text())
    assert list(summary) == VARIANTS
    for variant, entry in summary.items():
        # The plotted curve is the run's own metrics file, one point per learner step of the budget.
        (path,) = entry["metrics_paths"]
        records = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        assert [[r["reward_mean"] for r in records]] == entry["reward_curves"]
        assert [r["step"] for r in records] == [1]
        assert Path(path).parent == tmp_path / f"{variant}_seed0"
    # no_buffer inserts no child tasks: its table holds the two initial states only.
    no_buffer = [json.loads(ln) for ln in Path(summary["no_buffer"]["metrics_paths"][0]).read_text().splitlines()]
    assert all(r["table_size"] == 2 for r in no_buffer)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for variant in VARIANTS:
        assert f"{variant}: after RL" in printed
    assert "difference from AceGRPO" in printed
