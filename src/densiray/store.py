"""The model store: one folder per exported model, verified by sha256 on every read, never unpickled.

A store is a directory, local (``./models`` or ``$DENSIRAY_STORE``) or any pyarrow filesystem URI
(``s3://``, ``gs://``, ``file://``). Each model lives in ``<store>/<name>/`` with ``model.safetensors``,
``manifest.json`` and optional extra files. All I/O goes through ``pyarrow.fs`` so remote stores behave
like local ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import safetensors.torch
import torch

from densiray import __version__
from densiray.errors import StoreError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "densiray-model/1"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME_RULE = "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_CHUNK = 1 << 20


def default_store_uri() -> str:
    """The store used when none is given: ``$DENSIRAY_STORE`` or ``./models``."""
    return os.environ.get("DENSIRAY_STORE") or "./models"


@dataclass
class StoredModel:
    """A model read back from the store, with every file's hash verified."""

    name: str
    path: str
    manifest: dict
    tensors: dict[str, torch.Tensor]


def _one_line(error: BaseException) -> str:
    """An exception's message folded onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _is_name(name: object) -> bool:
    """Whether ``name`` is a valid model (or file) name."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, hint: str = "") -> str:
    """Return ``name`` if it is a valid model name, else raise StoreError."""
    if not _is_name(name):
        raise StoreError(f"invalid model name {name!r}: {_NAME_RULE}{hint}")
    return name  # type: ignore[return-value]


def _check_json(value: object, where: str) -> None:
    """Raise StoreError naming the first part of ``value`` that strict JSON cannot hold."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"{where} is {value}: JSON cannot hold NaN or infinity; store a finite number or None")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(
                    f"{where} has the non-string key {key!r}: JSON keys must be strings; convert it with str()"
                )
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise StoreError(
        f"{where} is a {type(value).__name__}, which is not JSON-serialisable; "
        "convert it to a number, string, list or dict"
    )


def _read_hashed(fs: pafs.FileSystem, path: str) -> tuple[bytes, str]:
    """Read a whole file once, returning its bytes and their sha256 hex digest."""
    digest = hashlib.sha256()
    parts = []
    with fs.open_input_stream(path, compression=None) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            parts.append(chunk)
    return b"".join(parts), digest.hexdigest()


def _write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (never compressed, whatever the file's extension)."""
    with fs.open_output_stream(path, compression=None) as stream:
        stream.write(data)


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move a model folder: a rename locally; file by file on object stores, which cannot move folders."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    fs.create_dir(dst)
    for info in fs.get_file_info(pafs.FileSelector(src)):
        fs.move(info.path, f"{dst}/{info.base_name}")
    fs.delete_dir(src)


def _parse_manifest(data: bytes, shown: str) -> dict:
    """Parse and structurally check a manifest; ``shown`` names the folder in errors."""
    fix = "export the model again"
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{shown}/{MANIFEST} is not valid JSON ({_one_line(e)}); {fix}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise StoreError(
            f"{shown}/{MANIFEST} is not a {FORMAT} manifest (format {found!r}); {fix} with densiray {__version__}"
        )
    files, tensors = manifest.get("files"), manifest.get("tensors")
    if not isinstance(files, dict) or WEIGHTS not in files or not isinstance(tensors, dict):
        raise StoreError(f"{shown}/{MANIFEST} lacks its 'files' (with {WEIGHTS}) or 'tensors' entries; {fix}")
    for fname, entry in files.items():
        if (
            not _is_name(fname)
            or fname == MANIFEST
            or not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise StoreError(f"{shown}/{MANIFEST} has a malformed 'files' entry {fname!r}; {fix}")
    return manifest


def _read_folder(fs: pafs.FileSystem, folder: str, shown: str) -> StoredModel:
    """Read and verify one model folder; ``shown`` is how the folder is named to the user."""
    manifest_path = f"{folder}/{MANIFEST}"
    if fs.get_file_info(manifest_path).type != pafs.FileType.File:
        raise StoreError(
            f"{shown} has no {MANIFEST}: it is not an exported densiray model; "
            "pass a model folder or name, or export it again"
        )
    manifest = _parse_manifest(_read_hashed(fs, manifest_path)[0], shown)
    files: dict[str, dict] = manifest["files"]
    infos = fs.get_file_info([f"{folder}/{fname}" for fname in files])
    for fname, info in zip(files, infos):
        if info.type != pafs.FileType.File:
            raise StoreError(
                f"{shown} is missing {fname}, which its manifest lists: the folder is incomplete; export it again"
            )
    weights = b""
    for fname, entry in files.items():
        data, digest = _read_hashed(fs, f"{folder}/{fname}")
        if digest != entry["sha256"] or len(data) != entry["bytes"]:
            raise StoreError(
                f"{shown}: {fname} fails its sha256 check: the folder was modified or corrupted; export it again"
            )
        if fname == WEIGHTS:
            weights = data
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as e:  # safetensors raises its own error types for malformed input
        raise StoreError(
            f"{shown}/{WEIGHTS} is not a readable safetensors file ({_one_line(e)}); export the model again"
        ) from e
    expected = {k: v.get("shape") if isinstance(v, dict) else None for k, v in manifest["tensors"].items()}
    actual = {k: list(t.shape) for k, t in tensors.items()}
    if expected != actual:
        raise StoreError(
            f"{shown}/{WEIGHTS} holds tensors {actual} but its manifest lists {expected}; export the model again"
        )
    name = manifest.get("name")
    return StoredModel(
        name=name if isinstance(name, str) else folder.rstrip("/").rsplit("/", 1)[-1],
        path=shown,
        manifest=manifest,
        tensors=tensors,
    )


def _dim(config: object) -> int | None:
    """The data dimension recorded in a manifest config: ``config.dim`` or ``config.model.dim``."""
    if not isinstance(config, dict):
        return None
    model = config.get("model")
    return config.get("dim") or (model.get("dim") if isinstance(model, dict) else None)


def _check_export(kind: object, tensors: object, documents: dict, extra_files: dict) -> None:
    """Raise a one-line StoreError for anything an export cannot hold."""
    if not isinstance(kind, str) or not kind:
        raise StoreError(f"model kind must be a non-empty string, got {kind!r}; pass the model family, e.g. kind='flow'")
    if not isinstance(tensors, dict):
        raise StoreError(
            f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}; pass model.state_dict()"
        )
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise StoreError(
                f"tensors[{key!r}] is a {type(value).__name__}, not a torch.Tensor under a string name; pass only tensors"
            )
    for where, value in documents.items():
        if not isinstance(value, dict) and not (where == "transform" and value is None):
            raise StoreError(f"{where} must be a dict, got {type(value).__name__}; pass a JSON-style dict")
        _check_json(value, where)
    for fname, data in extra_files.items():
        if not _is_name(fname) or fname in (MANIFEST, WEIGHTS) or not isinstance(data, bytes):
            raise StoreError(
                f"extra file {fname!r} must have bytes content and a plain name "
                f"({_NAME_RULE}) other than {MANIFEST} or {WEIGHTS}"
            )


def _manifest(name: str, kind: str, documents: dict, tensors: dict[str, torch.Tensor], blobs: dict[str, bytes]) -> dict:
    """The manifest of an export: identity, the documents, tensor shapes and every file's sha256."""
    return {
        "format": FORMAT,
        "name": name,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "densiray_version": __version__,
        **documents,
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()},
        "files": {f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in blobs.items()},
    }


class Store:
    """A directory of exported models, local or behind a pyarrow filesystem URI."""

    def __init__(self, uri: str | None = None) -> None:
        """Open the store at ``uri`` (default: :func:`default_store_uri`); nothing is created until export."""
        uri = uri or default_store_uri()
        if "://" in uri:
            try:
                self._fs, root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowException, ValueError) as e:
                raise StoreError(
                    f"cannot open store {uri!r}: {_one_line(e)}; "
                    "pass a local path or a valid s3://, gs:// or file:// URI"
                ) from e
            self.uri = uri.rstrip("/")
        else:
            self._fs = pafs.LocalFileSystem()
            root = self.uri = os.path.abspath(os.path.expanduser(uri))
        self._root = root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def _fs_path(self, name: str) -> str:
        """The filesystem path of ``<store>/<name>``."""
        return f"{self._root.rstrip('/')}/{name}"

    def _shown(self, name: str) -> str:
        """How ``<store>/<name>`` is shown to the user (a local path or a URI)."""
        return f"{self.uri.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def _io(self, doing: str) -> Iterator[None]:
        """Turn filesystem errors into one-line StoreErrors."""
        try:
            yield
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot {doing}: {_one_line(e)}; check that the location exists and is accessible") from e

    def export(
        self,
        name: str,
        *,
        kind: str,
        tensors: dict[str, torch.Tensor],
        config: dict,
        transform: dict | None,
        metrics: dict,
        provenance: dict,
        extra_files: dict[str, bytes] | None = None,
    ) -> str:
        """Write a model atomically into ``<store>/<name>/``, replacing any previous one; returns the folder."""
        check_name(name)
        documents = {"config": config, "transform": transform, "metrics": metrics, "provenance": provenance}
        _check_export(kind, tensors, documents, extra_files or {})
        # A fresh contiguous CPU copy: safetensors needs contiguous tensors and refuses shared storage.
        cpu = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        try:
            weights = safetensors.torch.save(cpu)
        except Exception as e:  # e.g. a dtype safetensors cannot store
            raise StoreError(
                f"cannot serialise the tensors with safetensors ({_one_line(e)}); pass plain numeric tensors"
            ) from e
        blobs = {WEIGHTS: weights, **(extra_files or {})}
        manifest = _manifest(name, kind, documents, cpu, blobs)
        blobs[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
        with self._io(f"export model {name!r} to {self.uri}"):
            self._replace(name, blobs)
        return self._shown(name)

    def _replace(self, name: str, blobs: dict[str, bytes]) -> None:
        """Write ``blobs`` into a temporary sibling folder, then swap it in for ``<store>/<name>``."""
        fs, final = self._fs, self._fs_path(name)
        tmp = self._fs_path(f".tmp-{name}-{uuid.uuid4().hex}")
        old: str | None = None
        try:
            fs.create_dir(tmp, recursive=True)
            for fname, data in blobs.items():  # the manifest comes last: a folder with one is complete
                _write_file(fs, f"{tmp}/{fname}", data)
            if fs.get_file_info(final).type != pafs.FileType.NotFound:
                old = self._fs_path(f".old-{name}-{uuid.uuid4().hex}")
                _move_dir(fs, final, old)
            try:
                _move_dir(fs, tmp, final)
            except BaseException:
                if old is not None:
                    _move_dir(fs, old, final)
                raise
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    fs.delete_dir(tmp)
            raise
        if old is not None:
            with contextlib.suppress(OSError, pa.ArrowException):  # the new model is in place; a leftover is hidden
                fs.delete_dir(old)

    def read(self, name_or_path: str) -> StoredModel:
        """Read and verify a model by name, or a model folder given by its local path."""
        # A local folder with a manifest is read directly; so is one that cannot be a model name (to report why).
        has_manifest = os.path.isfile(os.path.join(name_or_path, MANIFEST))
        if os.path.isdir(name_or_path) and (has_manifest or not _is_name(name_or_path)):
            folder = os.path.abspath(name_or_path)
            with self._io(f"read model folder {folder}"):
                return _read_folder(pafs.LocalFileSystem(), folder, folder)
        name = check_name(name_or_path, hint=f", or pass the path of a model folder containing {MANIFEST}")
        with self._io(f"read model {name!r} from {self.uri}"):
            if self._fs.get_file_info(self._fs_path(name)).type != pafs.FileType.Directory:
                raise self._unknown(name)
            return _read_folder(self._fs, self._fs_path(name), self._shown(name))

    def list(self) -> list[dict]:
        """Summaries of the models in the store, sorted by name; unreadable ones carry an ``error``."""
        with self._io(f"list the models in {self.uri}"):
            infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
            names = sorted(
                i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
            )
            manifests = self._fs.get_file_info([f"{self._fs_path(n)}/{MANIFEST}" for n in names])
            out: list[dict] = []
            for name, info in zip(names, manifests):
                if info.type != pafs.FileType.File:
                    continue
                try:
                    manifest = _parse_manifest(_read_hashed(self._fs, info.path)[0], self._shown(name))
                except StoreError as e:
                    out.append({"name": name, "error": str(e)})
                    continue
                config = manifest.get("config")
                out.append(
                    {
                        "name": name,
                        "kind": manifest.get("kind"),
                        "created": manifest.get("created"),
                        "d": _dim(config),
                        "metrics": manifest.get("metrics"),
                        "path": self._shown(name),
                    }
                )
        return out

    def delete(self, name: str) -> None:
        """Delete model ``name`` and its folder."""
        check_name(name)
        with self._io(f"delete model {name!r} from {self.uri}"):
            if not self.exists(name):
                raise self._unknown(name)
            self._fs.delete_dir(self._fs_path(name))

    def exists(self, name: str) -> bool:
        """Whether the store holds a model folder (one with a manifest) called ``name``."""
        if not _is_name(name):
            return False
        with self._io(f"look up model {name!r} in {self.uri}"):
            return self._fs.get_file_info(f"{self._fs_path(name)}/{MANIFEST}").type == pafs.FileType.File

    def version(self, name: str) -> str | None:
        """A cheap fingerprint of model ``name`` (its manifest's size and modification time), or None if the
        store has no such model; it changes when the model is exported again. One stat, no read."""
        if not _is_name(name):
            return None
        with self._io(f"look up model {name!r} in {self.uri}"):
            info = self._fs.get_file_info(f"{self._fs_path(name)}/{MANIFEST}")
        if info.type != pafs.FileType.File:
            return None
        return f"{info.size}-{info.mtime_ns}"

    def _unknown(self, name: str) -> StoreError:
        """The error for a model name this store does not hold, listing what it does hold."""
        names = [m["name"] for m in self.list()]
        if not names:
            return StoreError(
                f"unknown model {name!r}: the store {self.uri} is empty; "
                "export a model first or point DENSIRAY_STORE at another store"
            )
        more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
        return StoreError(
            f"unknown model {name!r} in store {self.uri}; available: {', '.join(names[:10])}{more}; "
            "pick one of these or use another store"
        )


def load_model(path_or_name: str, store: str | None = None):
    """A ready model from ``store`` (or a model folder), rebuilt by its family's loader.

    The folder's hashes are verified and the weights read with safetensors (never unpickled); the
    family (:mod:`densiray.families`, by the manifest's ``kind``) rebuilds the model from its config.
    What the model can do is in :func:`densiray.capabilities.capabilities`.
    """
    from densiray import families

    stored = Store(store).read(path_or_name)
    return families.for_stored(stored.manifest.get("kind"), stored.name).load(stored)
