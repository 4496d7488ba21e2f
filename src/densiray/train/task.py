"""A Task holds everything family-specific; the engine (engine.py) knows nothing about families.

A Task is built on the driver (it loads and validates its data there, so bad input fails before any
Ray worker starts), then shipped to every worker with the training function. It must therefore be
picklable and hold its data, not paths the workers might not see.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from densiray.store import StoredModel


@dataclass
class StepContext:
    """What the engine tells :meth:`Task.loss` about the current micro-step.

    ``generator`` is seeded from (run seed, ``step``, ``micro_step``) alone, so every rank draws the same
    random numbers in a micro-step (and micro-steps of one optimizer step draw different ones): use it for any choice that must agree across ranks (which sub-networks to train, noise
    levels, ...). Under ZeRO-3 a choice that differs across ranks deadlocks the parameter gathers.
    Per-sample randomness that may differ by rank (dropout, data noise) can use torch's global RNG.
    """

    epoch: int
    step: int  # optimizer steps taken so far in the run (the same on every rank)
    micro_step: int  # index of this micro-batch within the optimizer step (0 .. grad_accum_steps - 1)
    rank: int
    world: int
    generator: torch.Generator


class Task(ABC):
    """One model family's part of the pipeline: data → model → loss → evaluation → export.

    Subclasses set ``dataset`` (a JSON-able description with at least ``name``) in ``__init__``.
    """

    kind: ClassVar[str]
    dataset: dict
    #: the validation metric that selects the best epoch (and Tune's objective), and its direction
    metric: ClassVar[str]
    mode: ClassVar[str] = "max"
    #: "fp32" for models whose numerics need it (densities), else "auto" (bf16 on GPU)
    precision: ClassVar[str] = "auto"
    #: True where the model freezes most weights (PEFT): the best weights handed to ``trained_model``
    #: then hold only the trainable parameters, and checkpoints leave the frozen ones out
    trainable_only: ClassVar[bool] = False

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised module (identical on every worker for the same seed)."""

    @abstractmethod
    def batches(self, epoch: int, rank: int, world: int, batch_size: int) -> Iterator[Any]:
        """This worker's batches for one epoch; every rank must yield the same number of batches."""

    @abstractmethod
    def loss(self, engine: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward through ``engine`` (the wrapped model; call it, not the module) -> (loss, metrics).

        ``metrics`` are floats averaged over the epoch's steps and then over ranks by the engine."""

    @abstractmethod
    def evaluate(self, engine: nn.Module) -> dict[str, float]:
        """Validation metrics, including :attr:`metric`; identical on every rank."""

    @abstractmethod
    def trained_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The inference-ready module holding the weights ``state`` (e.g. the best epoch's)."""

    @abstractmethod
    def export(self, model: nn.Module, *, store: str | None, name: str, provenance: dict,
               extra_files: dict[str, bytes] | None = None, train_config: dict | None = None) -> StoredModel:
        """Evaluate ``model`` on held-out data and write it to the store; returns what was stored."""

    @abstractmethod
    def metrics(self, model: nn.Module) -> dict:
        """Held-out metrics of a trained ``model`` (what the store records and the CLI summarises)."""

    def selection_score(self, val: dict[str, float]) -> float | None:
        """The score that selects the best epoch, from :meth:`evaluate`'s metrics: :attr:`metric` by
        default. A task may return None for an epoch that is no candidate (e.g. one whose gain over
        the starting model is not significant on the validation rows): the best so far is kept."""
        return val[self.metric]

    def report_plot(self, model: nn.Module, history: list[dict], title: str) -> bytes | None:
        """A PNG report stored beside the exported model (``report.png``), or None for none."""
        return None

    def with_model(self, overrides: dict) -> Task:
        """This Task (same data) with ``overrides`` merged into its model config: one Tune trial."""
        raise NotImplementedError(f"{type(self).__name__} does not support Tune sweeps yet")

    def with_validation_rows(self) -> Task:
        """This Task with its validation rows added to the training rows (``densiray tune --refit``)."""
        from densiray.errors import ConfigError

        raise ConfigError(f"{self.kind} cannot refit on its validation rows; leave tune.refit off")

    def select_ensemble(self, models: list[nn.Module], size: int) -> list[float]:
        """Mixture weights (0: left out) of at most ``size`` of a sweep's trained ``models``, the winner first
        (``densiray tune --ensemble``); a family that cannot mix its models leaves this out."""
        from densiray.errors import ConfigError

        raise ConfigError(f"{self.kind} cannot export an ensemble of trials; leave tune.ensemble at 1")

    def ensemble_model(self, models: list[nn.Module], weights: list[float]) -> nn.Module:
        """The one module that mixes ``models`` with ``weights`` (exported by :meth:`export`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot build an ensemble")

    def warm(self, space: dict) -> None:
        """Before a sweep: compute on the driver whatever trials of ``space`` would share (caches)."""

    def describe(self) -> dict:
        """A short JSON-able description for logs and provenance."""
        return {"kind": self.kind}


def better(a: float, b: float, mode: str) -> bool:
    """Whether metric value ``a`` improves on ``b`` in direction ``mode`` ("max" or "min")."""
    return a > b if mode == "max" else a < b


def rank_batches(n: int, epoch: int, salt: int, rank: int, world: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Row indices of this rank's batches for one epoch: a permutation seeded by (epoch, salt), dealt out
    to ``world`` equal shards (rank r takes rows r, r + world, ...; every rank takes the same number of
    steps), then cut into batches. The ranks' i-th batches together are the i-th ``world * batch_size``
    rows of the one permutation: the global batches, hence the run, do not depend on the world size (an
    elastic run resumed with fewer workers goes on as it would have)."""
    import math

    import numpy as np

    perm = np.random.default_rng([epoch, salt]).permutation(n)
    per_rank = max(1, n // world)
    mine = torch.from_numpy(perm[rank:per_rank * world:world].copy() if n >= world else perm[:1])
    for i in range(max(1, math.ceil(per_rank / batch_size))):
        yield mine[i * batch_size:(i + 1) * batch_size]


def fmt(v, digits: int = 4) -> str:
    """A metric for a summary line: ``-`` for None, floats to ``digits`` places."""
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
