"""The 22 MLE-bench-Lite competitions, small and synthetic, in the layout `mlebench prepare` leaves.

For each competition: the public and private files under the names `prepare.py` gives them, with
the id and target columns, label formats and extra columns of the real answers (features in the
answers of the tabular ones, `Usage` in detecting-insults', `PatientID` and the two unscored
classes in ranzcr's, -1 rows in jigsaw's), the sample submission where MLE-bench keeps it (in
private/ for text normalization, whose public files are zips), and in a separate folder the
mle-bench repository's files: config.yaml (answers, sample_submission, grader name),
leaderboard.csv (best first) and description.md. Images, audio and JSON payloads are not
written: no grader reads them.

`write_lite_folder(data_dir, meta_dir)` writes all of them; `LITE_CASES[comp_id]` says what a
test needs to build submissions and score them independently.
"""
from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SPOOKY = ("EAP", "HPL", "MWS")
JIGSAW = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
PLANT = ("healthy", "multiple_diseases", "rust", "scab")
RANZCR_V1 = ("ETT - Abnormal", "ETT - Borderline", "ETT - Normal", "NGT - Abnormal", "NGT - Borderline",
             "NGT - Incompletely Imaged", "NGT - Normal", "CVC - Abnormal", "CVC - Borderline")
RANZCR_UNSCORED = ("CVC - Normal", "Swan Ganz Catheter Present")
# Stand-ins for the 120 breeds and 99 species (the graders take them from the sample's columns).
DOGS = tuple(f"breed_{i:03d}" for i in range(120))
LEAVES = tuple(f"Species_{i:02d}" for i in range(99))


@dataclass(frozen=True)
class LiteCase:
    """What the test of one competition needs.

    kind: how it is scored: auc | mean_auc | qwk | rmse | rmsle | multi_log_loss | binary_log_loss
      | accuracy | text_accuracy.
    id_column / targets: the submission's id and scored columns.
    sample: path of the sample submission relative to prepared/.
    answers: file name in prepared/private/.
    grader: config.yaml grader.name.
    """

    comp_id: str
    kind: str
    id_column: str
    targets: tuple[str, ...]
    answers: str
    sample: str
    grader: str
    lower_is_better: bool


def _case(comp_id, kind, id_column, targets, answers="test.csv", sample="public/sample_submission.csv",
          grader="auc-roc"):
    lower = kind in ("rmse", "rmsle", "multi_log_loss", "binary_log_loss")
    return LiteCase(comp_id, kind, id_column, tuple(targets), answers, sample, grader, lower)


LITE_CASES: dict[str, LiteCase] = {c.comp_id: c for c in (
    _case("aerial-cactus-identification", "auc", "id", ["has_cactus"]),
    _case("aptos2019-blindness-detection", "qwk", "id_code", ["diagnosis"], grader="quadratic-weighted-kappa"),
    _case("denoising-dirty-documents", "rmse", "id", ["value"], "answers.csv", "public/sampleSubmission.csv",
          "root_mean_squared_error"),
    _case("detecting-insults-in-social-commentary", "auc", "Comment", ["Insult"],
          sample="public/sample_submission_null.csv"),
    _case("dog-breed-identification", "multi_log_loss", "id", DOGS, grader="multi-class-log-loss"),
    _case("dogs-vs-cats-redux-kernels-edition", "binary_log_loss", "id", ["label"], "answers.csv", grader="log-loss"),
    _case("histopathologic-cancer-detection", "auc", "id", ["label"], "answers.csv"),
    _case("jigsaw-toxic-comment-classification-challenge", "mean_auc", "id", JIGSAW, grader="column-wise ROC AUC"),
    _case("leaf-classification", "multi_log_loss", "id", LEAVES, grader="multi-class-log-loss"),
    _case("mlsp-2013-birds", "auc", "Id", ["Probability"], "answers.csv"),
    _case("new-york-city-taxi-fare-prediction", "rmse", "key", ["fare_amount"], grader="root-mean-squared-error"),
    _case("nomad2018-predict-transparent-conductors", "rmsle", "id",
          ["formation_energy_ev_natom", "bandgap_energy_ev"], grader="mean-column-wise-rmsle"),
    _case("plant-pathology-2020-fgvc7", "mean_auc", "image_id", PLANT, grader="mean-column-wise-roc-auc"),
    _case("random-acts-of-pizza", "auc", "request_id", ["requester_received_pizza"],
          sample="public/sampleSubmission.csv"),
    _case("ranzcr-clip-catheter-line-classification", "mean_auc", "StudyInstanceUID", RANZCR_V1),
    _case("siim-isic-melanoma-classification", "auc", "image_name", ["target"]),
    _case("spooky-author-identification", "multi_log_loss", "id", SPOOKY, grader="multi-class-log-loss"),
    _case("tabular-playground-series-dec-2021", "accuracy", "Id", ["Cover_Type"],
          grader="multi-class-classification-accuracy"),
    _case("tabular-playground-series-may-2022", "auc", "id", ["target"]),
    _case("text-normalization-challenge-english-language", "text_accuracy", "id", ["after"], "answers.csv",
          "private/sample_submission.csv", "accuracy"),
    _case("text-normalization-challenge-russian-language", "text_accuracy", "id", ["after"], "answers.csv",
          "private/sample_submission.csv", "accuracy"),
    _case("the-icml-2013-whale-challenge-right-whale-redux", "auc", "clip", ["probability"],
          sample="public/sampleSubmission.csv"),
)}


class _Writer:
    def __init__(self, data_dir: Path, meta_dir: Path, comp_id: str, rng: np.random.Generator, n: int):
        self.case = LITE_CASES[comp_id]
        self.base = data_dir / comp_id / "prepared"
        self.public, self.private = self.base / "public", self.base / "private"
        self.public.mkdir(parents=True, exist_ok=True)
        self.private.mkdir(parents=True, exist_ok=True)
        self.meta = meta_dir / comp_id
        self.meta.mkdir(parents=True, exist_ok=True)
        self.rng, self.n = rng, n

    def csv(self, frame: pd.DataFrame, where: str, **kw) -> None:
        frame.to_csv(self.base / where, index=False, **kw)

    def finish(self, answers: pd.DataFrame, sample: pd.DataFrame, scores: tuple[float, float]) -> None:
        case = self.case
        # Text normalization's files are written with every string quoted, as prepare.py does.
        quoting = csv.QUOTE_NONNUMERIC if case.kind == "text_accuracy" else csv.QUOTE_MINIMAL
        self.csv(answers, f"private/{case.answers}", quoting=quoting)
        self.csv(sample, case.sample, quoting=quoting)
        lo, hi = scores
        board = np.sort(self.rng.uniform(lo, hi, size=120))
        board = board if case.lower_is_better else board[::-1]  # best first, as Kaggle lists it
        pd.DataFrame({"scoreNullable": board, "teamId": range(120), "score": board}).to_csv(
            self.meta / "leaderboard.csv", index=False)
        (self.meta / "config.yaml").write_text(
            f"id: {case.comp_id}\nname: {case.comp_id}\ncompetition_type: simple\nawards_medals: true\n"
            f"description: mlebench/competitions/{case.comp_id}/description.md\n\ndataset:\n"
            f"  answers: {case.comp_id}/prepared/private/{case.answers}\n"
            f"  sample_submission: {case.comp_id}/prepared/{case.sample}\n\n"
            f"grader:\n  name: {case.grader}\n  grade_fn: mlebench.competitions.{case.comp_id}.grade:grade\n")
        (self.meta / "description.md").write_text(f"# {case.comp_id}\n\nSynthetic stand-in for the tests.\n")


def _binary(w: _Writer, size: int) -> np.ndarray:
    y = (w.rng.random(size) < 0.4).astype(int)
    y[:2] = [0, 1]  # both classes, whatever the seed
    return y


def _onehot(w: _Writer, size: int, classes) -> pd.DataFrame:
    idx = w.rng.integers(0, len(classes), size=size)
    return pd.DataFrame(np.eye(len(classes), dtype=int)[idx], columns=list(classes))


def _simple_auc(id_column: str, target: str, make_ids: Callable[[np.random.Generator, int], list],
                train_name: str | None = "train.csv", test_csv: bool = False, answers_extra=None):
    def write(w: _Writer) -> None:
        ids = make_ids(w.rng, 2 * w.n)
        y = _binary(w, 2 * w.n)
        if train_name:
            w.csv(pd.DataFrame({id_column: ids[w.n:], target: y[w.n:]}), f"public/{train_name}")
        if test_csv:
            w.csv(pd.DataFrame({id_column: ids[:w.n]}), "public/test.csv")
        answers = pd.DataFrame({id_column: ids[:w.n], target: y[:w.n]})
        if answers_extra:
            answers = answers_extra(w, answers)
        w.finish(answers, pd.DataFrame({id_column: ids[:w.n], target: 0.5 if "cactus" in target else 0}),
                 (0.55, 0.99))
    return write


def _hex_ids(suffix=""):
    return lambda rng, k: [f"{rng.integers(0, 2**40):010x}{i:04d}{suffix}" for i in range(k)]


def _aptos(w: _Writer) -> None:
    ids = _hex_ids()(w.rng, 2 * w.n)
    y = w.rng.integers(0, 5, size=2 * w.n)
    w.csv(pd.DataFrame({"id_code": ids[w.n:], "diagnosis": y[w.n:]}), "public/train.csv")
    w.csv(pd.DataFrame({"id_code": ids[:w.n]}), "public/test.csv")
    w.finish(pd.DataFrame({"id_code": ids[:w.n], "diagnosis": y[:w.n]}),
             pd.DataFrame({"id_code": ids[:w.n], "diagnosis": 0}), (0.3, 0.93))


def _denoising(w: _Writer) -> None:
    # ids image_row_col, 1-indexed, for two small "images" of 4 x (n / 8) pixels.
    cols = max(1, w.n // 8)
    ids = [f"{img}_{r}_{c}" for img in (101, 104) for r in range(1, 5) for c in range(1, cols + 1)]
    values = np.round(w.rng.random(len(ids)), 6)
    w.finish(pd.DataFrame({"id": ids, "value": values}), pd.DataFrame({"id": ids, "value": 1}), (0.02, 0.3))


def _insults(w: _Writer) -> None:
    words = ["you", "are", "a", "great", "idiot", "friend", "nice", "stupid", "\\nreally", "\"so\""]
    texts = ['"' + " ".join(w.rng.choice(words, size=5)) + f' {i}"' for i in range(2 * w.n)]
    texts[1] = texts[0]  # the same comment twice: the id repeats, as in the real test set
    y = _binary(w, 2 * w.n)
    y[1] = y[0]
    dates = [f"2012{w.rng.integers(1, 13):02d}01120000Z" if i % 3 else "" for i in range(2 * w.n)]
    w.csv(pd.DataFrame({"Insult": y[w.n:], "Date": dates[w.n:], "Comment": texts[w.n:]}), "public/train.csv")
    w.csv(pd.DataFrame({"Date": dates[:w.n], "Comment": texts[:w.n]}), "public/test.csv")
    answers = pd.DataFrame({"Insult": y[:w.n], "Date": dates[:w.n], "Comment": texts[:w.n],
                            "Usage": np.where(np.arange(w.n) % 2, "PrivateTest", "PublicTest")})
    w.finish(answers, pd.DataFrame({"Insult": 0, "Date": dates[:w.n], "Comment": texts[:w.n]}), (0.6, 0.92))


def _one_hot_comp(classes, id_of: Callable[[int], object], public: Callable[[_Writer, list, list, pd.DataFrame], None],
                  board: tuple[float, float]):
    def write(w: _Writer) -> None:
        ids = [id_of(i) for i in range(2 * w.n)]
        onehot = _onehot(w, 2 * w.n, classes)
        public(w, ids[w.n:], ids[:w.n], onehot.iloc[w.n:].reset_index(drop=True))
        answers = pd.concat([pd.DataFrame({"id": ids[:w.n]}), onehot.iloc[:w.n].reset_index(drop=True)], axis=1)
        sample = answers.copy()
        sample[list(classes)] = 1.0 / len(classes)
        w.finish(answers, sample, board)
    return write


def _labels_of(onehot: pd.DataFrame) -> np.ndarray:
    return np.asarray(onehot.columns)[onehot.to_numpy().argmax(axis=1)]


def _dog_public(w, ids, test_ids, onehot):
    w.csv(pd.DataFrame({"id": ids, "breed": _labels_of(onehot)}), "public/labels.csv")


def _leaf_public(w, ids, test_ids, onehot):
    feats = {f"margin{i}": np.round(w.rng.random(len(ids)), 6) for i in (1, 2)}
    w.csv(pd.DataFrame({"id": ids, "species": _labels_of(onehot), **feats}), "public/train.csv")
    w.csv(pd.DataFrame({"id": test_ids, **feats}), "public/test.csv")


def _spooky_public(w, ids, test_ids, onehot):
    w.csv(pd.DataFrame({"id": ids, "text": "a dark night", "author": _labels_of(onehot)}), "public/train.csv")
    w.csv(pd.DataFrame({"id": test_ids, "text": "an old house"}), "public/test.csv")


def _dogs_vs_cats(w: _Writer) -> None:
    ids = list(range(1, w.n + 1))
    y = _binary(w, w.n)
    w.finish(pd.DataFrame({"id": ids, "label": y}), pd.DataFrame({"id": ids, "label": 0.5}), (0.03, 0.7))


def _jigsaw(w: _Writer) -> None:
    ids = [f"{w.rng.integers(0, 2**48):012x}" for _ in range(2 * w.n)]
    labels = (w.rng.random((2 * w.n, len(JIGSAW))) < 0.35).astype(int)
    labels[:2] = [[0] * 6, [1] * 6]
    labels[w.n - 4:w.n] = -1  # rows Kaggle did not score
    frame = pd.DataFrame(labels, columns=list(JIGSAW))
    train = pd.concat([pd.DataFrame({"id": ids[w.n:], "comment_text": "text"}), frame.iloc[w.n:].reset_index(drop=True)],
                      axis=1)
    w.csv(train, "public/train.csv")
    w.csv(pd.DataFrame({"id": ids[:w.n], "comment_text": "text"}), "public/test.csv")
    answers = pd.concat([pd.DataFrame({"id": ids[:w.n]}), frame.iloc[:w.n].reset_index(drop=True)], axis=1)
    sample = answers.copy()
    sample[list(JIGSAW)] = 0.5
    w.finish(answers, sample, (0.7, 0.988))


def _mlsp(w: _Writer) -> None:
    recs = sorted(w.rng.choice(np.arange(10, 60), size=max(2, w.n // 19 + 1), replace=False))
    ids = [r * 100 + s for r in recs for s in range(19)]
    y = _binary(w, len(ids))
    (w.public / "essential_data").mkdir(exist_ok=True)
    (w.public / "essential_data" / "rec_labels_test_hidden.txt").write_text(
        "rec_id,[labels]\n0,3,7\n1\n" + "".join(f"{r},?\n" for r in recs))
    w.finish(pd.DataFrame({"Id": ids, "Probability": y}), pd.DataFrame({"Id": ids, "Probability": 0}), (0.6, 0.95))


def _taxi(w: _Writer) -> None:
    keys = [f"2011-0{1 + i % 9}-{10 + i % 18} 1{i % 10}:2{i % 10}:0{i % 10}.000000{i}" for i in range(2 * w.n)]
    fare = np.round(w.rng.gamma(3.0, 4.0, size=2 * w.n), 2)
    geo = {c: np.round(w.rng.normal(-73.9, 0.05, size=2 * w.n), 6) for c in
           ("pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude")}
    full = pd.DataFrame({"key": keys, "fare_amount": fare, "pickup_datetime": [k[:19] + " UTC" for k in keys], **geo,
                         "passenger_count": w.rng.integers(1, 5, size=2 * w.n)})
    w.csv(full.iloc[w.n:], "public/labels.csv")
    w.csv(full.iloc[:w.n].drop(columns="fare_amount"), "public/test.csv")
    w.finish(full.iloc[:w.n].reset_index(drop=True), pd.DataFrame({"key": keys[:w.n], "fare_amount": 11.35}),
             (2.8, 8.0))


def _nomad(w: _Writer) -> None:
    feats = {"spacegroup": w.rng.choice([12, 33, 167, 194, 206, 227], size=2 * w.n),
             "percent_atom_al": np.round(w.rng.random(2 * w.n), 4)}
    fe = np.round(w.rng.uniform(0.0, 0.5, size=2 * w.n), 4)
    bg = np.round(w.rng.uniform(0.5, 5.0, size=2 * w.n), 4)
    full = pd.DataFrame({"id": np.r_[1:w.n + 1, 1:w.n + 1], **feats, "formation_energy_ev_natom": fe,
                         "bandgap_energy_ev": bg})
    w.csv(full.iloc[w.n:], "public/train.csv")
    w.csv(full.iloc[:w.n].drop(columns=["formation_energy_ev_natom", "bandgap_energy_ev"]), "public/test.csv")
    w.finish(full.iloc[:w.n].reset_index(drop=True),
             pd.DataFrame({"id": range(1, w.n + 1), "formation_energy_ev_natom": 0.1779, "bandgap_energy_ev": 1.8892}),
             (0.05, 0.3))


def _plant(w: _Writer) -> None:
    onehot = _onehot(w, 2 * w.n, PLANT)
    onehot.iloc[:4] = np.eye(4, dtype=int)  # every class present in the test rows
    ids = [f"Test_{i}" for i in range(w.n)] + [f"Train_{i}" for i in range(w.n)]
    frame = pd.concat([pd.DataFrame({"image_id": ids}), onehot], axis=1)
    w.csv(frame.iloc[w.n:], "public/train.csv")
    w.csv(frame.iloc[:w.n][["image_id"]], "public/test.csv")
    sample = frame.iloc[:w.n].copy()
    sample[list(PLANT)] = 0.25
    w.finish(frame.iloc[:w.n].reset_index(drop=True), sample, (0.8, 0.985))


def _ranzcr(w: _Writer) -> None:
    classes = RANZCR_V1 + RANZCR_UNSCORED
    labels = (w.rng.random((2 * w.n, len(classes))) < 0.3).astype(int)
    labels[:2] = [[0] * len(classes), [1] * len(classes)]
    uids = [f"1.2.826.0.1.3680043.8.498.{w.rng.integers(10**9, 10**10)}{i}" for i in range(2 * w.n)]
    frame = pd.concat([pd.DataFrame({"StudyInstanceUID": uids}), pd.DataFrame(labels, columns=list(classes)),
                       pd.DataFrame({"PatientID": [f"ec{w.rng.integers(10**6):06d}" for _ in uids]})], axis=1)
    w.csv(frame.iloc[w.n:], "public/train.csv")
    sample = pd.DataFrame({"StudyInstanceUID": uids[:w.n], **{c: 0 for c in RANZCR_V1}})
    w.finish(frame.iloc[:w.n].reset_index(drop=True), sample, (0.6, 0.97))


def _siim(w: _Writer) -> None:
    ids = [f"ISIC_{w.rng.integers(10**6, 10**7)}{i}" for i in range(2 * w.n)]
    y = _binary(w, 2 * w.n)
    meta = {"patient_id": "IP_0000", "sex": "male", "age_approx": 45.0, "anatom_site_general_challenge": "torso"}
    w.csv(pd.DataFrame({"image_name": ids[w.n:], **meta, "diagnosis": "unknown",
                        "benign_malignant": np.where(y[w.n:] == 1, "malignant", "benign"), "target": y[w.n:]}),
          "public/train.csv")
    w.csv(pd.DataFrame({"image_name": ids[:w.n], **meta}), "public/test.csv")
    w.finish(pd.DataFrame({"image_name": ids[:w.n], "target": y[:w.n]}),
             pd.DataFrame({"image_name": ids[:w.n], "target": 0}), (0.7, 0.95))


def _tps_dec(w: _Writer) -> None:
    x = np.round(w.rng.normal(size=(2 * w.n, 3)), 4)
    y = w.rng.integers(1, 8, size=2 * w.n)
    full = pd.DataFrame({"Id": range(2 * w.n), "Elevation": x[:, 0], "Aspect": x[:, 1], "Slope": x[:, 2],
                         "Cover_Type": y})
    w.csv(full.iloc[w.n:], "public/train.csv")
    w.csv(full.iloc[:w.n].drop(columns="Cover_Type"), "public/test.csv")
    w.finish(full.iloc[:w.n].reset_index(drop=True), pd.DataFrame({"Id": range(w.n), "Cover_Type": 2}), (0.5, 0.96))


def _tps_may(w: _Writer) -> None:
    x = np.round(w.rng.normal(size=(2 * w.n, 2)), 4)
    y = _binary(w, 2 * w.n)
    full = pd.DataFrame({"id": range(2 * w.n), "f_00": x[:, 0], "f_27": "ABBACD", "f_30": x[:, 1], "target": y})
    w.csv(full.iloc[w.n:], "public/train.csv")
    w.csv(full.iloc[:w.n].drop(columns="target"), "public/test.csv")
    w.finish(full.iloc[:w.n].reset_index(drop=True), pd.DataFrame({"id": range(w.n), "target": 0.5}), (0.6, 0.998))
    w.csv(full.iloc[:w.n][["id", "target"]], "private/gold_submission.csv")


def _text_normalization(lang: str):
    tokens = {"en": ["the", "12", "Dr.", "NA", "km", ",", "2001", "null"],
              "ru": ["в", "12", "г.", "NA", "км", ",", "2001", "ещё"]}[lang]
    spoken = {"12": "twelve", "Dr.": "doctor", "km": "kilometers", "2001": "two thousand one", "г.": "года",
              "км": "километров"}

    def write(w: _Writer) -> None:
        before = list(w.rng.choice(tokens, size=2 * w.n))
        before[:2] = ["NA", "null"]  # tokens that pandas reads as NaN
        after = [spoken.get(t, t) for t in before]
        sentence, token = np.arange(2 * w.n) // 4, np.arange(2 * w.n) % 4
        train = pd.DataFrame({"sentence_id": sentence[w.n:] - sentence[w.n], "token_id": token[w.n:],
                              "class": "PLAIN", "before": before[w.n:], "after": after[w.n:]})
        test = pd.DataFrame({"sentence_id": sentence[:w.n], "token_id": token[:w.n], "before": before[:w.n]})
        for frame, name in ((train, f"{lang}_train.csv"), (test, f"{lang}_test_2.csv")):
            with zipfile.ZipFile(w.public / f"{name}.zip", "w") as zf:
                zf.writestr(name, frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC))
        ids = [f"{s}_{t}" for s, t in zip(sentence[:w.n], token[:w.n])]
        sample = pd.DataFrame({"id": ids, "after": before[:w.n]})
        with zipfile.ZipFile(w.public / f"{lang}_sample_submission_2.csv.zip", "w") as zf:
            zf.writestr(f"{lang}_sample_submission_2.csv", sample.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC))
        w.finish(pd.DataFrame({"id": ids, "after": after[:w.n]}), sample, (0.9, 0.998))
    return write


def _whale(w: _Writer) -> None:
    ids = [f"2009033{i % 2}_0{i % 10}0000_0{i % 60:02d}s{i % 10}ms_Test{i}.aif" for i in range(w.n)]
    y = _binary(w, w.n)
    w.finish(pd.DataFrame({"clip": ids, "probability": y}), pd.DataFrame({"clip": ids, "probability": 0}),
             (0.6, 0.985))


_WRITERS: dict[str, Callable[[_Writer], None]] = {
    "aerial-cactus-identification": _simple_auc("id", "has_cactus", _hex_ids(".jpg")),
    "aptos2019-blindness-detection": _aptos,
    "denoising-dirty-documents": _denoising,
    "detecting-insults-in-social-commentary": _insults,
    "dog-breed-identification": _one_hot_comp(DOGS, lambda i: f"{i:04d}{'ab' * 8}", _dog_public, (0.0005, 4.0)),
    "dogs-vs-cats-redux-kernels-edition": _dogs_vs_cats,
    "histopathologic-cancer-detection": _simple_auc("id", "label", _hex_ids(), "train_labels.csv"),
    "jigsaw-toxic-comment-classification-challenge": _jigsaw,
    "leaf-classification": _one_hot_comp(LEAVES, lambda i: 1 + 3 * i, _leaf_public, (0.0, 3.0)),
    "mlsp-2013-birds": _mlsp,
    "new-york-city-taxi-fare-prediction": _taxi,
    "nomad2018-predict-transparent-conductors": _nomad,
    "plant-pathology-2020-fgvc7": _plant,
    "random-acts-of-pizza": _simple_auc("request_id", "requester_received_pizza",
                                        lambda rng, k: [f"t3_{rng.integers(10**5, 10**6)}{i}" for i in range(k)],
                                        train_name=None),
    "ranzcr-clip-catheter-line-classification": _ranzcr,
    "siim-isic-melanoma-classification": _siim,
    "spooky-author-identification": _one_hot_comp(SPOOKY, lambda i: f"id{i:05d}", _spooky_public, (0.15, 1.2)),
    "tabular-playground-series-dec-2021": _tps_dec,
    "tabular-playground-series-may-2022": _tps_may,
    "text-normalization-challenge-english-language": _text_normalization("en"),
    "text-normalization-challenge-russian-language": _text_normalization("ru"),
    "the-icml-2013-whale-challenge-right-whale-redux": _whale,
}


def write_lite_folder(data_dir: str | Path, meta_dir: str | Path | None = None, *, comps=None, n: int = 40,
                      seed: int = 0) -> Path:
    """Writes the MLE-bench-Lite competitions `comps` (default: all 22) under `data_dir`, with the
    mle-bench repository's files under `meta_dir` (default: beside the data, in `data_dir`)."""
    data_dir = Path(data_dir)
    meta_dir = Path(meta_dir) if meta_dir is not None else data_dir
    for i, comp_id in enumerate(comps or LITE_CASES):
        rng = np.random.default_rng([seed, i])
        _WRITERS[comp_id](_Writer(data_dir, meta_dir, comp_id, rng, n))
    return data_dir


# Three tabular Lite competitions: what the main job's MLE-bench tests run episodes on.
THREE_LITE = ("spooky-author-identification", "tabular-playground-series-may-2022",
              "tabular-playground-series-dec-2021")


def write_mlebench_folder(root: str | Path, *, n: int = 40, seed: int = 0) -> Path:
    """Writes the three competitions of THREE_LITE under `root` (data and metadata together)."""
    return write_lite_folder(root, comps=THREE_LITE, n=n, seed=seed)
