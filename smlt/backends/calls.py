"""Where a serverless invocation waits for its platform: one nursery per backend and trio run.

``Backend.invoke`` must return at once, but a platform call that *is* the invocation (Lambda's
``RequestResponse``, OpenWhisk's blocking invoke) lasts as long as the worker: minutes. The call
therefore runs in a task of its own, in a nursery the backend owns (:class:`CallNursery`),
opened inside the caller's trio run the first time the backend invokes there. It is a system
task's nursery: it lives until the run ends, which cancels whatever is still in it, so no call
outlives the run that started it, and every call is bounded by its own timeout besides.

:class:`BackgroundInvocation` is the handle such a call fills in: the call's outcome (a
:class:`~smlt.protocol.payload.WorkerReport` or a typed :mod:`smlt.errors` error, never a
vendor's) is kept, ``result`` waits for it on a ``trio.Event`` (no thread per waiter), and
``cancel`` stops waiting for the platform. A serverless platform cannot stop a running function
(Lambda has no such API; OpenWhisk neither), so after ``cancel`` the function may run on, billed,
until it ends or meets its time limit: exactly what the scheduler's replacement of a hung worker
has to live with on the real platforms.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from smlt.backends.base import Invocation
from smlt.errors import BackendError, FunctionTimeoutError, SmltError, WorkerError
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = ["BackgroundInvocation", "CallNursery"]

R = TypeVar("R")
#: Longest a run's resource (an HTTP client) may take to close.
_CLOSE_TIMEOUT_S = 5.0


class CallNursery(Generic[R]):
    """A backend's nursery for calls that outlive ``invoke``, one per trio run; optionally
    with a resource of the run (an ``httpx.AsyncClient``) made by ``open_resource`` in the run
    and closed by ``close_resource`` when the run (or :meth:`aclose`) ends it."""

    def __init__(
        self,
        name: str,
        open_resource: Callable[[], R] | None = None,
        close_resource: Callable[[R], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self._open = open_resource
        self._close = close_resource
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._resource: R | None = None
        self._ready: trio.Event | None = None

    async def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` in the nursery of the current trio run. ``fn`` must not raise: an
        error escaping a system task would crash the run (BackgroundInvocation.run keeps every
        error as the invocation's outcome)."""
        nursery, _ = await self._current()
        nursery.start_soon(fn)

    async def resource(self) -> R:
        """This run's resource (made on first use)."""
        _, resource = await self._current()
        assert resource is not None, "CallNursery made without open_resource"
        return resource

    async def _current(self) -> tuple[trio.Nursery, R | None]:
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:
            # A new run (tests and the CLI may use one backend object in several trio.run
            # calls): the old run's nursery and resource ended with it.
            self._token, self._nursery, self._resource = token, None, None
            self._ready = trio.Event()
            trio.lowlevel.spawn_system_task(self._host, self._ready, name=self.name)
        assert self._ready is not None
        await self._ready.wait()
        assert self._nursery is not None
        return self._nursery, self._resource

    async def _host(self, ready: trio.Event) -> None:
        resource = self._open() if self._open is not None else None
        try:
            async with trio.open_nursery() as nursery:
                if self._ready is ready:
                    self._nursery, self._resource = nursery, resource
                ready.set()
                await trio.sleep_forever()
        finally:
            if resource is not None and self._close is not None:
                # Closed even though the run is cancelling us, and within a bound.
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT_S):
                    await self._close(resource)

    async def aclose(self) -> None:
        """End this run's nursery (cancelling calls still in it) and close its resource."""
        if self._nursery is not None and self._token is trio.lowlevel.current_trio_token():
            self._nursery.cancel_scope.cancel()
        self._token = self._nursery = self._resource = self._ready = None


class BackgroundInvocation(Invocation):
    """A handle whose outcome a background call (:meth:`run`) fills in."""

    #: Which platform, for messages ("Lambda", "OpenWhisk").
    platform = "the platform"

    def __init__(self, payload: WorkerPayload) -> None:
        self.payload = payload
        self._started_s = time.monotonic()
        self._ended_s: float | None = None
        self._platform_billed_s: float | None = None
        self._outcome: WorkerReport | SmltError | None = None
        self._done = trio.Event()
        self._scope = trio.CancelScope()

    async def run(self, call: Callable[[], Awaitable[WorkerReport]]) -> None:
        """Await ``call()`` and keep what it returned or raised. Never raises (but is
        cancellable): it runs as a system task's child."""
        outcome: WorkerReport | SmltError
        try:
            with self._scope:
                try:
                    outcome = await call()
                except SmltError as exc:
                    outcome = exc
                except Exception as exc:  # a bug in a translation: a typed error, not a crash
                    outcome = BackendError(
                        f"rank {self.payload.rank}: the {self.platform} call failed "
                        f"unexpectedly: {type(exc).__name__}: {exc}"
                    )
                self._finish(outcome)
        finally:
            if not self._done.is_set():  # cancelled from outside: the run or backend is ending
                self._finish(
                    WorkerError(f"rank {self.payload.rank}: the {self.platform} call was cancelled")
                )

    def set_billed_s(self, billed_s: float | None) -> None:
        """The platform's own figure for this invocation (Lambda's ``Billed Duration``,
        OpenWhisk's activation ``duration``), when it reported one."""
        if billed_s is not None:
            self._platform_billed_s = billed_s

    def _finish(self, outcome: WorkerReport | SmltError) -> None:
        if self._done.is_set():
            return
        self._ended_s = time.monotonic()
        self._outcome = outcome
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def billed_s(self) -> float:
        """The platform's billed duration once it reported one; until then wall seconds from
        ``invoke`` to the end (or to now while it runs)."""
        if self._platform_billed_s is not None:
            return self._platform_billed_s
        end_s = time.monotonic() if self._ended_s is None else self._ended_s
        return end_s - self._started_s

    async def result(self, timeout_s: float) -> WorkerReport:
        """The worker's report or its typed error; ``FunctionTimeoutError`` if none came within
        ``timeout_s`` (the wait is then given up, as by :meth:`cancel`)."""
        with trio.move_on_after(max(0.0, timeout_s)):
            await self._done.wait()
        if not self._done.is_set():
            await self.cancel()
            raise FunctionTimeoutError(
                f"rank {self.payload.rank}: no result from {self.platform} within "
                f"{timeout_s:g} s; stopped waiting for it"
            )
        outcome = self._outcome
        if isinstance(outcome, SmltError):
            raise outcome
        assert outcome is not None
        return outcome

    async def cancel(self) -> None:
        """Stop waiting for the platform: ``result`` raises ``WorkerError`` from now on. The
        function itself cannot be stopped and runs until it ends or meets its time limit."""
        if self._done.is_set():
            return
        self._finish(
            WorkerError(
                f"rank {self.payload.rank}: cancelled; {self.platform} cannot stop a running "
                "function, which runs on until it ends or meets its time limit"
            )
        )
        self._scope.cancel()
