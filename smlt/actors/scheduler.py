"""The task scheduler (paper component 1c): runs a job as generations of stateless workers.

A plain class with a small state machine (``pending -> running -> finished | failed``), run
inside a threaded Ray actor so that :meth:`TaskScheduler.status` answers while
:meth:`TaskScheduler.run` works. ``run`` drives one trio loop:

- **generations**: n invocations of fixed memory start together from one iteration and stop
  together at an agreed boundary (:mod:`smlt.protocol.control`): the job's end, a function about
  to hit its time limit, or the resource manager re-scaling. At each boundary the checkpoint is
  committed and, if the worker count changes, parameters and optimizer state are re-sharded;
- **failures**: a worker that raises, dies, or stops its heartbeat is re-invoked for the same
  rank at the iteration it had not finished; it resumes from the parameters and its optimizer
  shard in the store while its peers wait (bounded by their shard timeout). The same cause twice
  for one rank, or running out of attempts, ends the run with a TrainingError naming both;
- **progress**: a follower folds the workers' reports into the history
  (:class:`~smlt.actors.progress.ProgressLog`) and commits periodic checkpoints when every rank
  has written its shard.

Decisions (how many workers, how much memory, when to re-scale) come from the resource
manager; the scheduler only executes them.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import trio

from smlt.actors.progress import ProgressLog
from smlt.actors.resource_manager import Config, ResourceManager
from smlt.backends.base import Backend, Invocation
from smlt.errors import SmltError, StoreUnavailableError, TrainingError
from smlt.protocol.control import request_stop
from smlt.protocol.payload import WorkerPayload, WorkerReport
from smlt.protocol.state import reshard_store
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import open_object_store
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore

__all__ = ["DEFAULT_WORKER_TIMEOUT_S", "JobSpec", "RetryPolicy", "TaskScheduler"]

#: Upper bound on one invocation when the backend has no time limit of its own (Ray).
DEFAULT_WORKER_TIMEOUT_S = 24 * 3600.0
_PROGRESS_BLOCK_MS = 500


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed worker is re-invoked: at most ``max_attempts`` per rank and generation,
    after ``backoff_s`` x 2^k with +-``jitter`` (so n failed ranks do not all return at once),
    and never after ``deadline_s`` since the rank's first failure in the generation."""

    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    jitter: float = 0.5
    deadline_s: float = 600.0

    def delay_s(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return base * (1 + self.jitter * (2 * random.random() - 1))


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
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 15.0
    startup_timeout_s: float = 120.0
    faults: str = ""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    history: tuple[dict[str, Any], ...] = ()
    epochs: tuple[dict[str, Any], ...] = ()


class TaskScheduler:
    """Runs one job on one backend. Thread-safe ``status()``; ``run()`` once."""

    def __init__(self, backend: Backend, spec: JobSpec, manager: ResourceManager) -> None:
        self.backend = backend
        self.spec = spec
        self.manager = manager
        self.config = manager.initial(spec.start_iteration)
        self.keys = JobKeys(spec.job_id, spec.session)
        self.store = ParameterStore.from_urls(list(spec.redis_urls))
        self.checkpoints = CheckpointStore(open_object_store(spec.object_store_url), spec.job_id)
        self.log = ProgressLog(
            spec.iterations_per_epoch,
            history=list(spec.history),
            epochs=list(spec.epochs),
            on_checkpoint=self._commit_periodic,
        )
        self._lock = threading.Lock()
        self._state = "pending"
        self._error: str | None = None
        self._running: dict[int, tuple[Invocation, float, int]] = {}  # rank -> (inv, t0, attempt)
        self._hung: set[tuple[int, int, int]] = set()
        self._billed: list[tuple[int, float]] = []  # (memory_mb, billed_s) per ended invocation
        self._generations: list[dict[str, Any]] = []
        self._configs: list[dict[str, Any]] = [self.config.to_dict()]
        self._failures: list[dict[str, Any]] = []
        self._checkpoints: list[int] = []
        self._generation = 0
        self._beaten: set[tuple[int, int, int]] = set()  # (gen, rank, attempt) seen beating
        self._followed_id: bytes = b"0-0"  # the last progress entry folded into the log

    # -- what the driver sees ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A snapshot for progress displays; cheap, callable while ``run`` works."""
        snap = self.log.snapshot()
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
                "failures": len(self._failures),
                "error": self._error,
            }

    def _cost(self, *, include_running: bool) -> float:
        pricing = self.backend.pricing
        cost = sum(pricing.cost_usd(m, s) for m, s in self._billed)
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
                "checkpoints": list(self._checkpoints),
                "cost_usd": self._cost(include_running=False),
                "billed_worker_s": sum(s for _m, s in self._billed),
                "pricing": self.backend.pricing.name,
            }

    def _with_recovery(self, failure: dict[str, Any]) -> dict[str, Any]:
        """``failure`` with ``recovery_s``: from the failure being seen to the replacement's
        first report (None if none came). Caller holds ``self.log.lock``."""
        if "rank" not in failure:  # a missed checkpoint, not a worker
            return dict(failure)
        replacement = (failure["generation"], failure["rank"], failure["attempt"] + 1)
        first = self.log.first_report_of.get(replacement)
        detected = self.log.started + failure["detected_s"]
        return {**failure, "recovery_s": None if first is None else first - detected}

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the job to its end; returns the summary (history, generations, cost, ...)."""
        try:
            try:
                trio.run(self._run)
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
                done = trio.Event()
                nursery.start_soon(self._follow_progress, done)
                while start < self.spec.total_iterations:
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
                    start = stop
                    self._generation += 1
                done.set()
        finally:
            await self.backend.clean()

    async def _run_generation(self, gen: int, start: int, cfg: Config) -> tuple[int, str]:
        began = time.monotonic()
        self.log.start_generation(cfg.workers)
        await self.backend.deploy(self.spec.job_id, cfg.workers, cfg.memory_mb)
        reports: dict[int, WorkerReport] = {}
        requested = trio.Event()
        async with trio.open_nursery() as watchers:
            watchers.start_soon(self._watch_heartbeats, gen)
            watchers.start_soon(self._watch_rescale, gen, requested)
            async with trio.open_nursery() as ranks:
                for rank in range(cfg.workers):
                    ranks.start_soon(self._run_rank, gen, rank, start, cfg, reports)
            watchers.cancel_scope.cancel()
        stops = {r.next_iteration for r in reports.values()}
        if len(stops) != 1:
            raise TrainingError(
                f"generation {gen}: workers stopped at different iterations {stops}"
            )
        stop = stops.pop()
        if stop >= self.spec.total_iterations:
            why = "finished"
        elif requested.is_set():
            why = "re-scaling"
        else:
            why = "function time limit"
        if all(r.checkpoint_iteration == stop for r in reports.values()):
            await trio.to_thread.run_sync(self._commit, stop, cfg.workers)
        with self._lock:
            self._generations.append(
                {
                    "generation": gen,
                    "start_iteration": start,
                    "stop_iteration": stop,
                    "workers": cfg.workers,
                    "memory_mb": cfg.memory_mb,
                    "wall_s": time.monotonic() - began,
                    "ended_because": why,
                }
            )
        return stop, why

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
                "faults": s.faults,
                "checkpoint_every": s.checkpoint_every,
                "heartbeat_interval_s": s.heartbeat_interval_s,
                "heartbeat_timeout_s": s.heartbeat_timeout_s,
            },
        )

    # -- one rank, with re-invocation ----------------------------------------------------------

    async def _run_rank(
        self, gen: int, rank: int, start: int, cfg: Config, reports: dict[int, WorkerReport]
    ) -> None:
        attempt, resume = 0, start
        causes: list[str] = []
        first_failure: float | None = None
        while True:
            invocation = await self.backend.invoke(self._payload(gen, rank, resume, attempt, cfg))
            with self._lock:
                self._running[rank] = (invocation, time.monotonic(), attempt)
            try:
                timeout_s = self.spec.worker_timeout_s
                if self.spec.function_timeout_s is not None:
                    timeout_s = min(timeout_s, self.spec.function_timeout_s + 30)
                reports[rank] = await invocation.result(timeout_s)
                self._ended(rank, invocation)
                return
            except SmltError as exc:
                detected = time.monotonic()
                await invocation.cancel()  # a hung process must not keep the slot
                self._ended(rank, invocation)
                if not await trio.to_thread.run_sync(self._store_alive):
                    # Re-invoking cannot help: everything a worker resumes from is gone.
                    await self._cancel_all()
                    raise StoreUnavailableError(
                        f"worker {rank} failed and the parameter store is unreachable: {exc}"
                    ) from exc
                hung = (gen, rank, attempt) in self._hung
                cause = (
                    "heartbeat timeout (worker stopped responding)"
                    if hung
                    else (f"{type(exc).__name__}: {exc}")
                )
                resume = max(start, await self._rank_position(rank))
                record = {
                    "rank": rank,
                    "generation": gen,
                    "iteration": resume,
                    "attempt": attempt,
                    "cause": cause,
                    "detected_s": detected - self.log.started,
                }
                with self._lock:
                    self._failures.append(record)
                repeated = _cause_key(cause) in causes
                causes.append(_cause_key(cause))
                first_failure = detected if first_failure is None else first_failure
                late = detected - first_failure > self.spec.retry.deadline_s
                if repeated or late or attempt + 1 >= self.spec.retry.max_attempts:
                    await self._cancel_all()
                    if repeated:
                        why = "failed the same way twice"
                    elif late:
                        why = f"kept failing for over {self.spec.retry.deadline_s:g} s"
                    else:
                        why = f"failed {attempt + 1} times"
                    raise TrainingError(
                        f"worker {rank} {why} at iteration {resume} (generation {gen}); last "
                        f"cause: {cause}"
                    ) from exc
                attempt += 1
                await trio.sleep(self.spec.retry.delay_s(attempt))

    async def _rank_position(self, rank: int) -> int:
        """The iteration ``rank`` had not finished, once the follower has read every report
        already in the stream (a report it has not read yet would make us recompute)."""
        client = self.store.client(0)
        newest = await trio.to_thread.run_sync(
            functools.partial(client.xrevrange, self.keys.progress(), count=1)
        )
        if newest:
            target = _stream_id(cast(bytes, newest[0][0]))
            with trio.move_on_after(5):
                while _stream_id(self._followed_id) < target:
                    await trio.sleep(0.02)
        with self.log.lock:
            return self.log.rank_next.get(rank, 0)

    def _store_alive(self) -> bool:
        try:
            return all(bool(c.ping()) for c in self.store.all_clients())
        except redis.RedisError:
            return False

    def _ended(self, rank: int, invocation: Invocation) -> None:
        with self._lock:
            self._running.pop(rank, None)
            self._billed.append((invocation.payload.memory_mb, invocation.billed_s))

    async def _cancel_all(self) -> None:
        with self._lock:
            running = [inv for inv, _t0, _a in self._running.values()]
        with trio.CancelScope(shield=True):
            for inv in running:
                await inv.cancel()

    # -- watchers --------------------------------------------------------------------------------

    async def _watch_heartbeats(self, gen: int) -> None:
        """Cancel a rank whose heartbeat expired (or never came) so that it is re-invoked."""
        client = self.store.client(0)
        spec = self.spec
        while True:
            await trio.sleep(spec.heartbeat_interval_s)
            with self._lock:
                running = dict(self._running)
            for rank, (inv, invoked_at, attempt) in running.items():
                key = self.keys.heartbeat(gen, rank, attempt)
                alive = await trio.to_thread.run_sync(client.exists, key)
                seen = (gen, rank, attempt) in self._beaten
                if alive:
                    self._beaten.add((gen, rank, attempt))
                elif seen or time.monotonic() - invoked_at > spec.startup_timeout_s:
                    self._hung.add((gen, rank, attempt))
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

    def _commit_periodic(self, iteration: int, workers: int) -> None:
        try:
            self._commit(iteration, workers)
        except SmltError as exc:  # a missed periodic checkpoint costs progress, not the run
            with self._lock:
                self._failures.append({"checkpoint": iteration, "cause": str(exc)})

    def _commit(self, iteration: int, workers: int) -> None:
        with self.log.lock:
            meta = {"history": list(self.log.history), "epochs": list(self.log.epochs)}
        self.checkpoints.commit(iteration, workers, self.spec.num_params, meta)
        with self._lock:
            if iteration not in self._checkpoints:
                self._checkpoints.append(iteration)

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
                    await trio.to_thread.run_sync(self.log.fold, report)
                    self._followed_id = entry_id
            if finishing and not reply:
                return


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    """A Redis stream id ``b"<ms>-<seq>"`` as numbers: ids do not sort as strings."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _cause_key(cause: str) -> str:
    """What makes two failures 'the same': the cause without its rank/iteration numbers."""
    return "".join(c for c in cause if not c.isdigit())[:200]


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
