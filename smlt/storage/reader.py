"""The data reader: rows of a packaged training set by global sample index, for one worker.

A shard (64 MiB by default, format in :mod:`smlt.storage.artifacts`) is downloaded once into a
local cache folder and then read row by row; process memory holds the batch, never whole shards.
The worker handler gives each worker process a folder of its own (as Lambda gives each container
its own ``/tmp``), so one worker's budget is not spent on its neighbours' shards; the reader still
tolerates another process in its folder.

**Verify once.** A shard is hashed while it streams from the store to a temporary file, and
renamed to ``<sha256>.bin`` only when the hash and length match the manifest. A file under its
final name is therefore trusted and never hashed again: neither by this reader nor by another
worker process on the machine that shares the folder. Only its length is checked (``fstat`` is
free), so a truncated copy is thrown away and fetched again; a same-length change to a cached file
is not detected, which is the same trust we give the process's own memory (nobody but smlt writes
into the cache folder).

**Read rows, not shards.** :meth:`DataReader.rows` sorts the wanted rows of each shard and reads
each run of consecutive rows with one positioned read (``os.preadv``) per tensor, straight into a
buffer the size of those rows. Each cached shard this reader uses keeps an open file descriptor
(at most :data:`MAX_OPEN_SHARDS`), so another process on the machine that evicts the file cannot
break a read in progress: the bytes stay readable until we close the descriptor.

**Prefetch.** The sampler knows, an epoch ahead, which shards a worker will need and in which
order; :meth:`DataReader.prefetch` hands that plan over, and a background thread downloads the
planned shards in order while the planned ones on disk fit the cache budget (a shard stays
planned until the worker's next plan leaves it out).
``rows()`` that needs a shard still on its way waits for it (bounded), or fetches it itself if
nobody is; a failed prefetch is raised by the next ``rows()`` that needs the shard.

**A bounded cache.** The shards folder holds at most ``cache_bytes`` of shards (the rule is in
:func:`default_cache_bytes`), counted over every file in it, whoever downloaded it, because the
disk is what is bounded. To make room, the least recently used files (by modification time, which
every reader bumps when it uses a shard, so recency is shared between processes) that are not in
this reader's remaining plan and not being read are deleted. A single ``rows()`` call that needs
more shards than fit still works: it keeps them all until it returns, over budget for that long.
The worker raises the budget to what its sample order needs (:meth:`DataReader.reserve`): a
budget below the shards one iteration reads would download them again every iteration.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.artifacts import ArtifactManifest, Shard, default_cache_dir
from smlt.storage.objects import ObjectStore, open_object_store

__all__ = [
    "CACHE_BYTES_ENV",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_DOWNLOAD_TIMEOUT_S",
    "DOWNLOAD_TIMEOUT_ENV",
    "MAX_OPEN_SHARDS",
    "RESIDENT_BYTES",
    "DataReader",
    "default_cache_bytes",
]

#: The disk cache's budget unless the caller or ``$SMLT_CACHE_BYTES`` says otherwise: 32 shards
#: of 64 MiB (or 8 of the paper's 250 MB), room for the windows a worker reads and the next.
DEFAULT_CACHE_BYTES = 2 * 2**30
CACHE_BYTES_ENV = "SMLT_CACHE_BYTES"
#: How long one shard download may take before it is an error (250 MB at under 1 MB/s: stuck).
DEFAULT_DOWNLOAD_TIMEOUT_S = 300.0
DOWNLOAD_TIMEOUT_ENV = "SMLT_DOWNLOAD_TIMEOUT_S"
#: How long close() waits for the prefetch thread; it stops at its next chunk (8 MiB).
DEFAULT_CLOSE_TIMEOUT_S = 30.0
#: Open descriptors kept on cached shards (each pins its file's disk space until closed).
MAX_OPEN_SHARDS = 16

_DOWNLOAD_CHUNK_BYTES = 8 * 2**20
#: Data bytes a reader holds in process memory beyond the batch it returns (``resident_bytes``).
RESIDENT_BYTES = 2 * _DOWNLOAD_CHUNK_BYTES
_TMP_SUFFIX = ".smlt-tmp"
# The prefetch thread re-checks its plan this often even if nobody in this process notifies it
# (another process on the machine evicted a planned shard): a bound on its wait, not a poll.
_IDLE_RECHECK_S = 5.0


def default_cache_bytes(manifest: ArtifactManifest, cache_dir: Path) -> int:
    """The disk budget when none is given: ``$SMLT_CACHE_BYTES``, else the smaller of
    :data:`DEFAULT_CACHE_BYTES` and half the cache folder's file system (Lambda's ``/tmp`` is
    512 MB unless configured larger), but never less than twice the largest shard, so one shard
    can be read while the next one downloads."""
    floor = 2 * max((s.num_bytes for s in manifest.shards), default=0)
    raw = os.environ.get(CACHE_BYTES_ENV)
    if raw:
        try:
            return max(int(raw), floor)
        except ValueError:
            raise ConfigError(
                f"${CACHE_BYTES_ENV} must be a whole number of bytes, got {raw!r}"
            ) from None
    folder = Path(cache_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        disk_half = shutil.disk_usage(folder).total // 2
    except OSError:
        disk_half = DEFAULT_CACHE_BYTES
    return max(min(DEFAULT_CACHE_BYTES, disk_half), floor)


def _release(cv: threading.Condition, fds: dict[int, int]) -> None:
    with cv:
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        cv.notify_all()


def _download_timeout_s() -> float:
    raw = os.environ.get(DOWNLOAD_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_DOWNLOAD_TIMEOUT_S
    try:
        timeout_s = float(raw)
    except ValueError:
        timeout_s = math.nan
    if not timeout_s > 0:
        raise ConfigError(
            f"${DOWNLOAD_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}"
        )
    return timeout_s


@dataclass
class _Stats:
    downloads: int = 0
    bytes_downloaded: int = 0
    bytes_read: int = 0
    hash_checks: int = 0
    cache_hits: int = 0
    evictions: int = 0
    wait_s: float = 0.0
    peak_cache_bytes: int = 0


class _Closed(ObjectStoreError):
    """Raised inside a download that close() interrupted."""


class DataReader:
    """Rows of the packaged training set by global index, for one worker (see module doc).

    Thread use: ``rows()`` and ``prefetch()`` are called by the worker's one training thread;
    the reader runs one prefetch thread of its own, started by the first ``prefetch()``.
    """

    def __init__(
        self,
        store: ObjectStore,
        manifest: ArtifactManifest,
        cache_dir: Path,
        *,
        cache_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.cache_dir = Path(cache_dir) / "shards"
        largest = max((s.num_bytes for s in manifest.shards), default=0)
        if cache_bytes is None:
            cache_bytes = default_cache_bytes(manifest, self.cache_dir)
        elif cache_bytes < largest:
            raise ConfigError(
                f"cache_bytes={cache_bytes} is less than the largest data shard of job "
                f"{manifest.job_id!r} ({largest} bytes): it must hold one shard, and twice that "
                "lets one shard download while another is read"
            )
        self.cache_bytes = cache_bytes
        self.download_timeout_s = _download_timeout_s()
        self._starts = np.array([s.start for s in manifest.shards], dtype=np.int64)
        # Per tensor: the bytes of one sample's row in its section of a shard.
        self._row_bytes = [spec.bytes_per_sample for spec in manifest.tensors]
        self._paths = [self.cache_dir / f"{s.sha256}.bin" for s in manifest.shards]
        self._cv = threading.Condition()
        # Everything below is guarded by _cv.
        self._plan: list[int] = []  # planned shards not used yet, in order of first use
        self._flights: set[int] = set()  # shards being downloaded (by either thread)
        self._failed: dict[int, BaseException] = {}  # prefetch errors not yet raised
        self._pins: dict[int, int] = {}  # shards a rows() call is using: never evicted
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> open descriptor, LRU order
        self._last_touch_ns = 0
        self._stats = _Stats()
        self._taken: dict[str, float] = {}  # what take_deltas() last returned totals of
        # A reader dropped without close(): its descriptors close and its thread wakes and ends.
        weakref.finalize(self, _release, self._cv, self._fds)
        self._closed = False
        self._thread: threading.Thread | None = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(
                f"cannot create the data cache folder {self.cache_dir}: {exc.strerror or exc}"
            ) from exc
        self._remove_stale_temporaries()

    @classmethod
    def open(cls, store_url: str, job_id: str, cache_dir: Path | None = None) -> DataReader:
        """The reader a worker builds from ``(store url, job id)`` alone."""
        store = open_object_store(store_url)
        manifest = ArtifactManifest.load(store, job_id)
        return cls(store, manifest, cache_dir or default_cache_dir(job_id))

    # -- public --------------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """The most bytes of data this reader keeps in process memory, beyond what ``rows()``
        returns: one download chunk for the prefetch thread and one for a download ``rows()``
        makes itself. During a ``rows()`` call it also holds a scratch copy of the rows it
        reads (at most the size of the batch it returns), which is the caller's to count."""
        return RESIDENT_BYTES

    def reserve(self, nbytes: int) -> int:
        """Raise the cache budget to at least ``nbytes`` (it is never lowered), as far as the
        cache folder's file system allows: its free space plus what the folder holds already,
        less 10 % of the file system for everything else. Returns the budget now in force; a
        caller that asked for more than it got will see it in ``downloads`` (shards fetched
        again after an eviction)."""
        with self._cv:
            if nbytes <= self.cache_bytes:
                return self.cache_bytes
            try:
                usage = shutil.disk_usage(self.cache_dir)
                held = sum(size for _, _, size in self._cached_files())
                room = usage.free + held - usage.total // 10
            except OSError:
                room = self.cache_bytes
            self.cache_bytes = max(self.cache_bytes, min(nbytes, room))
            self._cv.notify_all()
            return self.cache_bytes

    def shard_ids(self, indices: np.ndarray) -> np.ndarray:
        """Which shard holds each global index (after checking the indices are in range)."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ConfigError(
                f"indices must be a 1-D integer array, got dtype {indices.dtype} "
                f"and shape {indices.shape}"
            )
        n = self.manifest.num_samples
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0]
            raise ConfigError(
                f"sample index {int(bad)} is out of range [0, {n}) of job {self.manifest.job_id!r}"
            )
        return np.searchsorted(self._starts, indices, side="right") - 1

    def rows(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The samples at ``indices``, in that order, one tensor per tensor of ``data()``.

        Downloads (or waits for the prefetcher to finish) the shards not yet on disk; raises
        :class:`ObjectNotFoundError` for a shard missing from the store, :class:`ObjectStoreError`
        for a corrupt one, a download past ``download_timeout_s``, or a closed reader.
        """
        indices = np.asarray(indices)
        owners = self.shard_ids(indices)
        out = tuple(
            torch.empty((len(indices), *spec.sample_shape), dtype=spec.torch_dtype)
            for spec in self.manifest.tensors
        )
        needed = [int(s) for s in np.unique(owners)]
        with self._cv:
            self._check_open()
            downloads_before = self._stats.downloads
            for shard_id in needed:
                self._pins[shard_id] = self._pins.get(shard_id, 0) + 1
        try:
            # Every descriptor first, then the reads: a shard another process evicts while we
            # download the next one stays readable through its descriptor.
            fds = [self._acquire(shard_id) for shard_id in needed]
            for shard_id, fd in zip(needed, fds, strict=True):
                positions = np.flatnonzero(owners == shard_id)
                local = indices[positions].astype(np.int64) - self._starts[shard_id]
                self._read_rows(shard_id, fd, positions, local, out)
                with self._cv:
                    # Still in the plan: a shard is read over many iterations, and only the
                    # next plan (which starts where the worker is) lets it go.
                    self._touch(shard_id, fd)
        finally:
            with self._cv:
                for shard_id in needed:
                    self._pins[shard_id] -= 1
                    if not self._pins[shard_id]:
                        del self._pins[shard_id]
                if self._stats.downloads != downloads_before:
                    self._make_room(0)  # back within budget if this call needed more than fit
                self._cv.notify_all()
        return out

    def prefetch(self, shard_ids: Sequence[int]) -> None:
        """The shards this worker needs next, in order of first use; replaces the previous plan.

        Returns at once; the prefetch thread downloads them in order while the planned shards on
        disk fit ``cache_bytes``. A planned shard is never evicted, also once read (a worker
        reads a shard over many iterations): renew the plan from where the worker is, and the
        shards it leaves out become evictable. A failure of an earlier plan is forgotten.
        """
        plan: list[int] = []
        for raw in shard_ids:
            shard_id = int(raw)
            if not 0 <= shard_id < len(self.manifest.shards):
                raise ConfigError(
                    f"shard id {shard_id} is out of range [0, {len(self.manifest.shards)}) of "
                    f"job {self.manifest.job_id!r}"
                )
            if shard_id not in plan:
                plan.append(shard_id)
        with self._cv:
            self._check_open()
            self._plan = plan
            self._failed.clear()  # a new plan tries again what failed under the last one
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._prefetch_loop,
                    args=(weakref.ref(self), self._cv),
                    name=f"smlt-prefetch-{self.manifest.job_id}",
                    daemon=True,  # close() joins it; daemon only so a stuck store call can't
                    # keep a dying process alive
                )
                self._thread.start()
            self._cv.notify_all()

    def take_deltas(self, names: Sequence[str]) -> dict[str, float]:
        """How much each counter of :meth:`statistics` named in ``names`` grew since the last
        call (since construction, the first time). Kept on the reader, not by its caller, so
        the work its prefetch thread does between two invocations of a warm worker is counted
        in the next one's reports, and nothing twice."""
        stats = self.statistics()
        with self._cv:
            deltas = {name: float(stats[name]) - self._taken.get(name, 0.0) for name in names}
            self._taken.update({name: float(stats[name]) for name in names})
        return deltas

    def statistics(self) -> dict[str, float | int]:
        """Counters since construction.

        ``downloads`` (shards fetched from the store), ``bytes_downloaded``, ``bytes_read``
        (from local copies, to serve rows), ``hash_checks`` (one per download, never more),
        ``cache_hits`` (a shard ``rows()`` needed was already verified on disk, whoever
        downloaded it; counted per shard per call), ``evictions`` (files this reader deleted to
        stay in budget), ``wait_s`` (time ``rows()`` spent blocked on downloads, its own or the
        prefetcher's) and ``peak_cache_bytes`` (the most shard bytes seen in the folder, measured
        after each download).
        """
        with self._cv:
            s = self._stats
            return {
                "downloads": s.downloads,
                "bytes_downloaded": s.bytes_downloaded,
                "bytes_read": s.bytes_read,
                "hash_checks": s.hash_checks,
                "cache_hits": s.cache_hits,
                "evictions": s.evictions,
                "wait_s": s.wait_s,
                "peak_cache_bytes": s.peak_cache_bytes,
            }

    def close(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop the prefetch thread (joined for at most ``timeout_s``) and close the files.

        Idempotent. A download in progress stops at its next chunk and leaves no file; a store
        call stuck inside boto3 cannot be interrupted, so after ``timeout_s`` we stop waiting
        (the thread is a daemon and exits when that call returns or times out).
        """
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        _release(self._cv, self._fds)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- getting a shard onto disk -------------------------------------------------------------

    def _acquire(self, shard_id: int) -> int:
        """An open descriptor on the verified local copy of a (pinned) shard."""
        started = time.monotonic()
        deadline = started + self.download_timeout_s
        waited = False
        try:
            while True:
                with self._cv:
                    self._check_open()
                    failed = self._failed.pop(shard_id, None)
                    if isinstance(failed, ObjectNotFoundError):
                        raise failed  # not there: fetching it again cannot help
                    # Any other prefetch failure (a dropped connection, a store that timed
                    # out, a container frozen mid-download): fetch it here, on our deadline.
                    fd = self._open_cached(shard_id)
                    if fd is not None:
                        if not waited:
                            self._stats.cache_hits += 1
                        return fd
                    waited = True
                    if shard_id in self._flights:  # the prefetcher is on it
                        remaining_s = deadline - time.monotonic()
                        if remaining_s <= 0:
                            raise ObjectStoreError(
                                f"data shard {self._describe(shard_id)} did not finish "
                                f"downloading within {self.download_timeout_s:g} s "
                                f"(${DOWNLOAD_TIMEOUT_ENV})"
                            )
                        self._cv.wait(remaining_s)
                        continue
                    # Best effort: a call needing more shards than fit goes over budget.
                    self._make_room(self.manifest.shards[shard_id].num_bytes)
                    self._flights.add(shard_id)
                try:
                    self._download(shard_id, deadline)
                finally:
                    with self._cv:
                        self._flights.discard(shard_id)
                        self._cv.notify_all()
        finally:
            if waited:
                with self._cv:
                    self._stats.wait_s += time.monotonic() - started

    def _download(self, shard_id: int, deadline: float) -> None:
        """Stream a shard to a temporary file, hashing as it goes; rename it into place only if
        it matches the manifest. Leaves no file behind on any error."""
        shard = self.manifest.shards[shard_id]
        path = self._paths[shard_id]
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
        digest = hashlib.sha256()
        size = 0
        intact = False
        try:
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)  # a cleaner may have removed it
                chunks = self.store.get_chunks(shard.key, _DOWNLOAD_CHUNK_BYTES)
                with closing(chunks), open(tmp, "wb") as f:
                    for chunk in chunks:
                        if self._closed:
                            raise _Closed(f"data reader of job {self.manifest.job_id!r} closed")
                        if time.monotonic() > deadline:
                            raise ObjectStoreError(
                                f"data shard {self._describe(shard_id)} did not finish "
                                f"downloading within {self.download_timeout_s:g} s "
                                f"(${DOWNLOAD_TIMEOUT_ENV})"
                            )
                        digest.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                        if size > shard.num_bytes:
                            break  # already wrong; don't fill the disk with the rest
                intact = size == shard.num_bytes and digest.hexdigest() == shard.sha256
                # Renamed and counted at once: whoever can open the file sees it counted.
                with self._cv:
                    if intact:
                        os.replace(tmp, path)  # only now does it exist under its trusted name
                    self._stats.downloads += 1
                    self._stats.bytes_downloaded += size
                    self._stats.hash_checks += 1
            except ObjectNotFoundError as exc:
                raise ObjectNotFoundError(
                    f"data shard {shard.key} (samples [{shard.start}, {shard.stop})) of job "
                    f"{self.manifest.job_id!r} is missing from {self.store.url}; package the "
                    "task again."
                ) from exc
            except OSError as exc:  # the local side: disk full, folder removed
                raise ObjectStoreError(
                    f"cannot write data shard {self._describe(shard_id)} to {tmp}: "
                    f"{exc.strerror or exc}"
                ) from exc
            if not intact:
                raise ObjectStoreError(
                    f"data shard {shard.key} of job {self.manifest.job_id!r} in {self.store.url} "
                    f"is corrupt: {size if size <= shard.num_bytes else 'more than'} bytes whose "
                    f"SHA-256 does not match the manifest ({shard.num_bytes} bytes expected); "
                    "package the task again."
                )
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()
        with self._cv:
            self._stats.peak_cache_bytes = max(self._stats.peak_cache_bytes, self._disk_bytes())

    @staticmethod
    def _prefetch_loop(ref: weakref.ref[DataReader], cv: threading.Condition) -> None:
        """The prefetch thread. It holds the reader only weakly while it waits, so a reader its
        owner dropped without close() is collected, and the thread ends with it."""
        while True:
            with cv:
                reader = ref()
                if reader is None or reader._closed:
                    return
                shard_id = reader._next_to_prefetch()
                if shard_id is None:
                    del reader
                    cv.wait(_IDLE_RECHECK_S)
                    continue
            try:
                reader._download(shard_id, time.monotonic() + reader.download_timeout_s)
            except _Closed:
                return
            except Exception as exc:  # kept for the rows() that needs the shard
                with cv:
                    reader._failed[shard_id] = exc
            finally:
                with cv:
                    reader._flights.discard(shard_id)
                    cv.notify_all()
            del reader

    def _next_to_prefetch(self) -> int | None:
        """(Under the lock.) The first planned shard to download now, marked in flight, or None:
        all there, or the next one does not fit beside the planned ones already on disk."""
        ahead_bytes = 0
        for shard_id in self._plan:
            if shard_id in self._failed:
                continue  # surfaces in rows(); not retried behind its back
            size = self.manifest.shards[shard_id].num_bytes
            if shard_id in self._flights or self._is_cached(shard_id):
                ahead_bytes += size
                continue
            if ahead_bytes + size > self.cache_bytes:
                return None
            if not self._make_room(size, all_or_nothing=True):
                return None
            self._flights.add(shard_id)
            return shard_id
        return None

    # -- the local copies (all under the lock) -------------------------------------------------

    def _open_cached(self, shard_id: int) -> int | None:
        """A descriptor on the shard's verified local copy, or None if there is none usable."""
        fd = self._fds.get(shard_id)
        if fd is not None:
            # Another process evicted it: the descriptor still reads, but the space it pins is
            # no longer counted by anyone, so let it go. (Reads under way are safe: a rows()
            # call reads through the descriptors it acquired before, never through this check.)
            if os.fstat(fd).st_nlink > 0:
                self._fds.move_to_end(shard_id)
                return fd
            self._close_fd(shard_id)
        path = self._paths[shard_id]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != self.manifest.shards[shard_id].num_bytes:
            os.close(fd)  # a truncated copy (a full disk, a crash mid-write): fetch it again
            with suppress(FileNotFoundError):
                path.unlink()
            return None
        self._fds[shard_id] = fd
        for other in list(self._fds):
            if len(self._fds) <= MAX_OPEN_SHARDS:
                break
            if other not in self._pins:
                self._close_fd(other)
        return fd

    def _is_cached(self, shard_id: int) -> bool:
        if shard_id in self._fds:
            return True
        try:
            return self._paths[shard_id].stat().st_size == self.manifest.shards[shard_id].num_bytes
        except FileNotFoundError:
            return False

    def _close_fd(self, shard_id: int) -> None:
        fd = self._fds.pop(shard_id, None)
        if fd is not None:
            os.close(fd)

    def _touch(self, shard_id: int, fd: int) -> None:
        """Mark the shard used now, for every reader's LRU order (modification time, in ns,
        strictly increasing within this reader so order never ties)."""
        now_ns = max(time.time_ns(), self._last_touch_ns + 1)
        self._last_touch_ns = now_ns
        with suppress(OSError):
            os.utime(fd, ns=(now_ns, now_ns))

    def _cached_files(self) -> list[tuple[int, str, int]]:
        """``(mtime_ns, name, size)`` of every finished shard file in the folder."""
        files = []
        with suppress(FileNotFoundError), os.scandir(self.cache_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".bin"):
                    continue
                with suppress(FileNotFoundError):
                    st = entry.stat()
                    files.append((st.st_mtime_ns, entry.name, st.st_size))
        return files

    def _disk_bytes(self) -> int:
        return sum(size for _, _, size in self._cached_files())

    def _make_room(self, incoming_bytes: int, *, all_or_nothing: bool = False) -> bool:
        """Evict least recently used files, none planned or pinned, until ``incoming_bytes``
        more fit the budget beside the files and the other downloads in flight. Whether it fits.

        ``all_or_nothing`` (the prefetcher): evict nothing unless that makes it fit, so a
        download that has to wait anyway does not throw away shards for nothing.
        """
        files = self._cached_files()
        in_flight = sum(
            self.manifest.shards[s].num_bytes for s in self._flights if not self._is_cached(s)
        )
        total = sum(size for _, _, size in files) + in_flight + incoming_bytes
        if total <= self.cache_bytes:
            return True
        keep = {self._paths[s].name for s in (*self._plan, *self._pins, *self._flights)}
        victims = [(name, size) for _, name, size in sorted(files) if name not in keep]
        if all_or_nothing and total - sum(size for _, size in victims) > self.cache_bytes:
            return False
        for name, size in victims:
            if total <= self.cache_bytes:
                break
            for shard_id, path in enumerate(self._paths):
                if path.name == name:
                    self._close_fd(shard_id)
            with suppress(FileNotFoundError):
                (self.cache_dir / name).unlink()
                self._stats.evictions += 1
            total -= size
        return total <= self.cache_bytes

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files of downloads that died with their process: a live download
        writes at least a chunk per timeout, so anything older is nobody's."""
        cutoff = time.time() - self.download_timeout_s
        for tmp in self.cache_dir.glob(f".*{_TMP_SUFFIX}"):
            with suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    # -- reading rows --------------------------------------------------------------------------

    def _read_rows(
        self,
        shard_id: int,
        fd: int,
        positions: np.ndarray,
        local: np.ndarray,
        out: tuple[torch.Tensor, ...],
    ) -> None:
        """Fill ``out[t][positions]`` with rows ``local`` of the shard, reading each run of
        consecutive rows with one positioned read per tensor."""
        shard = self.manifest.shards[shard_id]
        unique, inverse = np.unique(local, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        run_starts = np.concatenate(([0], breaks))
        run_stops = np.concatenate((breaks, [len(unique)]))
        section = 0  # where this tensor's rows begin in the shard
        read_bytes = 0
        positions_t = torch.from_numpy(positions)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        for target, row_bytes in zip(out, self._row_bytes, strict=True):
            if row_bytes:
                buffer = bytearray(len(unique) * row_bytes)
                view = memoryview(buffer)
                for a, b in zip(run_starts.tolist(), run_stops.tolist(), strict=True):
                    first_row = int(unique[a])
                    self._pread_exact(
                        shard_id,
                        fd,
                        view[a * row_bytes : b * row_bytes],
                        section + first_row * row_bytes,
                    )
                read_bytes += len(buffer)
                rows = torch.frombuffer(buffer, dtype=target.dtype).view(
                    len(unique), *target.shape[1:]
                )
                target[positions_t] = rows[inverse_t]
            section += (shard.stop - shard.start) * row_bytes
        with self._cv:
            self._stats.bytes_read += read_bytes

    def _pread_exact(self, shard_id: int, fd: int, into: memoryview, offset: int) -> None:
        done = 0
        while done < len(into):
            got = os.preadv(fd, [into[done:]], offset + done)
            if got == 0:
                raise ObjectStoreError(
                    f"the cached copy of data shard {self._describe(shard_id)} ended early at "
                    f"byte {offset + done}; it was truncated after it was verified"
                )
            done += got

    # -- helpers -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ObjectStoreError(
                f"the data reader of job {self.manifest.job_id!r} is closed; build a new one"
            )

    def _describe(self, shard_id: int) -> str:
        shard: Shard = self.manifest.shards[shard_id]
        return f"{shard.key} of job {self.manifest.job_id!r} in {self.store.url}"
