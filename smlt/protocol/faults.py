"""Fault injection, for tests and for users who want to watch recovery work.

Like Horovod's exit schedule, a fault is "rank R fails at iteration T". The schedule comes from
``SMLT_FAULTS``, a comma-separated list of ``ACTION:rank=R:iteration=T``, for example
``SMLT_FAULTS=kill:rank=1:iteration=5,hang:rank=0:iteration=12``. The actions imitate the three
ways a serverless function fails:

- ``kill``  the worker process SIGKILLs itself: a crashed function (out of memory, a segfault).
  No ``finally`` block runs, nothing is flushed; the platform just reports a dead worker.
- ``raise`` the worker raises :class:`InjectedFault`: an exception in user code, which travels
  back to the scheduler with its traceback like any other.
- ``hang``  the worker process SIGSTOPs itself: a frozen function. SIGSTOP freezes *every* thread,
  heartbeat thread included, which is the point: the only way to notice is the heartbeat going
  quiet. A stopped process ignores everything except SIGKILL and SIGCONT (a SIGTERM stays pending
  until it is continued), so whoever supervises it must SIGKILL it; smlt's scheduler does once the
  heartbeat has expired. A test that injects ``hang`` into its own child must do the same.

A fault fires once: only on the first attempt of its rank (``attempt == 0``), so the re-invoked
worker (``attempt >= 1``) runs through the same iteration and the run can be checked to end with
the same parameters as a run without the fault.

The driver validates ``SMLT_FAULTS`` before anything starts (:func:`parse_faults`), and hands the
schedule to workers as a plain string in the payload's ``options`` (payloads are JSON), via
:meth:`FaultInjector.to_option` / :meth:`FaultInjector.from_option`.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

from smlt.errors import ConfigError

__all__ = [
    "ACTIONS",
    "FAULTS_ENV",
    "Fault",
    "FaultAction",
    "FaultInjector",
    "InjectedFault",
    "faults_from_env",
    "format_faults",
    "parse_faults",
]

#: Environment variable holding the fault schedule.
FAULTS_ENV = "SMLT_FAULTS"

FaultAction = Literal["kill", "raise", "hang"]
ACTIONS: tuple[FaultAction, ...] = ("kill", "raise", "hang")

_FORM = "ACTION:rank=R:iteration=T, ACTION one of kill, raise, hang (e.g. kill:rank=1:iteration=5)"
# [0-9], not ``\d``: ``\d`` also matches e.g. Arabic-Indic digits, which int() then accepts.
_ENTRY = re.compile(r"(kill|raise|hang):rank=([0-9]+):iteration=([0-9]+)")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault. Deliberately not an SmltError: it stands for a bug in user
    code, and must be handled exactly as one would be."""


@dataclass(frozen=True)
class Fault:
    """Rank ``rank`` fails with ``action`` at the start of iteration ``iteration``."""

    action: FaultAction
    rank: int
    iteration: int

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"fault action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.rank < 0 or self.iteration < 0:
            raise ConfigError(
                f"fault {self.action} at rank {self.rank} iteration {self.iteration}: "
                "rank and iteration must be >= 0"
            )

    def __str__(self) -> str:
        """The entry as written in ``SMLT_FAULTS``; :func:`parse_faults` reads it back."""
        return f"{self.action}:rank={self.rank}:iteration={self.iteration}"


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The faults of an ``SMLT_FAULTS`` value, in the order given.

    Empty or blank text means no faults. A malformed entry (including an empty one between
    commas, which is more likely a typo than an intent) and two faults for the same rank and
    iteration (only one can fire) are :class:`~smlt.errors.ConfigError` naming the entry.
    """
    if not text.strip():
        return ()
    faults: list[Fault] = []
    seen: dict[tuple[int, int], str] = {}
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        match = _ENTRY.fullmatch(entry)
        if match is None:
            what = f"entry {position} is empty" if not entry else f"entry {entry!r} is malformed"
            raise ConfigError(f"{FAULTS_ENV} {what}; expected {_FORM}")
        fault = Fault(cast(FaultAction, match[1]), int(match[2]), int(match[3]))
        where = (fault.rank, fault.iteration)
        if where in seen:
            raise ConfigError(
                f"{FAULTS_ENV} entries {seen[where]!r} and {entry!r} both name rank {fault.rank} "
                f"at iteration {fault.iteration}; only one fault can fire there"
            )
        seen[where] = entry
        faults.append(fault)
    return tuple(faults)


def format_faults(faults: Iterable[Fault]) -> str:
    """The ``SMLT_FAULTS`` text for ``faults``: ``parse_faults(format_faults(f)) == tuple(f)``."""
    return ",".join(str(f) for f in faults)


def faults_from_env(environ: Mapping[str, str] = os.environ) -> tuple[Fault, ...]:
    """The schedule in ``$SMLT_FAULTS`` (none if unset)."""
    return parse_faults(environ.get(FAULTS_ENV, ""))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


class FaultInjector:
    """The fault schedule as seen by one invocation of one rank.

    Call :meth:`maybe_fire` at the start of every iteration. ``kill_fn`` and ``hang_fn`` are the
    process-level actions; tests replace them to check the dispatch without killing pytest.
    """

    def __init__(
        self,
        faults: Iterable[Fault],
        rank: int,
        attempt: int,
        *,
        kill_fn: Callable[[], None] = _kill_self,
        hang_fn: Callable[[], None] = _stop_self,
    ) -> None:
        if rank < 0 or attempt < 0:
            raise ConfigError(
                f"FaultInjector needs rank >= 0 and attempt >= 0, got {rank}, {attempt}"
            )
        #: The whole schedule, every rank's: what :meth:`to_option` passes on.
        self.faults = tuple(faults)
        self.rank = rank
        self.attempt = attempt
        # Only the first attempt fails; a re-invoked worker must get through, or nothing recovers.
        self._pending = (
            {f.iteration: f for f in self.faults if f.rank == rank} if attempt == 0 else {}
        )
        self._kill_fn = kill_fn
        self._hang_fn = hang_fn

    def to_option(self) -> str:
        """The schedule as a plain string, for a JSON payload's ``options``."""
        return format_faults(self.faults)

    @classmethod
    def from_option(cls, text: str, rank: int, attempt: int) -> FaultInjector:
        """The injector for ``rank``'s ``attempt``, from :meth:`to_option`'s string (or
        ``SMLT_FAULTS`` text: they are the same format)."""
        return cls(parse_faults(text), rank, attempt)

    def maybe_fire(self, iteration: int) -> None:
        """Fail now if this rank's first attempt has a fault at ``iteration``; each fires once.

        ``kill`` and ``hang`` do not return in a real worker. ``raise`` raises
        :class:`InjectedFault`.
        """
        fault = self._pending.pop(iteration, None)
        if fault is None:
            return
        if fault.action == "kill":
            self._kill_fn()
        elif fault.action == "hang":
            self._hang_fn()
        else:
            raise InjectedFault(f"injected fault: raise at rank {self.rank} iteration {iteration}")

    def __repr__(self) -> str:
        return (
            f"FaultInjector({self.to_option()!r}, rank={self.rank}, attempt={self.attempt}, "
            f"pending={sorted(self._pending)})"
        )
