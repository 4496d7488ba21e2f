"""Typed request and response bodies of the HTTP API (they make the OpenAPI schema at /openapi.json).

Numbers are strict: a JSON number, never a string ("NaN", "1.5") or a boolean; NaN and infinity
(which Python's json accepts as literals) are refused. Limits that depend on the settings (rows,
samples, texts) are checked in :mod:`densiray.serve.validation`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row = list[Number]
MAX_SEED = 2**32 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RowsRequest(_Body):
    x: list[Row] = Field(description="rows of d numbers each, in the data's units", examples=[[[0.5, 0.25]]])


class ScoreRequest(RowsRequest):
    percentile: Number = Field(1.0, description="outlier threshold: the percentile of in-distribution log p "
                                                "(one of 0.1, 0.5, 1, 2, 5, 10)")


class SampleRequest(_Body):
    n: int = Field(16, strict=True, description="number of samples")
    seed: int = Field(0, strict=True, ge=0, le=MAX_SEED, description="random seed (same seed, same samples)")


class ClassifyRequest(_Body):
    texts: list[Annotated[str, Field(strict=True)]] = Field(description="texts to classify",
                                                            examples=[["great product, would buy again"]])


class LogProbResponse(BaseModel):
    log_prob: list[float | None] = Field(description="log-density of each row (nats, data units); "
                                                     "null where the density underflows to 0")


class ScoreResponse(BaseModel):
    score: list[float | None] = Field(description="-log p of each row (nats); null where p underflows to 0")
    outlier: list[bool] = Field(description="score above the threshold")
    threshold: float = Field(description="the score above which a row is an outlier")


class SampleResponse(BaseModel):
    samples: list[list[float]] = Field(description="n rows of d numbers, in the data's units")


class ClassifyResponse(BaseModel):
    labels: list[str]
    probs: list[list[float]]
    activation_density: list[float]


class ModelInfo(BaseModel):
    name: str
    kind: str | None = None
    dim: int | None = Field(None, description="data dimension (density models)")
    created: str | None = None
    metrics: dict | None = None
    error: str | None = Field(None, description="why the folder cannot be read (the model is not served)")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what was wrong and how to fix it")
