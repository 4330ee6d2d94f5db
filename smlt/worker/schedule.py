"""A task's learning-rate schedule, the same on every worker at every iteration.

A user writes ``optimizer.step(); scheduler.step()``, and the scheduler's only effect is on the
optimizer's param groups: the learning rate, and for OneCycleLR or CyclicLR the momentum or
Adam's betas too. smlt's workers step other optimizers than the user's (each owner a rebuilt
optimizer over its shard; a replicated optimizer that loads its state from the store), and
they are stateless: a replacement, a re-scaled generation or a resumed run starts at some
iteration t with nothing but the task and the store. So the schedule is not carried from one
invocation to the next but *rebuilt from the iteration count*:

- :class:`Schedule` keeps a *driver*: an optimizer of the user's class over the user's param
  groups that is never stepped, with the user's scheduler over it. Before iteration t it steps
  the scheduler until it has stepped ``t`` times (``t // iterations_per_epoch`` for a schedule
  stepped per epoch), so the driver's groups then hold exactly what the user's optimizer holds
  at iteration t of ``opt.step(); sched.step()``: a scheduler's arithmetic reads only its own
  counters and its optimizer's groups, which nothing but it touches here.
- Before each update, the hyperparameters the schedule drives (every group key it has set so
  far, the learning rate always) are copied onto the optimizer that steps
  (:meth:`~smlt.worker.optim.ShardOptimizer.set_hyperparameters`, or
  :func:`apply_hyperparameters` for a replicated one).

Every worker therefore applies the same floats at iteration t, whether it has run since
iteration 0 or started at t, on any number of workers, for any scheduler class (LambdaLR's
closures, SequentialLR's milestones, OneCycleLR's phases) and with nothing to checkpoint. The
price is replaying t steps when an invocation starts: microseconds each.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.task import Task, check_scheduler, scheduler_interval

__all__ = ["Schedule", "apply_hyperparameters", "check_schedule_lasts"]

Hyperparameters = list[dict[str, Any]]


class Schedule:
    """The hyperparameters of every iteration, from ``task.scheduler(driver)``.

    ``driver`` must be an optimizer nothing else steps or changes: the user's own in a sharded
    run (whose owners step rebuilt optimizers), a second ``task.optimizer(model)`` in a
    replicated one. Without a schedule it is only read (the learning rate to report).
    """

    def __init__(
        self, task: Task, driver: torch.optim.Optimizer, *, iterations_per_epoch: int
    ) -> None:
        self.task = task
        self.driver = driver
        self.per_epoch = scheduler_interval(task) == "epoch"
        self.iterations_per_epoch = max(1, iterations_per_epoch)
        # The groups as the optimizer built them: what a rebuild starts from, and what tells
        # which keys the schedule has changed.
        self._pristine = [_hyper(group) for group in driver.param_groups]
        self._scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._steps = 0
        self._driven: list[str] = []
        self._build()

    @property
    def active(self) -> bool:
        """True if the task has a schedule."""
        return self._scheduler is not None

    @property
    def name(self) -> str:
        return type(self._scheduler).__name__ if self._scheduler is not None else "none"

    def steps_before(self, t: int) -> int:
        """How many times the user's loop has stepped the scheduler when iteration t starts."""
        return t // self.iterations_per_epoch if self.per_epoch else t

    def hyperparameters(self, t: int) -> Hyperparameters:
        """Per param group of the user's optimizer, the values the schedule drives at iteration
        ``t`` (copies); empty dicts without a schedule."""
        self._advance(t)
        return [
            {key: _copy(group[key]) for key in self._driven if key in group}
            for group in self.driver.param_groups
        ]

    def lr(self, t: int) -> float:
        """The learning rate of the first param group at iteration ``t``."""
        self._advance(t)
        return float(self.driver.param_groups[0]["lr"])

    # -- stepping ------------------------------------------------------------------------------

    def _build(self) -> None:
        scheduler = check_scheduler(self.task, self.driver)
        self._scheduler = scheduler
        self._steps = 0
        self._driven = []
        if scheduler is None:
            return
        # The driver is never stepped: tell the scheduler's step-order check that it was, as
        # the user's optimizer was when their loop first stepped the schedule (otherwise every
        # worker warns "lr_scheduler.step() before optimizer.step()"). Not by filtering the
        # warning: warning filters are process-wide, and ranks may share a process.
        self.driver._opt_called = True  # type: ignore[attr-defined]
        self._note_driven()

    def _advance(self, t: int) -> None:
        target = self.steps_before(t)
        if self._scheduler is None:
            return
        if target < self._steps:  # back in time: start again from the groups as built
            for group, pristine in zip(self.driver.param_groups, self._pristine, strict=True):
                for key in [k for k in group if k != "params"]:
                    del group[key]
                group.update(copy.deepcopy(pristine))
            self._build()
        while self._steps < target:
            try:
                self._scheduler.step()
            except Exception as exc:
                raise TaskError(
                    f"{type(self.task).__name__}.scheduler(): {self.name}.step() raised "
                    f"{type(exc).__name__} at its step {self._steps + 1} (for iteration {t}): "
                    f"{exc}. The schedule must last the whole run: every iteration's optimizer "
                    "step is followed by a scheduler step."
                ) from exc
            self._steps += 1
            self._note_driven()

    def _note_driven(self) -> None:
        """Add the group keys the schedule has now set to those it drives (in a fixed order:
        the learning rate, then as they first changed)."""
        driven = self._driven or ["lr"]
        for group, pristine in zip(self.driver.param_groups, self._pristine, strict=True):
            for key, value in group.items():
                if key == "params" or key in driven:
                    continue
                if key not in pristine or not _same(value, pristine[key]):
                    driven.append(key)
        self._driven = driven


def check_schedule_lasts(
    task: Task, *, iterations: int, iterations_per_epoch: int, seed: int = 0
) -> None:
    """Step the task's schedule through a run of ``iterations`` as the workers will, so that a
    schedule shorter than the run (a OneCycleLR whose ``total_steps`` is the epoch count, not
    the iteration count) fails on the client, before any worker is paid, with the
    :class:`TaskError` a worker would raise at that iteration. No schedule: nothing to do."""
    if type(task).scheduler is Task.scheduler:
        return
    torch.manual_seed(seed)
    model = task.model()
    FlatModel(model)  # as the workers build it: the optimizer sees the re-pointed parameters
    schedule = Schedule(task, task.optimizer(model), iterations_per_epoch=iterations_per_epoch)
    schedule.lr(iterations - 1)  # the last iteration's learning rate: what a worker needs last


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, values: Sequence[Mapping[str, Any]]
) -> None:
    """Set ``values[i]`` on param group i of ``optimizer`` (the user's group structure)."""
    for group, hyper in zip(optimizer.param_groups, values, strict=True):
        group.update(hyper)


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in group.items() if k != "params"})


def _copy(value: Any) -> Any:
    """A value that the driver's scheduler cannot change behind the optimizer's back (it
    updates tensor learning rates in place)."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:  # values that do not compare (tuples of tensors): treat as changed
        return False
