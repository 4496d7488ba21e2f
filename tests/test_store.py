"""Tests for the model store: atomic exports, verified reads, listing, and refusal to unpickle."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import datetime
from pathlib import Path

import pytest
import torch

import densiray.store as store_mod
from densiray import __version__
from densiray.errors import StoreError
from densiray.store import FORMAT, MANIFEST, WEIGHTS, Store, StoredModel, default_store_uri


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=g).t(),  # non-contiguous on purpose
        "layer.bias": torch.randn(4, generator=g),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def export(store: Store, name: str = "m1", seed: int = 0, **overrides) -> str:
    kwargs = dict(
        kind="flow",
        tensors=tensors(seed),
        config={"dim": 4, "layers": [8, 8]},
        transform={"mean": [0.0, 1.0], "std": [1.0, 2.0]},
        metrics={"val_nll": 1.25, "seed": seed},
        provenance={"data": "demo.parquet"},
        extra_files={"density.png": b"\x89PNG fake"},
    )
    kwargs.update(overrides)
    return store.export(name, **kwargs)


def rewrite_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path, fname: str = WEIGHTS) -> None:
    """Make the manifest's hash match the (tampered) file again, as a careful attacker would."""
    data = (folder / fname).read_bytes()

    def edit(manifest: dict) -> None:
        manifest["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    rewrite_manifest(folder, edit)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_round_trip(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    folder = export(store)
    assert folder == str(tmp_path / "m1")
    model = store.read("m1")
    assert isinstance(model, StoredModel) and model.name == "m1" and model.path == folder
    original = tensors(0)
    assert set(model.tensors) == set(original)
    for key, value in original.items():
        assert torch.equal(model.tensors[key], value)
    m = model.manifest
    assert m["format"] == FORMAT and m["name"] == "m1" and m["kind"] == "flow"
    assert m["densiray_version"] == __version__
    assert datetime.fromisoformat(m["created"]).utcoffset().total_seconds() == 0
    assert m["config"] == {"dim": 4, "layers": [8, 8]} and m["metrics"]["val_nll"] == 1.25
    assert m["transform"]["std"] == [1.0, 2.0] and m["provenance"] == {"data": "demo.parquet"}
    assert m["tensors"]["layer.weight"] == {"shape": [4, 3], "dtype": "float32"}
    assert m["tensors"]["steps"] == {"shape": [], "dtype": "int64"}
    assert set(m["files"]) == {WEIGHTS, "density.png"}
    for fname, entry in m["files"].items():
        data = (tmp_path / "m1" / fname).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert (tmp_path / "m1" / "density.png").read_bytes() == b"\x89PNG fake"
    text = (tmp_path / "m1" / MANIFEST).read_text()
    assert text == json.dumps(m, indent=2, sort_keys=True) + "\n"
    assert store.exists("m1") and not store.exists("nope") and not store.exists("../m1")
    assert leftovers(tmp_path) == []


def test_transform_may_be_none_and_extra_files_optional(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    export(store, transform=None, extra_files=None)
    manifest = store.read("m1").manifest
    assert manifest["transform"] is None and set(manifest["files"]) == {WEIGHTS}


def test_default_store_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DENSIRAY_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_store_uri() == "./models"
    assert Store().uri == str(tmp_path / "models")
    monkeypatch.setenv("DENSIRAY_STORE", str(tmp_path / "elsewhere"))
    export(Store())
    assert Store().read("m1").name == "m1"
    assert Store("rel").uri == str(tmp_path / "rel")


def test_file_uri_store_matches_plain_path(tmp_path: Path) -> None:
    uri_store = Store(tmp_path.as_uri())
    folder = export(uri_store)
    assert folder == f"{tmp_path.as_uri()}/m1"
    plain = Store(str(tmp_path))
    assert torch.equal(plain.read("m1").tensors["layer.bias"], tensors(0)["layer.bias"])
    export(plain, "m2", seed=1)
    assert [m["name"] for m in uri_store.list()] == ["m1", "m2"]
    assert uri_store.read("m2").manifest["metrics"]["seed"] == 1
    uri_store.delete("m2")
    assert not plain.exists("m2")


def test_object_store_path_without_folder_renames() -> None:
    # pyarrow's in-memory mock filesystem stands in for s3/gs (which cannot rename folders).
    store = Store("mock:///bucket/models")
    export(store)
    export(store, seed=1)
    assert store.read("m1").manifest["metrics"]["seed"] == 1
    assert [m["name"] for m in store.list()] == ["m1"]
    assert store.list()[0]["path"] == "mock:///bucket/models/m1"


def test_read_by_folder_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = export(Store(str(tmp_path / "a")))
    other = Store(str(tmp_path / "b"))  # the folder is not in this store
    model = other.read(folder)
    assert model.name == "m1" and model.path == folder
    monkeypatch.chdir(tmp_path / "a")
    assert other.read("m1").path == folder  # a relative folder path works too
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match=MANIFEST):
        other.read(str(empty))


def test_list(tmp_path: Path) -> None:
    assert Store(str(tmp_path / "missing")).list() == []
    store = Store(str(tmp_path))
    export(store, "zeta")
    export(store, "alpha", config={"layers": 2})
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / MANIFEST).write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "loose-file.txt").write_text("x")
    export(store, "broken")
    (tmp_path / "broken" / MANIFEST).write_text("{ not json")
    listing = store.list()
    assert [m["name"] for m in listing] == ["alpha", "broken", "zeta"]
    alpha, broken, zeta = listing
    assert alpha["d"] is None and zeta["d"] == 4
    assert zeta["kind"] == "flow" and zeta["metrics"]["val_nll"] == 1.25
    assert zeta["path"] == str(tmp_path / "zeta") and zeta["created"]
    assert set(broken) == {"name", "error"}
    assert "not valid JSON" in broken["error"] and "\n" not in broken["error"]


def test_reexport_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path))
    export(store, seed=0)
    seen = []
    write = store_mod._write_file

    def checking_write(fs, path, data) -> None:
        seen.append(store.read("m1").manifest["metrics"]["seed"])  # still the old model
        write(fs, path, data)

    monkeypatch.setattr(store_mod, "_write_file", checking_write)
    export(store, seed=1, extra_files=None)
    assert seen == [0, 0]  # before writing the weights and the manifest
    model = store.read("m1")
    assert model.manifest["metrics"]["seed"] == 1 and torch.equal(model.tensors["steps"], torch.tensor(1))
    assert not (tmp_path / "m1" / "density.png").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"metrics": {"val_nll": float("nan")}},
        {"config": {"lr": [1e-3, float("inf")]}},
        {"tensors": {"w": torch.zeros(2), "b": [1.0, 2.0]}},
        {"provenance": {"when": datetime.now()}},
        {"extra_files": {"../evil": b"x"}},
    ],
)
def test_failing_export_keeps_previous_model(tmp_path: Path, bad: dict) -> None:
    store = Store(str(tmp_path))
    export(store, seed=0)
    with pytest.raises(StoreError) as exc:
        export(store, seed=1, **bad)
    message = one_line(exc)
    if "metrics" in bad:
        assert "metrics['val_nll']" in message and "nan" in message
    if "config" in bad:
        assert "config['lr'][1]" in message
    if "tensors" in bad:
        assert "tensors['b']" in message
    assert store.read("m1").manifest["metrics"]["seed"] == 0
    assert leftovers(tmp_path) == []


def test_io_failure_midway_keeps_previous_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path))
    export(store, seed=0)

    def failing_write(fs, path, data) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_file", failing_write)
    with pytest.raises(StoreError, match="disk full") as exc:
        export(store, seed=1)
    one_line(exc)
    assert store.read("m1").manifest["metrics"]["seed"] == 0
    assert leftovers(tmp_path) == []


def test_failed_swap_restores_previous_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path))
    export(store, seed=0)
    move = store_mod._move_dir
    calls = []

    def flaky_move(fs, src, dst) -> None:
        calls.append(src)
        if len(calls) == 2:  # moving the new folder in
            raise OSError("interrupted")
        move(fs, src, dst)

    monkeypatch.setattr(store_mod, "_move_dir", flaky_move)
    with pytest.raises(StoreError, match="interrupted"):
        export(store, seed=1)
    assert store.read("m1").manifest["metrics"]["seed"] == 0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../up", "a b", "x" * 129, "m1\n", "é"])
def test_bad_names(tmp_path: Path, name: str) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(StoreError, match="invalid model name") as exc:
        export(store, name)
    one_line(exc)
    with pytest.raises(StoreError, match="invalid model name"):
        store.read(name)
    with pytest.raises(StoreError, match="invalid model name"):
        store.delete(name)
    assert not store.exists(name)
    assert list(tmp_path.iterdir()) == []


def test_longest_name_is_fine(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    export(store, "A" + "x._-" * 31 + "xyz")
    assert store.exists("A" + "x._-" * 31 + "xyz")


def test_unknown_model_lists_available(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(StoreError, match="empty"):
        store.read("ghost")
    for i in range(12):
        export(store, f"m{i:02d}", extra_files=None)
    with pytest.raises(StoreError) as exc:
        store.read("ghost")
    message = one_line(exc)
    assert "'ghost'" in message and str(tmp_path) in message
    assert "m00, m01" in message and "m09" in message and "m10" not in message and "2 more" in message
    with pytest.raises(StoreError, match="unknown model"):
        store.delete("ghost")
    store.delete("m00")
    assert not store.exists("m00") and not (tmp_path / "m00").exists()


def test_tampered_weights(tmp_path: Path) -> None:
    folder = Path(export(Store(str(tmp_path))))
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{WEIGHTS} fails its sha256 check") as exc:
        Store(str(tmp_path)).read("m1")
    one_line(exc)


def test_tampered_extra_file(tmp_path: Path) -> None:
    folder = Path(export(Store(str(tmp_path))))
    (folder / "density.png").write_bytes(b"other")
    with pytest.raises(StoreError, match="density.png fails its sha256"):
        Store(str(tmp_path)).read("m1")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["files"][WEIGHTS].update(sha256="0" * 64), "sha256"),
        (lambda m: m.update(format="other/9"), "not a densiray-model/1 manifest"),
        (lambda m: m.pop("files"), "lacks"),
        (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}}), "malformed"),
        (lambda m: m["tensors"]["layer.bias"].update(shape=[5]), "manifest lists"),
        (lambda m: m["tensors"].pop("steps"), "manifest lists"),
    ],
)
def test_tampered_manifest(tmp_path: Path, edit, match: str) -> None:
    rewrite_manifest(Path(export(Store(str(tmp_path)))), edit)
    with pytest.raises(StoreError, match=match) as exc:
        Store(str(tmp_path)).read("m1")
    one_line(exc)


def test_broken_manifest_json(tmp_path: Path) -> None:
    folder = Path(export(Store(str(tmp_path))))
    (folder / MANIFEST).write_bytes(b'{"format": "densiray-model/1", \xff')
    with pytest.raises(StoreError, match="not valid JSON") as exc:
        Store(str(tmp_path)).read("m1")
    one_line(exc)


def test_missing_files(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    folder = Path(export(store))
    (folder / WEIGHTS).unlink()
    with pytest.raises(StoreError, match=f"missing {WEIGHTS}") as exc:
        store.read("m1")
    one_line(exc)
    (folder / MANIFEST).unlink()
    with pytest.raises(StoreError, match=f"no {MANIFEST}"):
        store.read("m1")


def test_garbage_weights_with_matching_hash(tmp_path: Path) -> None:
    folder = Path(export(Store(str(tmp_path))))
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    rehash(folder)
    with pytest.raises(StoreError, match="not a readable safetensors file") as exc:
        Store(str(tmp_path)).read("m1")
    one_line(exc)


class Booby:
    """Unpickling this creates a marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_is_never_unpickled(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "unpickled"
    folder = Path(export(Store(str(tmp_path / "store"))))
    payload = {"layer.weight": Booby(marker)}
    if writer == "pickle":
        (folder / WEIGHTS).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, folder / WEIGHTS)
    rehash(folder)
    with pytest.raises(StoreError, match="not a readable safetensors file"):
        Store(str(tmp_path / "store")).read("m1")
    assert not marker.exists()


def test_version_changes_when_a_model_is_exported_again(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert store.version("m1") is None and store.version("../m1") is None
    export(store, "m1", seed=0)
    first = store.version("m1")
    assert first is not None and store.version("m1") == first
    export(store, "m1", seed=1)
    assert store.version("m1") not in (None, first)


def test_a_run_folder_resumes_only_an_unfinished_run_with_the_same_settings(tmp_path: Path) -> None:
    from densiray import runs
    from densiray.errors import ConfigError

    path = str(tmp_path / ".runs" / "r")
    assert runs.prepare(path, "a", restart=False, resumable=lambda: True) == "new"
    Path(path, "checkpoint_0").mkdir()
    assert runs.prepare(path, "a", restart=False, resumable=lambda: True) == "resume"
    assert Path(path, "checkpoint_0").is_dir()  # a resume keeps what the run has
    with pytest.raises(ConfigError, match="different settings"):
        runs.prepare(path, "b", restart=False, resumable=lambda: True)
    assert Path(path, "checkpoint_0").is_dir()  # a refusal loses nothing
    # nothing to resume from, an explicit restart, a finished run: a fresh, empty folder
    assert runs.prepare(path, "b", restart=False, resumable=lambda: False) == "restart"
    Path(path, "checkpoint_0").mkdir()
    assert runs.prepare(path, "c", restart=True, resumable=lambda: True) == "restart"
    assert not Path(path, "checkpoint_0").exists()
    runs.finish(path, "c")
    assert runs.prepare(path, "c", restart=False, resumable=lambda: True) == "restart"
