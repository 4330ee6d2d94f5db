"""When a failed worker is re-invoked, and when the scheduler gives up on it.

Like Ray Train's ``FailurePolicy``, :class:`FailurePolicy` only decides; the scheduler executes
the decision (re-invoke after ``delay_s``, or end the run naming the rank and the cause). It is
pure: no clock, no I/O, so every rule below is a unit test away.

**A budget per stretch without progress.** A rank's failures count against one budget only
while the rank makes no progress. A budget allows ``max_attempts`` failures, none of them with a
cause already seen in it (the same exception twice is a bug, not bad luck), within
``deadline_s`` of its first failure. Once a replacement has got past the iteration that failed
(has reported it), the budget starts afresh: two unrelated kills hours apart in a long job are
two pieces of bad luck, not a worker that cannot make progress. The policy sees that progress in
the failures themselves: a rank's failure iterations never decrease within a generation, and a
failure at a later iteration than the previous one means someone finished the previous one.

**Out of memory twice: once more, with more memory.** A worker that runs out of memory twice
without progress would do so a third time: the same cause twice ends the run, except that a
repeated out-of-memory is retried once at :func:`more_memory_mb` (twice the memory, within the
platform's range; the decision's ``memory_mb``). The rank keeps that size for the rest of the
generation; running out of memory once more at it ends the run.

The *attempt number* is not the budget. It keeps counting for the whole generation, because it
names the heartbeat keys and lets fault injection fire on attempt 0 only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FailureDecision", "FailurePolicy", "RetryPolicy", "cause_key", "more_memory_mb"]


@dataclass(frozen=True)
class RetryPolicy:
    """The retry budget of a rank while it makes no progress: at most ``max_attempts``
    failures, re-invoked after ``backoff_s`` x 2^k with +-``jitter`` (so n failed ranks do not
    all return at once), and never after ``deadline_s`` since the budget's first failure."""

    max_attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    jitter: float = 0.5
    deadline_s: float = 600.0

    def delay_s(self, failures: int, uniform: float | None = None) -> float:
        """The wait before re-invoking after the ``failures``-th failure of a budget;
        ``uniform`` in [0, 1) places it in the jitter band (random if None)."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, failures - 1))
        u = random.random() if uniform is None else uniform
        return base * (1 + self.jitter * (2 * u - 1))


@dataclass(frozen=True)
class FailureDecision:
    """What to do about one failure of one rank."""

    retry: bool
    #: Seconds to wait before re-invoking (0 when giving up).
    delay_s: float
    #: Failures counted against the current budget, this one included (1: a fresh budget).
    failures: int
    #: Why the rank is given up on ("" when retrying), e.g. "failed the same way twice".
    why: str = ""
    #: The memory to re-invoke with, when not the rank's current one (a repeated out-of-memory).
    memory_mb: int | None = None


def more_memory_mb(memory_mb: int, max_memory_mb: int) -> int | None:
    """The size a worker that ran out of memory twice at ``memory_mb`` gets once more: twice
    as much, at most ``max_memory_mb``; None if it already had the most there is."""
    bigger = min(2 * memory_mb, max_memory_mb)
    return bigger if bigger > memory_mb else None


def cause_key(cause: str) -> str:
    """What makes two failures 'the same': the cause without its rank/iteration numbers."""
    return "".join(c for c in cause if not c.isdigit())[:200]


class FailurePolicy:
    """The failure budget of one rank in one generation (a new generation: a new policy).

    ``uniform`` draws the jitter (``random.random`` by default; tests pass a constant).
    """

    def __init__(self, retry: RetryPolicy, *, uniform: Callable[[], float] = random.random) -> None:
        self.retry = retry
        self._uniform = uniform
        self._iteration: int | None = None  # where the budget's failures happened
        self._causes: list[str] = []
        self._first_s = 0.0
        self._grown = False  # a repeated out-of-memory was already given more memory

    def decide(
        self,
        iteration: int,
        cause: str,
        at_s: float,
        *,
        out_of_memory_at: tuple[int, int] | None = None,
    ) -> FailureDecision:
        """The rank failed at ``iteration`` (the one it had not finished) with ``cause``,
        noticed at ``at_s`` (any monotonic clock, the same for every call). For an
        out-of-memory, ``out_of_memory_at`` is ``(memory MB it ran with, the platform's
        maximum)``."""
        if self._iteration is None or iteration > self._iteration:
            # The first failure, or a replacement got past the last one: a fresh budget.
            self._causes = []
            self._first_s = at_s
        self._iteration = iteration
        key = cause_key(cause)
        repeated = key in self._causes
        self._causes.append(key)
        failures = len(self._causes)
        retry = self.retry
        late = at_s - self._first_s > retry.deadline_s
        bigger = more_memory_mb(*out_of_memory_at) if out_of_memory_at is not None else None
        if repeated and bigger is not None and not self._grown:
            if not late and failures < retry.max_attempts:
                self._grown = True
                delay_s = retry.delay_s(failures, self._uniform())
                return FailureDecision(True, delay_s, failures, memory_mb=bigger)
        if repeated:
            why = "failed the same way twice"
        elif late:
            why = f"kept failing for over {retry.deadline_s:g} s"
        elif failures >= retry.max_attempts:
            why = f"failed {failures} times"
        else:
            return FailureDecision(True, retry.delay_s(failures, self._uniform()), failures)
        return FailureDecision(False, 0.0, failures, f"{why} without progress")
