"""Typed access to the parameter store: one Redis or several.

The store holds only recomputable, versioned values (gradient slices, parameter and optimizer
shards) with TTLs; checkpoints live in the object store. Values for shard ``s`` live on instance
``s mod k``, so k Redis servers share the load of a large job: Redis runs commands on one thread,
and its throughput, not the workers', bounds a store-mediated exchange.

Waiting is event driven: every write that someone waits for is announced on a Redis stream in the
same pipeline, and the waiter blocks in ``XREAD BLOCK`` with the time it has left. Streams, unlike
lists, are not consumed by reading, so a replacement worker can re-read every announcement of an
iteration from the start. Nobody busy-polls, and every wait ends by its deadline with a
:class:`~smlt.errors.ShardTimeoutError` that names the ranks that never came.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import redis

from smlt.errors import ShardTimeoutError, StoreUnavailableError
from smlt.storage.redis_server import connect, redact_url

__all__ = [
    "DEFAULT_GRAD_TTL_S",
    "DEFAULT_PARAM_TTL_S",
    "DEFAULT_SHARD_TIMEOUT_S",
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


@contextlib.contextmanager
def translate_redis_errors(what: str) -> Iterator[None]:
    """Turn redis-py's connection errors into StoreUnavailableError naming the operation."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"{what}: Redis refused the password") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"{what}: lost the connection to Redis ({exc})") from exc


class ParameterStore:
    """k Redis clients; shard ``s`` maps to ``clients[s % k]``.

    One instance per process: redis-py clients are thread-safe through their connection pool,
    so an upload thread and a download thread can share it.
    """

    def __init__(self, clients: Sequence[redis.Redis], urls: Sequence[str] = ()) -> None:
        if not clients:
            raise ValueError("a ParameterStore needs at least one Redis client")
        self._clients = list(clients)
        self._safe_urls = [redact_url(u) for u in urls]

    @classmethod
    def from_urls(cls, urls: str | Sequence[str]) -> ParameterStore:
        """Connect to each URL (comma-separated in one string, or a list)."""
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        return cls([connect(u) for u in urls], urls)

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

        One pipelined round trip. The announcement is queued after the values, and Redis runs a
        connection's commands in order, so whoever reads the announcement finds the values.
        """
        with translate_redis_errors(f"writing shard {shard}"):
            pipe = self.client(shard).pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=ttl_s)
            if announce is not None:
                stream, rank = announce
                pipe.xadd(stream, {b"r": rank})
                pipe.expire(stream, ttl_s)
            pipe.execute()

    def announce(self, shard: int, stream: str, rank: int, *, ttl_s: int) -> None:
        """Tell waiters on ``stream`` (on shard's instance) that ``rank``'s value is written."""
        self.put(shard, (), ttl_s=ttl_s, announce=(stream, rank))

    def get(self, shard: int, key: str) -> bytes | None:
        with translate_redis_errors(f"reading {key}"):
            value = self.client(shard).get(key)
        return value  # type: ignore[return-value]

    def unlink(self, shard: int, keys: Sequence[str]) -> None:
        """Drop values nobody will read again (UNLINK frees them off the command thread)."""
        if keys:
            with translate_redis_errors(f"unlinking {len(keys)} keys of shard {shard}"):
                self.client(shard).unlink(*keys)

    def announcements(
        self, shard: int, stream: str, expected: Iterable[int], *, timeout_s: float, what: str
    ) -> Announcements:
        return Announcements(self.client(shard), stream, expected, timeout_s=timeout_s, what=what)


class Announcements:
    """Iterate over the ranks announced on ``stream`` until all of ``expected`` have come.

    Each expected rank is yielded once, in arrival order; duplicates (a re-executed worker) and
    unexpected ranks are skipped. Raises ShardTimeoutError, naming the missing ranks, once
    ``timeout_s`` has passed without all of them.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        expected: Iterable[int],
        *,
        timeout_s: float,
        what: str,
    ) -> None:
        self._client = client
        self._stream = stream
        self._pending = set(expected)
        self._timeout_s = timeout_s
        self._what = what

    def __iter__(self) -> Iterator[int]:
        deadline = time.monotonic() + self._timeout_s
        last_id = b"0-0"
        while self._pending:
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
