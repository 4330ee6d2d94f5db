"""The worker's training loop (paper components 2a-2d): data, compute, synchronize, report.

One invocation runs iterations ``[start, end)`` of one generation. Each iteration:

1. **data**: the rows of this rank's slice of the global batch (:class:`GlobalBatchSampler`),
   from the local shard cache (:class:`~smlt.client.artifacts.DataReader`);
2. **compute**: the user's loss on them and its gradient, flattened and scaled by
   ``n * b_r / B`` so the scheme's plain mean over workers is the global batch's mean gradient
   even when B is not divisible by n;
3. **sync**: scatter-reduce; the owner's update hook runs the user's optimizer on its shard;
   the gathered version t + 1 lands directly in the model's parameter vector;
4. **report**: one entry on the job's progress stream (the paper's success flag).

Randomness inside the loss (dropout) is seeded per (seed, iteration, rank), so a re-executed
iteration computes the same gradient.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from smlt.client.artifacts import DataReader
from smlt.errors import TaskError, TrainingError
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import ScatterReduce, ShardUpdate
from smlt.sync.store import ParameterStore
from smlt.task import Task, run_evaluate
from smlt.worker.flat import FlatModel
from smlt.worker.optim import ShardOptimizer, is_shardable
from smlt.worker.payload import StopReason, WorkerPayload, WorkerReport
from smlt.worker.sampler import GlobalBatchSampler

__all__ = ["PROGRESS_MAXLEN", "Trainer"]

#: The progress stream keeps about this many entries (XADD MAXLEN ~).
PROGRESS_MAXLEN = 200_000


@dataclass
class _Timing:
    data_s: float = 0.0
    compute_s: float = 0.0


class Trainer:
    """One worker's side of one generation."""

    def __init__(
        self,
        payload: WorkerPayload,
        task: Task,
        reader: DataReader,
        store: ParameterStore,
        *,
        remaining_s: Callable[[], float] | None = None,
    ) -> None:
        self.payload = payload
        self.task = task
        self.reader = reader
        self.store = store
        self.keys = JobKeys(payload.job_id)
        self.remaining_s = remaining_s
        torch.manual_seed(payload.seed)
        self.model = task.model()
        self.flat = FlatModel(self.model)
        user_optimizer = task.optimizer(self.model)
        n, r = payload.workers, payload.rank
        self.sampler = GlobalBatchSampler(
            reader.manifest.num_samples, payload.batch_size, payload.seed
        )
        self.exchange = ScatterReduce(
            store,
            payload.job_id,
            rank=r,
            workers=n,
            num_params=self.flat.size,
            timeout_s=payload.shard_timeout_s,
        )
        sl = self.exchange.slices[r]
        self.sharded = is_shardable(user_optimizer)
        if self.sharded:
            self.shard_optimizer: ShardOptimizer | None = ShardOptimizer(
                user_optimizer, self.flat, sl.start, sl.stop
            )
            self.exchange.update = self._owner_update
            self.user_optimizer = None
        else:
            # Replicated update: owners publish the mean gradient; everyone steps the full
            # optimizer on it. Correct for any optimizer, at n x the optimizer memory.
            self.shard_optimizer = None
            self.user_optimizer = user_optimizer
            self._mean_grad = np.empty(self.flat.size, dtype=np.float32)

    # -- owner side ----------------------------------------------------------------------------

    def _owner_update(self, t: int, shard: int, mean: np.ndarray) -> ShardUpdate:
        assert self.shard_optimizer is not None
        params = self.shard_optimizer.step(mean)
        state = np.frombuffer(self.shard_optimizer.state_bytes(), dtype=np.uint8)
        frame = codec.encode(codec.FrameHeader("optim", self.keys.job, t + 1, shard), state)
        return ShardUpdate(params, extra=[(self.keys.optim(t + 1, shard), frame)])

    def _load_state(self, version: int) -> None:
        """Parameters of ``version`` into the model; our optimizer-state shard if it exists."""
        if self.sharded:
            self.exchange.gather(version, out=self.flat.values_numpy())
            assert self.shard_optimizer is not None
            self.shard_optimizer.sync_from_flat()
            key = self.keys.optim(version, self.payload.rank)
            frame = self.store.get(self.payload.rank, key)
            if frame is not None:
                header = codec.FrameHeader("optim", self.keys.job, version, self.payload.rank)
                self.shard_optimizer.load_state_bytes(
                    codec.decode(frame, header, key).tobytes(), key
                )
        else:
            self.exchange.gather(version, out=self.flat.values_numpy())

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> WorkerReport:
        p = self.payload
        began = time.monotonic()
        self._load_state(p.start_iteration)
        init_s = time.monotonic() - began
        t = p.start_iteration
        reason = (
            StopReason.FINISHED
            if p.end_iteration == p.total_iterations
            else StopReason.STOP_ITERATION
        )
        try:
            while t < p.end_iteration:
                self._iteration(t)
                t += 1
        finally:
            self.exchange.close()
        return WorkerReport(
            rank=p.rank,
            generation=p.generation,
            first_iteration=p.start_iteration,
            next_iteration=t,
            stop_reason=reason,
            wall_s=time.monotonic() - began,
            init_s=init_s,
        )

    def _iteration(self, t: int) -> None:
        p = self.payload
        started = time.monotonic()
        timing = _Timing()
        indices, global_batch = self.sampler.worker_indices(t, p.rank, p.workers)
        batch = self.reader.rows(indices)
        timing.data_s = time.monotonic() - started

        compute_started = time.monotonic()
        self.model.train()
        torch.manual_seed((p.seed * 1_000_003 + t) * 1009 + p.rank)
        loss_value = 0.0
        self.flat.zero_grad()
        if len(indices):
            loss = self.task.loss(self.model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TaskError(f"loss() must return a scalar tensor, got {type(loss).__name__}")
            loss.backward()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss is {loss_value} at iteration {t} on rank {p.rank}: training diverged "
                    "(lower the learning rate?)"
                )
        grad = self.flat.gradient(p.workers * len(indices) / global_batch)
        timing.compute_s = time.monotonic() - compute_started

        if self.sharded:
            self.exchange.step(t, grad, out=self.flat.values_numpy())
        else:
            self._replicated_step(t, grad)
        phases = self.exchange.last_phases

        iter_s = time.monotonic() - started  # evaluation below is not part of the iteration
        metrics: dict[str, float] = {}
        last = t + 1 == p.total_iterations
        if p.rank == 0 and p.eval_every_epoch and (self.sampler.is_epoch_end(t) or last):
            metrics = run_evaluate(self.task, self.model)
            self.model.train()
        fields: dict[str, float | int | str] = {
            "rank": p.rank,
            "gen": p.generation,
            "t": t,
            "loss": loss_value,
            "samples": len(indices),
            "batch": global_batch,
            "data_s": timing.data_s,
            "compute_s": timing.compute_s,
            "sync_s": phases.total_s,
            "iter_s": iter_s,
            "bytes_up": phases.bytes_up,
            "bytes_down": phases.bytes_down,
            **{k: v for k, v in phases.as_dict().items() if k.endswith("_s") and k != "total_s"},
        }
        if metrics:
            fields["metrics"] = json.dumps(metrics)
        self.store.client(0).xadd(
            self.keys.progress(), fields, maxlen=PROGRESS_MAXLEN, approximate=True
        )

    def _replicated_step(self, t: int, grad: np.ndarray) -> None:
        assert self.user_optimizer is not None
        self.exchange.step(t, grad, out=self._mean_grad)
        mean = torch.from_numpy(self._mean_grad)
        for seg in self.flat.segments:
            if seg.is_param:
                seg.tensor.grad = mean[seg.start : seg.stop].view_as(seg.tensor).clone()
            else:
                seg.tensor.data.copy_(mean[seg.start : seg.stop].view_as(seg.tensor))
        self.user_optimizer.step()
        self.flat.zero_grad()
