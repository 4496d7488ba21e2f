"""The Ray Serve deployment: a FastAPI ingress whose replicas load models on demand and batch log_prob.

``build_app(args)`` is the application builder that ``serve/config.yaml`` names
(``import_path: densiray.serve.deployment:build_app``); ``args`` are :class:`ServeSettings`.

* Models load from the store by name through ``serve.multiplexed``: an LRU of
  ``max_models_per_replica`` per replica, keyed ``name@version`` so that a model exported again is
  loaded afresh (within ``model_refresh_s``); a model that fails to load is not cached.
* With ``batching`` on (the default), ``log_prob`` and ``score`` requests, validated one by one
  first, go through ``serve.batch``:
  up to ``max_batch_size`` requests queued together are computed together, per model (a batch may
  mix models), in calls of at most ``max_rows_per_call`` rows. Batching fills those calls; a request
  that fills one on its own skips the queue.
* Replicas reserve ``replica_cpus`` (0.5 by default) so serving fits beside other work.
"""

from __future__ import annotations

import asyncio
import socket
import types
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application

from densiray.serve.backends import Versions, load, log_prob_batch, log_prob_rows
from densiray.serve.endpoints import make_api
from densiray.serve.settings import ServeSettings
from densiray.store import Store

APP_NAME = "densiray"


class _ReuseAddrSockets:
    """The ``socket`` module, but its sockets have SO_REUSEADDR set (as uvicorn's and most servers' have)."""

    def __init__(self, module: types.ModuleType):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def socket(self, *args, **kwargs) -> socket.socket:
        sock = self._module.socket(*args, **kwargs)
        sock.setsockopt(self._module.SOL_SOCKET, self._module.SO_REUSEADDR, 1)
        return sock


def reuseaddr_applies() -> bool:
    """Whether :func:`listen_with_reuseaddr` applies to this Ray (its Serve module looks as expected)."""
    try:
        from ray.serve._private import http_util
    except ImportError:
        return False
    return isinstance(http_util.__dict__.get("socket"), (types.ModuleType, _ReuseAddrSockets))


def listen_with_reuseaddr() -> bool:
    """Have this replica's direct-ingress HTTP server bind its port with SO_REUSEADDR; True where it applies.

    Serve (2.60) binds it without: a replica restarted after a crash, or a ``densiray serve`` restarted after a
    stop, could not bind the port while the old server's connections sat in TCP TIME_WAIT (60 s on Linux),
    and the app was down for that minute (measured: 62 s after a replica was killed with a client connected).
    SO_REUSEADDR lets a listener bind past TIME_WAIT; it never lets two processes listen on one port. Runs in
    the replica's constructor, which Serve calls before it starts that server; a Serve whose module looks
    different is left as it is."""
    if not reuseaddr_applies():
        return False
    from ray.serve._private import http_util

    if not isinstance(http_util.socket, _ReuseAddrSockets):
        http_util.socket = _ReuseAddrSockets(http_util.socket)
    return True


@serve.deployment(name="DensityService")
@serve.ingress()
class DensityService:
    """One replica: a store, a multiplexed model cache, a batch queue, and the FastAPI app over them."""

    def __init__(self, settings: dict):
        import torch

        listen_with_reuseaddr()
        self.settings = ServeSettings.parse(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.store = Store(self.settings.store)
        self.versions = Versions(self.store, self.settings.model_refresh_s)

        # Closures, not methods: the Serve decorators then hold per-replica settings.
        async def load_one(key: str) -> Any:
            return await asyncio.to_thread(load, key.rsplit("@", 1)[0], self.store)

        async def log_prob_many(items: list[tuple[Any, np.ndarray]]) -> list[np.ndarray | Exception]:
            return log_prob_batch(items, self.settings.max_rows_per_call)

        s = self.settings
        self._load = serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(load_one)
        self._batched = serve.batch(max_batch_size=s.max_batch_size,
                                    batch_wait_timeout_s=s.batch_wait_timeout_s)(log_prob_many)

    def __serve_build_asgi_app__(self):
        return make_api(self)

    async def model(self, name: str) -> Any:
        key = await self.versions.key(name)
        if key is None:  # not in the store: answer the 404 without a failed load in the model cache
            return await asyncio.to_thread(load, name, self.store)
        return await self._load(key)

    async def log_prob(self, model: Any, x: np.ndarray) -> np.ndarray:
        if not self.settings.batching or len(x) >= self.settings.max_rows_per_call:
            return log_prob_rows(model, x, self.settings.max_rows_per_call)
        result = await self._batched((model, x))
        if isinstance(result, Exception):
            raise result
        return result


def build_app(args: dict | None = None) -> Application:
    """The densiray Serve application from settings ``args`` (a dict, as in a config file's ``args``).

    A relative local store path is made absolute here, where the app is built.
    """
    settings = ServeSettings.parse(args)
    settings = settings.model_copy(update={"store": Store(settings.store).uri})
    deployment = DensityService.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=settings.max_ongoing_requests,
        max_replicas_per_node=settings.max_replicas_per_node,
        logging_config={"enable_access_log": settings.access_log},
    )
    return deployment.bind(settings.model_dump())
