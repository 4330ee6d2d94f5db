"""Where the actors become Ray actors (``ray.remote`` is applied here, at the launch site).

The scheduler and resource manager are plain classes, testable without Ray; in a run they live
in a Ray actor so that the driver can die or disconnect without killing the job's control loop
on a cluster. The scheduler's actor is *threaded* (``max_concurrency``): trio needs a thread of
its own (Ray's async actors own an asyncio loop), and ``status()`` must answer while ``run()``
works. It asks for no CPU, so it never takes a worker's place.
"""

from __future__ import annotations

from typing import Any

import ray

from smlt.actors.resource_manager import ResourceManager, fits_of
from smlt.actors.scheduler import JobSpec, TaskScheduler
from smlt.backends import get_backend

__all__ = ["SchedulerHost", "launch_scheduler"]


class SchedulerHost:
    """Builds the backend and the resource manager inside the actor's process (backends hold
    clients and threads that do not travel), then delegates to :class:`TaskScheduler`."""

    def __init__(
        self,
        backend: str,
        backend_options: dict[str, Any],
        spec: JobSpec,
        manager_settings: dict[str, Any],
    ) -> None:
        target = get_backend(backend, **backend_options)
        manager = ResourceManager(
            target.limits,
            fit_memory_mb=target.default_memory_mb,
            fits=fits_of(target),
            **manager_settings,
        )
        self.scheduler = TaskScheduler(target, spec, manager)

    def run(self) -> dict[str, Any]:
        return self.scheduler.run()

    def status(self, history_from: int | None = None) -> dict[str, Any]:
        return self.scheduler.status(history_from)


def launch_scheduler(
    backend: str, backend_options: dict[str, Any], spec: JobSpec, manager: ResourceManager
) -> Any:
    """Start the scheduler actor; returns its handle."""
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 0}
    actor_cls = ray.remote(**options)(SchedulerHost)
    return actor_cls.remote(backend, backend_options, spec, manager.settings())
