"""The streaming data reader, on real packaged data, against the local store and S3 (moto)."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Generator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
import torch

from smlt.client.artifacts import package_task
from smlt.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from smlt.storage.artifacts import ArtifactManifest
from smlt.storage.objects import LocalObjectStore, ObjectStore
from smlt.storage.reader import CACHE_BYTES_ENV, DataReader, default_cache_bytes
from smlt.task import TaskData, check_task, load_task

pytest_plugins = ["tests.s3_server"]

DIGITS = str(Path(__file__).resolve().parent.parent / "examples" / "digits.py") + ":Digits"
DIGITS_TRAIN_SAMPLES = 1347
DIGITS_BYTES_PER_SAMPLE = 64 * 4 + 8  # float32 pixels + int64 label
SHARD_SAMPLES = 100
SHARD_BYTES = SHARD_SAMPLES * DIGITS_BYTES_PER_SAMPLE  # 14 shards, the last one 47 samples
SMALL_SHARD_BYTES = SHARD_BYTES + 7
NUM_SHARDS = 14
WAIT_S = 20.0  # the bound on every wait for the prefetch thread


@pytest.fixture(scope="module")
def digits_data() -> tuple[torch.Tensor, ...]:
    data = check_task(load_task(DIGITS))
    assert isinstance(data, TaskData)  # digits is an in-memory data set
    return data.tensors


def _package(store: ObjectStore, job: str) -> ArtifactManifest:
    manifest = package_task(DIGITS, store, job, shard_bytes=SMALL_SHARD_BYTES)
    assert len(manifest.shards) == NUM_SHARDS
    return manifest


def _shard_files(cache: Path) -> dict[str, int]:
    """Name -> size of every file in the reader's shards folder (temporaries included)."""
    folder = cache / "shards"
    files = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        with suppress(FileNotFoundError):  # renamed or evicted by the prefetch thread meanwhile
            files[path.name] = path.stat().st_size
    return files


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.01)


def _prefetch_threads(job: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"smlt-prefetch-{job}"]


class GatedStore(LocalObjectStore):
    """A local store whose downloads can be made to fail or to stall, per key."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail_once: set[str] = set()
        self.stall: set[str] = set()
        self.release = threading.Event()
        self.failed = threading.Event()
        self.started: list[str] = []
        self.before_first_chunk: Callable[[str], None] | None = None

    def get_chunks(self, key: str, chunk_bytes: int = 8 * 2**20) -> Generator[bytes, None, None]:
        self.started.append(key)
        if key in self.fail_once:
            self.fail_once.discard(key)
            self.failed.set()
            raise ObjectStoreError(f"injected failure reading {key}")
        if self.before_first_chunk is not None:
            self.before_first_chunk(key)
        for chunk in super().get_chunks(key, 4096):
            if key in self.stall:
                self.release.wait(WAIT_S)  # bounded: a broken test ends, it does not hang
            yield chunk


# -- the object store's streaming get --------------------------------------------------------


def test_get_chunks_streams_the_object(store: ObjectStore) -> None:
    payload = os.urandom(20_000)
    store.put_bytes("jobs/j/blob.bin", payload)
    for chunks in (
        list(store.get_chunks("jobs/j/blob.bin", 4096)),
        list(ObjectStore.get_chunks(store, "jobs/j/blob.bin", 4096)),  # the fallback
    ):
        assert b"".join(chunks) == payload
        assert all(0 < len(c) <= 4096 for c in chunks) and len(chunks) >= 5
    store.put_bytes("jobs/j/empty", b"")
    assert b"".join(store.get_chunks("jobs/j/empty")) == b""
    with pytest.raises(ObjectNotFoundError, match="missing.bin"):
        next(store.get_chunks("jobs/j/missing.bin"))
    # A caller that stops early closes the generator without reading the rest.
    stream = store.get_chunks("jobs/j/blob.bin", 4096)
    assert len(next(stream)) == 4096
    stream.close()


# -- rows --------------------------------------------------------------------------------------


def test_rows_are_the_source_rows(
    store: ObjectStore, tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    manifest = _package(store, "rows")
    reader = DataReader(store, manifest, tmp_path / "cache")
    rng = np.random.default_rng(0)
    for size in [1, 7, 256, DIGITS_TRAIN_SAMPLES, 3000]:  # 3000: with repeats
        indices = rng.choice(DIGITS_TRAIN_SAMPLES, size=size, replace=size > 500)
        x, y = reader.rows(indices)
        assert torch.equal(x, digits_data[0][indices])
        assert torch.equal(y, digits_data[1][indices])
    x, y = reader.rows(np.array([], dtype=np.int64))
    assert x.shape == (0, 64) and y.shape == (0,)
    x, y = reader.rows(np.arange(DIGITS_TRAIN_SAMPLES)[::-1].astype(np.int32))
    assert torch.equal(x, digits_data[0].flip(0)) and torch.equal(y, digits_data[1].flip(0))

    stats = reader.statistics()
    assert stats["downloads"] == stats["hash_checks"] == NUM_SHARDS  # once each, many calls
    assert stats["bytes_downloaded"] == manifest.total_bytes
    assert stats["cache_hits"] > 0
    reader.close()


def test_rows_read_only_the_rows_asked_for(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    reader = DataReader(store, _package(store, "few"), tmp_path / "cache")
    reader.rows(np.array([5]))
    before = reader.statistics()["bytes_read"]
    reader.rows(np.array([10, 11, 12, 11, 40, 150]))  # 5 distinct rows, two shards
    assert reader.statistics()["bytes_read"] - before == 5 * DIGITS_BYTES_PER_SAMPLE


def test_rows_reject_bad_indices(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    reader = DataReader(store, package_task(DIGITS, store, "idx"), tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"sample index 1347 is out of range \[0, 1347\)"):
        reader.rows(np.array([0, 1347]))
    with pytest.raises(ConfigError, match="out of range"):
        reader.rows(np.array([-1]))
    with pytest.raises(ConfigError, match="1-D integer array"):
        reader.rows(np.array([0.5]))
    with pytest.raises(ConfigError, match="shard id 1 is out of range"):
        reader.prefetch([0, 1])


# -- verify once -------------------------------------------------------------------------------


def test_a_verified_file_is_never_hashed_again(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """A second reader on the same folder (another worker process on the machine, or the next
    invocation) trusts what the first one verified: no download, no hash, only cache hits."""
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "once")
    cache = tmp_path / "cache"
    first = DataReader(store, manifest, cache)
    first.rows(np.arange(DIGITS_TRAIN_SAMPLES))
    assert sorted(_shard_files(cache)) == sorted(f"{s.sha256}.bin" for s in manifest.shards)

    second = DataReader(store, manifest, cache)
    for start in range(0, DIGITS_TRAIN_SAMPLES, 64):
        x, _ = second.rows(np.arange(start, min(start + 64, DIGITS_TRAIN_SAMPLES)))
        assert torch.equal(x, digits_data[0][start : start + 64])
    stats = second.statistics()
    assert stats["downloads"] == stats["hash_checks"] == stats["bytes_downloaded"] == 0
    assert stats["cache_hits"] >= NUM_SHARDS
    assert stats["wait_s"] == 0


def test_corrupt_shard_is_a_typed_error_and_leaves_nothing(
    store: ObjectStore, tmp_path: Path
) -> None:
    manifest = _package(store, "bad")
    shard = manifest.shards[2]
    data = bytearray(store.get_bytes(shard.key))
    data[10] ^= 0xFF
    store.put_bytes(shard.key, bytes(data))
    cache = tmp_path / "cache"
    reader = DataReader(store, manifest, cache)
    assert reader.rows(np.array([0]))[1].shape == (1,)  # an intact shard still reads
    with pytest.raises(ObjectStoreError, match=rf"{shard.key} of job 'bad' .* is corrupt"):
        reader.rows(np.array([shard.start]))
    assert _shard_files(cache) == {f"{manifest.shards[0].sha256}.bin": SHARD_BYTES}

    store.put_bytes(shard.key, store.get_bytes(manifest.shards[1].key) + b"x")  # too long
    with pytest.raises(ObjectStoreError, match="is corrupt: more than"):
        reader.rows(np.array([shard.start]))
    assert len(_shard_files(cache)) == 1
    assert reader.statistics()["hash_checks"] == reader.statistics()["downloads"] == 3


def test_truncated_cache_file_is_fetched_again(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """The one damage a verified file is checked for: its length (free, from fstat). Other
    damage is not looked for: the cache folder is smlt's own (see the module doc)."""
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "heal")
    DataReader(store, manifest, tmp_path / "cache").rows(np.array([3]))
    cached = tmp_path / "cache" / "shards" / f"{manifest.shards[0].sha256}.bin"
    cached.write_bytes(b"truncated")
    reader = DataReader(store, manifest, tmp_path / "cache")
    assert torch.equal(reader.rows(np.array([3]))[0], digits_data[0][[3]])
    assert reader.statistics()["downloads"] == reader.statistics()["hash_checks"] == 1
    assert cached.stat().st_size == SHARD_BYTES


def test_missing_shard_is_a_typed_error(store: ObjectStore, tmp_path: Path) -> None:
    manifest = _package(store, "gone")
    store.delete_prefix(manifest.shards[4].key)
    reader = DataReader(store, manifest, tmp_path / "cache")
    with pytest.raises(ObjectNotFoundError, match=r"shards/00004\.bin \(samples \[400, 500\)\)"):
        reader.rows(np.array([450]))
    assert _shard_files(tmp_path / "cache") == {}


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    """A download that died with its process left a temporary file; the next reader removes
    it once it is older than a download may take, and leaves a live one alone."""
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "tmp")
    folder = tmp_path / "cache" / "shards"
    folder.mkdir(parents=True)
    stale = folder / ".abc.1234.smlt-tmp"
    live = folder / ".abc.5678.smlt-tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    DataReader(store, manifest, tmp_path / "cache")
    assert not stale.exists() and live.exists()


# -- prefetch ----------------------------------------------------------------------------------


def test_prefetch_downloads_ahead(
    store: ObjectStore, tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    manifest = _package(store, "ahead")
    reader = DataReader(store, manifest, tmp_path / "cache")
    reader.prefetch([5, 3, 4])
    _wait_until(lambda: reader.statistics()["downloads"] == 3, "three shards prefetched")
    assert sorted(_shard_files(tmp_path / "cache")) == sorted(
        f"{manifest.shards[i].sha256}.bin" for i in (3, 4, 5)
    )
    indices = np.arange(300, 600)
    x, _ = reader.rows(indices)
    assert torch.equal(x, digits_data[0][indices])
    stats = reader.statistics()
    assert stats["downloads"] == 3 and stats["cache_hits"] == 3 and stats["wait_s"] == 0
    reader.close()


def test_prefetch_stays_within_budget_and_eviction_spares_the_plan(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """A pass over all shards in plan order with room for three, the plan renewed from the
    current shard on (as the worker renews it): the prefetcher runs three ahead and no further,
    and the disk never holds more than the budget."""
    store = GatedStore(tmp_path / "objects")
    manifest = _package(store, "budget")
    cache = tmp_path / "cache"
    budget = 3 * SHARD_BYTES
    reader = DataReader(store, manifest, cache, cache_bytes=budget)
    reader.prefetch(range(NUM_SHARDS))
    _wait_until(lambda: reader.statistics()["downloads"] == 3, "three shards prefetched")
    # It stops there: a fourth does not fit beside three planned and unused ones. (It could
    # only pass by luck if the thread took longer than this to start a download it may not.)
    time.sleep(0.2)
    assert reader.statistics()["downloads"] == 3 and len(store.started) == 3

    peak_on_disk = 0
    for number, shard in enumerate(manifest.shards):
        reader.prefetch(range(number, NUM_SHARDS))  # as the worker does: the plan from here on
        indices = np.arange(shard.start, shard.stop)
        x, y = reader.rows(indices)
        assert torch.equal(x, digits_data[0][indices]) and torch.equal(y, digits_data[1][indices])
        peak_on_disk = max(peak_on_disk, sum(_shard_files(cache).values()))
    stats = reader.statistics()
    assert stats["downloads"] == stats["hash_checks"] == NUM_SHARDS
    assert peak_on_disk <= budget and stats["peak_cache_bytes"] <= budget
    assert stats["evictions"] >= NUM_SHARDS - 3
    assert stats["cache_hits"] >= 3  # at least the three fetched before the first rows()
    reader.close()


def test_eviction_without_a_plan_keeps_disk_within_budget(
    store: ObjectStore, tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    manifest = _package(store, "lru")
    cache = tmp_path / "cache"
    budget = 2 * SHARD_BYTES + 10
    reader = DataReader(store, manifest, cache, cache_bytes=budget)
    rng = np.random.default_rng(1)
    # Random batches of 32 from random shard pairs: downloads, re-downloads after eviction.
    for _ in range(25):
        pair = rng.choice(NUM_SHARDS - 1, size=2, replace=False)  # full-size shards
        batch = np.concatenate(
            [rng.integers(0, SHARD_SAMPLES, 16) + p * SHARD_SAMPLES for p in pair]
        )
        x, _ = reader.rows(batch)
        assert torch.equal(x, digits_data[0][batch])
        assert sum(_shard_files(cache).values()) <= budget
    stats = reader.statistics()
    assert stats["peak_cache_bytes"] <= budget
    assert stats["evictions"] == stats["downloads"] - len(_shard_files(cache)) > 0


def test_a_call_needing_more_than_the_budget_still_works(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "over")
    cache = tmp_path / "cache"
    budget = 2 * SHARD_BYTES
    reader = DataReader(store, manifest, cache, cache_bytes=budget)
    x, _ = reader.rows(np.arange(DIGITS_TRAIN_SAMPLES))  # all 14 shards in one call
    assert torch.equal(x, digits_data[0])
    assert reader.statistics()["peak_cache_bytes"] > budget  # over budget while it ran...
    assert sum(_shard_files(cache).values()) <= budget  # ...and back within it after


def test_a_failed_prefetch_is_fetched_again_by_rows(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """A transient failure in the background (the store dropped a connection) costs the
    iteration one download of its own, not the iteration; a shard the store does not have is
    the typed error it always was."""
    store = GatedStore(tmp_path / "objects")
    manifest = _package(store, "err")
    store.fail_once.add(manifest.shards[2].key)
    reader = DataReader(store, manifest, tmp_path / "cache")
    reader.prefetch([2, 3])
    assert store.failed.wait(WAIT_S)
    _wait_until(lambda: reader.statistics()["downloads"] == 1, "shard 3 prefetched after 2 failed")
    assert reader.rows(np.array([300]))[1].shape == (1,)  # another shard is unaffected
    assert torch.equal(reader.rows(np.array([250]))[0], digits_data[0][[250]])
    assert reader.statistics()["downloads"] == 2
    store.delete_prefix(manifest.shards[5].key)
    reader.prefetch([5])
    _wait_until(lambda: 5 in reader._failed, "the prefetch of a missing shard failed")
    with pytest.raises(ObjectNotFoundError, match=r"shards/00005\.bin"):
        reader.rows(np.array([5 * SHARD_SAMPLES]))
    reader.close()


def test_shards_in_use_are_not_evicted_for_later_ones(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """The worker's pattern: the same two shards read for many iterations while the plan names
    more shards than the budget holds. Each shard is downloaded once."""
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "in-use")
    reader = DataReader(store, manifest, tmp_path / "cache", cache_bytes=3 * SHARD_BYTES)
    rng = np.random.default_rng(0)
    for first in range(0, NUM_SHARDS - 2, 2):
        for _ in range(6):  # a window of two shards, read over several iterations
            reader.prefetch(list(range(first, NUM_SHARDS)))
            batch = rng.integers(first * SHARD_SAMPLES, (first + 2) * SHARD_SAMPLES, 24)
            x, _ = reader.rows(batch)
            assert torch.equal(x, digits_data[0][batch])
    stats = reader.statistics()
    # 12 shards read, and up to the 2 after them prefetched: no shard twice.
    assert NUM_SHARDS - 2 <= stats["downloads"] <= NUM_SHARDS, stats
    reader.close()


def test_rows_waits_for_the_prefetcher_and_a_stuck_download_times_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMLT_DOWNLOAD_TIMEOUT_S", "0.5")
    store = GatedStore(tmp_path / "objects")
    manifest = _package(store, "stuck")
    store.stall.add(manifest.shards[1].key)
    reader = DataReader(store, manifest, tmp_path / "cache")
    reader.prefetch([1])
    _wait_until(lambda: manifest.shards[1].key in store.started, "the prefetcher started")
    began = time.monotonic()
    with pytest.raises(
        ObjectStoreError, match=r"shards/00001\.bin of job 'stuck' .* within 0\.5 s"
    ):
        reader.rows(np.array([150]))
    assert 0.4 < time.monotonic() - began < 5
    assert reader.statistics()["wait_s"] >= 0.4
    store.release.set()  # the store call returns; the thread sees its deadline and gives up
    reader.close()
    assert not _prefetch_threads("stuck")
    assert _shard_files(tmp_path / "cache") == {}  # no temporary left behind


def test_close_joins_and_is_idempotent(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "objects")
    manifest = _package(store, "close")
    store.stall.add(manifest.shards[0].key)
    reader = DataReader(store, manifest, tmp_path / "cache")
    reader.prefetch([0, 1])
    _wait_until(lambda: store.started != [], "the prefetcher started")
    assert len(_prefetch_threads("close")) == 1
    closer = threading.Thread(target=reader.close)
    closer.start()
    store.release.set()  # the stalled chunk arrives; the download stops at the next one
    closer.join(WAIT_S)
    assert not closer.is_alive() and not _prefetch_threads("close")
    assert _shard_files(tmp_path / "cache") == {}
    assert reader.statistics()["downloads"] == 0
    reader.close()
    with pytest.raises(ObjectStoreError, match="is closed"):
        reader.rows(np.array([0]))
    with pytest.raises(ObjectStoreError, match="is closed"):
        reader.prefetch([0])


def test_a_reader_dropped_without_close_ends_its_thread(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    readers = [DataReader(store, _package(store, "dropped"), tmp_path / "cache")]
    readers[0].prefetch([0])
    _wait_until(lambda: readers[0].statistics()["downloads"] == 1, "one shard prefetched")
    assert len(_prefetch_threads("dropped")) == 1
    readers.clear()  # the only reference
    gc.collect()
    _wait_until(lambda: not _prefetch_threads("dropped"), "the dropped reader's thread ended")


def test_a_shard_evicted_by_another_process_mid_call_still_reads(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """Ray workers of a job share its cache folder: another process may delete a shard this
    reader is about to read. The open descriptor keeps the bytes readable for the call."""
    store = GatedStore(tmp_path / "objects")
    manifest = _package(store, "shared")
    reader = DataReader(store, manifest, tmp_path / "cache")
    reader.rows(np.array([0]))  # shard 0 is on disk now
    cached = tmp_path / "cache" / "shards" / f"{manifest.shards[0].sha256}.bin"

    def evict_shard_0(key: str) -> None:
        cached.unlink()  # "another process" evicts shard 0 while we fetch shard 1

    store.before_first_chunk = evict_shard_0
    indices = np.array([7, 150, 8])
    x, _ = reader.rows(indices)
    assert torch.equal(x, digits_data[0][indices])
    assert not cached.exists()
    assert reader.statistics()["downloads"] == 2  # shard 0 once, shard 1 once
    store.before_first_chunk = None
    reader.rows(np.array([9]))  # the next call notices it is gone and fetches it again
    assert cached.exists() and reader.statistics()["downloads"] == 3


# -- the budget --------------------------------------------------------------------------------


def test_default_cache_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "default")
    monkeypatch.delenv(CACHE_BYTES_ENV, raising=False)
    budget = default_cache_bytes(manifest, tmp_path)
    assert 2 * SHARD_BYTES <= budget <= 2 * 2**30
    monkeypatch.setenv(CACHE_BYTES_ENV, str(5 * SHARD_BYTES))
    assert default_cache_bytes(manifest, tmp_path) == 5 * SHARD_BYTES
    assert DataReader(store, manifest, tmp_path / "c").cache_bytes == 5 * SHARD_BYTES
    monkeypatch.setenv(CACHE_BYTES_ENV, "1")  # never less than two shards
    assert default_cache_bytes(manifest, tmp_path) == 2 * SHARD_BYTES
    monkeypatch.setenv(CACHE_BYTES_ENV, "2GB")
    with pytest.raises(ConfigError, match="SMLT_CACHE_BYTES must be a whole number"):
        default_cache_bytes(manifest, tmp_path)
    with pytest.raises(ConfigError, match="less than the largest data shard"):
        DataReader(store, manifest, tmp_path / "c", cache_bytes=SHARD_BYTES - 1)
    assert DataReader(store, manifest, tmp_path / "c", cache_bytes=SHARD_BYTES).resident_bytes > 0
    monkeypatch.delenv(CACHE_BYTES_ENV)
    monkeypatch.setenv("SMLT_DOWNLOAD_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="SMLT_DOWNLOAD_TIMEOUT_S must be a positive number"):
        DataReader(store, manifest, tmp_path / "c")


def test_reserve_raises_the_budget_never_lowers_it_and_stays_within_the_disk(
    tmp_path: Path, digits_data: tuple[torch.Tensor, ...]
) -> None:
    """What the worker does when its sample order reads more shards at once than the budget
    holds: with the budget raised, a pass that re-reads the same shards downloads each once;
    at the old budget the same pass downloads them again and again."""
    import shutil

    store = LocalObjectStore(tmp_path / "objects")
    manifest = _package(store, "reserve")
    batches = [np.arange(0, DIGITS_TRAIN_SAMPLES, 3) + k for k in range(3)]  # all shards, 3x

    small = DataReader(store, manifest, tmp_path / "small", cache_bytes=2 * SHARD_BYTES)
    for batch in batches:
        small.rows(batch)
    assert small.statistics()["downloads"] > 2 * NUM_SHARDS  # evicted and fetched again

    reader = DataReader(store, manifest, tmp_path / "big", cache_bytes=2 * SHARD_BYTES)
    needed = sum(s.num_bytes for s in manifest.shards)
    assert reader.reserve(needed) == needed
    assert reader.reserve(SHARD_BYTES) == needed  # never lowered
    for batch in batches:
        x, _ = reader.rows(batch)
        assert torch.equal(x, digits_data[0][batch])
    assert reader.statistics()["downloads"] == NUM_SHARDS
    disk = shutil.disk_usage(tmp_path)
    assert reader.reserve(10 * disk.total) <= disk.free + needed  # no more than the disk has
