"""The one training engine: Ray Train's TorchTrainer running DeepSpeed, for every model family.

``fit(task, config, name=..., storage=...)`` launches ``train_loop_per_worker`` on ``config.workers``
Ray Train workers (``workers=0`` runs it in this process, for debugging). Each worker wraps the
Task's model with ``deepspeed.initialize`` (client torch AdamW; ZeRO stage 0-3; gloo/fp32 on CPU,
nccl/bf16 on GPU unless the Task needs fp32), trains, validates every epoch, keeps the best weights
by the Task's metric, stops early, and reports metrics and a checkpoint to Ray Train. A checkpoint
holds the DeepSpeed state (to resume), the best weights so far (safetensors) and the loop state
(JSON), so the latest checkpoint alone is enough to resume or to export. Running ``fit`` again with
the same name and storage resumes from it; worker failures are retried (``FailureConfig``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from densiray.train.task import StepContext, Task, better

STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
DS_DIR = "deepspeed"


class TrainConfig(BaseModel):
    """Engine settings, shared by all families (validated; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(256, ge=1, description="global batch per optimizer step, split over workers")
    lr: float = Field(3e-3, gt=0, lt=10)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    patience: int = Field(20, ge=0, description="stop after this many epochs without improvement (0: never)")
    seed: int = 0
    workers: int = Field(2, ge=0, le=4096, description="Ray Train workers; 0 runs in-process (debugging)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_failures: int = Field(2, ge=-1, description="worker-group restarts before giving up (-1: forever)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last is always saved)")
    keep: Literal["best", "last"] = Field("best", description="export the best epoch by the validation metric, "
                                                              "or the last (a refit whose validation rows are trained on)")


# ---------------------------------------------------------------------------------------------------
# worker side


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


def deepspeed_config(tc: TrainConfig, task: Task, world: int, on_gpu: bool) -> dict:
    """The DeepSpeed config for this hardware: bf16 on GPU unless the Task or user wants fp32."""
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and on_gpu and task.precision != "fp32")
    return {
        "train_micro_batch_size_per_gpu": max(1, tc.batch_size // max(world, 1)),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": {"stage": tc.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client optimizer is a plain torch AdamW
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _full_state_dict(engine, zero_stage: int, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The complete fp32 state dict on CPU (gathering ZeRO-3 partitions; collective on every rank).

    ``trainable_only`` keeps just the parameters that train (PEFT: adapters and head, not the frozen base).
    """
    import contextlib

    import deepspeed

    module = engine.module
    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if trainable_only:
            return {k: v.detach().float().cpu().clone() for k, v in module.named_parameters() if v.requires_grad}
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(on_gpu: bool) -> None:
    """Ray Train has set up the process group; in local mode (no Ray workers) make a world of one."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)


def _quiet_worker(on_gpu: bool) -> None:
    """Keep worker output to the progress bar and real problems: no per-report INFO lines."""
    import warnings

    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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


def train_loop_per_worker(config: dict) -> None:
    """Run by every Ray Train worker (and in-process when ``workers=0``)."""
    import ray.train
    import torch.distributed as dist

    task: Task = config["task"]
    tc = TrainConfig(**config["train"])
    local = tc.workers == 0
    on_gpu = torch.cuda.is_available() and tc.use_gpu is not False
    _quiet_worker(on_gpu)
    import deepspeed

    if not on_gpu:
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    _init_distributed(on_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    torch.manual_seed(tc.seed)
    model = task.build_model()
    # Only trainable parameters go to the optimizer (PEFT's base model, a DNMM's fitted warp are frozen);
    # frozen ones are also left out of checkpoints, since every worker rebuilds them from the same source.
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = len(trainable) < len(list(model.parameters()))
    trainable_only = frozen and getattr(task, "trainable_only", False)
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(tc, task, world, on_gpu))

    state, best_weights = LoopState(history=[]), None
    in_tune = local and config.get("tune", False)  # an in-process Tune trial: report to Tune directly
    if in_tune:  # Tune restores a trial from the checkpoint it persisted
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
    else:
        checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, DS_DIR), load_module_strict=not frozen)
            state = LoopState(**json.loads(Path(d, STATE_FILE).read_text()))
            if Path(d, BEST_FILE).exists():
                best_weights = load_file(os.path.join(d, BEST_FILE))
    resumed_from = state.epoch
    if checkpoint is None:  # the initial model is the first candidate for "best"
        engine.eval()
        with torch.no_grad():
            state.initial = task.evaluate(engine)[task.metric]
        if math.isfinite(state.initial):
            state.best, state.best_epoch = state.initial, -1
            best_weights = _full_state_dict(engine, tc.zero_stage, trainable_only)

    micro = max(1, tc.batch_size // world)
    bar = _progress(tc.epochs, state.epoch, local) if rank == 0 and config.get("progress", True) else None
    while not state.done:
        epoch, t0 = state.epoch, time.perf_counter()
        engine.train()
        sums: dict[str, float] = {}
        steps = 0
        for batch in task.batches(epoch, rank, world, micro):
            ctx = StepContext(epoch=epoch, step=state.step, micro_step=0, rank=rank, world=world,
                              generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + state.step))
            loss, batch_metrics = task.loss(engine, _to(batch, device), ctx)
            engine.backward(loss)
            engine.step()
            steps += 1
            state.step += 1
            for k, v in {"loss": loss.detach().item(), **batch_metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
        train_metrics = _all_reduce_mean({f"train_{k}": v / max(steps, 1) for k, v in sums.items()}, device)
        engine.eval()
        with torch.no_grad():
            val = task.evaluate(engine)
        score = val[task.metric]
        improved = math.isfinite(score) and (tc.keep == "last" or state.best is None
                                             or better(score, state.best, task.mode))
        if improved:
            state.best, state.best_epoch, state.bad_epochs = score, epoch, 0
            best_weights = _full_state_dict(engine, tc.zero_stage, trainable_only)
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        state.done = state.epoch >= tc.epochs or (tc.patience > 0 and state.bad_epochs >= tc.patience)
        metrics = {"epoch": epoch, **train_metrics, **val, "best_epoch": state.best_epoch,
                   f"best_{task.metric}": state.best if state.best is not None else float("nan"),
                   "epoch_time_s": time.perf_counter() - t0, "resumed_from_epoch": resumed_from}
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if bar is not None:
            best = "-" if state.best is None else f"{state.best:.4f}"
            bar.set_description(f"epochs ({task.metric} {score:.4f}, best {best})")
            bar.update(1)
        if state.done or state.epoch % tc.checkpoint_every == 0:
            _report_with_checkpoint(engine, state, best_weights, metrics, rank, local, config.get("local_dir"),
                                    in_tune, exclude_frozen=frozen)
        elif in_tune:
            ray.tune.report(metrics)
        else:
            ray.train.report(metrics)
    if bar is not None:
        bar.close()


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not values or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def _report_with_checkpoint(engine, state: LoopState, best_weights, metrics: dict, rank: int, local: bool,
                            local_dir: str | None, in_tune: bool = False, exclude_frozen: bool = False) -> None:
    """Save DeepSpeed state (all ranks; frozen parameters left out), best weights and loop state (rank 0);
    report to Ray Train (or to Ray Tune, which persists the checkpoint, in an in-process Tune trial)."""
    import ray.train

    parent = local_dir if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="densiray-ckpt-", dir=parent)
    engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag="state", exclude_frozen_parameters=exclude_frozen)
    if rank == 0:
        if best_weights is not None:
            save_file(best_weights, os.path.join(tmp, BEST_FILE))
        Path(tmp, STATE_FILE).write_text(json.dumps(state.__dict__, default=float))
    if in_tune:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if local:  # no Ray storage in local mode: keep only this newest checkpoint on disk
        for old in Path(parent).glob("densiray-ckpt-*"):
            if str(old) != tmp:
                shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# driver side


@dataclass
class FitResult:
    """What a finished run left: the best weights, the loop state and where the run lives."""

    best_weights: dict[str, torch.Tensor]
    state: dict
    run_path: str
    checkpoint_path: str


def fit(task: Task, tc: TrainConfig, *, name: str, storage: str, progress: bool = True) -> FitResult:
    """Train ``task`` on Ray Train (or in-process with ``workers=0``); resume if the run exists.

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
    local_dir = os.path.join(storage, name, "local") if tc.workers == 0 and "://" not in storage else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "train": tc.model_dump(), "local_dir": local_dir, "tune": in_tune,
                           "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.workers, use_gpu=bool(use_gpu),
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
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
    return FitResult(best_weights=weights, state=state, run_path=run_path, checkpoint_path=checkpoint.path)
