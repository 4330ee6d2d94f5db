"""Checkpoints: committed atomically, verified on read, against a local folder and S3 (moto)."""

from __future__ import annotations

import hashlib
import json

import pytest

from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.checkpoint import MARKER_NAME, Checkpoint, CheckpointStore, checkpoint_prefix
from smlt.storage.objects import ObjectStore

pytest_plugins = ["tests.s3_server"]

JOB = "job-1"


@pytest.fixture
def ckpts(store: ObjectStore) -> CheckpointStore:
    return CheckpointStore(store, JOB)


def shard_bytes(iteration: int, kind: str, shard: int) -> bytes:
    """Distinct, recognisable bytes per (iteration, kind, shard), of varying size."""
    return f"{kind}/{iteration}/{shard}|".encode() * (10 + shard)


def write_all(ckpts: CheckpointStore, iteration: int, workers: int) -> None:
    for s in range(workers):
        for kind in ("param", "optim"):
            ckpts.write_shard(iteration, s, kind, shard_bytes(iteration, kind, s))


def checkpoint_at(ckpts: CheckpointStore, iteration: int, workers: int = 2) -> Checkpoint:
    write_all(ckpts, iteration, workers)
    return ckpts.commit(iteration, workers, num_params=100, meta={"at": iteration})


def test_write_commit_load_round_trip(ckpts: CheckpointStore, store: ObjectStore) -> None:
    assert ckpts.latest() is None
    assert ckpts.list_committed() == []
    write_all(ckpts, 40, workers=3)
    meta = {"history": [{"t": 0, "loss": 2.5}, {"t": 1, "loss": float("nan")}], "sampler": [3, 7]}
    committed = ckpts.commit(40, workers=3, num_params=1234, meta=meta)

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
    ckpts.write_shard(3, 0, "param", b"p0")
    ckpts.write_shard(3, 0, "optim", b"o0")
    ckpts.write_shard(3, 1, "param", b"p1")  # rank 1 died before its optimizer state
    with pytest.raises(ObjectStoreError, match="missing") as info:
        ckpts.commit(3, workers=2, num_params=10, meta={})
    assert not isinstance(info.value, ObjectNotFoundError)
    assert checkpoint_prefix(JOB, 3) + "optim-1.bin" in str(info.value)
    assert not store.exists(checkpoint_prefix(JOB, 3) + MARKER_NAME)
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
    ckpts.write_shard(9, 0, "optim", b"state")
    checkpoint = ckpts.commit(9, workers=1, num_params=3, meta={})
    # A re-executed owner after the commit: same bytes are fine, and the checkpoint still reads.
    ckpts.write_shard(9, 0, "param", b"same bytes")
    assert ckpts.commit(9, workers=1, num_params=3, meta={}).shards == checkpoint.shards
    assert checkpoint.read_shard("param", 0) == b"same bytes"
    # Different bytes would silently invalidate the commit: refused, and nothing changes.
    with pytest.raises(ObjectStoreError, match="refusing to overwrite"):
        ckpts.write_shard(9, 0, "param", b"other bytes")
    assert checkpoint.read_shard("param", 0) == b"same bytes"


def test_rewriting_before_the_commit_takes_the_last_bytes(ckpts: CheckpointStore) -> None:
    ckpts.write_shard(2, 0, "param", b"draft")
    ckpts.write_shard(2, 0, "param", b"final")
    ckpts.write_shard(2, 0, "optim", b"o")
    assert ckpts.commit(2, 1, 1, {}).read_shard("param", 0) == b"final"


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
        ckpts.commit(1, workers=0, num_params=1, meta={})
    ckpts.write_shard(1, 0, "param", b"p")
    ckpts.write_shard(1, 0, "optim", b"o")
    with pytest.raises(ConfigError, match="JSON"):
        ckpts.commit(1, workers=1, num_params=1, meta={"x": object()})
    assert ckpts.latest() is None
