"""The scheduler's view of training: the job's progress stream folded into a history.

Every worker appends one report per iteration to ``smlt:J:progress`` (DESIGN §3 step 6, the
paper's success flag). :class:`ProgressLog` folds the n reports of an iteration into one history
entry (loss over the global batch, the slowest rank's times), keeps per-epoch metrics, knows
which rank has finished which iteration, and notices when every rank has written its shard of a
checkpoint. It is plain data behind a lock: the follower thread writes, ``status()`` reads.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressLog"]

_TIMES = ("data_s", "compute_s", "sync_s", "ul_shard_s", "dl_shard_s", "ul_aggr_s", "dl_grad_s")


class ProgressLog:
    """History, epochs, per-rank positions and checkpoint shards, from worker reports."""

    def __init__(
        self,
        iterations_per_epoch: int,
        *,
        history: list[dict[str, Any]] | None = None,
        epochs: list[dict[str, Any]] | None = None,
        on_checkpoint: Callable[[int, int], None] | None = None,
    ) -> None:
        self.iterations_per_epoch = iterations_per_epoch
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.history: list[dict[str, Any]] = list(history or [])
        self.epochs: list[dict[str, Any]] = list(epochs or [])
        self.workers = 1
        self.rank_next: dict[int, int] = {}  # rank -> next iteration it will run
        self.first_report_of: dict[tuple[int, int, int], float] = {}  # (gen, rank, attempt)
        self._pending: dict[tuple[int, int], dict[int, dict[str, str]]] = {}
        self._ckpt: dict[int, set[int]] = {}
        self._on_checkpoint = on_checkpoint

    def start_generation(self, workers: int) -> None:
        with self.lock:
            self.workers = workers
            self.rank_next.clear()

    def fold(self, report: dict[str, str]) -> None:
        """Add one rank's report; once all ranks reported an iteration, record it."""
        rank, t, gen = int(report["rank"]), int(report["t"]), int(report["gen"])
        attempt = int(report.get("attempt", 0))
        commit: int | None = None
        with self.lock:
            self.rank_next[rank] = max(self.rank_next.get(rank, 0), t + 1)
            self.first_report_of.setdefault((gen, rank, attempt), time.monotonic())
            if "ckpt" in report:
                ranks = self._ckpt.setdefault(int(report["ckpt"]), set())
                ranks.add(rank)
                if len(ranks) == self.workers:
                    commit = int(report["ckpt"])
            entry = self._pending.setdefault((gen, t), {})
            entry[rank] = report  # a re-executed iteration's report replaces the first
            if len(entry) == self.workers:
                del self._pending[(gen, t)]
                self._record(t, list(entry.values()))
        if commit is not None and self._on_checkpoint is not None:
            self._on_checkpoint(commit, self.workers)

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
        record["bytes_through_store"] = sum(
            int(r["bytes_up"]) + int(r["bytes_down"]) for r in reports
        )
        self.history.append(record)
        metrics = next((r["metrics"] for r in reports if "metrics" in r), None)
        if metrics is not None:
            self.epochs.append(
                {
                    "epoch": record["epoch"],
                    "iteration": t,
                    "train_loss": loss,
                    "samples_per_s": record["samples_per_s"],
                    **json.loads(metrics),
                }
            )

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "iteration": self.history[-1]["iteration"] + 1 if self.history else 0,
                "last": self.history[-1] if self.history else None,
                "epochs": list(self.epochs),
                "rank_iteration": dict(self.rank_next),
            }
