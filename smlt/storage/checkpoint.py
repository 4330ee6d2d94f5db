"""Checkpoints in the object store, committed atomically: a marker written last.

Redis may be ephemeral, so every K iterations and at every generation boundary the job's state is
copied to the object store. Layout, under ``jobs/<job>/checkpoints/<iteration:09d>/``::

    param-<s>.bin  optim-<s>.bin   for every shard s; written by the shard's owner, in parallel
    COMMITTED.json                 written last, by the scheduler, once every shard is there

The bytes of a shard are the caller's business (in smlt, :mod:`smlt.sync.codec` frames); this
module stores them and their sha256. The marker holds the iteration, the sharding (``workers``,
``num_params``), every shard's name, size and hash, the time of the commit and the caller's
``meta`` (JSON: the history so far, the sampler position). The sizes and hashes are the ones the
writers computed from the bytes in hand and reported: the commit checks that every shard is
there without downloading the checkpoint again.

Why a marker: object stores make single writes atomic but not groups of writes. A folder without
its marker is invisible to :meth:`CheckpointStore.latest` and :meth:`CheckpointStore.load`, so a
checkpoint interrupted halfway (a worker killed mid-upload, the scheduler dying before the commit)
is never restored; the previous one is. Every shard is checked against its committed hash when
read, so a shard changed after the commit is caught, named, and never loaded into a model.

Shard writes are idempotent: smlt's writes are deterministic (DESIGN §3), so a re-executed owner
writes the same bytes again. Changing a shard of an already committed checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.objects import LocalObjectStore, ObjectStore

__all__ = [
    "MARKER_NAME",
    "Checkpoint",
    "CheckpointStore",
    "ShardKind",
    "ShardRecord",
    "checkpoint_prefix",
]

ShardKind = Literal["param", "optim"]
_KINDS: tuple[ShardKind, ...] = get_args(ShardKind)

#: The object whose presence makes a checkpoint folder a checkpoint.
MARKER_NAME = "COMMITTED.json"
_MARKER_VERSION = 1
_FOLDER = re.compile(r"[0-9]{9,}")  # ``{iteration:09d}``: 9 digits, more past 10**9
_SHA256 = re.compile(r"[0-9a-f]{64}")


def checkpoint_prefix(job_id: str, iteration: int) -> str:
    """The folder of ``job_id``'s checkpoint at ``iteration``, ending in ``/``.

    The trailing slash matters for prefix operations: without it iteration 100000000 would be a
    prefix of iteration 1000000000.
    """
    return f"jobs/{job_id}/checkpoints/{iteration:09d}/"


def _shard_name(kind: ShardKind, shard: int) -> str:
    return f"{kind}-{shard}.bin"


@dataclass(frozen=True)
class ShardRecord:
    """One stored shard: where it is and what it must hash to."""

    kind: ShardKind
    shard: int
    key: str
    size_bytes: int
    sha256: str

    @classmethod
    def of(cls, kind: ShardKind, shard: int, key: str, data: bytes) -> ShardRecord:
        return cls(kind, shard, key, len(data), hashlib.sha256(data).hexdigest())

    @property
    def name(self) -> str:
        return _shard_name(self.kind, self.shard)


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint. Reading a shard verifies it against the committed hash.

    ``meta`` is the caller's dictionary as decoded from the marker's JSON (so tuples come back as
    lists); ``workers`` is the sharding the shards were written with, which need not be the
    sharding of the generation that restores them.
    """

    store: ObjectStore = field(repr=False)
    prefix: str
    iteration: int
    workers: int
    num_params: int
    shards: tuple[ShardRecord, ...]
    created_unix_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self, kind: ShardKind, shard: int) -> ShardRecord:
        """The committed record of one shard; ObjectNotFoundError if there is none."""
        for rec in self.shards:
            if rec.kind == kind and rec.shard == shard:
                return rec
        raise ObjectNotFoundError(
            f"checkpoint {self.iteration} in {self.store.url}/{self.prefix} has no shard "
            f"{_shard_name(kind, shard)} (it was written by {self.workers} workers)"
        )

    def read_shard(self, kind: ShardKind, shard: int) -> bytes:
        """The shard's bytes, checked against the committed size and sha256.

        A mismatch is :class:`~smlt.errors.ObjectStoreError` naming the object: the object was
        changed after the commit, and loading it would silently corrupt the model.
        """
        rec = self.record(kind, shard)
        data = self.store.get_bytes(rec.key)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != rec.size_bytes or digest != rec.sha256:
            raise ObjectStoreError(
                f"checkpoint object {self.store.url}/{rec.key} is corrupted: it has "
                f"{len(data)} bytes with sha256 {digest[:16]}..., but the commit recorded "
                f"{rec.size_bytes} bytes with sha256 {rec.sha256[:16]}..."
            )
        return data


class CheckpointStore:
    """The checkpoints of one job in one object store.

    Cheap to construct and holds no state besides its arguments, so every process (each worker
    for its own shards, the scheduler for the commit, the driver for the restore) makes its own.
    """

    def __init__(self, store: ObjectStore, job_id: str) -> None:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ConfigError(
                f"job id {job_id!r} cannot name a checkpoint folder: it must be non-empty, "
                "contain no '/' and not start with '.'"
            )
        self.store = store
        self.job_id = job_id
        self.root = f"jobs/{job_id}/checkpoints/"

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store!r}, {self.job_id!r})"

    def _prefix(self, iteration: int) -> str:
        if iteration < 0:
            raise ConfigError(f"checkpoint iteration must be >= 0, got {iteration}")
        return checkpoint_prefix(self.job_id, iteration)

    def _key(self, iteration: int, kind: ShardKind, shard: int) -> str:
        if kind not in _KINDS:
            raise ConfigError(f"checkpoint shard kind {kind!r} is not one of {', '.join(_KINDS)}")
        if shard < 0:
            raise ConfigError(f"checkpoint shard must be >= 0, got {shard}")
        return self._prefix(iteration) + _shard_name(kind, shard)

    # -- writing -------------------------------------------------------------------------------

    def write_shard(self, iteration: int, shard: int, kind: ShardKind, data: bytes) -> ShardRecord:
        """Store one shard of ``iteration``; returns its record.

        Idempotent: writing the same bytes again is harmless, which is what a re-executed owner
        does. If ``iteration`` is already committed, identical bytes are a no-op and different
        bytes are refused (ObjectStoreError): the commit vouches for the old ones.
        """
        key = self._key(iteration, kind, shard)
        record = ShardRecord.of(kind, shard, key, bytes(data))
        committed = self._committed_record(iteration, kind, shard)
        if committed is not None:
            if (committed.sha256, committed.size_bytes) != (record.sha256, record.size_bytes):
                raise ObjectStoreError(
                    f"refusing to overwrite {self.store.url}/{key}: checkpoint {iteration} is "
                    "committed with different bytes for it (a non-deterministic re-execution?)"
                )
            return record
        self.store.put_bytes(key, data)
        return record

    def commit(
        self,
        iteration: int,
        workers: int,
        num_params: int,
        meta: Mapping[str, Any],
        shards: Mapping[int, Mapping[str, Sequence[Any]] | None],
    ) -> Checkpoint:
        """Make ``iteration`` a checkpoint from its writers' records, then write the marker.

        ``shards`` is what each owner reported about the shards it wrote:
        ``{s: {"param": [size_bytes, sha256], "optim": [size_bytes, sha256]}}`` for every s in
        ``range(workers)`` (a worker's ``checkpoint_shards``). Nothing is downloaded: one listing
        of the folder proves every shard is there, and where the store tells sizes cheaply (a
        local folder) each size is checked too. The hashes are the writers', and every later
        read verifies them (:meth:`Checkpoint.read_shard`), so a shard that does not match is
        still never loaded. A missing shard, a missing or malformed record, or a size that
        disagrees is ObjectStoreError naming the object, and no marker is written. Committing
        the same iteration again rewrites the marker (atomically).
        """
        if workers < 1:
            raise ConfigError(f"a checkpoint needs workers >= 1, got {workers}")
        what = f"cannot commit checkpoint {iteration} of job {self.job_id}"
        prefix = self._prefix(iteration)
        stored = _stored_sizes(self.store, prefix)
        records = []
        for s in range(workers):
            for kind in _KINDS:
                key = self._key(iteration, kind, s)
                record = _reported_record(kind, s, key, shards.get(s), f"{what}: shard {s}")
                if key not in stored:
                    raise ObjectStoreError(
                        f"{what}: shard {self.store.url}/{key} is missing "
                        f"({workers} workers expected)"
                    )
                size = stored[key]
                if size is not None and size != record.size_bytes:
                    raise ObjectStoreError(
                        f"{what}: shard {self.store.url}/{key} has {size} bytes, but its "
                        f"writer reported {record.size_bytes}"
                    )
                records.append(record)
        return self._write_marker(iteration, workers, num_params, records, meta)

    def write_full(
        self,
        iteration: int,
        params: bytes,
        optim: bytes,
        meta: Mapping[str, Any],
        *,
        num_params: int,
    ) -> Checkpoint:
        """A whole-vector checkpoint from a single writer (the scheduler at a generation
        boundary): shard 0 of 1 worker, committed at once.

        ``num_params`` is required because the bytes are opaque here, and a restore needs the
        parameter count to re-shard. The hashes come from the bytes in hand; there is nothing to
        read back.
        """
        records = [
            self.write_shard(iteration, 0, "param", params),
            self.write_shard(iteration, 0, "optim", optim),
        ]
        return self._write_marker(iteration, 1, num_params, records, meta)

    def _write_marker(
        self,
        iteration: int,
        workers: int,
        num_params: int,
        records: Iterable[ShardRecord],
        meta: Mapping[str, Any],
    ) -> Checkpoint:
        if num_params < 0:
            raise ConfigError(f"num_params must be >= 0, got {num_params}")
        records = tuple(records)
        created_unix_s = time.time()
        marker = {
            "version": _MARKER_VERSION,
            "iteration": iteration,
            "workers": workers,
            "num_params": num_params,
            "shards": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shard": r.shard,
                    "size_bytes": r.size_bytes,
                    "sha256": r.sha256,
                }
                for r in records
            ],
            "created_unix_s": created_unix_s,
            "meta": dict(meta),
        }
        try:
            text = json.dumps(marker, indent=1)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"checkpoint {iteration} meta is not JSON-serializable: {exc}"
            ) from None
        prefix = self._prefix(iteration)
        self.store.put_bytes(prefix + MARKER_NAME, text.encode())
        # Decoded back from the JSON, so the returned checkpoint equals what load() will give.
        return self._from_marker(prefix, json.loads(text))

    # -- reading -------------------------------------------------------------------------------

    def list_committed(self) -> list[int]:
        """The committed iterations, oldest first."""
        return sorted(it for it, committed in self._folders().items() if committed)

    def latest(self) -> Checkpoint | None:
        """The newest committed checkpoint, or None if there is none. Uncommitted folders
        (a checkpoint still being written, or abandoned halfway) are ignored."""
        committed = self.list_committed()
        return self.load(committed[-1]) if committed else None

    def load(self, iteration: int) -> Checkpoint:
        """The committed checkpoint at ``iteration``; ObjectNotFoundError if it is not committed."""
        prefix = self._prefix(iteration)
        key = prefix + MARKER_NAME
        try:
            raw = self.store.get_bytes(key)
        except ObjectNotFoundError:
            raise ObjectNotFoundError(
                f"no committed checkpoint at iteration {iteration} of job {self.job_id}: "
                f"{self.store.url}/{key} does not exist"
            ) from None
        try:
            marker = json.loads(raw)
            checkpoint = self._from_marker(prefix, marker)
        except (ValueError, KeyError, TypeError) as exc:
            raise ObjectStoreError(
                f"checkpoint marker {self.store.url}/{key} is unreadable: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if checkpoint.iteration != iteration:
            raise ObjectStoreError(
                f"checkpoint marker {self.store.url}/{key} claims iteration "
                f"{checkpoint.iteration}; it was copied or moved by hand"
            )
        return checkpoint

    def _from_marker(self, prefix: str, marker: dict[str, Any]) -> Checkpoint:
        if marker["version"] != _MARKER_VERSION:
            raise ValueError(f"marker version {marker['version']!r}, expected {_MARKER_VERSION}")
        shards = []
        for entry in marker["shards"]:
            kind, shard = entry["kind"], int(entry["shard"])
            if kind not in _KINDS:
                raise ValueError(f"shard kind {kind!r}")
            shards.append(
                ShardRecord(
                    kind,
                    shard,
                    prefix + _shard_name(kind, shard),
                    int(entry["size_bytes"]),
                    str(entry["sha256"]),
                )
            )
        return Checkpoint(
            store=self.store,
            prefix=prefix,
            iteration=int(marker["iteration"]),
            workers=int(marker["workers"]),
            num_params=int(marker["num_params"]),
            shards=tuple(shards),
            created_unix_s=float(marker["created_unix_s"]),
            meta=dict(marker["meta"]),
        )

    def _committed_record(self, iteration: int, kind: ShardKind, shard: int) -> ShardRecord | None:
        """The record of a shard of a committed ``iteration``; None if not committed (or the
        shard is not part of it)."""
        try:
            checkpoint = self.load(iteration)
        except ObjectNotFoundError:
            return None
        try:
            return checkpoint.record(kind, shard)
        except ObjectNotFoundError:
            return None

    def _folders(self) -> dict[int, bool]:
        """Every checkpoint folder of the job: iteration → committed. One listing."""
        folders: dict[int, bool] = {}
        for key in self.store.list(self.root):
            folder, _, name = key[len(self.root) :].partition("/")
            if not _FOLDER.fullmatch(folder) or not name:
                continue  # not ours: leave unknown objects alone
            iteration = int(folder)
            folders[iteration] = folders.get(iteration, False) or name == MARKER_NAME
        return folders

    # -- cleaning up ---------------------------------------------------------------------------

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` committed checkpoints; return what was deleted.

        Uncommitted folders older than the newest committed checkpoint go too: nothing will ever
        commit them. Newer uncommitted folders are left alone; they may be being written right
        now. ``keep`` must be >= 1: removing the only restart point is not a clean-up.

        A committed checkpoint loses its marker first, so a prune interrupted halfway leaves an
        uncommitted folder (ignored, and pruned next time), never a marker without its shards.
        """
        if keep < 1:
            raise ConfigError(f"prune(keep={keep}): keep at least 1 committed checkpoint")
        folders = self._folders()
        committed = sorted(it for it, done in folders.items() if done)
        if not committed:
            return []
        doomed = committed[:-keep]
        stale = [it for it, done in folders.items() if not done and it < committed[-1]]
        for iteration in doomed:
            self.store.delete_prefix(self._prefix(iteration) + MARKER_NAME)
        for iteration in sorted({*doomed, *stale}):
            self.store.delete_prefix(self._prefix(iteration))
        return sorted({*doomed, *stale})


def _reported_record(
    kind: ShardKind, shard: int, key: str, reported: Mapping[str, Sequence[Any]] | None, what: str
) -> ShardRecord:
    """The record of one shard from its writer's report ``{kind: [size_bytes, sha256]}``."""
    entry = None if reported is None else reported.get(kind)
    if entry is None:
        raise ObjectStoreError(f"{what}: its writer reported no {_shard_name(kind, shard)}")
    try:
        size, digest = entry
        size_bytes = int(size)
    except (TypeError, ValueError):
        size_bytes, digest = -1, None
    if size_bytes < 0 or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ObjectStoreError(
            f"{what}: the reported record of {_shard_name(kind, shard)} is {entry!r}, "
            "not [size_bytes, sha256]"
        )
    return ShardRecord(kind, shard, key, size_bytes, digest)


def _stored_sizes(store: ObjectStore, prefix: str) -> dict[str, int | None]:
    """The objects under ``prefix`` (one listing) with their sizes where they are cheap to
    know: a local folder stats its files. The store interface has no sizes (S3's listing has
    them, so one day it may); None means "exists, size unknown"."""
    keys = store.list(prefix)
    if not isinstance(store, LocalObjectStore):
        return dict.fromkeys(keys)
    sizes: dict[str, int | None] = {}
    for key in keys:
        try:
            sizes[key] = store.root.joinpath(*key.split("/")).stat().st_size
        except OSError:
            continue  # deleted since the listing: missing
    return sizes
