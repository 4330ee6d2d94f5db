"""Checkpoints: committed atomically from the writers' records, verified on read, pruned; against
a local folder and S3 (moto)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.checkpoint import (
    MARKER_NAME,
    Checkpoint,
    CheckpointStore,
    ShardRecord,
    checkpoint_prefix,
)
from smlt.storage.objects import LocalObjectStore, ObjectStore

pytest_plugins = ["tests.s3_server"]

JOB = "job-1"


@pytest.fixture
def ckpts(store: ObjectStore) -> CheckpointStore:
    return CheckpointStore(store, JOB)


def shard_bytes(iteration: int, kind: str, shard: int) -> bytes:
    """Distinct, recognisable bytes per (iteration, kind, shard), of varying size."""
    return f"{kind}/{iteration}/{shard}|".encode() * (10 + shard)


Reported = dict[int, dict[str, list[Any]]]


def reported(records: Iterable[ShardRecord]) -> Reported:
    """The writers' reports of ``records``, as the scheduler hands them to ``commit``: per shard,
    ``{"param": [size_bytes, sha256], "optim": [...]}``."""
    out: Reported = {}
    for rec in records:
        out.setdefault(rec.shard, {})[rec.kind] = [rec.size_bytes, rec.sha256]
    return out


def write_all(ckpts: CheckpointStore, iteration: int, workers: int) -> Reported:
    return reported(
        ckpts.write_shard(iteration, s, kind, shard_bytes(iteration, kind, s))
        for s in range(workers)
        for kind in ("param", "optim")
    )


def checkpoint_at(ckpts: CheckpointStore, iteration: int, workers: int = 2) -> Checkpoint:
    shards = write_all(ckpts, iteration, workers)
    return ckpts.commit(iteration, workers, num_params=100, meta={"at": iteration}, shards=shards)


def test_write_commit_load_round_trip(ckpts: CheckpointStore, store: ObjectStore) -> None:
    assert ckpts.latest() is None
    assert ckpts.list_committed() == []
    shards = write_all(ckpts, 40, workers=3)
    meta = {"history": [{"t": 0, "loss": 2.5}, {"t": 1, "loss": float("nan")}], "sampler": [3, 7]}
    committed = ckpts.commit(40, workers=3, num_params=1234, meta=meta, shards=shards)

    for checkpoint in (committed, ckpts.latest(), ckpts.load(40)):
        assert checkpoint is not None
        assert (checkpoint.iteration, checkpoint.workers, checkpoint.num_params) == (40, 3, 1234)
        assert checkpoint.meta["sampler"] == [3, 7]
        assert checkpoint.meta["history"][0] == {"t": 0, "loss": 2.5}
        assert checkpoint.created_unix_s > 1.6e9
        assert len(checkpoint.shards) == 6
        for s in range(3):
            for kind in ("param", "optim"):
                assert checkpoint.read_shard(kind, s) == shard_bytes(40, kind, s)
    assert ckpts.list_committed() == [40]

    # The layout other tools (and the fault-tolerance tests) rely on, and the marker's content.
    prefix = checkpoint_prefix(JOB, 40)
    assert prefix == "jobs/job-1/checkpoints/000000040/"
    assert store.list(prefix) == sorted(
        [prefix + MARKER_NAME]
        + [f"{prefix}{k}-{s}.bin" for s in range(3) for k in ("param", "optim")]
    )
    marker = json.loads(store.get_bytes(prefix + MARKER_NAME))
    assert (marker["iteration"], marker["workers"], marker["num_params"]) == (40, 3, 1234)
    param1 = next(e for e in marker["shards"] if e["name"] == "param-1.bin")
    data = shard_bytes(40, "param", 1)
    assert param1["size_bytes"] == len(data)
    assert param1["sha256"] == hashlib.sha256(data).hexdigest()


def test_latest_is_the_highest_committed_iteration(ckpts: CheckpointStore) -> None:
    # Committed out of order; 1000000000 has ten digits and must still sort after 5.
    for iteration in (20, 5, 1_000_000_000, 100):
        checkpoint_at(ckpts, iteration)
    latest = ckpts.latest()
    assert latest is not None and latest.iteration == 1_000_000_000
    assert ckpts.list_committed() == [5, 20, 100, 1_000_000_000]


def test_uncommitted_newer_folder_is_ignored(ckpts: CheckpointStore) -> None:
    checkpoint_at(ckpts, 10)
    write_all(ckpts, 20, workers=2)  # every shard there, but nobody committed
    latest = ckpts.latest()
    assert latest is not None and latest.iteration == 10
    assert ckpts.list_committed() == [10]
    with pytest.raises(ObjectNotFoundError, match="no committed checkpoint at iteration 20"):
        ckpts.load(20)


def test_corrupted_shard_raises_naming_the_object(
    ckpts: CheckpointStore, store: ObjectStore
) -> None:
    checkpoint = checkpoint_at(ckpts, 7)
    key = checkpoint_prefix(JOB, 7) + "optim-1.bin"
    good = store.get_bytes(key)
    store.put_bytes(key, bytes([good[0] ^ 1]) + good[1:])  # same size, one bit flipped
    with pytest.raises(ObjectStoreError, match="corrupted") as info:
        checkpoint.read_shard("optim", 1)
    assert key in str(info.value)
    # A fresh load sees the same: the hash lives in the marker, not in memory.
    with pytest.raises(ObjectStoreError, match="optim-1.bin"):
        ckpts.load(7).read_shard("optim", 1)
    # Truncation is caught too, and the untouched shards still read fine.
    store.put_bytes(key, good[:-1])
    with pytest.raises(ObjectStoreError, match="corrupted"):
        checkpoint.read_shard("optim", 1)
    assert checkpoint.read_shard("optim", 0) == shard_bytes(7, "optim", 0)


def test_commit_with_a_missing_shard_raises_naming_it(
    ckpts: CheckpointStore, store: ObjectStore
) -> None:
    shards = write_all(ckpts, 3, workers=2)
    store.delete_prefix(checkpoint_prefix(JOB, 3) + "optim-1.bin")  # reported, then lost
    with pytest.raises(ObjectStoreError, match="missing") as info:
        ckpts.commit(3, workers=2, num_params=10, meta={}, shards=shards)
    assert not isinstance(info.value, ObjectNotFoundError)
    assert checkpoint_prefix(JOB, 3) + "optim-1.bin" in str(info.value)
    assert not store.exists(checkpoint_prefix(JOB, 3) + MARKER_NAME)
    assert ckpts.latest() is None


class CountingStore(ObjectStore):
    """Another store, counting the objects read from it."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.reads: list[str] = []

    @property
    def url(self) -> str:
        return self.inner.url

    def put_bytes(self, key: str, data: bytes) -> None:
        self.inner.put_bytes(key, data)

    def put_file(self, key: str, src: Path) -> None:
        self.inner.put_file(key, src)

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return self.inner.get_bytes(key)

    def get_file(self, key: str, dest: Path) -> None:
        self.reads.append(key)
        self.inner.get_file(key, dest)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)


def test_commit_downloads_nothing(store: ObjectStore) -> None:
    counting = CountingStore(store)
    ckpts = CheckpointStore(counting, JOB)
    shards = write_all(ckpts, 12, workers=3)
    counting.reads.clear()
    checkpoint = ckpts.commit(12, workers=3, num_params=5, meta={}, shards=shards)
    assert counting.reads == []
    assert checkpoint.record("optim", 2).sha256 == shards[2]["optim"][1]


def test_a_misreported_size_is_caught_at_the_commit_or_at_the_first_read(
    ckpts: CheckpointStore, store: ObjectStore
) -> None:
    shards = write_all(ckpts, 5, workers=2)
    shards[1]["param"][0] += 1
    key = checkpoint_prefix(JOB, 5) + "param-1.bin"
    if isinstance(store, LocalObjectStore):  # a folder tells sizes cheaply: refused at once
        with pytest.raises(ObjectStoreError, match="its writer reported") as info:
            ckpts.commit(5, workers=2, num_params=10, meta={}, shards=shards)
        assert key in str(info.value)
        assert ckpts.latest() is None
    else:  # S3 would need a request per shard to tell: the first read catches it
        checkpoint = ckpts.commit(5, workers=2, num_params=10, meta={}, shards=shards)
        with pytest.raises(ObjectStoreError, match="corrupted") as info:
            checkpoint.read_shard("param", 1)
        assert key in str(info.value)


def test_a_misreported_hash_is_caught_at_the_first_read(ckpts: CheckpointStore) -> None:
    shards = write_all(ckpts, 5, workers=2)
    shards[0]["optim"][1] = hashlib.sha256(b"something else").hexdigest()
    checkpoint = ckpts.commit(5, workers=2, num_params=10, meta={}, shards=shards)
    with pytest.raises(ObjectStoreError, match="corrupted"):
        checkpoint.read_shard("optim", 0)
    assert checkpoint.read_shard("param", 0) == shard_bytes(5, "param", 0)


@pytest.mark.parametrize(
    "damage",
    [
        lambda shards: shards.pop(1),
        lambda shards: shards.__setitem__(1, None),
        lambda shards: shards[1].pop("optim"),
        lambda shards: shards[1].__setitem__("optim", [12]),
        lambda shards: shards[1].__setitem__("optim", [-1, "a" * 64]),
        lambda shards: shards[1].__setitem__("optim", ["twelve", "a" * 64]),
        lambda shards: shards[1].__setitem__("optim", [12, "not a sha256"]),
        lambda shards: shards[1].__setitem__("optim", "12 bytes"),
    ],
    ids=["no-rank", "rank-none", "no-kind", "short", "negative", "not-int", "bad-hash", "str"],
)
def test_a_missing_or_malformed_record_is_refused_naming_the_shard(
    ckpts: CheckpointStore, damage: Any
) -> None:
    shards = write_all(ckpts, 8, workers=2)
    damage(shards)
    with pytest.raises(ObjectStoreError, match=r"(param|optim)-1\.bin") as info:
        ckpts.commit(8, workers=2, num_params=10, meta={}, shards=shards)
    assert "cannot commit checkpoint 8" in str(info.value)
    assert ckpts.latest() is None


def test_prune_keeps_the_newest(ckpts: CheckpointStore, store: ObjectStore) -> None:
    for iteration in (10, 20, 30, 40):
        checkpoint_at(ckpts, iteration)
    write_all(ckpts, 15, workers=2)  # abandoned: older than the newest commit
    write_all(ckpts, 50, workers=2)  # in progress: newer than the newest commit
    store.put_bytes(f"jobs/{JOB}/checkpoints/notes.txt", b"not a checkpoint")

    assert ckpts.prune(keep=2) == [10, 15, 20]
    assert ckpts.list_committed() == [30, 40]
    for gone in (10, 15, 20):
        assert store.list(checkpoint_prefix(JOB, gone)) == []
    assert len(store.list(checkpoint_prefix(JOB, 50))) == 4  # still being written: left alone
    assert store.exists(f"jobs/{JOB}/checkpoints/notes.txt")
    assert ckpts.load(30).read_shard("param", 1) == shard_bytes(30, "param", 1)

    assert ckpts.prune(keep=5) == []
    assert ckpts.list_committed() == [30, 40]
    with pytest.raises(ConfigError):
        ckpts.prune(keep=0)


def test_rewriting_identical_bytes_is_idempotent(ckpts: CheckpointStore) -> None:
    first = ckpts.write_shard(9, 0, "param", b"same bytes")
    again = ckpts.write_shard(9, 0, "param", b"same bytes")
    assert first == again
    assert first.sha256 == hashlib.sha256(b"same bytes").hexdigest() and first.size_bytes == 10
    shards = reported([first, ckpts.write_shard(9, 0, "optim", b"state")])
    checkpoint = ckpts.commit(9, workers=1, num_params=3, meta={}, shards=shards)
    # A re-executed owner after the commit: same bytes are fine, and the checkpoint still reads.
    ckpts.write_shard(9, 0, "param", b"same bytes")
    assert ckpts.commit(9, workers=1, num_params=3, meta={}, shards=shards).shards == (
        checkpoint.shards
    )
    assert checkpoint.read_shard("param", 0) == b"same bytes"
    # Different bytes would silently invalidate the commit: refused, and nothing changes.
    with pytest.raises(ObjectStoreError, match="refusing to overwrite"):
        ckpts.write_shard(9, 0, "param", b"other bytes")
    assert checkpoint.read_shard("param", 0) == b"same bytes"


def test_rewriting_before_the_commit_takes_the_last_bytes(ckpts: CheckpointStore) -> None:
    ckpts.write_shard(2, 0, "param", b"draft")
    shards = reported([ckpts.write_shard(2, 0, "param", b"final")])
    shards[0].update(reported([ckpts.write_shard(2, 0, "optim", b"o")])[0])
    assert ckpts.commit(2, 1, 1, {}, shards).read_shard("param", 0) == b"final"


def test_write_full(ckpts: CheckpointStore) -> None:
    checkpoint = ckpts.write_full(60, b"all params", b"all state", {"epoch": 3}, num_params=77)
    latest = ckpts.latest()
    assert latest == checkpoint
    assert (latest.iteration, latest.workers, latest.num_params) == (60, 1, 77)
    assert latest.read_shard("param", 0) == b"all params"
    assert latest.read_shard("optim", 0) == b"all state"
    assert latest.meta == {"epoch": 3}
    with pytest.raises(ObjectNotFoundError, match="param-1.bin"):
        latest.read_shard("param", 1)


def test_checkpoints_of_other_jobs_are_invisible(store: ObjectStore) -> None:
    checkpoint_at(CheckpointStore(store, "job-10"), 50)
    mine = CheckpointStore(store, "job-1")
    assert mine.latest() is None  # "jobs/job-1" is a string prefix of "jobs/job-10"
    checkpoint_at(mine, 4)
    assert mine.list_committed() == [4]


def test_unreadable_marker_is_named(ckpts: CheckpointStore, store: ObjectStore) -> None:
    checkpoint_at(ckpts, 8)
    key = checkpoint_prefix(JOB, 8) + MARKER_NAME
    store.put_bytes(key, b"{not json")
    with pytest.raises(ObjectStoreError, match="unreadable") as info:
        ckpts.latest()
    assert key in str(info.value)


def test_bad_arguments_are_config_errors(store: ObjectStore) -> None:
    with pytest.raises(ConfigError):
        CheckpointStore(store, "a/b")
    ckpts = CheckpointStore(store, JOB)
    with pytest.raises(ConfigError):
        ckpts.write_shard(-1, 0, "param", b"")
    with pytest.raises(ConfigError):
        ckpts.write_shard(1, 0, "grad", b"")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ckpts.commit(1, workers=0, num_params=1, meta={}, shards={})
    shards = write_all(ckpts, 1, workers=1)
    with pytest.raises(ConfigError, match="JSON"):
        ckpts.commit(1, workers=1, num_params=1, meta={"x": object()}, shards=shards)
    assert ckpts.latest() is None
