"""Typed access to the parameter store: one Redis or several.

The store holds only recomputable, versioned values (gradient slices, parameter and optimizer
shards) with TTLs; checkpoints live in the object store. Values for shard ``s`` live on instance
``s mod k``, so k Redis servers share the load of a large job: Redis runs commands on one thread,
and its throughput, not the workers', bounds a store-mediated exchange.

Waiting is event driven: every write that someone waits for is announced on a Redis stream in the
same round trip, and the waiter blocks in ``XREAD BLOCK`` with the time it has left. Streams,
unlike lists, are not consumed by reading, so a replacement worker can re-read every announcement
of an iteration from the start. Nobody busy-polls, and every wait ends by its deadline with a
:class:`~smlt.errors.ShardTimeoutError` that names the ranks that never came.

A write is all or nothing: :meth:`ParameterStore.put` sends its values and the announcement as
one ``MULTI``/``EXEC`` transaction. Redis runs one connection's commands in order either way; the
transaction adds that a write Redis refuses for memory (:class:`~smlt.errors.StoreFullError`)
leaves nothing behind. Without it, a refused value whose bytes pushed Redis over ``maxmemory`` is
freed at once, and the small announcement queued after it then succeeds: readers would be told
to fetch a value that is not there.

Values larger than one Redis value
----------------------------------
Redis refuses any single argument longer than ``proto-max-bulk-len`` (512 MB), and a
150M-parameter model at one worker has a 600 MB parameter shard and 1.2 GB of Adam state. A value
longer than ``max_value_bytes`` (256 MiB by default, ``SMLT_MAX_VALUE_BYTES``) is therefore
written as chunks under :func:`~smlt.sync.keys.chunk_key` plus, under the key itself, a marker
``smlt-chunks:<count>:<total bytes>`` (ASCII; a frame starts with a msgpack map byte, 0x80-0x8f,
0xde or 0xdf, so the two cannot be confused). Chunks come first and the marker last, in the same
transaction and with the same TTL, so whoever sees the marker finds every chunk. Readers need not
know the writer's ``max_value_bytes``: the marker and the chunks' lengths describe the value.

How this meets Redis's two input limits (checked in the Redis 6.2 and 7.x sources,
``networking.c``): ``proto-max-bulk-len`` bounds each argument, hence each chunk.
``client-query-buffer-limit`` (1 GB) bounds a connection's unparsed input, but Redis reads an
argument of 32 KB or more into a buffer of exactly its size and hands that buffer over as the
value, so however many big values a pipeline carries, the query buffer holds about one argument
at a time: the limit never sees the pipeline's total, only single arguments, which
``proto-max-bulk-len`` keeps below it. Values queued in a transaction are held as parsed
arguments until ``EXEC`` (not in the query buffer), and count against ``maxmemory`` like the
stored values they become. Two costs do count against ``maxmemory``: after a big argument
Redis 6.2 and 7.x keep an empty query buffer of the same size for that connection until their
periodic cron shrinks it, and a reply is copied into the reader's output buffer. Hence chunks of
half the limit rather than the limit itself, and readers that fetch one chunk per round trip:
n readers of one big value then hold n chunks in Redis's memory, not n whole values.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import redis
import redis.exceptions

from smlt.errors import (
    CodecError,
    ConfigError,
    ShardTimeoutError,
    StoreFullError,
    StoreUnavailableError,
)
from smlt.storage.redis_server import connect, redact_url
from smlt.sync.keys import chunk_key

__all__ = [
    "DEFAULT_GRAD_TTL_S",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_PARAM_TTL_S",
    "DEFAULT_SHARD_TIMEOUT_S",
    "REDIS_MAX_VALUE_BYTES",
    "Announcements",
    "ParameterStore",
    "translate_redis_errors",
]

DEFAULT_SHARD_TIMEOUT_S = float(os.environ.get("SMLT_SHARD_TIMEOUT_S", "120"))
DEFAULT_GRAD_TTL_S = int(os.environ.get("SMLT_GRAD_TTL_S", "900"))
DEFAULT_PARAM_TTL_S = int(os.environ.get("SMLT_PARAM_TTL_S", str(6 * 3600)))
# One XREAD BLOCK call waits at most this long before re-checking the deadline; it bounds how
# late a wait notices a deadline, not how often it wakes (an announcement wakes it at once).
_MAX_BLOCK_MS = 1000
#: Values longer than this are stored in chunks (see the module docstring).
DEFAULT_MAX_VALUE_BYTES = int(os.environ.get("SMLT_MAX_VALUE_BYTES", str(256 * 2**20)))
#: Redis's default ``proto-max-bulk-len``: no single value (or chunk) may be longer.
REDIS_MAX_VALUE_BYTES = 512 * 2**20
_MARKER_PREFIX = b"smlt-chunks:"
_MARKER = re.compile(rb"smlt-chunks:([1-9][0-9]{0,9}):([0-9]{1,15})")
# Longer than any marker: reading a key's first bytes tells a marker from a frame.
_MARKER_MAX_BYTES = 64
_OOM_REPLY = "OOM command not allowed"

# UNLINK each key and, if it holds a chunk marker, its chunks. Done in Redis rather than by
# reading the markers first: one round trip, and GETRANGE reads only a value's first bytes, so a
# 40 MB frame is never sent anywhere just to learn that it is not a marker. TYPE first, because
# streams (announcements) are unlinked here too and GETRANGE on them is an error. The chunk names
# must be those of smlt.sync.keys.chunk_key (KEY:c{i}); tests/test_store.py holds them together.
_UNLINK_WITH_CHUNKS = """
local removed = 0
for _, key in ipairs(KEYS) do
    if redis.call('TYPE', key)['ok'] == 'string' then
        local head = redis.call('GETRANGE', key, 0, 63)
        local count = string.match(head, '^smlt%-chunks:(%d+):%d+$')
        if count then
            for i = 0, tonumber(count) - 1 do
                removed = removed + redis.call('UNLINK', key .. ':c' .. i)
            end
        end
    end
    removed = removed + redis.call('UNLINK', key)
end
return removed
"""


@contextlib.contextmanager
def translate_redis_errors(what: str) -> Iterator[None]:
    """Turn redis-py's errors into smlt's, naming the operation: connection problems into
    StoreUnavailableError, a write refused at ``maxmemory`` into StoreFullError."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"{what}: Redis refused the password") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"{what}: lost the connection to Redis ({exc})") from exc
    except redis.exceptions.ResponseError as exc:
        # redis-py strips the "OOM" code into OutOfMemoryError; inside a Lua script the reply
        # comes back as a script error that still carries the text.
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or _OOM_REPLY in str(exc):
            raise StoreFullError(_store_full_message(what)) from exc
        raise


def _store_full_message(what: str) -> str:
    # The server's own message is left to the chained exception: redis-py prefixes it with the
    # start of the refused command, which holds raw value bytes.
    return (
        f"{what}: Redis refused the write, it is full (maxmemory reached; it runs with "
        "noeviction so that no shard is ever dropped silently). Give it more memory (a bigger "
        "maxmemory; for smlt's embedded Redis set SMLT_REDIS_MAXMEMORY_MB), spread the shards "
        "over more Redis instances (several comma-separated Redis URLs), or keep fewer versions "
        "in flight (shorter SMLT_GRAD_TTL_S / SMLT_PARAM_TTL_S)."
    )


class ParameterStore:
    """k Redis clients; shard ``s`` maps to ``clients[s % k]``.

    One instance per process: redis-py clients are thread-safe through their connection pool,
    so an upload thread and a download thread can share it. Values longer than
    ``max_value_bytes`` are chunked (module docstring); the value must stay below Redis's
    ``proto-max-bulk-len``, 512 MB unless the server was configured otherwise.
    """

    def __init__(
        self,
        clients: Sequence[redis.Redis],
        urls: Sequence[str] = (),
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        if not clients:
            raise ValueError("a ParameterStore needs at least one Redis client")
        if not 1 <= max_value_bytes <= REDIS_MAX_VALUE_BYTES:
            raise ConfigError(
                f"max_value_bytes (SMLT_MAX_VALUE_BYTES) must be between 1 and "
                f"{REDIS_MAX_VALUE_BYTES} (Redis's proto-max-bulk-len), got {max_value_bytes}"
            )
        self._clients = list(clients)
        self._safe_urls = [redact_url(u) for u in urls]
        self.max_value_bytes = max_value_bytes
        # Bound to no client: each call names the instance. Registering computes the SHA-1
        # locally; redis-py loads the script on the first NOSCRIPT reply.
        self._unlink_script = self._clients[0].register_script(_UNLINK_WITH_CHUNKS)

    @classmethod
    def from_urls(
        cls, urls: str | Sequence[str], *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> ParameterStore:
        """Connect to each URL (comma-separated in one string, or a list)."""
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        return cls([connect(u) for u in urls], urls, max_value_bytes=max_value_bytes)

    @property
    def instances(self) -> int:
        return len(self._clients)

    def client(self, shard: int) -> redis.Redis:
        """The Redis that holds shard ``shard`` (and its announcements)."""
        return self._clients[shard % len(self._clients)]

    def all_clients(self) -> list[redis.Redis]:
        return list(self._clients)

    def put(
        self,
        shard: int,
        items: Iterable[tuple[str, bytes]],
        *,
        ttl_s: int,
        announce: tuple[str, int] | None = None,
    ) -> None:
        """SET every (key, value) on shard's instance; then announce ``(stream, rank)``.

        One round trip, one transaction (module docstring). The announcement is queued after
        the values, and Redis runs a connection's commands in order, so whoever reads the
        announcement finds the values. Values over ``max_value_bytes`` go in chunks, sent from
        memoryviews of ``value`` (no copy).
        """
        with translate_redis_errors(f"writing shard {shard}"):
            pipe = self.client(shard).pipeline(transaction=True)
            for key, value in items:
                self._queue_value(pipe, key, value, ttl_s)
            if announce is not None:
                stream, rank = announce
                pipe.xadd(stream, {b"r": rank})
                pipe.expire(stream, ttl_s)
            pipe.execute()

    def _queue_value(self, pipe: Any, key: str, value: bytes, ttl_s: int) -> None:
        view = memoryview(value).cast("B")
        if view[: len(_MARKER_PREFIX)] == _MARKER_PREFIX:
            raise ValueError(f"{key}: a value may not start with {_MARKER_PREFIX!r}")
        size = view.nbytes
        if size <= self.max_value_bytes:
            pipe.set(key, value, ex=ttl_s)
            return
        step = self.max_value_bytes
        count = -(-size // step)
        for i in range(count):
            pipe.set(chunk_key(key, i), view[i * step : (i + 1) * step], ex=ttl_s)
        pipe.set(key, b"%s%d:%d" % (_MARKER_PREFIX, count, size), ex=ttl_s)

    def announce(self, shard: int, stream: str, rank: int, *, ttl_s: int) -> None:
        """Tell waiters on ``stream`` (on shard's instance) that ``rank``'s value is written."""
        self.put(shard, (), ttl_s=ttl_s, announce=(stream, rank))

    def get(self, shard: int, key: str) -> bytes | None:
        """The value under ``key``, or None if there is none (expired or never written).

        A chunked value comes back joined: one copy of its bytes. For the moment of the join the
        chunks and the result are both alive (twice the value); filling a preallocated
        ``bytearray`` would need only one chunk more than the value, but every caller and the
        codec take ``bytes``. A chunk that is missing, or chunks whose lengths do not add up to
        what the marker says, are a CodecError naming the key.
        """
        client = self.client(shard)
        with translate_redis_errors(f"reading {key}"):
            value = cast(bytes | None, client.get(key))
            if value is None or not value.startswith(_MARKER_PREFIX):
                return value
            return _join_chunks(client, key, value)

    def unlink(self, shard: int, keys: Sequence[str]) -> None:
        """Drop values nobody will read again, with their chunks (UNLINK frees them off the
        command thread; see ``_UNLINK_WITH_CHUNKS`` for how chunks are found)."""
        if keys:
            with translate_redis_errors(f"unlinking {len(keys)} keys of shard {shard}"):
                self._unlink_script(keys=list(keys), client=self.client(shard))

    def announcements(
        self,
        shard: int,
        stream: str,
        expected: Iterable[int],
        *,
        timeout_s: float,
        what: str,
        interrupt: Callable[[], None] | None = None,
    ) -> Announcements:
        return Announcements(
            self.client(shard),
            stream,
            expected,
            timeout_s=timeout_s,
            what=what,
            interrupt=interrupt,
        )


def _join_chunks(client: redis.Redis, key: str, marker: bytes) -> bytes:
    match = _MARKER.fullmatch(marker)
    if match is None:
        raise CodecError(f"{key}: malformed chunk marker {marker[:_MARKER_MAX_BYTES]!r}")
    count, total = int(match[1]), int(match[2])
    parts = []
    for i in range(count):
        # One GET per chunk, not one pipeline: Redis then holds one chunk, not the whole value,
        # in this reader's output buffer.
        part = cast(bytes | None, client.get(chunk_key(key, i)))
        if part is None:
            raise CodecError(
                f"{key}: chunk {i} of {count} ({chunk_key(key, i)}) is missing: expired, or the "
                "write that made the marker failed"
            )
        parts.append(part)
    if sum(map(len, parts)) != total:
        raise CodecError(
            f"{key}: its {count} chunks hold {sum(map(len, parts))} bytes, the marker says "
            f"{total}: chunks of another write"
        )
    return b"".join(parts)


class Announcements:
    """Iterate over the ranks announced on ``stream`` until all of ``expected`` have come.

    Each expected rank is yielded once, in arrival order; duplicates (a re-executed worker) and
    unexpected ranks are skipped. Raises ShardTimeoutError, naming the missing ranks, once
    ``timeout_s`` has passed without all of them. ``interrupt`` is called before every blocking
    read (at least once a second); whatever it raises ends the wait.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        expected: Iterable[int],
        *,
        timeout_s: float,
        what: str,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        self._pending = set(expected)
        self._timeout_s = timeout_s
        self._what = what
        self._interrupt = interrupt

    def __iter__(self) -> Iterator[int]:
        deadline = time.monotonic() + self._timeout_s
        last_id = b"0-0"
        while self._pending:
            if self._interrupt is not None:
                self._interrupt()  # raises to abandon the wait (e.g. our own upload failed)
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                missing = tuple(sorted(self._pending))
                raise ShardTimeoutError(
                    f"{self._what}: ranks {list(missing)} did not arrive within "
                    f"{self._timeout_s:g} s (stream {self._stream})",
                    missing=missing,
                )
            block_ms = max(1, min(_MAX_BLOCK_MS, int(left_s * 1000)))
            with translate_redis_errors(f"{self._what}: waiting on {self._stream}"):
                reply = self._client.xread({self._stream: last_id}, block=block_ms)
            for _stream, entries in cast(list[Any], reply or []):
                for entry_id, fields in entries:
                    last_id = entry_id
                    rank = int(fields[b"r"])
                    if rank in self._pending:
                        self._pending.discard(rank)
                        yield rank
