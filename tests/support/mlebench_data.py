"""Small MLE-bench competitions written in the layout `mlebench prepare` leaves, for tests.

`write_mlebench_folder(root)` writes three MLE-bench-Lite competitions with the real ids, file names
and id/target columns, random data of a few dozen rows, a Kaggle-style leaderboard.csv and a
description.md per competition (in the competition folder itself, as when the mle-bench repo's
competition files are copied beside the data).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

THREE_LITE = ("spooky-author-identification", "tabular-playground-series-may-2022",
              "tabular-playground-series-dec-2021")


def _leaderboard(folder: Path, rng: np.random.Generator, lo: float, hi: float, n: int = 120) -> None:
    scores = np.sort(rng.uniform(lo, hi, size=n))
    pd.DataFrame({"teamId": range(n), "score": scores}).to_csv(folder / "leaderboard.csv", index=False)


def _dirs(root: Path, comp: str) -> tuple[Path, Path, Path]:
    base = root / comp
    public, private = base / "prepared" / "public", base / "prepared" / "private"
    public.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    return base, public, private


def _spooky(root: Path, rng: np.random.Generator, n: int) -> None:
    base, public, private = _dirs(root, "spooky-author-identification")
    ids = [f"id{i:05d}" for i in range(2 * n)]
    authors = rng.choice(["EAP", "HPL", "MWS"], size=2 * n)
    words = ["dark", "night", "ocean", "love", "fear", "house", "old", "strange"]
    text = [" ".join(rng.choice(words, size=6)) for _ in range(2 * n)]
    pd.DataFrame({"id": ids[:n], "text": text[:n], "author": authors[:n]}).to_csv(public / "train.csv", index=False)
    pd.DataFrame({"id": ids[n:], "text": text[n:]}).to_csv(public / "test.csv", index=False)
    pd.DataFrame({"id": ids[n:], "EAP": 0.403, "HPL": 0.287, "MWS": 0.31}).to_csv(
        public / "sample_submission.csv", index=False)
    onehot = pd.get_dummies(pd.Series(authors[n:])).reindex(columns=["EAP", "HPL", "MWS"], fill_value=0).astype(int)
    pd.concat([pd.DataFrame({"id": ids[n:]}), onehot], axis=1).to_csv(private / "test.csv", index=False)
    _leaderboard(base, rng, 0.15, 1.2)
    (base / "description.md").write_text("# Spooky Author Identification\nPredict the author of each sentence "
                                         "(EAP, HPL, MWS) as probabilities; scored by multi-class log loss.\n")


def _tps_may(root: Path, rng: np.random.Generator, n: int) -> None:
    base, public, private = _dirs(root, "tabular-playground-series-may-2022")
    x = rng.normal(size=(2 * n, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=2 * n) > 0).astype(int)
    cols = {f"f_{i:02d}": x[:, i] for i in range(4)}
    train = pd.DataFrame({"id": range(n), **{k: v[:n] for k, v in cols.items()}, "target": y[:n]})
    train.to_csv(public / "train.csv", index=False)
    pd.DataFrame({"id": range(n, 2 * n), **{k: v[n:] for k, v in cols.items()}}).to_csv(public / "test.csv", index=False)
    pd.DataFrame({"id": range(n, 2 * n), "target": 0.5}).to_csv(public / "sample_submission.csv", index=False)
    pd.DataFrame({"id": range(n, 2 * n), "target": y[n:]}).to_csv(private / "test.csv", index=False)
    _leaderboard(base, rng, 0.6, 0.99)
    (base / "description.md").write_text("# Tabular Playground Series - May 2022\nPredict the binary `target` "
                                         "from the features; scored by ROC AUC.\n")


def _tps_dec(root: Path, rng: np.random.Generator, n: int) -> None:
    base, public, private = _dirs(root, "tabular-playground-series-dec-2021")
    x = rng.normal(size=(2 * n, 3))
    y = 1 + np.digitize(x[:, 0] + 0.2 * rng.normal(size=2 * n), [-0.5, 0.5])
    cols = {name: x[:, i] for i, name in enumerate(["Elevation", "Aspect", "Slope"])}
    pd.DataFrame({"Id": range(n), **{k: v[:n] for k, v in cols.items()}, "Cover_Type": y[:n]}).to_csv(
        public / "train.csv", index=False)
    pd.DataFrame({"Id": range(n, 2 * n), **{k: v[n:] for k, v in cols.items()}}).to_csv(public / "test.csv", index=False)
    pd.DataFrame({"Id": range(n, 2 * n), "Cover_Type": 2}).to_csv(public / "sample_submission.csv", index=False)
    pd.DataFrame({"Id": range(n, 2 * n), "Cover_Type": y[n:]}).to_csv(private / "test.csv", index=False)
    _leaderboard(base, rng, 0.5, 0.96)
    (base / "description.md").write_text("# Tabular Playground Series - Dec 2021\nPredict the forest "
                                         "`Cover_Type` (1-3) from the features; scored by accuracy.\n")


def write_mlebench_folder(root: str | Path, *, n: int = 40, seed: int = 0) -> Path:
    """Writes the three competitions of THREE_LITE under `root`; returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    _spooky(root, rng, n)
    _tps_may(root, rng, n)
    _tps_dec(root, rng, n)
    return root
