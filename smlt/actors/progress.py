"""The scheduler's view of training: the job's progress stream folded into a history.

Every worker appends one report per iteration to the job's progress stream (DESIGN §3 step 6,
the paper's success flag). :class:`ProgressLog` folds the n reports of an iteration into one
history entry (loss over the global batch, the slowest rank's times, the step's learning rate
and global gradient norm), keeps per-epoch metrics, knows which rank has finished which
iteration, and notices when every rank of a generation has written its shards of a checkpoint.
It is plain data behind a lock: the follower thread writes, ``status()`` reads.

Not every entry is an iteration report. A worker about to suffer an injected fault writes a
``fault`` event first (:func:`smlt.protocol.faults.fault_event`); the log keeps it until the
scheduler pairs it with the failure it caused (:meth:`ProgressLog.take_fault`).

Reports can come twice for one (generation, iteration, rank): a replacement re-running an
iteration, or both copies of a duplicated invocation. Each iteration is recorded once, and each
checkpoint is announced once.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["CheckpointReady", "EvaluationDue", "FaultEvent", "ProgressLog"]

_TIMES = (
    "data_s",
    "compute_s",
    "sync_s",
    "ul_shard_s",
    "dl_shard_s",
    "ul_aggr_s",
    "dl_grad_s",
    "update_s",
    "codec_s",
    "upload_codec_s",
)

#: Per-iteration values that are the step's, not a rank's: the learning rate of the first param
#: group, and the global gradient norm before clipping (absent from reports of older workers).
_SAME_ON_EVERY_RANK = ("lr", "grad_norm")


@dataclass(frozen=True)
class CheckpointReady:
    """Every rank of generation ``generation`` has written its shards of checkpoint
    ``iteration``; ``shards`` holds what each rank reported about them:
    ``{rank: {"param": [size_bytes, sha256], "optim": [...]}}`` (None: the rank said nothing)."""

    iteration: int
    generation: int
    workers: int
    shards: dict[int, dict[str, Any] | None]


@dataclass(frozen=True)
class EvaluationDue:
    """Iteration ``iteration`` ended an epoch and its owners kept a snapshot of version
    ``iteration + 1`` (``workers`` shards) for the evaluator; ``entry`` is the epoch's record,
    to which the metrics are added."""

    version: int
    workers: int
    entry: dict[str, Any]


@dataclass(frozen=True)
class FaultEvent:
    """An injected fault, as the worker announced it just before it acted."""

    rank: int
    iteration: int
    phase: str
    action: str
    at_unix_s: float
    generation: int | None = None
    attempt: int | None = None


class ProgressLog:
    """History, epochs, per-rank positions, checkpoint shards and fault events, from the
    progress stream."""

    def __init__(
        self,
        iterations_per_epoch: int,
        *,
        history: list[dict[str, Any]] | None = None,
        epochs: list[dict[str, Any]] | None = None,
    ) -> None:
        self.iterations_per_epoch = iterations_per_epoch
        self.lock = threading.Lock()
        #: When the log began, on the monotonic clock (what ``*_s`` times count from) and on the
        #: wall clock (what workers' ``at_unix_s`` times are converted with).
        self.started = time.monotonic()
        self.started_unix_s = time.time()
        self.history: list[dict[str, Any]] = list(history or [])
        self.epochs: list[dict[str, Any]] = list(epochs or [])
        self.generation = 0
        self.workers = 1
        self.rank_next: dict[int, int] = {}  # rank -> next iteration it will run (this generation)
        self.first_report_of: dict[tuple[int, int, int], float] = {}  # (gen, rank, attempt)
        self._workers_of: dict[int, int] = {}  # generation -> workers
        self._recorded = {int(h["iteration"]) for h in self.history}
        self._pending: dict[tuple[int, int], dict[int, dict[str, str]]] = {}
        self._ckpt: dict[tuple[int, int], dict[int, dict[str, Any] | None]] = {}
        self._ckpt_announced: set[tuple[int, int]] = set()
        self._faults: list[FaultEvent] = []
        self._due: list[EvaluationDue] = []

    def start_generation(self, generation: int, workers: int) -> None:
        """Reports of ``generation`` come from ``workers`` ranks. Positions are per generation;
        reports of an earlier one that arrive late still complete that generation's entries."""
        with self.lock:
            self.generation = generation
            self.workers = workers
            self._workers_of[generation] = workers
            self.rank_next.clear()

    def fold(self, report: dict[str, str]) -> CheckpointReady | None:
        """Add one entry of the stream. Returns the checkpoint this report completed, if any,
        for the caller to commit (elsewhere: committing means waiting on the object store)."""
        if "event" in report:
            self._fold_event(report)
            return None
        rank, t, gen = int(report["rank"]), int(report["t"]), int(report["gen"])
        attempt = int(report.get("attempt", 0))
        ready: CheckpointReady | None = None
        with self.lock:
            workers = self._workers_of.get(gen, self.workers)
            if gen == self.generation:
                self.rank_next[rank] = max(self.rank_next.get(rank, 0), t + 1)
            self.first_report_of.setdefault((gen, rank, attempt), time.monotonic())
            if "ckpt" in report:
                ready = self._fold_checkpoint(gen, int(report["ckpt"]), rank, workers, report)
            if t not in self._recorded:
                entry = self._pending.setdefault((gen, t), {})
                entry[rank] = report  # a re-executed iteration's report replaces the first
                if len(entry) == workers:
                    del self._pending[(gen, t)]
                    self._recorded.add(t)
                    self._record(t, list(entry.values()))
        return ready

    def _fold_checkpoint(
        self, gen: int, version: int, rank: int, workers: int, report: dict[str, str]
    ) -> CheckpointReady | None:
        if (gen, version) in self._ckpt_announced:
            return None
        ranks = self._ckpt.setdefault((gen, version), {})
        ranks[rank] = _shard_records(report.get("ckpt_shards"))
        if len(ranks) < workers:
            return None
        del self._ckpt[(gen, version)]
        self._ckpt_announced.add((gen, version))
        return CheckpointReady(version, gen, workers, dict(ranks))

    def _fold_event(self, report: dict[str, str]) -> None:
        if report["event"] != "fault":
            return  # an event of a newer worker that this scheduler does not know: not a report
        gen, attempt = report.get("gen"), report.get("attempt")
        event = FaultEvent(
            rank=int(report["rank"]),
            iteration=int(report["t"]),
            phase=report.get("phase", "start"),
            action=report["action"],
            at_unix_s=float(report["at_unix_s"]),
            generation=None if gen is None else int(gen),
            attempt=None if attempt is None else int(attempt),
        )
        with self.lock:
            self._faults.append(event)

    def take_fault(
        self, rank: int, generation: int, attempt: int, first_iteration: int
    ) -> FaultEvent | None:
        """The fault that made attempt ``attempt`` of ``rank`` fail in ``generation``, if one
        was announced: the earliest unclaimed event of that rank at or after the invocation's
        ``first_iteration`` (and of that generation and attempt, where the event says). Every
        matching event is claimed: both copies of a duplicated invocation announce theirs."""
        with self.lock:
            mine = [
                e
                for e in self._faults
                if e.rank == rank
                and e.iteration >= first_iteration
                and e.generation in (None, generation)
                and e.attempt in (None, attempt)
            ]
            for event in mine:
                self._faults.remove(event)
        return min(mine, key=lambda e: e.at_unix_s, default=None)

    def meta_before(self, iteration: int) -> dict[str, list[dict[str, Any]]]:
        """The history and epochs of the iterations before ``iteration``: what a checkpoint of
        ``iteration`` carries, however far the log has moved on since it was written."""
        with self.lock:
            return {
                "history": [h for h in self.history if h["iteration"] < iteration],
                "epochs": [e for e in self.epochs if e["iteration"] < iteration],
            }

    def _record(self, t: int, reports: list[dict[str, str]]) -> None:
        batch = int(reports[0]["batch"])
        loss = sum(float(r["loss"]) * int(r["samples"]) for r in reports) / max(batch, 1)
        slowest = max(float(r["iter_s"]) for r in reports)
        record: dict[str, Any] = {
            "iteration": t,
            "epoch": t // self.iterations_per_epoch,
            "loss": loss,
            "samples": batch,
            "workers": len(reports),
            "wall_s": time.monotonic() - self.started,
            "iter_s": slowest,
            "samples_per_s": batch / slowest if slowest > 0 else math.nan,
        }
        for name in _TIMES:
            record[name] = max(float(r[name]) for r in reports)
        # Every rank reports the same learning rate and gradient norm (each is computed the
        # same way from the same values); the lowest rank's stand for the step's.
        first = min(reports, key=lambda r: int(r["rank"]))
        for name in _SAME_ON_EVERY_RANK:
            if name in first:
                record[name] = float(first[name])
        if all("micro" in r for r in reports):
            # The samples a worker put through the model at once: --micro-batch, or what the
            # workers chose where their slice would not fit (the same on every rank).
            record["micro_batch"] = max(int(r["micro"]) for r in reports)
        if all("norm_s" in r for r in reports):
            record["norm_s"] = max(float(r["norm_s"]) for r in reports)
        record["bytes_through_store"] = sum(
            int(r["bytes_up"]) + int(r["bytes_down"]) for r in reports
        )
        # The input pipeline, where the workers report it: shards fetched and bytes downloaded
        # by all ranks (the prefetcher's work counted in the report after it), the longest wait
        # on a download, and the largest peak resident memory of a worker so far.
        for name in ("shard_loads", "data_bytes"):
            if all(name in r for r in reports):
                record[name] = sum(float(r[name]) for r in reports)
        if all("data_wait_s" in r for r in reports):
            record["data_wait_s"] = max(float(r["data_wait_s"]) for r in reports)
        if all("rss_mb" in r for r in reports):
            record["worker_rss_mb"] = max(float(r["rss_mb"]) for r in reports)
        short = [float(r["cache_short_mb"]) for r in reports if "cache_short_mb" in r]
        if short:
            record["cache_short_mb"] = max(short)
        self.history.append(record)
        snapshot = next((int(r["snapshot"]) for r in reports if "snapshot" in r), None)
        if snapshot is None and (t + 1) % self.iterations_per_epoch:
            return
        entry = {
            "epoch": record["epoch"],
            "iteration": t,
            "train_loss": loss,
            "samples_per_s": record["samples_per_s"],
        }
        if "lr" in record:
            entry["lr"] = record["lr"]  # the epoch's last step's: what the next one starts near
        if snapshot is None:
            self.epochs.append(entry)  # nothing to evaluate: the epoch is complete
        else:
            self._due.append(EvaluationDue(snapshot, len(reports), entry))

    def take_evaluations(self) -> list[EvaluationDue]:
        """The snapshots that became complete since the last call, oldest first."""
        with self.lock:
            due, self._due = self._due, []
        return due

    def add_epoch(self, entry: dict[str, Any]) -> None:
        """An epoch's record with its metrics, once the evaluator has them."""
        with self.lock:
            self.epochs.append(entry)

    def snapshot(self, history_from: int | None = None) -> dict[str, Any]:
        """The log's state for a status; with ``history_from``, also ``history``: the entries
        of iterations ``history_from`` and later (what a poller has not seen yet; the history
        is in iteration order, so only its tail is looked at)."""
        with self.lock:
            snap = {
                "iteration": self.history[-1]["iteration"] + 1 if self.history else 0,
                "last": self.history[-1] if self.history else None,
                "epochs": list(self.epochs),
                "rank_iteration": dict(self.rank_next),
            }
            if history_from is not None:
                start = len(self.history)
                while start > 0 and self.history[start - 1]["iteration"] >= history_from:
                    start -= 1
                snap["history"] = self.history[start:]
            return snap


def _shard_records(raw: str | None) -> dict[str, Any] | None:
    """A report's ``ckpt_shards``; None if absent or unreadable (the commit then names it)."""
    if not raw:
        return None
    try:
        records = json.loads(raw)
    except ValueError:
        return None
    return records if isinstance(records, dict) else None
