"""The training engine (Ray Train + DeepSpeed) and one Task per model family."""

from densiray.train import deft, dnmm  # noqa: F401  (register the DEFT and DNMM tasks)
from densiray.train.task import TASKS, Task, register

__all__ = ["TASKS", "Task", "register"]
