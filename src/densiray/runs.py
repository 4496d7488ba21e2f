"""Where runs and sweeps live, and whether to resume them: one marker file per run folder.

``<store>/.runs/<name>/`` holds a training run's Ray Train checkpoints (``densiray train``) and
``<store>/.runs/tune-<name>/`` a sweep (``densiray tune``). Each has a marker (:data:`MARKER`) with the
hash of the settings it was started with and whether it finished. :func:`prepare` decides between a
fresh start and a resume; :func:`finish` marks a run done. All I/O goes through ``pyarrow.fs``, so the
same code works on local disk and on ``s3://`` / ``gs://``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from densiray.errors import ConfigError
from densiray.store import default_store_uri

MARKER = "densiray_run.json"


def runs_uri(store: str | None) -> str:
    """Where Ray Train keeps runs and checkpoints: ``<store>/.runs`` (shared storage on a cluster)."""
    uri = store or default_store_uri()
    if "://" in uri:
        return uri.rstrip("/") + "/.runs"
    return str(Path(uri).absolute() / ".runs")


def filesystem(uri: str):
    """``(pyarrow filesystem, path)`` for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def config_hash(described: dict) -> str:
    """A short, stable hash of a JSON-able description of a run's settings."""
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(path: str, digest: str, restart: bool, resumable: Callable[[], bool], what: str = "run") -> str:
    """Decide between a fresh run and resuming the one at ``path``: returns "new", "resume" or "restart".

    An unfinished run with the same settings (``digest``) resumes if ``resumable()`` (it has something
    to resume from); a finished one, one with nothing to resume from, or ``restart`` starts afresh (the
    folder is emptied); an unfinished one with other settings is refused, so a resume never mixes two.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    marker = f"{root}/{MARKER}"
    action = "new"
    if fs.get_file_info(marker).type == pafs.FileType.File:
        with fs.open_input_stream(marker) as f:
            previous = json.loads(f.read())
        if restart or previous.get("done") or not resumable():
            action = "restart"
        elif previous.get("config_hash") != digest:
            raise ConfigError(f"an unfinished {what} of this name exists with different settings; run it again "
                              "with the same settings to resume, pass --restart to discard it, or choose another --name")
        else:
            action = "resume"
    elif restart:
        action = "restart"
    if action != "resume":
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir(root)
        fs.create_dir(root, recursive=True)
        _write(path, digest, done=False)
    return action


def finish(path: str, digest: str) -> None:
    """Mark the run at ``path`` finished: the same command then starts afresh instead of resuming."""
    _write(path, digest, done=True)


def has_checkpoint(path: str) -> bool:
    """Whether Ray Train left a checkpoint folder in the run at ``path``."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    return any(i.base_name.startswith("checkpoint_")
               for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def _write(path: str, digest: str, done: bool) -> None:
    fs, root = filesystem(path)
    with fs.open_output_stream(f"{root}/{MARKER}") as f:
        f.write(json.dumps({"config_hash": digest, "done": done}).encode())
