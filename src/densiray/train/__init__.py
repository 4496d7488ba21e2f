"""The training engine (Ray Train + DeepSpeed) and one Task per model family."""

from densiray.train import dnmm  # noqa: F401  (registers the DNMM task)
from densiray.train.task import TASKS, Task, register

__all__ = ["TASKS", "Task", "register"]
