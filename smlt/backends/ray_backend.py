"""The Ray backend: each worker is a Ray task shaped like a Lambda function.

A worker of ``memory_mb`` asks Ray for ``memory_mb / 1769`` CPUs (Lambda's rule: 1,769 MB buys
one vCPU, fractions allowed) and ``memory_mb`` MiB of Ray's ``memory`` resource, so a laptop run
has the same CPU-per-dollar shape as the Lambda run it stands in for, and is priced like it.

``deploy`` reserves all n workers at once in a placement group (one bundle per rank). Training
is synchronous: n-1 workers that start while the n-th waits for a CPU only burn their shard
timeouts, so either all fit or ``deploy`` says what would (``CapacityError``). ``invoke``
schedules rank r into bundle r; a re-invoked rank reuses its own bundle.

Vendor errors stop here: :func:`translate_ray_error` maps Ray's exceptions into
:mod:`smlt.errors`, and an smlt error raised by the entry point comes back as itself.

Running on a cluster: the workers must be able to import ``smlt`` and the entry point. Install
smlt in the cluster's image, or give ``runtime_env``, e.g. ``{"py_modules": [smlt_dir]}``,
``{"pip": ["smlt==0.1.0"]}`` or ``{"working_dir": "."}``; it is passed on every worker task.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
import trio
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from smlt.backends.base import LAMBDA_X86_PRICING, MB_PER_VCPU, Backend, BackendLimits, Pricing
from smlt.backends.ray_capacity import ClusterCapacity, cpu_share, cpu_units_for
from smlt.backends.ray_invocation import RayInvocation, translate_ray_error
from smlt.errors import BackendError, CapacityError, ConfigError
from smlt.protocol.payload import WorkerPayload

__all__ = [
    "DEFAULT_PLACEMENT_TIMEOUT_S",
    "PLACEMENT_STRATEGIES",
    "RayBackend",
    "RayInvocation",
    "ensure_ray",
    "translate_ray_error",
]

#: How long ``deploy`` waits for the cluster to place all workers.
DEFAULT_PLACEMENT_TIMEOUT_S = float(os.environ.get("SMLT_RAY_PLACEMENT_TIMEOUT_S", "30"))
#: Lambda's synchronous payload limit; a Ray payload is bounded the same way so a job that runs
#: here also runs on Lambda.
MAX_PAYLOAD_BYTES = 6 * 2**20
MIN_MEMORY_MB = 128
#: PACK (Ray Train's default) fills nodes before using new ones. Workers exchange everything
#: through Redis, never with each other, so co-location costs nothing in correctness, and packing
#: leaves whole nodes free for other jobs. Both strategies are soft: a group that does not fit
#: one node spills over. SPREAD gives each worker its own NIC on a multi-node cluster.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD")
# Slices of the blocking placement-group wait: trio can cancel deploy between two slices.
_PLACEMENT_SLICE_S = 0.25
_MIB = 2**20
#: Idle worker processes a local Ray keeps warm (each holds an imported torch, ~300 MB).
WARM_WORKERS = int(os.environ.get("SMLT_RAY_WARM_WORKERS", "8"))


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    init_timeout_s: float = 60,
) -> bool:
    """Connect to Ray unless already connected; True if this call started a local Ray.

    With ``address`` it joins an existing cluster (first checking, within ``init_timeout_s``,
    that ``host:port`` answers at all, because ``ray.init`` retries an unreachable address for
    a long time). Without, it starts a local Ray that is fast and quiet: no dashboard, no log
    forwarding, no changes to the caller's logging. (Ray's internal gRPC ports still listen on
    all interfaces; Ray protects them with its token authentication.)
    """
    if ray.is_initialized():
        return False
    try:
        with _caller_keeps_sigterm():
            return _init_ray(address, num_cpus, init_timeout_s)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise BackendError(f"cannot start or join {where}: {exc}") from exc


@contextmanager
def _caller_keeps_sigterm() -> Iterator[None]:
    """``ray.init`` installs SIGTERM handlers of its own (one prints a C++ stack trace and
    aborts the process); the caller's handler (the CLI's, which stops the run cleanly) is put
    back. Only the main thread can set handlers."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init_ray(address: str | None, num_cpus: int | None, init_timeout_s: float) -> bool:
    """``ray.init`` as :func:`ensure_ray` describes it; True if it started a local Ray."""
    if address is not None:
        _probe(address, init_timeout_s)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Ray keeps about one idle worker process per CPU and kills the rest after a
        # second; a generation of n > CPUs fractional-CPU workers would then pay torch's
        # import again at every re-invocation, re-scale and time-limit generation.
        _system_config={
            "num_workers_soft_limit": WARM_WORKERS,
            "idle_worker_killing_time_threshold_ms": 600_000,
        },
    )
    return True


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast on a ``host:port`` nobody listens on ("auto" and ray:// are left to Ray)."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as exc:
        raise BackendError(
            f"no Ray cluster answers at {address} within {timeout_s:g} s: {exc}"
        ) from exc


class _Context:
    """A Lambda-like context for entry points that ask how long they have left."""

    def __init__(self, limit_s: float) -> None:
        self._deadline = time.monotonic() + limit_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def run_entry_point(entry_point: str, event: dict[str, Any], cpu_share: float) -> dict[str, Any]:
    """The body of every worker task (runs in a Ray worker process).

    Torch's thread pool is sized to the whole CPUs the share buys (at least one), as Lambda's
    vCPUs would allow: left alone it starts one thread per core of the node, and the workers
    sharing a node would fight over them.
    """
    module_name, _, function_name = entry_point.partition(":")
    fn: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module_name), function_name)
    try:
        import torch
    except ImportError:  # an entry point without torch
        pass
    else:
        torch.set_num_threads(max(1, math.floor(cpu_share)))
    limit_s = event.get("function_timeout_s")
    context = _Context(float(limit_s)) if limit_s is not None else None
    return fn(event, context)


class RayBackend(Backend):
    """Workers as Ray tasks on this machine or on a Ray cluster.

    Connecting starts (or joins) Ray: it happens in :meth:`connect`, in ``deploy``, or on first
    use of ``limits`` / :meth:`fit_memory_mb` (which block for it: about 4 s for a local start).
    ``aclose`` shuts Ray down only if this backend started it.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        entry_point: str = "smlt.worker.handler:handle",
        pricing: Pricing = LAMBDA_X86_PRICING,
        num_cpus: int | None = None,
        max_memory_mb: int = 10240,
        init_timeout_s: float = 60,
        runtime_env: dict[str, Any] | None = None,
        placement_strategy: str = "PACK",
        placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    ) -> None:
        module_name, colon, function_name = entry_point.partition(":")
        if not (module_name and colon and function_name):
            raise ConfigError(f"entry point must be 'module:function', got {entry_point!r}")
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"placement strategy must be one of {PLACEMENT_STRATEGIES}, "
                f"got {placement_strategy!r}"
            )
        if max_memory_mb < MIN_MEMORY_MB:
            raise ConfigError(f"max_memory_mb must be >= {MIN_MEMORY_MB}, got {max_memory_mb}")
        self.address = address
        self.entry_point = entry_point
        self.num_cpus = num_cpus
        self.max_memory_mb = max_memory_mb
        self.init_timeout_s = init_timeout_s
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.placement_strategy = placement_strategy
        self.placement_timeout_s = placement_timeout_s
        self._pricing = pricing
        self._started_ray = False
        self._remote: Any = None
        self._group: PlacementGroup | None = None
        self._workers = 0
        self._memory_mb = 0
        self._lock = threading.Lock()  # counters are bumped from Ray's callback thread
        self._counts = {"invocations": 0, "succeeded": 0, "failed": 0}
        self._running_ranks: dict[int, int] = {}  # rank -> invocations still running

    # -- connection ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Start or join Ray (blocking; idempotent)."""
        if self._remote is not None:
            return
        self._started_ray = ensure_ray(
            self.address, num_cpus=self.num_cpus, init_timeout_s=self.init_timeout_s
        )
        # ray.remote is applied here, at the launch site, so run_entry_point stays a plain
        # function. Ray's own retries are off: the scheduler owns retries.
        self._remote = ray.remote(max_retries=0)(run_entry_point)

    # -- limits and sizing ---------------------------------------------------------------------

    @property
    def pricing(self) -> Pricing:
        return self._pricing

    @property
    def limits(self) -> BackendLimits:
        """Memory 128..max_memory_mb; no time limit (the worker enforces the payload's
        ``function_timeout_s``); concurrency = how many 128 MB workers the cluster holds now."""
        return BackendLimits(
            min_memory_mb=MIN_MEMORY_MB,
            max_memory_mb=self.max_memory_mb,
            max_duration_s=math.inf,
            max_concurrency=self.capacity().max_workers(MIN_MEMORY_MB),
            max_payload_bytes=MAX_PAYLOAD_BYTES,
        )

    def memory_range_mb(self) -> tuple[int, int]:
        return MIN_MEMORY_MB, self.max_memory_mb

    def check_fits(self, workers: int, memory_mb: int) -> ClusterCapacity:
        """As :meth:`Backend.check_fits`; returns the capacity it checked against."""
        capacity = self.capacity()
        if not capacity.fits(workers, memory_mb):
            raise CapacityError(
                capacity.explain(workers, memory_mb, MIN_MEMORY_MB, self.max_memory_mb)
            )
        return capacity

    def capacity(self) -> ClusterCapacity:
        """The cluster's alive nodes (see :mod:`smlt.backends.ray_capacity` for why sizes,
        not free room)."""
        self.connect()
        return ClusterCapacity.of(
            [
                (node["Resources"].get("CPU", 0.0), node["Resources"].get("memory", 0.0))
                for node in ray.nodes()
                if node.get("Alive")
            ]
        )

    def fit_memory_mb(self, workers: int, *, at_most_mb: int = MB_PER_VCPU) -> int:
        """The largest memory at which ``workers`` workers fit at once, at most ``at_most_mb``.

        The default cap is one vCPU (1,769 MB): a user who gives no memory gets Lambda's
        one-vCPU size when the cluster has room for it, and less (the most that fits) on a
        small machine: 4 workers on 2 CPUs get 884 MB (0.4997 CPU) each. Raises
        ``CapacityError`` if not even 128 MB fits.
        """
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        capacity = self.capacity()
        hi_mb = min(at_most_mb, self.max_memory_mb)
        memory_mb = capacity.largest_memory_mb(workers, MIN_MEMORY_MB, hi_mb)
        if memory_mb is None:
            raise CapacityError(
                capacity.explain(workers, MIN_MEMORY_MB, MIN_MEMORY_MB, self.max_memory_mb)
            )
        return memory_mb

    def default_memory_mb(self, workers: int) -> int:
        return self.fit_memory_mb(workers)

    # -- deploy / invoke / clean -----------------------------------------------------------------

    async def deploy(self, job_id: str, workers: int, memory_mb: int) -> None:
        """Reserve ``workers`` bundles of (CPU share, memory) for ``job_id``, all or nothing."""
        limits = await trio.to_thread.run_sync(lambda: self.limits)  # connects if need be
        limits.check_memory(memory_mb)
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        await self.clean()  # re-scaling: the old group's room counts for the new one
        capacity = await trio.to_thread.run_sync(self.check_fits, workers, memory_mb)
        bundle = {"CPU": cpu_share(memory_mb), "memory": float(memory_mb * _MIB)}
        group = await trio.to_thread.run_sync(
            functools.partial(
                placement_group,
                [dict(bundle) for _ in range(workers)],
                strategy=self.placement_strategy,
                name=f"smlt-{job_id}-{workers}x{memory_mb}",
            )
        )
        try:
            with trio.fail_after(self.placement_timeout_s):
                while not await trio.to_thread.run_sync(group.wait, _PLACEMENT_SLICE_S):
                    pass
        except BaseException as exc:
            with trio.CancelScope(shield=True):  # even a cancelled deploy must not leak it
                await trio.to_thread.run_sync(remove_placement_group, group)
            if isinstance(exc, trio.TooSlowError):
                raise CapacityError(
                    f"the cluster did not place {workers} workers x {memory_mb} MB within "
                    f"{self.placement_timeout_s:g} s (other jobs hold the room?); "
                    + capacity.explain(workers, memory_mb, MIN_MEMORY_MB, self.max_memory_mb)
                ) from None
            raise
        self._group, self._workers, self._memory_mb = group, workers, memory_mb

    async def invoke(self, payload: WorkerPayload) -> RayInvocation:
        """Schedule rank r into bundle r of the group; returns at once."""
        if self._group is None:
            raise BackendError("invoke before deploy: no workers are reserved")
        # A rank re-invoked with more memory after a repeated out-of-memory (the scheduler's
        # FailurePolicy) runs in its own bundle all the same: a Ray task has no memory limit of
        # its own to raise (its node's is what counts), so the larger size changes the bill,
        # not the process (the worker plans its micro-batches by the generation's memory).
        if payload.rank >= self._workers or payload.memory_mb < self._memory_mb:
            raise BackendError(
                f"payload for rank {payload.rank} x {payload.memory_mb} MB does not match the "
                f"deployed {self._workers} workers x {self._memory_mb} MB"
            )
        event = payload.to_dict()
        size_bytes = len(json.dumps(event))
        if size_bytes > MAX_PAYLOAD_BYTES:
            raise ConfigError(f"payload of {size_bytes} bytes exceeds {MAX_PAYLOAD_BYTES} bytes")
        share = cpu_share(self._memory_mb)
        options: dict[str, Any] = {
            "num_cpus": share,
            "memory": self._memory_mb * _MIB,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=payload.rank
            ),
            "name": f"smlt-worker-{payload.job_id}-g{payload.generation}-r{payload.rank}",
        }
        with self._lock:
            copies = self._running_ranks.get(payload.rank, 0)
            self._running_ranks[payload.rank] = copies + 1
        if copies:
            # A second copy of a running rank (at-least-once delivery, see SMLT_FAULTS
            # "duplicate"): rank r's bundle holds exactly one task, so inside the group this
            # copy would wait for the first to end instead of running beside it, as a
            # platform's duplicate does. It runs outside the reservation, sharing the CPU.
            options.update(num_cpus=0, scheduling_strategy="DEFAULT")
            del options["memory"]
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        started = time.monotonic()
        # Submission is asynchronous in Ray, but the first one exports the function (~80 ms).
        try:
            ref = await trio.to_thread.run_sync(
                lambda: self._remote.options(**options).remote(self.entry_point, event, share)
            )
        except BaseException:
            with self._lock:
                self._running_ranks[payload.rank] -= 1
            raise
        self._count("invocations")
        return RayInvocation(
            payload, ref, started, on_end=functools.partial(self._on_end, payload.rank)
        )

    async def clean(self) -> None:
        """Release the placement group (tasks still in it are killed by Ray). Idempotent."""
        group, self._group = self._group, None
        self._workers = self._memory_mb = 0
        with self._lock:
            self._running_ranks.clear()
        if group is not None:
            await trio.to_thread.run_sync(remove_placement_group, group)

    async def aclose(self) -> None:
        await self.clean()
        if self._started_ray:
            self._started_ray = False
            self._remote = None
            await trio.to_thread.run_sync(ray.shutdown)

    # -- counters --------------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _on_end(self, rank: int, ok: bool) -> None:
        self._count("succeeded" if ok else "failed")
        with self._lock:
            self._running_ranks[rank] = max(0, self._running_ranks.get(rank, 0) - 1)

    def statistics(self) -> dict[str, Any]:
        """Counters and the current reservation, for status lines and tests."""
        with self._lock:
            counts = dict(self._counts)
        ended = counts["succeeded"] + counts["failed"]
        return {
            **counts,
            "running": counts["invocations"] - ended,
            "placement_group": None if self._group is None else self._group.id.hex(),
            "workers": self._workers,
            "memory_mb": self._memory_mb,
            "cpus_per_worker": cpu_share(self._memory_mb) if self._memory_mb else 0.0,
            "cpu_units_per_worker": cpu_units_for(self._memory_mb) if self._memory_mb else 0,
            "started_ray": self._started_ray,
        }
