"""The HTTP API (FastAPI): routes built from what each model can do, one-line JSON errors, a body limit.

    GET  /healthz
    GET  /v1/models                 every model: kind, dim, created, metrics, capabilities, endpoints
    GET  /v1/models/{name}          one model, with its sub-models (nested models)
    POST /v1/models/{name}/log_prob   {"x": [[...], ...]}            -> {"log_prob": [...]}        (density)
    POST /v1/models/{name}/score      {"x": [...], "percentile": 1}  -> {"score", "outlier", "threshold"}
    POST /v1/models/{name}/sample     {"n": 16, "seed": 0}           -> {"samples": [...]}         (sampler)
    POST /v1/models/{name}/classify   {"texts": [...]} | {"x": [...]} -> {"labels", "probs", ...}  (classifier)
    POST /v1/models/{name}/condition  {"coarse", "factor", "sensors", "noise", "n", "steps", "seed"}
                                                                     -> {"mean", "std"[, "samples"]}

Which POST endpoints a model answers follows from its capabilities (:mod:`densiray.capabilities`);
no family is named here. Every refusal is ``{"error": "<one line>"}`` with a 4xx status: 404 unknown
model, 409 a model folder that cannot be loaded (corrupt, tampered), 400 an endpoint (or a budget)
the model does not have, 405 a wrong method (with ``Allow``), 413 a body over the limit, 422
anything wrong in the body (including what the model itself refuses, e.g. a budget nothing fits).
The same app runs inside the Serve deployment and in the plain uvicorn process
(:mod:`densiray.serve.plain`); only the backend differs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from densiray import __version__
from densiray.capabilities import Nested, capabilities
from densiray.errors import DensirayError, RequestError
from densiray.serve import validation as check
from densiray.serve.backends import Backend, load
from densiray.serve.schemas import (
    Bodies,
    ClassifyResponse,
    ConditionResponse,
    ErrorResponse,
    Health,
    LogProbResponse,
    ModelDetail,
    ModelList,
    SampleResponse,
    ScoreResponse,
    request_bodies,
)

logger = logging.getLogger("densiray.serve")

BAD_REQUEST, TOO_LARGE = 400, 413
# The capability each POST endpoint needs (densiray.capabilities.CAPABILITIES).
ENDPOINTS = {"log_prob": "density", "score": "density", "sample": "sampler", "classify": "classifier",
             "condition": "conditional_sampler"}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [(400, "the model has no such endpoint (or takes no budget)"), (404, "unknown model"),
                       (409, "the model folder cannot be loaded (corrupt or tampered)"),
                       (413, "request body too large"), (422, "invalid input")]
}


def endpoints_of(caps: list[str]) -> list[str]:
    """The POST endpoints of a model with capabilities ``caps``, in the API's order."""
    return [e for e, cap in ENDPOINTS.items() if cap in caps]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a JSON 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self, size: str) -> str:
        return (f"the request body is {size} bytes, more than the {self.max_bytes} allowed; "
                "send fewer rows or texts per request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error(TOO_LARGE, self.message(length.decode()))(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:  # FastAPI passes an HTTPException from the body read on to its handler
                raise HTTPException(TOO_LARGE, self.message(f"over {seen}"))
            return msg

        await self.app(scope, limited, send)


def _endpoint(request: Request) -> str:
    return request.url.path.rstrip("/").rsplit("/", 1)[-1]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(DensirayError)
    async def bad_data(request: Request, e: DensirayError) -> JSONResponse:  # e.g. DataError from the model
        return _error(check.UNPROCESSABLE, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(check.UNPROCESSABLE, check.validation_error_message(list(e.errors()), _endpoint(request)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404 and e.detail == "Not Found":
            msg = (f"no endpoint {where}; the API is GET /healthz, GET /v1/models[/{{name}}] and POST "
                   f"/v1/models/{{name}}/{{{','.join(ENDPOINTS)}}} (see /docs)")
        elif e.status_code == 400 and e.detail == "There was an error parsing the body":  # e.g. nested too deep
            msg = (f"the body could not be parsed as JSON (not UTF-8, or nested too deeply); send a plain JSON object"
                   f" like {check.EXAMPLES.get(_endpoint(request), '{...}')}")
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            msg = f"{where} is not allowed; this path takes {allowed or 'another method'} (see /docs)"
        else:
            msg = str(e.detail)
        return _error(e.status_code, msg, headers=e.headers)  # e.g. Allow on a 405 (RFC 9110)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        return _error(500, f"internal error ({type(e).__name__}: {detail}); the server log has the traceback")


class Models:
    """Looks models up through the backend and knows what each can do (cached per loaded model)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._caps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._listed: dict[str, list[str] | str] = {}  # name@version -> capabilities, or why it cannot load

    def capabilities(self, model: Any) -> list[str]:
        try:
            return self._caps[model]
        except KeyError:
            caps = self._caps[model] = capabilities(model)
            return caps
        except TypeError:  # not weak-referenceable
            return capabilities(model)

    async def get(self, name: str, endpoint: str) -> Any:
        """Model ``name``, which must have ``endpoint`` (else a one-line 400 naming the ones it has)."""
        model = await self.backend.model(name)
        caps = self.capabilities(model)
        if ENDPOINTS[endpoint] not in caps:
            kind = getattr(model, "kind", None)
            what = f"a {kind} model" if isinstance(kind, str) and kind else f"a {type(model).__name__}"
            raise RequestError(BAD_REQUEST, f"model {name!r} is {what}, which has no {endpoint}; its endpoints are "
                                            f"{', '.join(endpoints_of(caps)) or 'none'}")
        return model

    async def listed(self, name: str) -> list[str] | str:
        """Capabilities of model ``name`` for the listing (loaded once per version), or why it cannot load."""
        key = await self.backend.versions.key(name) or name
        if key not in self._listed:
            try:  # a fresh load, not the backend's cache: a listing must not evict the models in use
                self._listed[key] = capabilities(await asyncio.to_thread(load, name, self.backend.store))
            except RequestError as e:
                self._listed[key] = str(e)
        return self._listed[key]

    async def info(self, row: dict) -> dict:
        """A store listing row as :class:`ModelInfo` fields."""
        out = {"name": row["name"], "kind": row.get("kind"), "dim": row.get("d"), "created": row.get("created"),
               "metrics": row.get("metrics"), "error": row.get("error")}
        if out["error"] is None:
            caps = await self.listed(row["name"])
            if isinstance(caps, str):
                out["error"] = caps
            else:
                out["capabilities"], out["endpoints"] = caps, endpoints_of(caps)
        return out


def _accepts(fn: Any, keyword: str) -> bool:
    """Whether callable ``fn`` takes keyword argument ``keyword``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind == p.VAR_KEYWORD for p in params)


def _post(app: FastAPI, path: str, response_model: type, **types: type):
    """``app.post(path)`` for a handler whose parameters ``types`` are classes built at run time (the
    per-settings request bodies), which string annotations cannot name."""

    def register(fn):
        fn.__annotations__.update(types)
        return app.post(path, response_model=response_model, responses=ERRORS)(fn)

    return register


def _check_work(n: int, steps: int, settings) -> None:
    if n * steps > settings.max_condition_work:
        raise RequestError(check.UNPROCESSABLE,
                           f"n x steps is {n} x {steps} = {n * steps}, more than the {settings.max_condition_work} "
                           "allowed per request; ask for fewer samples or steps, or split the request")


def _info_routes(app: FastAPI, models: Models) -> None:
    """GET /healthz, /v1/models and /v1/models/{name}."""
    store = models.backend.store

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict:
        """Every model in the store, with what it can do (models that cannot load carry an ``error``)."""
        rows = await asyncio.to_thread(store.list)
        return {"models": [await models.info(r) for r in rows]}

    @app.get("/v1/models/{name}", response_model=ModelDetail, responses=ERRORS)
    async def describe(name: str) -> dict:
        """One model: its manifest summary, capabilities, endpoints and (nested models) sub-models."""
        model = await models.backend.model(name)  # 404 unknown, 409 unreadable
        rows = await asyncio.to_thread(store.list)
        row = next((r for r in rows if r["name"] == name), {"name": name})
        out = await models.info(row)
        caps = models.capabilities(model)
        out.update(capabilities=caps, endpoints=endpoints_of(caps), error=None)
        if isinstance(model, Nested):
            out["submodels"] = check.to_json(await asyncio.to_thread(model.submodels))
        return out


def _density_routes(app: FastAPI, models: Models, bodies: Bodies) -> None:
    """POST log_prob and score (Density)."""
    backend, settings = models.backend, models.backend.settings

    @_post(app, "/v1/models/{name}/log_prob", LogProbResponse, body=bodies.rows)
    async def log_prob(name: str, body) -> JSONResponse:
        """log-density of each row (nats, in the data's units)."""
        model = await models.get(name, "log_prob")
        lp = await backend.log_prob(model, check.check_rows(body.x, model.dim, name, settings))
        return JSONResponse({"log_prob": check.finite_or_none(lp)})

    @_post(app, "/v1/models/{name}/score", ScoreResponse, body=bodies.score)
    async def score(name: str, body) -> JSONResponse:
        """Outlier scores -log p(x) against the threshold at ``percentile`` of in-distribution rows."""
        model = await models.get(name, "score")
        threshold = float(model.threshold(body.percentile))  # DataError (422): no calibration at that percentile
        scores = -(await backend.log_prob(model, check.check_rows(body.x, model.dim, name, settings)))
        return JSONResponse({"score": check.finite_or_none(scores), "outlier": (~(scores <= threshold)).tolist(),
                             "threshold": threshold})


def _sampler_routes(app: FastAPI, models: Models, bodies: Bodies) -> None:
    """POST sample (Sampler) and condition (ConditionalSampler)."""
    settings = models.backend.settings

    @_post(app, "/v1/models/{name}/sample", SampleResponse, body=bodies.sample)
    async def sample(name: str, body) -> JSONResponse:
        """``n`` samples in the data's units; the same seed gives the same samples. ``steps`` goes to
        samplers that take it (e.g. diffusion models)."""
        model = await models.get(name, "sample")
        kwargs: dict[str, Any] = {}
        if body.steps is not None:
            if not _accepts(model.sample, "steps"):
                raise RequestError(check.UNPROCESSABLE, f"model {name!r} samples in one step and takes no 'steps'; "
                                                        "leave it out")
            _check_work(body.n, body.steps, settings)
            kwargs["steps"] = body.steps
        samples = await asyncio.to_thread(model.sample, body.n, body.seed, **kwargs)
        return JSONResponse({"samples": check.to_json(samples)})

    @_post(app, "/v1/models/{name}/condition", ConditionResponse, body=bodies.condition)
    async def condition(name: str, body) -> JSONResponse:
        """Posterior mean and std (and samples on request) given a coarse grid and/or point sensors.

        The model refuses (422) shapes it cannot take, a factor that does not divide its grid and
        sensors outside it; ``n x steps`` is bounded by the ``max_condition_work`` setting."""
        _check_work(body.n, body.steps, settings)
        model = await models.get(name, "condition")
        obs = body.model_dump()
        obs["coarse"] = None if body.coarse is None else check.check_grid(body.coarse, "coarse")
        obs["sensors"] = None if body.sensors is None else np.asarray(body.sensors, dtype=np.float64)
        out = await asyncio.to_thread(lambda: model.condition(**obs))
        answer = {"mean": check.to_json(out["mean"]), "std": check.to_json(out["std"])}
        if body.return_samples:
            answer["samples"] = check.to_json(out.get("samples"))
        return JSONResponse(answer)


def _classifier_routes(app: FastAPI, models: Models, bodies: Bodies) -> None:
    """POST classify (Classifier), with an optional budget for Nested classifiers."""
    settings = models.backend.settings

    def items_for(model: Any, name: str, body: Any) -> Any:
        takes = getattr(model, "input_kind", "text")
        if takes == "rows":
            if body.x is None:
                raise RequestError(check.UNPROCESSABLE, f'model {name!r} classifies rows of numbers; send {{"x": '
                                                        '[[...], ...]}, not texts')
            dim = getattr(model, "dim", None)
            return check.check_rows(body.x, dim, name, settings) if dim else check.check_grid(body.x, "x")
        if body.texts is None:
            raise RequestError(check.UNPROCESSABLE, f'model {name!r} classifies texts; send {{"texts": '
                                                    '["...", ...]}, not rows')
        return check.check_texts(body.texts, settings)

    @_post(app, "/v1/models/{name}/classify", ClassifyResponse, body=bodies.classify)
    async def classify(name: str, body) -> JSONResponse:
        """Labels and class probabilities of each text (or row), plus any per-item fields the model
        answers. With a ``budget`` (nested models) the largest sub-model that fits answers and
        ``submodel`` says which; a budget nothing fits is a 422."""
        model = await models.get(name, "classify")
        items = items_for(model, name, body)
        if body.budget is not None:
            if "nested" not in models.capabilities(model):
                raise RequestError(BAD_REQUEST, f"model {name!r} is not a nested model and takes no budget; "
                                                "leave 'budget' out")
            budget = body.budget.spec()
            out = await asyncio.to_thread(lambda: model.predict(items, budget=budget))
        else:
            out = await asyncio.to_thread(model.predict, items)
        answer = {k: check.to_json(v) for k, v in dict(out).items()}
        answer["labels"] = [str(label) for label in out["labels"]]
        return JSONResponse(answer)


def make_api(backend: Backend) -> FastAPI:
    """The FastAPI app over ``backend`` (a Serve replica or :class:`~densiray.serve.backends.LocalBackend`).

    The routes are the same for every store; which of them a model answers follows from its
    capabilities, checked per request (a model exported later is served without a restart).
    """
    settings = backend.settings
    app = FastAPI(title="densiray", version=__version__,
                  description="Deep density models (and the other densiray families) served by Ray Serve.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    models, bodies = Models(backend), request_bodies(settings)
    _info_routes(app, models)
    _density_routes(app, models, bodies)
    _sampler_routes(app, models, bodies)
    _classifier_routes(app, models, bodies)
    return app
