"""Retrying a platform call the platform throttled: exponential backoff with full jitter, bounded.

A throttled serverless platform (Lambda's ``TooManyRequestsException``, OpenWhisk's HTTP 429) is
telling n callers to come back later. If they all come back after the same wait they collide
again, so each waits a uniformly random time in ``[0, min(cap, base x 2^k)]`` ("full jitter",
the variant the AWS Architecture Blog's "Exponential Backoff and Jitter" found to finish the
work soonest with the fewest calls), and at least what the platform asked for
(``retry_after_s``). Both the number of attempts and the time spent are bounded: past either,
the last :class:`~smlt.errors.ThrottledError` is raised and the scheduler's failure policy
decides what happens to the worker.

Waits go through ``trio.sleep``, so tests run the policy on ``trio.testing.MockClock`` in no
time.

This is the backends' own retry: each SDK's built-in retries are switched off for invocations
(boto3's would otherwise multiply with ours, and hide the throttling from the bill of attempts).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from smlt.errors import ConfigError, ThrottledError

__all__ = [
    "DEFAULT_THROTTLE_ATTEMPTS",
    "DEFAULT_THROTTLE_BASE_S",
    "DEFAULT_THROTTLE_CAP_S",
    "DEFAULT_THROTTLE_DEADLINE_S",
    "ThrottleRetry",
    "retry_throttled",
]

T = TypeVar("T")

#: Attempts of one invocation the platform keeps throttling (the first one included).
DEFAULT_THROTTLE_ATTEMPTS = int(os.environ.get("SMLT_THROTTLE_ATTEMPTS", "8"))
#: The first backoff's ceiling; it doubles per attempt up to the cap.
DEFAULT_THROTTLE_BASE_S = float(os.environ.get("SMLT_THROTTLE_BASE_S", "0.2"))
DEFAULT_THROTTLE_CAP_S = float(os.environ.get("SMLT_THROTTLE_CAP_S", "20"))
#: No new attempt starts later than this after the first one.
DEFAULT_THROTTLE_DEADLINE_S = float(os.environ.get("SMLT_THROTTLE_DEADLINE_S", "120"))


@dataclass(frozen=True)
class ThrottleRetry:
    """How long and how often to retry a throttled call (see the module docstring)."""

    max_attempts: int = DEFAULT_THROTTLE_ATTEMPTS
    base_s: float = DEFAULT_THROTTLE_BASE_S
    cap_s: float = DEFAULT_THROTTLE_CAP_S
    deadline_s: float = DEFAULT_THROTTLE_DEADLINE_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.base_s <= self.cap_s:
            raise ConfigError(f"need 0 < base_s <= cap_s, got {self.base_s} and {self.cap_s}")
        if self.deadline_s < 0:
            raise ConfigError(f"deadline_s must be >= 0, got {self.deadline_s}")

    def delay_s(self, retry: int, uniform: float, retry_after_s: float | None = None) -> float:
        """The wait before retry number ``retry`` (0 for the first retry); ``uniform`` in
        [0, 1) places it in the jitter band. The platform's ``retry_after_s`` is a floor, but
        never above the cap: a platform asking for an hour gets the cap, and then the deadline
        ends the attempts."""
        ceiling_s = min(self.cap_s, self.base_s * 2**retry)
        wait_s = uniform * ceiling_s
        if retry_after_s is not None:
            wait_s = max(wait_s, min(retry_after_s, self.cap_s))
        return wait_s


async def retry_throttled(
    attempt: Callable[[], Awaitable[T]],
    policy: ThrottleRetry,
    *,
    what: str,
    uniform: Callable[[], float] = random.random,
    on_retry: Callable[[ThrottledError, float], None] | None = None,
) -> T:
    """``await attempt()`` until it does not raise :class:`ThrottledError`, within ``policy``.

    ``what`` names the call in the final error ("rank 3: invoke smlt-job"). ``on_retry(error,
    wait_s)`` is told of each retry (counters, tests). Any other error propagates at once.
    """
    started_s = trio.current_time()
    retry = 0
    while True:
        try:
            return await attempt()
        except ThrottledError as exc:
            elapsed_s = trio.current_time() - started_s
            if retry + 1 >= policy.max_attempts or elapsed_s >= policy.deadline_s:
                raise ThrottledError(
                    f"{what}: still throttled after {retry + 1} attempt(s) over "
                    f"{elapsed_s:.1f} s: {exc}",
                    retry_after_s=exc.retry_after_s,
                ) from exc
            wait_s = policy.delay_s(retry, uniform(), exc.retry_after_s)
            # Never sleep past the deadline only to give up on waking.
            wait_s = min(wait_s, max(0.0, policy.deadline_s - elapsed_s))
            if on_retry is not None:
                on_retry(exc, wait_s)
            retry += 1
            await trio.sleep(wait_s)
