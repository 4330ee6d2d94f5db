"""A run with a goal (``--deadline``, ``--budget``, ``--fastest``): what the driver prepares.

The resource manager pursues the goal during the run (:mod:`smlt.actors.resource_manager`);
this module does what must happen on the driver before then:

- **calibrate** the performance model's compute coefficient by timing one local batch on one
  thread (of a streamed training set's head), and count the optimizer state that travels with
  each shard (:func:`calibrate`). Without it the model's prior spans orders of magnitude (an
  MLP and a transformer differ by thousands of flops per parameter), and "is this budget
  possible?" could only be answered after paying for trials;
- **refuse** a goal no configuration can meet, before Ray starts or anything is written
  (:func:`refuse_unreachable`): the search space there is the backend's memory range with no
  limit on concurrency, so a goal refused here is out of reach on any cluster; the cluster's
  real capacity is checked again as the run starts, still before any worker;
- build the :class:`~smlt.actors.resource_manager.GoalSettings` the manager takes, and say in
  ``result.json`` whether the goal was met (:func:`goal_outcome`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from smlt.actors.resource_manager import (
    GoalSettings,
    ResourceManager,
    goal_from_dict,
    trial_from_dict,
)
from smlt.backends.base import BackendLimits
from smlt.client.prices import Prices
from smlt.optimizer.cost import Pricing
from smlt.optimizer.goals import Goal
from smlt.optimizer.perf import PerfPrior, Workload
from smlt.optimizer.problem import SearchSettings
from smlt.task import (
    HEAD_SAMPLES,
    Batch,
    StreamData,
    Task,
    TaskData,
    check_task,
    overrides_transform,
    transformed_head,
)

__all__ = [
    "CALIBRATION_SAMPLES",
    "Calibration",
    "calibrate",
    "count_state_shards",
    "goal_outcome",
    "goal_settings",
    "refuse_unreachable",
]

#: Samples timed for the calibration: enough that per-call overhead does not dominate a small
#: model, few enough that a large one is timed in seconds.
CALIBRATION_SAMPLES = 32
_REPEATS = 3


@dataclass(frozen=True)
class Calibration:
    """What the performance model learns from the task before any worker runs."""

    #: Seconds per sample of a forward and backward pass on one thread (one vCPU's worth).
    s_per_sample: float
    #: Tensors of optimizer state per parameter (Adam: 2, SGD with momentum: 1, plain SGD: 0):
    #: each owner publishes them with its parameter shard every iteration.
    optimizer_state_shards: int


def count_state_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The most parameter-shaped state tensors the optimizer keeps for any parameter (after
    a step has created them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return max(
        (
            sum(
                1
                for v in optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor) and v.shape == p.shape
            )
            for p in params
        ),
        default=0,
    )


def calibrate(
    task: Task,
    batch_size: int,
    seed: int = 0,
    *,
    data: TaskData | StreamData | None = None,
    samples: int = CALIBRATION_SAMPLES,
    repeats: int = _REPEATS,
) -> Calibration:
    """Time the task's forward and backward pass on one thread: the median of ``repeats``
    passes over up to ``samples`` samples (at most the batch), after one warm-up pass
    (allocations, lazy initialisation), which also takes one optimizer step so that the
    optimizer's state exists to be counted. ``data`` is the task's checked data if the caller
    has it (``data()`` is not called twice); without it ``data()`` is called again, which for a
    stream reads only its first chunks.

    A streamed training set is timed on its head (:attr:`~smlt.task.StreamData.head`, the
    first :data:`~smlt.task.HEAD_SAMPLES` samples): where the trial batch is larger than the
    head, the head's rows are repeated to fill it. The time per sample of a forward and
    backward pass does not depend on which rows they are (for the models smlt trains: no
    data-dependent control flow), so the repeated rows time the same as fresh ones would.
    """
    data = data if data is not None else check_task(task)
    # Through the task's transform: loss() is timed on what it gets on the workers.
    head = transformed_head(task, data) if overrides_transform(task) else data.head
    # A stream's size is unknown here, unless its head is all of it (shorter than a head).
    known = (
        head.num_samples if isinstance(data, TaskData) or head.num_samples < HEAD_SAMPLES else None
    )
    n = max(1, min(batch_size, samples, known if known is not None else samples))
    batch = _trial_batch(head, n)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = task.model()
        model.train()
        optimizer = task.optimizer(model)
        times = []
        for k in range(repeats + 1):
            began = time.perf_counter()
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).backward()
            times.append(time.perf_counter() - began)
            if k == 0:
                optimizer.step()
        shards = count_state_shards(model, optimizer)
    finally:
        torch.set_num_threads(previous)
    ordered = sorted(times[1:])
    return Calibration(max(ordered[len(ordered) // 2] / n, 1e-9), shards)


def _trial_batch(head: TaskData, n: int) -> Batch:
    """``n`` rows of ``head``: its first ``n``, or all of them repeated in order to fill ``n``
    (a stream's head may be shorter than the batch timed)."""
    if n <= head.num_samples:
        return head.rows(0, n)
    index = torch.arange(n) % head.num_samples
    return tuple(t[index] for t in head.tensors)


def goal_settings(
    plan: Any,
    pricing: Pricing,
    *,
    started_unix_s: float,
    spent_before_usd: float = 0.0,
    trials: Sequence[Mapping[str, Any]] = (),
) -> GoalSettings | None:
    """What the resource manager needs for ``plan``'s goal (a :class:`RunPlan`), or None."""
    if plan.goal is None:
        return None
    prior = PerfPrior()
    if plan.s_per_sample is not None:
        prior = prior.calibrated(plan.s_per_sample, plan.num_params)
    chosen = {"max_trials": plan.max_trials, "trial_iterations": plan.trial_iterations}
    search = replace(SearchSettings(), **{k: v for k, v in chosen.items() if v is not None})
    return GoalSettings(
        goal=goal_from_dict(plan.goal),
        workload=Workload(
            plan.batch_size,
            plan.num_params,
            plan.total_iterations,
            checkpoint_every=plan.checkpoint_every or None,
            optimizer_state_shards=plan.optimizer_state_shards,
        ),
        costs=Prices.from_dict(plan.prices).costs(pricing),
        prior=prior,
        search=search,
        started_unix_s=started_unix_s,
        spent_before_usd=spent_before_usd,
        trials=tuple(trial_from_dict(t) for t in trials),
    )


def refuse_unreachable(
    settings: GoalSettings,
    memory_range_mb: tuple[int, int],
    *,
    workers: int | None,
    memory_mb: int | None,
) -> None:
    """Raise :class:`~smlt.errors.InfeasibleGoalError` (naming the fastest time and the
    cheapest cost in reach) if no configuration of the backend's memory range, with any number
    of workers up to the batch size, is predicted to meet the goal."""
    low, high = memory_range_mb
    limits = BackendLimits(
        min_memory_mb=low,
        max_memory_mb=high,
        max_duration_s=math.inf,
        max_concurrency=max(1, settings.workload.batch_size),
        max_payload_bytes=0,
    )
    ResourceManager(limits, workers=workers, memory_mb=memory_mb, goal=settings).initial(0)


def goal_outcome(goal: Goal, wall_s: float, cost_usd: float) -> dict[str, Any]:
    """The goal as ``result.json`` records it, and whether the run met it."""
    return {**goal.to_dict(), "text": str(goal), "met": goal.met(wall_s, cost_usd)}
