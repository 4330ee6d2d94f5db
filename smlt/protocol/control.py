"""How the workers of a generation stop together, and how they show they are alive.

**Stopping together.** Synchronous training has one rule that makes this simple: no worker can
finish iteration u before every worker has contributed to u. So at the *start* of iteration u a
worker may propose "stop at u + 1" (run u, then stop): nobody can be past u yet, and nobody can
start u + 1 before this worker's contribution to u, which it sends only after its proposal is in
the store. Every worker runs the same atomic check at the start of every iteration
(:func:`should_stop`): the stop iteration is the minimum of all proposals; a worker proposes when
its function is about to run out of time, or when the scheduler has asked the generation to end
(re-scaling). All workers therefore stop at the same iteration boundary, whoever asked.

**Heartbeats.** A thread renews ``hb:{rank}`` every ``interval_s`` with a TTL of
``timeout_s``; the scheduler declares a rank hung when its key has expired. A frozen process
(SIGSTOP, a deadlock in native code) freezes its heartbeat thread too, which is the point.
"""

from __future__ import annotations

import threading

import redis

from smlt.sync.keys import JobKeys

__all__ = ["Heartbeat", "request_stop", "should_stop", "stop_iteration"]

# KEYS[1] = stop hash; ARGV = iteration u, propose (0/1), ttl_s.
# Returns the agreed stop iteration, or -1 while none is set.
_CHECK = """
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '-1')
local want = tonumber(ARGV[2]) == 1 or redis.call('HGET', KEYS[1], 'requested') == '1'
if want then
  local proposal = tonumber(ARGV[1]) + 1
  if at < 0 or proposal < at then
    at = proposal
    redis.call('HSET', KEYS[1], 'at', at)
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
return at
"""


def should_stop(
    client: redis.Redis,
    keys: JobKeys,
    generation: int,
    iteration: int,
    *,
    propose: bool,
    ttl_s: int = 24 * 3600,
) -> bool:
    """At the start of ``iteration``: True if the generation has agreed to stop before it.

    ``propose`` asks to stop after this iteration (the function is running out of time).
    """
    at = int(client.eval(_CHECK, 1, keys.stop(generation), iteration, int(propose), ttl_s))
    return 0 <= at <= iteration


def request_stop(
    client: redis.Redis, keys: JobKeys, generation: int, ttl_s: int = 24 * 3600
) -> None:
    """The scheduler's side: ask generation ``generation`` to end at the next agreed boundary."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.stop(generation), "requested", 1)
    pipe.expire(keys.stop(generation), ttl_s)
    pipe.execute()


def stop_iteration(client: redis.Redis, keys: JobKeys, generation: int) -> int | None:
    """The agreed stop iteration of a generation, if any."""
    value = client.hget(keys.stop(generation), "at")
    return None if value is None else int(value)


class Heartbeat:
    """Renews this rank's liveness key from a daemon thread until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        keys: JobKeys,
        generation: int,
        rank: int,
        attempt: int,
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._client = client
        self._key = keys.heartbeat(generation, rank, attempt)
        self._interval_s = interval_s
        self._ttl_ms = max(1, int(timeout_s * 1000))
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"smlt-heartbeat-{rank}", daemon=True
        )

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        self._client.set(self._key, 1, px=self._ttl_ms)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._beat()
            except redis.RedisError:
                return  # the store is gone; the training loop reports that itself

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(self._interval_s + 1)
