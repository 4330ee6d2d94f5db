"""Real workers on threads: a job packaged into a real object store, its version 0 in a real Redis,
and n :class:`~smlt.worker.trainer.Trainer` ranks, each re-invoked the way the scheduler does when
it raises (same rank, next attempt, from the first iteration it has not reported).

No Ray and no scheduler, so hundreds of steps and dozens of fault interleavings run in seconds;
the end-to-end path is tested elsewhere (tests/test_fault_tolerance.py, tests/test_exactness.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smlt.client.artifacts import package_task
from smlt.errors import StaleVersionError
from smlt.protocol.faults import InjectedFault
from smlt.protocol.model import FlatModel
from smlt.protocol.payload import WorkerPayload
from smlt.protocol.state import Version, collect_from_store, publish_version
from smlt.storage.artifacts import ArtifactManifest, load_packaged_task
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import LocalObjectStore
from smlt.storage.reader import DataReader
from smlt.storage.redis_server import RedisServer
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore
from smlt.task import Task
from smlt.worker.trainer import Trainer


@dataclass
class Outcome:
    """What a job left: every rank's final vector, the store's final version, the attempts."""

    values: list[np.ndarray]
    final: Version
    attempts: dict[int, int]
    checkpoints: CheckpointStore
    reports: list[dict[str, str]] = field(default_factory=list)
    stale: list[StaleVersionError] = field(default_factory=list)

    @property
    def optimizer_bytes(self) -> bytes:
        return self.final.optimizer.to_bytes()


class ThreadedJob:
    """One job of ``cls`` in ``task_file``, run by ``workers`` ranks on threads."""

    def __init__(
        self,
        tmp_path: Path,
        redis: RedisServer,
        job: str,
        task_file: Path,
        cls: str,
        *,
        workers: int,
        iterations: int,
        batch_size: int = 64,
        seed: int = 0,
        options: dict[str, Any] | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        self.job = job
        self.redis = redis
        self.workers = workers
        self.iterations = iterations
        self.batch_size = batch_size
        self.seed = seed
        self.options = dict(options or {})
        self.tmp_path = tmp_path
        self.objects = LocalObjectStore(tmp_path / "objects")
        self.manifest: ArtifactManifest = package_task(f"{task_file}:{cls}", self.objects, job)
        self.task: Task = load_packaged_task(self.objects, self.manifest, tmp_path / "cache")
        self.keys = JobKeys(job)
        self.max_value_bytes = max_value_bytes
        self.store = self._store()
        torch.manual_seed(seed)
        version0 = Version.initial(FlatModel(self.task.model()))
        self.initial = version0.values
        publish_version(self.store, self.keys, 0, version0, workers)
        self.checkpoints = CheckpointStore(self.objects, job)

    def _store(self) -> ParameterStore:
        if self.max_value_bytes is None:
            return ParameterStore.from_urls(self.redis.url)
        return ParameterStore.from_urls(self.redis.url, max_value_bytes=self.max_value_bytes)

    def payload(self, rank: int, attempt: int, start: int, faults: str) -> WorkerPayload:
        return WorkerPayload(
            job_id=self.job,
            rank=rank,
            workers=self.workers,
            memory_mb=512,
            redis_urls=(self.redis.url,),
            object_store_url=self.objects.url,
            batch_size=self.batch_size,
            total_iterations=self.iterations,
            start_iteration=start,
            seed=self.seed,
            shard_timeout_s=30,
            attempt=attempt,
            options={**self.options, "faults": faults},
        )

    def position(self, rank: int) -> int:
        """The first iteration ``rank`` has not reported (what the scheduler resumes it at)."""
        done = [
            int(f[b"t"])
            for _id, f in self.store.client(0).xrange(self.keys.progress())
            if b"event" not in f and int(f[b"rank"]) == rank
        ]
        return max(done) + 1 if done else 0

    def run(
        self,
        faults: str = "",
        *,
        duplicate: int | None = None,
        duplicate_after: int | None = None,
        timeout_s: float = 120,
    ) -> Outcome:
        """Run every rank to the end; a rank that raises an injected fault is re-invoked.
        ``duplicate`` runs that rank twice from the start (at-least-once delivery): at once, or
        once the rank has reported iteration ``duplicate_after`` (a late copy, which must fail
        at once with StaleVersionError; it lands in ``Outcome.stale``)."""
        values: list[np.ndarray | None] = [None] * self.workers
        attempts = dict.fromkeys(range(self.workers), 0)
        errors: list[BaseException] = []
        stale: list[StaleVersionError] = []

        def rank_thread(rank: int, copy: int = 0) -> None:
            attempt, start = 0, 0
            try:
                if copy and duplicate_after is not None:
                    deadline = time.monotonic() + timeout_s
                    while self.position(rank) <= duplicate_after:
                        if time.monotonic() > deadline:
                            raise TimeoutError("the late copy's twin never got there")
                        time.sleep(0.01)
                while True:
                    payload = self.payload(rank, attempt, start, faults)
                    reader = DataReader(
                        self.objects, self.manifest, self.tmp_path / f"cache-{rank}-{copy}"
                    )
                    store = self._store()
                    trainer = Trainer(
                        payload, self.task, reader, store, checkpoints=self.checkpoints
                    )
                    try:
                        report = trainer.run()
                    except StaleVersionError as exc:
                        if not copy:
                            raise
                        stale.append(exc)
                        return
                    except InjectedFault:
                        attempt += 1
                        attempts[rank] = max(attempts[rank], attempt)
                        start = self.position(rank)
                        continue
                    assert report.next_iteration == self.iterations
                    if copy == 0:
                        values[rank] = trainer.flat.values_numpy().copy()
                    return
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=rank_thread, args=(r,)) for r in range(self.workers)]
        if duplicate is not None:
            threads.append(threading.Thread(target=rank_thread, args=(duplicate, 1)))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout_s)
            if th.is_alive():
                raise TimeoutError(f"a rank did not finish within {timeout_s} s")
        if errors:
            raise errors[0]
        final = collect_from_store(
            self.store, self.keys, self.iterations, self.workers, self.initial.size
        )
        reports = [
            {k.decode(): v.decode() for k, v in f.items()}
            for _id, f in self.store.client(0).xrange(self.keys.progress())
        ]
        return Outcome(
            [v for v in values if v is not None], final, attempts, self.checkpoints, reports, stale
        )
