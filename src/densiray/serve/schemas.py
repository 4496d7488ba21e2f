"""Typed request and response bodies of the HTTP API (they make the OpenAPI schema at /openapi.json).

The schema states every constraint the server enforces that does not depend on the model: list
lengths (``minItems``/``maxItems`` from the settings), numeric bounds, the outlier percentiles
(``enum``), one-of fields. :func:`request_bodies` builds the request models from the settings, so
``maxItems`` is the server's real limit. What depends on the model (the row width ``dim``, whether
it takes texts or rows, a budget only a nested model takes, a factor that must divide its grid) is
checked per request and refused with a one-line 400 or 422, both documented per route.

Numbers are strict: a JSON number, never a string ("NaN", "1.5") or a boolean; NaN and infinity
(which Python's json accepts as literals) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from densiray.capabilities import OUTLIER_PERCENTILES
from densiray.serve.settings import ServeSettings

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
Row = Annotated[list[Number], Field(min_length=1)]
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED, description="random seed (same seed, same answer)")]
# A JSON array of any depth holding numbers (or null where a value is not finite).
Array = Annotated[list[Any], Field(description="a nested JSON array of numbers (null where not finite)")]


def _one_of_percentiles(value: float) -> float:
    if value not in OUTLIER_PERCENTILES:
        raise ValueError(f"percentile must be one of {', '.join(f'{q:g}' for q in OUTLIER_PERCENTILES)}")
    return value


Percentile = Annotated[
    float,
    Field(strict=True, allow_inf_nan=False, json_schema_extra={"enum": list(OUTLIER_PERCENTILES)}),
    AfterValidator(_one_of_percentiles),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one(body: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [f for f in fields if getattr(body, f) is not None]
    if len(given) != 1:
        raise ValueError(f"{what} takes exactly one of {', '.join(repr(f) for f in fields)}, got "
                         f"{', '.join(repr(f) for f in given) if given else 'none'}")


class Budget(_Body):
    """What a nested model may spend on one request: the largest sub-model that fits answers."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1, "maxProperties": 1})

    flops: Positive | None = Field(None, description="at most this many FLOPs per item")
    latency_ms: Positive | None = Field(None, description="at most this latency per request (ms)")
    params: Positive | None = Field(None, description="at most this many parameters")
    submodel: str | int | None = Field(None, description="an explicit sub-model (as GET /v1/models/{name} lists)")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        _exactly_one(self, ("flops", "latency_ms", "params", "submodel"), "budget")
        return self

    def spec(self) -> dict:
        """The one key given, as the model's ``predict(items, budget=...)`` takes it."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


@dataclass(frozen=True)
class Bodies:
    """The request models of one app (their limits come from its settings)."""

    rows: type[BaseModel]
    score: type[BaseModel]
    sample: type[BaseModel]
    classify: type[BaseModel]
    condition: type[BaseModel]


def request_bodies(s: ServeSettings) -> Bodies:
    """The request bodies with the limits of settings ``s`` (``maxItems`` = the server's real limits)."""
    Rows = Annotated[list[Row], Field(min_length=1, max_length=s.max_rows,
                                      description=f"1 to {s.max_rows} rows of d numbers each, in the data's units",
                                      examples=[[[0.5, 0.25]]])]
    Text = Annotated[str, Field(strict=True, max_length=s.max_text_chars)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=s.max_texts,
                                        description=f"1 to {s.max_texts} texts of at most {s.max_text_chars} "
                                                    "characters", examples=[["great product, would buy again"]])]
    N = Annotated[int, Field(strict=True, ge=1, le=s.max_samples, description=f"number of samples (1 to {s.max_samples})")]
    Steps = Annotated[int, Field(strict=True, ge=1, le=s.max_condition_work,
                                 description=f"sampler steps; n x steps at most {s.max_condition_work}")]
    Grid = Annotated[list[Row], Field(min_length=1, max_length=s.max_rows,
                                      description="the coarse observation: a 2-D grid of numbers")]
    Sensor = Annotated[tuple[Annotated[int, Field(strict=True, ge=0)], Annotated[int, Field(strict=True, ge=0)], Number],
                       Field(description="[i, j, value]: the value observed at grid cell (i, j)")]
    Sensors = Annotated[list[Sensor], Field(min_length=1, max_length=s.max_rows)]

    class RowsRequest(_Body):
        x: Rows

    class ScoreRequest(RowsRequest):
        percentile: Percentile = Field(1.0, description="outlier threshold: the percentile of in-distribution "
                                                        "log p (one of " + ", ".join(f"{q:g}" for q in
                                                                                  OUTLIER_PERCENTILES) + ")")

    class SampleRequest(_Body):
        n: N = min(16, s.max_samples)
        seed: Seed = 0
        steps: Steps | None = Field(None, description="sampler steps, for models whose sample takes them "
                                                      f"(n x steps at most {s.max_condition_work})")

    class ClassifyRequest(_Body):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["texts"]}, {"required": ["x"]}]})

        texts: Texts | None = Field(None, description="texts to classify (models that take text)")
        x: Rows | None = Field(None, description="rows to classify (models that take rows)")
        budget: Budget | None = Field(None, description="nested models only: what one request may spend")

        @model_validator(mode="after")
        def _one(self) -> ClassifyRequest:
            _exactly_one(self, ("texts", "x"), "classify")
            return self

    class ConditionRequest(_Body):
        coarse: Grid | None = Field(None, description="a coarse grid observed at 1/factor the resolution")
        factor: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = Field(
            None, description="how many fine cells one coarse cell averages, per axis")
        sensors: Sensors | None = Field(None, description="point observations [[i, j, value], ...]")
        noise: Positive = Field(0.1, description="observation noise (std, data units)")
        n: N = 8
        steps: Steps = 64
        seed: Seed = 0
        return_samples: bool = Field(False, description="also answer the posterior samples")

    return Bodies(RowsRequest, ScoreRequest, SampleRequest, ClassifyRequest, ConditionRequest)


class LogProbResponse(BaseModel):
    log_prob: list[float | None] = Field(description="log-density of each row (nats, data units); "
                                                     "null where the density underflows to 0")


class ScoreResponse(BaseModel):
    score: list[float | None] = Field(description="-log p of each row (nats); null where p underflows to 0")
    outlier: list[bool] = Field(description="score above the threshold")
    threshold: float = Field(description="the score above which a row is an outlier")


class SampleResponse(BaseModel):
    samples: Array


class ClassifyResponse(BaseModel):
    """Labels and class probabilities; any further per-item fields the model answers pass through."""

    model_config = ConfigDict(extra="allow")

    labels: list[str]
    probs: list[list[float | None]]
    submodel: Any = Field(None, description="nested models: the sub-model that answered")


class ConditionResponse(BaseModel):
    mean: Array
    std: Array
    samples: Array | None = None


class SubModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelInfo(BaseModel):
    name: str
    kind: str | None = None
    dim: int | None = Field(None, description="data dimension (density models)")
    created: str | None = None
    metrics: dict | None = None
    capabilities: list[str] | None = Field(None, description="what the model can do (densiray.capabilities)")
    endpoints: list[str] | None = Field(None, description="the POST endpoints it answers")
    error: str | None = Field(None, description="why the folder cannot be read (the model is not served)")


class ModelDetail(ModelInfo):
    submodels: list[SubModel] | None = Field(None, description="nested models: the sub-models and their metrics")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class ErrorResponse(BaseModel):
    error: str = Field(description="one line: what was wrong and how to fix it")
