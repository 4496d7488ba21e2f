"""The training engine (Ray Train + DeepSpeed) and one Task per model family (found via densiray.families)."""

from densiray.train.task import StepContext, Task

__all__ = ["StepContext", "Task"]
