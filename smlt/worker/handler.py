"""The function entry point: ``handle(event, context) -> dict``, the same on every backend.

Lambda calls it with its context object, OpenWhisk and the emulator with a dict, the Ray backend
with None. Everything a worker needs comes from the payload: the task code and data from the
object store, the parameters from Redis. A warm container (or a reused Ray worker process) keeps
the imported task and the data reader of a job (with its verified local shards), so only the
first invocation pays for them (cold start amortized, as the paper does).

**The local cache.** A job's code and data shards are downloaded into ``<cache root>/<job>/``
(:func:`~smlt.storage.artifacts.default_cache_dir`; ``/tmp`` on Lambda, whose disk is small and
outlives the job in a warm container). Nobody else would ever remove that folder, so the worker
does: whenever it takes up a job, it removes the folders of the other jobs under the cache root.
A folder may be in use by another worker process on the same machine, though (two runs on one
laptop's Ray share the cache root), so each process holds a shared ``flock`` on its job's
``.in-use`` file for as long as it works for the job, and a folder is removed only by whoever gets
the lock exclusively. The folder is renamed away under that lock and deleted afterwards, so a
worker that takes up the job a moment later starts a fresh folder instead of writing into one that
is being deleted. The lock dies with the process, so a crashed worker never pins a folder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smlt.protocol.payload import WorkerPayload
from smlt.storage.artifacts import ArtifactManifest, default_cache_dir, load_packaged_task
from smlt.storage.checkpoint import CheckpointStore
from smlt.storage.objects import open_object_store
from smlt.storage.reader import DataReader
from smlt.sync.store import ParameterStore
from smlt.task import Task
from smlt.worker.trainer import Trainer

__all__ = ["CacheFolder", "handle", "remove_cache", "remove_idle_caches"]

#: The file in a job's cache folder that workers of the job hold a shared flock on.
_LEASE_NAME = ".in-use"
#: Folders renamed away for deletion; a name no job id can have (job ids start alphanumeric).
_TRASH_PREFIX = ".trash-"


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


@dataclass
class _WarmJob:
    task: Task
    reader: DataReader
    lease: _CacheLease


# (job id, object store url) -> what a warm worker keeps between invocations: one job at a time.
_WARM: dict[tuple[str, str], _WarmJob] = {}


def _warm(payload: WorkerPayload) -> tuple[Task, DataReader]:
    key = (payload.job_id, payload.object_store_url)
    held = _WARM.get(key)
    if held is not None and held.lease.valid():
        return held.task, held.reader
    # A new job for this process, or our folder was removed under us (the driver removes a
    # job's cache when its run ends; this is a later run of the same job): start afresh.
    for old in _WARM.values():
        # Its prefetch thread stops and its open shard files close: their disk space is freed
        # once the old job's folder is removed.
        old.reader.close()
        old.lease.release()
    _WARM.clear()  # one job per warm worker: don't hold an old job's data
    cache_dir = default_cache_dir(payload.job_id)
    lease = _CacheLease(cache_dir)
    try:
        remove_idle_caches(cache_dir.parent, keep={cache_dir.name})
        objects = open_object_store(payload.object_store_url)
        manifest = ArtifactManifest.load(objects, payload.job_id)
        task = load_packaged_task(objects, manifest, cache_dir)
        # A folder per process: local Ray workers of a job must not spend each other's budget.
        reader = DataReader(objects, manifest, cache_dir / f"worker-{os.getpid()}")
    except BaseException:
        lease.release()
        raise
    _WARM[key] = _WarmJob(task, reader, lease)
    return task, reader


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


# -- the local cache ---------------------------------------------------------------------------


class _CacheLease:
    """A shared flock on ``<folder>/.in-use``, held while this process works for the job."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / _LEASE_NAME
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # A remover may have renamed the folder away between our open and our lock: then we
            # hold the lock of a file that is no longer the job's, and take the new one instead.
            self._fd: int | None = fd
            if self.valid():
                return
            os.close(fd)

    def valid(self) -> bool:
        """Whether the lock is still on the job folder's lease file (not on a removed one)."""
        if self._fd is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class CacheFolder:
    """A job's local cache folder as the cleaners see it."""

    path: Path
    size_bytes: int
    newest_unix_s: float


def remove_idle_caches(
    root: Path,
    *,
    keep: Collection[str] = (),
    older_than_s: float | None = None,
    dry_run: bool = False,
) -> list[CacheFolder]:
    """Remove the job folders under the cache ``root`` that no worker holds; return them.

    ``keep`` names job folders to leave alone (the caller's own). With ``older_than_s``, only
    folders whose newest file is older than that are removed. With ``dry_run`` nothing is
    removed; the folders that would be are returned. A cache is only a cache: a folder that
    cannot be removed (permissions, a race with another remover) is skipped, never an error.
    """
    try:
        entries = sorted(Path(root).iterdir())
    except OSError:
        return []
    now = time.time()
    removed = []
    for path in entries:
        if path.name in keep or not path.is_dir() or path.is_symlink():
            continue
        if path.name.startswith(_TRASH_PREFIX):  # left by a remover that died halfway
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
            continue
        if path.name.startswith("."):
            continue
        folder = _measure(path)
        if older_than_s is not None and now - folder.newest_unix_s < older_than_s:
            continue
        if _remove_unless_held(path, dry_run=dry_run):
            removed.append(folder)
    return removed


def remove_cache(job_id: str) -> CacheFolder | None:
    """Remove ``job_id``'s cache folder on this machine, held or not (its run has ended: the
    driver calls this); None if there is none."""
    path = default_cache_dir(job_id)
    if not path.is_dir():
        return None
    folder = _measure(path)
    _rename_and_delete(path)
    return folder


def _remove_unless_held(path: Path, *, dry_run: bool) -> bool:
    lease = path / _LEASE_NAME
    try:
        # A dry run creates nothing: a folder without a lease file is held by nobody.
        fd = os.open(lease, os.O_RDWR if dry_run else os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return dry_run
    except OSError:
        return False  # not ours to touch
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a worker is using it
        if not dry_run:
            _rename_and_delete(path)
        return True
    finally:
        os.close(fd)


def _rename_and_delete(path: Path) -> None:
    trash = path.with_name(f"{_TRASH_PREFIX}{uuid.uuid4().hex}")
    try:
        path.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _measure(path: Path) -> CacheFolder:
    """Bytes under ``path`` and the newest modification time of a file in it (the folder's own
    if it holds none). The lease file does not count: taking a lease is not writing data."""
    size = 0
    newest: float | None = None
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += st.st_size
            if name != _LEASE_NAME:
                newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    if newest is None:
        try:
            newest = path.lstat().st_mtime
        except OSError:
            newest = 0.0
    return CacheFolder(path, size, newest)
