"""The task scheduler (paper component 1c): runs a job as generations of stateless workers.

A plain class with a small state machine (``pending -> running -> finished | failed``), run
inside a threaded Ray actor so that :meth:`TaskScheduler.status` answers while
:meth:`TaskScheduler.run` works. ``run`` drives one trio loop:

- **generations**: n invocations of fixed memory start together from one iteration and stop
  together at an agreed boundary (:mod:`smlt.protocol.control`): the job's end, a function about
  to hit its time limit, or the resource manager re-scaling. At each boundary the checkpoint is
  committed, what the generation left in Redis that nobody will read is deleted, and, if the
  worker count changes, parameters and optimizer state are re-sharded;
- **failures**: a worker that raises, dies, or stops its heartbeat is re-invoked for the same
  rank at the iteration it had not finished; it resumes from the parameters and its optimizer
  shard in the store while its peers wait (bounded by their shard timeout). Whether to re-invoke
  is :class:`~smlt.actors.failures.FailurePolicy`'s decision: a budget of attempts, causes and
  time that starts afresh whenever the rank makes progress. A failure the budget does not cover
  ends the run with a TrainingError naming rank and cause;
- **duplicates**: a ``duplicate`` fault (:mod:`smlt.protocol.faults`) delivers one invocation
  twice at once, as at-least-once platforms do; the rank succeeds if either copy does, and both
  are billed;
- **progress**: a follower folds the workers' reports into the history
  (:class:`~smlt.actors.progress.ProgressLog`); when every rank has written its shards of a
  checkpoint it hands the checkpoint to the :class:`~smlt.actors.committer.Committer`, a task
  of its own, so that following never waits on the object store.

Decisions (how many workers, how much memory, when to re-scale) come from the resource
manager; the scheduler only executes them.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import redis
import trio

from smlt.actors.committer import Committer
from smlt.actors.evaluator import Evaluator
from smlt.actors.failures import FailurePolicy, RetryPolicy
from smlt.actors.progress import CheckpointReady, EvaluationDue, ProgressLog
from smlt.actors.resource_manager import Config, GenerationOutcome, ResourceManager
from smlt.backends.base import Backend, Invocation
from smlt.errors import (
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    SmltError,
    StoreUnavailableError,
    TaskError,
    TrainingError,
)
from smlt.optimizer.cost import CostBreakdown, CostModel
from smlt.protocol.control import request_stop, schedule_stop
from smlt.protocol.faults import parse_faults
from smlt.protocol.payload import WorkerPayload, WorkerReport
from smlt.protocol.state import reshard_store
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import open_object_store
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore

__all__ = [
    "DEFAULT_EVAL_TIMEOUT_S",
    "DEFAULT_WORKER_TIMEOUT_S",
    "JobSpec",
    "RetryPolicy",
    "TaskScheduler",
    "generation_leftovers",
]

#: Upper bound on one invocation when the backend has no time limit of its own (Ray).
DEFAULT_WORKER_TIMEOUT_S = 24 * 3600.0
_PROGRESS_BLOCK_MS = 500
#: Longest one evaluate() may take before evaluation is given up (the run is not).
DEFAULT_EVAL_TIMEOUT_S = float(os.environ.get("SMLT_EVAL_TIMEOUT_S", "3600"))
# How long the scheduler waits for the follower to read what is already in the stream.
_CATCH_UP_S = 5.0
_UNLINK_BATCH = 1000


@dataclass(frozen=True)
class JobSpec:
    """Everything the scheduler needs to run a job (no credentials are logged from it)."""

    job_id: str
    redis_urls: tuple[str, ...]
    object_store_url: str
    batch_size: int
    total_iterations: int
    iterations_per_epoch: int
    num_params: int
    seed: int = 0
    session: str = ""
    start_iteration: int = 0
    shard_timeout_s: float = 120.0
    function_timeout_s: float | None = None
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S
    checkpoint_every: int = 0
    #: Committed checkpoints kept in the object store; older ones are pruned after each commit.
    keep_checkpoints: int = 2
    eval_timeout_s: float = DEFAULT_EVAL_TIMEOUT_S
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 15.0
    startup_timeout_s: float = 120.0
    faults: str = ""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    history: tuple[dict[str, Any], ...] = ()
    epochs: tuple[dict[str, Any], ...] = ()
    #: How every worker trains (``clip_grad_norm``, ``micro_batch``, ``precision``): passed to
    #: each invocation's options as they are.
    training: Mapping[str, Any] = field(default_factory=dict)
    #: The parameter store's host, billed for the job's wall time (0: not billed to the run).
    store_usd_per_hour: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError(
                f"keep_checkpoints must be >= 1 (the latest checkpoint is the restart point), "
                f"got {self.keep_checkpoints}"
            )


def generation_leftovers(
    keys: JobKeys,
    generation: int,
    start: int,
    stop: int,
    workers: int,
    attempts: Mapping[int, int],
) -> list[str]:
    """The keys generation ``generation`` (iterations ``[start, stop)`` on ``workers`` ranks,
    rank r up to attempt ``attempts[r]``) leaves in Redis that nobody will read again.

    Workers delete what step t-1 wrote once step t is published (a replacement for a worker
    that died in step t still needs step t's inputs), so the last step's keys outlive the
    generation: the gradient slices and announcements of ``stop - 1``, the parameter and
    optimizer shards of version ``stop - 1`` (version ``stop`` is what the next generation, or
    the driver, reads), and the generation's stop hash and heartbeats. Every shard and rank of
    *this* generation is listed, so after a re-scale to fewer workers nothing of the dropped
    ranks remains.
    """
    found = [keys.stop(generation)]
    for rank in range(workers):
        found += [keys.heartbeat(generation, rank, a) for a in range(attempts.get(rank, 0) + 1)]
    if stop > start:
        last = stop - 1
        found += [keys.param_ready(last), keys.mean_grad_ready(last), keys.grad_norm_ready(last)]
        for s in range(workers):
            found += [keys.param(last, s), keys.optim(last, s), keys.mean_grad(last, s)]
            found += [keys.grad_ready(last, s), keys.grad_norm(last, s)]
            found += [keys.grad(last, s, r) for r in range(workers)]
    return found


@dataclass(frozen=True)
class _Failed:
    """How one delivery of an invocation failed, and when the scheduler noticed."""

    error: SmltError
    detected_s: float  # monotonic
    detected_unix_s: float  # wall clock, to compare with the worker's fault events
    hung: bool


class TaskScheduler:
    """Runs one job on one backend. Thread-safe ``status()``; ``run()`` once."""

    def __init__(self, backend: Backend, spec: JobSpec, manager: ResourceManager) -> None:
        self.backend = backend
        self.spec = spec
        self.manager = manager
        self.config = manager.initial(spec.start_iteration)
        self.keys = JobKeys(spec.job_id, spec.session)
        self.store = ParameterStore.from_urls(list(spec.redis_urls))
        self.log = ProgressLog(
            spec.iterations_per_epoch, history=list(spec.history), epochs=list(spec.epochs)
        )
        self.committer = Committer(
            CheckpointStore(open_object_store(spec.object_store_url), spec.job_id),
            spec.num_params,
            keep=spec.keep_checkpoints,
            meta_before=self._meta_before,
            on_failure=self._record_failure,
        )
        self._lock = threading.Lock()
        self._state = "pending"
        self._error: str | None = None
        # (rank, copy) -> (invocation, invoked at, attempt); copy 1 only for a duplicate.
        self._running: dict[tuple[int, int], tuple[Invocation, float, int]] = {}
        # (gen, rank, attempt) -> when its heartbeat was found expired (monotonic, wall clock)
        self._hung: dict[tuple[int, int, int], tuple[float, float]] = {}
        self._billed: list[tuple[int, float]] = []  # (memory_mb, billed_s) per ended invocation
        self._costs = CostModel(
            functions=backend.pricing, store_usd_per_hour=spec.store_usd_per_hour
        )
        self._trials_usd = 0.0  # what generations the manager ran as trials were billed
        self._out_of_memory: set[int] = set()  # generations in which a worker ran out of memory
        self._generations: list[dict[str, Any]] = []
        self._configs: list[dict[str, Any]] = [self.config.to_dict()]
        self._failures: list[dict[str, Any]] = []
        self._generation = 0
        self._beaten: set[tuple[int, int, int]] = set()  # (gen, rank, attempt) seen beating
        self._followed_id: bytes = b"0-0"  # the last progress entry folded into the log
        self._duplicates = [f for f in parse_faults(spec.faults) if f.action == "duplicate"]
        self._commits: trio.MemorySendChannel[CheckpointReady] | None = None
        self.evaluator = Evaluator(
            spec.object_store_url,
            spec.job_id,
            self.store,
            self.keys,
            spec.num_params,
            seed=spec.seed,
        )
        self._evaluations: trio.MemorySendChannel[EvaluationDue] | None = None
        self._evaluation_error: str | None = None

    # -- what the driver sees ------------------------------------------------------------------

    def status(self, history_from: int | None = None) -> dict[str, Any]:
        """A snapshot for progress displays; cheap, callable while ``run`` works. With
        ``history_from``, ``history`` holds the entries of iterations from there on: a driver
        polling twice a second hands every iteration to its callbacks, however many passed
        between two polls."""
        snap = self.log.snapshot(history_from)
        committed = self.committer.committed()
        with self._lock:
            return {
                **snap,
                "state": self._state,
                "elapsed_s": time.monotonic() - self.log.started,
                "total_iterations": self.spec.total_iterations,
                "iterations_per_epoch": self.spec.iterations_per_epoch,
                "generation": self._generation,
                "workers": self.config.workers,
                "memory_mb": self.config.memory_mb,
                "cost_usd": self._cost(include_running=True),
                "billed_worker_s": sum(s for _m, s in self._billed)
                + sum(inv.billed_s for inv, _t0, _a in self._running.values()),
                "failures": len(self._failures),
                "last_checkpoint": max(committed) if committed else None,
                "error": self._error,
            }

    def _breakdown(self) -> CostBreakdown:
        """What the ended invocations were billed, by part (the one price table of
        :mod:`smlt.optimizer.cost`); ``trials_usd`` is the share spent in the optimizer's
        trials. Caller holds ``self._lock``."""
        bill = self._costs.bill(list(self._billed), wall_s=time.monotonic() - self.log.started)
        return CostBreakdown(bill.workers_usd, bill.store_usd, bill.requests_usd, self._trials_usd)

    def _cost(self, *, include_running: bool) -> float:
        pricing = self.backend.pricing
        cost = self._breakdown().total_usd
        if include_running:
            cost += sum(
                pricing.cost_usd(inv.payload.memory_mb, inv.billed_s, requests=0)
                for inv, _t0, _a in self._running.values()
            )
        return cost

    def summary(self) -> dict[str, Any]:
        with self.log.lock, self._lock:
            return {
                "job_id": self.spec.job_id,
                "history": list(self.log.history),
                "epochs": list(self.log.epochs),
                "generations": list(self._generations),
                "configs": list(self._configs),
                "failures": [self._with_recovery(f) for f in self._failures],
                "checkpoints": self.committer.committed(),
                "cost_usd": self._cost(include_running=False),
                "cost": self._breakdown().to_dict(),
                "search": self.manager.report(),
                "billed_worker_s": sum(s for _m, s in self._billed),
                "invocations": len(self._billed),
                "pricing": self.backend.pricing.name,
            }

    def _with_recovery(self, failure: dict[str, Any]) -> dict[str, Any]:
        """``failure`` with ``recovery_s``: from the failure being seen to the replacement's
        first report (None if none came). Caller holds ``self.log.lock``."""
        if "rank" not in failure:  # a missed checkpoint, not a worker
            return dict(failure)
        if failure.get("duplicate"):  # its twin carried on: nothing was replaced
            return {**failure, "recovery_s": None}
        replacement = (failure["generation"], failure["rank"], failure["attempt"] + 1)
        first = self.log.first_report_of.get(replacement)
        detected = self.log.started + failure["detected_s"]
        return {**failure, "recovery_s": None if first is None else first - detected}

    # -- the run -------------------------------------------------------------------------------

    def run(self, clock: trio.abc.Clock | None = None) -> dict[str, Any]:
        """Run the job to its end; returns the summary (history, generations, cost, ...).

        ``clock`` is trio's (None: the real one). The ``sim`` backend runs the scheduler on
        ``trio.testing.MockClock(autojump_threshold=0)``, where its workers' modelled time
        passes as fast as the bookkeeping allows; the summary's own ``wall_s`` and
        ``elapsed_s`` stay on the real monotonic clock."""
        try:
            try:
                trio.run(self._run, clock=clock)
            except BaseExceptionGroup as group:
                # Nurseries wrap errors in groups; the caller wants the one that ended the run.
                raise _primary_error(group) from None
            except redis.RedisError as exc:
                raise StoreUnavailableError(f"lost the parameter store: {exc}") from exc
        except BaseException as exc:
            with self._lock:
                self._state = "failed"
                self._error = str(exc)
            raise
        with self._lock:
            self._state = "finished"
        return self.summary()

    async def _run(self) -> None:
        with self._lock:
            self._state = "running"
        start = self.spec.start_iteration
        try:
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel[CheckpointReady](math.inf)
                nursery.start_soon(self.committer.run, receive)
                due, evaluations = trio.open_memory_channel[EvaluationDue](math.inf)
                nursery.start_soon(self._evaluate, evaluations)
                # Both closed once nothing more can come: the committer and the evaluator
                # then finish what they were given.
                async with send, due:
                    self._commits, self._evaluations = send, due
                    async with trio.open_nursery() as following:
                        done = trio.Event()
                        following.start_soon(self._follow_progress, done)
                        while start < self.spec.total_iterations:
                            start = await self._next_generation(start)
                        done.set()
        finally:
            await self.backend.clean()
            self.evaluator.close()

    async def _next_generation(self, start: int) -> int:
        """Run one generation from ``start`` and apply the manager's next decision; returns
        where the next generation starts."""
        stop, why = await self._run_generation(self._generation, start, self.config)
        nxt = self.manager.after_generation(stop, why)
        if stop < self.spec.total_iterations and nxt.workers != self.config.workers:
            await trio.to_thread.run_sync(
                functools.partial(
                    reshard_store,
                    self.store,
                    self.keys,
                    stop,
                    self.config.workers,
                    nxt.workers,
                    self.spec.num_params,
                )
            )
        if nxt != self.config and stop < self.spec.total_iterations:
            with self._lock:
                self.config = nxt
                self._configs.append(nxt.to_dict())
        self._generation += 1
        return stop

    async def _run_generation(self, gen: int, start: int, cfg: Config) -> tuple[int, str]:
        began = time.monotonic()
        with self._lock:
            billed_before = len(self._billed)
        self.log.start_generation(gen, cfg.workers)
        planned = self.manager.planned_stop(start)
        if planned is not None and planned < self.spec.total_iterations:
            await trio.to_thread.run_sync(
                schedule_stop, self.store.client(0), self.keys, gen, planned
            )
        await self.backend.deploy(self.spec.job_id, cfg.workers, cfg.memory_mb)
        reports: dict[int, WorkerReport] = {}
        attempts: dict[int, int] = {}  # rank -> its last attempt in this generation
        requested = trio.Event()
        async with trio.open_nursery() as watchers:
            watchers.start_soon(self._watch_heartbeats, gen)
            watchers.start_soon(self._watch_rescale, gen, requested)
            async with trio.open_nursery() as ranks:
                for rank in range(cfg.workers):
                    ranks.start_soon(self._run_rank, gen, rank, start, cfg, reports, attempts)
            watchers.cancel_scope.cancel()
        stops = {r.next_iteration for r in reports.values()}
        if len(stops) != 1:
            raise TrainingError(
                f"generation {gen}: workers stopped at different iterations {stops}"
            )
        stop = stops.pop()
        if stop >= self.spec.total_iterations:
            why = "finished"
        elif requested.is_set() or stop == planned:
            why = "re-scaling"
        else:
            why = "function time limit"
        await self._caught_up()  # the history holds the whole generation before it is saved
        outcome = self._measure(gen, start, stop, cfg, time.monotonic() - began, billed_before)
        # Before the boundary's checkpoint is queued: its metadata carries the trial.
        if self.manager.record(outcome) is not None:
            with self._lock:
                self._trials_usd += outcome.cost_usd
        self._commit_boundary(gen, start, stop, cfg.workers, reports)
        await trio.to_thread.run_sync(
            self._drop_generation_keys, gen, start, stop, cfg.workers, attempts
        )
        with self._lock:
            self._generations.append(
                {
                    "generation": gen,
                    "start_iteration": start,
                    "stop_iteration": stop,
                    "workers": cfg.workers,
                    "memory_mb": cfg.memory_mb,
                    "wall_s": outcome.wall_s,
                    "s_per_iteration": outcome.s_per_iteration,
                    "cost_usd": outcome.cost_usd,
                    "ended_because": why,
                }
            )
        return stop, why

    def _measure(
        self, gen: int, start: int, stop: int, cfg: Config, wall_s: float, billed_before: int
    ) -> GenerationOutcome:
        """What generation ``gen`` did, for the resource manager: its steady-state time per
        iteration (from when the follower recorded each iteration, the first one left out: it
        carries the start-up) and what its invocations were billed."""
        with self.log.lock:
            stamps = [
                float(h["wall_s"]) for h in self.log.history if start <= h["iteration"] < stop
            ]
            iter_s = [
                float(h["iter_s"]) for h in self.log.history if start <= h["iteration"] < stop
            ]
        s_per_iteration: float | None = None
        if len(stamps) >= 2 and stamps[-1] > stamps[0]:
            s_per_iteration = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        elif iter_s:  # one iteration: its own time is all there is
            s_per_iteration = max(iter_s)
        pricing = self.backend.pricing
        with self._lock:
            cost_usd = sum(pricing.cost_usd(m, s) for m, s in self._billed[billed_before:])
        return GenerationOutcome(
            start_iteration=start,
            stop_iteration=stop,
            workers=cfg.workers,
            memory_mb=cfg.memory_mb,
            wall_s=wall_s,
            cost_usd=cost_usd,
            s_per_iteration=s_per_iteration if s_per_iteration and s_per_iteration > 0 else None,
            out_of_memory=gen in self._out_of_memory,
        )

    def _meta_before(self, iteration: int) -> dict[str, Any]:
        """What checkpoint ``iteration`` carries: the history and epochs before it, and the
        optimizer's trials that ended by then (a resumed run goes on with them)."""
        meta: dict[str, Any] = dict(self.log.meta_before(iteration))
        if self.manager.goal is not None:
            meta["trials"] = self.manager.trials_before(iteration)
        return meta

    def _payload(self, gen: int, rank: int, start: int, attempt: int, cfg: Config) -> WorkerPayload:
        s = self.spec
        return WorkerPayload(
            job_id=s.job_id,
            rank=rank,
            workers=cfg.workers,
            memory_mb=cfg.memory_mb,
            redis_urls=s.redis_urls,
            object_store_url=s.object_store_url,
            batch_size=s.batch_size,
            total_iterations=s.total_iterations,
            start_iteration=start,
            generation=gen,
            seed=s.seed,
            attempt=attempt,
            session=s.session,
            shard_timeout_s=s.shard_timeout_s,
            function_timeout_s=s.function_timeout_s,
            options={
                **s.training,
                "faults": s.faults,
                "checkpoint_every": s.checkpoint_every,
                "heartbeat_interval_s": s.heartbeat_interval_s,
                "heartbeat_timeout_s": s.heartbeat_timeout_s,
                # What workers size their micro-batches by: the generation's memory, also for
                # a rank re-invoked with more (the same M on every attempt keeps a re-executed
                # iteration's bytes).
                "generation_memory_mb": cfg.memory_mb,
            },
        )

    def _drop_generation_keys(
        self, gen: int, start: int, stop: int, workers: int, attempts: Mapping[int, int]
    ) -> None:
        leftovers = generation_leftovers(self.keys, gen, start, stop, workers, attempts)
        # Every instance: which one holds a key is the sync layer's business, and unlinking a
        # key an instance does not have costs nothing.
        for instance in range(self.store.instances):
            for i in range(0, len(leftovers), _UNLINK_BATCH):
                self.store.unlink(instance, leftovers[i : i + _UNLINK_BATCH])

    # -- one rank, with re-invocation ----------------------------------------------------------

    async def _run_rank(
        self,
        gen: int,
        rank: int,
        start: int,
        cfg: Config,
        reports: dict[int, WorkerReport],
        attempts: dict[int, int],
    ) -> None:
        policy = FailurePolicy(self.spec.retry)
        attempt, resume = 0, start
        memory_mb = cfg.memory_mb  # more after a repeated out-of-memory (FailurePolicy)
        while True:
            attempts[rank] = attempt
            payload = replace(self._payload(gen, rank, resume, attempt, cfg), memory_mb=memory_mb)
            outcome = await self._deliver(payload, copies=2 if self._duplicate(payload) else 1)
            if isinstance(outcome, WorkerReport):
                reports[rank] = outcome
                return
            exc = outcome.error
            if isinstance(exc, OutOfMemoryError):
                with self._lock:
                    self._out_of_memory.add(gen)  # the memory model learns from it either way
            if not await trio.to_thread.run_sync(self._store_alive):
                # Re-invoking cannot help: everything a worker resumes from is gone.
                await self._cancel_all()
                raise StoreUnavailableError(
                    f"worker {rank} failed and the parameter store is unreachable: {exc}"
                ) from exc
            resume = max(start, await self._rank_position(rank))
            record = self._failure_record(payload, outcome, resume)
            oom = (memory_mb, self.manager.limits.max_memory_mb)
            decision = policy.decide(
                resume,
                record["cause"],
                outcome.detected_s,
                out_of_memory_at=oom if isinstance(exc, OutOfMemoryError) else None,
            )
            if decision.memory_mb is not None:
                memory_mb = record["retry_memory_mb"] = decision.memory_mb
            record["budget_failures"] = decision.failures
            self._record_failure(record)
            if not decision.retry:
                await self._cancel_all()
                hint = ""
                if isinstance(exc, FunctionTimeoutError) and resume == start:
                    # Every replacement is another cold start: a limit it cannot outlast.
                    hint = (
                        f"; no attempt finished an iteration within the function time limit of "
                        f"{self.spec.function_timeout_s:g} s: it is shorter than a worker's "
                        "start-up and one iteration, raise --function-timeout"
                    )
                raise TrainingError(
                    f"worker {rank} {decision.why} at iteration {resume} (generation {gen}); "
                    f"last cause: {record['cause']}{hint}"
                ) from exc
            attempt += 1
            await trio.sleep(decision.delay_s)

    def _failure_record(
        self, payload: WorkerPayload, failed: _Failed, iteration: int | None
    ) -> dict[str, Any]:
        """What ``summary()["failures"]`` says about one failure; with the injected fault's
        time and the measured detection time when the worker announced the fault."""
        rank, gen, attempt = payload.rank, payload.generation, payload.attempt
        exc = failed.error
        cause = (
            "heartbeat timeout (worker stopped responding)"
            if failed.hung
            else f"{type(exc).__name__}: {exc}"
        )
        record: dict[str, Any] = {
            "rank": rank,
            "generation": gen,
            "iteration": iteration,
            "attempt": attempt,
            "cause": cause,
            "detected_s": failed.detected_s - self.log.started,
        }
        fault = self.log.take_fault(rank, gen, attempt, payload.start_iteration)
        if fault is not None:
            record["fault"] = f"{fault.action} at iteration {fault.iteration} ({fault.phase})"
            record["fault_at_s"] = fault.at_unix_s - self.log.started_unix_s
            record["detection_s"] = failed.detected_unix_s - fault.at_unix_s
        return record

    def _duplicate(self, payload: WorkerPayload) -> bool:
        """True (once per scheduled ``duplicate``) if ``payload`` is to be delivered twice: the
        first invocation of the fault's rank whose range of iterations holds its iteration."""
        for fault in self._duplicates:
            if (
                fault.rank == payload.rank
                and payload.start_iteration <= fault.iteration < payload.end_iteration
            ):
                self._duplicates.remove(fault)
                return True
        return False

    async def _deliver(self, payload: WorkerPayload, copies: int) -> WorkerReport | _Failed:
        """Invoke ``payload`` ``copies`` times at once. The report of the first copy that
        succeeds (the others are then stopped: a late twin can only repeat what is published,
        or wait for versions already deleted), else how the first one failed (noticed when the
        last one did)."""
        outcomes: list[WorkerReport | _Failed] = []
        invocations: list[Invocation] = []
        async with trio.open_nursery() as nursery:
            for copy in range(copies):
                invocation = await self.backend.invoke(payload)
                invocations.append(invocation)
                with self._lock:
                    self._running[(payload.rank, copy)] = (
                        invocation,
                        time.monotonic(),
                        payload.attempt,
                    )
                nursery.start_soon(
                    self._await_copy, copy, invocation, outcomes, nursery.cancel_scope
                )
        if len(invocations) > 1 and any(isinstance(o, WorkerReport) for o in outcomes):
            with trio.CancelScope(shield=True):
                for invocation in invocations:
                    await invocation.cancel()  # a no-op for the copy that finished
        failed = [o for o in outcomes if isinstance(o, _Failed)]
        report = next((o for o in outcomes if isinstance(o, WorkerReport)), None)
        if report is not None:
            if failed:
                await self._caught_up()  # so that the fault event, if any, is in the log
            for copy_failed in failed:  # its twin succeeded: recorded, nothing to recover
                record = self._failure_record(payload, copy_failed, None)
                self._record_failure({**record, "duplicate": True})
            return report
        last = failed[-1]
        return _Failed(failed[0].error, last.detected_s, last.detected_unix_s, failed[0].hung)

    async def _await_copy(
        self,
        copy: int,
        invocation: Invocation,
        outcomes: list[WorkerReport | _Failed],
        copies: trio.CancelScope,
    ) -> None:
        p = invocation.payload
        timeout_s = self.spec.worker_timeout_s
        if self.spec.function_timeout_s is not None:
            timeout_s = min(timeout_s, self.spec.function_timeout_s + 30)
        try:
            outcomes.append(await invocation.result(timeout_s))
            copies.cancel()  # the rank is done: stop waiting for its twin
        except SmltError as exc:
            detected = time.monotonic(), time.time()
            hung = self._hung.get((p.generation, p.rank, p.attempt))
            await invocation.cancel()  # a hung process must not keep the slot
            detected_s, detected_unix_s = hung or detected
            outcomes.append(_Failed(exc, detected_s, detected_unix_s, hung is not None))
        finally:
            self._ended((p.rank, copy), invocation)

    async def _caught_up(self) -> None:
        """Wait (a few seconds at most) until the follower has folded every entry that is in
        the progress stream now."""
        client = self.store.client(0)
        newest = await trio.to_thread.run_sync(
            functools.partial(client.xrevrange, self.keys.progress(), count=1)
        )
        if newest:
            target = _stream_id(cast(bytes, newest[0][0]))
            with trio.move_on_after(_CATCH_UP_S):
                while _stream_id(self._followed_id) < target:
                    await trio.sleep(0.02)

    async def _rank_position(self, rank: int) -> int:
        """The iteration ``rank`` had not finished, once the follower has read every report
        already in the stream (a report it has not read yet would make us recompute)."""
        await self._caught_up()
        with self.log.lock:
            return self.log.rank_next.get(rank, 0)

    def _record_failure(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._failures.append(record)

    def _store_alive(self) -> bool:
        try:
            return all(bool(c.ping()) for c in self.store.all_clients())
        except redis.RedisError:
            return False

    def _ended(self, key: tuple[int, int], invocation: Invocation) -> None:
        with self._lock:
            self._running.pop(key, None)
            self._billed.append((invocation.payload.memory_mb, invocation.billed_s))

    async def _cancel_all(self) -> None:
        with self._lock:
            running = [inv for inv, _t0, _a in self._running.values()]
        with trio.CancelScope(shield=True):
            for inv in running:
                await inv.cancel()

    # -- watchers --------------------------------------------------------------------------------

    async def _watch_heartbeats(self, gen: int) -> None:
        """Cancel a rank whose heartbeat expired (or never came) so that it is re-invoked.

        Both copies of a duplicated invocation beat the same key: a hung copy is noticed once
        its twin has stopped beating too (at its end), and is then cancelled like any other."""
        client = self.store.client(0)
        spec = self.spec
        while True:
            await trio.sleep(spec.heartbeat_interval_s)
            with self._lock:
                running = dict(self._running)
            for (rank, _copy), (inv, invoked_at, attempt) in running.items():
                key = self.keys.heartbeat(gen, rank, attempt)
                alive = await trio.to_thread.run_sync(client.exists, key)
                seen = (gen, rank, attempt) in self._beaten
                if alive:
                    self._beaten.add((gen, rank, attempt))
                elif seen or time.monotonic() - invoked_at > spec.startup_timeout_s:
                    self._hung.setdefault((gen, rank, attempt), (time.monotonic(), time.time()))
                    await inv.cancel()

    async def _watch_rescale(self, gen: int, requested: trio.Event) -> None:
        """Ask the generation to stop when the resource manager wants a new configuration."""
        while True:
            await trio.sleep(0.2)
            with self.log.lock:
                done = min(self.log.rank_next.values(), default=0)
            if self.manager.wants_rescale(done):
                await trio.to_thread.run_sync(request_stop, self.store.client(0), self.keys, gen)
                requested.set()
                return

    # -- checkpoints ---------------------------------------------------------------------------

    def _commit_boundary(
        self, gen: int, start: int, stop: int, workers: int, reports: Mapping[int, WorkerReport]
    ) -> None:
        """Queue the checkpoint every rank wrote at the generation's end, or record that some
        rank did not (workers that write no checkpoints at all are left alone)."""
        written = {r: rep for r, rep in reports.items() if rep.checkpoint_iteration == stop}
        if stop == start or all(rep.checkpoint_iteration is None for rep in reports.values()):
            return
        if len(written) < workers:
            missing = sorted(set(range(workers)) - set(written))
            self._record_failure(
                {
                    "checkpoint": stop,
                    "generation": gen,
                    "cause": f"ranks {missing} wrote no shards of the boundary checkpoint",
                }
            )
            return
        shards = {r: rep.checkpoint_shards for r, rep in written.items()}
        assert self._commits is not None
        self._commits.send_nowait(CheckpointReady(stop, gen, workers, dict(shards)))

    # -- progress ------------------------------------------------------------------------------

    async def _follow_progress(self, done: trio.Event) -> None:
        client = self.store.client(0)
        stream = self.keys.progress()
        while True:
            finishing = done.is_set()
            # Blocks at most _PROGRESS_BLOCK_MS, so a cancelled run never waits long on it.
            reply = await trio.to_thread.run_sync(
                functools.partial(
                    client.xread,
                    {stream: self._followed_id},
                    block=_PROGRESS_BLOCK_MS,
                    count=1000,
                )
            )
            for _name, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    report = {k.decode(): v.decode() for k, v in fields.items()}
                    ready = await trio.to_thread.run_sync(self.log.fold, report)
                    self._followed_id = entry_id
                    if ready is not None:
                        assert self._commits is not None
                        self._commits.send_nowait(ready)  # never waits: the buffer is unbounded
                    for due in self.log.take_evaluations():
                        assert self._evaluations is not None
                        self._evaluations.send_nowait(due)
            if finishing and not reply:
                return

    # -- evaluation ----------------------------------------------------------------------------

    async def _evaluate(self, receive: trio.MemoryReceiveChannel[EvaluationDue]) -> None:
        """Score each epoch's snapshot, one at a time, while training goes on. An evaluate()
        that fails is reported once (in the failures, naming the epoch) and evaluation stops;
        training does not: the model is fine, only its report is missing."""
        async with receive:
            async for due in receive:
                iteration = due.entry["iteration"]
                try:
                    values, buffers = await trio.to_thread.run_sync(
                        self.evaluator.take, due.version, due.workers
                    )
                    if self._evaluation_error is not None:
                        self.log.add_epoch(due.entry)
                        continue
                    with trio.move_on_after(self.spec.eval_timeout_s) as bound:
                        metrics = await trio.to_thread.run_sync(
                            self.evaluator.evaluate, values, buffers, abandon_on_cancel=True
                        )
                    if bound.cancelled_caught:  # the thread is abandoned, not waited for
                        raise TaskError(
                            f"evaluate() took over {self.spec.eval_timeout_s:g} s "
                            "(SMLT_EVAL_TIMEOUT_S); evaluation stopped, training goes on"
                        )
                except SmltError as exc:
                    self._evaluation_error = str(exc)
                    self._record_failure({"evaluation": iteration, "cause": str(exc)})
                    self.log.add_epoch(due.entry)
                    continue
                self.log.add_epoch({**due.entry, **metrics})


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    """A Redis stream id ``b"<ms>-<seq>"`` as numbers: ids do not sort as strings."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _primary_error(group: BaseExceptionGroup) -> BaseException:
    """The first smlt error in a (nested) exception group, else its first leaf."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    primary = next((e for e in leaves if isinstance(e, SmltError)), leaves[0])
    if isinstance(primary, redis.RedisError):
        return StoreUnavailableError(f"lost the parameter store: {primary}")
    return primary
