"""An emulated network link for one function: a pacer per direction.

A serverless function reaches the store through its own NIC, about 600 Mbps sustained on Lambda
(platform-facts.md), while a laptop's loopback moves several GB/s. To measure a synchronization
scheme as it would behave in the cloud, each worker process gets a :class:`Link` whose ``up`` and
``down`` pacers hold every transfer until the time the capped link would have needed for it.
Directions are independent (a NIC is full duplex), transfers in one direction queue behind each
other (a shared pipe), and the real loopback transfer time is hidden inside the emulated one
whenever the cap is the slower of the two.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["Link", "Pacer"]


class Pacer:
    """One direction of a link at ``bytes_per_s`` (None: unlimited)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, got {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.bytes_total = 0

    def _book(self, nbytes: int, started_at: float) -> float:
        """Book ``nbytes`` on the pipe from ``started_at``; the monotonic time they are done."""
        with self._lock:
            self.bytes_total += nbytes
            if self.bytes_per_s is None:
                return started_at
            start = max(started_at, self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            return self._free_at

    def after_send(self, nbytes: int, started_at: float) -> None:
        """Hold an upload of ``nbytes`` begun at ``started_at`` (monotonic) until the link
        would have delivered it; only then may the sender tell peers the bytes are there."""
        _sleep_until(self._book(nbytes, started_at))

    def after_receive(self, nbytes: int, started_at: float) -> None:
        """Hold a download of ``nbytes`` begun at ``started_at`` (monotonic) until the link
        would have finished it; the bytes are usable only after that."""
        _sleep_until(self._book(nbytes, started_at))


def _sleep_until(when: float) -> None:
    delay_s = when - time.monotonic()
    if delay_s > 0:
        time.sleep(delay_s)


@dataclass
class Link:
    """Both directions of one function's network. ``Link()`` is an unlimited link."""

    up: Pacer = field(default_factory=lambda: Pacer(None))
    down: Pacer = field(default_factory=lambda: Pacer(None))

    @classmethod
    def capped(cls, mbps: float | None) -> Link:
        """A link of ``mbps`` megabits per second in each direction (None: unlimited)."""
        rate = None if mbps is None else mbps * 1e6 / 8
        return cls(Pacer(rate), Pacer(rate))
