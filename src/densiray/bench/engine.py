"""The engine benchmark: densiray's engine against a plain PyTorch loop on the same Task, data and steps.

Each case trains one Task for the same number of optimizer steps twice:

* **plain** -- THE BASELINE, not the product: :func:`plain_pytorch_baseline`, the loop a user writes by
  hand (the Task's model and loss, torch AdamW -- fused where the device has it --, bf16 autocast on a
  GPU unless the Task needs fp32, gradient clipping, ``loss.item()`` each step for the log), run in a
  fresh Ray worker process with the same CPUs/GPU as one engine worker;
* **engine** -- :func:`densiray.train.engine.fit` with one Ray Train worker and the strategy the engine
  chooses (or the one the case names), validation, checkpoints and all.

Repeats are interleaved (plain, engine, plain, engine, ...) so that a change in the machine's load hits
both; the table reports medians. Measures, per run:

* ``samples_per_s``: rows trained / seconds spent in training steps (validation, checkpoints and start-up
  excluded for both);
* ``first_step_s``: from the driver's call (Ray task or ``fit``) to the end of the first optimizer step
  (process start, imports, model build, process group, strategy set-up);
* ``peak_memory_mb``: the training process's peak (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS,
  which includes Ray's own worker footprint in both);
* ``wall_s``: the whole call, for the engine including its per-epoch validation and checkpoints.

``ratio`` = engine samples/s over plain samples/s (medians). Driver: ``jobs/bench_engine.py``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from densiray.bench import scratch_dir
from densiray.train.task import StepContext, Task

# ---------------------------------------------------------------------------------------------------
# the baseline (plain PyTorch; measured against, never used by the product)


class _Direct:
    """The engine face (``call``, ``.module``) of a bare module, so the baseline uses the Task's own loss."""

    def __init__(self, module: torch.nn.Module, autocast) -> None:
        self.module, self.autocast = module, autocast

    def __call__(self, *args, **kwargs):
        with self.autocast:
            return self.module(*args, **kwargs)


def plain_pytorch_baseline(task: Task, train: dict, *, use_gpu: bool) -> dict:
    """BASELINE: a hand-written PyTorch training loop over ``task`` (see the module docstring)."""
    from densiray.train.engine import TrainConfig, _rows, _to, peak_memory_mb

    tc = TrainConfig(**train)
    device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    t_start = time.perf_counter()
    torch.manual_seed(tc.seed)
    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    bf16 = device.type == "cuda" and task.precision != "fp32" and tc.precision != "fp32"
    call = _Direct(model, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    model.train()
    steps = rows = 0
    train_s, first_step_time, loss_sum = 0.0, None, 0.0
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        for batch in task.batches(epoch, 0, 1, tc.batch_size):
            batch = _to(batch, device)
            ctx = StepContext(epoch=epoch, step=steps, micro_step=0, rank=0, world=1,
                              generator=torch.Generator().manual_seed(steps))
            loss, _ = task.loss(call, batch, ctx)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.item()
            steps += 1
            rows += _rows(batch)
            if first_step_time is None:
                first_step_time = time.time()
        train_s += time.perf_counter() - t0
    return {"samples_per_s": rows / train_s, "first_step_time": first_step_time, "steps": steps, "rows": rows,
            "train_s": train_s, "setup_s": None, "peak_memory_mb": peak_memory_mb(device),
            "mean_loss": loss_sum / max(steps, 1), "process_s": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------------
# a family-agnostic synthetic Task for the GPU cases (full fine-tuning of a BERT-shaped model)


class SyntheticBertTask(Task):
    """Sequence classification on random tokens with a randomly initialised BERT of a given size:
    measures training speed, not learning (every parameter trains)."""

    kind = "bench-bert"
    metric = "val_loss"
    mode = "min"
    precision = "auto"

    SIZES: ClassVar[dict] = {"minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                                        "intermediate_size": 1536},  # ~22 M parameters (MiniLM-L6's shape)
                             "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                            "intermediate_size": 4096}}  # ~335 M parameters

    def __init__(self, size: str = "minilm", rows: int = 4096, seq: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.size, self.seq = size, seq
        self.ids = torch.randint(1000, 30000, (rows, seq), generator=g)
        self.labels = torch.randint(0, 2, (rows,), generator=g)
        self.dataset = {"name": f"random-tokens-{rows}x{seq}"}

    def build_model(self):
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**self.SIZES[self.size], num_labels=2))

    def batches(self, epoch, rank, world, batch_size):
        per = len(self.ids) // world
        for i in range(per // batch_size):
            sl = slice(rank * per + i * batch_size, rank * per + (i + 1) * batch_size)
            yield {"input_ids": self.ids[sl], "labels": self.labels[sl]}

    def loss(self, engine, batch, ctx):
        out = engine(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss, {}

    def evaluate(self, engine):
        device = next(engine.module.parameters()).device
        out = engine(input_ids=self.ids[:64].to(device), labels=self.labels[:64].to(device))
        return {"val_loss": float(out.loss)}

    def trained_model(self, state):
        model = self.build_model()
        model.load_state_dict(state)
        return model

    def export(self, model, **kwargs):
        raise NotImplementedError("a benchmark Task exports nothing")

    def metrics(self, model):
        return {}


# ---------------------------------------------------------------------------------------------------
# cases and the interleaved runner


@dataclass
class Case:
    name: str
    device: str  # "cpu" or "gpu"
    kind: str  # a family kind, or "bench-bert"
    dataset: str
    model: dict
    train: dict
    n: int | None = None
    note: str = ""
    engine_train: dict = field(default_factory=dict)  # settings only the engine run gets (strategy)

    def build(self) -> Task:
        if self.kind == "bench-bert":
            return SyntheticBertTask(**self.model)
        from densiray.api import RunSpec, build_task

        return build_task(self.kind, RunSpec(dataset=self.dataset, n=self.n, model=self.model))


def cases(scale: float = 1.0) -> list[Case]:
    """The benchmark's cases; ``scale`` multiplies the CPU cases' epochs (a smoke test uses < 1)."""
    cpu = {"workers": 1, "cpus_per_worker": 1, "patience": 0, "use_gpu": False}
    gpu = {"workers": 1, "cpus_per_worker": 4, "patience": 0, "use_gpu": True}
    epochs = max(1, round(6 * scale))
    return [
        Case("dnmm-moons", "cpu", "dnmm", "moons", {}, {**cpu, "epochs": epochs, "batch_size": 256, "lr": 3e-3},
             note=f"DNMM defaults, 2,560 training rows, batch 256: {10 * epochs} steps"),
        Case("dnmm-moons-deepspeed", "cpu", "dnmm", "moons", {},
             {**cpu, "epochs": epochs, "batch_size": 256, "lr": 3e-3},
             engine_train={"strategy": "deepspeed", "zero_stage": 0},
             note="the same, engine forced to DeepSpeed ZeRO-0 (the pre-issue-13 path)"),
        Case("minilm-lora-deft", "cpu", "deft", "finefood", {"peft": "lora", "max_length": 32, "density_weight": 0.1},
             {**cpu, "epochs": 1, "batch_size": 16, "lr": 2e-3}, n=500,
             note="MiniLM (bundled) + LoRA, DEFT loss, 320 training texts x 32 tokens, batch 16: 20 steps"),
        Case("minilm-size-full-ft", "gpu", "bench-bert", "", {"size": "minilm", "rows": 256 * 40, "seq": 128},
             {**gpu, "epochs": 1, "batch_size": 256, "lr": 1e-4}, note="MiniLM-shaped BERT, batch 256 x 128, 40 steps"),
        Case("minilm-lora-deft-gpu", "gpu", "deft", "finefood", {"peft": "lora", "max_length": 128},
             {**gpu, "epochs": 2, "batch_size": 256, "lr": 2e-3},
             note="MiniLM + LoRA on fine-food, batch 256 x 128 tokens"),
        Case("bert-large-335m-full-ft", "gpu", "bench-bert", "", {"size": "bert-large", "rows": 32 * 40, "seq": 128},
             {**gpu, "epochs": 1, "batch_size": 32, "lr": 1e-5}, note="BERT-large shape (~335 M), batch 32 x 128"),
    ]


def _run_plain(case: Case, task: Task) -> dict:
    import ray

    use_gpu = case.device == "gpu"
    remote = ray.remote(num_cpus=case.train["cpus_per_worker"], num_gpus=1 if use_gpu else 0,
                        max_calls=1)(plain_pytorch_baseline)  # max_calls=1: a fresh process per run
    t_call = time.time()
    out = ray.get(remote.remote(task, case.train, use_gpu=use_gpu))
    out["wall_s"] = time.time() - t_call
    out["first_step_s"] = out.pop("first_step_time") - t_call
    return out


def _run_engine(case: Case, task: Task, storage: str) -> dict:
    from densiray.train.engine import TrainConfig, fit

    tc = TrainConfig(**{**case.train, **case.engine_train})
    t_call = time.time()
    result = fit(task, tc, name=f"{case.name}-{uuid.uuid4().hex[:8]}", storage=storage, progress=False)
    wall = time.time() - t_call
    history = result.state["history"]
    rows = sum(h["train_samples"] for h in history)
    seconds = sum(h["train_time_s"] for h in history)
    return {"samples_per_s": rows / seconds, "first_step_s": result.state["first_step_time"] - t_call,
            "steps": result.state["step"], "rows": rows, "train_s": seconds, "wall_s": wall,
            "peak_memory_mb": max(h["peak_memory_mb"] for h in history), "strategy": result.strategy,
            "zero_stage": result.zero_stage}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_benchmark(*, repeats: int = 3, only: list[str] | None = None, scale: float = 1.0,
                  out: str | None = None, command: str | None = None, log=print) -> dict:
    """Run every case that this machine can (GPU cases need a GPU); returns the results document."""
    import ray

    from densiray.api import ensure_ray

    ensure_ray(log_to_driver=False)
    have_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    storage = scratch_dir("densiray-bench-engine-")
    doc = {"machine": machine(), "repeats": repeats, "interleaved": True, "command": command, "cases": []}
    for case in cases(scale):
        if only and case.name not in only and (have_gpu or case.device != "gpu"):
            continue  # (GPU cases are still listed as skipped where there is no GPU)
        entry = {"name": case.name, "device": case.device, "note": case.note, "train": case.train,
                 "engine_train": case.engine_train}
        if case.device == "gpu" and not have_gpu:
            entry.update(skipped="no GPU on this machine: run jobs/bench_engine.py on a GPU machine",
                         plain_samples_per_s=None, engine_samples_per_s=None, ratio=None)
            doc["cases"].append(entry)
            log(f"{case.name}: skipped (no GPU)")
            continue
        task = case.build()
        plain, engine = [], []
        for r in range(repeats):
            plain.append(_run_plain(case, task))
            engine.append(_run_engine(case, task, storage))
            log(f"{case.name} repeat {r + 1}/{repeats}: plain {plain[-1]['samples_per_s']:.1f} samples/s, "
                f"engine {engine[-1]['samples_per_s']:.1f} samples/s ({engine[-1]['strategy']})")
            _summarise(entry, plain, engine)
            if out:  # a run cut short keeps the repeats that finished
                write_results({**doc, "cases": doc["cases"] + [entry]}, out)
        doc["cases"].append(entry)
        if out:
            write_results(doc, out)
    import os

    doc["machine"]["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    if out:
        write_results(doc, out)
    return doc


def _summarise(entry: dict, plain: list[dict], engine: list[dict]) -> None:
    """Medians over the repeats so far into ``entry``."""
    p, e = _median(plain, "samples_per_s"), _median(engine, "samples_per_s")
    entry.update(repeats_done=len(engine), plain_samples_per_s=p, engine_samples_per_s=e, ratio=e / p,
                 strategy=engine[-1]["strategy"], zero_stage=engine[-1]["zero_stage"], steps=engine[-1]["steps"],
                 plain_first_step_s=_median(plain, "first_step_s"), engine_first_step_s=_median(engine, "first_step_s"),
                 plain_peak_memory_mb=_median(plain, "peak_memory_mb"),
                 engine_peak_memory_mb=_median(engine, "peak_memory_mb"),
                 plain_wall_s=_median(plain, "wall_s"), engine_wall_s=_median(engine, "wall_s"),
                 runs={"plain": plain, "engine": engine})


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import deepspeed
    import ray

    info.update(ray=ray.__version__, deepspeed=deepspeed.__version__)
    return info


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def write_results(doc: dict, out: str) -> None:
    """``engine.json`` (every run) and ``engine.md`` (the medians) in ``out``."""
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "engine.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    m = doc["machine"]
    lines = ["# Engine against plain PyTorch: same Task, data and optimizer steps", "",
             (f"Machine: {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs visible; {m['platform']}), torch {m['torch']}, "
              f"Ray {m['ray']}, DeepSpeed {m['deepspeed']}; load average (1/5/15 min) {m.get('load_average_at_start')} "
              f"at the start, {m.get('load_average_at_end')} at the end (a shared machine). {doc['repeats']} "
              "interleaved repeats, medians. "
              "Plain = the hand-written baseline loop (`densiray.bench.engine.plain_pytorch_baseline`) in a fresh "
              "Ray worker process; engine = `densiray.train.engine.fit` with one Ray Train worker. samples/s count "
              "training steps only; first step = from the driver's call to the end of the first optimizer step; "
              "memory = the training process's peak (RSS on CPU, allocated on GPU)."), "",
             ("| case | device | engine strategy | steps | repeats | plain samples/s | engine samples/s | ratio | "
              "first step plain / engine (s) | peak MB plain / engine |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        if c.get("skipped"):
            lines.append(f"| {c['name']} | {c['device']} | - | - | - | - | - | - | - | skipped: {c['skipped']} |")
            continue
        strategy = c["strategy"] + (f" (ZeRO-{c['zero_stage']})" if c.get("zero_stage") is not None else "")
        lines.append(f"| {c['name']} | {c['device']} | {strategy} | {c['steps']} | {c['repeats_done']} | "
                     f"{_fmt(c['plain_samples_per_s'])} | "
                     f"{_fmt(c['engine_samples_per_s'])} | {c['ratio']:.2f} | {_fmt(c['plain_first_step_s'])} / "
                     f"{_fmt(c['engine_first_step_s'])} | {_fmt(c['plain_peak_memory_mb'], 0)} / "
                     f"{_fmt(c['engine_peak_memory_mb'], 0)} |")
    lines += ["", "Cases:", ""] + [f"- **{c['name']}**: {c['note']}" for c in doc["cases"]]
    if doc.get("command"):
        lines += ["", f"Regenerate: `{doc['command']}`"]
    (target / "engine.md").write_text("\n".join(lines) + "\n")
