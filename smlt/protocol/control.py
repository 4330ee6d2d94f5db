"""How the workers of a generation stop together, and how they show they are alive.

**Stopping together.** Synchronous training has one rule that makes this possible: no worker can
finish iteration u before every worker has contributed to u. Every worker runs the same atomic
check at the start of every iteration (:func:`should_stop`); a worker asks to stop when its
function is about to run out of time, and the scheduler asks when it wants the generation to end
(re-scaling, :func:`request_stop`). The agreed stop iteration is the smallest proposal, and the
one invariant is:

    no worker has started an iteration >= the agreed stop,

because a worker inside such an iteration would wait for the contribution of a peer that has
already stopped, until its shard timeout.

The naive proposal, "I am at u, so stop at u + 1", keeps it only if nobody can be past u. That
holds for workers that started together, but not for a replacement: a worker that died after
publishing its shard of u + 1 is re-invoked at u, and its peers may already have started u + 1
(they had its contribution). So the stop hash also records the highest iteration any check has let
through (``started``, updated by every check in the same script), and a proposal is
``max(u, started) + 1``: past everything already started, and still the earliest boundary nobody
has reached. Once a stop is agreed, ``started`` is the iteration before it, so a later proposal
lands on the same boundary; a scheduler request is turned into a proposal by the first check that
sees it. Every worker then stops at the same boundary, whoever asked and however far behind.

**Heartbeats.** A thread renews ``hb:{rank}`` every ``interval_s`` with a TTL of
``timeout_s``; the scheduler declares a rank hung when its key has expired. A frozen process
(SIGSTOP, a deadlock in native code) freezes its heartbeat thread too, which is the point. A
failed renewal is not: the thread tries again at the next interval for as long as the worker runs,
so a Redis that goes away for a moment (a failover, a restart, a dropped connection) costs at most
the beats it missed, never a healthy worker declared hung.
"""

from __future__ import annotations

import threading

import redis

from smlt.sync.keys import JobKeys

__all__ = ["Heartbeat", "request_stop", "schedule_stop", "should_stop", "stop_iteration"]

# KEYS[1] = stop hash {at, started, requested}; ARGV = iteration u, propose (0/1), ttl_s.
# Returns the agreed stop iteration, or -1 while none is set. A check that returns at <= u stops
# its worker before u, so it is not a start and leaves ``started`` alone.
_CHECK = """
local u = tonumber(ARGV[1])
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '-1')
if at >= 0 and at <= u then
  return at
end
local started = math.max(u, tonumber(redis.call('HGET', KEYS[1], 'started') or '-1'))
redis.call('HSET', KEYS[1], 'started', started)
if tonumber(ARGV[2]) == 1 or redis.call('HGET', KEYS[1], 'requested') == '1' then
  local proposal = started + 1
  if at < 0 or proposal < at then
    at = proposal
    redis.call('HSET', KEYS[1], 'at', at)
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
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

    ``propose`` asks to stop as early as the peers allow: after this iteration, or after the
    furthest one a peer has already started (the function is running out of time). False means
    this worker has started ``iteration`` and is recorded as such.
    """
    at = int(client.eval(_CHECK, 1, keys.stop(generation), iteration, int(propose), ttl_s))
    return 0 <= at <= iteration


def request_stop(
    client: redis.Redis, keys: JobKeys, generation: int, ttl_s: int = 24 * 3600
) -> None:
    """The scheduler's side: ask generation ``generation`` to end at the next boundary that no
    worker has started (the next check of any worker fixes it)."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.stop(generation), "requested", 1)
    pipe.expire(keys.stop(generation), ttl_s)
    pipe.execute()


def schedule_stop(
    client: redis.Redis, keys: JobKeys, generation: int, at: int, ttl_s: int = 24 * 3600
) -> None:
    """The scheduler's side, before it invokes generation ``generation``: end it at ``at``
    exactly (a trial of known length, a re-scale at a known iteration). Set before any worker
    has started, so no worker can be past ``at``; a later proposal (a function running out of
    time) can only bring the stop earlier, as for any agreed stop."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.stop(generation), "at", at)
    pipe.expire(keys.stop(generation), ttl_s)
    pipe.execute()


def stop_iteration(client: redis.Redis, keys: JobKeys, generation: int) -> int | None:
    """The agreed stop iteration of a generation, if any."""
    value = client.hget(keys.stop(generation), "at")
    return None if value is None else int(value)


class Heartbeat:
    """Renews this rank's liveness key from a daemon thread until stopped.

    A renewal that fails (Redis unreachable, a connection dropped, a timeout) is counted and
    retried at the next interval: whether the store is really gone is the training loop's to
    decide, since it talks to the store too and reports a typed error when it cannot.
    """

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
        self._beats = 0
        self._errors = 0
        self._thread = threading.Thread(
            target=self._run, name=f"smlt-heartbeat-{rank}", daemon=True
        )

    def start(self) -> Heartbeat:
        """Beat once now (so a store that is unreachable at start fails the worker at once),
        then from the thread."""
        self._beat()
        self._thread.start()
        return self

    def statistics(self) -> dict[str, int]:
        """How many renewals succeeded and how many failed."""
        return {"beats": self._beats, "errors": self._errors}

    def _beat(self) -> None:
        self._client.set(self._key, 1, px=self._ttl_ms)
        self._beats += 1

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._beat()
            except redis.RedisError:
                self._errors += 1

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(self._interval_s + 1)
