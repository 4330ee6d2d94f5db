"""smlt: train PyTorch models data-parallel on serverless functions.

>>> import smlt                                                     # doctest: +SKIP
>>> result = smlt.train("examples/digits.py:Digits", epochs=10, batch_size=256, workers=4)
>>> result.final_metrics, result.cost_usd

See README.md for a tour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smlt import errors

if TYPE_CHECKING:
    from smlt.client.callbacks import Callback
    from smlt.client.driver import TrainResult, resume, train
    from smlt.sample_random import SampleRandom
    from smlt.task import StreamData, Task, TaskData, check_task
    from smlt.worker.sampler import global_batches, iteration_seed

__all__ = [
    "Callback",
    "SampleRandom",
    "StreamData",
    "Task",
    "TaskData",
    "TrainResult",
    "check_task",
    "errors",
    "global_batches",
    "iteration_seed",
    "resume",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: ``smlt --version`` and a mistyped flag answer without importing
    # PyTorch (a second or more), and a worker importing smlt.task does not pay for the
    # driver's Ray and actors.
    if name == "Callback":  # no PyTorch: a callback module imports smlt cheaply
        from smlt.client.callbacks import Callback

        return Callback
    if name in ("Task", "TaskData", "StreamData", "check_task"):
        # check_task(MyTask()) tries data() as smlt train will: a TaskData in memory, or a
        # StreamData (head + chunks) for a data set larger than memory.
        from smlt import task

        return getattr(task, name)
    if name in ("train", "resume", "TrainResult"):
        from smlt.client import driver

        return getattr(driver, name)
    if name in ("global_batches", "iteration_seed"):
        from smlt.worker import sampler

        return getattr(sampler, name)
    if name == "SampleRandom":
        from smlt.sample_random import SampleRandom

        return SampleRandom
    raise AttributeError(f"module 'smlt' has no attribute {name!r}")
