"""Fault injection, for tests and for users who want to watch recovery work.

Like Horovod's exit schedule, a fault is "rank R fails at iteration T". The schedule comes from
``SMLT_FAULTS``, a comma-separated list of ``ACTION:rank=R:iteration=T[:phase=P]``, for example
``SMLT_FAULTS=kill:rank=1:iteration=5,hang:rank=0:iteration=12:phase=after-publish``. Three
actions imitate the ways a serverless function fails, and one the way a platform misbehaves:

- ``kill``  the worker process SIGKILLs itself: a crashed function (out of memory, a segfault).
  No ``finally`` block runs, nothing is flushed; the platform just reports a dead worker.
- ``raise`` the worker raises :class:`InjectedFault`: an exception in user code, which travels
  back to the scheduler with its traceback like any other.
- ``hang``  the worker process SIGSTOPs itself: a frozen function. SIGSTOP freezes *every* thread,
  heartbeat thread included, which is the point: the only way to notice is the heartbeat going
  quiet. A stopped process ignores everything except SIGKILL and SIGCONT (a SIGTERM stays pending
  until it is continued), so whoever supervises it must SIGKILL it; smlt's scheduler does once the
  heartbeat has expired. A test that injects ``hang`` into its own child must do the same.
- ``duplicate`` (the scheduler's, not the worker's): the invocation of rank R whose range of
  iterations contains T is delivered twice at once, as at-least-once platforms (Lambda's
  asynchronous invocations, OpenWhisk's retries) sometimes do. Both copies run; the rank
  succeeds if either does. A phase means nothing to it and is ignored.

**Phases** say where in iteration T a worker fault strikes, because a failure after the worker
has written something tests more than one before it (DESIGN §3: a fault at any point of a step
must leave the same bytes as no fault). ``start`` is the default:

- ``start``: before the iteration does anything;
- ``during-upload``: after the first gradient slice is uploaded, before the others;
- ``after-upload``: every gradient slice is uploaded;
- ``before-announce``: the owner's new shard (parameters, or a replicated step's mean gradient)
  is written but not yet announced, so nobody waiting for it has been told;
- ``after-publish``: the owner's new parameter shard (version T + 1) is in the store;
- ``during-gather``: after the first parameter shard of T + 1 is downloaded;
- ``before-report``: the step is done, its progress report not yet written;
- ``during-checkpoint``: between the two shard writes of the first checkpoint this rank writes
  at or after iteration T (checkpoints are not written at every iteration).

The worker calls :meth:`FaultInjector.maybe_fire` at each of these points. Just before a fault
acts, an ``on_fire`` callback lets the worker record when it happened (smlt's trainer writes a
``fault`` event to the progress stream), which is how the scheduler measures detection time.

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
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

from smlt.errors import ConfigError

__all__ = [
    "ACTIONS",
    "FAULTS_ENV",
    "PHASES",
    "WORKER_ACTIONS",
    "Fault",
    "FaultAction",
    "FaultInjector",
    "FaultPhase",
    "InjectedFault",
    "OnFire",
    "fault_event",
    "faults_from_env",
    "format_faults",
    "parse_faults",
]

#: Environment variable holding the fault schedule.
FAULTS_ENV = "SMLT_FAULTS"

FaultAction = Literal["kill", "raise", "hang", "duplicate"]
ACTIONS: tuple[FaultAction, ...] = ("kill", "raise", "hang", "duplicate")
#: The actions a worker carries out itself; ``duplicate`` is the scheduler's.
WORKER_ACTIONS: tuple[FaultAction, ...] = ("kill", "raise", "hang")

FaultPhase = Literal[
    "start",
    "during-upload",
    "after-upload",
    "before-announce",
    "after-publish",
    "during-gather",
    "before-report",
    "during-checkpoint",
]
PHASES: tuple[FaultPhase, ...] = get_args(FaultPhase)

_FORM = (
    "ACTION:rank=R:iteration=T[:phase=P], ACTION one of "
    f"{', '.join(ACTIONS)}, P one of {', '.join(PHASES)} (e.g. kill:rank=1:iteration=5)"
)
# [0-9], not ``\d``: ``\d`` also matches e.g. Arabic-Indic digits, which int() then accepts.
_ENTRY = re.compile(
    r"(kill|raise|hang|duplicate):rank=([0-9]+):iteration=([0-9]+)(?::phase=([a-z-]+))?"
)


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault. Deliberately not an SmltError: it stands for a bug in user
    code, and must be handled exactly as one would be."""


@dataclass(frozen=True)
class Fault:
    """Rank ``rank`` fails with ``action`` at ``phase`` of iteration ``iteration``."""

    action: FaultAction
    rank: int
    iteration: int
    phase: FaultPhase = "start"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"fault action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.rank < 0 or self.iteration < 0:
            raise ConfigError(
                f"fault {self.action} at rank {self.rank} iteration {self.iteration}: "
                "rank and iteration must be >= 0"
            )
        if self.phase not in PHASES:
            raise ConfigError(
                f"fault {self.action} at rank {self.rank} iteration {self.iteration}: phase "
                f"{self.phase!r} is not one of {', '.join(PHASES)}"
            )

    @property
    def by_worker(self) -> bool:
        """True for the faults a worker carries out; False for the scheduler's ``duplicate``."""
        return self.action in WORKER_ACTIONS

    def __str__(self) -> str:
        """The entry as written in ``SMLT_FAULTS``; :func:`parse_faults` reads it back. The
        default phase is left out, so a schedule without phases reads as it always did."""
        text = f"{self.action}:rank={self.rank}:iteration={self.iteration}"
        return text if self.phase == "start" else f"{text}:phase={self.phase}"


def parse_faults(text: str) -> tuple[Fault, ...]:
    """The faults of an ``SMLT_FAULTS`` value, in the order given.

    Empty or blank text means no faults. A malformed entry (including an empty one between
    commas, which is more likely a typo than an intent, and an unknown phase) and two worker
    faults for the same rank and iteration (only one can fire: the first ends the attempt) are
    :class:`~smlt.errors.ConfigError` naming the entry. A ``duplicate`` may share its rank and
    iteration with a worker fault: the scheduler delivers the invocation twice, and each copy
    meets the fault (two copies of attempt 0 fail alike).
    """
    if not text.strip():
        return ()
    faults: list[Fault] = []
    seen: dict[tuple[bool, int, int], str] = {}
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        match = _ENTRY.fullmatch(entry)
        if match is None:
            what = f"entry {position} is empty" if not entry else f"entry {entry!r} is malformed"
            raise ConfigError(f"{FAULTS_ENV} {what}; expected {_FORM}")
        phase = match[4] or "start"
        if phase not in PHASES:
            raise ConfigError(
                f"{FAULTS_ENV} entry {entry!r} has an unknown phase {phase!r}; expected {_FORM}"
            )
        fault = Fault(
            cast(FaultAction, match[1]), int(match[2]), int(match[3]), cast(FaultPhase, phase)
        )
        where = (fault.by_worker, fault.rank, fault.iteration)
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


OnFire = Callable[[Fault, int, str], None]
"""``on_fire(fault, iteration, phase)``: called just before a fault acts."""


def fault_event(
    fault: Fault,
    iteration: int,
    phase: str,
    *,
    generation: int,
    attempt: int,
    at_unix_s: float | None = None,
) -> dict[str, str | int | float]:
    """The progress-stream entry a worker writes just before ``fault`` acts.

    ``{"event": "fault", "rank", "t", "phase", "action", "at_unix_s", "gen", "attempt"}``: the
    scheduler does not count it as an iteration report; it pairs it with the failure it causes
    and reports the measured detection time (the scheduler's wall clock when it noticed, minus
    ``at_unix_s``; both clocks are this machine's, or NTP-synchronized ones).
    """
    return {
        "event": "fault",
        "rank": fault.rank,
        "t": iteration,
        "phase": phase,
        "action": fault.action,
        "at_unix_s": time.time() if at_unix_s is None else at_unix_s,
        "gen": generation,
        "attempt": attempt,
    }


class FaultInjector:
    """The worker faults of the schedule as seen by one invocation of one rank.

    Call :meth:`maybe_fire` at every point a phase names. ``kill_fn`` and ``hang_fn`` are the
    process-level actions; tests replace them to check the dispatch without killing pytest.
    ``on_fire`` is called just before any fault acts (a ``kill`` leaves no other chance to say
    when it happened); :meth:`maybe_fire` may give its own instead.
    """

    def __init__(
        self,
        faults: Iterable[Fault],
        rank: int,
        attempt: int,
        *,
        kill_fn: Callable[[], None] = _kill_self,
        hang_fn: Callable[[], None] = _stop_self,
        on_fire: OnFire | None = None,
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
            [f for f in self.faults if f.rank == rank and f.by_worker] if attempt == 0 else []
        )
        self._kill_fn = kill_fn
        self._hang_fn = hang_fn
        self._on_fire = on_fire

    def to_option(self) -> str:
        """The schedule as a plain string, for a JSON payload's ``options``."""
        return format_faults(self.faults)

    @classmethod
    def from_option(
        cls, text: str, rank: int, attempt: int, *, on_fire: OnFire | None = None
    ) -> FaultInjector:
        """The injector for ``rank``'s ``attempt``, from :meth:`to_option`'s string (or
        ``SMLT_FAULTS`` text: they are the same format)."""
        return cls(parse_faults(text), rank, attempt, on_fire=on_fire)

    def maybe_fire(
        self, iteration: int, phase: str = "start", *, on_fire: OnFire | None = None
    ) -> None:
        """Fail now if this rank's first attempt has a fault at ``phase`` of ``iteration``.

        Each fault fires once. A ``during-checkpoint`` fault fires at the first checkpoint
        written at or after its iteration; the others at their iteration exactly. ``on_fire``
        (or the injector's own) is called first. ``kill`` and ``hang`` do not return in a real
        worker; ``raise`` raises :class:`InjectedFault`. An unknown phase is a ConfigError (a
        caller's typo must not silently never fire).
        """
        if phase not in PHASES:
            raise ConfigError(f"fault phase {phase!r} is not one of {', '.join(PHASES)}")
        fault = next((f for f in self._pending if _due(f, iteration, phase)), None)
        if fault is None:
            return
        self._pending.remove(fault)
        callback = on_fire if on_fire is not None else self._on_fire
        if callback is not None:
            callback(fault, iteration, phase)
        if fault.action == "kill":
            self._kill_fn()
        elif fault.action == "hang":
            self._hang_fn()
        else:
            where = "" if phase == "start" else f" (phase {phase})"
            raise InjectedFault(
                f"injected fault: raise at rank {self.rank} iteration {iteration}{where}"
            )

    def __repr__(self) -> str:
        return (
            f"FaultInjector({self.to_option()!r}, rank={self.rank}, attempt={self.attempt}, "
            f"pending={format_faults(self._pending)!r})"
        )


def _due(fault: Fault, iteration: int, phase: str) -> bool:
    if fault.phase != phase:
        return False
    if phase == "during-checkpoint":
        return iteration >= fault.iteration
    return iteration == fault.iteration
