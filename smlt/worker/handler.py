"""The function entry point: ``handle(event, context) -> dict``, the same on every backend.

Lambda calls it with its context object, OpenWhisk and the emulator with a dict, the Ray backend
with None. Everything a worker needs comes from the payload: the task code and data from the
object store, the parameters from Redis. A warm container (or a reused Ray worker process) keeps
the imported task and the decoded data shards of a job, so only the first invocation pays for
them (cold start amortized, as the paper does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from smlt.protocol.payload import WorkerPayload
from smlt.storage.artifacts import (
    ArtifactManifest,
    DataReader,
    default_cache_dir,
)
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import open_object_store
from smlt.sync.store import ParameterStore
from smlt.task import Task
from smlt.worker.packaged import load_packaged_task
from smlt.worker.trainer import Trainer

__all__ = ["handle"]

# (job id, object store url) -> what a warm worker keeps between invocations.
_WARM: dict[tuple[str, str], tuple[Task, DataReader]] = {}


def handle(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Run one invocation; returns a :class:`WorkerReport` as a dict, or raises."""
    started = time.monotonic()
    payload = WorkerPayload.from_dict(event)
    remaining_s = _remaining_time(payload, context, started)
    task, reader = _warm(payload)
    store = ParameterStore.from_urls(list(payload.redis_urls))
    checkpoints = CheckpointStore(reader.store, payload.job_id)
    try:
        trainer = Trainer(
            payload, task, reader, store, remaining_s=remaining_s, checkpoints=checkpoints
        )
        return trainer.run().to_dict()
    finally:
        for client in store.all_clients():
            client.close()


def _warm(payload: WorkerPayload) -> tuple[Task, DataReader]:
    key = (payload.job_id, payload.object_store_url)
    if key not in _WARM:
        objects = open_object_store(payload.object_store_url)
        manifest = ArtifactManifest.load(objects, payload.job_id)
        cache_dir = default_cache_dir(payload.job_id)
        task = load_packaged_task(objects, manifest, cache_dir)
        _WARM.clear()  # one job per warm worker: don't hold an old job's data
        _WARM[key] = (task, DataReader(objects, manifest, cache_dir))
    return _WARM[key]


def _remaining_time(
    payload: WorkerPayload, context: Any, started: float
) -> Callable[[], float] | None:
    """Seconds left before the platform kills us: Lambda says so; elsewhere the payload's limit."""
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        return lambda: context.get_remaining_time_in_millis() / 1000
    if payload.function_timeout_s is not None:
        limit_s = payload.function_timeout_s
        return lambda: limit_s - (time.monotonic() - started)
    return None
