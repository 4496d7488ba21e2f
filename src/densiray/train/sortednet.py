"""The SortedNet Task: train the full model and sampled nested sub-models in every step.

Default recipe (``sampling: sorted``; SortedNet's sorted probabilistic training, Valipour et al. 2023):
each step runs K passes (``samples_per_step``, default 2), drawn with the step's shared generator
(``ctx.generator``: every rank draws the same ones, which ZeRO-3 needs): the full model with probability
``full_prob`` (default 1) and (width, heads) points drawn uniformly without replacement from the rest of
the grid. A pass runs its layers once and reads *every grid depth* at that point through the shared head
(the depths share their layers; an extra depth costs one pooling and one head row), so one pass trains
all depths of its point. With E the sub-model exits of the step,

    L = CE(f_full(x), y) + (1/|E|) Σ_{e∈E} [(1-α)·CE(f_e(x), y) + α·T²·KL(softmax(f_full/T) ‖ softmax(f_e/T))] + λ·Σ D_p

(``sub_loss: sum`` drops the 1/|E|), α the distillation weight (default 0; applied only in steps that
train the full model, whose detached logits are the teacher, so distillation never costs an extra
forward), T the temperature and D_p DEFT's activation-density term of each pass without the full model
(weight λ, off by default). ``samples_per_step: 1, full_prob: 0.5`` is the paper's one sub-network per
step. ``sampling: sandwich`` (slimmable networks) trains the full model and K sub-models every step, one
pass each, always including the smallest; ``random`` draws K distinct points beside the full model.
``samples_per_step: 0`` is plain fine-tuning of the full model; ``only: l3-w0.5-h6`` trains that one grid
point as a model of its own (its weights sliced from the pretrained ones): the references of the benchmark.

Text (``finefood`` or a .csv/.tsv/.jsonl file with text,label) trains a :class:`NestedEncoder` (default
the bundled MiniLM); rows (``digits``, ``iris``, ``wine``, ``breast_cancer`` from scikit-learn, or a
numeric .csv/.tsv/.parquet/.npy file with a ``label`` column) train a :class:`NestedMLP`. The
selection metric ``val_score`` is the mean validation accuracy over a few probe sub-models (the full
model, the smallest and three in between), or the full model's alone when no sub-model trains.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from densiray.errors import ConfigError, DataError
from densiray.models.sortednet import (
    NestedEncoder,
    NestedMLP,
    NestedModule,
    SortedNetConfig,
    build_encoder,
    encoder_arch,
    flops_of,
    grid_accuracy,
    latency_ms,
    make_grid,
    parse_spec,
    spec_name,
)
from densiray.store import Store, StoredModel
from densiray.train.task import StepContext, Task, rank_batches
from densiray.train.task import fmt as _fmt

EVAL_BATCH = 64
ROW_SETS = {"digits": "load_digits", "iris": "load_iris", "wine": "load_wine", "breast_cancer": "load_breast_cancer"}
LABEL_COLUMNS = ("label", "target", "class", "y")


def _is_text(dataset: str) -> bool:
    from densiray.data.text import TEXT_DATASETS, is_text_file

    return dataset in TEXT_DATASETS or (is_text_file(dataset) and not dataset.lower().endswith((".csv", ".tsv")))


def _text_file_has_text_column(path: str) -> bool:
    import pandas as pd

    try:
        cols = pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",", nrows=0).columns
    except Exception:
        return False
    return "text" in cols


def load_rows(dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Features, integer labels, class names and source of a row dataset (bundled or a file with a label column)."""
    if dataset in ROW_SETS:
        import sklearn.datasets

        x, y = getattr(sklearn.datasets, ROW_SETS[dataset])(return_X_y=True)
        return x.astype(np.float64), y, [str(c) for c in sorted(set(y.tolist()))], f"sklearn.datasets.{ROW_SETS[dataset]}"
    from densiray.data.datasets import load_dataset

    ds = load_dataset(dataset, seed=seed, label_columns=LABEL_COLUMNS)
    if ds.labels is None:
        raise DataError(f"{dataset}: a classification file needs a label column ({', '.join(LABEL_COLUMNS)}) "
                        f"beside the numeric features; columns are {ds.columns[:6]}")
    raw = ds.labels
    try:  # numeric labels (0/1, 2.0, ...) sort as numbers and are named as such
        numbers = [float(v) for v in raw]
        classes, names = sorted(set(numbers)), None
        raw = numbers
    except ValueError:
        classes = sorted(set(raw))
        names = classes
    if len(classes) < 2:
        raise DataError(f"{dataset}: the label column has a single value; a classifier needs two classes")
    names = names or [f"{c:g}" for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    return ds.x, np.array([index[v] for v in raw]), list(names), ds.source


def _split(n: int, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)

    def cut(ix):
        counts = np.bincount(y[ix])
        strat = y[ix] if counts[counts > 0].min() >= 2 else None
        return train_test_split(ix, test_size=0.2, random_state=seed, stratify=strat)

    rest, test = cut(idx)
    train, val = cut(rest)
    return np.sort(train), np.sort(val), np.sort(test)


class SortedNetTask(Task):
    """Train a nested classifier with SortedNet; selection by the mean validation accuracy of the probes."""

    kind = "sortednet"
    metric = "val_score"
    mode = "max"
    precision = "auto"

    def __init__(self, dataset: str, model: dict | None = None, *, data_seed: int = 0, n: int | None = None):
        config = SortedNetConfig(**(model or {}))
        text = _is_text(dataset) or (dataset.lower().endswith((".csv", ".tsv")) and _text_file_has_text_column(dataset))
        if config.arch == "mlp" and text:
            raise ConfigError(f"arch: mlp needs rows of numbers, but {dataset!r} is text; use arch: encoder (or auto)")
        if config.arch == "encoder" and not text:
            raise ConfigError(f"arch: encoder needs texts, but {dataset!r} is rows of numbers; use arch: mlp (or auto)")
        self.text = text
        self.data_seed = data_seed
        if text:
            self._load_text(dataset, config, data_seed, n)
        else:
            if n is not None:
                raise DataError(f"n={n} only applies to text datasets; drop n for {dataset!r}")
            self._load_rows(dataset, config, data_seed)
        self._finish(config)

    # -- data -------------------------------------------------------------------------------------

    def _load_text(self, dataset: str, config: SortedNetConfig, seed: int, n: int | None) -> None:
        from densiray.data.text import load_text_dataset
        from densiray.models.deft import load_hf_config, load_tokenizer, resolve_model, tokenize

        self.path = resolve_model(config.model)
        hf = load_hf_config(self.path)
        self.base_arch = encoder_arch(hf)
        if config.max_length > self.base_arch["max_positions"] - (2 if self.base_arch["positions"] == "roberta" else 0):
            raise ConfigError(f"max_length {config.max_length} exceeds the model's {self.base_arch['max_positions']} "
                              "positions; lower max_length")
        data = load_text_dataset(dataset, seed=seed, n=n)
        labels = config.labels or data.labels
        unknown = sorted((set(data.train_label) | set(data.val_label) | set(data.test_label)) - set(labels))
        if unknown:
            raise DataError(f"labels {unknown[:5]} of {data.name} are not in model.labels {labels}; "
                            "add them or leave model.labels unset")
        tok = load_tokenizer(self.path)
        index = {lab: i for i, lab in enumerate(labels)}

        def enc(texts, labs):
            out = tokenize(tok, texts, config.max_length)
            out["labels"] = torch.tensor([index[x] for x in labs], dtype=torch.long)
            return out

        self.labels = list(labels)
        self.train_data = enc(data.train_text, data.train_label)
        self.val_data = enc(data.val_text, data.val_label)
        self.test_data = enc(data.test_text, data.test_label)
        self.stats = None
        self.dataset = {**data.describe(), "seed": seed, "input": "text"}

    def _load_rows(self, dataset: str, config: SortedNetConfig, seed: int) -> None:
        x, y, names, source = load_rows(dataset, seed)
        if config.labels is not None:
            if len(config.labels) != len(names):
                raise ConfigError(f"model.labels has {len(config.labels)} names but {dataset!r} has {len(names)} classes")
            names = list(config.labels)
        tr, va, te = _split(len(x), y, seed)
        mean, std = x[tr].mean(0), x[tr].std(0)
        std = np.where(std > 1e-8, std, 1.0)

        def part(ix):
            return {"x": torch.as_tensor(x[ix], dtype=torch.float32), "labels": torch.as_tensor(y[ix], dtype=torch.long)}

        self.labels = names
        self.train_data, self.val_data, self.test_data = part(tr), part(va), part(te)
        self.stats = (mean.astype(np.float32), std.astype(np.float32))
        self.path = None
        self.base_arch = {"type": "mlp", "features": x.shape[1], "hidden": config.hidden, "depth": config.depth,
                          "classes": len(names)}
        self.dataset = {"name": dataset, "source": source, "labels": names, "d": int(x.shape[1]), "input": "rows",
                        "split": {"train": len(tr), "val": len(va), "test": len(te)}, "seed": seed}

    def _finish(self, config: SortedNetConfig) -> None:
        """Validate the grid (and the ``only`` point) before any worker starts."""
        self.config = config
        if config.arch == "auto":
            self.config = config = config.model_copy(update={"arch": "encoder" if self.text else "mlp"})
        n_layers = self.base_arch["layers"] if self.text else self.base_arch["depth"]
        n_heads = self.base_arch["heads"] if self.text else None
        self.full_grid = make_grid(config, n_layers, n_heads)
        self.only = None
        if config.only is not None:
            try:
                spec = parse_spec(config.only)
            except ValueError as e:
                raise ConfigError(f"only: {e}") from None
            if n_heads is not None and spec["heads"] is None:
                spec["heads"] = n_heads
            if spec_name(spec) not in {spec_name(s) for s in self.full_grid}:
                raise ConfigError(f"only: {spec_name(spec)!r} is not on the grid ({len(self.full_grid)} points, "
                                  f"{spec_name(self.full_grid[0])} .. {spec_name(self.full_grid[-1])})")
            self.only = spec
        self._final = None

    def describe(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "model": self.config.model_dump(), "labels": self.labels}

    def with_model(self, overrides: dict) -> SortedNetTask:
        """The same data with ``overrides`` merged into the model config (one Tune trial)."""
        data_keys = {"model", "max_length", "labels", "arch", "hidden", "depth"}
        changed = data_keys & set(overrides)
        if changed:
            raise ConfigError(f"a sweep cannot vary {sorted(changed)} (they change the data or the base model)")
        new = copy.copy(self)
        new._finish(self.config.model_copy(update=overrides))
        SortedNetConfig(**new.config.model_dump())  # validate
        return new

    # -- the module -------------------------------------------------------------------------------

    def _fresh(self, pretrained: bool = True) -> NestedModule:
        c, n_classes = self.config, len(self.labels)
        if self.text:
            module = build_encoder(c, self.path, n_classes, pretrained=pretrained, arch=self.base_arch, grid=self.full_grid)
        else:
            module = NestedMLP(c, self.base_arch["features"], n_classes, mean=self.stats[0], std=self.stats[1],
                               grid=self.full_grid)
        if self.only is None:
            return module
        arch, state = module.truncated_state(self.only)
        return self._from_arch(arch, state, [{"layers": arch["layers" if self.text else "depth"], "width": 1.0,
                                              "heads": arch["heads"] if self.text else None}])

    def _from_arch(self, arch: dict, state: dict | None, grid: list[dict]) -> NestedModule:
        c = self.config.model_copy(update={"grid": None, "layers": None, "widths": None, "heads": None})
        if self.text:
            module: NestedModule = NestedEncoder(c, arch, len(self.labels), grid=grid)
        else:
            module = NestedMLP(c, arch["features"], len(self.labels), arch=arch, grid=grid)
        if state is not None:
            module.load_state_dict(state)
        return module

    def _arch_and_grid(self) -> tuple[dict, list[dict]]:
        if self.only is None:
            return {**self.base_arch, "classes": len(self.labels)}, self.full_grid
        probe = self._fresh(pretrained=False)
        return probe.arch, probe.grid

    def build_model(self) -> NestedModule:
        return self._fresh(pretrained=True)  # the engine seeded torch before this (head / MLP init)

    def probes(self, module: NestedModule) -> list[dict]:
        """Full model, smallest and three grid points in between (by parameter count) - or the full model alone."""
        if self.config.samples_per_step == 0 or len(module.grid) == 1:
            return [module.full]
        by_size = sorted(module.grid, key=lambda s: module.count_params(s)["params_body"])
        n = len(by_size)
        picks = [by_size[0], by_size[n // 4], by_size[n // 2], by_size[(3 * n) // 4], module.full]
        seen, out = set(), []
        for s in picks:
            if spec_name(s) not in seen:
                seen.add(spec_name(s))
                out.append(s)
        return out

    def sample(self, module: NestedModule, generator: torch.Generator) -> list[dict]:
        """The sub-models of this step, the same on every rank for a shared generator.

        ``sorted``: K draws of a (width, heads) point of the grid, each the full width (and all heads) with
        probability ``full_prob``, else uniform over the other points; a draw is one spec at its deepest
        grid depth with ``"depths"``: every grid depth at that point, trained in one pass (duplicates
        dropped; the full model is among them when the full width is drawn). ``sandwich``/``random``:
        K grid points, never the full model (which :meth:`loss` always adds); sandwich always includes
        the smallest."""
        if self.config.sampling == "sorted":
            return self._sorted_draws(module, generator)
        full = spec_name(module.full)
        pool = [s for s in module.grid if spec_name(s) != full]
        k = min(self.config.samples_per_step, len(pool))
        if k == 0:
            return []
        picks: list[dict] = []
        if self.config.sampling == "sandwich":
            smallest = min(pool, key=lambda s: module.count_params(s)["params_body"])
            picks.append(smallest)
            pool = [s for s in pool if s is not smallest]
            k -= 1
        order = torch.randperm(len(pool), generator=generator).tolist()
        return picks + [pool[i] for i in order[:k]]

    def _sorted_draws(self, module: NestedModule, generator: torch.Generator) -> list[dict]:
        points: dict[tuple, list[int]] = {}
        for s in module.grid:
            points.setdefault((s["width"], s.get("heads")), []).append(s["layers"])
        full_key = (module.full["width"], module.full["heads"])
        if full_key not in points:  # a grid without the full width: the deepest full-width model still trains
            points[full_key] = [module.full["layers"]]
        others = [p for p in points if p != full_key]
        k = self.config.samples_per_step
        picked: list[tuple] = []
        if not others or float(torch.rand((), generator=generator)) < self.config.full_prob:
            picked.append(full_key)
            k -= 1
        order = torch.randperm(len(others), generator=generator).tolist()
        picked += [others[i] for i in order[:max(0, k)]]
        return [{"layers": max(points[key]), "width": key[0], "heads": key[1],
                 **({"depths": sorted(points[key])} if len(points[key]) > 1 else {})} for key in picked]

    def plan(self, module: NestedModule, generator: torch.Generator) -> list[dict]:
        """Every spec one step trains: the full model alone (``samples_per_step: 0``), the sorted draws, or the
        full model followed by the K sub-models (sandwich/random)."""
        if self.config.samples_per_step == 0:
            return [module.full]
        subs = self.sample(module, generator)
        return subs if self.config.sampling == "sorted" else [module.full] + subs

    # -- engine side ----------------------------------------------------------------------------------

    def batches(self, epoch: int, rank: int, world: int, batch_size: int) -> Iterator[dict]:
        for idx in rank_batches(len(self.train_data["labels"]), epoch, 17, rank, world, batch_size):
            yield self._trim({k: v[idx] for k, v in self.train_data.items()})

    def _trim(self, batch: dict) -> dict:
        if not self.text:
            return batch
        from densiray.models.deft import trim

        return trim(batch)

    def loss(self, engine, batch: dict, ctx: StepContext):
        """The full model's cross-entropy (when the step trains it) plus the mean (``sub_loss: sum``: the sum) of
        the terms of every sub-model exit of the step's passes, as in the module docstring."""
        module = engine.module
        c = self.config
        specs = self.plan(module, ctx.generator)
        y = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outs = engine(inputs, specs)
        full_name = spec_name(module.full)
        is_full, logits, dens = [], [], []  # per exit; density terms of the passes without the full model
        for spec, out in zip(specs, outs):
            per_depth = out.get("depth_logits") or {spec["layers"]: out["logits"]}
            names = [spec_name({**spec, "layers": l}) for l in sorted(per_depth)]
            is_full += [n == full_name for n in names]
            logits += [per_depth[l].float() for l in sorted(per_depth)]
            if "density_loss" in out and full_name not in names:
                dens.append(out["density_loss"])
        z = torch.stack(logits)  # (exits, B, C): every term below is one call over all exits
        e, b, n_cls = z.shape
        ce = F.cross_entropy(z.reshape(e * b, n_cls), y.repeat(e), reduction="none").view(e, b).mean(1)
        full_mask = torch.tensor(is_full, dtype=torch.bool, device=z.device)
        n_sub = e - int(full_mask.sum())
        sub_w = (1.0 / max(1, n_sub)) if c.sub_loss == "mean" else 1.0
        distill = bool(full_mask.any()) and c.distill_weight > 0 and n_sub > 0
        w_sub = sub_w * ((1 - c.distill_weight) if distill else 1.0)
        weights = torch.where(full_mask, 1.0, w_sub).to(ce.dtype)
        loss = (weights * ce).sum()
        kl_mean = 0.0
        if distill:
            teacher = F.log_softmax(z[full_mask][0].detach() / c.temperature, -1)
            student = F.log_softmax(z[~full_mask] / c.temperature, -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean(-1) * c.temperature ** 2  # (sub exits,)
            loss = loss + sub_w * c.distill_weight * kl.sum()
            kl_mean = float(kl.detach().mean())
        for d in dens:
            loss = loss + c.density_weight * d
        # the same keys in every step (the engine averages them over steps and ranks); one sync for all
        acc = (z.detach().argmax(-1) == y).float().mean(1)
        ce_l, acc_l, full_l = ce.detach().tolist(), acc.tolist(), full_mask.tolist()
        sub_ce = [x for x, f in zip(ce_l, full_l) if not f]
        sub_acc = [x for x, f in zip(acc_l, full_l) if not f]
        metrics = {"ce": float(np.mean(ce_l)), "accuracy": float(np.mean(acc_l)), "full_trained": float(any(full_l)),
                   "submodels_trained": float(n_sub)}
        if c.samples_per_step > 0:
            metrics.update({"sub_ce": float(np.mean(sub_ce)) if sub_ce else 0.0,
                            "sub_accuracy": float(np.mean(sub_acc)) if sub_acc else 0.0, "sub_kl": kl_mean})
            if c.density_weight > 0:
                metrics["sub_density_loss"] = float(torch.stack(dens).mean().detach()) if dens else 0.0
        return loss, metrics

    def evaluate(self, engine) -> dict[str, float]:
        """Validation accuracy of the probe sub-models, sharded over the ranks and summed (every rank runs
        the same specs in the same order, as ZeRO-3 needs)."""
        import torch.distributed as dist

        module = engine.module
        device = next(module.parameters()).device
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        probes = self.probes(module)
        n = len(self.val_data["labels"])
        per = math.ceil(n / world)
        idx = torch.arange(rank, per * world, world)
        valid = (idx < n).double()
        idx = idx % n
        sums = torch.zeros(len(probes) + 2, dtype=torch.float64)
        for i in range(0, per, EVAL_BATCH):
            sel, w = idx[i:i + EVAL_BATCH], valid[i:i + EVAL_BATCH]
            batch = self._trim({k: v[sel] for k, v in self.val_data.items()})
            y = batch["labels"]
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            outs = engine(inputs, probes)
            for j, out in enumerate(outs):
                logits = out["logits"].float().cpu()
                sums[j] += float((w * (logits.argmax(1) == y).double()).sum())
                if j == len(outs) - 1:  # the full model (last probe)
                    sums[-2] += float((w * F.cross_entropy(logits, y, reduction="none").double()).sum())
            sums[-1] += float(w.sum())
        if distributed and world > 1:
            t = sums.to(device)
            dist.all_reduce(t)
            sums = t.cpu()
        acc = (sums[:len(probes)] / sums[-1]).tolist()
        return {"val_score": float(np.mean(acc)), "val_accuracy": acc[-1], "val_smallest_accuracy": acc[0],
                "val_loss": float(sums[-2] / sums[-1])}

    # -- driver side ----------------------------------------------------------------------------------

    def trained_model(self, state: dict[str, torch.Tensor]) -> NestedModule:
        arch, grid = self._arch_and_grid()
        if self.text:
            module: NestedModule = NestedEncoder(self._eval_config(), arch, len(self.labels), grid=grid)
        else:
            module = NestedMLP(self._eval_config(), arch["features"], len(self.labels), arch=arch, grid=grid)
        module.load_state_dict(state)
        return module.eval()

    def _eval_config(self) -> SortedNetConfig:
        if self.only is None:
            return self.config
        return self.config.model_copy(update={"grid": None, "layers": None, "widths": None, "heads": None})

    def _rows(self, data: dict) -> list[dict]:
        n = len(data["labels"])
        cap = self.config.eval_rows
        keep = torch.arange(n) if cap is None or cap >= n else torch.from_numpy(
            np.sort(np.random.default_rng(self.data_seed).permutation(n)[:cap]))
        return [self._trim({k: v[keep[i:i + EVAL_BATCH]] for k, v in data.items()}) for i in range(0, len(keep), EVAL_BATCH)]

    def metrics(self, model: NestedModule) -> dict:
        """Every grid point: validation and test accuracy, parameters, FLOPs per example and latency per
        batch; the share at >= 96 % of the full model's test accuracy and the median relative accuracy."""
        if self._final is not None and self._final[0] == id(model):
            return self._final[1]
        from tqdm.auto import tqdm

        model.eval()
        test_b, val_b = self._rows(self.test_data), self._rows(self.val_data)
        test = grid_accuracy(model, test_b, model.grid)
        val = grid_accuracy(model, val_b, model.grid)
        lat_n = min(self.config.latency_batch, len(self.test_data["labels"]))
        lat_batch = self._trim({k: v[:lat_n] for k, v in self.test_data.items() if k != "labels"})
        rows = []
        for spec in tqdm(model.grid, desc="sub-models", unit="model", leave=False, mininterval=2,
                         disable=None):
            name = spec_name(spec)
            rows.append({"name": name, "layers": spec["layers"], "width": spec["width"], "heads": spec.get("heads"),
                         **model.count_params(spec), "flops": flops_of(model, spec),
                         "latency_ms": round(latency_ms(model, lat_batch, spec, self.config.latency_repeats), 3),
                         "val_accuracy": val[name], "test_accuracy": test[name]})
        full = rows[-1] if spec_name(model.full) == rows[-1]["name"] else next(r for r in rows if r["name"] == spec_name(model.full))
        for r in rows:
            r["relative_accuracy"] = r["test_accuracy"] / full["test_accuracy"] if full["test_accuracy"] > 0 else 0.0
        rel = [r["relative_accuracy"] for r in rows]
        counts = torch.bincount(self.test_data["labels"], minlength=len(self.labels))
        out = {"test_accuracy": full["test_accuracy"], "val_accuracy": full["val_accuracy"],
               "majority_accuracy": float(counts.max() / counts.sum()),
               "n_submodels": len(rows), "median_relative_accuracy": float(np.median(rel)),
               "share_at_96": float(np.mean([x >= 0.96 for x in rel])),
               "smallest_accuracy": min(rows, key=lambda r: r["flops"])["test_accuracy"],
               "flops_full": full["flops"], "params_full": full["params"],
               "flops_per": "one example" + (f" of {self.config.max_length} tokens" if self.text else ""),
               "latency_batch": lat_n, "eval_rows": {"val": sum(len(b["labels"]) for b in val_b),
                                                      "test": sum(len(b["labels"]) for b in test_b)},
               "samples_per_step": self.config.samples_per_step, "sampling": self.config.sampling,
               "full_prob": self.config.full_prob, "sub_loss": self.config.sub_loss,
               "distill_weight": self.config.distill_weight, "density_weight": self.config.density_weight,
               "input_kind": model.input_kind, "only": spec_name(self.only) if self.only else None,
               "submodels": rows}
        self._final = (id(model), out)
        return out

    def report_plot(self, model: NestedModule, history: list[dict], title: str) -> bytes:
        return pareto_plot(self.metrics(model), history, title)

    def export(self, model: NestedModule, *, store: str | None, name: str, provenance: dict,
               extra_files: dict[str, bytes] | None = None, train_config: dict | None = None) -> StoredModel:
        target = Store(store)
        config = {"model": self._eval_config().model_dump(), "labels": self.labels, "arch": model.arch,
                  "grid": model.grid, "input_kind": model.input_kind, "train": train_config or {}, "dataset": self.dataset}
        if model.input_kind == "rows":  # the row width, listed by `densiray models` and GET /v1/models
            config["dim"] = int(model.arch["features"])
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
        target.export(name, kind=self.kind, tensors=tensors, config=config, transform=None,
                      metrics=self.metrics(model), provenance=provenance, extra_files=extra_files)
        return target.read(name)


def pareto_front(rows: list[dict], x: str = "flops", y: str = "test_accuracy") -> list[dict]:
    """The rows no other row beats on both: fewer ``x`` and higher ``y``; sorted by ``x``."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r[x], -r[y])):
        if r[y] > best:
            front.append(r)
            best = r[y]
    return front


def pareto_plot(metrics: dict, history: list[dict], title: str, others: dict[str, list[dict]] | None = None) -> bytes:
    """A PNG: test accuracy against FLOPs of every sub-model (Pareto front drawn), and the learning curve."""
    from densiray.plots import _figure, _png

    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    rows = metrics["submodels"]
    ax.scatter([r["flops"] for r in rows], [r["test_accuracy"] for r in rows], s=12, alpha=0.5,
               c=[r["layers"] for r in rows], cmap="viridis", label="SortedNet sub-models (colour: depth)")
    front = pareto_front(rows)
    ax.plot([r["flops"] for r in front], [r["test_accuracy"] for r in front], "-", color="C3", lw=1.5, label="Pareto front")
    for i, (label, extra) in enumerate((others or {}).items()):
        fr = pareto_front(extra) if len(extra) > 4 else sorted(extra, key=lambda r: r["flops"])
        ax.plot([r["flops"] for r in fr], [r["test_accuracy"] for r in fr], "s--" if len(extra) <= 4 else "--",
                color=f"C{i + 4}", alpha=0.8, label=label)
    full = metrics["test_accuracy"]
    ax.axhline(0.96 * full, color="gray", ls=":", lw=1, label="96 % of the full model")
    ax.set_xscale("log")
    ax.set_xlabel(f"FLOPs per {metrics.get('flops_per', 'example')}")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{metrics['n_submodels']} sub-models: median {metrics['median_relative_accuracy']:.3f} of the full "
                 f"model, {100 * metrics['share_at_96']:.0f} % at >= 96 %")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    hist = [h for h in history if "val_score" in h]
    if hist:
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["val_accuracy"] for h in hist], "o-", label="val accuracy (full)")
        ax.plot(ep, [h.get("val_smallest_accuracy", np.nan) for h in hist], "s-", label="val accuracy (smallest)")
        ax.plot(ep, [h["val_score"] for h in hist], "^--", label="val score (probe mean)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    ax.set_title(f"learning curve (test accuracy {full:.3f}, majority {metrics.get('majority_accuracy', 0):.3f})")
    fig.suptitle(title)
    return _png(plt, fig)


def default_space(task: SortedNetTask) -> dict:
    """What ``densiray tune sortednet`` searches: K, how often the full model trains, the distillation weight
    and the learning rate."""
    return {
        "model.samples_per_step": {"choice": [1, 2, 3, 4]},
        "model.full_prob": {"uniform": [0.5, 1.0]},
        "model.distill_weight": {"uniform": [0.0, 1.0]},
        "train.lr": {"loguniform": [1e-5, 1e-4] if task.text else [3e-4, 1e-2]},
    }


def summary_lines(m: dict) -> list[tuple[str, str]]:
    """What ``densiray train/tune sortednet`` prints."""
    return [
        ("held-out", f"full model test accuracy {_fmt(m.get('test_accuracy'))} (validation {_fmt(m.get('val_accuracy'))}; "
                     f"majority class {_fmt(m.get('majority_accuracy'))})"),
        ("sub-models", f"{m.get('n_submodels')} nested: median {_fmt(m.get('median_relative_accuracy'), 3)} of the full "
                       f"model's accuracy, {_fmt(100 * m.get('share_at_96', 0), 1)} % at >= 96 %, smallest "
                       f"{_fmt(m.get('smallest_accuracy'))}"),
        ("cost", f"full model {m.get('flops_full', 0) / 1e6:.2f} MFLOPs per {m.get('flops_per')}, "
                 f"{m.get('params_full')} parameters; K={m.get('samples_per_step')} ({m.get('sampling')}), "
                 f"distillation weight {m.get('distill_weight') or 0:.3g}"),
    ]


def list_columns(m: dict) -> tuple[str, str]:
    """The two cells of ``densiray models``: full accuracy and the number of sub-models."""
    return "acc " + _fmt(m.get("test_accuracy"), 3), f"{m.get('n_submodels', '-')} subs"
