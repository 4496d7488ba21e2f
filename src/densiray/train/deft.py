"""The DEFT Task: PEFT fine-tuning of a transformer text classifier with the activation-density loss.

The texts are tokenized on the driver (the Task holds int64 tensors, not a tokenizer); each worker
builds the same PEFT-wrapped model from the base model's name or path. Validation accuracy selects
the best epoch; the store keeps only the trainable weights (PEFT, adapters, head) with the base
model's identity, and ``densiray.load_model`` rebuilds the classifier from them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from densiray.data.text import load_text_dataset
from densiray.errors import ConfigError, DataError
from densiray.models.deft import (
    DEFTClassifier,
    DEFTConfig,
    batches_of,
    density_summary,
    detect_arch,
    evaluate_texts,
    load_hf_config,
    load_tokenizer,
    resolve_model,
    tokenize,
    trim,
)
from densiray.store import Store, StoredModel
from densiray.train.task import StepContext, Task, rank_batches
from densiray.train.task import fmt as _fmt

EVAL_BATCH = 64
DENSITY_TAUS = (0.0, 1e-3, 1e-2)  # also reported at these thresholds, for comparisons across models


class DEFTTask(Task):
    """Fine-tune ``model`` with a PEFT method on a text dataset; the selection metric is validation accuracy."""

    kind = "deft"
    metric = "val_accuracy"
    mode = "max"
    precision = "auto"
    trainable_only = True  # checkpoints and best weights hold the trainable tensors only

    def __init__(self, dataset: str, model: dict | None = None, *, data_seed: int = 0, n: int | None = None):
        config = DEFTConfig(**(model or {}))
        path = resolve_model(config.model)
        hf_config = load_hf_config(path)
        arch = detect_arch(hf_config, config.arch)
        limit = getattr(hf_config, "max_position_embeddings", None)
        extra = config.num_virtual_tokens if config.peft in ("prefix", "prompt") else 0
        if arch == "encoder" and limit and config.max_length + extra > limit:
            if "max_length" in config.model_fields_set or limit - extra < 8:
                raise ConfigError(f"max_length {config.max_length} + {extra} virtual tokens exceeds the model's "
                                  f"{limit} positions; lower max_length or num_virtual_tokens")
            config = config.model_copy(update={"max_length": limit - extra})  # the default, capped to the model
        data = load_text_dataset(dataset, seed=data_seed, n=n)
        labels = config.labels or data.labels
        seen = set(data.train_label) | set(data.val_label) | set(data.test_label)
        unknown = sorted(seen - set(labels))
        if unknown:
            raise DataError(f"labels {unknown[:5]} of {data.name} are not in model.labels {labels}; "
                            "add them or leave model.labels unset")
        self.config, self.labels, self.arch, self.position_limit = config, list(labels), arch, limit
        # Build the model once here so that a bad option fails before any worker starts.
        probe = DEFTClassifier(config, self.labels, init_seed=0)
        self.base = probe.describe_base()
        del probe
        tokenizer = load_tokenizer(path)
        index = {lab: i for i, lab in enumerate(self.labels)}

        def encode(texts, labs):
            enc = tokenize(tokenizer, texts, config.max_length)
            enc["labels"] = torch.tensor([index[x] for x in labs], dtype=torch.long)
            return enc

        self.train_data = encode(data.train_text, data.train_label)
        self.val_data = encode(data.val_text, data.val_label)
        self.test_data = encode(data.test_text, data.test_label)
        self.dataset = {**data.describe(), "seed": data_seed,
                        "truncated": {k: float((d["attention_mask"].sum(1) >= config.max_length).float().mean())
                                      for k, d in (("train", self.train_data), ("test", self.test_data))}}
        self._final: tuple[int, dict] | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "model": self.config.model_dump(), "labels": self.labels,
                "base": {k: self.base[k] for k in ("model", "model_type", "arch", "fingerprint")}}

    def with_model(self, overrides: dict) -> DEFTTask:
        """The same tokenized data with ``overrides`` merged into the model config (one Tune trial)."""
        changed = {"model", "arch", "max_length", "labels", "label_words"} & set(overrides)
        if changed:
            raise ConfigError(f"a sweep cannot vary {sorted(changed)} (they change the data or the base model)")
        config = DEFTConfig(**{**self.config.model_dump(), **overrides})
        extra = config.num_virtual_tokens if config.peft in ("prefix", "prompt") else 0
        if self.arch == "encoder" and self.position_limit and config.max_length + extra > self.position_limit:
            raise ConfigError(f"max_length {config.max_length} + {extra} virtual tokens exceeds the model's "
                              f"{self.position_limit} positions; lower max_length or num_virtual_tokens")
        new = copy.copy(self)
        new.config, new._final = config, None
        return new

    # -- engine side ----------------------------------------------------------------------------------

    def build_model(self) -> DEFTClassifier:
        model = DEFTClassifier(self.config, self.labels)  # the engine seeded torch before this
        model.track_loss = self.config.density_weight > 0
        return model

    def batches(self, epoch: int, rank: int, world: int, batch_size: int) -> Iterator[dict]:
        for idx in rank_batches(len(self.train_data["labels"]), epoch, 11, rank, world, batch_size):
            yield trim({k: v[idx] for k, v in self.train_data.items()})

    def loss(self, engine, batch: dict, ctx: StepContext):
        w = self.config.density_weight
        out = engine(batch["input_ids"], batch["attention_mask"])
        ce = F.cross_entropy(out["logits"].float(), batch["labels"])
        metrics = {"ce": ce.detach().item(),
                   "accuracy": (out["logits"].argmax(1) == batch["labels"]).float().mean().item(),
                   "density": float((out["active"].sum(0) / out["size"].sum(0).clamp_min(1)).mean())}
        if "density_loss" in out:
            metrics["density_loss"] = out["density_loss"].detach().item()
        loss = ce + w * out["density_loss"] if w > 0 else ce
        return loss, metrics

    def evaluate(self, engine) -> dict[str, float]:
        """Validation accuracy, cross-entropy and density, sharded over the ranks and summed."""
        import torch.distributed as dist

        module = engine.module
        device = next(module.parameters()).device
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        n = len(self.val_data["labels"])
        per = math.ceil(n / world)
        idx = torch.arange(rank, per * world, world)
        valid = (idx < n).float()
        idx = idx % n
        layers = len(module.layer_names)
        sums = torch.zeros(3 + 3 * layers, dtype=torch.float64)
        saved = module.track_loss
        module.track_loss = False
        try:
            for i in range(0, per, EVAL_BATCH):
                sel, w = idx[i:i + EVAL_BATCH], valid[i:i + EVAL_BATCH]
                batch = trim({k: v[sel] for k, v in self.val_data.items()})
                out = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                logits, y, w = out["logits"].float().cpu(), batch["labels"], w.double()
                sums[0] += float((w * (logits.argmax(1) == y).double()).sum())
                sums[1] += float((w * F.cross_entropy(logits, y, reduction="none").double()).sum())
                sums[2] += float(w.sum())
                for j, key in enumerate(("active", "nonzero", "size")):
                    sums[3 + j * layers:3 + (j + 1) * layers] += (w[:, None] * out[key].double().cpu()).sum(0)
        finally:
            module.track_loss = saved
        if distributed and world > 1:
            t = sums.to(device)
            dist.all_reduce(t)
            sums = t.cpu()
        d = density_summary(sums[3:3 + layers], sums[3 + layers:3 + 2 * layers], sums[3 + 2 * layers:])
        return {"val_accuracy": float(sums[0] / sums[2]), "val_loss": float(sums[1] / sums[2]),
                "val_density": d["density"], "val_nonzero": d["nonzero"]}

    # -- driver side ----------------------------------------------------------------------------------

    def trained_model(self, state: dict[str, torch.Tensor]) -> DEFTClassifier:
        model = DEFTClassifier(self.config, self.labels, init_seed=0)
        model.load_trainable(state)
        return model.eval()

    def metrics(self, model: DEFTClassifier) -> dict:
        """Held-out accuracy and per-layer activation density (test set), computed once per model."""
        if self._final is not None and self._final[0] == id(model):
            return self._final[1]
        model.extra_taus = DENSITY_TAUS
        try:
            test = evaluate_texts(model, batches_of(self.test_data, EVAL_BATCH))
            val = evaluate_texts(model, batches_of(self.val_data, EVAL_BATCH))
        finally:
            model.extra_taus = ()
        counts = torch.bincount(self.test_data["labels"], minlength=len(self.labels))
        out = {"test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"], "test_loss": test["loss"],
               "majority_accuracy": float(counts.max() / counts.sum()),
               "density": test["density"], "density_per_layer": test["density_per_layer"],
               "nonzero": test["nonzero"], "nonzero_per_layer": test["nonzero_per_layer"],
               "density_at": {t: v["mean"] for t, v in test["density_at"].items()},
               "val_density": val["density"], "tau": self.config.tau, "eps": self.config.eps,
               "density_weight": self.config.density_weight, "peft": self.config.peft, "relu": self.config.relu,
               "density_rows": "test set, non-padding tokens (prompt-tuning virtual tokens included)",
               "hooked_layers": model.layer_names, "trainable_params": self.base["trainable_params"],
               "total_params": self.base["total_params"]}
        self._final = (id(model), out)
        return out

    def report_plot(self, model: DEFTClassifier, history: list[dict], title: str) -> bytes:
        from densiray.plots import classifier_report

        return classifier_report(self.metrics(model), history, title=title)

    def export(self, model: DEFTClassifier, *, store: str | None, name: str, provenance: dict,
               extra_files: dict[str, bytes] | None = None, train_config: dict | None = None) -> StoredModel:
        target = Store(store)
        target.export(
            name, kind=self.kind, tensors=model.trainable_state_dict(),
            config={"model": self.config.model_dump(), "labels": self.labels, "base": self.base,
                    "train": train_config or {}, "dataset": self.dataset},
            transform=None, metrics=self.metrics(model), provenance=provenance, extra_files=extra_files,
        )
        return target.read(name)


def default_space(task: DEFTTask) -> dict:
    """The space ``densiray tune deft`` searches: the density loss, the learning rate, the PEFT method and
    its size; the objectives are validation accuracy (up) and validation activation density (down)."""
    return {
        "model.density_weight": {"loguniform": [0.01, 1.0]},
        "model.eps": {"loguniform": [1e-4, 1e-1]},
        "model.peft": {"choice": ["lora", "adapter"]},
        "model.lora_r": {"choice": [4, 8, 16]},
        "train.lr": {"loguniform": [3e-4, 3e-3]},
    }


def summary_lines(m: dict) -> list[tuple[str, str]]:
    """What ``densiray train/tune deft`` prints about a trained classifier."""
    return [
        ("held-out", f"test accuracy {_fmt(m.get('test_accuracy'))} (validation {_fmt(m.get('val_accuracy'))}; "
                     f"majority class {_fmt(m.get('majority_accuracy'))})"),
        ("density", f"{_fmt(m.get('density'))} of MLP activations with |a| > {m.get('tau')} "
                    f"({_fmt(m.get('nonzero'))} non-zero), per layer "
                    + " ".join(f"{v:.2f}" for v in m.get("density_per_layer", []))),
        ("peft", f"{m.get('peft')}, density weight {m.get('density_weight') or 0:.3g}, "
                 f"{m.get('trainable_params')} trainable of {m.get('total_params')} parameters"),
    ]


def list_columns(m: dict) -> tuple[str, str]:
    """The two cells of ``densiray models``: test accuracy and activation density."""
    return "acc " + _fmt(m.get("test_accuracy"), 3), "dens " + _fmt(m.get("density"), 2)
