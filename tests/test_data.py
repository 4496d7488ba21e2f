"""Tests for densiray.data: registry, user files, one-line DataErrors, the fixed split, Standardizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from densiray.data import (
    Dataset,
    Splits,
    Standardizer,
    describe_datasets,
    list_datasets,
    load_dataset,
    split,
)
from densiray.errors import DataError, DensirayError

EXPECTED = {
    "iris": (150, 4),
    "wine": (178, 13),
    "breast_cancer": (569, 30),
    "diabetes": (442, 10),
    "digits": (1797, 64),
    "moons": (4000, 2),
    "rings": (4000, 2),
    "checkerboard": (4000, 2),
}
SYNTHETIC = ["moons", "rings", "checkerboard"]


def data_error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting a DataError; return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message
    return message


# --- registry ----------------------------------------------------------------------------------


def test_list_and_describe_match_loads():
    assert list_datasets() == sorted(EXPECTED)
    rows = describe_datasets()
    assert [r["name"] for r in rows] == list_datasets()
    for row in rows:
        assert (row["n"], row["d"]) == EXPECTED[row["name"]]
        assert row["kind"] == ("synthetic" if row["name"] in SYNTHETIC else "bundled")
        assert row["source"]
    json.dumps(rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry_dataset_loads(name):
    ds = load_dataset(name)
    assert isinstance(ds, Dataset) and ds.name == name
    assert (ds.n, ds.d) == EXPECTED[name]
    assert ds.x.dtype == np.float64 and ds.x.flags.c_contiguous
    assert np.isfinite(ds.x).all()
    assert len(ds.columns) == ds.d and all(isinstance(c, str) for c in ds.columns)


def test_column_names():
    assert load_dataset("iris").columns[0] == "sepal length (cm)"
    assert load_dataset("diabetes").columns[:2] == ["age", "sex"]
    assert load_dataset("moons").columns == ["x0", "x1"]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_n_and_seed(name):
    small = load_dataset(name, n=500)
    assert small.x.shape == (500, 2) and "n=500" in small.source
    assert np.array_equal(load_dataset(name, seed=3, n=500).x, load_dataset(name, seed=3, n=500).x)
    assert not np.array_equal(small.x, load_dataset(name, seed=1, n=500).x)


def test_synthetic_shapes():
    moons = load_dataset("moons", n=500).x
    from sklearn.datasets import make_moons

    assert np.array_equal(moons, make_moons(500, noise=0.05, random_state=0)[0])
    radius = np.linalg.norm(load_dataset("rings").x, axis=1)
    assert np.all(np.min(np.abs(radius[:, None] - [1, 2, 3]), axis=1) < 0.5)
    board = load_dataset("checkerboard").x
    assert np.all(np.abs(board) <= 4)
    # dark squares only: the parities of the 2x2 cells of x1 and x2 agree
    assert np.all((np.floor(board[:, 0] / 2) + np.floor(board[:, 1] / 2)) % 2 == 0)


def test_dequantization():
    digits = load_dataset("digits")
    assert not np.all(digits.x == np.round(digits.x))
    assert digits.x.min() >= 0 and digits.x.max() < 17
    assert "dequantized" in digits.source
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False).data
    diabetes = load_dataset("diabetes")
    noise = diabetes.x - raw
    assert np.all((noise[:, :2] >= 0) & (noise[:, :2] < 1)) and not np.all(noise[:, :2] == 0)
    assert np.array_equal(diabetes.x[:, 2:], raw[:, 2:])
    assert "age and sex" in diabetes.source


def test_seed_determinism():
    for name in ["digits", "diabetes", "rings", "checkerboard"]:
        assert np.array_equal(load_dataset(name, seed=7).x, load_dataset(name, seed=7).x)
    assert not np.array_equal(load_dataset("digits", seed=0).x, load_dataset("digits", seed=1).x)


# --- split and standardizer ----------------------------------------------------------------------


def test_split_sizes_and_determinism():
    x = load_dataset("moons").x
    s = split(x)
    assert isinstance(s, Splits)
    assert (len(s.train), len(s.val), len(s.test)) == (2560, 640, 800)
    again = split(x)
    for a, b in [(s.train, again.train), (s.val, again.val), (s.test, again.test)]:
        assert np.array_equal(a, b) and a.dtype == np.float64
    # a partition of the rows, independent of the dataset seed
    merged = np.concatenate([s.train, s.val, s.test])
    assert np.array_equal(np.sort(merged, axis=0), np.sort(x, axis=0))
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(x, test_size=0.2, random_state=0)
    assert np.array_equal(s.test, test)
    assert np.array_equal(s.train, train_test_split(rest, test_size=0.2, random_state=0)[0])


def test_split_rejects_bad_shapes():
    assert "2-D" in data_error(split, np.zeros(10))
    data_error(split, np.zeros((2, 3)))


def test_standardizer_fit_on_train():
    s = split(load_dataset("wine").x)
    st = Standardizer.fit(s.train)
    assert np.allclose(st.mean, s.train.mean(axis=0)) and np.allclose(st.std, s.train.std(axis=0))
    z = st.transform(s.train)
    assert np.allclose(z.mean(axis=0), 0) and np.allclose(z.std(axis=0), 1)
    assert not np.allclose(st.transform(s.test).mean(axis=0), 0)
    assert np.allclose(st.inverse(st.transform(s.test)), s.test)
    assert np.array_equal(st.transform(s.test[0]), st.transform(s.test[:1])[0])  # a single 1-D row
    assert st.log_abs_det() == pytest.approx(-np.log(st.std).sum())


def test_standardizer_constant_column():
    x = np.column_stack([np.arange(10.0), np.full(10, 5.0), np.full(10, 3.0) + 1e-15 * np.arange(10)])
    st = Standardizer.fit(x)
    assert st.std[1] == 1.0 and st.std[2] == 1.0
    assert np.allclose(st.transform(x)[:, 1], 0)
    assert np.isfinite(st.log_abs_det())


def test_standardizer_width_checked():
    st = Standardizer.fit(np.random.default_rng(0).normal(size=(20, 3)))
    assert "3 columns" in data_error(st.transform, np.zeros((4, 2)))
    data_error(st.inverse, np.zeros((4, 4)))
    data_error(Standardizer.fit, np.zeros((0, 3)))


def test_standardizer_dict_round_trip():
    st = Standardizer.fit(np.random.default_rng(0).normal(size=(50, 4)) * [1, 2, 3, 4] + 10)
    d = json.loads(json.dumps(st.to_dict()))
    assert d["type"] == "standardize" and len(d["mean"]) == len(d["std"]) == 4
    back = Standardizer.from_dict(d)
    assert np.array_equal(back.mean, st.mean) and np.array_equal(back.std, st.std)
    assert back.mean.dtype == np.float64 and back.std.dtype == np.float64


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"mean": [0.0], "std": [1.0]},
        {"type": "minmax", "mean": [0.0], "std": [1.0]},
        {"type": "standardize", "mean": [0.0, 1.0], "std": [1.0]},
        {"type": "standardize", "mean": [0.0], "std": [0.0]},
        {"type": "standardize", "mean": [0.0], "std": [-1.0]},
        {"type": "standardize", "mean": [float("nan")], "std": [1.0]},
        {"type": "standardize", "mean": [0.0], "std": [float("inf")]},
        {"type": "standardize", "mean": ["a"], "std": [1.0]},
        {"type": "standardize", "mean": [True], "std": [1.0]},
        {"type": "standardize", "mean": [], "std": []},
        {"type": "standardize", "mean": 0.0, "std": 1.0},
        {"type": "standardize", "std": [1.0]},
    ],
)
def test_standardizer_from_dict_rejects(bad):
    data_error(Standardizer.from_dict, bad)


# --- user files ----------------------------------------------------------------------------------


def _rows(n: int = 40, d: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, d)).round(6)


def test_csv_with_header(tmp_path):
    x = _rows()
    path = tmp_path / "data.csv"
    pd.DataFrame(x, columns=["a", "b", "c"]).to_csv(path, index=False)
    ds = load_dataset(str(path))
    assert ds.columns == ["a", "b", "c"] and np.allclose(ds.x, x)
    assert ds.name == str(path) and ds.source == f"file {path}"
    assert ds.x.dtype == np.float64 and ds.x.flags.c_contiguous


def test_csv_without_header(tmp_path):
    x = _rows()
    path = tmp_path / "data.csv"
    np.savetxt(path, x, delimiter=",")
    ds = load_dataset(str(path))
    assert ds.columns == ["x0", "x1", "x2"] and ds.n == 40 and np.allclose(ds.x, x)


def test_csv_integer_columns_and_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ints.csv").write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(30)))
    ds = load_dataset("ints.csv")
    assert ds.name == "ints.csv" and ds.x.dtype == np.float64 and ds.x[29].tolist() == [29.0, 58.0]
    assert ds.source == f"file {tmp_path / 'ints.csv'}"


def test_tsv(tmp_path):
    x = _rows()
    path = tmp_path / "data.tsv"
    pd.DataFrame(x, columns=["p", "q", "r"]).to_csv(path, sep="\t", index=False)
    ds = load_dataset(str(path))
    assert ds.columns == ["p", "q", "r"] and np.allclose(ds.x, x)


def test_parquet(tmp_path):
    frame = pd.DataFrame({"f": np.linspace(0, 1, 40), "i": np.arange(40), "u": np.arange(40, dtype=np.uint8)})
    for name in ["data.parquet", "data.pq"]:
        frame.to_parquet(tmp_path / name)
        ds = load_dataset(str(tmp_path / name))
        assert ds.columns == ["f", "i", "u"] and np.array_equal(ds.x, frame.to_numpy(dtype=float))


def test_npy_2d_and_1d(tmp_path):
    x = _rows()
    np.save(tmp_path / "two.npy", x)
    ds = load_dataset(str(tmp_path / "two.npy"))
    assert np.array_equal(ds.x, x) and ds.columns == ["x0", "x1", "x2"]
    np.save(tmp_path / "one.npy", np.arange(40, dtype=np.int32))
    ds = load_dataset(str(tmp_path / "one.npy"))
    assert ds.x.shape == (40, 1) and ds.x.dtype == np.float64 and ds.columns == ["x0"]


def test_min_rows_is_configurable(tmp_path):
    np.save(tmp_path / "small.npy", _rows(12))
    assert load_dataset(str(tmp_path / "small.npy"), min_rows=10).n == 12


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    message = data_error(load_dataset, "mons")
    assert "'mons'" in message and "moons" in message
    for name in list_datasets():
        assert name in message
    assert ".csv" in message and ".npy" in message


def test_missing_file(tmp_path):
    message = data_error(load_dataset, str(tmp_path / "nope.csv"))
    assert "no such file" in message and "nope.csv" in message


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n3,4\n")
    message = data_error(load_dataset, str(path))
    assert ".txt" in message and ".csv" in message and ".parquet" in message


def test_empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert "empty" in data_error(load_dataset, str(path))


def test_blank_csv(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\n")
    assert "cannot read CSV file" in data_error(load_dataset, str(path))


def test_header_only_csv(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("a,b,c\n")
    assert "0 rows" in data_error(load_dataset, str(path))


def test_ragged_csv_reports_parser_reason(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2\n" * 20 + "1,2,3\n" + "1,2\n" * 20)
    message = data_error(load_dataset, str(path))
    assert "cannot read CSV file" in message and "fields" in message


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    assert "cannot read Parquet file" in data_error(load_dataset, str(path))


def test_nan_row(tmp_path):
    x = _rows()
    x[5, 1] = np.nan
    x[9, 0] = np.nan
    path = tmp_path / "nan.csv"
    pd.DataFrame(x, columns=["a", "b", "c"]).to_csv(path, index=False)
    message = data_error(load_dataset, str(path))
    assert "2 rows" in message and "row 5" in message and "'b'" in message and "drop or impute" in message


def test_empty_cell_is_nan(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("a,b\n" + "1,2\n" * 30 + "3,\n")
    message = data_error(load_dataset, str(path))
    assert "1 row " in message and "row 30" in message and "'b'" in message


def test_inf_value(tmp_path):
    x = _rows()
    x[3, 2] = np.inf
    np.save(tmp_path / "inf.npy", x)
    message = data_error(load_dataset, str(tmp_path / "inf.npy"))
    assert "row 3" in message and "'x2'" in message and "inf" in message


def test_non_numeric_csv_column(tmp_path):
    path = tmp_path / "text.csv"
    lines = [f"{i},{i},label{i % 2}" for i in range(40)]
    lines[7] = "7,oops,label1"
    path.write_text("a,b,kind\n" + "\n".join(lines) + "\n")
    message = data_error(load_dataset, str(path))
    assert "'b'" in message and "'oops'" in message and "'kind'" in message and "'a'" not in message


def test_non_numeric_names_at_most_three(tmp_path):
    frame = pd.DataFrame({f"s{i}": ["x"] * 40 for i in range(5)})
    frame.to_csv(tmp_path / "many.csv", index=False)
    message = data_error(load_dataset, str(tmp_path / "many.csv"))
    assert "'s2'" in message and "'s3'" not in message and "2 more" in message


def test_non_numeric_parquet_columns(tmp_path):
    frame = pd.DataFrame({"x": np.arange(40.0), "flag": [True, False] * 20, "name": ["a"] * 40})
    frame.to_parquet(tmp_path / "mixed.parquet")
    message = data_error(load_dataset, str(tmp_path / "mixed.parquet"))
    assert "'flag'" in message and "'name'" in message and "'x'" not in message


def test_too_few_rows(tmp_path):
    np.save(tmp_path / "small.npy", _rows(12))
    message = data_error(load_dataset, str(tmp_path / "small.npy"))
    assert "12 rows" in message and "at least 30" in message
    assert "10 rows" in data_error(load_dataset, "moons", n=10)


def test_npy_ndim_3(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((40, 2, 2)))
    assert "(40, 2, 2)" in data_error(load_dataset, str(tmp_path / "cube.npy"))


def test_npy_non_numeric(tmp_path):
    np.save(tmp_path / "text.npy", np.array(["a"] * 40))
    assert "dtype" in data_error(load_dataset, str(tmp_path / "text.npy"))


class _Booby:
    """Unpickling this calls os.mkdir(marker): proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_object_npy_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    array = np.empty(40, dtype=object)
    array[:] = [_Booby(str(marker))] * 40
    np.save(tmp_path / "objects.npy", array, allow_pickle=True)
    message = data_error(load_dataset, str(tmp_path / "objects.npy"))
    assert "cannot read .npy file" in message and "allow_pickle" in message
    assert not marker.exists()


def test_bad_arguments():
    assert "synthetic" in data_error(load_dataset, "iris", n=100)
    data_error(load_dataset, "moons", n=0)
    data_error(load_dataset, "moons", seed=-1)
    data_error(load_dataset, "moons", seed=1.5)


def test_errors_are_densiray_errors():
    assert issubclass(DataError, DensirayError)


def test_import_stays_light():
    code = (
        "import sys, densiray.data; "
        "print(','.join(m for m in ('torch', 'ray', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_label_column_may_be_taken_out_of_the_features_as_strings(tmp_path):
    rows = "".join(f"{i},{i % 3},{'yes' if i % 2 else 'no'}\n" for i in range(40))
    path = tmp_path / "d.csv"
    path.write_text("a,b,Label\n" + rows)
    ds = load_dataset(str(path), label_columns=("label",))
    assert ds.columns == ["a", "b"] and ds.x.shape == (40, 2) and ds.labels[:3] == ["no", "yes", "no"]
    with pytest.raises(DataError, match="non-numeric columns: 'Label'"):  # without label_columns: features only
        load_dataset(str(path))
    path.write_text("a,b,label\n" + rows + "1,2,\n")
    with pytest.raises(DataError, match="the label column 'label' is empty at 1 row"):
        load_dataset(str(path), label_columns=("label",))
