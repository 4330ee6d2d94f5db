"""The parameter store against a real redis-server: chunked values, unlink, a full store."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
import redis

from smlt.errors import CodecError, ConfigError, StoreFullError
from smlt.storage.redis_server import RedisServer, connect
from smlt.sync.keys import chunk_key
from smlt.sync.store import REDIS_MAX_VALUE_BYTES, ParameterStore, translate_redis_errors

SMALL = 1000  # max_value_bytes for the logic tests: chunking without big allocations


def _frame_like(size: int, seed: int = 0) -> bytes:
    """Bytes that start like a frame (a msgpack map) and differ at every position."""
    body = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return b"\x89" + body[1:]


@pytest.fixture
def store(redis_server: RedisServer) -> ParameterStore:
    return ParameterStore.from_urls(redis_server.url, max_value_bytes=SMALL)


@pytest.fixture
def raw(redis_server: RedisServer) -> redis.Redis:
    return connect(redis_server.url)


@pytest.fixture
def key(job_id: str) -> str:
    return f"smlt:{job_id}:t0:param:0"


def _output_bytes(client: redis.Redis) -> int:
    return int(cast(dict[str, Any], client.info("stats"))["total_net_output_bytes"])


def test_value_up_to_the_limit_is_one_redis_value(
    store: ParameterStore, raw: redis.Redis, key: str
) -> None:
    value = _frame_like(SMALL)
    store.put(0, [(key, value)], ttl_s=60)
    assert raw.get(key) == value
    assert not raw.exists(chunk_key(key, 0))
    assert store.get(0, key) == value


def test_value_over_the_limit_is_chunks_and_a_marker(
    store: ParameterStore, raw: redis.Redis, key: str
) -> None:
    value = _frame_like(2 * SMALL + 500)
    store.put(0, [(key, value)], ttl_s=60)
    assert raw.get(key) == b"smlt-chunks:3:2500"
    chunks = [cast(bytes, raw.get(chunk_key(key, i))) for i in range(3)]
    assert [len(c) for c in chunks] == [SMALL, SMALL, 500]
    assert b"".join(chunks) == value
    assert not raw.exists(chunk_key(key, 3))
    for k in (key, *(chunk_key(key, i) for i in range(3))):
        assert 0 < cast(int, raw.ttl(k)) <= 60
    got = store.get(0, key)
    assert type(got) is bytes and got == value


@pytest.mark.parametrize("size,chunks", [(SMALL + 1, 2), (2 * SMALL, 2), (2 * SMALL + 1, 3)])
def test_chunk_count_at_the_boundaries(
    store: ParameterStore, raw: redis.Redis, key: str, size: int, chunks: int
) -> None:
    value = _frame_like(size)
    store.put(0, [(key, value)], ttl_s=60)
    assert raw.get(key) == f"smlt-chunks:{chunks}:{size}".encode()
    assert store.get(0, key) == value


def test_reader_needs_not_know_the_writers_chunk_size(
    store: ParameterStore, redis_server: RedisServer, key: str
) -> None:
    value = _frame_like(5 * SMALL)
    store.put(0, [(key, value)], ttl_s=60)
    assert ParameterStore.from_urls(redis_server.url).get(0, key) == value


def test_missing_chunk_is_a_codec_error_naming_the_key(
    store: ParameterStore, raw: redis.Redis, key: str
) -> None:
    store.put(0, [(key, _frame_like(3 * SMALL))], ttl_s=60)
    raw.unlink(chunk_key(key, 1))
    with pytest.raises(
        CodecError, match=rf"{key}: chunk 1 of 3 \({chunk_key(key, 1)}\) is missing"
    ):
        store.get(0, key)


def test_chunks_of_another_length_are_a_codec_error(
    store: ParameterStore, raw: redis.Redis, key: str
) -> None:
    store.put(0, [(key, _frame_like(3 * SMALL))], ttl_s=60)
    raw.set(chunk_key(key, 2), b"\x00" * 10, ex=60)
    with pytest.raises(CodecError, match=f"{key}: its 3 chunks hold 2010 bytes"):
        store.get(0, key)


@pytest.mark.parametrize("marker", [b"smlt-chunks:", b"smlt-chunks:0:0", b"smlt-chunks:2:x"])
def test_malformed_marker_is_a_codec_error(
    store: ParameterStore, raw: redis.Redis, key: str, marker: bytes
) -> None:
    raw.set(key, marker, ex=60)
    with pytest.raises(CodecError, match=f"{key}: malformed chunk marker"):
        store.get(0, key)


def test_a_value_that_looks_like_a_marker_is_refused(store: ParameterStore, key: str) -> None:
    with pytest.raises(ValueError, match="may not start with"):
        store.put(0, [(key, b"smlt-chunks:1:5")], ttl_s=60)


def test_unlink_removes_chunks_without_reading_values(
    store: ParameterStore, raw: redis.Redis, redis_server: RedisServer, job_id: str
) -> None:
    """Values are not sent anywhere to be deleted (a marker is told from a frame by its first
    bytes), and the chunks go with their marker."""
    chunked, plain = f"smlt:{job_id}:a", f"smlt:{job_id}:b"
    stream, absent = f"smlt:{job_id}:ready", f"smlt:{job_id}:never-written"
    store.put(0, [(chunked, _frame_like(200 * SMALL))], ttl_s=60)
    unchunked = ParameterStore.from_urls(redis_server.url)  # 200 kB is one value here
    unchunked.put(0, [(plain, _frame_like(200 * SMALL))], ttl_s=60)
    store.announce(0, stream, 1, ttl_s=60)
    assert all(raw.exists(chunk_key(chunked, i)) for i in range(200))
    before = _output_bytes(raw)
    store.unlink(0, [chunked, plain, stream, absent])
    sent = _output_bytes(raw) - before
    assert raw.keys(f"smlt:{job_id}:*") == []
    assert sent < 16 * SMALL, f"unlinking 400 kB made Redis send {sent} bytes"


def test_announced_chunked_value_is_complete_for_whoever_sees_the_announcement(
    redis_server: RedisServer, job_id: str
) -> None:
    writer = ParameterStore.from_urls(redis_server.url, max_value_bytes=SMALL)
    reader = ParameterStore.from_urls(redis_server.url)
    stream = f"smlt:{job_id}:ready"
    values = {r: _frame_like(30 * SMALL + r, seed=r) for r in range(6)}
    got: dict[int, bytes | None] = {}

    def read() -> None:
        waiting = reader.announcements(0, stream, values, timeout_s=30, what="test")
        for rank in waiting:
            got[rank] = reader.get(0, f"smlt:{job_id}:v{rank}")

    thread = threading.Thread(target=read)
    thread.start()
    for rank, value in values.items():
        writer.put(0, [(f"smlt:{job_id}:v{rank}", value)], ttl_s=60, announce=(stream, rank))
    thread.join(30)
    assert got == values


def test_max_value_bytes_is_checked(redis_server: RedisServer) -> None:
    for bad in (0, REDIS_MAX_VALUE_BYTES + 1):
        with pytest.raises(ConfigError, match="max_value_bytes"):
            ParameterStore.from_urls(redis_server.url, max_value_bytes=bad)


# -- a full store ---------------------------------------------------------------------------


@pytest.fixture
def tiny_server() -> Iterator[RedisServer]:
    with RedisServer(maxmemory_mb=4) as server:
        yield server


def test_full_store_is_a_typed_error_and_leaves_nothing_half_written(
    tiny_server: RedisServer,
) -> None:
    store = ParameterStore.from_urls(tiny_server.url, max_value_bytes=256 * 1024)
    raw = connect(tiny_server.url)
    written = []
    with pytest.raises(StoreFullError) as info:
        for i in itertools.count():
            key = f"smlt:full:t{i}:param:0"
            store.put(0, [(key, _frame_like(2**20, seed=i))], ttl_s=60, announce=(f"{key}:r", 0))
            written.append(key)
            assert i < 100, "a 4 MB Redis took 100 MB"
    message = str(info.value)
    assert message.startswith("writing shard 0: Redis refused the write, it is full")
    for advice in ("SMLT_REDIS_MAXMEMORY_MB", "more Redis instances", "fewer versions"):
        assert advice in message
    assert written, "not even one value fitted"
    # The refused write left no chunk, no marker and no announcement behind.
    refused = f"smlt:full:t{len(written)}:param:0"
    assert raw.keys(f"{refused}*") == []
    # What was written is intact, and unlinking works on a full store and makes room again.
    assert store.get(0, written[0]) == _frame_like(2**20, seed=0)
    store.unlink(0, written)
    time.sleep(0.1)  # lazy freeing happens on a background thread
    store.put(0, [(refused, _frame_like(2**20))], ttl_s=60)


def test_refusal_inside_a_script_is_a_store_full_error(tiny_server: RedisServer) -> None:
    """Redis 6.2 reports OOM inside a script as a plain script error carrying the text."""
    raw = connect(tiny_server.url)
    for size in (100_000, 1000, 10):  # fill until even a tiny write is refused
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(100_000):
                raw.set(f"fill:{size}:{i}", b"x" * size)
    with pytest.raises(StoreFullError, match="^a script: Redis refused the write"):
        with translate_redis_errors("a script"):
            raw.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "k", "v")


def test_other_redis_errors_pass_through(redis_server: RedisServer) -> None:
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        with translate_redis_errors("reading a stream as a string"):
            raw = connect(redis_server.url)
            raw.xadd("smlt:test:wrongtype", {b"r": 0})
            raw.get("smlt:test:wrongtype")


# -- one real big value ---------------------------------------------------------------------


@pytest.mark.slow
def test_600_mb_value_round_trips_byte_for_byte() -> None:
    """A 150M-parameter model's parameter shard at one worker: over Redis's 512 MB limit."""
    size = 600 * 10**6
    # Every 8-byte word distinct, so a chunk out of place cannot compare equal. Cheap to make.
    value = np.arange(size // 8, dtype=np.uint64).tobytes()
    with RedisServer() as server:
        store = ParameterStore.from_urls(server.url)  # default max_value_bytes: 256 MiB
        raw = connect(server.url)
        store.put(0, [("smlt:big:t0:param:0", value)], ttl_s=300)
        assert raw.get("smlt:big:t0:param:0") == f"smlt-chunks:3:{size}".encode()
        got = store.get(0, "smlt:big:t0:param:0")
        assert got is not None and len(got) == size
        assert got == value
        del got
        store.unlink(0, ["smlt:big:t0:param:0"])
        assert raw.dbsize() == 0
