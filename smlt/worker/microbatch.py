"""Gradient accumulation: a worker's slice of the global batch in micro-batches (``--micro-batch``).

A worker whose slice of the global batch (``b_r`` samples) does not fit its memory, or whose run
asks for it (``--micro-batch M``), goes through the slice at most ``M`` samples at a time (in as few
micro-batches as that takes, of even sizes: :func:`micro_ranges`): forward and backward on each
micro-batch, the parameters' gradients summed in ``.grad`` (PyTorch accumulates them), and the
exchange only after the last one, so a global batch larger than n x what fits in one function still
trains, with the gradient of one pass over the slice up to float rounding:

- a mean-reduced loss (``loss_reduction = "mean"``) has each micro-batch's loss weighted by
  ``m_i / b_r`` before its backward pass, so the sum is the slice's mean; a summed loss is
  summed as it is. The reported loss is the slice's per-sample loss, as without micro-batches;
- randomness (dropout) is seeded once per (iteration, rank), before the first micro-batch, and
  the micro-batches draw from it in order. ``M`` is the same on every attempt of a rank
  (:mod:`smlt.worker.memory`), so a re-executed iteration (a replacement for a killed worker)
  draws the same masks and computes the same bytes. (With ``M < b_r`` the masks are not those
  of one pass: dropout draws per tensor shape.)
- **buffers** follow :mod:`smlt.worker.contribution`'s design, with each micro-batch as a
  virtual worker: every micro-batch's forward pass starts from version t's buffers (they are
  restored before each), a float buffer's new value is the sample-weighted mean of the values of
  the micro-batches that changed it, and a non-float buffer takes the value of the first
  micro-batch that changed it. BatchNorm's ``running_mean`` therefore tracks the global batch's
  mean as 1 x B does (the update is linear in the batch mean), ``running_var`` becomes the
  weighted mean of the micro-batches' variances, and ``num_batches_tracked`` counts one per
  iteration whatever ``M`` is, exactly as n workers x B/n give; stepping them once per
  micro-batch instead (what a plain accumulation loop does) would make ``num_batches_tracked``
  count micro-batches, differ between ranks of uneven slices, and make the result depend on M.
  A buffer changed by only some micro-batches is averaged over those, and the worker's side
  value still carries the worker's whole share of the batch (a per-buffer share would change the
  exchange's format for a case no known layer has).

One micro-batch (``M >= b_r``, the default where memory allows) is exactly the pass without
micro-batches: the same kernels on the same tensors, no weighting, no restoring, so n = 1 stays
bit-identical to a plain PyTorch loop.

How large M is, when the run does not say, is :mod:`smlt.worker.memory`'s decision.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from smlt.errors import TaskError, TrainingError
from smlt.protocol.model import FlatModel
from smlt.sync.shards import shard_slice
from smlt.task import Batch, Task
from smlt.worker.contribution import Before
from smlt.worker.precision import compute_precision

__all__ = ["accumulate", "micro_ranges"]


def micro_ranges(samples: int, micro_batch: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each micro-batch of a slice of ``samples``: as few as hold at most
    ``micro_batch`` samples each, as even as the slice allows (the shard arithmetic of
    :func:`~smlt.sync.shards.shard_slice`). Even, rather than ``micro_batch`` each and the rest
    last, so that no micro-batch is left with a sample or two: BatchNorm cannot train on one
    sample, and its statistics are noisy on a few."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    count = -(-samples // micro_batch)
    ranges = [shard_slice(samples, count, i) for i in range(count)]
    return [(r.start, r.stop) for r in ranges]


# --- the pass --------------------------------------------------------------------------------


def accumulate(
    task: Task,
    flat: FlatModel,
    batch: Batch,
    *,
    micro_batch: int,
    reduction: str,
    precision: str,
    before: Before,
    where: str,
) -> float:
    """Forward and backward over the slice ``batch`` in micro-batches of ``micro_batch``,
    leaving the slice's gradient in the parameters' ``.grad`` and its buffers in the model
    (see the module's docstring); returns the slice's per-sample loss. The caller seeds torch
    and clears the gradients first. ``where`` (``"iteration 7 on rank 2"``) goes into errors."""
    samples = len(batch[0])
    ranges = micro_ranges(samples, micro_batch)
    if len(ranges) == 1:  # one pass, exactly as without micro-batches
        loss = _forward(task, flat.model, batch, precision)
        loss.backward()
        total = _value(loss, where)
    else:
        buffers = _VirtualWorkers(flat, before) if flat.buffer_segments or flat.discrete else None
        total = 0.0
        for i, (a, b) in enumerate(ranges):
            if buffers is not None and i:
                buffers.restore()
            loss = _forward(task, flat.model, tuple(x[a:b] for x in batch), precision)
            here = f"{where} (micro-batch {i + 1} of {len(ranges)})"
            if reduction == "sum":
                value = _value(loss, here)
                loss.backward()
            else:
                weight = (b - a) / samples
                value = _value(loss, here) * weight
                # float32 even when the loss came out in bfloat16: the weight must not round.
                (loss.float() * weight).backward()
            total += value
            if buffers is not None:
                buffers.add(b - a)
        if buffers is not None:
            buffers.finish()
    return total / samples if reduction == "sum" else total


def _forward(task: Task, model: torch.nn.Module, batch: Batch, precision: str) -> torch.Tensor:
    with compute_precision(precision):
        loss = task.loss(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TaskError(f"loss() must return a scalar tensor, got {type(loss).__name__}")
    return loss


def _value(loss: torch.Tensor, where: str) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss is {value} at {where}: training diverged (lower the learning rate?)"
        )
    return value


class _VirtualWorkers:
    """The model's buffers over the micro-batches of one slice, each micro-batch combined as
    :mod:`smlt.worker.contribution` combines workers (see the module's docstring)."""

    def __init__(self, flat: FlatModel, before: Before) -> None:
        self.flat = flat
        self.before = before
        self.sums = [np.zeros(s.stop - s.start, dtype=np.float64) for s in flat.buffer_segments]
        self.samples = [0] * len(flat.buffer_segments)
        self.discrete: dict[int, bytes] = {}

    def restore(self) -> None:
        """Version t's buffers, for the next micro-batch's forward pass to start from."""
        self.flat.values_numpy()[self.flat.num_params :] = self.before.buffers
        for i, raw in enumerate(self.before.discrete):
            self.flat.set_discrete(i, raw)

    def add(self, samples: int) -> None:
        """Take in what the last micro-batch (of ``samples`` samples) left in the buffers."""
        values = self.flat.values_numpy()
        base = self.flat.num_params
        for k, seg in enumerate(self.flat.buffer_segments):
            now = values[seg.start : seg.stop]
            was = self.before.buffers[seg.start - base : seg.stop - base]
            if not np.array_equal(now.view(np.uint32), was.view(np.uint32)):
                self.sums[k] += samples * now.astype(np.float64)
                self.samples[k] += samples
        for i, (raw, old) in enumerate(
            zip(self.flat.discrete_values(), self.before.discrete, strict=True)
        ):
            if raw != old:
                self.discrete.setdefault(i, raw)  # the first micro-batch that changed it

    def finish(self) -> None:
        """Leave the combined buffers in the model, for the worker's side value to carry."""
        values = self.flat.values_numpy()
        base = self.flat.num_params
        for k, seg in enumerate(self.flat.buffer_segments):
            target = values[seg.start : seg.stop]
            if self.samples[k]:
                target[:] = (self.sums[k] / self.samples[k]).astype(np.float32)
            else:
                target[:] = self.before.buffers[seg.start - base : seg.stop - base]
        for i, raw in enumerate(self.before.discrete):
            self.flat.set_discrete(i, self.discrete.get(i, raw))
