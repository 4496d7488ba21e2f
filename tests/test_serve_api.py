"""The HTTP API in-process: FastAPI's test client over the same app and the plain app's LocalBackend.

The error matrix and the capability routing run here (fast, no Ray); ``test_serve.py`` keeps the
real Serve HTTP cases. A tiny family registered by this file (``toy-serve``) stands in for every
capability (density, text classifier, nested rows classifier, conditional sampler), so the routes
are tested without the other families, and a real DNMM (moons, initial weights) checks the
density routes against the loaded model.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import densiray
from densiray import families
from densiray.capabilities import OUTLIER_PERCENTILES
from densiray.errors import BudgetError, DataError
from densiray.families import Family
from densiray.serve import ServeSettings
from densiray.serve.plain import plain_app
from densiray.store import MANIFEST, WEIGHTS, Store

KIND = "toy-serve"
LIMITS = {"max_rows": 500, "max_samples": 300, "max_texts": 4, "max_text_chars": 50, "max_body_bytes": 64 << 10,
          "model_refresh_s": 0.0, "max_rows_per_call": 8, "max_condition_work": 1000}
ROW = [0.5, 0.25]


# ---------------------------------------------------------------------------------------------------
# the toy family: one model class per capability, chosen by the manifest's config["what"]


class ToyDensity:
    """A standard normal on R^2 (log_prob, sample, score, threshold)."""

    kind = KIND
    dim = 2

    def __init__(self, metrics: dict):
        self.metrics = metrics

    def log_prob(self, x):
        x = np.asarray(x, dtype=float)
        return -0.5 * (x**2).sum(axis=1) - np.log(2 * np.pi)

    def sample(self, n: int, seed: int = 0):
        return np.random.default_rng(seed).normal(size=(n, 2))

    def threshold(self, percentile: float = 1.0) -> float:
        if percentile not in (1.0, 5.0):
            raise DataError(f"percentile must be one of 1, 5, got {percentile!r}")
        return 5.0 + percentile

    def score(self, x, percentile: float = 1.0) -> dict:
        s = -self.log_prob(x)
        return {"score": s, "outlier": s > self.threshold(percentile), "threshold": self.threshold(percentile)}


class ToyTexts:
    """A text classifier with no ``input_kind`` (texts by default) and an extra per-item field."""

    kind = KIND
    labels: ClassVar[list[str]] = ["neg", "pos"]

    def predict(self, texts: list) -> dict:
        pos = np.array([float("good" in t) for t in texts])
        return {"labels": [self.labels[int(p)] for p in pos], "probs": np.stack([1 - pos, pos], axis=1),
                "length": np.array([len(t) for t in texts])}


class ToyNested:
    """A nested classifier of rows: two sub-models, the larger answers when the budget allows."""

    kind = KIND
    input_kind = "rows"
    dim = 2
    labels: ClassVar[list[str]] = ["a", "b"]
    SUBS: ClassVar[list[dict]] = [{"name": "small", "params": 10, "flops": 100.0, "accuracy": 0.8},
            {"name": "big", "params": 100, "flops": 1000.0, "accuracy": 0.9}]

    def submodels(self) -> list[dict]:
        return self.SUBS

    def submodel(self, spec):
        for s in self.SUBS:
            if spec in (s["name"], self.SUBS.index(s)):
                return s
        raise BudgetError(f"no sub-model {spec!r}; the sub-models are small, big")

    def for_budget(self, **budget: float) -> dict:
        (key, value), = budget.items()
        if key == "latency_ms":
            key, value = "flops", value * 100
        fits = [s for s in self.SUBS if s[key] <= value]
        if not fits:
            raise BudgetError(f"no sub-model fits {key} <= {value:g}; the smallest needs {self.SUBS[0][key]:g}")
        return fits[-1]

    def predict(self, items, budget: dict | None = None) -> dict:
        sub = self.SUBS[-1] if budget is None else (
            self.submodel(budget["submodel"]) if "submodel" in budget else self.for_budget(**budget))
        x = np.asarray(items)
        p = 1 / (1 + np.exp(-x.sum(axis=1)))
        return {"labels": [self.labels[int(v > 0.5)] for v in p], "probs": np.stack([1 - p, p], axis=1),
                "submodel": sub["name"]}


class ToyConditional:
    """Fields on a 4x4 grid: samples (with steps) and a posterior given a coarse grid and/or sensors."""

    kind = KIND
    GRID = 4

    def sample(self, n: int, seed: int = 0, steps: int = 8):
        return np.random.default_rng(seed).normal(size=(n, self.GRID, self.GRID)) / steps

    def condition(self, coarse=None, factor=None, sensors=None, noise=0.1, n=8, steps=64, seed=0,
                  return_samples=False) -> dict:
        if coarse is None and sensors is None:
            raise DataError("give coarse and/or sensors")
        mean = np.zeros((self.GRID, self.GRID))
        if coarse is not None:
            if factor is None or self.GRID % factor:
                raise DataError(f"factor {factor} does not divide the grid of {self.GRID}")
            if coarse.shape != (self.GRID // factor,) * 2:
                raise DataError(f"coarse has shape {coarse.shape}, expected {(self.GRID // factor,) * 2}")
            mean = np.kron(coarse, np.ones((factor, factor)))
        for i, j, v in ([] if sensors is None else sensors):
            if not (0 <= i < self.GRID and 0 <= j < self.GRID):
                raise DataError(f"sensor ({i:g}, {j:g}) is outside the {self.GRID}x{self.GRID} grid")
            mean[int(i), int(j)] = v
        samples = mean + np.random.default_rng(seed).normal(scale=noise, size=(n, self.GRID, self.GRID))
        return {"mean": mean, "std": np.full_like(mean, noise), "samples": samples}


def load_toy(stored):
    what = stored.manifest["config"]["what"]
    return {"density": lambda: ToyDensity(stored.manifest["metrics"]), "texts": ToyTexts, "nested": ToyNested,
            "conditional": ToyConditional}[what]()


@pytest.fixture(scope="module")
def toy_family():
    families.register(Family(kind=KIND, task=object, loader=load_toy, model_config=dict,
                             description="a test family with one model per capability"))
    yield KIND
    families.unregister(KIND)


def export_toy(store: str, name: str, what: str, dim: int | None = None) -> None:
    config = {"what": what, **({"dim": dim} if dim else {})}
    Store(store).export(name, kind=KIND, tensors={"w": torch.zeros(1)}, config=config, transform=None,
                        metrics={"quality": 0.5}, provenance={})


def export_copy(store: str, source: str, name: str, shift: float = 0.0) -> None:
    """Export ``source``'s weights as ``name``, with the component means moved by ``shift``."""
    stored = Store(store).read(source)
    m = stored.manifest
    tensors = {k: (v + shift if k == "loc" else v) for k, v in stored.tensors.items()}
    Store(store).export(name, kind=m["kind"], tensors=tensors, config=m["config"], transform=m["transform"],
                        metrics=m["metrics"], provenance={})


def make_store(root: Path, toys: bool = True) -> str:
    """moons (an initial DNMM: valid and cheap), a shifted copy, three broken folders, and the toys."""
    from densiray.api import RunSpec, build_task

    store = str(root / "models")
    task = build_task("dnmm", RunSpec(dataset="moons", n=400, model={"components": 4, "hidden": 16,
                                                                   "export_integration_samples": 16384}))
    task.export(task.trained_model(task.build_model().state_dict()), store=store, name="moons", provenance={})
    export_copy(store, "moons", "moons-shifted", shift=0.7)
    for name in ("tampered", "edited", "broken"):
        shutil.copytree(Path(store, "moons"), Path(store, name))
    weights = Path(store, "tampered", WEIGHTS)  # flipped bytes in the weights
    data = bytearray(weights.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    weights.write_bytes(bytes(data))
    manifest = json.loads(Path(store, "edited", MANIFEST).read_text())  # an architecture the weights do not fit
    manifest["config"]["model"]["hidden"] = 32
    Path(store, "edited", MANIFEST).write_text(json.dumps(manifest))
    Path(store, "broken", MANIFEST).write_text("{not json")  # unreadable: listed with its error
    if not toys:  # the toy family is registered in this process only, not in Serve's replicas
        return store
    export_toy(store, "dens", "density", dim=2)
    export_toy(store, "texts", "texts")
    export_toy(store, "nested", "nested", dim=2)
    export_toy(store, "field", "conditional")
    return store


@pytest.fixture(scope="module")
def api(toy_family, tmp_path_factory):
    store = make_store(tmp_path_factory.mktemp("serve-api"))
    with TestClient(plain_app(ServeSettings(store=store, **LIMITS))) as client:
        yield client, store


def refused(r, status: int, *words: str) -> str:
    """Assert a one-line JSON error with ``status`` mentioning ``words``; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert "\n" not in msg and msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def post(client, path: str, body=None, raw: bytes | None = None):
    if raw is not None:
        return client.post(path, content=raw, headers={"Content-Type": "application/json"})
    return client.post(path, json=body)


# ---------------------------------------------------------------------------------------------------
# listing and routing by capability


def test_model_list_and_detail_show_capabilities(api):
    client, _ = api
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert {"moons", "moons-shifted", "tampered", "edited", "broken", "dens", "texts", "nested", "field"} <= set(models)
    moons = models["moons"]
    assert moons["kind"] == "dnmm" and moons["dim"] == 2 and "test_log_lik" in moons["metrics"]
    assert moons["capabilities"] == ["density", "sampler"]
    assert moons["endpoints"] == ["log_prob", "score", "sample"]
    assert models["texts"]["capabilities"] == ["classifier"] and models["texts"]["endpoints"] == ["classify"]
    assert set(models["nested"]["capabilities"]) == {"classifier", "nested"}
    assert models["field"]["endpoints"] == ["sample", "condition"]
    assert "not valid JSON" in models["broken"]["error"] and models["broken"]["kind"] is None
    assert "sha256" in models["tampered"]["error"] and models["tampered"]["capabilities"] is None

    detail = client.get("/v1/models/nested").json()
    assert detail["kind"] == KIND and detail["metrics"] == {"quality": 0.5}
    assert [s["name"] for s in detail["submodels"]] == ["small", "big"] and detail["submodels"][1]["accuracy"] == 0.9
    assert client.get("/v1/models/moons").json()["submodels"] is None
    refused(client.get("/v1/models/nope"), 404, "unknown model 'nope'")
    refused(client.get("/v1/models/tampered"), 409, "sha256")


def test_density_routes_match_the_loaded_model(api):
    client, store = api
    local = densiray.load_model("moons", store=store)
    x = [[0.5, 0.25], [-1.0, 2.0], [1e300, 0.0]]
    lp = post(client, "/v1/models/moons/log_prob", {"x": x}).json()["log_prob"]
    np.testing.assert_allclose(lp[:2], local.log_prob(x[:2]), rtol=1e-6)
    assert lp[2] is None  # the density underflows to 0 there: JSON has no -inf
    s = post(client, "/v1/models/moons/sample", {"n": 5, "seed": 3}).json()["samples"]
    np.testing.assert_allclose(s, local.sample(5, seed=3), rtol=1e-6)
    assert np.array(post(client, "/v1/models/moons/sample", {}).json()["samples"]).shape == (16, 2)
    sc = post(client, "/v1/models/moons/score", {"x": x[:2], "percentile": 5}).json()
    ref = local.score(x[:2], percentile=5)
    np.testing.assert_allclose(sc["score"], ref["score"], rtol=1e-6)
    assert sc["outlier"] == ref["outlier"].tolist() and sc["threshold"] == pytest.approx(ref["threshold"])
    # more rows than max_rows_per_call (8): computed in slices, same answer
    rows = np.random.default_rng(0).normal(size=(30, 2)).tolist()
    np.testing.assert_allclose(post(client, "/v1/models/moons/log_prob", {"x": rows}).json()["log_prob"],
                               local.log_prob(rows), rtol=1e-6)
    # the toy density: a model a family outside the package defines
    assert post(client, "/v1/models/dens/log_prob", {"x": [[0, 0]]}).json()["log_prob"] == \
        [pytest.approx(-np.log(2 * np.pi))]
    refused(post(client, "/v1/models/dens/score", {"x": [ROW], "percentile": 0.5}), 422, "percentile must be one of 1, 5")


def test_classify_texts_with_extra_fields_passed_through(api):
    client, _ = api
    out = post(client, "/v1/models/texts/classify", {"texts": ["good stuff", "bad"]}).json()
    assert out["labels"] == ["pos", "neg"] and out["probs"] == [[0.0, 1.0], [1.0, 0.0]]
    assert out["length"] == [10, 3] and out.get("submodel") is None
    refused(post(client, "/v1/models/texts/classify", {"x": [ROW]}), 422, "classifies texts")
    refused(post(client, "/v1/models/texts/classify", {"texts": ["a"], "budget": {"flops": 10}}), 400,
            "not a nested model", "budget")


def test_classify_rows_with_a_budget_says_which_submodel_answered(api):
    client, _ = api
    x = {"x": [[1.0, 2.0], [-3.0, 0.0]]}
    out = post(client, "/v1/models/nested/classify", x).json()
    assert out["labels"] == ["b", "a"] and out["submodel"] == "big"
    assert post(client, "/v1/models/nested/classify", {**x, "budget": {"flops": 500}}).json()["submodel"] == "small"
    assert post(client, "/v1/models/nested/classify", {**x, "budget": {"latency_ms": 20}}).json()["submodel"] == "big"
    assert post(client, "/v1/models/nested/classify", {**x, "budget": {"submodel": "small"}}).json()["submodel"] == "small"
    refused(post(client, "/v1/models/nested/classify", {**x, "budget": {"flops": 5}}), 422, "no sub-model fits")
    refused(post(client, "/v1/models/nested/classify", {**x, "budget": {"params": 5}}), 422, "no sub-model fits")
    refused(post(client, "/v1/models/nested/classify", {**x, "budget": {}}), 422, "budget", "exactly one")
    refused(post(client, "/v1/models/nested/classify", {**x, "budget": {"flops": 5, "params": 5}}), 422, "exactly one")
    refused(post(client, "/v1/models/nested/classify", {**x, "budget": {"flops": -1}}), 422, "budget.flops")
    refused(post(client, "/v1/models/nested/classify", {"texts": ["a"]}), 422, "classifies rows")
    empty = post(client, "/v1/models/nested/classify", {"x": []})  # the example shows rows, not texts
    refused(empty, 422, "x is empty", '{"x": [[')
    assert "texts" not in empty.json()["error"]
    refused(post(client, "/v1/models/nested/classify", {"x": [[1.0, 2.0, 3.0]]}), 422, "x[0] has 3 values")
    refused(post(client, "/v1/models/nested/classify", {"x": [ROW], "texts": ["a"]}), 422, "exactly one of")
    refused(post(client, "/v1/models/nested/classify", {}), 422, "exactly one of")


def test_sample_with_steps_and_condition(api):
    client, _ = api
    s = post(client, "/v1/models/field/sample", {"n": 2, "seed": 1, "steps": 4}).json()["samples"]
    np.testing.assert_allclose(s, ToyConditional().sample(2, 1, steps=4))
    refused(post(client, "/v1/models/moons/sample", {"n": 2, "steps": 4}), 422, "takes no 'steps'")
    refused(post(client, "/v1/models/field/sample", {"n": 100, "steps": 20}), 422, "100 x 20 = 2000", "1000")

    body = {"coarse": [[1.0, 2.0], [3.0, 4.0]], "factor": 2, "sensors": [[0, 0, 9.0]], "noise": 0.5, "n": 3,
            "steps": 5, "seed": 0}
    out = post(client, "/v1/models/field/condition", body).json()
    assert set(out) == {"mean", "std"}
    assert out["mean"][0][:2] == [9.0, 1.0] and out["mean"][3][3] == 4.0 and out["std"][0][0] == 0.5
    out = post(client, "/v1/models/field/condition", {**body, "return_samples": True}).json()
    assert np.array(out["samples"]).shape == (3, 4, 4)
    for change, words in [({"factor": 3}, ["factor 3 does not divide"]), ({"coarse": [[1.0]]}, ["coarse has shape"]),
                          ({"sensors": [[7, 0, 1.0]]}, ["outside the 4x4 grid"]),
                          ({"coarse": [[1.0, 2.0], [3.0]]}, ["coarse[1] has 1 values"]),
                          ({"n": 100, "steps": 100}, ["100 x 100 = 10000", "1000 allowed"]),
                          ({"noise": 0}, ["noise must be more than 0"]), ({"n": 0}, ["n must be at least 1"]),
                          ({"sensors": [[0, 0]]}, ["sensors[0]"]), ({"sensors": [[-1, 0, 1.0]]}, ["sensors[0][0]"]),
                          ({"factor": 0}, ["factor must be at least 1"])]:
        refused(post(client, "/v1/models/field/condition", {**body, **change}), 422, *words)
    refused(post(client, "/v1/models/field/condition", raw=json.dumps(body).replace("9.0", "NaN").encode()), 422,
            "NaN")
    refused(post(client, "/v1/models/moons/condition", body), 400, "no condition", "log_prob, score, sample")


# ---------------------------------------------------------------------------------------------------
# the error matrix


@pytest.mark.parametrize("raw, words", [
    (b'{"x": [[NaN, 0.25]]}', ["x[0][0]", "NaN"]),            # Python's json accepts these literals
    (b'{"x": [[0.5, Infinity]]}', ["x[0][1]", "infinity"]),
    (b'{"x": [[-Infinity, 0.5]]}', ["x[0][0]"]),
    (b'{"x": [[1e999, 0.5]]}', ["x[0][0]", "finite"]),
    (b'{"x": [["NaN", 0.25]]}', ["string 'NaN'", "not a number"]),
    (b'{"x": [[0.5, "Infinity"]]}', ["string 'Infinity'"]),
    (b'{"x": [["0.5", 0.25]]}', ["string '0.5'"]),
    (b'{"x": [[null, 0.25]]}', ["x[0][0]", "not a number"]),
    (b'{"x": [[true, 0.25]]}', ["x[0][0]", "not a number"]),
    (b'{"x": [[0.5, 0.25], [1.0]]}', ["x[1] has 1 value", "rows of 2"]),
    (b'{"x": [[0.5, 0.25, 1.0]]}', ["x[0] has 3 values", "rows of 2"]),
    (b'{"x": []}', ["x is empty"]),
    (b'{"x": [[]]}', ["x[0] is empty"]),
    (b'{"x": [0.5, 0.25]}', ["x[0] must be a row"]),
    (b'{"x": "rows"}', ["x must be a list of rows"]),
    (b'{"rows": [[0.5, 0.25]]}', ["unknown field 'rows'"]),
    (b'{"y": 1}', ["unknown field"]),
    (b'{}', ["lacks 'x'"]),
    (b'[[0.5, 0.25]]', ["must be a JSON object"]),
    (b'{"x": [[0.5, 0.25]', ["not valid JSON"]),
    (b'', ["no JSON body"]),
])
def test_bad_log_prob_input_is_a_one_line_422(api, raw, words):
    refused(post(api[0], "/v1/models/moons/log_prob", raw=raw), 422, *words)


def test_limits_and_bad_parameters(api):
    client, _ = api
    refused(post(client, "/v1/models/moons/log_prob", {"x": [ROW] * 501}), 422, "501 rows", "500 allowed")
    refused(post(client, "/v1/models/moons/score", {"x": [ROW] * 501}), 422, "500 allowed")
    big = json.dumps({"x": [ROW] * 10_000}).encode()  # over max_body_bytes: by Content-Length, and streamed
    refused(post(client, "/v1/models/moons/log_prob", raw=big), 413, "more than the 65536")
    chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))
    refused(client.post("/v1/models/moons/log_prob", content=chunks, headers={"Content-Type": "application/json"}),
            413, "65536")
    for body, words in [({"n": 0}, ["n must be at least 1"]), ({"n": 301}, ["n must be at most 300"]),
                        ({"n": -553}, ["n must be at least 1"]), ({"n": 2.5}, ["whole"]), ({"n": "3"}, ["whole"]),
                        ({"n": True}, ["whole"]), ({"n": 2, "seed": -1}, ["seed", "at least 0"]),
                        ({"n": 2, "seed": 2**40}, ["seed", "at most"]), ({"n": 2, "seed": 1.5}, ["seed"]),
                        ({"n": 2, "seed": "a"}, ["seed"]), ({"n": 2, "steps": 0}, ["steps must be at least 1"])]:
        refused(post(client, "/v1/models/moons/sample", body), 422, *words)
    for body, words in [({"x": [ROW], "percentile": 3}, ["percentile must be one of"]),
                        ({"x": [ROW], "percentile": "1"}, ["percentile"]),
                        ({"x": [ROW], "percentile": True}, ["percentile"]),
                        ({"x": [ROW], "percentile": None}, ["percentile"])]:
        refused(post(client, "/v1/models/moons/score", body), 422, *words)
    for p in OUTLIER_PERCENTILES:  # every percentile the schema offers is answered by a calibrated density
        assert post(client, "/v1/models/moons/score", {"x": [ROW], "percentile": p}).status_code == 200
    for body, words in [({"texts": []}, ["texts is empty"]), ({"texts": ["a"] * 5}, ["5 entries", "4 allowed"]),
                        ({"texts": ["a" * 51]}, ["texts[0] has 51 characters", "50 allowed"]),
                        ({"texts": ["a", 3]}, ["texts[1] must be a string"]), ({"texts": "a"}, ["texts"])]:
        refused(post(client, "/v1/models/texts/classify", body), 422, *words)


def test_unknown_model_wrong_capability_and_wrong_route(api):
    client, _ = api
    refused(post(client, "/v1/models/nope/log_prob", {"x": [ROW]}), 404, "unknown model 'nope'", "moons")
    refused(post(client, "/v1/models/bad name!/sample", {"n": 1}), 404, "invalid model name")
    refused(post(client, "/v1/models/moons/classify", {"texts": ["great"]}), 400, "dnmm", "no classify",
            "log_prob, score, sample")
    refused(post(client, "/v1/models/texts/log_prob", {"x": [ROW]}), 400, "no log_prob", "endpoints are classify")
    refused(post(client, "/v1/models/field/score", {"x": [ROW]}), 400, "no score", "sample, condition")
    r = client.get("/v1/models/moons/log_prob")
    refused(r, 405, "POST")
    assert r.headers["Allow"] == "POST"
    r = client.delete("/v1/models")
    refused(r, 405, "GET")
    assert r.headers["Allow"] == "GET"
    refused(client.get("/v2/nothing"), 404, "no endpoint", "condition")


def test_corrupt_and_tampered_models_are_refused_while_others_serve(api):
    client, _ = api
    for _ in range(2):  # a failed load is not cached: asking again gives the same answer
        refused(post(client, "/v1/models/tampered/log_prob", {"x": [ROW]}), 409, "tampered", "sha256")
        refused(post(client, "/v1/models/edited/sample", {"n": 2}), 409, "edited", "does not match its manifest")
        refused(post(client, "/v1/models/broken/score", {"x": [ROW]}), 409, "broken", "not valid JSON")
        assert post(client, "/v1/models/moons/log_prob", {"x": [ROW]}).status_code == 200


def test_a_model_exported_again_is_served_afresh(api):
    client, store = api
    export_copy(store, "moons", "fresh")
    before = post(client, "/v1/models/fresh/log_prob", {"x": [ROW]}).json()["log_prob"]
    export_copy(store, "moons", "fresh", shift=0.5)  # the same name, new weights (model_refresh_s is 0 here)
    after = post(client, "/v1/models/fresh/log_prob", {"x": [ROW]}).json()["log_prob"]
    np.testing.assert_allclose(after, densiray.load_model("fresh", store=store).log_prob([ROW]), rtol=1e-6)
    assert after != before


def test_openapi_states_the_limits(api):
    client, _ = api
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    x = schemas["RowsRequest"]["properties"]["x"]
    assert (x["minItems"], x["maxItems"], x["items"]["minItems"]) == (1, 500, 1)
    texts = schemas["ClassifyRequest"]["properties"]["texts"]["anyOf"][0]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"]) == (1, 4, 50)
    n = schemas["SampleRequest"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 300)
    assert schemas["ScoreRequest"]["properties"]["percentile"]["enum"] == list(OUTLIER_PERCENTILES)
    assert schemas["Budget"]["maxProperties"] == 1
    assert schemas["ConditionRequest"]["properties"]["noise"]["exclusiveMinimum"] == 0
    text = json.dumps(spec)
    assert "activation_density" not in text and "deft" not in text.lower()


# ---------------------------------------------------------------------------------------------------
# schemathesis over /openapi.json, in-process


def _schemathesis_schema():
    import schemathesis

    from densiray.serve.plain import plain_app

    root = Path(tempfile.mkdtemp(prefix="densiray-schemathesis-"))
    atexit.register(shutil.rmtree, root, True)  # the schema is built at import: removed when pytest exits
    families.register(Family(kind=KIND, task=object, loader=load_toy, model_config=dict))
    store = str(root / "models")
    export_toy(store, "dens", "density", dim=2)
    export_toy(store, "texts", "texts")
    export_toy(store, "nested", "nested", dim=2)
    export_toy(store, "field", "conditional")
    # A body limit well above what maxItems allows: schemathesis counts a 413 for an over-long list as a
    # schema-violating request accepted (its list of rejections leaves 413 out); the limit has its own tests.
    app = plain_app(ServeSettings(store=store, **{**LIMITS, "max_body_bytes": 16 << 20}))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# The model each endpoint is asked of, so that generated bodies reach the model (others: any name).
MODEL_FOR = {"log_prob": "dens", "score": "dens", "sample": "field", "classify": "nested", "condition": "field",
             "{name}": "dens"}

try:
    SCHEMA = _schemathesis_schema()
except ImportError:  # schemathesis is a test extra
    SCHEMA = None


if SCHEMA is not None:
    from hypothesis import HealthCheck, settings

    @SCHEMA.parametrize()
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def test_schemathesis_finds_no_failure(case):
        """Generated requests, valid and not, over every route: no 5xx, documented statuses, JSON bodies
        matching the response schemas, 405s with ``Allow``, schema-invalid bodies refused.

        Every default check runs except ``positive_data_acceptance``: what depends on the model (the
        row width, the percentiles it is calibrated at, the grid a factor must divide, n x steps
        together) cannot be stated in one schema for every model, and is a documented 422.
        """
        from schemathesis.checks import positive_data_acceptance

        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = MODEL_FOR.get(case.path.rsplit("/", 1)[-1], "dens")
        case.call_and_validate(excluded_checks=[positive_data_acceptance])
