"""The contract every backend fulfils: ray, aws_lambda, openwhisk, sim.

A backend turns a :class:`~smlt.protocol.payload.WorkerPayload` into a running worker and tells
the scheduler how it ended. It knows its platform's limits and prices; it knows nothing of
training. The vocabulary is small on purpose (Lithops' lesson): ``deploy``, ``invoke``,
``clean``, ``aclose``; plus :class:`Invocation` handles whose ``result()`` either returns the
worker's report or raises one of the typed errors of :mod:`smlt.errors` (``WorkerError``,
``OutOfMemoryError``, ``FunctionTimeoutError``, ``ThrottledError``, ``BackendAuthError``,
``CapacityError``). Vendor errors never leak past a backend.

``invoke`` and ``result`` are async (trio): the scheduler fans out n invocations in a nursery.
Blocking SDK calls belong in ``trio.to_thread.run_sync(..., limiter=...)`` inside the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from smlt.errors import ConfigError
from smlt.optimizer.cost import LAMBDA_X86, MB_PER_VCPU, Pricing
from smlt.protocol.payload import WorkerPayload, WorkerReport

__all__ = [
    "LAMBDA_X86_PRICING",
    "MB_PER_VCPU",
    "Backend",
    "BackendLimits",
    "Invocation",
    "Pricing",
]

#: The Ray backend's default price, AWS Lambda x86. Every price lives in
#: :mod:`smlt.optimizer.cost` (one table for the scheduler's bill and the optimizer's forecasts);
#: ``Pricing`` and ``MB_PER_VCPU`` are re-exported from there for the backends.
LAMBDA_X86_PRICING = LAMBDA_X86


@dataclass(frozen=True)
class BackendLimits:
    """What one function may be given and how many may run at once."""

    min_memory_mb: int
    max_memory_mb: int
    max_duration_s: float
    max_concurrency: int
    max_payload_bytes: int
    memory_step_mb: int = 1

    def check_memory(self, memory_mb: int) -> int:
        if not self.min_memory_mb <= memory_mb <= self.max_memory_mb:
            raise ConfigError(
                f"memory {memory_mb} MB is outside this backend's range "
                f"[{self.min_memory_mb}, {self.max_memory_mb}] MB"
            )
        return memory_mb

    def check_workers(self, workers: int) -> int:
        if not 1 <= workers <= self.max_concurrency:
            raise ConfigError(
                f"{workers} workers is outside this backend's range [1, {self.max_concurrency}]"
            )
        return workers


class Invocation(ABC):
    """A handle on one running worker."""

    payload: WorkerPayload

    @abstractmethod
    async def result(self, timeout_s: float) -> WorkerReport:
        """Wait at most ``timeout_s`` for the worker to end; its report, or a typed error.

        Raises ``FunctionTimeoutError`` if the worker has not ended within ``timeout_s``.
        """

    @abstractmethod
    async def cancel(self) -> None:
        """Stop the worker if the platform can (best effort; a stateless worker is harmless)."""

    @property
    @abstractmethod
    def billed_s(self) -> float:
        """Seconds the platform bills for this invocation so far (while it runs: until now)."""


class Backend(ABC):
    """One serverless platform (or Ray) behind the common contract."""

    name: str = ""

    @property
    @abstractmethod
    def limits(self) -> BackendLimits: ...

    @property
    @abstractmethod
    def pricing(self) -> Pricing: ...

    def memory_range_mb(self) -> tuple[int, int]:
        """The memory a function may be given, ``(min, max)``; known without connecting, so
        that a size out of range is refused before anything starts (backends whose
        :attr:`limits` connect override this)."""
        limits = self.limits
        return limits.min_memory_mb, limits.max_memory_mb

    def check_fits(self, workers: int, memory_mb: int) -> object:
        """Raise ``CapacityError`` if ``workers`` x ``memory_mb`` cannot run at once: checked as
        a run starts, before it writes anything. Platforms whose only limits are
        :attr:`limits` (checked by the resource manager) have nothing more to check."""
        return None

    def default_memory_mb(self, workers: int) -> int:
        """Memory per worker when the user gives none: one vCPU's worth (1,769 MB) within the
        backend's range. Backends with a finite cluster override this with what fits."""
        limits = self.limits
        return min(max(MB_PER_VCPU, limits.min_memory_mb), limits.max_memory_mb)

    @abstractmethod
    async def deploy(self, job_id: str, workers: int, memory_mb: int) -> None:
        """Make ``workers`` functions of ``memory_mb`` ready for ``job_id`` (create or update
        the function, reserve capacity). Raises CapacityError if they cannot run at once."""

    @abstractmethod
    async def invoke(self, payload: WorkerPayload) -> Invocation:
        """Start one worker; returns at once with a handle."""

    @abstractmethod
    async def clean(self) -> None:
        """Release what ``deploy`` took (functions, reservations). Safe to call twice."""

    async def aclose(self) -> None:
        """Release the backend's own resources (clients, connections)."""
        await self.clean()
