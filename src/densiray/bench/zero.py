"""ZeRO benchmark: per-rank parameter + optimizer memory and throughput for ZeRO 0-3 and CPU offload.

A randomly initialised BERT-base masked-LM (``transformers.BertForMaskedLM``, ~110 M parameters,
no download) trains for a few steps on random tokens on ``workers`` Ray Train workers with the
DeepSpeed config the product's engine builds (:func:`densiray.train.engine.deepspeed_config`), with
ZeRO stage 0-3 and optionally ``offload_optimizer: cpu``. With Adam in fp32 and ``N`` ranks, the model
states per rank are, after Rajbhandari et al. (2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", sec. 5) with K = 8 bytes of Adam moments per parameter and P parameters:

    stage 0: 4P (weights) + 4P (grads) + 8P (Adam)      = 16 P
    stage 1: 4P + 4P + 8P/N                              (optimizer states partitioned)
    stage 2: 4P + (4P + 8P)/N                            (+ gradients partitioned)
    stage 3: 16P/N                                       (+ weights partitioned)

so with N = 2 stage 3 needs about half of one worker's memory. Mixed precision (bf16 weights, fp32
master copy 4P) makes stage 0 14P and stage 3 14P/N. In fp32, stage 0 has no master copy (12P after
the step), but DeepSpeed's ZeRO optimizers keep their flat fp32 partition as a separate copy even when
the weights are fp32 (4P/N more), so stage 3 holds 16P/N = 8P with N = 2: 2/3 of one worker, not 1/2.
ZeRO-3's reduce and prefetch buckets are sized to the model (hidden^2, as Hugging Face's "auto" does);
DeepSpeed's defaults (5e8 elements, 2 GB in fp32) would dwarf a 110 M-parameter model.

Measured per rank after the last step (activations freed): ``param_bytes`` (the rank's own
parameter storage: the ZeRO-3 partition ``ds_tensor``, else the full weights), ``optimizer_bytes``
(the tensors in the rank's torch optimizer state, the Adam moments of its partition, plus ZeRO's
flat fp32 partition where it is a separate copy), ``tensor_bytes`` (every live tensor storage in the
process, counted once: weights, gradients, optimizer, buffers), and the process RSS. Throughput is
global samples per second over the timed steps.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512}
CONFIGS = [  # (workers, zero stage, offload the optimizer to CPU, precision)
    (1, 0, False, "fp32"), (2, 0, False, "fp32"), (2, 1, False, "fp32"), (2, 2, False, "fp32"),
    (2, 3, False, "fp32"), (2, 3, True, "fp32"), (1, 0, False, "bf16"), (2, 3, False, "bf16"),
]


class _BenchTask:
    """The little of a Task that :func:`deepspeed_config` reads."""

    precision = "auto"


def _storages(tensors) -> dict[int, int]:
    """Unique storages (by data pointer) -> bytes, for the given tensors."""
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = s.nbytes()
    return out


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Tensors of the innermost torch optimizer's state, and ZeRO's fp32 partitions."""
    found: list[torch.Tensor] = []
    opt = optimizer
    for _ in range(5):
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
            groups = getattr(opt, name, None)
            if isinstance(groups, list):
                found += [g for g in groups if isinstance(g, torch.Tensor)]
        if isinstance(opt, torch.optim.Optimizer):
            for state in opt.state.values():
                found += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not hasattr(opt, "optimizer"):
            break
        opt = opt.optimizer
    return found


def bench_worker(config: dict) -> None:
    """Ray Train worker: build BERT, wrap it with DeepSpeed, take a few steps, report memory and speed."""
    from densiray.train.engine import jit_build_env

    jit_build_env()
    import deepspeed
    import psutil
    import ray.train
    import torch.distributed as dist
    from transformers import BertConfig, BertForMaskedLM

    from densiray.train.engine import TrainConfig, _quiet_worker, deepspeed_config

    _quiet_worker(on_gpu=False)
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainConfig(batch_size=config["micro_batch"] * world, zero_stage=config["stage"], workers=world,
                     precision=config["precision"])
    ds_config = deepspeed_config(tc, _BenchTask(), world, on_gpu=False)
    if config["stage"] == 3:  # buckets sized to the model (as HF's "auto"), not DeepSpeed's 5e8-element default
        h = config["bert"]["hidden_size"]
        ds_config["zero_optimization"].update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(0.9 * h * h),
                                              stage3_param_persistence_threshold=10 * h)
    if config["offload"]:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds_config["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW (no JIT-built cpu_adam op)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = BertForMaskedLM(BertConfig(**config["bert"]))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    del model, optimizer
    gen = torch.Generator().manual_seed(1000 + rank)
    times = []
    for step in range(config["steps"]):
        ids = torch.randint(0, config["bert"]["vocab_size"], (config["micro_batch"], config["seq_len"]),
                            generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        if step >= config["warmup"]:
            times.append(time.perf_counter() - t0)
    gc.collect()
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    param_bytes = sum(_storages(params).values())
    opt_storages = _storages(_optimizer_tensors(engine.optimizer))
    for ptr in _storages(params):  # a flat partition that *is* the weights is not counted twice
        opt_storages.pop(ptr, None)
    optimizer_bytes = sum(opt_storages.values())
    tensor_bytes = sum(_storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor)).values())
    mine = {"rank": rank, "param_bytes": param_bytes, "optimizer_bytes": optimizer_bytes,
            "model_state_bytes": param_bytes + optimizer_bytes, "tensor_bytes": tensor_bytes,
            "rss_bytes": psutil.Process().memory_info().rss, "step_s": sum(times) / max(len(times), 1)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    result = {"n_params": n_params, "ranks": everyone,
              "samples_per_s": config["micro_batch"] * world / max(r["step_s"] for r in everyone)}
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint: rank 0 attaches a tiny one
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "result.json").write_text(json.dumps(result))
        ray.train.report({"result": json.dumps(result)},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def run_one(workers: int, stage: int, offload: bool, precision: str = "fp32", *, steps: int = 3, warmup: int = 1, micro_batch: int = 2,
            seq_len: int = 64, bert: dict | None = None, storage: str | None = None) -> dict:
    """One configuration on ``workers`` Ray Train workers (1 CPU each); returns its measurements."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from densiray.bench import scratch_dir

    config = {"stage": stage, "offload": offload, "precision": precision, "steps": steps, "warmup": warmup, "micro_batch": micro_batch,
              "seq_len": seq_len, "bert": bert or BERT_BASE}
    trainer = TorchTrainer(
        bench_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"zero-{workers}-{stage}-{int(offload)}-{precision}",
                                       storage_path=storage or scratch_dir("densiray-zero-")),
    )
    fitted = trainer.fit()
    with fitted.checkpoint.as_directory() as d:
        out = json.loads(Path(d, "result.json").read_text())
    ranks = out["ranks"]
    return {"workers": workers, "zero_stage": stage, "offload_optimizer": offload, "precision": precision,
            "n_params": out["n_params"],
            "param_bytes_per_rank": max(r["param_bytes"] for r in ranks),
            "optimizer_bytes_per_rank": max(r["optimizer_bytes"] for r in ranks),
            "model_state_bytes_per_rank": max(r["model_state_bytes"] for r in ranks),
            "tensor_bytes_per_rank": max(r["tensor_bytes"] for r in ranks),
            "rss_bytes_per_rank": max(r["rss_bytes"] for r in ranks),
            "samples_per_s": out["samples_per_s"], "ranks": ranks}


def run(configs=CONFIGS, out: str | os.PathLike | None = None, progress: bool = True, **kwargs) -> dict:
    """Every configuration in turn; writes ``<out>.json`` and ``<out>.md`` if ``out`` is given."""
    import ray
    from tqdm.auto import tqdm

    rows, failed = [], []
    for workers, stage, offload, precision in tqdm(configs, desc="zero configs", disable=not progress):
        try:
            rows.append(run_one(workers, stage, offload, precision, **kwargs))
        except Exception as e:  # one configuration failing (e.g. bf16 unsupported) keeps the others
            failed.append({"workers": workers, "zero_stage": stage, "offload_optimizer": offload,
                           "precision": precision, "error": " ".join(str(e).split())[-300:]})
    for r in rows:  # against one worker with the same precision
        base = next((b for b in rows if b["workers"] == 1 and b["zero_stage"] == 0
                     and b["precision"] == r["precision"]), None)
        r["vs_one_worker"] = round(r["model_state_bytes_per_rank"] / base["model_state_bytes_per_rank"], 3) \
            if base else None
    z3 = {p: next((r["vs_one_worker"] for r in rows if r["workers"] == 2 and r["zero_stage"] == 3
                   and not r["offload_optimizer"] and r["precision"] == p), None) for p in ("fp32", "bf16")}
    report = {
        "model": "BertForMaskedLM (random init)", "config": {**BERT_BASE, **(kwargs.get("bert") or {})},
        "steps": kwargs.get("steps", 3), "micro_batch": kwargs.get("micro_batch", 2),
        "seq_len": kwargs.get("seq_len", 64), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "ray": ray.__version__, "torch": torch.__version__,
        "target": "ZeRO-3 per-rank parameter+optimizer memory with 2 workers ~ half of one worker's",
        "zero3_vs_one_worker": z3,
        "rows": rows, "failed": failed,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    mb = 1024**2
    lines = [
        f"# ZeRO memory and throughput: {report['model']}, {(report['rows'] or [{'n_params': 0}])[0]['n_params'] / 1e6:.1f} M parameters",
        "",
        f"{report['steps']} steps (first one untimed), micro-batch {report['micro_batch']} x {report['seq_len']} "
        f"tokens per worker, fp32 on CPU (gloo), one CPU per worker; {report['machine']}; "
        f"Ray {report['ray']}, torch {report['torch']}.",
        "",
        "| workers | ZeRO | optimizer offload | precision | params MiB/rank | optimizer MiB/rank | params+optimizer MiB/rank "
        "| vs 1 worker | all tensors MiB/rank | RSS MiB/rank | samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['workers']} | {r['zero_stage']} | {'cpu' if r['offload_optimizer'] else '-'} | {r['precision']} "
            f"| {r['param_bytes_per_rank'] / mb:.0f} | {r['optimizer_bytes_per_rank'] / mb:.0f} "
            f"| {r['model_state_bytes_per_rank'] / mb:.0f} | {r['vs_one_worker']} "
            f"| {r['tensor_bytes_per_rank'] / mb:.0f} | {r['rss_bytes_per_rank'] / mb:.0f} "
            f"| {r['samples_per_s']:.2f} |")
    lines += ["", f"Target: {report['target']}."]
    for precision, ratio in report.get("zero3_vs_one_worker", {}).items():
        if ratio is not None:
            lines.append(f"Measured, {precision}: ZeRO-3 with 2 workers holds {ratio} of one worker's "
                         f"parameter+optimizer memory per rank ({'met' if ratio <= 0.55 else 'missed'}).")
    for f in report.get("failed", []):
        lines.append(f"Failed: {f['workers']} workers, ZeRO {f['zero_stage']}, {f['precision']}: {f['error']}")
    lines.append("")
    return "\n".join(lines)
