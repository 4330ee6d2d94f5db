"""The resource manager (paper component 1b): decides workers x memory; the scheduler executes.

Like Ray Train's scaling policy, it returns decisions and never acts. This version honours the
user's fixed ``--workers`` / ``--memory-mb``; when no memory is given it asks the backend for the
largest size that fits the requested workers at once. The Bayesian optimizer over (workers,
memory) for a deadline or a budget plugs in here (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from smlt.backends.base import BackendLimits

__all__ = ["Config", "ResourceManager"]


@dataclass(frozen=True)
class Config:
    """One decision: from iteration ``from_iteration`` on, ``workers`` x ``memory_mb``."""

    from_iteration: int
    workers: int
    memory_mb: int
    reason: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


class ResourceManager:
    """Chooses the configuration of each generation."""

    def __init__(
        self,
        limits: BackendLimits,
        *,
        workers: int,
        memory_mb: int | None,
        fit_memory_mb: Callable[[int], int] | None = None,
    ) -> None:
        self.limits = limits
        self.workers = limits.check_workers(workers)
        self.memory_mb = None if memory_mb is None else limits.check_memory(memory_mb)
        self.fit_memory_mb = fit_memory_mb

    def initial(self) -> Config:
        if self.memory_mb is not None:
            return Config(0, self.workers, self.memory_mb, "fixed by the user")
        if self.fit_memory_mb is None:
            memory_mb = self.limits.min_memory_mb
            reason = "backend minimum (no memory given)"
        else:
            memory_mb = self.fit_memory_mb(self.workers)
            reason = f"largest size that fits {self.workers} workers at once (no memory given)"
        return Config(0, self.workers, self.limits.check_memory(memory_mb), reason)
