"""One Ray worker task seen through the backend contract, and Ray's errors translated.

Waiting costs no thread: Ray completes the task's ``concurrent.futures`` future from its own
callback thread, which only pokes a ``trio.Event`` through the trio token. ``result`` is then an
ordinary trio wait: cancellable at once, bounded by ``timeout_s``, and a thousand workers do not
occupy a thousand threads (or take turns in trio's thread pool) to be waited for. The end time
is taken in the callback, so ``billed_s`` does not include the time until someone looked.
"""

from __future__ import annotations

import concurrent.futures
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.exceptions as rex
import trio

from smlt.backends.base import Invocation
from smlt.errors import (
    BackendError,
    CapacityError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    SmltError,
    WorkerError,
)
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = ["RayInvocation", "translate_ray_error"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _text(exc: BaseException) -> str:
    """Ray's message with its terminal colours removed."""
    return _ANSI.sub("", str(exc)).strip()


def _first_line(exc: BaseException) -> str:
    text = _text(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def translate_ray_error(exc: BaseException, rank: int) -> SmltError:
    """The smlt error for a failed worker task of ``rank``.

    An smlt error raised by the entry point is returned as itself (Ray wraps it in a
    RayTaskError; its ``cause`` is the unpickled original), with the remote traceback as a note.
    """
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        trace = _text(exc)
        if isinstance(cause, SmltError):
            note = f"remote traceback of rank {rank}:\n{trace}"
            if note not in getattr(cause, "__notes__", ()):
                cause.add_note(note)
            return cause
        if isinstance(cause, MemoryError):
            return OutOfMemoryError(f"rank {rank}: the entry point ran out of memory: {cause!r}")
        what = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(exc)
        return WorkerError(f"rank {rank}: the entry point raised {what}", remote_traceback=trace)
    if isinstance(exc, rex.OutOfMemoryError):
        return OutOfMemoryError(
            f"rank {rank}: Ray killed the worker because its node ran out of memory "
            f"({_first_line(exc)})"
        )
    if isinstance(exc, rex.WorkerCrashedError):
        return WorkerError(
            f"rank {rank}: the worker process died while running (killed by a signal, "
            f"os._exit, or a crash): {_first_line(exc)}",
            remote_traceback=_text(exc),
        )
    if isinstance(exc, rex.TaskCancelledError):
        return WorkerError(f"rank {rank}: the worker task was cancelled")
    if isinstance(exc, rex.NodeDiedError | rex.LocalRayletDiedError):
        return WorkerError(f"rank {rank}: the node running the worker died: {_first_line(exc)}")
    if isinstance(exc, rex.TaskPlacementGroupRemoved):
        return WorkerError(f"rank {rank}: the worker's reservation was released while it ran")
    if isinstance(exc, rex.TaskUnschedulableError):
        return CapacityError(f"rank {rank}: Ray cannot schedule the worker: {_first_line(exc)}")
    if isinstance(exc, rex.RuntimeEnvSetupError):
        return ConfigError(f"rank {rank}: the runtime_env could not be set up: {_text(exc)}")
    return WorkerError(
        f"rank {rank}: Ray failed the worker: {type(exc).__name__}: {_first_line(exc)}",
        remote_traceback=_text(exc),
    )


class RayInvocation(Invocation):
    """A handle on one worker task. Create it inside the trio run that awaits ``result``."""

    def __init__(
        self,
        payload: WorkerPayload,
        ref: ray.ObjectRef,
        started_s: float,
        *,
        on_end: Callable[[bool], None] | None = None,
    ) -> None:
        self.payload = payload
        self.ref = ref
        self._started_s = started_s
        self._ended_s: float | None = None
        self._on_end = on_end
        self._done = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._future: concurrent.futures.Future[Any] = ref.future()
        self._future.add_done_callback(self._task_ended)

    def _task_ended(self, future: concurrent.futures.Future[Any]) -> None:
        # Runs on Ray's callback thread (or at once, on ours, if the task had already ended).
        if self._ended_s is None:
            self._ended_s = time.monotonic()
        if self._on_end is not None:
            self._on_end(future.exception() is None)
        try:
            self._token.run_sync_soon(self._done.set)
        except trio.RunFinishedError:
            pass  # nobody is waiting any more

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def billed_s(self) -> float:
        """Wall seconds from ``invoke`` to the end, or to now while it runs (the Pricing rounds
        them like Lambda); the running figure is what "cost so far" displays."""
        end_s = time.monotonic() if self._ended_s is None else self._ended_s
        return end_s - self._started_s

    async def result(self, timeout_s: float) -> WorkerReport:
        """The worker's report, or its typed error.

        A worker still running after ``timeout_s`` is stopped, as Lambda stops a function at
        its limit, and ``FunctionTimeoutError`` is raised. To wait without stopping it, cancel
        the wait instead (``trio.move_on_after``): a cancelled ``result`` leaves the task alone.
        """
        rank = self.payload.rank
        with trio.move_on_after(max(0.0, timeout_s)):
            await self._done.wait()
        if not self._future.done():
            if self._ended_s is None:
                self._ended_s = time.monotonic()
            await self.cancel()
            raise FunctionTimeoutError(
                f"rank {rank}: no result within {timeout_s:g} s; the worker task was stopped"
            )
        exc = self._future.exception()
        if exc is not None:
            raise translate_ray_error(exc, rank) from None
        value = self._future.result()
        try:
            return WorkerReport.from_dict(value)
        except (TypeError, ValueError) as err:
            raise WorkerError(
                f"rank {rank}: the entry point returned {type(value).__name__}, "
                f"not a worker report: {err}"
            ) from None

    async def cancel(self) -> None:
        """Kill the worker task (``force``: a stateless worker is harmless to kill)."""
        if self._future.done():
            return
        try:
            await trio.to_thread.run_sync(functools.partial(ray.cancel, self.ref, force=True))
        except rex.RayError as exc:
            raise BackendError(f"rank {self.payload.rank}: cancel failed: {exc}") from exc
