"""What the Lambda and OpenWhisk backends share: a function per job, invoked in the background.

A job's workers all run one function (Lambda) or action (OpenWhisk), ``<prefix><job>``, whose
memory is the generation's: ``deploy`` creates or updates it and returns once the platform has
it ready. Its time limit is the run's ``--function-timeout`` (carried by every payload, so the
first invocation of a run sets it when it differs), else the backend's ``timeout_s``. A rank
re-invoked with more memory than its generation (the scheduler does that once after a repeated
out-of-memory) runs in a companion ``<prefix><job>-<m>mb``, so that its peers' function is not
changed under them; ``clean`` deletes them all.

``invoke`` returns at once: the platform call that is the invocation runs in the backend's
:class:`~smlt.backends.calls.CallNursery` and fills in a
:class:`~smlt.backends.calls.BackgroundInvocation`. Subclasses say how to make a function
ready (:meth:`ServerlessBackend._ensure_function`), delete functions, and make the call.
"""

from __future__ import annotations

import functools
import json
import math
from abc import abstractmethod
from typing import Any

import trio

from smlt.backends.base import Backend
from smlt.backends.calls import BackgroundInvocation, CallNursery
from smlt.backends.managed import ManagedResource, resource_name
from smlt.errors import BackendError, CapacityError, ConfigError, SmltError, ThrottledError
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = ["ServerlessBackend"]


class ServerlessBackend(Backend):
    """The shared half of a serverless backend (module docstring)."""

    #: The platform's name in messages ("Lambda", "OpenWhisk").
    platform = ""
    #: What it calls a function ("function", "action").
    noun = "function"

    def __init__(
        self,
        *,
        prefix: str,
        timeout_s: int,
        max_concurrency: int,
        calls: CallNursery[Any],
    ) -> None:
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._max_concurrency = max_concurrency
        self._calls = calls
        self._job: str | None = None
        self._workers = 0
        self._memory_mb = 0
        # name -> (memory MB, timeout s) as last made ready.
        self._functions: dict[str, tuple[int, int]] = {}
        self._counts = {"invocations": 0, "succeeded": 0, "failed": 0, "throttled": 0}
        self._lock_token: trio.lowlevel.TrioToken | None = None
        self._lock = trio.Lock()

    # -- what a platform supplies ----------------------------------------------------------------

    @abstractmethod
    def require_deployable(self) -> None:
        """Raise ConfigError unless a function can be created (code, credentials, role)."""

    @abstractmethod
    async def _ensure_function(self, name: str, job: str, memory_mb: int, timeout_s: int) -> None:
        """Create or update ``name`` (tagged as smlt's, for ``job``) and return once it is
        ready; refuse (ConfigError) a same-named function smlt did not create."""

    @abstractmethod
    async def _delete_functions(self, names: list[str]) -> None:
        """Delete these functions; one that does not exist is not an error."""

    @abstractmethod
    async def _call(self, invocation: BackgroundInvocation, name: str, body: bytes) -> WorkerReport:
        """Run one invocation of ``name`` with ``body`` to its end: the report, or the typed
        error (throttling retried within the backend's policy)."""

    @abstractmethod
    def _new_invocation(self, payload: WorkerPayload) -> BackgroundInvocation: ...

    @abstractmethod
    async def remove_managed(
        self, *, older_than_s: float | None = None, dry_run: bool = False
    ) -> list[ManagedResource]:
        """Delete every function labelled as smlt's (the label, not the name, decides); with
        ``older_than_s`` only those not updated for that long (a running job updates its
        function every generation); ``dry_run`` deletes nothing. Returns what was (or would
        be) deleted."""

    # -- shared ----------------------------------------------------------------------------------

    def check_fits(self, workers: int, memory_mb: int) -> object:
        """As :meth:`Backend.check_fits`: more workers than ``max_concurrency`` cannot all run
        at once (a synchronous job would wait forever for the ones the platform throttles).
        Also refuses, before anything starts, a configuration with nothing to deploy."""
        self.limits.check_memory(memory_mb)
        if workers > self._max_concurrency:
            raise CapacityError(
                f"{workers} workers exceed the {self._max_concurrency} concurrent "
                f"{self.platform} executions allowed (backend option max_concurrency)"
            )
        self.require_deployable()
        return None

    def function_name(self, job_id: str, memory_mb: int | None = None) -> str:
        """The job's function; with ``memory_mb``, its companion of that size."""
        suffix = "" if memory_mb is None else f"-{memory_mb}mb"
        return resource_name(self._prefix, job_id, suffix)

    def _run_lock(self) -> trio.Lock:
        """One lock per trio run around function updates (a lock held when a run died would
        never be released)."""
        token = trio.lowlevel.current_trio_token()
        if self._lock_token is not token:
            self._lock_token, self._lock = token, trio.Lock()
        return self._lock

    async def deploy(self, job_id: str, workers: int, memory_mb: int) -> None:
        """Create or update the job's function with ``memory_mb``; return once it is ready."""
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        await trio.to_thread.run_sync(self.check_fits, workers, memory_mb)
        if self._job is not None and self._job != job_id:
            await self.clean()  # another job's functions: this backend no longer serves it
        self._job, self._workers, self._memory_mb = job_id, workers, memory_mb
        async with self._run_lock():
            await self._make_ready(self.function_name(job_id), memory_mb, self._timeout_s)

    async def _make_ready(self, name: str, memory_mb: int, timeout_s: int) -> None:
        assert self._job is not None
        await self._ensure_function(name, self._job, memory_mb, timeout_s)
        self._functions[name] = (memory_mb, timeout_s)

    def _platform_timeout_s(self, function_timeout_s: float | None) -> int:
        """The function's time limit for a run's ``--function-timeout`` (whole seconds)."""
        if function_timeout_s is None:
            return self._timeout_s
        limit_s = max(1, math.ceil(function_timeout_s))
        if limit_s > self.limits.max_duration_s:
            raise ConfigError(
                f"a function time limit of {function_timeout_s:g} s exceeds {self.platform}'s "
                f"{self.limits.max_duration_s:g} s"
            )
        return limit_s

    async def invoke(self, payload: WorkerPayload) -> BackgroundInvocation:
        """Start one worker; returns at once (the call runs in the backend's nursery)."""
        if self._job is None or payload.job_id != self._job:
            raise BackendError(
                f"invoke before deploy: no {self.noun} is deployed for job {payload.job_id}"
            )
        body = json.dumps(payload.to_dict()).encode()
        limit = self.limits.max_payload_bytes
        if len(body) > limit:
            raise ConfigError(
                f"payload of {len(body)} bytes exceeds {self.platform}'s {limit} bytes"
            )
        name = await self._function_for(payload)
        invocation = self._new_invocation(payload)
        self._counts["invocations"] += 1
        call = functools.partial(self._counted, invocation, name, body)
        await self._calls.start_soon(functools.partial(invocation.run, call))
        return invocation

    async def _counted(
        self, invocation: BackgroundInvocation, name: str, body: bytes
    ) -> WorkerReport:
        try:
            report = await self._call(invocation, name, body)
        except SmltError:
            self._counts["failed"] += 1
            raise
        self._counts["succeeded"] += 1
        return report

    async def _function_for(self, payload: WorkerPayload) -> str:
        """The function that runs ``payload``, brought to its memory and time limit first."""
        assert self._job is not None
        timeout_s = self._platform_timeout_s(payload.function_timeout_s)
        companion = payload.memory_mb != self._memory_mb
        name = self.function_name(self._job, payload.memory_mb if companion else None)
        wanted = (payload.memory_mb, timeout_s)
        if self._functions.get(name) != wanted:
            async with self._run_lock():
                if self._functions.get(name) != wanted:  # not done while we waited
                    self.limits.check_memory(payload.memory_mb)
                    self._timeout_s = timeout_s
                    await self._make_ready(name, payload.memory_mb, timeout_s)
        return name

    def _throttled(self, _error: ThrottledError, _wait_s: float) -> None:
        self._counts["throttled"] += 1

    async def clean(self) -> None:
        """Delete this job's functions (the generation's and any companion). Idempotent."""
        names = set(self._functions)
        if self._job is not None:
            names.add(self.function_name(self._job))
        self._functions.clear()
        self._job, self._workers, self._memory_mb = None, 0, 0
        if names:
            await self._delete_functions(sorted(names))

    async def aclose(self) -> None:
        try:
            await self.clean()
        finally:
            await self._calls.aclose()

    def statistics(self) -> dict[str, Any]:
        """Counters and the deployed functions, for status lines and tests."""
        return {
            **self._counts,
            "functions": dict(self._functions),
            "workers": self._workers,
            "memory_mb": self._memory_mb,
            "timeout_s": self._timeout_s,
        }
