"""The HTTP API (FastAPI): routes, one-line JSON errors, and the request body limit.

    GET  /healthz
    GET  /v1/models
    POST /v1/models/{name}/log_prob   {"x": [[...], ...]}        -> {"log_prob": [...]}
    POST /v1/models/{name}/sample     {"n": 16, "seed": 0}        -> {"samples": [[...], ...]}
    POST /v1/models/{name}/score      {"x": [...], "percentile": 1} -> {"score", "outlier", "threshold"}
    POST /v1/models/{name}/classify   {"texts": ["...", ...]}     -> {"labels", "probs", "activation_density"}

Every refusal is ``{"error": "<one line>"}`` with a 4xx status: 404 unknown model, 409 a model folder
that cannot be loaded (corrupt, tampered), 400 an endpoint the model's kind does not have, 413 a body
over the limit, 422 anything wrong in the body. The same app runs inside the Serve deployment and in
the plain uvicorn process (:mod:`densiray.serve.plain`); only the backend differs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from densiray import __version__
from densiray.errors import DensirayError, RequestError
from densiray.serve import validation as check
from densiray.serve.backends import Backend
from densiray.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    Health,
    LogProbResponse,
    ModelInfo,
    ModelList,
    RowsRequest,
    SampleRequest,
    SampleResponse,
    ScoreRequest,
    ScoreResponse,
)

logger = logging.getLogger("densiray.serve")

BAD_REQUEST, CONFLICT, TOO_LARGE = 400, 409, 413
# Which model attribute each endpoint needs: a density has log_prob/sample/threshold, a classifier predict.
NEEDS = {"log_prob": "log_prob", "sample": "sample", "score": "threshold", "classify": "predict"}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [(400, "the model's kind has no such endpoint"), (404, "unknown model"),
                       (409, "the model folder cannot be loaded (corrupt or tampered)"),
                       (413, "request body too large"), (422, "invalid input")]
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


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
            msg = f"no endpoint {where}; the API is GET /healthz, GET /v1/models and POST /v1/models/{{name}}/" \
                  "{log_prob,sample,score,classify} (see /docs)"
        elif e.status_code == 400 and e.detail == "There was an error parsing the body":  # e.g. nested too deep
            msg = (f"the body could not be parsed as JSON (not UTF-8, or nested too deeply); send a plain JSON object"
                   f" like {check.EXAMPLES.get(_endpoint(request), '{...}')}")
        elif e.status_code == 405:
            msg = f"{where} is not allowed; the model endpoints take POST with a JSON body (see /docs)"
        else:
            msg = str(e.detail)
        return _error(e.status_code, msg)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        return _error(500, f"internal error ({type(e).__name__}: {detail}); the server log has the traceback")


def make_api(backend: Backend) -> FastAPI:
    """The FastAPI app over ``backend`` (a Serve replica or :class:`~densiray.serve.backends.LocalBackend`)."""
    settings = backend.settings
    app = FastAPI(title="densiray", version=__version__, description="Deep density models served by Ray Serve.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)

    async def model_for(name: str, endpoint: str) -> Any:
        model = await backend.model(name)
        if not hasattr(model, NEEDS[endpoint]):
            has = [e for e, attr in NEEDS.items() if hasattr(model, attr)]
            raise RequestError(BAD_REQUEST, f"model {name!r} is a {getattr(model, 'kind', '?')} model, which has no "
                                            f"{endpoint}; its endpoints are {', '.join(has) or 'none'}")
        return model

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        rows = await asyncio.to_thread(backend.store.list)
        return {"models": [ModelInfo(name=r["name"], kind=r.get("kind"), dim=r.get("d"), created=r.get("created"),
                                     metrics=r.get("metrics"), error=r.get("error")) for r in rows]}

    @app.post("/v1/models/{name}/log_prob", response_model=LogProbResponse, responses=ERRORS)
    async def log_prob(name: str, body: RowsRequest) -> JSONResponse:
        """log-density of each row (nats, in the data's units)."""
        model = await model_for(name, "log_prob")
        lp = await backend.log_prob(model, check.check_rows(body.x, model.dim, name, settings))
        return JSONResponse({"log_prob": check.finite_or_none(lp)})

    @app.post("/v1/models/{name}/score", response_model=ScoreResponse, responses=ERRORS)
    async def score(name: str, body: ScoreRequest) -> JSONResponse:
        """Outlier scores -log p(x) against the threshold at ``percentile`` of in-distribution rows."""
        model = await model_for(name, "score")
        if not (getattr(model, "metrics", None) or {}).get("calibration"):
            raise RequestError(CONFLICT, f"model {name!r} has no outlier calibration (exported by an older "
                                         "densiray); export it again to score with it, or use log_prob")
        threshold = model.threshold(body.percentile)  # DataError (422) for a percentile it does not have
        rows = check.check_rows(body.x, model.dim, name, settings)
        scores = -(await backend.log_prob(model, rows))
        return JSONResponse({"score": check.finite_or_none(scores), "outlier": (~(scores <= threshold)).tolist(),
                             "threshold": threshold})

    @app.post("/v1/models/{name}/sample", response_model=SampleResponse, responses=ERRORS)
    async def sample(name: str, body: SampleRequest) -> JSONResponse:
        """``n`` exact samples in the data's units; the same seed gives the same samples."""
        n = check.check_samples(body.n, settings)
        model = await model_for(name, "sample")
        samples = await asyncio.to_thread(model.sample, n, body.seed)
        return JSONResponse({"samples": samples.tolist()})

    @app.post("/v1/models/{name}/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(name: str, body: ClassifyRequest) -> ClassifyResponse:
        """Labels, class probabilities and MLP activation density of each text (DEFT classifiers)."""
        texts = check.check_texts(body.texts, settings)
        model = await model_for(name, "classify")
        out = await asyncio.to_thread(model.predict, texts)
        return ClassifyResponse(labels=[str(label) for label in out["labels"]],
                                probs=np.asarray(out["probs"], dtype=float).tolist(),
                                activation_density=np.asarray(out["activation_density"], dtype=float).tolist())

    return app

