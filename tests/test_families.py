"""A family defined in this file alone plugs into the whole pipeline: train, tune, export, load, serve.

Nothing outside this test names it: the CLI, the engine, Tune, the store and the Serve app find it
through ``densiray.families``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import densiray
from densiray import capabilities, families
from densiray.store import Store
from densiray.train import StepContext, Task

KIND = "toygauss"


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_scale: float = Field(1.0, gt=0)


class ToyGaussian(nn.Module):
    """A diagonal Gaussian with learnable mean and log-scale."""

    def __init__(self, dim: int, cfg: ToyConfig):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.full((dim,), math.log(cfg.init_scale)))

    def forward(self, x):
        z = (x - self.mean) / self.log_scale.exp()
        return (-0.5 * z**2 - self.log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)


class LoadedToy:
    """What the family's loader returns: it satisfies capabilities.Density."""

    def __init__(self, module: ToyGaussian, metrics: dict):
        self.module, self.metrics, self.dim = module.eval(), metrics, module.mean.numel()

    def log_prob(self, x):
        with torch.no_grad():
            return self.module(torch.as_tensor(np.asarray(x, dtype=np.float32))).double().numpy()

    def sample(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return (self.module.mean + self.module.log_scale.exp() * torch.randn(n, self.dim, generator=g)).numpy()

    def threshold(self, percentile: float = 1.0) -> float:
        return 10.0

    def score(self, x, percentile: float = 1.0) -> dict:
        s = -self.log_prob(x)
        return {"score": s, "outlier": s > 10.0, "threshold": 10.0}


def load_toy(stored) -> LoadedToy:
    module = ToyGaussian(stored.manifest["config"]["dim"], ToyConfig(**stored.manifest["config"]["model"]))
    module.load_state_dict(stored.tensors)
    return LoadedToy(module, stored.manifest["metrics"])


class ToyTask(Task):
    kind = KIND
    metric = "val_log_lik"
    mode = "max"
    precision = "fp32"

    def __init__(self, dataset: str, model: dict | None = None, *, data_seed: int = 0, n: int | None = None):
        rng = np.random.default_rng(data_seed)
        x = (rng.normal(size=(n or 400, 2)) * [0.5, 2.0] + [3.0, -1.0]).astype(np.float32)
        self.train_x, self.val_x = x[: len(x) * 3 // 4], x[len(x) * 3 // 4:]
        self.config = ToyConfig(**(model or {}))
        self.dataset = {"name": dataset, "d": 2, "n": len(x)}
        self.seen_steps: list[int] = []

    def with_model(self, overrides: dict) -> ToyTask:
        new = ToyTask.__new__(ToyTask)
        new.__dict__.update(self.__dict__)
        new.config = ToyConfig(**{**self.config.model_dump(), **overrides})
        return new

    def build_model(self):
        return ToyGaussian(2, self.config)

    def batches(self, epoch, rank, world, batch_size):
        x = torch.from_numpy(self.train_x[rank::world])
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[i:i + batch_size]

    def loss(self, engine, batch, ctx: StepContext):
        assert isinstance(ctx.generator, torch.Generator) and ctx.world >= 1
        return -engine(batch).mean(), {"step": float(ctx.step)}

    def evaluate(self, engine):
        return {"val_log_lik": float(engine(torch.from_numpy(self.val_x)).mean())}

    def trained_model(self, state):
        model = self.build_model()
        model.load_state_dict(state)
        return model

    def metrics(self, model):
        with torch.no_grad():
            return {"val_log_lik": float(model(torch.from_numpy(self.val_x)).mean())}

    def export(self, model, *, store, name, provenance, extra_files=None, train_config=None):
        target = Store(store)
        target.export(name, kind=KIND, tensors=model.state_dict(),
                      config={"model": self.config.model_dump(), "dim": 2, "train": train_config or {}},
                      transform=None, metrics=self.metrics(model), provenance=provenance, extra_files=extra_files)
        return target.read(name)


@pytest.fixture
def toy_family():
    import sys

    from ray import cloudpickle

    # Ray workers cannot import this test module: ship its classes by value (a user's family module
    # would instead be importable on the cluster, e.g. through runtime_env py_modules or working_dir).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    families.register(families.Family(
        kind=KIND, task=ToyTask, loader=load_toy, model_config=ToyConfig, description="a test family",
        default_space=lambda task: {"model.init_scale": {"choice": [0.5, 2.0]}, "train.lr": {"loguniform": [0.01, 0.1]}},
        summary=lambda m: [("held-out", f"val log-lik {m['val_log_lik']:.3f}")],
        train_defaults={"lr": 0.05, "batch_size": 50, "zero_stage": 0},
        flags={"init_scale": {"type": float, "help": "initial scale"}},
    ))
    yield KIND
    families.unregister(KIND)


def test_a_family_defined_in_a_test_trains_tunes_exports_loads_and_serves(ray_cluster, store, toy_family, capsys):
    from fastapi.testclient import TestClient

    from densiray.cli import main
    from densiray.serve.backends import LocalBackend
    from densiray.serve.endpoints import make_api
    from densiray.serve.settings import ServeSettings
    from densiray.tune.sweep import tune

    # the command line knows it (its own flag included), and the engine trains it
    assert main(["train", KIND, "--dataset", "toy", "--init-scale", "3", "--epochs", "8", "--workers", "1",
                 "--name", "toy", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "held-out   val log-lik" in out
    model = densiray.load_model("toy", store=store)
    assert capabilities.capabilities(model) == ["density", "sampler"]
    stored = Store(store).read("toy")
    assert stored.manifest["kind"] == KIND and stored.manifest["config"]["model"]["init_scale"] == 3.0
    assert stored.manifest["config"]["train"]["lr"] == 0.05  # the family's train defaults
    history = stored.manifest["provenance"]["history"]
    assert history[-1]["val_log_lik"] > stored.manifest["provenance"]["initial_val_log_lik"]
    assert model.sample(500, seed=0).mean(0) == pytest.approx([3.0, -1.0], abs=0.6)

    # Tune sweeps it with the family's default space
    s = tune(KIND, "toy", settings={"trials": 2, "epochs": 3, "grace_period": 1}, name="toy-tuned", store=store)
    assert s["trials"] == 2 and s["errored"] == 0 and s["pareto"] == []  # one objective: no front
    trials = Store(store).read("toy-tuned").manifest["provenance"]["trials"]
    assert densiray.load_model("toy-tuned", store=store).metrics["val_log_lik"] == pytest.approx(
        max(r["best_val_log_lik"] for r in trials), abs=1e-4)

    # and the Serve app routes it by its capabilities
    client = TestClient(make_api(LocalBackend(ServeSettings(store=store))))
    r = client.post("/v1/models/toy/log_prob", json={"x": [[3.0, -1.0], [30.0, 0.0]]})
    assert r.status_code == 200 and r.json()["log_prob"][0] > r.json()["log_prob"][1]
    assert client.post("/v1/models/toy/sample", json={"n": 3, "seed": 1}).json()["samples"].__len__() == 3
    r = client.post("/v1/models/toy/classify", json={"texts": ["a"]})
    assert r.status_code == 400 and "log_prob" in r.json()["error"]


def test_an_unknown_family_is_one_line(capsys):
    from densiray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "nosuchfamily", "--dataset", "moons"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'nosuchfamily'" in err[0]
    with pytest.raises(densiray.errors.ConfigError, match="unknown model family 'nosuchfamily'; available: .*dnmm"):
        families.get("nosuchfamily")
