"""The ``sim`` backend: a calibrated model of a serverless platform, with no real compute.

It exists so that a 1,000-worker job can be planned on a laptop before anyone pays for it.
Everything around the worker is real: the scheduler (:class:`~smlt.actors.scheduler.
TaskScheduler`), the resource manager, the progress stream in a real (embedded) Redis, the
scheduler's billing, the optimizer. Only what happens *inside* a function is modelled, and it
happens on trio's clock, so under ``trio.testing.MockClock(autojump_threshold=0)`` a minute of
modelled training passes in the time it takes to do the bookkeeping.

The seam
--------
An :class:`Invocation` is the narrowest place where the scheduler meets a worker: it invokes,
then awaits ``result(timeout_s)`` and follows the progress stream. :class:`SimInvocation` is an
invocation whose ``result()`` sleeps (on trio's clock) through the modelled start-up and
iterations, appends to the job's progress stream the report a real worker appends after each
iteration (same fields: ``rank``, ``gen``, ``t``, ``iter_s``, ``compute_s``, ``sync_s``, ...), at
the modelled time, and returns the :class:`~smlt.protocol.payload.WorkerReport` a real worker
returns. The scheduler cannot tell the difference, so its generations, re-invocations,
throttling and bills are the real code's.

What is modelled (:class:`SimPlatform`, one iteration of scatter-reduce, DESIGN §3)::

    compute_s = s_per_sample_1_vcpu * ceil(B / n) / vCPU(m)        vCPU = m / 1769, at most 6
    link_s    = (2(n-1)/n + (1 + state)/n) * G / bandwidth          a worker's critical path
    store_s   = ((3n - 2) + state) * G / (store_bytes_per_s * k)   every byte through k stores
    ops_s     = n * (3(n-1) + 1 + state) * store_op_s / k          every key through k stores
    s/iteration = max over ranks(compute_s * noise) + max(link_s, store_s) + ops_s
                  + 3 * request_latency_s + fixed_s

with G = 4P gradient bytes and ``state`` the optimizer-state shards each owner publishes with
its parameter shard (2 for Adam, 0 for plain SGD). Uploads overlap downloads (the exchange is
full duplex), so a worker's link and the store are two bottlenecks of one pipeline: the slower
one counts. Ranks run in lockstep (the exchange is a barrier), so an iteration takes as long as
its slowest rank. Start-up is a cold start (``cold_start_s``, plus ``1 / scale_per_s`` per
earlier cold start of the same burst: Lambda scales 1,000 environments per 10 s) unless a
container of that memory size ended less than ``keep_warm_s`` ago (``warm_start_s``).
A worker whose memory is below ``runtime_mb + 16 bytes * P + activation_mb_per_sample * B / n``
dies of :class:`~smlt.errors.OutOfMemoryError` as it starts; ``failure_rate`` makes a seeded
share of invocations crash during start-up (:class:`~smlt.errors.WorkerError`), which the real
scheduler re-invokes. ``noise_sigma`` multiplies each rank's compute by a seeded log-normal
factor. Concurrency: :meth:`SimBackend.deploy` refuses more workers than ``max_concurrency``
(:class:`~smlt.errors.CapacityError`) and an invocation over it is throttled
(:class:`~smlt.errors.ThrottledError`), as Lambda answers 429.

What is not modelled: the data and the numbers (there is no loss; reports carry ``loss = 0``),
checkpoints (no shards are written, so nothing is committed), heartbeats (run the scheduler with
a long ``heartbeat_interval_s``: a sim worker never hangs), a re-scale requested in the middle of
a generation (generations end at the job's end or at the function's time limit), contention of
many functions on one host, and the first iteration's warm-up. Failures happen only during
start-up, so a replacement never re-runs an iteration its peers already finished.

Time. Invocations sleep until absolute modelled times, so what happens inside a generation is
exact and, with the same seed, reproducible. Between invocations (a re-invocation, a generation
boundary) the scheduler waits on Redis in threads, and under ``autojump_threshold=0`` trio's
clock jumps to the next timer whenever every task waits, a thread's wait included: those gaps
stretch with the machine's load. A trial's wall time is therefore the time during which some
invocation ran (:meth:`SimBackend.busy_s`), not the clock's end.

Cost of the bookkeeping: one progress entry per rank per iteration goes through the real Redis
and the scheduler's follower (which folds each on a thread): about a millisecond per entry on
this project's shared 2-core machines, so a 1,000-worker trial of 5 iterations takes half a
minute. :meth:`SimPlatform.trial` is the same model without the scheduler (the coarse grain,
identical figures on a trial without failures); ``smlt plan`` uses it for trials of more than
250 rank-iterations. A whole 10,000-iteration job at 1,000 workers (10^7 entries) is forecast by
the optimizer's model, never replayed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import trio

from smlt.backends.base import Backend, BackendLimits, Invocation
from smlt.errors import (
    CapacityError,
    ConfigError,
    FunctionTimeoutError,
    OutOfMemoryError,
    ThrottledError,
    WorkerError,
)
from smlt.optimizer.cost import LAMBDA_X86, Pricing, vcpus
from smlt.protocol.payload import WorkerPayload, WorkerReport
from smlt.sync.keys import JobKeys
from smlt.sync.store import ParameterStore

__all__ = [
    "DEFAULT_BANDWIDTH_MBPS",
    "IterationTime",
    "ModelledTrial",
    "SimBackend",
    "SimInvocation",
    "SimPlatform",
]

#: Per-function network, sustained (platform-facts.md: about 600 Mbit/s on Lambda).
DEFAULT_BANDWIDTH_MBPS = 600.0
#: One Redis moves about 0.4 GB/s (platform-facts.md: SET 0.37 GB/s, GET 0.47 GB/s).
DEFAULT_STORE_BYTES_PER_S = 0.4e9
#: Server time per key operation of one Redis (~100k small commands per second).
DEFAULT_STORE_OP_S = 10e-6
#: A round trip from a function to a managed store in the same region.
DEFAULT_REQUEST_LATENCY_S = 1e-3
#: Cold start with torch on Lambda is 5-15 s (platform-facts.md); a warm one only re-runs the
#: handler (the task and its data are already loaded).
DEFAULT_COLD_START_S = 8.0
DEFAULT_WARM_START_S = 0.5
#: How long an idle container stays warm (Lambda keeps them minutes, not documented exactly).
DEFAULT_KEEP_WARM_S = 600.0
#: Lambda scales 1,000 execution environments per 10 s per function (platform-facts.md).
DEFAULT_SCALE_PER_S = 100.0
#: Lambda: 900 s per invocation, 1,000 concurrent executions per region by default.
DEFAULT_MAX_DURATION_S = 900.0
DEFAULT_MAX_CONCURRENCY = 1000
#: A worker stops at the last iteration that ends this long before its function's time limit.
STOP_MARGIN_S = 10.0
#: The scheduler's first re-invocation back-off (smlt.actors.failures.RetryPolicy.backoff_s).
RETRY_BACKOFF_S = 0.2
#: Bytes of float32 gradient per parameter.
BYTES_PER_GRADIENT = 4
MB = 2**20


@dataclass(frozen=True)
class IterationTime:
    """One iteration's modelled time, by part (seconds); ``total_s`` is what the scheduler
    sees as ``iter_s``."""

    compute_s: float
    link_s: float
    store_s: float
    ops_s: float
    request_s: float
    fixed_s: float

    @property
    def sync_s(self) -> float:
        """The exchange: the slower of the link and the store, plus key operations and round
        trips."""
        return max(self.link_s, self.store_s) + self.ops_s + self.request_s

    @property
    def total_s(self) -> float:
        return self.compute_s + self.sync_s + self.fixed_s

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "sync_s": self.sync_s, "total_s": self.total_s}


@dataclass(frozen=True)
class SimPlatform:
    """The platform the sim pretends to be, and the task it pretends to train.

    ``s_per_sample_1_vcpu`` (forward and backward of one sample on one vCPU) and ``num_params``
    come from the task (``smlt plan`` times it once with ``torch.set_num_threads(1)``); the
    rest are the platform's figures, Lambda's by default (platform-facts.md). ``seed`` makes
    the noise and the failures reproducible: the same seed, the same trial."""

    s_per_sample_1_vcpu: float
    num_params: int
    optimizer_state_shards: int = 2
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS
    store_bytes_per_s: float = DEFAULT_STORE_BYTES_PER_S
    store_op_s: float = DEFAULT_STORE_OP_S
    store_instances: int = 1
    request_latency_s: float = DEFAULT_REQUEST_LATENCY_S
    fixed_s: float = 0.005
    cold_start_s: float = DEFAULT_COLD_START_S
    warm_start_s: float = DEFAULT_WARM_START_S
    keep_warm_s: float = DEFAULT_KEEP_WARM_S
    scale_per_s: float = DEFAULT_SCALE_PER_S
    runtime_mb: float = 400.0
    activation_mb_per_sample: float = 0.5
    min_memory_mb: int = 128
    max_memory_mb: int = 10240
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    noise_sigma: float = 0.0
    failure_rate: float = 0.0
    seed: int = 0
    pricing: Pricing = field(default=LAMBDA_X86)

    def __post_init__(self) -> None:
        positive = {
            "s_per_sample_1_vcpu": self.s_per_sample_1_vcpu,
            "bandwidth_mbps": self.bandwidth_mbps,
            "store_bytes_per_s": self.store_bytes_per_s,
            "max_duration_s": self.max_duration_s,
            "scale_per_s": self.scale_per_s,
        }
        bad = [f"{k}={v}" for k, v in positive.items() if not (math.isfinite(v) and v > 0)]
        if self.num_params < 1 or self.store_instances < 1 or self.max_concurrency < 1:
            bad.append("num_params, store_instances and max_concurrency must be >= 1")
        if min(self.store_op_s, self.request_latency_s, self.fixed_s, self.noise_sigma) < 0:
            bad.append("latencies and noise_sigma must be >= 0")
        if min(self.cold_start_s, self.warm_start_s, self.keep_warm_s) < 0:
            bad.append("start-up times must be >= 0")
        if not 0 <= self.failure_rate < 1:
            bad.append(f"failure_rate must be in [0, 1), got {self.failure_rate}")
        if not 0 < self.min_memory_mb <= self.max_memory_mb:
            bad.append(f"memory range {self.min_memory_mb}..{self.max_memory_mb} MB")
        if bad:
            raise ConfigError(f"sim platform: {'; '.join(bad)}")

    @property
    def gradient_bytes(self) -> int:
        return BYTES_PER_GRADIENT * self.num_params

    def iteration(
        self, workers: int, memory_mb: int, batch_size: int, compute_factor: float = 1.0
    ) -> IterationTime:
        """One iteration at ``workers`` x ``memory_mb`` (see the module docstring);
        ``compute_factor`` is the slowest rank's noise."""
        n, g, state = workers, float(self.gradient_bytes), self.optimizer_state_shards
        per_worker = math.ceil(batch_size / n)
        compute = self.s_per_sample_1_vcpu * per_worker / float(vcpus(memory_mb))
        link_bytes = (2 * (n - 1) / n + (1 + state) / n) * g
        store_bytes = ((3 * n - 2) + state) * g
        ops = n * (3 * (n - 1) + 1 + state)
        return IterationTime(
            compute_s=compute * compute_factor,
            link_s=link_bytes / (self.bandwidth_mbps * 1e6 / 8),
            store_s=store_bytes / (self.store_bytes_per_s * self.store_instances),
            ops_s=ops * self.store_op_s / self.store_instances,
            request_s=3 * self.request_latency_s,
            fixed_s=self.fixed_s,
        )

    def need_mb(self, workers: int, batch_size: int) -> float:
        """Memory one worker needs: runtime, fp32 weights + gradients + two Adam moments, and
        the activations of its slice of the batch."""
        return (
            self.runtime_mb
            + 16 * self.num_params / MB
            + self.activation_mb_per_sample * math.ceil(batch_size / workers)
        )

    def compute_factor(self, generation: int, iteration: int, workers: int) -> float:
        """The slowest rank's compute noise at ``iteration`` of ``generation`` (1 without
        noise): drawn from the seed, the generation and the iteration only, so the same seed
        gives the same trial whatever order the ranks are awaited in."""
        if self.noise_sigma == 0:
            return 1.0
        rng = np.random.default_rng([self.seed, generation, iteration])
        return float(np.exp(self.noise_sigma * rng.standard_normal(workers)).max())

    def crashes(self, generation: int, rank: int, attempt: int) -> bool:
        """Whether this delivery crashes during start-up (seeded)."""
        if self.failure_rate == 0:
            return False
        rng = np.random.default_rng([self.seed, 1 + generation, rank, attempt, 7])
        return bool(rng.random() < self.failure_rate)

    def startup_s(self, burst_index: int, warm: bool) -> float:
        """Start-up of the ``burst_index``-th invocation of a burst: a warm container's
        handler, or a cold start delayed by the platform's scaling rate."""
        if warm:
            return self.warm_start_s
        return self.cold_start_s + burst_index / self.scale_per_s

    def trial(
        self, workers: int, memory_mb: int, batch_size: int, iterations: int
    ) -> ModelledTrial:
        """The same model without the scheduler: what ``iterations`` iterations from a cold
        start cost in time and money, computed directly (milliseconds, at any scale).

        It follows :class:`SimInvocation` step by step (the same start-ups, noise, barrier and
        time limit), so the two agree to the millisecond on a trial without failures; a
        crashed start-up is re-invoked here after the scheduler's base back-off (the real
        scheduler jitters it). This is the coarse grain ``smlt plan`` uses where replaying
        every rank's report through the scheduler would take longer than the plan is worth."""
        if workers < 1 or iterations < 1:
            raise ConfigError(
                f"a trial needs workers >= 1 and iterations >= 1, got {workers}, {iterations}"
            )
        invocations: list[float] = []  # billed seconds of each invocation
        iter_s: list[float] = []
        stats = {
            "invocations": 0,
            "cold_starts": 0,
            "warm_starts": 0,
            "crashes": 0,
            "out_of_memory": 0,
        }
        wall_s, t, generation, warm = 0.0, 0, 0, False
        limit_s = self.max_duration_s - STOP_MARGIN_S
        if self.need_mb(workers, batch_size) > memory_mb:
            # Every rank dies as it starts; the scheduler gives up after the second time.
            for attempt in range(2):
                for rank in range(workers):
                    invocations.append(self.startup_s(rank if attempt == 0 else 0, attempt > 0))
                    stats["invocations"] += 1
                    stats["out_of_memory"] += 1
                    stats["warm_starts" if attempt else "cold_starts"] += 1
            wall_s = max(invocations[:workers]) + self.warm_start_s
            return ModelledTrial("oom", tuple(iter_s), wall_s, tuple(invocations), stats)
        while t < iterations:
            ready = 0.0
            for rank in range(workers):
                start = self.startup_s(rank, warm)
                stats["invocations"] += 1
                stats["warm_starts" if warm else "cold_starts"] += 1
                attempt = 0
                delay = 0.0
                while self.crashes(generation, rank, attempt):
                    stats["crashes"] += 1
                    invocations.append(start)
                    delay += start + RETRY_BACKOFF_S
                    attempt += 1
                    start = self.startup_s(0, True)  # the crashed container ended: warm
                    stats["invocations"] += 1
                    stats["warm_starts"] += 1
                ready = max(ready, delay + start)
            at, first = ready, t
            while t < iterations:
                step = self.iteration(
                    workers, memory_mb, batch_size, self.compute_factor(generation, t, workers)
                )
                if at + step.total_s > limit_s and t > first:
                    break
                at += step.total_s
                iter_s.append(step.total_s)
                t += 1
            invocations += [at] * workers
            wall_s += at
            generation, warm = generation + 1, True
        return ModelledTrial("ok", tuple(iter_s), wall_s, tuple(invocations), stats)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "pricing"}
        return {**data, "pricing": self.pricing.name}


@dataclass(frozen=True)
class ModelledTrial:
    """A trial computed by :meth:`SimPlatform.trial`: per-iteration times, modelled wall
    time, and the billed seconds of every invocation."""

    outcome: str
    iter_s: tuple[float, ...]
    wall_s: float
    billed_s: tuple[float, ...]
    statistics: dict[str, int]

    def cost_usd(self, pricing: Pricing, memory_mb: int) -> float:
        """Priced as the scheduler prices ended invocations (each rounded to the platform's
        billing step and charged one request)."""
        return sum(pricing.cost_usd(memory_mb, s) for s in self.billed_s)


@dataclass
class _Generation:
    """What the ranks of one generation share: when each was ready, and so when the first
    iteration starts (the exchange is a barrier: nobody gets past it before the last rank)."""

    workers: int
    ready_s: dict[int, float] = field(default_factory=dict)
    all_ready: trio.Event = field(default_factory=trio.Event)
    #: Reports not yet in the stream: the ranks of one iteration end at the same modelled
    #: instant, and one pipeline per iteration is n times cheaper than n round trips.
    pending: list[dict[str, Any]] = field(default_factory=list)

    factors: dict[int, float] = field(default_factory=dict)

    def factor(self, platform: SimPlatform, generation: int, iteration: int) -> float:
        """The slowest rank's compute noise at ``iteration``, drawn once for all ranks."""
        found = self.factors.get(iteration)
        if found is None:
            found = self.factors[iteration] = platform.compute_factor(
                generation, iteration, self.workers
            )
        return found

    def arrive(self, rank: int, at_s: float) -> None:
        self.ready_s[rank] = at_s
        if len(self.ready_s) >= self.workers:
            self.all_ready.set()

    @property
    def start_s(self) -> float:
        return max(self.ready_s.values())


class SimInvocation(Invocation):
    """One modelled worker: sleeps through its start-up and iterations on trio's clock."""

    def __init__(self, backend: SimBackend, payload: WorkerPayload, cold: bool, delay_s: float):
        self.payload = payload
        self.cold = cold
        self._backend = backend
        self._startup_s = delay_s
        self._invoked_s = trio.current_time()
        self._ended_s: float | None = None
        self._cancelled = trio.Event()

    @property
    def billed_s(self) -> float:
        end = self._ended_s if self._ended_s is not None else trio.current_time()
        return math.ceil(max(0.0, end - self._invoked_s) * 1000) / 1000  # billed per 1 ms

    async def cancel(self) -> None:
        self._cancelled.set()

    async def result(self, timeout_s: float) -> WorkerReport:
        try:
            with trio.move_on_after(timeout_s) as bound:
                return await self._run()
            raise FunctionTimeoutError(
                f"sim worker {self.payload.rank} did not end within {timeout_s:g} s"
            )
        except BaseException:
            # Its peers' reports of an iteration this rank will not finish are still due.
            self._backend._flush(self.payload)
            raise
        finally:
            if self._ended_s is None:
                self._ended_s = trio.current_time()
            self._backend._ended(self, self._ended_s, bound.cancelled_caught)

    async def _run(self) -> WorkerReport:
        p, platform = self.payload, self._backend.platform
        generation = self._backend._generation(p)
        await self._sleep(self._startup_s)
        if platform.need_mb(p.workers, p.batch_size) > p.memory_mb:
            self._backend._stats["out_of_memory"] += 1
            raise OutOfMemoryError(
                f"sim worker {p.rank}: needs {platform.need_mb(p.workers, p.batch_size):.0f} MB "
                f"of its {p.memory_mb} MB"
            )
        if platform.crashes(p.generation, p.rank, p.attempt):
            self._backend._stats["crashes"] += 1
            raise WorkerError(f"sim worker {p.rank} crashed during start-up (failure_rate)")
        generation.arrive(p.rank, trio.current_time())
        with trio.move_on_after(p.shard_timeout_s) as waiting:
            await generation.all_ready.wait()
        if waiting.cancelled_caught:
            raise WorkerError(
                f"sim worker {p.rank}: its peers were not ready within {p.shard_timeout_s:g} s"
            )
        began_s = generation.start_s
        limit_s = (
            self._invoked_s + p.function_timeout_s - STOP_MARGIN_S
            if p.function_timeout_s
            else math.inf
        )
        at_s, t = began_s, p.start_iteration
        reason = "finished"
        while t < p.total_iterations:
            factor = generation.factor(platform, p.generation, t)
            step = platform.iteration(p.workers, p.memory_mb, p.batch_size, factor)
            if at_s + step.total_s > limit_s and t > p.start_iteration:
                reason = "time limit"
                break
            at_s += step.total_s
            await self._sleep_until(at_s)
            self._backend._report(p, t, step)
            t += 1
        return WorkerReport(
            rank=p.rank,
            generation=p.generation,
            first_iteration=p.start_iteration,
            next_iteration=t,
            stop_reason=reason,
            wall_s=trio.current_time() - self._invoked_s,
            init_s=self._startup_s,
        )

    async def _sleep(self, seconds: float) -> None:
        await self._sleep_until(trio.current_time() + seconds)

    async def _sleep_until(self, deadline_s: float) -> None:
        with trio.move_on_at(deadline_s):
            await self._cancelled.wait()
        if self._cancelled.is_set():
            raise WorkerError(f"sim worker {self.payload.rank} was cancelled")


class SimBackend(Backend):
    """The ``sim`` backend: :class:`SimInvocation` workers on a :class:`SimPlatform`.

    Use it on trio's ``MockClock`` (the scheduler's ``run(clock=...)``): on the real clock it
    would sleep through the modelled time. :meth:`statistics` counts cold and warm starts,
    throttles and the peak concurrency; :attr:`ledger` holds every ended invocation's modelled
    ``(rank, generation, memory_mb, invoked_s, ended_s, cold)``."""

    name = "sim"

    def __init__(self, platform: SimPlatform | None = None, **figures: Any) -> None:
        if platform is None:
            if "s_per_sample_1_vcpu" not in figures or "num_params" not in figures:
                raise ConfigError(
                    "the sim backend needs the task's s_per_sample_1_vcpu and num_params "
                    "(smlt plan measures them); give a SimPlatform or both figures"
                )
            platform = SimPlatform(**figures)
        elif figures:
            raise ConfigError("give the sim backend a SimPlatform or figures, not both")
        self.platform = platform
        self.ledger: list[tuple[int, int, int, float, float, bool]] = []
        self._running: set[SimInvocation] = set()
        self._warm: dict[int, list[float]] = {}  # memory_mb -> when idle containers ended
        self._burst: tuple[float, int] = (-math.inf, 0)  # (time, cold starts at that time)
        self._generations: dict[tuple[str, str, int], _Generation] = {}
        self._stores: dict[tuple[str, ...], ParameterStore] = {}
        self._stats = {
            "invocations": 0,
            "cold_starts": 0,
            "warm_starts": 0,
            "throttled": 0,
            "out_of_memory": 0,
            "crashes": 0,
        }
        self._peak = 0

    @property
    def limits(self) -> BackendLimits:
        p = self.platform
        return BackendLimits(
            min_memory_mb=p.min_memory_mb,
            max_memory_mb=p.max_memory_mb,
            max_duration_s=p.max_duration_s,
            max_concurrency=p.max_concurrency,
            max_payload_bytes=6 * MB,
        )

    @property
    def pricing(self) -> Pricing:
        return self.platform.pricing

    def busy_s(self) -> float:
        """Modelled seconds during which at least one invocation ran (the union of their
        intervals): a trial's wall time without the gaps between invocations.

        The gaps are the scheduler's own bookkeeping (re-invocation decisions, generation
        boundaries), which waits on Redis in threads; under ``autojump_threshold=0`` trio's
        clock jumps to the next timer whenever every task waits, a thread's wait included, so
        those gaps stretch with the machine's load instead of lasting the milliseconds they
        take. Counting only the invocations' own modelled time keeps the figure a model's."""
        total, end = 0.0, -math.inf
        for start, stop in sorted((e[3], e[4]) for e in self.ledger):
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        return total

    def statistics(self) -> dict[str, int]:
        return {**self._stats, "running": len(self._running), "peak_concurrency": self._peak}

    def check_fits(self, workers: int, memory_mb: int) -> object:
        if workers > self.platform.max_concurrency:
            raise CapacityError(
                f"{workers} workers exceed the sim platform's concurrency limit "
                f"({self.platform.max_concurrency})"
            )
        return None

    async def deploy(self, job_id: str, workers: int, memory_mb: int) -> None:
        self.limits.check_memory(memory_mb)
        self.check_fits(workers, memory_mb)

    async def invoke(self, payload: WorkerPayload) -> Invocation:
        if len(self._running) >= self.platform.max_concurrency:
            self._stats["throttled"] += 1
            raise ThrottledError(
                f"sim platform: {self.platform.max_concurrency} functions already running"
            )
        now = trio.current_time()
        warm = self._take_warm(payload.memory_mb, now)
        if warm:
            delay_s = self.platform.warm_start_s
        else:
            # Cold starts of one burst are spread at the platform's scaling rate.
            at, count = self._burst
            count = count + 1 if at == now else 1
            self._burst = (now, count)
            delay_s = self.platform.cold_start_s + (count - 1) / self.platform.scale_per_s
        invocation = SimInvocation(self, payload, cold=not warm, delay_s=delay_s)
        self._running.add(invocation)
        self._peak = max(self._peak, len(self._running))
        self._stats["invocations"] += 1
        self._stats["warm_starts" if warm else "cold_starts"] += 1
        return invocation

    async def clean(self) -> None:
        for invocation in list(self._running):
            await invocation.cancel()

    async def aclose(self) -> None:
        await self.clean()
        for store in self._stores.values():
            for client in store.all_clients():
                client.close()
        self._stores.clear()

    # -- what the invocations share ------------------------------------------------------------

    def _take_warm(self, memory_mb: int, now: float) -> bool:
        idle = [t for t in self._warm.get(memory_mb, []) if now - t <= self.platform.keep_warm_s]
        taken = bool(idle)
        self._warm[memory_mb] = idle[1:] if taken else idle
        return taken

    def _ended(self, invocation: SimInvocation, ended_s: float, timed_out: bool) -> None:
        if invocation not in self._running:
            return
        self._running.discard(invocation)
        p = invocation.payload
        self.ledger.append(
            (p.rank, p.generation, p.memory_mb, invocation._invoked_s, ended_s, invocation.cold)
        )
        if not timed_out:
            self._warm.setdefault(p.memory_mb, []).append(ended_s)

    def _generation(self, p: WorkerPayload) -> _Generation:
        key = (p.job_id, p.session, p.generation)
        found = self._generations.get(key)
        if found is None or found.workers != p.workers:
            found = self._generations[key] = _Generation(p.workers)
        return found

    def _report(self, p: WorkerPayload, t: int, step: IterationTime) -> None:
        """Append rank ``p.rank``'s report of iteration ``t`` to the real progress stream: the
        fields :class:`~smlt.actors.progress.ProgressLog` folds (a real worker's, less the
        numbers of a training that does not happen)."""
        samples = len(range(p.rank, p.batch_size, p.workers))
        g = self.platform.gradient_bytes
        n, state = p.workers, self.platform.optimizer_state_shards
        # The exchange's phases, each its share of the bytes on the worker's critical path.
        shard, aggr = (n - 1) / n, (1 + state) / n
        phase = step.sync_s / (2 * shard + aggr)
        fields: dict[str, Any] = {
            "rank": p.rank,
            "gen": p.generation,
            "attempt": p.attempt,
            "t": t,
            "loss": 0.0,
            "lr": 0.0,
            "samples": samples,
            "batch": p.batch_size,
            "micro": samples,
            "data_s": 0.0,
            "compute_s": step.compute_s,
            "sync_s": step.sync_s,
            "ul_shard_s": phase * shard,
            "dl_shard_s": phase * shard,
            "ul_aggr_s": phase * aggr,
            "dl_grad_s": phase * shard,
            "update_s": 0.0,
            "codec_s": 0.0,
            "upload_codec_s": 0.0,
            "iter_s": step.total_s,
            "bytes_up": int(g + state * g / n),
            "bytes_down": int(2 * (n - 1) * g / n),
            "sim": json.dumps(step.to_dict()),
        }
        generation = self._generation(p)
        generation.pending.append(fields)
        if len(generation.pending) >= p.workers:
            self._flush(p)

    def _flush(self, p: WorkerPayload) -> None:
        """Write the generation's pending reports to the progress stream, in one pipeline."""
        generation = self._generation(p)
        if not generation.pending:
            return
        entries, generation.pending = generation.pending, []
        store = self._store(p)
        pipe = store.client(0).pipeline(transaction=False)
        stream = JobKeys(p.job_id, p.session).progress()
        for fields in entries:
            pipe.xadd(stream, cast(dict[Any, Any], fields))
        pipe.execute()

    def _store(self, p: WorkerPayload) -> ParameterStore:
        urls = tuple(p.redis_urls)
        store = self._stores.get(urls)
        if store is None:
            store = self._stores[urls] = ParameterStore.from_urls(list(urls))
        return store
