"""The one training engine: Ray Train's TorchTrainer running the Task's model, for every model family.

``fit(task, config, name=..., storage=...)`` launches ``train_loop_per_worker`` on ``config.workers``
Ray Train workers (``workers=0`` runs it in this process, for debugging and notebooks). Each worker

1. **sets up** (:func:`_setup`): a process group (Ray Train's, or a world of one in-process), the
   Task's model, and a *strategy* (:func:`choose_strategy`):

   * ``ddp``: plain PyTorch -- ``DistributedDataParallel`` when the world has more than one rank,
     bf16 ``torch.autocast`` on GPU, a fused (or foreach) AdamW, ``torch.compile`` as an option;
   * ``deepspeed``: ``deepspeed.initialize`` with ZeRO stage 0-3 (client torch AdamW; gloo/fp32 on
     CPU, nccl/bf16 on GPU unless the Task needs fp32), for models whose weights and optimizer state
     would not fit one device (ZeRO-3 partitions them over the ranks).

   ``strategy: auto`` (the default) picks DeepSpeed when ``zero_stage`` is set above 0 or when the
   estimated training memory -- 16 bytes per trainable parameter for fp32 weights, gradients and
   AdamW's two moments (Rajbhandari et al. 2020, "ZeRO", section 3), plus 4 per frozen one -- exceeds
   half of one device's memory (GPU memory, or the host's RAM shared by this node's workers), else
   DDP. Both strategies give the Task the same engine interface: call ``engine(...)``, read
   ``engine.module``; the loop calls ``backward``, ``step``, ``train``, ``eval``.

   The learning rate follows ``schedule`` (constant, linear or cosine decay to 0 over the run's
   optimizer steps, after a linear warmup), built from ``torch.optim.lr_scheduler`` (``LinearLR``,
   ``CosineAnnealingLR``, ``SequentialLR``) and stepped once per optimizer step. With
   ``grad_accum_steps = k`` one optimizer step takes k micro-batches of ``batch_size / (world k)``
   rows per rank (DeepSpeed's ``gradient_accumulation_steps``; DDP skips the gradient all-reduce on
   the first k-1). With ``ema_decay = β`` an exponential moving average of the weights,
   ``W_ema <- β W_ema + (1 - β) W`` after every optimizer step (``torch.optim.swa_utils.AveragedModel``
   with ``get_ema_multi_avg_fn``; under ZeRO-3 the partitions are gathered for the update), is what
   gets validated, kept as "best" and exported.
2. **resumes** (:func:`_resume`) from the newest *complete* checkpoint it can find: Ray Train's
   registered one, or a newer one already on storage (a worker killed between writing a checkpoint
   and Ray registering it). A checkpoint is complete when every rank's ``complete-rank<r>.json``
   (written last, listing that rank's files and sizes) is there and matches. A ZeRO checkpoint written
   by another number of ranks (elastic training, ``min_workers``) is converted to DeepSpeed's universal
   checkpoint and partitioned anew (:func:`_universal`).
3. **runs epochs** (:func:`_run_epoch`), with a :class:`~densiray.train.task.StepContext` per
   micro-batch whose generator is seeded from (seed, optimizer step, micro-step) alone -- the same on
   every rank;
4. **validates and keeps the best** (:func:`_validate`) by the Task's metric (or the last epoch,
   ``keep: last``), stopping early after ``patience`` epochs without improvement;
5. **reports** (:func:`_report`) metrics and, every ``checkpoint_every`` epochs, a checkpoint to Ray
   Train: the strategy's state (to resume), the best weights so far and the EMA (safetensors), and
   the loop state (JSON), so the latest checkpoint alone is enough to resume or to export.

Metrics are reduced across ranks in one place, :func:`reduce_metrics` (training metrics averaged
over steps then ranks; validation metrics averaged over ranks, so every rank takes the same
keep/stop decision even where a Task's evaluation differs by float round-off). Running ``fit`` again
with the same name and storage resumes; worker failures are retried (``FailureConfig``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from densiray.train.task import StepContext, Task, better

log = logging.getLogger("densiray.engine")

STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
EMA_FILE = "ema.safetensors"
DS_DIR = "deepspeed"  # the strategy's own state (DeepSpeed's checkpoint, or the DDP engine's)
COMPLETE = "complete-rank{}.json"
BYTES_PER_TRAINABLE = 16  # fp32 weight + gradient + AdamW's two moments
BYTES_PER_FROZEN = 4
MEMORY_FRACTION = 0.5  # of one device's memory that weights and optimizer state may take under DDP
# An elastic run waits this long for a worker group's placement group before it tries again with the
# workers the cluster has then (Ray Train's default, 60 s, kept a run that had just lost a node waiting
# a minute for capacity Ray still counted). RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, when set, wins.
ELASTIC_START_WAIT_S = 15.0


class TrainConfig(BaseModel):
    """Engine settings, shared by all families (validated; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(256, ge=1, description="global batch per optimizer step, split over workers "
                                                   "and grad_accum_steps micro-batches")
    lr: float = Field(3e-3, gt=0, lt=10, description="peak learning rate (after warmup)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after warmup: constant, or linear/cosine decay to 0 at the last step")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup")
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of all optimizer steps "
                                                                "(instead of warmup_steps)")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights with this decay "
                                                                  "and validate/export it instead (None: off)")
    patience: int = Field(20, ge=0, description="stop after this many epochs without improvement (0: never)")
    seed: int = 0
    workers: int = Field(2, ge=0, le=4096, description="Ray Train workers; 0 runs in-process (debugging)")
    min_workers: int | None = Field(
        None, ge=1, le=4096, description="elastic training (Ray Train's num_workers=(min, max)): start with as few "
                                         "as min_workers when the cluster has no room for workers, continue at a "
                                         "smaller size after a lost node, grow back when capacity returns (a "
                                         "ZeRO checkpoint is resharded through DeepSpeed's universal checkpoint)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    strategy: Literal["auto", "ddp", "deepspeed"] = Field(
        "auto", description="ddp: plain PyTorch DDP; deepspeed: DeepSpeed ZeRO; auto: DeepSpeed when zero_stage "
                            "is set above 0 or the model and its optimizer state would not fit one device")
    zero_stage: int | None = Field(None, ge=0, le=3, description="DeepSpeed ZeRO stage (None: 2 under strategy "
                                                                 "deepspeed, 3 when auto picks DeepSpeed for memory)")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = Field(False, description="torch.compile the model (strategy ddp)")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts before giving up (-1: forever)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last is always saved)")
    keep: Literal["best", "last"] = Field("best", description="export the best epoch by the validation metric, "
                                                              "or the last (a refit whose validation rows are trained on)")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("set warmup_steps or warmup_fraction, not both")
        if self.strategy == "ddp" and self.zero_stage:
            raise ValueError(f"zero_stage {self.zero_stage} needs strategy deepspeed (or auto), not ddp")
        if self.min_workers is not None:
            if not 0 < self.min_workers <= self.workers:
                raise ValueError(f"min_workers {self.min_workers} must be between 1 and workers ({self.workers})")
        if self.strategy == "deepspeed" and self.compile:
            raise ValueError("compile applies to strategy ddp (or auto), not deepspeed")
        return self


# ---------------------------------------------------------------------------------------------------
# worker side: strategy


def choose_strategy(tc: TrainConfig, trainable: int, frozen: int, device_bytes: int) -> tuple[str, int | None, str]:
    """(strategy, ZeRO stage or None, reason): see the module docstring for the rule."""
    if tc.strategy == "ddp":
        return "ddp", None, "set in the config"
    if tc.strategy == "deepspeed":
        return "deepspeed", 2 if tc.zero_stage is None else tc.zero_stage, "set in the config"
    if tc.zero_stage:
        return "deepspeed", tc.zero_stage, f"zero_stage {tc.zero_stage} set in the config"
    need = BYTES_PER_TRAINABLE * trainable + BYTES_PER_FROZEN * frozen
    what = (f"weights, gradients and AdamW state ~{need / 2**30:.2f} GiB against {MEMORY_FRACTION:.0%} of "
            f"{device_bytes / 2**30:.1f} GiB per device")
    if need > MEMORY_FRACTION * device_bytes:
        return "deepspeed", 3, f"{what}: does not fit, ZeRO-3 partitions them"
    return "ddp", None, f"{what}: fits, plain PyTorch"


def device_memory(device: torch.device) -> int:
    """Memory one rank may plan with: the GPU's, or the host's RAM shared by this node's workers."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    local = 1
    with contextlib.suppress(Exception):
        import ray.train

        local = max(1, ray.train.get_context().get_local_world_size())
    return ram // local


def deepspeed_config(tc: TrainConfig, task: Task, world: int, on_gpu: bool, zero_stage: int | None = None,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed config for this hardware: bf16 on GPU unless the Task or user wants fp32;
    ``load_universal`` when the checkpoint to resume from is resharded to another world size."""
    stage = zero_stage if zero_stage is not None else (2 if tc.zero_stage is None else tc.zero_stage)
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": micro_batch(tc, world),
        "gradient_accumulation_steps": tc.grad_accum_steps,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the client optimizer is a plain torch AdamW
        "bf16": {"enabled": _bf16(tc, task, on_gpu)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def micro_batch(tc: TrainConfig, world: int) -> int:
    """Rows per rank per micro-batch: the global batch split over ranks and accumulation steps."""
    return max(1, tc.batch_size // (max(world, 1) * tc.grad_accum_steps))


def _bf16(tc: TrainConfig, task: Task, on_gpu: bool) -> bool:
    return tc.precision == "bf16" or (tc.precision == "auto" and on_gpu and task.precision != "fp32")


def lr_schedule(optimizer: torch.optim.Optimizer, tc: TrainConfig, total_steps: int):
    """The learning-rate scheduler for ``total_steps`` optimizer steps (None for a constant rate).

    Warmup over w steps: factor (t + 1) / (w + 1) for t < w (``LinearLR``); then over the remaining
    T = total - w steps: 1 (constant), 1 - t/T (linear, ``LinearLR``) or (1 + cos(π t / T)) / 2
    (cosine, ``CosineAnnealingLR``; Loshchilov & Hutter 2017, "SGDR", without restarts), chained with
    ``SequentialLR``.
    """
    from torch.optim import lr_scheduler as sched

    warmup = tc.warmup_steps or round(tc.warmup_fraction * total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    rest = max(1, total_steps - warmup)
    if tc.schedule == "linear":
        main = sched.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    elif tc.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    elif warmup:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        return None
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _adamw(params: list, tc: TrainConfig, device: torch.device, fused: bool) -> torch.optim.Optimizer:
    """torch's AdamW, fused into one kernel where this device has it (else the foreach version)."""
    if fused:
        try:
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, foreach=device.type == "cuda")


class DDPEngine:
    """Plain PyTorch behind the face of a DeepSpeed engine, so Tasks need not know the strategy.

    ``engine(...)`` runs the (DDP-wrapped, optionally compiled) model under autocast; ``backward``
    scales the loss by 1/k for k accumulation steps; ``step`` clips, steps the optimizer and the
    scheduler at an accumulation boundary; ``save_checkpoint`` / ``load_checkpoint`` keep the model
    (safetensors), optimizer, scheduler and counters.
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, device: torch.device, world: int,
                 grad_accum_steps: int, grad_clip: float, bf16: bool, compile: bool) -> None:
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.device, self.grad_accum_steps, self.grad_clip = device, grad_accum_steps, grad_clip
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a family may leave parameters out of a step (a diagonal mixture's
            # Cholesky factor, a sub-network a nested model did not pick this step), as DeepSpeed allows
            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False, find_unused_parameters=True)
        wrapped = self.ddp if self.ddp is not None else model
        self.forward = torch.compile(wrapped) if compile else wrapped
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micro_steps = 0
        self.global_steps = 0

    def __call__(self, *args, **kwargs):
        if self.ddp is not None:  # all-reduce gradients only in the last micro-batch of a step
            self.ddp.require_backward_grad_sync = self.is_gradient_accumulation_boundary()
        with self.autocast:
            return self.forward(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum_steps == 0

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps if self.grad_accum_steps > 1 else loss).backward()

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1

    def save_checkpoint(self, path: str, tag: str, exclude_frozen_parameters: bool = False) -> None:
        import torch.distributed as dist

        if dist.get_rank() != 0:  # every rank holds the same state
            return
        out = Path(path, tag)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v for k, v in _module_state(self.module, exclude_frozen_parameters).items()}
        save_file(weights, str(out / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "counters": [self.micro_steps, self.global_steps],
                    "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None},
                   out / "optimizer.pt")

    def load_checkpoint(self, path: str, tag: str = "state", load_module_strict: bool = True) -> None:
        d = Path(path, tag)
        self.module.load_state_dict(load_file(str(d / "model.safetensors"), device=str(self.device)),
                                    strict=load_module_strict)
        state = torch.load(d / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["counters"]


def _module_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """fp32 copies on CPU of a module's state (or of its trainable parameters only)."""
    if trainable_only:
        return {k: v.detach().float().cpu().clone().contiguous() for k, v in module.named_parameters() if v.requires_grad}
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone().contiguous()
            for k, v in module.state_dict().items()}


def _gathered(module: torch.nn.Module, zero_stage: int | None, params: list | None = None):
    """Context in which ZeRO-3's partitioned parameters are whole on every rank (collective)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params if params is not None else list(module.parameters()),
                                             modifier_rank=None)


def _full_state_dict(engine, zero_stage: int | None, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The complete fp32 state dict on CPU (gathering ZeRO-3 partitions; collective on every rank).

    ``trainable_only`` keeps just the parameters that train (PEFT: adapters and head, not the frozen base).
    """
    module = engine.module
    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    with _gathered(module, zero_stage, params):
        return _module_state(module, trainable_only)


class _FloatParams:
    """What ``AveragedModel.update_parameters`` reads of a model (parameters, buffers), cast to the
    EMA's dtype: DeepSpeed's bf16 module averaged into an fp32 EMA."""

    def __init__(self, module: torch.nn.Module, like: torch.nn.Module) -> None:
        self.module, self.like = module, like

    def parameters(self):
        for p, q in zip(self.module.parameters(), self.like.parameters(), strict=True):
            yield p.detach().to(q.dtype) if p.dtype != q.dtype else p

    def buffers(self):
        for b, c in zip(self.module.buffers(), self.like.buffers(), strict=True):
            yield b.detach().to(c.dtype) if b.dtype != c.dtype and b.is_floating_point() else b


class EvalEngine:
    """The engine face (``engine(...)``, ``.module``) over the EMA weights, for :meth:`Task.evaluate`."""

    def __init__(self, module: torch.nn.Module, bf16: bool, device: torch.device) -> None:
        self.module = module
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, *args, **kwargs):
        with self.autocast:
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)


# ---------------------------------------------------------------------------------------------------
# worker side: the loop


@dataclass
class LoopState:
    """What the loop needs to resume: epoch counter, early-stopping state and the metric history."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    initial: float | None = None  # the metric before any training step
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    history: list | None = None
    strategy: str | None = None
    zero_stage: int | None = None
    world: int = 1
    nodes: list | None = None  # Ray node id of each rank (this segment of the run)
    ema_updates: int = 0
    resumed_from: int = 0  # the epoch this segment of the run started at
    first_step_time: float | None = None  # wall-clock time (time.time()) when the first optimizer step ended


@dataclass
class _Run:
    """One worker's run: the Task, its engine and where it runs."""

    task: Task
    tc: TrainConfig
    config: dict
    engine: Any
    rank: int
    world: int
    device: torch.device
    strategy: str
    zero_stage: int | None
    micro: int
    steps_per_epoch: int
    frozen: bool
    trainable_only: bool
    bf16: bool
    ema: Any = None
    created_group: bool = False
    local: bool = False
    in_tune: bool = False
    nodes: list = field(default_factory=list)
    best_weights: dict | None = None
    checkpoint: Any = None  # the checkpoint to resume from (newest_checkpoint), None for a fresh run
    reshard: bool = False  # it is a ZeRO checkpoint of another world size: load it as a universal checkpoint

    def evaluator(self):
        """What validation runs through: the EMA when on, else the training engine."""
        return EvalEngine(self.ema.module, self.bf16, self.device) if self.ema is not None else self.engine


def train_loop_per_worker(config: dict) -> None:
    """Run by every Ray Train worker (and in-process when ``workers=0``): set up, resume, then epochs
    of train → validate/keep best → report until done."""
    run = _setup(config)
    try:
        state = _resume(run)
        bar = (_progress(run.tc.epochs, state.epoch, run.local)
               if run.rank == 0 and config.get("progress", True) is True else None)
        queue = config.get("progress_queue") if run.rank == 0 else None
        while not state.done:
            t0 = time.perf_counter()
            train_metrics = _run_epoch(run, state)
            metrics = _validate(run, state, train_metrics, time.perf_counter() - t0)
            if queue is not None:  # the driver's live view (fit(progress=callable))
                try:
                    queue.put_nowait({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                except Exception as e:  # the view is gone (its node or the driver died): train on without it
                    logging.getLogger("densiray").warning("progress view lost (%s); training goes on",
                                                          str(e).splitlines()[0] if str(e) else type(e).__name__)
                    queue = None
            if bar is not None:
                best = "-" if state.best is None else f"{state.best:.4f}"
                bar.set_description(f"epochs ({run.task.metric} {metrics[run.task.metric]:.4f}, best {best})")
                bar.update(1)
            _report(run, state, metrics)
        if bar is not None:
            bar.close()
    finally:
        _teardown(run)


def _setup(config: dict) -> _Run:
    """Process group, model, strategy, optimizer, schedule and EMA for this worker."""
    import ray
    import torch.distributed as dist

    task: Task = config["task"]
    tc = TrainConfig(**config["train"])
    local = tc.workers == 0
    on_gpu = torch.cuda.is_available() and tc.use_gpu is not False
    _quiet_worker(on_gpu)
    if not on_gpu:
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    created = _init_distributed(on_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    torch.manual_seed(tc.seed)
    model = task.build_model()
    # Only trainable parameters go to the optimizer (PEFT's base model, a DNMM's fitted warp are frozen);
    # frozen ones are also left out of checkpoints, since every worker rebuilds them from the same source.
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    frozen = len(trainable) < len(list(model.parameters()))
    strategy, stage, reason = choose_strategy(tc, n_train, n_all - n_train, device_memory(device))
    if tc.strategy == "auto" and world > 1:  # every rank must agree: DeepSpeed if any rank needs it
        flag = torch.tensor([1.0 if strategy == "deepspeed" else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and strategy != "deepspeed":
            strategy, stage, reason = "deepspeed", 3, "another rank's device is too small"
    if rank == 0:
        print(f"densiray: strategy {strategy}{f' (ZeRO-{stage})' if stage is not None else ''}: {reason}", flush=True)

    micro = micro_batch(tc, world)
    n_micro = sum(1 for _ in task.batches(0, rank, world, micro))
    steps_per_epoch = n_micro // tc.grad_accum_steps
    if steps_per_epoch < 1:
        from densiray.errors import ConfigError

        raise ConfigError(f"an epoch has {n_micro} micro-batches of {micro} rows per worker, fewer than "
                          f"grad_accum_steps {tc.grad_accum_steps}; lower grad_accum_steps or batch_size")
    bf16 = _bf16(tc, task, on_gpu)
    ema = _make_ema(task, tc, device) if tc.ema_decay is not None else None
    found, saved = newest_checkpoint(config, local, rank)
    # a ZeRO checkpoint written by another number of ranks (elastic training) is resharded on load
    reshard = bool(saved and strategy == "deepspeed" and stage and saved.get("strategy") == "deepspeed"
                   and saved.get("zero_stage") == stage and int(saved.get("world", 1)) != world)
    if strategy == "deepspeed":
        deepspeed = _deepspeed(on_gpu)
        optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, tc, tc.epochs * steps_per_epoch),
            config=deepspeed_config(tc, task, world, on_gpu, stage, load_universal=reshard))
    else:
        model.to(device)
        optimizer = _adamw(trainable, tc, device, fused=True)
        engine = DDPEngine(model, optimizer, lr_schedule(optimizer, tc, tc.epochs * steps_per_epoch),
                           device=device, world=world, grad_accum_steps=tc.grad_accum_steps,
                           grad_clip=tc.grad_clip, bf16=bf16, compile=tc.compile)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return _Run(task=task, tc=tc, config=config, engine=engine, rank=rank, world=world, device=device,
                strategy=strategy, zero_stage=stage, micro=micro, steps_per_epoch=steps_per_epoch, frozen=frozen,
                trainable_only=frozen and getattr(task, "trainable_only", False), bf16=bf16, ema=ema,
                created_group=created, local=local, in_tune=local and config.get("tune", False), nodes=nodes,
                checkpoint=found, reshard=reshard)


def _make_ema(task: Task, tc: TrainConfig, device: torch.device):
    """``AveragedModel`` holding a second, freshly built model (not a deep copy: a family's forward
    hooks may close over their own module). Its first update copies the training weights."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(torch.nn.Identity(), multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=False)
    ema.module = task.build_model().to(device)
    ema.module.requires_grad_(False)
    return ema


def _ema_update(run: _Run) -> None:
    module = run.engine.module
    with _gathered(module, run.zero_stage):
        run.ema.update_parameters(_FloatParams(module, run.ema.module))


def _resume(run: _Run) -> LoopState:
    """Load the newest complete checkpoint (see :func:`newest_checkpoint`), or evaluate the initial
    model as the first candidate for "best"."""
    state = LoopState(history=[])
    found = run.checkpoint
    if found is not None:
        with found.as_directory() as d:
            saved = LoopState(**json.loads(Path(d, STATE_FILE).read_text()))
            if saved.strategy not in (None, run.strategy) or (saved.strategy and saved.zero_stage != run.zero_stage):
                from densiray.errors import ConfigError

                raise ConfigError(f"the run's checkpoint was written by strategy {saved.strategy} (ZeRO "
                                  f"{saved.zero_stage}), this run chose {run.strategy} (ZeRO {run.zero_stage}); "
                                  "set train.strategy/zero_stage as before or restart the run")
            if saved.world != run.world and run.rank == 0:
                how = f", resharding its ZeRO-{run.zero_stage} state (universal checkpoint)" if run.reshard else ""
                print(f"densiray: resuming with {run.world} workers (the checkpoint was written by "
                      f"{saved.world}{how})", flush=True)
            state = saved
            with _universal(os.path.join(d, DS_DIR), "state") if run.reshard else contextlib.nullcontext(
                    os.path.join(d, DS_DIR)) as ds_dir:
                run.engine.load_checkpoint(ds_dir, tag="state", load_module_strict=not run.frozen)
            if Path(d, BEST_FILE).exists():
                run.best_weights = load_file(os.path.join(d, BEST_FILE))
            if run.ema is not None and Path(d, EMA_FILE).exists():
                run.ema.module.load_state_dict(load_file(os.path.join(d, EMA_FILE), device=str(run.device)),
                                               strict=not run.trainable_only)
                run.ema.n_averaged.fill_(state.ema_updates)
    state.resumed_from = state.epoch
    state.strategy, state.zero_stage, state.world, state.nodes = run.strategy, run.zero_stage, run.world, run.nodes
    if found is None:
        run.engine.eval()
        with torch.no_grad():
            state.initial = reduce_metrics(run.task.evaluate(run.engine), run.device)[run.task.metric]
        if math.isfinite(state.initial):
            state.best, state.best_epoch = state.initial, -1
            run.best_weights = _full_state_dict(run.engine, run.zero_stage, run.trainable_only)
    return state


def step_generator(seed: int, step: int, micro_step: int) -> torch.Generator:
    """A generator seeded from (run seed, optimizer step, micro-step) alone: the same on every rank."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro_step]).generate_state(1)[0]))


def _run_epoch(run: _Run, state: LoopState) -> dict[str, float]:
    """One epoch of optimizer steps (k micro-batches each); training metrics averaged over micro-batches
    and ranks. Micro-batches beyond the epoch's last full optimizer step are skipped."""
    task, engine, k = run.task, run.engine, run.tc.grad_accum_steps
    engine.train()
    sums: dict[str, float] = {}
    count = rows = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    batches = iter(task.batches(state.epoch, run.rank, run.world, run.micro))
    for _ in range(run.steps_per_epoch):
        for micro_step in range(k):
            batch = next(batches, None)
            if batch is None:  # the Task yielded fewer batches than in epoch 0
                raise RuntimeError(f"{type(task).__name__}.batches yielded fewer batches in epoch {state.epoch} "
                                   "than in epoch 0; every epoch must yield the same number")
            ctx = StepContext(epoch=state.epoch, step=state.step, micro_step=micro_step, rank=run.rank,
                              world=run.world, generator=step_generator(run.tc.seed, state.step, micro_step))
            loss, batch_metrics = task.loss(engine, _to(batch, run.device), ctx)
            engine.backward(loss)
            engine.step()
            count += 1
            rows += _rows(batch)
            for key, v in {"loss": loss.detach().item(), **batch_metrics}.items():
                sums[key] = sums.get(key, 0.0) + v
        state.step += 1
        if run.ema is not None:
            _ema_update(run)
            state.ema_updates += 1
        if state.first_step_time is None:
            state.first_step_time = time.time()
    seconds = time.perf_counter() - t0
    out = reduce_metrics({**{f"train_{key}": v / max(count, 1) for key, v in sums.items()},
                          "train_time_s": seconds, "train_cpu_s": time.process_time() - cpu0,
                          "train_samples": float(rows)}, run.device)
    out["train_samples"] *= run.world  # rows of all ranks
    return out


def _rows(batch) -> int:
    """Rows in a batch (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return next((_rows(v) for v in values if isinstance(v, (torch.Tensor, dict, list, tuple))), 0)


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated GPU memory, or the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _validate(run: _Run, state: LoopState, train_metrics: dict, seconds: float) -> dict:
    """Validate (the EMA when on), keep the best weights, decide whether to stop; the epoch's metrics."""
    task, tc, epoch = run.task, run.tc, state.epoch
    evaluator = run.evaluator()
    evaluator.eval()
    with torch.no_grad():
        val = reduce_metrics(task.evaluate(evaluator), run.device)
    # the selecting score: the metric, unless the task asks more of a candidate (a refit keeps its last epoch)
    score = val[task.metric] if tc.keep == "last" else task.selection_score(val)
    improved = score is not None and math.isfinite(score) and (tc.keep == "last" or state.best is None
                                                                or better(score, state.best, task.mode))
    if improved:
        state.best, state.best_epoch, state.bad_epochs = score, epoch, 0
        run.best_weights = (_module_state(run.ema.module, run.trainable_only) if run.ema is not None
                            else _full_state_dict(run.engine, run.zero_stage, run.trainable_only))
    else:
        state.bad_epochs += 1
    state.epoch = epoch + 1
    state.done = state.epoch >= tc.epochs or (tc.patience > 0 and state.bad_epochs >= tc.patience)
    lr = _optimizer(run.engine).param_groups[0]["lr"]
    metrics = {"epoch": epoch, **train_metrics, **val, "best_epoch": state.best_epoch,
               f"best_{task.metric}": state.best if state.best is not None else float("nan"),
               "lr": lr, "epoch_time_s": seconds, "peak_memory_mb": peak_memory_mb(run.device),
               "resumed_from_epoch": state.resumed_from, "world": run.world}
    state.history.append({key: v for key, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt) if not hasattr(opt, "param_groups") else opt


def reduce_metrics(values: dict, device: torch.device) -> dict:
    """The one place metrics are reduced across ranks: every float averaged over the ranks (one
    all-reduce); other values pass through. All ranks then hold identical numbers."""
    import torch.distributed as dist

    keys = [key for key, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not keys or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    t = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {**values, **dict(zip(keys, t.tolist()))}


def _report(run: _Run, state: LoopState, metrics: dict) -> None:
    """Report the epoch's metrics to Ray Train (or Tune), with a checkpoint when one is due."""
    import ray.train

    if state.done or state.epoch % run.tc.checkpoint_every == 0:
        _report_with_checkpoint(run, state, metrics)
    elif run.in_tune:
        import ray.tune

        ray.tune.report(metrics)
    else:
        ray.train.report(metrics)


def _report_with_checkpoint(run: _Run, state: LoopState, metrics: dict) -> None:
    """Save the strategy's state (all ranks; frozen parameters left out), best weights, EMA and loop state
    (rank 0), then each rank's completeness marker; report to Ray Train (or to Ray Tune, which persists
    the checkpoint, in an in-process Tune trial)."""
    import ray.train

    parent = run.config.get("local_dir") if run.local else run.config.get("staging_dir")
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="densiray-ckpt-", dir=parent)
    run.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag="state", exclude_frozen_parameters=run.frozen)
    if run.rank == 0:
        if run.best_weights is not None:
            save_file(run.best_weights, os.path.join(tmp, BEST_FILE))
        if run.ema is not None:
            save_file(_module_state(run.ema.module, run.trainable_only), os.path.join(tmp, EMA_FILE))
        Path(tmp, STATE_FILE).write_text(json.dumps(state.__dict__, default=float))
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    Path(tmp, COMPLETE.format(run.rank)).write_text(json.dumps(files))
    if run.in_tune:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if run.local:  # no Ray storage in local mode: keep only this newest checkpoint on disk
        for old in Path(parent).glob("densiray-ckpt-*"):
            if str(old) != tmp:
                shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _teardown(run: _Run) -> None:
    """In-process runs destroy the world of one they created (and DeepSpeed's groups cached on it),
    so that a second run in the same Python process builds a fresh one."""
    if run.created_group:
        _destroy_distributed()


# ---------------------------------------------------------------------------------------------------
# checkpoints on storage


def checkpoint_complete(fs, path: str) -> dict | None:
    """The loop state of the checkpoint at ``path`` if every rank's files are there, else None."""
    import pyarrow.fs as pafs

    def read(name: str) -> bytes | None:
        target = f"{path}/{name}"
        if fs.get_file_info(target).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(target) as f:
            return f.read()

    raw = read(STATE_FILE)
    if raw is None:
        return None
    try:
        state = json.loads(raw)
    except ValueError:
        return None
    sizes = {}
    for r in range(int(state.get("world", 1))):
        marker = read(COMPLETE.format(r))
        if marker is None:
            return None
        sizes.update(json.loads(marker))
    infos = fs.get_file_info([f"{path}/{name}" for name in sizes])
    if any(i.type != pafs.FileType.File or i.size != sizes[name] for i, name in zip(infos, sizes)):
        return None
    return state


def _storage_candidates(config: dict, local: bool) -> list:
    """Checkpoint folders a previous attempt of this run may have left: Ray Train's ``checkpoint_*``
    folders of the run, or the in-process ``densiray-ckpt-*`` ones."""
    import pyarrow.fs as pafs

    root = config.get("local_dir") if local else config.get("run_dir")
    if not root:
        return []
    try:
        fs, path = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return []
    prefix = "densiray-ckpt-" if local else "checkpoint_"
    return [(fs, i.path) for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]


def newest_checkpoint(config: dict, local: bool, rank: int) -> tuple[Any, dict | None]:
    """The checkpoint to resume from and its loop state (None if incomplete): Ray Train's (or Tune's)
    registered one, unless storage holds a newer complete one (by optimizer step); (None, None) for a
    fresh run. ``local``: an in-process run."""
    import ray.train

    if local and config.get("tune", False):
        import ray.tune

        registered = ray.tune.get_checkpoint()
    else:
        registered = ray.train.get_checkpoint()
    best, best_state = registered, None
    if registered is not None:
        best_state = checkpoint_complete(registered.filesystem, registered.path)
    best_step = best_state["step"] if best_state else -1
    for fs, path in _storage_candidates(config, local):
        state = checkpoint_complete(fs, path)
        if state is not None and state["step"] > best_step:
            best, best_state, best_step = ray.train.Checkpoint(path, filesystem=fs), state, state["step"]
    if best is not None and best is not registered and rank == 0:
        print(f"densiray: resuming from {best.path} (step {best_step}), newer than Ray Train's registered "
              "checkpoint", flush=True)
    return best, best_state


@contextlib.contextmanager
def _universal(ds_dir: str, tag: str):
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint ``ds_dir/tag``, in a temporary folder
    (yields the folder to load ``tag`` from): every parameter's fp32 weights and Adam moments whole, so
    that another number of ranks can partition them anew (``ds_to_universal``, its own converter). Each
    rank converts its own copy: ranks on other nodes need not share a file system."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    out = tempfile.mkdtemp(prefix="densiray-universal-")
    try:
        args = argparse.Namespace(input_folder=os.path.join(ds_dir, tag), output_folder=os.path.join(out, tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # checkpoints saved without universal metadata
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            to_universal(args)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# process setup


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(on_gpu: bool) -> bool:
    """Ray Train has set up the process group; in local mode (no Ray workers) make a world of one.

    Plain ``torch.distributed`` (DeepSpeed, imported only when the run uses it, adopts the group).
    Returns whether this call created the group (the run then destroys it at the end)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "deepspeed.utils.groups" in sys.modules:  # groups DeepSpeed cached on a destroyed world
        sys.modules["deepspeed.utils.groups"]._release_process_group_references(group=None)
    port = _free_port()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def jit_build_env() -> None:
    """Make DeepSpeed's JIT-built ops the same build in every process of this environment.

    * They go to ``<venv>/torch_extensions`` (where ``scripts/setup.sh`` builds them once) rather than
      ``~/.cache/torch_extensions``, which every venv on the machine shares and rebuilds in turn (a
      build killed midway there leaves a lock every later build waits on). An explicit
      ``TORCH_EXTENSIONS_DIR`` wins; a read-only environment keeps the default.
    * They are built by this environment's ``ninja`` (DeepSpeed's dependency) whatever ``PATH`` says:
      ninja versions record builds differently, so a process that found another ``ninja`` first (a
      venv used without ``activate``, against a Ray node started from an activated one) rebuilt the op
      (~40 s) every time the other had.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    bindir = str(Path(sys.prefix) / "bin")
    ninja = shutil.which("ninja", path=bindir)
    if ninja and shutil.which("ninja") != ninja:
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")]).rstrip(os.pathsep)


def build_cpu_ops() -> None:
    """Build the CPU op DeepSpeed needs on a CPU-only machine (its shared-memory all-reduce: ~40 s of
    g++ on 2 cores) now, at set-up, instead of in the first DeepSpeed run."""
    jit_build_env()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


def _deepspeed(on_gpu: bool):
    """DeepSpeed, quiet, with its communication backend on the existing process group."""
    jit_build_env()
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, verbose=False)
    return deepspeed


def _destroy_distributed() -> None:
    """Destroy the default process group, through DeepSpeed where it has used it (which also releases
    the groups DeepSpeed cached on it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and getattr(comm, "cdb", None) is not None:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _quiet_worker(on_gpu: bool) -> None:
    """Keep worker output to the progress bar and real problems: no per-report INFO lines."""
    import warnings

    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "deepspeed" in sys.modules:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    import ray.train.v2._internal.execution.context  # noqa: F401  (its logger announces every report)

    for name in list(logging.root.manager.loggerDict):  # some Ray Train loggers are named by file path
        if name.startswith(("ray.train", "ray.tune")) or f"{os.sep}ray{os.sep}train{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*non-writable tensors.*")


def _progress(total: int, initial: int, local: bool):
    if local:
        from tqdm.auto import tqdm
    else:
        from ray.experimental.tqdm_ray import tqdm
    bar = tqdm(total=total, desc="epochs", unit="epoch")
    bar.update(initial)
    return bar


# ---------------------------------------------------------------------------------------------------
# driver side


def tune_staging_dir(trial_id: str) -> str:
    """Where an in-process Tune trial keeps its newest checkpoint between reports (Tune persists each one).

    Not in the trial's own folder: Tune copies that folder to storage over and over, and every epoch's
    checkpoint piled up there (1.2 GB for one DNMM trial of 70 epochs). A trial removes this folder when
    it ends; one that ASHA stops is killed first, so the sweep removes the folders of its trials at the end.
    """
    return os.path.join(tempfile.gettempdir(), "densiray-trials", trial_id)


def worker_staging_dir(storage: str, name: str) -> str:
    """Where Ray Train workers write a checkpoint before reporting it (Ray Train then copies it to storage
    and the worker deletes it). A worker killed in between leaves its copy behind, so ``fit`` removes this
    folder when the run ends (on the driver's node; one named after the run, so a rerun finds it too)."""
    key = hashlib.sha1(f"{storage.rstrip('/')}/{name}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "densiray-staging", key)


def remove_staging_dir(path: str) -> None:
    """Remove a staging folder (:func:`tune_staging_dir`, :func:`worker_staging_dir`), and its shared
    parent once no other run uses it."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


@dataclass
class FitResult:
    """What a finished run left: the best weights, the loop state and where the run lives (inside a Tune
    trial with ``workers=0``, Tune's trial holds the checkpoints and the paths name a removed staging folder)."""

    best_weights: dict[str, torch.Tensor]
    state: dict
    run_path: str
    checkpoint_path: str
    strategy: str | None = None  # "ddp" or "deepspeed", as the engine chose
    zero_stage: int | None = None  # the ZeRO stage under DeepSpeed
    nodes: list[str] = field(default_factory=list)  # Ray node id of each rank, by rank


class _ProgressWatcher:
    """A Ray queue that rank 0 puts every epoch's metrics on, drained by a driver thread into ``callback``."""

    def __init__(self, callback):
        import threading

        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a worker node lost mid-run must not take the queue (and the run) with it
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self.callback, self._stop = callback, threading.Event()
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except Exception as e:
                if isinstance(e, Empty) or isinstance(getattr(e, "cause", None), Empty):  # nothing this half second
                    if self._stop.is_set():
                        return
                    continue
                # the queue is gone (shut down by stop(), or lost with its node): nothing more comes, and
                # retrying here spun a core against the driver's export, which then took tens of seconds
                return
            try:
                self.callback(item)
            except Exception:  # a drawing problem must never stop training
                logging.getLogger("densiray").debug("progress callback failed", exc_info=True)

    def stop(self, wait: bool = True) -> None:
        """Stop draining; ``wait`` for the last epoch's line (not when interrupted: stop at once)."""
        self._stop.set()
        self._thread.join(timeout=5 if wait else 0)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


class _LocalProgress:
    """The in-process run's live view: the loop runs in this process, so each epoch is drawn at once (no Ray)."""

    def __init__(self, callback):
        self.callback, self.queue = callback, self

    def put_nowait(self, item: dict) -> None:
        try:
            self.callback(item)
        except Exception:  # a drawing problem must never stop training
            logging.getLogger("densiray").debug("progress callback failed", exc_info=True)

    def stop(self, wait: bool = True) -> None:
        pass


def fit(task: Task, tc: TrainConfig, *, name: str, storage: str, progress=True) -> FitResult:
    """Train ``task`` on Ray Train (or in-process with ``workers=0``); resume if the run exists.

    ``progress``: True draws a progress bar on rank 0 (shown where worker output reaches the console),
    False nothing, and a callable is called on the driver with every epoch's metrics (through a Ray
    queue, so it works on a cluster too): densiray's console draws its live line with it.

    Called inside a Ray Tune trial, every epoch's metrics and checkpoints also reach Tune (so that
    schedulers such as ASHA can stop the trial and a restored sweep resumes the trial where it was).
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    in_tune = _in_tune_session()
    callbacks = []
    if in_tune and tc.workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())

    use_gpu = tc.use_gpu
    if use_gpu is None:
        import ray

        use_gpu = tc.workers > 0 and ray.cluster_resources().get("GPU", 0) >= 1
    staged_for_tune = tc.workers == 0 and in_tune  # Tune persists the checkpoints; the staging folder goes at the end
    local_dir = None
    if staged_for_tune:
        import ray.tune

        local_dir = tune_staging_dir(ray.tune.get_context().get_trial_id())
    elif tc.workers == 0 and "://" not in storage:
        local_dir = os.path.join(storage, name, "local")
    staging_dir = None if local_dir else worker_staging_dir(storage, name)
    watcher = None
    if callable(progress) and not in_tune:  # in-process (Ray Train's local mode): no Ray needed
        watcher = _LocalProgress(progress) if tc.workers == 0 else _ProgressWatcher(progress)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "train": tc.model_dump(), "local_dir": local_dir, "tune": in_tune,
                           "staging_dir": staging_dir,
                           "progress": bool(progress) and watcher is None, "run_dir": f"{storage.rstrip('/')}/{name}",
                           "progress_queue": watcher.queue if watcher else None},
        scaling_config=ray.train.ScalingConfig(num_workers=(tc.min_workers, tc.workers) if tc.min_workers
                                               else tc.workers, use_gpu=bool(use_gpu),
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    wait_key = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Ray Train's controller, which fit() starts
    short_wait = bool(tc.min_workers) and tc.min_workers < tc.workers and wait_key not in os.environ
    if short_wait:
        os.environ[wait_key] = str(ELASTIC_START_WAIT_S)
    try:
        return _fit_result(trainer, task, watcher, local_dir)
    finally:
        if short_wait:
            os.environ.pop(wait_key, None)
        for staged in (local_dir if staged_for_tune else None, staging_dir):
            if staged:
                remove_staging_dir(staged)


def _fit_result(trainer, task: Task, watcher: _ProgressWatcher | _LocalProgress | None,
                local_dir: str | None) -> FitResult:
    """Run ``trainer`` and read the best weights and loop state from its last checkpoint."""
    import ray.train

    try:
        result = trainer.fit()
    except BaseException:  # Ctrl-C, SIGTERM (`ray job stop`): stop now, the checkpoints are safe
        if watcher is not None:
            watcher.stop(wait=False)
        raise
    if watcher is not None:
        watcher.stop()
    checkpoint = result.checkpoint
    if checkpoint is None and local_dir:  # in-process runs keep their newest checkpoint in local_dir
        newest = sorted(Path(local_dir).glob("densiray-ckpt-*"), key=lambda p: p.stat().st_mtime)
        checkpoint = ray.train.Checkpoint.from_directory(str(newest[-1])) if newest else None
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        if not Path(d, BEST_FILE).exists():
            raise RuntimeError(f"no epoch reached a finite {task.metric}: training diverged; lower the learning rate")
        weights = load_file(os.path.join(d, BEST_FILE))
    run_path = result.path or (local_dir or "")
    return FitResult(best_weights=weights, state=state, run_path=run_path, checkpoint_path=checkpoint.path,
                     strategy=state.get("strategy"), zero_stage=state.get("zero_stage"),
                     nodes=list(state.get("nodes") or []))
