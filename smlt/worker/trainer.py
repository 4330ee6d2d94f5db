"""The worker's training loop (paper components 2a-2d): data, compute, synchronize, report.

One invocation runs iterations ``[start, end)`` of one generation. Each iteration:

1. **data**: the rows of this rank's slice of the global batch (:class:`GlobalBatchSampler`,
   whose shard-aware order keeps each rank on a few shards at a time), read from the shards the
   reader fetched ahead (:class:`~smlt.storage.reader.DataReader`, told which shards come next),
   then the task's ``transform`` with draws keyed by (seed, epoch, sample index)
   (:class:`~smlt.sample_random.SampleRandom`);
2. **compute**: the user's loss on them and its gradient, flattened and scaled by ``n * b_r / B``
   (``n`` for a ``loss_reduction = "sum"`` task) so that the exchange's plain mean over workers
   is the global batch's gradient even when B is not divisible by n; plus this worker's side of
   the step (which parameters got a gradient, which buffers its forward pass changed:
   :mod:`smlt.worker.contribution`). The slice goes through in micro-batches when the run asks
   for them or it would not fit the worker's memory (:mod:`smlt.worker.microbatch`), and the
   forward pass under bfloat16 autocast when the run asks for it (:mod:`smlt.worker.precision`);
3. **sync**: scatter-reduce; the owner of shard r steps the user's optimizer on shard r
   (elementwise optimizers), or every worker steps the full optimizer on the whole mean gradient
   (any other optimizer); version t + 1 lands directly in the model's parameter vector. Before
   the step, the mean gradient is clipped by its global norm if the task asks for it
   (:mod:`smlt.worker.clipping`), and the optimizer takes iteration t's learning rate (and
   whatever else the task's schedule drives: :mod:`smlt.worker.schedule`);
4. **report**: one entry on the job's progress stream (the paper's success flag), with the
   learning rate and the global gradient norm of the step.

Whatever way this invocation came to run step t (first invocation, replacement, duplicate,
resume), it continues from what the store holds: if its shard of version t + 1 is already
published, it adopts the parameters *and* optimizer state of t + 1 instead of recomputing them
(DESIGN §3). Randomness inside the loss (dropout) is seeded per (seed, iteration, rank)
(:func:`~smlt.worker.sampler.iteration_seed`), so a re-executed iteration computes the same
gradient, and every write for (t, shard) is the same bytes whoever makes it.

The model is not evaluated here: at the end of each epoch the owners keep a copy of version
t + 1 (``snapshot`` keys) and the scheduler evaluates it off the workers' critical path.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from smlt.errors import CodecError, ObjectStoreError, StaleVersionError
from smlt.protocol.control import Heartbeat, should_stop
from smlt.protocol.faults import Fault, FaultInjector, fault_event
from smlt.protocol.model import FlatModel
from smlt.protocol.payload import (
    StopReason,
    WorkerPayload,
    WorkerReport,
    check_clip_grad_norm,
)
from smlt.protocol.state import (
    ShardState,
    decode_optimizer_state,
    encode_optimizer_state,
    model_side,
    optim_frame,
    read_optim_state,
    side_buffers,
    side_grad_norms,
)
from smlt.sample_random import SampleRandom
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.reader import DataReader
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import ScatterReduce, ShardUpdate
from smlt.sync.store import DEFAULT_PARAM_TTL_S, ParameterStore
from smlt.task import (
    Task,
    clip_grad_norm,
    loss_reduction,
    overrides_evaluate,
    overrides_transform,
    run_transform,
)
from smlt.worker.clipping import clip_, norm_pieces, piece_norms, total_norm
from smlt.worker.contribution import (
    Before,
    Combined,
    apply_buffers,
    combine,
    contribute,
    new_discrete,
    snapshot,
)
from smlt.worker.memory import MemoryProfile, check_micro_batch, plan_micro_batch
from smlt.worker.microbatch import accumulate
from smlt.worker.optim import ShardOptimizer, is_shardable
from smlt.worker.precision import check_precision
from smlt.worker.sampler import GlobalBatchSampler, iteration_seed
from smlt.worker.schedule import Schedule, apply_hyperparameters

__all__ = ["MIN_MARGIN_S", "PROGRESS_MAXLEN", "PROGRESS_TTL_S", "Trainer"]

#: The progress stream keeps about this many entries (XADD MAXLEN ~).
PROGRESS_MAXLEN = 200_000
#: The progress stream expires this long after its last report (a dead run's is never read).
PROGRESS_TTL_S = DEFAULT_PARAM_TTL_S
#: Seconds of slack kept before a function's time limit beyond 2 x the slowest iteration.
MIN_MARGIN_S = float(os.environ.get("SMLT_MIN_MARGIN_S", "1.0"))
#: The reader is told the shards of the next this many iterations, again every
#: :data:`PLAN_EVERY` iterations (working the plan out costs about a millisecond per iteration
#: planned; the shards it names are what the reader may fetch ahead and must not evict).
PLAN_ITERATIONS = 256
PLAN_EVERY = 16
#: The reader's counters each report carries the change of since the previous report.
_READER_FIELDS = {
    "downloads": "shard_loads",
    "bytes_downloaded": "data_bytes",
    "wait_s": "data_wait_s",
}


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
        self.reduction = loss_reduction(task)
        torch.manual_seed(payload.seed)
        self.model = task.model()
        self.flat = FlatModel(self.model)
        user_optimizer = task.optimizer(self.model)
        n, r = payload.workers, payload.rank
        self.sampler = GlobalBatchSampler(
            reader.manifest.num_samples,
            payload.batch_size,
            payload.seed,
            shard_sizes=reader.manifest.shard_sizes,
        )
        # Bytes the disk budget fell short of what the sample order reads at once (0: none).
        self._cache_short_bytes = 0
        self._faults = FaultInjector.from_option(
            str(payload.options.get("faults", "")), r, payload.attempt, on_fire=self._record_fault
        )
        self._faults_lock = threading.Lock()  # the upload thread fires its phases too
        self.exchange = ScatterReduce(
            store,
            self.keys,
            rank=r,
            workers=n,
            num_params=self.flat.size,
            timeout_s=payload.shard_timeout_s,
            combine=lambda sides: combine(sides, self.flat).to_side(),
            on_phase=self._fire,
        )
        self.slice = self.exchange.slices[r]
        self._evaluates = payload.eval_every_epoch and overrides_evaluate(task)
        self._transforms = overrides_transform(task)
        self._before: Before | None = None
        self._timing = _Timing()
        self.sharded = is_shardable(user_optimizer)
        self.shard_optimizer: ShardOptimizer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        driver = user_optimizer
        if self.sharded:
            self.shard_optimizer = ShardOptimizer(
                user_optimizer, self.flat, self.slice.start, self.slice.stop
            )
            self.exchange.update = self._owner_update
        else:
            # Replicated update: owners publish the mean gradient; everyone steps the full
            # optimizer on it. Exact for any optimizer, at n x the optimizer memory.
            self.optimizer = user_optimizer
            self._mean = np.empty(self.flat.size, dtype=np.float32)
            if type(task).scheduler is not Task.scheduler:
                # The schedule needs an optimizer of its own, which nothing else steps or loads.
                driver = task.optimizer(self.model)
        # The learning rate of iteration t, rebuilt from the iteration count by every worker.
        self.schedule = Schedule(
            task, driver, iterations_per_epoch=self.sampler.iterations_per_epoch
        )
        # Clipping by global norm: the task's, unless the run overrides it.
        override = check_clip_grad_norm(payload.options.get("clip_grad_norm"))
        self.clip_norm = clip_grad_norm(task) if override is None else override
        self._grad_norm: float | None = None
        # How the slice is computed: the forward pass's precision, and the micro-batch size,
        # fixed for the invocation from what every attempt of this rank sees identically: the
        # generation's memory, not this attempt's (a rank re-invoked with more memory after
        # running out of it twice keeps its M, so it sums as the attempts before it did).
        self.precision = check_precision(payload.options.get("precision"))
        profile = reader.manifest.memory_profile
        self.micro_batch = plan_micro_batch(
            requested=check_micro_batch(payload.options.get("micro_batch")),
            slice_samples=-(-self.sampler.batch_size // n),
            memory_mb=int(payload.options.get("generation_memory_mb", payload.memory_mb)),
            workers=n,
            profile=None if profile is None else MemoryProfile.from_dict(profile, "manifest"),
            # The reader's own buffers, the slice as read, and the copy rows() assembles it in.
            data_bytes=reader.resident_bytes
            + 2 * -(-self.sampler.batch_size // n) * reader.manifest.bytes_per_sample,
        )

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
        try:
            self._check_not_stale(p.start_iteration)
            self._load_state(p.start_iteration)
            init_s = time.monotonic() - began
            t, reason = self._loop()
            # The boundary checkpoint, also when this invocation ran no iteration: a replacement
            # for a rank that died writing it starts at the boundary and must finish it.
            if self.checkpoints is not None and t > 0 and t != self._ckpt_written:
                self._write_checkpoint(t, t - 1)
        finally:
            with suppress(ObjectStoreError):  # a closed reader: nothing downloads anyway
                self.reader.prefetch([])  # nothing downloads while a warm worker waits or freezes
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

    def _loop(self) -> tuple[int, str]:
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
            self._fire("start", t)
            began = time.monotonic()
            self._iteration(t)
            slowest_s = max(slowest_s * 0.9, time.monotonic() - began)
            t += 1
        reason = StopReason.FINISHED if t == p.total_iterations else StopReason.STOP_ITERATION
        return t, reason

    def _iteration(self, t: int) -> None:
        p = self.payload
        started = time.monotonic()
        self._timing = timing = _Timing()
        if (t - p.start_iteration) % PLAN_EVERY == 0:
            self._plan_reads(t)  # the data phase's work, timed with it
        indices, global_batch = self.sampler.worker_indices(t, p.rank, p.workers)
        batch = self.reader.rows(indices)
        if self._transforms and len(indices):  # no samples this iteration: nothing to transform
            epoch = self.sampler.epoch_of(t)
            batch = run_transform(self.task, batch, epoch, SampleRandom(p.seed, epoch, indices))
        timing.data_s = time.monotonic() - started

        grad, side, loss_value = self._compute(t, indices, batch, global_batch)
        lr = self.schedule.lr(t)  # the schedule advanced to t here, not in the update's time

        self._grad_norm = None
        if self.sharded:
            self.exchange.step(t, grad, out=self.flat.values_numpy(), side=side)
            if self.exchange.adopted:
                self._load_optimizer_state(t + 1)
            self._load_buffers(self.exchange.gathered_sides, t + 1)
            self._grad_norm = self._published_norm(self.exchange.gathered_sides, t + 1)
        else:
            self._replicated_step(t, grad, side)
        phases = self.exchange.last_phases
        every = int(p.options.get("checkpoint_every", 0))
        if self.checkpoints is not None and every > 0 and (t + 1) % every == 0:
            self._write_checkpoint(t + 1, t)
        iter_s = time.monotonic() - started

        fields: dict[str, float | int | str] = {
            "rank": p.rank,
            "gen": p.generation,
            "attempt": p.attempt,
            "t": t,
            "loss": loss_value,
            "lr": lr,
            "samples": len(indices),
            "batch": global_batch,
            "micro": self.micro_batch,
            "data_s": timing.data_s,
            "compute_s": timing.compute_s,
            "sync_s": phases.total_s,
            "iter_s": iter_s,
            "bytes_up": phases.bytes_up,
            "bytes_down": phases.bytes_down,
            **{k: v for k, v in phases.as_dict().items() if k.endswith("_s") and k != "total_s"},
        }
        if self._grad_norm is not None:
            fields["grad_norm"] = self._grad_norm
        deltas = self.reader.take_deltas(list(_READER_FIELDS))
        fields.update({field: deltas[name] for name, field in _READER_FIELDS.items()})
        fields["rss_mb"] = _peak_rss_mb()
        if self._cache_short_bytes:
            fields["cache_short_mb"] = self._cache_short_bytes / 2**20
        if self._snapshot_due(t):
            fields["snapshot"] = t + 1
        if self._ckpt_written == t + 1:
            fields["ckpt"] = t + 1
            fields["ckpt_shards"] = json.dumps(self._ckpt_shards)
        self._fire("before-report", t)
        pipe = self.store.client(0).pipeline(transaction=False)
        pipe.xadd(
            self.keys.progress(),
            cast(dict[Any, Any], fields),
            maxlen=PROGRESS_MAXLEN,
            approximate=True,
        )
        pipe.expire(self.keys.progress(), PROGRESS_TTL_S)
        pipe.execute()

    def _compute(
        self, t: int, indices: np.ndarray, batch: tuple[torch.Tensor, ...], global_batch: int
    ) -> tuple[np.ndarray, dict[str, Any], float]:
        """The loss and gradient of this rank's slice, in micro-batches of ``self.micro_batch``
        under ``self.precision`` (:mod:`smlt.worker.microbatch`); the vector to exchange and
        its side."""
        p = self.payload
        self._before = snapshot(self.flat)
        compute_started = time.monotonic()
        self.model.train()
        torch.manual_seed(iteration_seed(p.seed, t, p.rank))
        self.flat.zero_grad()
        loss_value = 0.0
        if len(indices):
            loss_value = accumulate(
                self.task,
                self.flat,
                batch,
                micro_batch=self.micro_batch,
                reduction=self.reduction,
                precision=self.precision,
                before=self._before,
                where=f"iteration {t} on rank {p.rank}",
            )
        # The user's forward and backward end here; flattening the gradient is smlt's work.
        self._timing.compute_s = time.monotonic() - compute_started
        weight = len(indices) / global_batch
        scale = p.workers * (1.0 if self.reduction == "sum" else weight)
        grad = self.flat.gradient(scale)
        side = contribute(self.flat, self._before, weight, p.workers)
        return grad, side, loss_value

    # -- sharded: this rank owns shard r -------------------------------------------------------

    def _owner_update(self, t: int, shard: int, mean: np.ndarray, sides: Any) -> ShardUpdate:
        """Step t's new shard: the optimizer on its parameters, the combined buffers."""
        assert self.shard_optimizer is not None and self._before is not None
        combined = combine(sides, self.flat)
        out = self.shard_optimizer.values_numpy()
        lo, hi = self.slice.start, self.slice.stop
        apply_buffers(out, mean, lo, self.flat, combined, self._before)
        norms = piece_norms(mean, lo, norm_pieces(self.flat, lo, hi, combined.has_grad))
        if self.clip_norm is not None:
            everyone = self.exchange.share_norms(t, norms)
            clip_(mean, lo, self.flat, total_norm(everyone), self.clip_norm)
        self.shard_optimizer.set_hyperparameters(self.schedule.hyperparameters(t))
        self.shard_optimizer.step(mean, combined.has_grad)
        buffers = self.flat.discrete_state_of(new_discrete(self._before, combined))
        side = model_side(buffers, grad_norms=norms)
        with self.exchange.cpu_work():  # smlt's encoding, not the optimizer's time
            frame = optim_frame(self.keys, t + 1, shard, self.shard_optimizer.state())
            extra = [(self.keys.optim(t + 1, shard), frame), *self._snapshot_extra(t, out, side)]
        return ShardUpdate(out, extra=extra, side=side)

    def _load_optimizer_state(self, version: int) -> None:
        """Our optimizer-state shard of ``version`` from the store (adopting a published step,
        or starting an invocation)."""
        assert self.shard_optimizer is not None
        self.shard_optimizer.sync_from_flat()
        state = self._read_state(version, self.payload.rank)
        self.shard_optimizer.load_state(state)

    # -- replicated: every rank steps the whole optimizer --------------------------------------

    def _replicated_step(self, t: int, grad: np.ndarray, side: dict[str, Any]) -> None:
        assert self.optimizer is not None and self._before is not None
        if self.exchange.published_shard(t + 1) is not None:
            # Some invocation of this rank finished this step: every owner had reduced, so
            # nobody needs our gradient; take the published version instead of recomputing it
            # (announcing our shard again: its writer may have died before it could).
            self.exchange.reannounce(t + 1)
            self._load_state(t + 1)
            self._grad_norm = self._published_norm(self.exchange.gathered_sides, t + 1)
            return
        mean = self.exchange.allreduce(t, grad, out=self._mean, side=side)
        began = time.monotonic()
        combined = Combined.from_side(self.exchange.combined_side, self.flat)
        values = self.flat.values_numpy()
        base = self.flat.num_params
        apply_buffers(values[base:], mean[base:], base, self.flat, combined, self._before)
        # Every worker has the whole mean: the parameters' norms, whole, as clip_grad_norm_.
        pieces = norm_pieces(self.flat, 0, self.flat.size, combined.has_grad, whole=True)
        norms = piece_norms(mean, 0, pieces)
        total = total_norm([norms])
        self._grad_norm = float(total)
        if self.clip_norm is not None:
            clip_(mean, 0, self.flat, total, self.clip_norm)
        self.flat.load_gradient(mean, combined.has_grad)
        apply_hyperparameters(self.optimizer, self.schedule.hyperparameters(t))
        self.optimizer.step()
        self.flat.zero_grad()
        discrete = new_discrete(self._before, combined)
        for i, raw in enumerate(discrete):
            self.flat.set_discrete(i, raw)
        r = self.payload.rank
        params = values[self.slice].copy()
        # The norms of the parameters that start in our shard: the shards' lists, concatenated,
        # are the whole list, for a worker that adopts this step to report the same norm.
        mine = [i for i, (a, _b) in enumerate(pieces) if self.slice.start <= a < self.slice.stop]
        model = model_side(self.flat.discrete_state(), grad_norms=norms[mine])
        update_s = time.monotonic() - began
        with self.exchange.cpu_work():  # smlt's encoding, not the optimizer's time
            extra = [(self.keys.optim(t + 1, r), self._replicated_frame(t + 1))]
            extra += self._snapshot_extra(t, params, model)
        self.exchange.publish(
            t + 1, ShardUpdate(params, extra=extra, side=model), update_s=update_s
        )

    def _replicated_frame(self, version: int) -> bytes:
        """Our slice of the whole optimizer state's bytes, as an optimizer-state frame."""
        assert self.optimizer is not None
        blob = encode_optimizer_state(self.optimizer)
        whole = ShardState(0, self.flat.size, blob=blob, blob_total=len(blob))
        part = whole.split(self.flat.size, self.payload.workers)[self.payload.rank]
        return optim_frame(self.keys, version, self.payload.rank, part)

    # -- loading a version ---------------------------------------------------------------------

    def _load_state(self, version: int) -> None:
        """Parameters, buffers and optimizer state of ``version`` from the store."""
        self.exchange.gather(version, out=self.flat.values_numpy())
        self._load_buffers(self.exchange.gathered_sides, version)
        if self.sharded:
            self._load_optimizer_state(version)
            return
        assert self.optimizer is not None
        parts = [self._read_state(version, s) for s in range(self.payload.workers)]
        whole = ShardState.concatenate(parts)
        if whole.blob_total:
            where = f"optimizer state of version {version}"
            self.optimizer.load_state_dict(decode_optimizer_state(whole.blob, where))

    def _check_not_stale(self, version: int) -> None:
        """Fail at once if our shard of the start version is gone (it is deleted two steps
        after its successor exists): this invocation arrived long after its peers moved on."""
        r = self.payload.rank
        key = self.keys.param(version, r)
        if not self.store.client(r).exists(key):
            raise StaleVersionError(
                f"rank {r} was invoked to start at iteration {version}, but version {version} is "
                f"no longer in the store ({key}): a late duplicate or retry; its peers have "
                "moved on without it"
            )

    def _read_state(self, version: int, shard: int) -> ShardState:
        state = read_optim_state(self.store, self.keys, version, shard)
        if state is None:
            raise CodecError(
                f"{self.keys.optim(version, shard)}: the optimizer state of version {version} is "
                "not in the store (expired, or deleted by a run that reused this job and session)"
            )
        return state

    def _published_norm(self, sides: dict[int, Any], version: int) -> float | None:
        """The global gradient norm of the step that published ``version``, from the norms its
        shards carry (None for a version no step published)."""
        parts = []
        for shard in sorted(sides):
            norms = side_grad_norms(sides[shard], self.keys.param(version, shard))
            if norms is None:
                return None
            parts.append(norms)
        return float(total_norm(parts))

    def _load_buffers(self, sides: dict[int, Any], version: int) -> None:
        """The non-float buffers of ``version`` (every parameter frame carries them)."""
        shard = min(sides)
        self.flat.load_discrete(side_buffers(sides[shard], self.keys.param(version, shard)))

    # -- evaluation snapshots, checkpoints, faults ---------------------------------------------

    def _snapshot_due(self, t: int) -> bool:
        last = t + 1 == self.payload.total_iterations
        return self._evaluates and (self.sampler.is_epoch_end(t) or last)

    def _snapshot_extra(self, t: int, params: np.ndarray, side: Any) -> list[tuple[str, bytes]]:
        """A copy of the new shard for the evaluator, at the end of an epoch: it outlives the
        version's own keys (deleted one step later), and the evaluator deletes it."""
        if not self._snapshot_due(t):
            return []
        r = self.payload.rank
        header = codec.FrameHeader("param", self.keys.job, t + 1, r)
        return [(self.keys.snapshot(t + 1, r), codec.encode(header, params, side))]

    def _write_checkpoint(self, version: int, t: int) -> None:
        """This owner's shard of ``version`` (parameters and optimizer state) to the object
        store; the scheduler commits the checkpoint once every shard is there."""
        assert self.checkpoints is not None
        began = time.monotonic()
        r, job = self.payload.rank, self.keys.job
        params = codec.encode(
            codec.FrameHeader("param", job, version, r),
            self.flat.values_numpy()[self.slice],
            model_side(self.flat.discrete_state()),
        )
        if self.shard_optimizer is not None:
            optim = optim_frame(self.keys, version, r, self.shard_optimizer.state())
        else:
            optim = self._replicated_frame(version)
        first = self.checkpoints.write_shard(version, r, "param", params)
        self._fire("during-checkpoint", t)
        second = self.checkpoints.write_shard(version, r, "optim", optim)
        # What the scheduler commits: it trusts these hashes rather than downloading the
        # checkpoint again, and every read of a shard checks them.
        self._ckpt_shards = {rec.kind: [rec.size_bytes, rec.sha256] for rec in (first, second)}
        self._ckpt_written = version
        self._ckpt_s = time.monotonic() - began

    def _fire(self, phase: str, t: int) -> None:
        """Fault injection at ``phase`` of iteration ``t`` (SMLT_FAULTS)."""
        with self._faults_lock:
            self._faults.maybe_fire(t, phase)

    def _record_fault(self, fault: Fault, t: int, phase: str) -> None:
        """Just before an injected fault acts: when it happened, for the scheduler to measure
        how long it took to notice."""
        p = self.payload
        event = fault_event(fault, t, phase, generation=p.generation, attempt=p.attempt)
        self.store.client(0).xadd(self.keys.progress(), cast(dict[Any, Any], event))

    def _plan_reads(self, t: int) -> None:
        """Tell the reader the shards of the next :data:`PLAN_ITERATIONS` iterations, and make
        its disk budget hold twice the shards of the next :data:`PLAN_EVERY` (what this rank
        reads at once, and as much again fetched ahead): a smaller budget would evict shards
        still being read and download them again every iteration."""
        p = self.payload
        stop = min(p.end_iteration, t + PLAN_ITERATIONS)
        soon = self.sampler.worker_shards(t, min(stop, t + PLAN_EVERY), p.rank, p.workers)
        shards = self.reader.manifest.shards
        wanted = 2 * sum(shards[s].num_bytes for s in soon)
        got = self.reader.reserve(wanted)
        self._cache_short_bytes = max(self._cache_short_bytes, wanted - got)
        self.reader.prefetch(self.sampler.worker_shards(t, stop, p.rank, p.workers))


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` (``ru_maxrss`` would include what
    the process that started us had at ``execve``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
