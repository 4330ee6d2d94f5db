"""Fault injection, for tests and for users who want to see recovery work (like Horovod's exit
schedule).

``SMLT_FAULTS`` is a comma-separated list of ``ACTION:rank=R:iteration=T``:

- ``kill``  the worker process SIGKILLs itself at the start of iteration T (a crashed function);
- ``raise`` the handler raises :class:`InjectedFault` (an exception in user code);
- ``hang``  the worker process SIGSTOPs itself: everything freezes, heartbeat thread included,
  as a frozen function does. Whoever supervises it must SIGKILL it (the scheduler does, once the
  heartbeat has expired).

Each fault fires once, on the first attempt of its rank: the re-invoked worker (attempt >= 1)
runs through.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from smlt.errors import ConfigError

__all__ = ["ACTIONS", "Fault", "FaultInjector", "InjectedFault", "faults_from_env", "parse_faults"]

ACTIONS = ("kill", "raise", "hang")
_ENTRY = re.compile(r"^(kill|raise|hang):rank=(\d+):iteration=(\d+)$")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


@dataclass(frozen=True)
class Fault:
    action: str
    rank: int
    iteration: int


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The faults of an ``SMLT_FAULTS`` value; ConfigError naming a malformed entry."""
    faults: list[Fault] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise ConfigError(
                f"SMLT_FAULTS entry {entry!r} is not ACTION:rank=R:iteration=T "
                f"with ACTION one of {', '.join(ACTIONS)}"
            )
        fault = Fault(match[1], int(match[2]), int(match[3]))
        if any((f.rank, f.iteration) == (fault.rank, fault.iteration) for f in faults):
            raise ConfigError(
                f"SMLT_FAULTS names rank {fault.rank} at iteration {fault.iteration} twice"
            )
        faults.append(fault)
    return tuple(faults)


def faults_from_env(environ: Mapping[str, str] = os.environ) -> tuple[Fault, ...]:
    return parse_faults(environ.get("SMLT_FAULTS", ""))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


class FaultInjector:
    """The faults of one rank's invocation; :meth:`maybe_fire` at the start of each iteration."""

    def __init__(
        self,
        faults: tuple[Fault, ...],
        rank: int,
        attempt: int,
        *,
        kill_fn: Callable[[], None] = _kill,
        hang_fn: Callable[[], None] = _hang,
    ) -> None:
        self.by_iteration = (
            {f.iteration: f for f in faults if f.rank == rank} if attempt == 0 else {}
        )
        self.rank = rank
        self._kill_fn = kill_fn
        self._hang_fn = hang_fn

    @classmethod
    def from_option(cls, text: str, rank: int, attempt: int) -> FaultInjector:
        """From the schedule string the driver puts in a payload's options."""
        return cls(parse_faults(text), rank, attempt)

    def maybe_fire(self, iteration: int) -> None:
        fault = self.by_iteration.pop(iteration, None)
        if fault is None:
            return
        if fault.action == "kill":
            self._kill_fn()
        elif fault.action == "hang":
            self._hang_fn()
        else:
            raise InjectedFault(f"injected fault: raise at rank {self.rank} iteration {iteration}")
