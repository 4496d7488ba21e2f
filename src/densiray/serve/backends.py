"""Where the HTTP endpoints get their models and log-densities from.

The endpoints (:mod:`densiray.serve.endpoints`) talk to a *backend*: ``await backend.model(name)``
returns a loaded model (or raises a RequestError: 404 unknown, 409 unreadable), and
``await backend.log_prob(model, x)`` computes log-densities. Loaded models are cached under
``name@version`` (:class:`Versions`), so a model exported again under the same name is picked up
within ``model_refresh_s``. Two backends exist: the Ray Serve deployment
(:mod:`densiray.serve.deployment`: ``serve.multiplexed`` models, ``serve.batch``ed log_prob) and
:class:`LocalBackend` here, for the plain single-process app the benchmark compares with.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np

from densiray.errors import RequestError, StoreError
from densiray.serve.settings import ServeSettings
from densiray.store import Store, check_name

NOT_FOUND, CONFLICT = 404, 409


class Backend(Protocol):
    settings: ServeSettings
    store: Store
    versions: Versions

    async def model(self, name: str) -> Any: ...

    async def log_prob(self, model: Any, x: np.ndarray) -> np.ndarray: ...


def load(name: str, store: Store) -> Any:
    """Load model ``name`` from ``store`` (hashes verified, never unpickled), or raise a RequestError."""
    from densiray import load_model

    try:
        check_name(name)
        return load_model(name, store=store.uri)
    except StoreError as e:
        # Unknown (or an invalid name): 404. In the store but unreadable (corrupt, tampered): 409.
        if not store.exists(name):
            raise RequestError(NOT_FOUND, str(e)) from e
        raise RequestError(CONFLICT, f"model {name!r} cannot be loaded: {e}") from e


class Versions:
    """The current version of each model name (:meth:`Store.version`), re-checked at most every ``refresh_s``."""

    def __init__(self, store: Store, refresh_s: float):
        self.store, self.refresh_s = store, refresh_s
        self._seen: dict[str, tuple[str, float]] = {}

    async def key(self, name: str) -> str | None:
        """``name@version`` to cache the model under, or None when the store has no such model."""
        now = time.monotonic()
        seen = self._seen.get(name)
        if seen is None or now - seen[1] > self.refresh_s:
            version = await asyncio.to_thread(self.store.version, name)  # a stat; remote on s3:// or gs://
            if version is None:  # unknown: not remembered, so a model exported later is found at once
                self._seen.pop(name, None)
                return None
            seen = self._seen[name] = (version, now)
        return f"{name}@{seen[0]}"


def log_prob_rows(model: Any, x: np.ndarray, max_rows: int) -> np.ndarray:
    """``model.log_prob(x)`` computed in slices of at most ``max_rows`` rows.

    On CPU the cost per row is lowest up to about a thousand rows and grows beyond (larger
    intermediates fall out of cache), so big requests and batches are computed slice by slice.
    """
    if len(x) <= max_rows:
        return model.log_prob(x)
    return np.concatenate([model.log_prob(x[i:i + max_rows]) for i in range(0, len(x), max_rows)])


def log_prob_batch(items: list[tuple[Any, np.ndarray]], max_rows: int) -> list[np.ndarray | Exception]:
    """log p of every ``(model, rows)`` item: the rows of each model's items computed together.

    If a model's combined call fails, its items are computed one by one, so one failing item
    returns its own exception and never fails the others.
    """
    groups: dict[int, list[int]] = {}
    for i, (model, _) in enumerate(items):
        groups.setdefault(id(model), []).append(i)
    out: list[np.ndarray | Exception] = [np.empty(0)] * len(items)
    for idx in groups.values():
        model = items[idx[0]][0]
        try:
            lp = log_prob_rows(model, np.concatenate([items[i][1] for i in idx]), max_rows)
        except Exception:
            for i in idx:
                try:
                    out[i] = log_prob_rows(model, items[i][1], max_rows)
                except Exception as e:
                    out[i] = e
            continue
        ends = np.cumsum([len(items[i][1]) for i in idx])
        for i, part in zip(idx, np.split(lp, ends[:-1])):
            out[i] = part
    return out


class LocalBackend:
    """Models in a per-process LRU dict and log_prob computed per request: the plain app's backend."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.store = Store(settings.store)
        self.versions = Versions(self.store, settings.model_refresh_s)
        self._models: OrderedDict[str, Any] = OrderedDict()

    async def model(self, name: str) -> Any:
        key = await self.versions.key(name)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = await asyncio.to_thread(load, name, self.store)  # unknown (key None): raises the 404
        self._models[key or name] = model
        while len(self._models) > self.settings.max_models_per_replica:
            self._models.popitem(last=False)
        return model

    async def log_prob(self, model: Any, x: np.ndarray) -> np.ndarray:
        return log_prob_rows(model, x, self.settings.max_rows_per_call)
