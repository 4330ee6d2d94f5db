"""The resource manager (paper component 1b): decides workers x memory; the scheduler executes.

Like Ray Train's scaling policy, it returns decisions and never acts. This version honours the
user's fixed ``--workers`` / ``--memory-mb`` (when no memory is given it asks the backend for the
largest size that fits the requested workers at once) and a re-scaling schedule
(``--rescale 40:2`` = from iteration 40 on, 2 workers), which exercises exactly the path the
Bayesian optimizer over (workers, memory) will take when training dynamics change (DESIGN §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from smlt.backends.base import BackendLimits

__all__ = ["Config", "Rescale", "ResourceManager"]


@dataclass(frozen=True)
class Config:
    """One decision: from iteration ``from_iteration`` on, ``workers`` x ``memory_mb``."""

    from_iteration: int
    workers: int
    memory_mb: int
    reason: str

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Rescale:
    """From iteration ``at`` on, run ``workers`` x ``memory_mb`` (None: keep the memory)."""

    at: int
    workers: int
    memory_mb: int | None = None


class ResourceManager:
    """Chooses the configuration of each generation."""

    def __init__(
        self,
        limits: BackendLimits,
        *,
        workers: int,
        memory_mb: int | None,
        fit_memory_mb: Callable[[int], int] | None = None,
        rescales: tuple[Rescale, ...] = (),
    ) -> None:
        self.limits = limits
        self.workers = limits.check_workers(workers)
        self.memory_mb = None if memory_mb is None else limits.check_memory(memory_mb)
        self.fit_memory_mb = fit_memory_mb
        for r in rescales:
            limits.check_workers(r.workers)
            if r.memory_mb is not None:
                limits.check_memory(r.memory_mb)
        self._rescales = sorted(rescales, key=lambda r: r.at)
        self._current: Config | None = None
        self._settings = {"workers": workers, "memory_mb": memory_mb, "rescales": tuple(rescales)}

    def settings(self) -> dict[str, object]:
        """The user's choices, without the backend: what travels to the scheduler's actor,
        which builds its own manager against its own backend object."""
        return dict(self._settings)

    def initial(self, start_iteration: int = 0) -> Config:
        # Re-scales scheduled before a resumed run's start apply at once.
        while self._rescales and self._rescales[0].at <= start_iteration:
            step = self._rescales.pop(0)
            self.workers = step.workers
            self.memory_mb = step.memory_mb or self.memory_mb
        if self.memory_mb is not None:
            config = Config(start_iteration, self.workers, self.memory_mb, "fixed by the user")
        elif self.fit_memory_mb is None:
            memory_mb = self.limits.check_memory(self.limits.min_memory_mb)
            config = Config(start_iteration, self.workers, memory_mb, "backend minimum")
        else:
            memory_mb = self.limits.check_memory(self.fit_memory_mb(self.workers))
            config = Config(
                start_iteration,
                self.workers,
                memory_mb,
                f"largest size that fits {self.workers} workers at once (no memory given)",
            )
        self._current = config
        return config

    def wants_rescale(self, next_iteration: int) -> bool:
        """True when the current generation should stop: a re-scale is due at or before the
        iteration after ``next_iteration`` (the generation stops at the next boundary)."""
        return bool(self._rescales) and self._rescales[0].at <= next_iteration + 1

    def after_generation(self, stop_iteration: int, why: str) -> Config:
        """The configuration of the generation that starts at ``stop_iteration``."""
        assert self._current is not None, "initial() first"
        if self._rescales and self._rescales[0].at <= stop_iteration:
            step = self._rescales.pop(0)
            memory_mb = step.memory_mb or self._current.memory_mb
            if step.memory_mb is None and self.memory_mb is None and self.fit_memory_mb:
                memory_mb = self.fit_memory_mb(step.workers)
            self._current = Config(
                stop_iteration,
                step.workers,
                memory_mb,
                f"re-scaled as scheduled (from iteration {step.at})",
            )
        return self._current
