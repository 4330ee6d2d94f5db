"""``smlt plan``: choose workers x memory for a job before paying for it.

Three steps, each in its own function:

1. :func:`profile_task` loads and checks the task as ``smlt train`` does, then times its forward
   and backward pass on one thread (``torch.set_num_threads(1)``: one vCPU), which calibrates
   both the sim platform and the optimizer's prior (:meth:`~smlt.optimizer.perf.PerfPrior.
   calibrated`);
2. :class:`SimTrials` measures a trial the way ``smlt train`` would: the **real** scheduler and
   resource manager run the probe's few iterations on the ``sim`` backend
   (:mod:`smlt.backends.sim`) under trio's ``MockClock``, with the progress stream in a real
   embedded Redis; the trial's time per iteration is read back from the scheduler's history,
   its cost from the scheduler's bill, its wall time from the modelled clock;
3. :func:`plan_task` runs the optimizer's :func:`~smlt.optimizer.bayes.search` with that
   measure (or, for fixed ``--workers`` and ``--memory-mb``, one trial there and no search)
   and returns a :class:`PlanResult`: the decision (whose ``to_dict()`` starts with the keys of
   ``smlt plan --json``), every trial, the profile and how long planning took.

An infeasible goal is not an exception here: the result says so (``decision.feasible`` is
False, ``decision.error()`` names the fastest time and the cheapest cost in reach) and the CLI
exits with :data:`EXIT_INFEASIBLE`.

``--backend ray`` measures trials on the Ray backend itself instead (:class:`RayTrials`): each
is a short real ``smlt train`` of the task, with its own Ray session, embedded Redis,
scheduler and cold workers, so that what a run pays once (the driver's start and end: the
problem's ``driver_s``) and per generation (the workers' start: ``startup_s``) are measured
rather than modelled. The prediction is then the wall time and the cost ``smlt train`` reports
in ``result.json`` for the whole run at that configuration (benchmarks/plan_accuracy.py
checks it against real runs). Trials there are throwaway runs, not the job's first
iterations: the plan does not count them into the job.
"""

from __future__ import annotations

import random
import secrets
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio.testing

from smlt.actors.resource_manager import ResourceManager
from smlt.actors.scheduler import JobSpec, TaskScheduler
from smlt.backends.sim import STOP_MARGIN_S, SimBackend, SimPlatform
from smlt.client.goals import calibrate
from smlt.client.prices import Prices
from smlt.errors import ConfigError, OutOfMemoryError, TrainingError
from smlt.optimizer.bayes import plan, search
from smlt.optimizer.goals import Fastest, Goal, Override
from smlt.optimizer.perf import PerfPrior, Trial, Workload
from smlt.optimizer.problem import Decision, Probe, Problem, SearchSettings
from smlt.optimizer.space import SearchSpace
from smlt.storage.artifacts import DEFAULT_SHARD_BYTES, check_shard_bytes
from smlt.storage.redis_server import RedisServer
from smlt.task import (
    HEAD_SAMPLES,
    StreamData,
    Task,
    TaskData,
    check_loss,
    check_model,
    check_optimizer,
    check_task,
    load_task,
    transformed_head,
)
from smlt.worker.sampler import GlobalBatchSampler

__all__ = [
    "DEFAULT_MAX_SCHEDULED_REPORTS",
    "EXIT_INFEASIBLE",
    "PLAN_BACKENDS",
    "PlanResult",
    "RayTrials",
    "SimTrials",
    "TaskProfile",
    "count_samples",
    "default_plan_dir",
    "plan_task",
    "plot_frontier",
    "profile_task",
]

#: ``smlt plan`` exits with this when no configuration meets the goal (2 is any other error).
EXIT_INFEASIBLE = 3
PLAN_BACKENDS = ("sim", "ray")
#: Samples timed per forward+backward pass when profiling, and how many passes are timed.
PROFILE_ROWS = 64
PROFILE_REPEATS = 5
#: A trial of more rank-iterations than this is computed by the sim's model directly instead of
#: being replayed through the scheduler (every rank's report of every iteration through Redis
#: and the scheduler's follower: about a millisecond each on this project's shared machines).
DEFAULT_MAX_SCHEDULED_REPORTS = 250
#: Heartbeats are not modelled: the scheduler's watcher is told to look once a day.
_SIM_HEARTBEAT_S = 86400.0


@dataclass(frozen=True)
class TaskProfile:
    """What planning needs to know about a task, measured on this machine."""

    task: str
    num_params: int
    num_samples: int
    s_per_sample_1_vcpu: float
    optimizer_state_shards: int
    profile_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "num_params": self.num_params,
            "num_samples": self.num_samples,
            "s_per_sample_1_vcpu": self.s_per_sample_1_vcpu,
            "optimizer_state_shards": self.optimizer_state_shards,
            "profile_s": self.profile_s,
        }


def profile_task(task: Task | str, *, rows: int = PROFILE_ROWS) -> TaskProfile:
    """Load and check ``task`` as ``smlt train`` does and time its forward and backward pass
    on one thread (:func:`~smlt.client.goals.calibrate`, as a run with a goal does): the
    median of repeated passes over ``rows`` samples, per sample, the first pass not counted
    (allocator and kernel warm-up).

    A streamed training set is checked and timed on its head, and its size is counted by
    :func:`count_samples`: planning packages nothing (a sim trial reads no data, and each
    ``--backend ray`` trial packages for itself), so there is no packaging to count along."""
    started = time.perf_counter()
    spec = task if isinstance(task, str) else f"{type(task).__module__}:{type(task).__name__}"
    user = load_task(task) if isinstance(task, str) else task
    data = check_task(user)
    model = check_model(user)
    check_optimizer(user, model)
    seen = transformed_head(user, data)  # what loss() gets on the workers
    check_loss(user, model, seen.rows(0, min(2, seen.num_samples)))
    num_samples = count_samples(data)
    calibration = calibrate(user, num_samples, data=data, samples=rows, repeats=PROFILE_REPEATS)
    return TaskProfile(
        task=spec,
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_samples=num_samples,
        s_per_sample_1_vcpu=calibration.s_per_sample,
        optimizer_state_shards=calibration.optimizer_state_shards,
        profile_s=time.perf_counter() - started,
    )


def count_samples(data: TaskData | StreamData) -> int:
    """The number of samples of a checked training set, for the plan's epochs.

    In memory, its length. A stream is counted without keeping it: an ``IterableDataset``
    that declares its ``len()`` is taken at its word (as ``DataLoader`` takes it, and without
    reading a data set that may be terabytes); otherwise every chunk is read once, checked as
    ``smlt train`` would check it, counted and dropped, so a plan also finds a bad chunk. The
    run itself always counts exactly, while it packages (the manifest's ``num_samples``).
    Consumes ``data.chunks``; the head stays usable.
    """
    if isinstance(data, TaskData):
        return data.num_samples
    if data.head.num_samples < HEAD_SAMPLES:  # the stream ended within its head
        return data.head.num_samples
    if data.declared_samples is not None and data.declared_samples >= data.head.num_samples:
        return data.declared_samples
    return sum(chunk.num_samples for chunk in data.chunks)


class SimTrials:
    """Measures trials on the sim platform with the real scheduler (see the module
    docstring); a context manager that owns an embedded Redis and a scratch object store.

    Each trial is a new job (its own id and session) with its own seed, so trials of one
    configuration differ by the platform's noise as two real trials would.

    Grain: a trial of more than ``max_scheduled_reports`` rank-iterations (workers x
    iterations) is computed by :meth:`~smlt.backends.sim.SimPlatform.trial` instead, the same
    model without the scheduler. Replaying costs about a millisecond per report on this
    project's shared 2-core machines (the scheduler folds each report on a thread), so a
    1,000-worker trial would take half a minute; the two grains agree to the millisecond on
    a trial without failures (tests/test_sim.py). ``measured`` says which grain each trial
    used."""

    def __init__(
        self,
        platform: SimPlatform,
        *,
        iterations_per_epoch: int = 1_000_000,
        max_scheduled_reports: int = DEFAULT_MAX_SCHEDULED_REPORTS,
    ) -> None:
        self.platform = platform
        self.iterations_per_epoch = iterations_per_epoch
        self.max_scheduled_reports = max_scheduled_reports
        self.measured: list[dict[str, Any]] = []
        self._stack = ExitStack()
        self._redis_url = ""
        self._objects = ""

    def __enter__(self) -> SimTrials:
        server = self._stack.enter_context(RedisServer())
        self._redis_url = server.url
        self._objects = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="smlt-plan-"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self, probe: Probe) -> Trial:
        if not self._redis_url:
            raise ConfigError("SimTrials measures inside its 'with' block only")
        k = len(self.measured)
        platform = replace(self.platform, seed=self.platform.seed + 1000 * k)
        if probe.workers * probe.iterations > self.max_scheduled_reports:
            return self._modelled(probe, platform)
        backend = SimBackend(platform)
        session = secrets.token_hex(4)
        spec = JobSpec(
            job_id=f"plan-{k}-{session}",
            redis_urls=(self._redis_url,),
            object_store_url=self._objects,
            batch_size=probe.workload.batch_size,
            total_iterations=probe.iterations,
            iterations_per_epoch=self.iterations_per_epoch,
            num_params=probe.workload.num_params,
            seed=platform.seed,
            session=session,
            function_timeout_s=platform.max_duration_s,
            # Peers wait for a re-invoked rank as long as it takes: a sim worker never hangs,
            # and the scheduler's gaps stretch modelled time under load (SimBackend.busy_s).
            shard_timeout_s=_SIM_HEARTBEAT_S,
            heartbeat_interval_s=_SIM_HEARTBEAT_S,
            heartbeat_timeout_s=2 * _SIM_HEARTBEAT_S,
        )
        manager = ResourceManager(backend.limits, workers=probe.workers, memory_mb=probe.memory_mb)
        scheduler = TaskScheduler(backend, spec, manager)
        real_started = time.perf_counter()
        history: list[dict[str, Any]] = []
        cost_usd = 0.0
        outcome = "ok"
        # The scheduler's re-invocation back-off draws its jitter from ``random``: seeded for
        # the trial (and restored after), so that the same seed gives the same trial.
        saved = random.getstate()
        random.seed(platform.seed)
        try:
            summary = scheduler.run(clock=trio.testing.MockClock(autojump_threshold=0))
            history, cost_usd = summary["history"], summary["cost_usd"]
        except TrainingError:
            if not backend.statistics()["out_of_memory"]:
                raise
            cost_usd = scheduler.summary()["cost_usd"]
        finally:
            random.setstate(saved)
            for client in scheduler.store.all_clients():
                client.close()
        # A worker that ran out of memory decides the trial, even if the manager then moved
        # the run to a larger size: the probe's configuration does not fit.
        if backend.statistics()["out_of_memory"]:
            outcome = "oom"
        wall_s = backend.busy_s()
        s_per_iteration = statistics.median(h["iter_s"] for h in history) if history else None
        trial = Trial(
            workers=probe.workers,
            memory_mb=probe.memory_mb,
            workload=probe.workload,
            outcome="ok" if outcome == "ok" else "oom",
            iterations=len(history) if outcome == "ok" else 0,
            wall_s=wall_s,
            cost_usd=cost_usd,
            s_per_iteration=s_per_iteration if outcome == "ok" else None,
        )
        self.measured.append(
            {
                **trial.to_dict(),
                "grain": "scheduler",
                "sim": backend.statistics(),
                "real_s": time.perf_counter() - real_started,
            }
        )
        return trial

    def _modelled(self, probe: Probe, platform: SimPlatform) -> Trial:
        """The coarse grain: the trial from :meth:`SimPlatform.trial`, no scheduler."""
        real_started = time.perf_counter()
        modelled = platform.trial(
            probe.workers, probe.memory_mb, probe.workload.batch_size, probe.iterations
        )
        ok = modelled.outcome == "ok"
        trial = Trial(
            workers=probe.workers,
            memory_mb=probe.memory_mb,
            workload=probe.workload,
            outcome="ok" if ok else "oom",
            iterations=len(modelled.iter_s),
            wall_s=modelled.wall_s,
            cost_usd=modelled.cost_usd(platform.pricing, probe.memory_mb),
            s_per_iteration=statistics.median(modelled.iter_s) if ok else None,
        )
        self.measured.append(
            {
                **trial.to_dict(),
                "grain": "model",
                "sim": modelled.statistics,
                "real_s": time.perf_counter() - real_started,
            }
        )
        return trial


class RayTrials:
    """Measures a trial by running it: a short real ``smlt train`` of the task on the Ray
    backend (a local Ray, or the cluster at ``ray_address``), stopped after the probe's
    iterations (``max_iterations``). A context manager that owns a scratch folder for the
    trials' outputs and object store.

    Each trial pays everything a run pays: the driver starts Ray, the embedded Redis and the
    scheduler actor, the workers start cold, and at the end the driver evaluates, saves the
    model and stops Ray. From its ``result.json``:

    - ``s_per_iteration``: the generation's iterations end to end, from the first's end to the
      last's (``wall_s`` stamps of the history), over the iterations in between: gaps between
      iterations (waits, checkpoints) count, the first iteration's warm-up does not;
    - ``startup_s`` (per generation, billed): the generation's wall time less its iterations;
    - ``driver_s`` (once, billed to no worker): the run's ``wall_s`` less its generations'.

    :meth:`overheads` gives the medians of the last two over the trials so far, which is what
    the plan's :class:`~smlt.optimizer.problem.Problem` is given."""

    def __init__(
        self,
        task: str,
        *,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        ray_address: str | None = None,
        redis_url: str | None = None,
        object_store: str | None = None,
        prices: Prices | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.task = task
        self.shard_bytes = shard_bytes
        self.redis_url = redis_url
        self.object_store = object_store
        self.prices = prices or Prices()
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.ray_address = ray_address
        self.measured: list[dict[str, Any]] = []
        self._stack = ExitStack()
        self._folder: Path | None = None

    def __enter__(self) -> RayTrials:
        self._folder = Path(
            self._stack.enter_context(tempfile.TemporaryDirectory(prefix="smlt-plan-ray-"))
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __call__(self, probe: Probe) -> Trial:
        from smlt.client.driver import train  # the whole client: only when measuring on Ray

        if self._folder is None:
            raise ConfigError("RayTrials measures inside its 'with' block only")
        k = len(self.measured)
        # Two iterations at least: one warms up, the time per iteration needs another.
        iterations = max(2, probe.iterations)
        real_started = time.perf_counter()
        try:
            result = train(
                self.task,
                epochs=self.epochs,
                batch_size=self.batch_size,
                workers=probe.workers,
                memory_mb=probe.memory_mb,
                backend="ray",
                seed=self.seed,
                output=self._folder / f"trial-{k}",
                object_store=self.object_store or str(self._folder / "objects"),
                redis_url=self.redis_url,
                ray_address=self.ray_address,
                max_iterations=iterations,
                shard_bytes=self.shard_bytes,
                **self.prices.to_dict(),
            )
        except TrainingError as exc:
            if not _out_of_memory(exc):
                raise
            return self._died(probe, time.perf_counter() - real_started, 0.0, str(exc))
        # A worker out of memory twice is retried once with twice the memory (the scheduler's
        # FailurePolicy), so the run may finish: the probe's size still did not fit.
        died = [f for f in result.failures if "retry_memory_mb" in f or _oom_cause(f)]
        if died:
            return self._died(probe, result.wall_s, result.cost_usd, str(died[0]))
        generations = result.generations
        history = result.history
        iterations_run = len(history)
        stamps = [h["wall_s"] for h in history]
        s_per_iteration = (
            (stamps[-1] - stamps[0]) / (iterations_run - 1)
            if iterations_run > 1
            else history[0]["iter_s"]  # a job of one iteration: its own time is all there is
        )
        generations_s = sum(g["wall_s"] for g in generations)
        startup_s = max(0.0, generations_s - iterations_run * s_per_iteration) / len(generations)
        trial = Trial(
            workers=probe.workers,
            memory_mb=probe.memory_mb,
            workload=probe.workload,
            outcome="ok",
            iterations=iterations_run,
            wall_s=result.wall_s,
            cost_usd=result.cost_usd,
            s_per_iteration=s_per_iteration,
        )
        self.measured.append(
            {
                **trial.to_dict(),
                "grain": "ray",
                "startup_s": startup_s,
                "driver_s": max(0.0, result.wall_s - generations_s),
                "billed_worker_s": result.billed_worker_s,
                "real_s": time.perf_counter() - real_started,
            }
        )
        return trial

    def _died(self, probe: Probe, wall_s: float, cost_usd: float, error: str) -> Trial:
        trial = Trial(
            workers=probe.workers,
            memory_mb=probe.memory_mb,
            workload=probe.workload,
            outcome="oom",
            iterations=0,
            wall_s=wall_s,
            cost_usd=cost_usd,
        )
        self.measured.append({**trial.to_dict(), "grain": "ray", "error": error})
        return trial

    def overheads(self) -> tuple[float, float] | None:
        """(startup_s, driver_s): the medians over the trials that ran; None before one has
        (every trial so far ran out of memory, which is an answer, not an error)."""
        ran = [m for m in self.measured if m["outcome"] == "ok"]
        if not ran:
            return None
        return (
            statistics.median(m["startup_s"] for m in ran),
            statistics.median(m["driver_s"] for m in ran),
        )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by a worker out of memory (the typed error anywhere in its
    chain, or named in its text once it crossed a process boundary)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OutOfMemoryError) or OutOfMemoryError.__name__ in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _oom_cause(failure: dict[str, Any]) -> bool:
    return OutOfMemoryError.__name__ in str(failure.get("cause", ""))


@dataclass(frozen=True)
class PlanResult:
    """A plan: the decision, the trials it took, what it was computed from."""

    decision: Decision
    trials: tuple[dict[str, Any], ...]
    profile: TaskProfile
    #: The modelled platform the trials ran on; None when they ran on Ray.
    platform: SimPlatform | None
    problem: Problem
    planning_s: float
    backend: str = "sim"

    @property
    def feasible(self) -> bool:
        return self.decision.feasible

    @property
    def job_iterations(self) -> int:
        """The job's iterations: on the sim its trials are the job's first ones (profiling is
        training, as in ``smlt train --deadline``); on Ray they were separate runs."""
        done = sum(t["iterations"] for t in self.trials) if self.backend == "sim" else 0
        return self.problem.workload.iterations + done

    def to_dict(self) -> dict[str, Any]:
        """The decision's keys first (``feasible``, ``workers``, ``memory_mb``,
        ``predicted_time_s``, ``predicted_cost_usd``, ``trials``, ``frontier``), then the
        trials in detail, the profile, the platform and the planning time."""
        return {
            **self.decision.to_dict(),
            "trial_details": list(self.trials),
            "backend": self.backend,
            "profile": self.profile.to_dict(),
            "platform": None if self.platform is None else self.platform.to_dict(),
            "problem": self.problem.to_dict(),
            "planning_s": self.planning_s,
        }


def plan_task(
    task: Task | str | TaskProfile,
    *,
    epochs: int,
    batch_size: int,
    goal: Goal | None = None,
    workers: int | None = None,
    memory_mb: int | None = None,
    backend: str = "sim",
    seed: int = 0,
    settings: SearchSettings | None = None,
    max_scheduled_reports: int = DEFAULT_MAX_SCHEDULED_REPORTS,
    ray_address: str | None = None,
    redis_url: str | None = None,
    object_store: str | None = None,
    prices: Prices | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    **platform_figures: Any,
) -> PlanResult:
    """Plan ``epochs`` epochs of ``task`` at global batch ``batch_size`` for ``goal``.

    With ``workers`` and ``memory_mb`` both given there is nothing to search: one trial runs
    there and the prediction is for that configuration. With one of them given, the search
    covers the other. Without a goal and without both, the goal is :class:`Fastest`.
    ``platform_figures`` override :class:`~smlt.backends.sim.SimPlatform`'s (``noise_sigma``,
    ``max_concurrency``, ``bandwidth_mbps``, ...). A task may be given as a
    :class:`TaskProfile` already measured (benchmarks plan many jobs of one task). A trial of
    at most ``max_scheduled_reports`` rank-iterations runs through the real scheduler, a
    larger one at the model's coarse grain (see :class:`SimTrials`).

    With ``backend="ray"`` the trials are short real runs on Ray (:class:`RayTrials`; a local
    Ray, or the cluster at ``ray_address``, whose workers need a Redis at ``redis_url`` and
    an object store at ``object_store`` they can reach, as ``smlt train`` there does) and
    ``platform_figures`` are refused: there is no model to set. ``prices``
    (:class:`~smlt.client.prices.Prices`) are what the run will be billed at beyond the
    backend's own prices, as ``smlt train`` takes them. ``shard_bytes`` is the data shards'
    size the Ray trials package with (``smlt train``'s); the sim reads no data."""
    prices = prices or Prices()
    started = time.perf_counter()
    if backend not in PLAN_BACKENDS:
        raise ConfigError(f"--backend {backend!r}: smlt plan knows {', '.join(PLAN_BACKENDS)}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    check_shard_bytes(shard_bytes)
    override = Override(workers, memory_mb)
    if goal is None:
        goal = Fastest()
    if backend != "ray" and (redis_url is not None or object_store is not None):
        raise ConfigError(
            "--redis-url and --object-store are for the trials of --backend ray; the sim has "
            "no workers to reach them"
        )
    if backend == "ray":
        if isinstance(task, TaskProfile) or not isinstance(task, str):
            raise ConfigError("--backend ray runs the task: give it as path/to/file.py:ClassName")
        if platform_figures:
            raise ConfigError(
                f"--backend ray measures the platform; {', '.join(sorted(platform_figures))} "
                "only set the sim's model"
            )
        return _plan_on_ray(
            task,
            epochs=epochs,
            batch_size=batch_size,
            goal=goal,
            override=override,
            seed=seed,
            settings=settings or SearchSettings(seed=seed),
            ray_address=ray_address,
            redis_url=redis_url,
            object_store=object_store,
            prices=prices,
            started=started,
            shard_bytes=shard_bytes,
        )
    profile = task if isinstance(task, TaskProfile) else profile_task(task)
    platform = SimPlatform(
        s_per_sample_1_vcpu=profile.s_per_sample_1_vcpu,
        num_params=profile.num_params,
        optimizer_state_shards=profile.optimizer_state_shards,
        seed=seed,
        **platform_figures,
    )
    iterations_per_epoch = GlobalBatchSampler(profile.num_samples, batch_size, seed)
    per_epoch = iterations_per_epoch.iterations_per_epoch
    workload = Workload(
        batch_size=min(batch_size, profile.num_samples),
        num_params=profile.num_params,
        iterations=epochs * per_epoch,
        optimizer_state_shards=profile.optimizer_state_shards,
    )
    problem = Problem(
        goal=goal,
        workload=workload,
        space=SearchSpace(
            max_workers=platform.max_concurrency,
            min_memory_mb=platform.min_memory_mb,
            max_memory_mb=platform.max_memory_mb,
        ),
        costs=prices.costs(platform.pricing),
        prior=PerfPrior().calibrated(profile.s_per_sample_1_vcpu, profile.num_params),
        override=override,
        startup_s=platform.cold_start_s,
        max_run_s=max(1.0, platform.max_duration_s - STOP_MARGIN_S - platform.cold_start_s),
    )
    settings = settings or SearchSettings(seed=seed)
    with SimTrials(
        platform, iterations_per_epoch=per_epoch, max_scheduled_reports=max_scheduled_reports
    ) as measure:
        if override.fixed:
            assert workers is not None and memory_mb is not None
            iterations = min(settings.trial_iterations, workload.iterations)
            trial = measure(Probe(workers, memory_mb, iterations, workload))
            decision = plan(problem.advanced(trial), [trial], settings)
            final = problem.advanced(trial)
        else:
            result = search(problem, measure, settings)
            decision, final = result.decision, result.problem
    return PlanResult(
        decision=decision,
        trials=tuple(measure.measured),
        profile=profile,
        platform=platform,
        problem=final,
        planning_s=time.perf_counter() - started,
    )


def _plan_on_ray(
    task: str,
    *,
    epochs: int,
    batch_size: int,
    goal: Goal,
    override: Override,
    seed: int,
    settings: SearchSettings,
    ray_address: str | None,
    redis_url: str | None,
    object_store: str | None,
    prices: Prices,
    started: float,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> PlanResult:
    """:func:`plan_task` with trials measured on Ray (see :class:`RayTrials`).

    The trials are not the job's iterations, so the problem is never advanced by them: each
    decision is for a whole ``smlt train`` of ``epochs`` epochs at that configuration, its
    one-off and per-generation start-up the medians of what the trials measured so far (the
    backend's default guess until the first trial)."""
    from smlt.backends.ray_backend import RayBackend, ensure_ray

    profile = profile_task(task)
    target = RayBackend(address=ray_address, **prices.backend_options())
    low_mb, high_mb = target.memory_range_mb()
    if override.workers is not None:
        max_workers = override.workers
    else:  # the cluster's size: read from a Ray started (or joined) for that alone
        started_here = ensure_ray(ray_address)
        try:
            max_workers = target.capacity().max_workers(override.memory_mb or low_mb)
        finally:
            if started_here:
                import ray

                ray.shutdown()
    per_epoch = GlobalBatchSampler(profile.num_samples, batch_size, seed).iterations_per_epoch
    problem = Problem(
        goal=goal,
        workload=Workload(
            batch_size=min(batch_size, profile.num_samples),
            num_params=profile.num_params,
            iterations=epochs * per_epoch,
            optimizer_state_shards=profile.optimizer_state_shards,
        ),
        space=SearchSpace(max_workers=max_workers, min_memory_mb=low_mb, max_memory_mb=high_mb),
        costs=prices.costs(target.pricing),
        prior=PerfPrior().calibrated(profile.s_per_sample_1_vcpu, profile.num_params),
        override=override,
    )
    with RayTrials(
        task,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        ray_address=ray_address,
        redis_url=redis_url,
        object_store=object_store,
        prices=prices,
        shard_bytes=shard_bytes,
    ) as measure:

        def calibrated(before: Problem, _trial: Trial) -> Problem:
            """The job is not advanced by a trial on Ray (a run of its own); its fixed costs
            are what the trials so far measured."""
            overheads = measure.overheads()
            if overheads is None:  # no trial ran to its end yet (out of memory)
                return before
            return replace(before, startup_s=overheads[0], driver_s=overheads[1])

        if override.fixed:
            assert override.workers is not None and override.memory_mb is not None
            iterations = min(settings.trial_iterations, problem.workload.iterations)
            probe = Probe(override.workers, override.memory_mb, iterations, problem.workload)
            trial = measure(probe)
            problem = calibrated(problem, trial)
            decision = plan(problem, [trial], settings)
        else:
            result = search(problem, measure, settings, advance=calibrated)
            decision, problem = result.decision, result.problem
    return PlanResult(
        decision=decision,
        trials=tuple(measure.measured),
        profile=profile,
        platform=None,
        problem=problem,
        planning_s=time.perf_counter() - started,
        backend="ray",
    )


def plot_frontier(result: PlanResult, path: Path) -> Path:
    """The time-cost frontier with the recommendation and the goal, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decision = result.decision
    fig, ax = plt.subplots(figsize=(7, 4.5))
    times = [p.time_s / 60 for p in decision.frontier]
    costs = [p.cost_usd for p in decision.frontier]
    ax.plot(times, costs, "o-", color="tab:blue", label="time-cost frontier (predicted)")
    for p in decision.frontier:
        ax.annotate(
            f"{p.workers}x{p.memory_mb}",
            (p.time_s / 60, p.cost_usd),
            fontsize=6,
            alpha=0.7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.plot(
        [decision.predicted.time_s / 60],
        [decision.predicted.cost_usd],
        "*",
        color="tab:red" if decision.feasible else "tab:gray",
        markersize=14,
        label=f"{'recommended' if decision.feasible else 'closest (infeasible)'}: "
        f"{decision.workers} x {decision.memory_mb} MB",
    )
    goal = decision.goal
    if goal.time_limit_s is not None:
        ax.axvline(goal.time_limit_s / 60, color="tab:red", ls="--", lw=1, label=str(goal))
    if goal.cost_limit_usd is not None:
        ax.axhline(goal.cost_limit_usd, color="tab:red", ls="--", lw=1, label=str(goal))
    ax.set_xlabel("predicted wall time (min)")
    ax.set_ylabel("predicted cost (USD)")
    # Log axes where the frontier spans an order of magnitude; linear ones show a narrow span.
    if times and max(times) > 5 * min(times):
        ax.set_xscale("log")
    if costs and max(costs) > 5 * min(costs):
        ax.set_yscale("log")
    ax.set_title(
        f"smlt plan {result.profile.task}: {result.problem.workload.batch_size}-sample batches, "
        f"{len(result.trials)} trials",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_plan_dir(profile: TaskProfile) -> Path:
    """``plans/<task class>-<UTC stamp>/``: where ``smlt plan`` writes ``plan.json`` and
    ``frontier.png`` unless told otherwise (not ``runs/``, which holds runs)."""
    name = profile.task.rpartition(":")[2].lower() or "task"
    return Path("plans") / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
