"""Datasets: the bundled/synthetic registry and user files (.csv, .tsv, .parquet, .npy).

Everything returns a :class:`Dataset` whose ``x`` is a finite float64 C-contiguous ``(n, d)`` array.
Every user-facing failure raises :class:`~densiray.errors.DataError` with a one-line message.
pandas and scikit-learn are imported lazily: importing this module costs only numpy.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from densiray.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Dataset", "describe_datasets", "list_datasets", "load_dataset"]

SYNTHETIC_N = 4000
"""Default number of points drawn for the synthetic 2-D datasets."""

_FILE_KINDS = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".pq": "Parquet", ".npy": ".npy"}
_EXTENSIONS_TEXT = ".csv, .tsv, .parquet, .pq or .npy"

# A loader returns (x, column names or None for x0.., source description).
_Loaded = tuple[np.ndarray, list[str] | None, str]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset ready for training: ``x`` is float64, shape ``(n, d)``, C-contiguous and all finite."""

    name: str
    """The registry name, or the file's path as given."""
    x: np.ndarray
    columns: list[str]
    """The ``d`` column names."""
    source: str
    """Where the data came from, e.g. ``sklearn.datasets.load_iris`` or ``file /abs/path.csv``."""
    labels: list[str] | None = None
    """With ``load_dataset(..., label_columns=...)``: the label column's values as strings (not in ``x``)."""

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        """Number of columns."""
        return int(self.x.shape[1])


def _error(message: str) -> DataError:
    """A DataError whose message is squeezed onto one line."""
    return DataError(" ".join(message.split()))


# --- bundled scikit-learn datasets ------------------------------------------------------------


def _sklearn(loader_name: str, **kwargs: object) -> tuple[np.ndarray, list[str]]:
    """Feature matrix and feature names of ``sklearn.datasets.<loader_name>(**kwargs)``."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader_name)(**kwargs)
    return np.asarray(bunch.data, dtype=np.float64), [str(c) for c in bunch.feature_names]


def _plain(loader_name: str) -> Callable[[int], _Loaded]:
    """A bundled loader returning the feature matrix as is (the seed is unused)."""

    def load(seed: int) -> _Loaded:
        x, columns = _sklearn(loader_name)
        return x, columns, f"sklearn.datasets.{loader_name}"

    return load


def _diabetes(seed: int) -> _Loaded:
    """Diabetes features in original units; the integer columns age and sex get U(0,1) noise."""
    x, columns = _sklearn("load_diabetes", scaled=False)
    idx = [columns.index("age"), columns.index("sex")]
    x[:, idx] += np.random.default_rng(seed).uniform(0, 1, size=(x.shape[0], len(idx)))
    return x, columns, (
        f"sklearn.datasets.load_diabetes(scaled=False), columns age and sex dequantized "
        f"with U(0,1) noise (seed={seed})"
    )


def _digits(seed: int) -> _Loaded:
    """8x8 digit images (integers 0..16) dequantized with U(0,1) noise."""
    x, columns = _sklearn("load_digits")
    x += np.random.default_rng(seed).uniform(0, 1, size=x.shape)
    return x, columns, f"sklearn.datasets.load_digits, dequantized with U(0,1) noise (seed={seed})"


# --- synthetic 2-D datasets --------------------------------------------------------------------


def _moons(n: int, seed: int) -> np.ndarray:
    """Two interleaving half circles, ``make_moons(n, noise=0.05, random_state=seed)``."""
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.05, random_state=seed)[0]


def _rings(n: int, seed: int) -> np.ndarray:
    """Three concentric rings of radius 1, 2, 3 (equally likely) with N(0, 0.08^2) noise."""
    rng = np.random.default_rng(seed)
    radius = rng.integers(1, 4, size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    ring = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return ring + rng.normal(0, 0.08, size=(n, 2))


def _checkerboard(n: int, seed: int) -> np.ndarray:
    """A 4x4 checkerboard on [-4, 4]^2 with uniform density on the dark squares."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(-2, 2, size=n)
    x2 = rng.uniform(0, 1, size=n) - 2 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2


_BUNDLED: dict[str, Callable[[int], _Loaded]] = {
    "iris": _plain("load_iris"),
    "wine": _plain("load_wine"),
    "breast_cancer": _plain("load_breast_cancer"),
    "diabetes": _diabetes,
    "digits": _digits,
}
_SYNTHETIC: dict[str, Callable[[int, int], np.ndarray]] = {
    "moons": _moons,
    "rings": _rings,
    "checkerboard": _checkerboard,
}


def list_datasets() -> list[str]:
    """Sorted names of the registry datasets (bundled and synthetic)."""
    return sorted([*_BUNDLED, *_SYNTHETIC])


def describe_datasets() -> list[dict]:
    """One dict per registry dataset, with default arguments: name, d, n, source and kind.

    ``kind`` is ``"bundled"`` (ships with scikit-learn) or ``"synthetic"`` (drawn at load time).
    """
    rows = []
    for name in list_datasets():
        ds = load_dataset(name)
        kind = "bundled" if name in _BUNDLED else "synthetic"
        rows.append({"name": name, "d": ds.d, "n": ds.n, "source": ds.source, "kind": kind})
    return rows


# --- user files ---------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """True for strings with a path separator, a data-file extension, or naming something on disk."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        any(s in name for s in separators)
        or name.lower().endswith(tuple(_FILE_KINDS))
        or os.path.exists(name)
    )


def _example_value(column: pd.Series) -> str:
    """A short quoted example of a value in ``column`` that is not a number."""
    import pandas as pd

    text = column.dropna().astype(str)
    failed = text[pd.to_numeric(text, errors="coerce").isna()]
    value = str(failed.iloc[0] if not failed.empty else text.iloc[0])
    return f"e.g. {value[:30]!r}"


def _pop_labels(frame: pd.DataFrame, label: str, label_columns: tuple[str, ...]) -> tuple[pd.DataFrame, list[str] | None]:
    """``frame`` without its first column named like one of ``label_columns`` (any case), and that column's
    values as strings (numbers as written by ``str``); None when there is no such column."""
    col = next((c for c in frame.columns if str(c).lower() in label_columns), None)
    if col is None:
        return frame, None
    values = frame[col]
    missing = np.flatnonzero(values.isna().to_numpy())
    if missing.size:
        raise _error(f"{label}: the label column {str(col)!r} is empty at {missing.size} row"
                     f"{'s' if missing.size > 1 else ''} (first at row {int(missing[0])}, counting from 0)")
    return frame.drop(columns=[col]), [str(v) for v in values.tolist()]


def _frame_to_array(frame: pd.DataFrame, label: str) -> tuple[np.ndarray, list[str]]:
    """Float64 matrix and column names of ``frame``; DataError if a column holds non-numbers.

    Bool and complex columns count as non-numeric; an all-missing column is left to the NaN check.
    """
    from pandas.api import types

    def numeric(column: pd.Series) -> bool:
        dtype = column.dtype
        plain = not (types.is_bool_dtype(dtype) or types.is_complex_dtype(dtype))
        return (types.is_numeric_dtype(dtype) and plain) or bool(column.isna().all())

    bad = [
        f"{str(name)!r} ({frame[name].dtype}, {_example_value(frame[name])})"
        for name in frame.columns
        if not numeric(frame[name])
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise _error(
            f"{label} has non-numeric columns: {', '.join(bad[:3])}{more}; "
            "densiray needs numbers only: drop or encode these columns"
        )
    return frame.to_numpy(dtype=np.float64, na_value=np.nan), [str(c) for c in frame.columns]


def _read_table(path: str, sep: str, label: str, label_columns: tuple[str, ...] = ()
                ) -> tuple[np.ndarray, list[str] | None, list[str] | None]:
    """Read a CSV/TSV; the first row is a header if any of its cells is not a number."""
    import pandas as pd

    first = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str).iloc[0]
    has_header = bool((first.notna() & pd.to_numeric(first, errors="coerce").isna()).any())
    frame = pd.read_csv(path, sep=sep, header=0 if has_header else None)
    frame, labels = _pop_labels(frame, label, label_columns) if has_header else (frame, None)
    x, columns = _frame_to_array(frame, label)
    return x, columns if has_header else None, labels


def _read_npy(path: str, label: str) -> np.ndarray:
    """Load a numeric 1-D or 2-D .npy array without ever unpickling."""
    x = np.load(path, allow_pickle=False)
    if not isinstance(x, np.ndarray):
        raise _error(f"{label} is not a single array (an .npz archive?); save one array with numpy.save")
    if x.dtype.kind not in "iuf":
        raise _error(f"{label} has dtype {x.dtype}; densiray needs an integer or float array")
    if x.ndim not in (1, 2):
        raise _error(
            f"{label} has shape {x.shape}; densiray needs a 1-D or 2-D array: "
            "reshape it to (rows, columns)"
        )
    return x[:, None] if x.ndim == 1 else x


def _load_file(path: str, label_columns: tuple[str, ...] = ()) -> tuple[np.ndarray, list[str] | None, str,
                                                                       list[str] | None]:
    """Read a user file by extension; parser failures become one-line DataErrors."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        names = ", ".join(list_datasets())
        raise _error(f"no such file: {full}; check the path or give a dataset name ({names})")
    ext = os.path.splitext(full)[1].lower()
    if ext not in _FILE_KINDS:
        what = "it is a directory" if os.path.isdir(full) else f"unsupported file type {ext or '(none)'!r}"
        raise _error(f"cannot read {path!r}: {what}; give a {_EXTENSIONS_TEXT} file")
    kind = _FILE_KINDS[ext]
    if os.path.isfile(full) and os.path.getsize(full) == 0:
        raise _error(f"{kind} file {path!r} is empty; give a file with data rows")
    label = f"{kind} file {path!r}"
    columns = labels = None
    try:
        if ext == ".npy":
            x = _read_npy(full, label)
        elif kind == "Parquet":
            import pandas as pd

            frame, labels = _pop_labels(pd.read_parquet(full), label, label_columns)
            x, columns = _frame_to_array(frame, label)
        else:
            x, columns, labels = _read_table(full, "\t" if ext == ".tsv" else ",", label, label_columns)
    except DataError:
        raise
    except Exception as exc:  # any parser failure: report the parser's reason
        reason = str(exc) or type(exc).__name__
        raise _error(f"cannot read {label}: {reason}; check that it is a valid {kind} file") from exc
    return x, columns, f"file {full}", labels


# --- loading and checks ------------------------------------------------------------------------


def _checked(name: str, x: np.ndarray, columns: list[str], min_rows: int) -> np.ndarray:
    """``x`` as float64 C-contiguous after checking columns, rows and finiteness."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.shape[1] < 1:
        raise _error(f"dataset {name!r} has no columns; give at least one numeric column")
    if x.shape[0] < min_rows:
        raise _error(
            f"dataset {name!r} has {x.shape[0]} rows; densiray needs at least {min_rows} "
            "to split train/validation/test: give more rows"
        )
    finite = np.isfinite(x)
    bad_rows = np.flatnonzero(~finite.all(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        col = int(np.flatnonzero(~finite[row])[0])
        raise _error(
            f"dataset {name!r} has {bad_rows.size} row{'s' if bad_rows.size > 1 else ''} with NaN "
            f"or infinite values (first at row {row}, counting from 0, column {columns[col]!r}: "
            f"{x[row, col]}); drop or impute them"
        )
    return x


def _check_int(value: object, what: str, low: int) -> int:
    """``value`` as an int >= ``low``, else DataError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise _error(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def load_dataset(
    name_or_path: str | os.PathLike[str], *, seed: int = 0, n: int | None = None, min_rows: int = 30,
    label_columns: tuple[str, ...] = (),
) -> Dataset:
    """Load a registry dataset by name, or a user file by path.

    ``seed`` drives dequantization noise (diabetes, digits) and synthetic draws; ``n`` sets the
    number of synthetic points (default 4000) and is refused for other datasets. The result has at
    least ``min_rows`` rows, at least one column and no NaN/inf, else DataError. ``label_columns``
    (lower-case names): a file's first column so named is taken out of ``x`` into ``labels`` as strings,
    so that class labels need not be numbers.
    """
    name = os.fspath(name_or_path)
    seed = _check_int(seed, "seed", 0)
    if name not in _BUNDLED and name not in _SYNTHETIC and not _looks_like_path(name):
        close = difflib.get_close_matches(name, list_datasets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _error(
            f"unknown dataset {name!r}{hint}: choose one of {', '.join(list_datasets())} "
            f"or give a path to a {_EXTENSIONS_TEXT} file"
        )
    if n is not None and name not in _SYNTHETIC:
        raise _error(
            f"n={n!r} only applies to the synthetic datasets ({', '.join(sorted(_SYNTHETIC))}); "
            f"drop n for {name!r}"
        )
    labels = None
    if name in _SYNTHETIC:
        n = SYNTHETIC_N if n is None else _check_int(n, "n", 1)
        x, columns = _SYNTHETIC[name](n, seed), None
        source = f"synthetic {name} (n={n}, seed={seed})"
    elif name in _BUNDLED:
        x, columns, source = _BUNDLED[name](seed)
    else:
        x, columns, source, labels = _load_file(name, label_columns)
    columns = columns or [f"x{i}" for i in range(x.shape[1])]
    x = _checked(name, x, columns, min_rows)
    return Dataset(name=name, x=x, columns=columns, source=source, labels=labels)
