"""The worker's training loop (paper components 2a-2d): data, compute, synchronize, report.

One invocation runs iterations ``[start, end)`` of one generation. Each iteration:

1. **data**: the rows of this rank's slice of the global batch (:class:`GlobalBatchSampler`),
   from the local shard cache (:class:`~smlt.storage.artifacts.DataReader`);
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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from smlt.errors import TaskError, TrainingError
from smlt.protocol.control import Heartbeat, should_stop
from smlt.protocol.faults import FaultInjector
from smlt.protocol.payload import StopReason, WorkerPayload, WorkerReport
from smlt.protocol.state import ShardState
from smlt.storage.artifacts import DataReader
from smlt.storage.checkpoint import CheckpointStore
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import ScatterReduce, ShardUpdate
from smlt.sync.store import ParameterStore
from smlt.task import Task, run_evaluate
from smlt.worker.flat import FlatModel
from smlt.worker.optim import ShardOptimizer, is_shardable
from smlt.worker.sampler import GlobalBatchSampler, iteration_seed

__all__ = ["MIN_MARGIN_S", "PROGRESS_MAXLEN", "Trainer"]

#: The progress stream keeps about this many entries (XADD MAXLEN ~).
PROGRESS_MAXLEN = 200_000
#: Seconds of slack kept before a function's time limit beyond 2 x the slowest iteration.
MIN_MARGIN_S = float(os.environ.get("SMLT_MIN_MARGIN_S", "1.0"))


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
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self.payload = payload
        self.checkpoints = checkpoints
        self._ckpt_written: int | None = None
        self._ckpt_shards: dict[str, list[Any]] = {}
        self._ckpt_s = 0.0
        self.task = task
        self.reader = reader
        self.store = store
        self.keys = JobKeys(payload.job_id, payload.session)
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
            self.keys,
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
        state = np.frombuffer(self.shard_optimizer.state().to_bytes(), dtype=np.uint8)
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
                raw = codec.decode(frame, header, key).tobytes()
                self.shard_optimizer.load_state(ShardState.from_bytes(raw, key))
        else:
            self.exchange.gather(version, out=self.flat.values_numpy())

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> WorkerReport:
        """Iterations from ``start_iteration`` until the job ends, the generation's agreed stop
        iteration, or the function's time runs short; then the boundary checkpoint."""
        p = self.payload
        began = time.monotonic()
        options = p.options
        heartbeat = None
        if options.get("heartbeat_timeout_s"):
            heartbeat = Heartbeat(
                self.store.client(0),
                self.keys,
                p.generation,
                p.rank,
                p.attempt,
                interval_s=float(options.get("heartbeat_interval_s", 1.0)),
                timeout_s=float(options["heartbeat_timeout_s"]),
            ).start()
        faults = FaultInjector.from_option(str(options.get("faults", "")), p.rank, p.attempt)
        try:
            self._load_state(p.start_iteration)
            init_s = time.monotonic() - began
            t, reason = self._loop(faults)
            if self.checkpoints is not None and t > p.start_iteration and t != self._ckpt_written:
                self._write_checkpoint(t)
        finally:
            self.exchange.close()
            if heartbeat is not None:
                heartbeat.stop()
        return WorkerReport(
            rank=p.rank,
            generation=p.generation,
            first_iteration=p.start_iteration,
            next_iteration=t,
            stop_reason=reason,
            wall_s=time.monotonic() - began,
            init_s=init_s,
            checkpoint_iteration=self._ckpt_written,
            checkpoint_shards=self._ckpt_shards or None,
        )

    def _loop(self, faults: FaultInjector) -> tuple[int, str]:
        p = self.payload
        client = self.store.client(0)
        slowest_s = 0.0
        t = p.start_iteration
        while t < p.end_iteration:
            short_of_time = False
            if self.remaining_s is not None:
                # Room for this iteration and one more, plus the boundary checkpoint.
                margin_s = 2 * slowest_s + self._ckpt_s + MIN_MARGIN_S
                short_of_time = self.remaining_s() < margin_s
            if should_stop(client, self.keys, p.generation, t, propose=short_of_time):
                return t, StopReason.TIME_LIMIT if short_of_time else StopReason.STOP_ITERATION
            faults.maybe_fire(t)
            began = time.monotonic()
            self._iteration(t)
            slowest_s = max(slowest_s * 0.9, time.monotonic() - began)
            t += 1
        reason = StopReason.FINISHED if t == p.total_iterations else StopReason.STOP_ITERATION
        return t, reason

    def _write_checkpoint(self, version: int) -> None:
        """This owner's shard of ``version`` (parameters and optimizer state) to the object
        store; the scheduler commits the checkpoint once every shard is there."""
        assert self.checkpoints is not None
        began = time.monotonic()
        r, job = self.payload.rank, self.keys.job
        sl = self.exchange.slices[r]
        params = codec.encode(
            codec.FrameHeader("param", job, version, r), self.flat.values_numpy()[sl]
        )
        if self.shard_optimizer is not None:
            state = self.shard_optimizer.state().to_bytes()
        else:
            state = ShardState(sl.start, sl.stop, {}, {}).to_bytes()
        optim = codec.encode(
            codec.FrameHeader("optim", job, version, r), np.frombuffer(state, dtype=np.uint8)
        )
        written = [
            self.checkpoints.write_shard(version, r, "param", params),
            self.checkpoints.write_shard(version, r, "optim", optim),
        ]
        # What the scheduler commits: it trusts these hashes rather than downloading the
        # checkpoint again, and every read of a shard checks them.
        self._ckpt_shards = {rec.kind: [rec.size_bytes, rec.sha256] for rec in written}
        self._ckpt_written = version
        self._ckpt_s = time.monotonic() - began

    def _iteration(self, t: int) -> None:
        p = self.payload
        started = time.monotonic()
        timing = _Timing()
        indices, global_batch = self.sampler.worker_indices(t, p.rank, p.workers)
        batch = self.reader.rows(indices)
        timing.data_s = time.monotonic() - started

        compute_started = time.monotonic()
        self.model.train()
        torch.manual_seed(iteration_seed(p.seed, t, p.rank))
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
        every = int(p.options.get("checkpoint_every", 0))
        if self.checkpoints is not None and every > 0 and (t + 1) % every == 0:
            self._write_checkpoint(t + 1)

        iter_s = time.monotonic() - started  # evaluation below is not part of the iteration
        metrics: dict[str, float] = {}
        last = t + 1 == p.total_iterations
        if p.rank == 0 and p.eval_every_epoch and (self.sampler.is_epoch_end(t) or last):
            metrics = run_evaluate(self.task, self.model)
            self.model.train()
        fields: dict[str, float | int | str] = {
            "rank": p.rank,
            "gen": p.generation,
            "attempt": p.attempt,
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
        if self._ckpt_written == t + 1:
            fields["ckpt"] = t + 1
            fields["ckpt_shards"] = json.dumps(self._ckpt_shards)
        self.store.client(0).xadd(
            self.keys.progress(),
            cast(dict[Any, Any], fields),
            maxlen=PROGRESS_MAXLEN,
            approximate=True,
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
