"""The task scheduler (paper component 1c): invokes the workers and follows their progress.

A plain class with a small state machine (``pending -> deploying -> running -> finished |
failed``), run inside a threaded Ray actor so that :meth:`TaskScheduler.status` answers while
:meth:`TaskScheduler.run` works. ``run`` drives one trio loop:

- the n invocations of a generation are started in one nursery, each awaited with a bound;
- a follower reads the job's progress stream (``XREAD BLOCK``, in a worker thread: redis-py is
  synchronous) and folds the n per-rank reports of each iteration into one history entry;
- the first worker that fails cancels its peers (they would otherwise wait out their shard
  timeouts) and ends the run with a :class:`~smlt.errors.TrainingError` naming rank and cause.

The decisions (how many workers, how much memory) come from the resource manager; the scheduler
only executes them.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from smlt.actors.resource_manager import Config
from smlt.backends.base import Backend, Invocation
from smlt.errors import SmltError, TrainingError
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore
from smlt.worker.payload import WorkerPayload, WorkerReport

__all__ = ["DEFAULT_WORKER_TIMEOUT_S", "JobSpec", "TaskScheduler"]

#: Upper bound on one invocation when the backend has no time limit of its own (Ray).
DEFAULT_WORKER_TIMEOUT_S = 24 * 3600.0
_PROGRESS_BLOCK_MS = 500


@dataclass(frozen=True)
class JobSpec:
    """Everything the scheduler needs to run a job (no credentials are logged from it)."""

    job_id: str
    redis_urls: tuple[str, ...]
    object_store_url: str
    batch_size: int
    total_iterations: int
    iterations_per_epoch: int
    seed: int = 0
    shard_timeout_s: float = 120.0
    function_timeout_s: float | None = None
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S


@dataclass
class _Iteration:
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)


class TaskScheduler:
    """Runs one job on one backend. Thread-safe ``status()``; ``run()`` once."""

    def __init__(self, backend: Backend, spec: JobSpec, config: Config) -> None:
        self.backend = backend
        self.spec = spec
        self.config = config
        self.keys = JobKeys(spec.job_id)
        self._lock = threading.Lock()
        self._state = "pending"
        self._started = time.monotonic()
        self._pending: dict[int, _Iteration] = {}
        self._history: list[dict[str, Any]] = []
        self._epochs: list[dict[str, Any]] = []
        self._rank_iteration: dict[int, int] = {}
        self._invocations: list[Invocation] = []
        self._reports: list[WorkerReport] = []
        self._billed: list[tuple[int, float]] = []  # (memory_mb, billed_s) per ended invocation
        self._generations: list[dict[str, Any]] = []
        self._error: str | None = None

    # -- what the driver sees ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A snapshot for progress displays; cheap, callable while ``run`` works."""
        with self._lock:
            last = self._history[-1] if self._history else None
            return {
                "state": self._state,
                "elapsed_s": time.monotonic() - self._started,
                "iteration": len(self._history),
                "total_iterations": self.spec.total_iterations,
                "iterations_per_epoch": self.spec.iterations_per_epoch,
                "last": last,
                "epochs": list(self._epochs),
                "workers": self.config.workers,
                "memory_mb": self.config.memory_mb,
                "cost_usd": self._cost_so_far(),
                "rank_iteration": dict(self._rank_iteration),
                "error": self._error,
            }

    def _cost_so_far(self) -> float:
        pricing = self.backend.pricing
        done = sum(pricing.cost_usd(m, s) for m, s in self._billed)
        running = sum(
            pricing.cost_usd(inv.payload.memory_mb, inv.billed_s, requests=0)
            for inv in self._invocations
        )
        return done + running

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the job to its end; returns the summary (history, generations, cost, ...)."""
        try:
            try:
                trio.run(self._run)
            except BaseExceptionGroup as group:
                # Nurseries wrap errors in groups; the caller wants the one that ended the run.
                raise _primary_error(group) from None
        except BaseException as exc:
            with self._lock:
                self._state = "failed"
                self._error = str(exc)
            raise
        with self._lock:
            self._state = "finished"
        return self.summary()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            pricing = self.backend.pricing
            return {
                "job_id": self.spec.job_id,
                "history": list(self._history),
                "epochs": list(self._epochs),
                "generations": list(self._generations),
                "configs": [self.config.to_dict()],
                "cost_usd": sum(pricing.cost_usd(m, s) for m, s in self._billed),
                "billed_worker_s": sum(s for _m, s in self._billed),
                "pricing": pricing.name,
                "reports": [r.to_dict() for r in self._reports],
            }

    async def _run(self) -> None:
        cfg = self.config
        with self._lock:
            self._state = "deploying"
        await self.backend.deploy(self.spec.job_id, cfg.workers, cfg.memory_mb)
        with self._lock:
            self._state = "running"
        generation_started = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                done = trio.Event()
                nursery.start_soon(self._follow_progress, done)
                async with trio.open_nursery() as workers:
                    for rank in range(cfg.workers):
                        workers.start_soon(self._run_worker, rank, 0)
                # All workers ended: drain the reports still in the stream, then stop following.
                done.set()
        finally:
            await self.backend.clean()
        with self._lock:
            self._generations.append(
                {
                    "generation": 0,
                    "start_iteration": 0,
                    "stop_iteration": self.spec.total_iterations,
                    "workers": cfg.workers,
                    "memory_mb": cfg.memory_mb,
                    "wall_s": time.monotonic() - generation_started,
                    "ended_because": "finished",
                }
            )

    def _payload(self, rank: int, generation: int) -> WorkerPayload:
        s, cfg = self.spec, self.config
        return WorkerPayload(
            job_id=s.job_id,
            rank=rank,
            workers=cfg.workers,
            memory_mb=cfg.memory_mb,
            redis_urls=s.redis_urls,
            object_store_url=s.object_store_url,
            batch_size=s.batch_size,
            total_iterations=s.total_iterations,
            generation=generation,
            seed=s.seed,
            shard_timeout_s=s.shard_timeout_s,
            function_timeout_s=s.function_timeout_s,
        )

    async def _run_worker(self, rank: int, generation: int) -> None:
        invocation = await self.backend.invoke(self._payload(rank, generation))
        with self._lock:
            self._invocations.append(invocation)
        try:
            report = await invocation.result(self.spec.worker_timeout_s)
        except SmltError as exc:
            self._bill(invocation)
            # Peers would wait out their shard timeouts for this rank: stop them now.
            await self._cancel_all()
            raise TrainingError(
                f"worker {rank} failed at iteration {self._rank_iteration.get(rank, 0)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._bill(invocation)
        with self._lock:
            self._reports.append(report)

    def _bill(self, invocation: Invocation) -> None:
        with self._lock:
            if invocation in self._invocations:
                self._invocations.remove(invocation)
                self._billed.append((invocation.payload.memory_mb, invocation.billed_s))

    async def _cancel_all(self) -> None:
        with self._lock:
            running = list(self._invocations)
        with trio.CancelScope(shield=True):
            for inv in running:
                await inv.cancel()

    # -- progress ------------------------------------------------------------------------------

    async def _follow_progress(self, done: trio.Event) -> None:
        store = ParameterStore.from_urls(list(self.spec.redis_urls))
        client = store.client(0)
        stream = self.keys.progress()
        last_id = b"0-0"
        try:
            while True:
                finishing = done.is_set()
                # Blocks at most _PROGRESS_BLOCK_MS, so a cancelled run never waits long on it.
                reply = await trio.to_thread.run_sync(
                    functools.partial(
                        client.xread, {stream: last_id}, block=_PROGRESS_BLOCK_MS, count=1000
                    )
                )
                for _name, entries in reply or ():
                    for entry_id, fields in entries:
                        last_id = entry_id
                        self._fold({k.decode(): v.decode() for k, v in fields.items()})
                if finishing and not reply:
                    return
        finally:
            client.close()

    def _fold(self, report: dict[str, str]) -> None:
        """Add one rank's report; once all n ranks reported iteration t, record it."""
        rank, t = int(report["rank"]), int(report["t"])
        n = self.config.workers
        with self._lock:
            self._rank_iteration[rank] = t + 1
            entry = self._pending.setdefault(t, _Iteration())
            entry.reports[rank] = report
            if len(entry.reports) < n:
                return
            del self._pending[t]
            reports = list(entry.reports.values())
            batch = int(reports[0]["batch"])
            loss = sum(float(r["loss"]) * int(r["samples"]) for r in reports) / max(batch, 1)
            slowest = max(float(r["iter_s"]) for r in reports)
            record: dict[str, Any] = {
                "iteration": t,
                "epoch": t // self.spec.iterations_per_epoch,
                "loss": loss,
                "samples": batch,
                "wall_s": time.monotonic() - self._started,
                "iter_s": slowest,
                "samples_per_s": batch / slowest if slowest > 0 else math.nan,
            }
            for name in (
                "data_s",
                "compute_s",
                "sync_s",
                "ul_shard_s",
                "dl_shard_s",
                "ul_aggr_s",
                "dl_grad_s",
            ):
                record[name] = max(float(r[name]) for r in reports)
            record["bytes_through_store"] = sum(
                int(r["bytes_up"]) + int(r["bytes_down"]) for r in reports
            )
            self._history.append(record)
            metrics = next((r["metrics"] for r in reports if "metrics" in r), None)
            if metrics is not None:
                self._epochs.append(
                    {
                        "epoch": record["epoch"],
                        "iteration": t,
                        "train_loss": loss,
                        "samples_per_s": record["samples_per_s"],
                        **json.loads(metrics),
                    }
                )


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
    return next((e for e in leaves if isinstance(e, SmltError)), leaves[0])
