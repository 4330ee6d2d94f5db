"""The resource manager (paper component 1b): decides workers x memory; the scheduler executes.

Like Ray Train's scaling policy, it returns decisions and never acts. It works in one of two
modes:

- **fixed**: the user's ``--workers`` / ``--memory-mb`` (when no memory is given it asks the
  backend for the largest size that fits the requested workers at once), and a re-scaling
  schedule (``--rescale 40:2`` = from iteration 40 on, 2 workers);
- **goal**: ``--deadline``, ``--budget`` or ``--fastest`` (:class:`GoalSettings`). Each decision
  comes from :func:`smlt.optimizer.bayes.plan` (DESIGN §5). A *probe* is an ordinary generation
  of the run that ends after a few iterations: profiling *is* training, nothing is thrown away.
  The scheduler hands each generation's measurements back (:meth:`ResourceManager.record`),
  the manager turns a probe's into a :class:`~smlt.optimizer.perf.Trial`, plans again, and the
  next configuration starts at the boundary through the path ``--rescale`` uses
  (:meth:`ResourceManager.wants_rescale`, then :meth:`ResourceManager.after_generation`). A
  workload that changes mid-run (:meth:`ResourceManager.training_changed`) is re-planned the
  same way. A user override of workers and/or memory still wins: the optimizer searches only
  what the user left open.

Why trials are kept with the iteration that ended them: a checkpoint's metadata carries the
trials before it (:meth:`ResourceManager.trials_before`), so a resumed run goes on with the
trials it paid for, not with a new search.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from smlt.backends.base import Backend, BackendLimits
from smlt.errors import CapacityError, ConfigError
from smlt.optimizer.cost import CostModel
from smlt.optimizer.goals import Budget, Deadline, Fastest, Goal, Override
from smlt.optimizer.perf import PerfPrior, Trial, Workload
from smlt.optimizer.problem import Decision, Problem, SearchResult, SearchSettings
from smlt.optimizer.space import SearchSpace

__all__ = [
    "Config",
    "GenerationOutcome",
    "GoalSettings",
    "Rescale",
    "ResourceManager",
    "fits_of",
    "goal_from_dict",
    "trial_from_dict",
]

#: Start-up a generation is assumed to pay before any has been measured (a cold function with
#: torch: 5-15 s on Lambda; a warm local Ray worker pays less, and the measurement replaces it).
DEFAULT_STARTUP_S = 10.0


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


@dataclass(frozen=True)
class GenerationOutcome:
    """What one generation did, as the scheduler measured it.

    ``s_per_iteration`` is the steady-state time per iteration (the generation's first
    iteration, which carries the start-up, left out when there are others); ``cost_usd`` is
    what its invocations were billed; ``out_of_memory`` that a worker ran out of memory."""

    start_iteration: int
    stop_iteration: int
    workers: int
    memory_mb: int
    wall_s: float
    cost_usd: float
    s_per_iteration: float | None
    out_of_memory: bool = False

    @property
    def iterations(self) -> int:
        return self.stop_iteration - self.start_iteration

    @property
    def startup_s(self) -> float | None:
        """Wall time not spent iterating: deploy, cold start, hand-over."""
        if self.s_per_iteration is None or self.iterations < 1:
            return None
        return max(0.0, self.wall_s - self.iterations * self.s_per_iteration)


@dataclass(frozen=True)
class GoalSettings:
    """What the manager needs to pursue a goal; plain frozen values, so that it travels to the
    scheduler's actor with the rest of :meth:`ResourceManager.settings`.

    ``workload.iterations`` is the run's total. ``started_unix_s`` is when the run began (its
    earlier parts' wall time subtracted for a resume): a deadline is for the whole run, start-up
    included. ``spent_before_usd`` is what earlier parts paid; ``trials`` the trials they ran."""

    goal: Goal
    workload: Workload
    costs: CostModel = field(default_factory=CostModel)
    prior: PerfPrior = field(default_factory=PerfPrior)
    search: SearchSettings = field(default_factory=SearchSettings)
    started_unix_s: float = field(default_factory=time.time)
    spent_before_usd: float = 0.0
    trials: tuple[Trial, ...] = ()
    startup_s: float = DEFAULT_STARTUP_S
    #: (iteration, decision) already taken for the run's first generation there: the driver
    #: publishes the parameters for its worker count, and the scheduler's manager must not
    #: decide differently a moment later.
    decided: tuple[int, Decision] | None = None


class ResourceManager:
    """Chooses the configuration of each generation."""

    def __init__(
        self,
        limits: BackendLimits,
        *,
        workers: int | None,
        memory_mb: int | None,
        fit_memory_mb: Callable[[int], int] | None = None,
        rescales: tuple[Rescale, ...] = (),
        goal: GoalSettings | None = None,
        fits: Callable[[int, int], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if goal is None and workers is None:
            raise ConfigError("give --workers, or a goal (--deadline, --budget, --fastest)")
        if goal is not None and rescales:
            raise ConfigError(
                "--rescale and a goal (--deadline, --budget, --fastest) both decide re-scales; "
                "give one of them"
            )
        self.limits = limits
        self.workers = 1 if workers is None else limits.check_workers(workers)
        self.memory_mb = None if memory_mb is None else limits.check_memory(memory_mb)
        self.fit_memory_mb = fit_memory_mb
        for r in rescales:
            limits.check_workers(r.workers)
            if r.memory_mb is not None:
                limits.check_memory(r.memory_mb)
        self._rescales = sorted(rescales, key=lambda r: r.at)
        self._current: Config | None = None
        self._settings: dict[str, Any] = {
            "workers": workers,
            "memory_mb": memory_mb,
            "rescales": tuple(rescales),
            "goal": goal,
        }
        self.goal = goal
        self._clock = clock
        self._override = Override(workers, memory_mb)
        self._fits = fits
        self._room: Callable[[int], int] | None = None  # built once: see _max_workers_at
        # Goal mode: (iteration the trial ended at, trial), oldest first.
        self._trials: list[tuple[int, Trial]] = []
        if goal is not None:
            # An earlier part's trials; the iteration they ended at no longer matters.
            self._trials = [(0, t) for t in goal.trials]
        self._workload = goal.workload if goal is not None else None
        self._spent_usd = goal.spent_before_usd if goal is not None else 0.0
        self._startups: list[float] = []
        self._probe_until: int | None = None  # the current probe ends at this iteration
        self._pending: Decision | None = None  # a re-plan to apply at the next boundary
        self._outcome: GenerationOutcome | None = None
        self._decision: Decision | None = None
        self._problem: Problem | None = None

    def settings(self) -> dict[str, object]:
        """The user's choices, without the backend: what travels to the scheduler's actor,
        which builds its own manager against its own backend object."""
        settings = dict(self._settings)
        goal = self.goal
        if goal is not None and self._decision is not None and self._current is not None:
            settings["goal"] = replace(goal, decided=(self._current.from_iteration, self._decision))
        return settings

    # -- decisions -------------------------------------------------------------------------------

    def initial(self, start_iteration: int = 0) -> Config:
        """The first generation's configuration. With a goal no configuration can meet, raises
        :class:`~smlt.errors.InfeasibleGoalError` (naming the fastest time and the cheapest
        cost in reach): the run is refused before any worker starts."""
        if self.goal is not None:
            decided = self.goal.decided
            if decided is not None and decided[0] == start_iteration:
                decision = decided[1]
                self._problem = self._problem_at(start_iteration)
            else:
                decision = self._plan(start_iteration)
            if not decision.feasible:
                raise decision.error()
            self._current = self._follow(decision, start_iteration)
            return self._current
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

    def planned_stop(self, start_iteration: int) -> int | None:
        """Where the generation starting at ``start_iteration`` is known to end, if it is: the
        end of a probe, or the next scheduled re-scale. The scheduler fixes it before the
        workers start, so a trial trains exactly its iterations however fast they are (a
        request while they run lands at the next boundary the workers check, several
        iterations late when iterations take milliseconds)."""
        ends = [self._probe_until] if self._probe_until is not None else []
        if self._rescales:
            ends.append(self._rescales[0].at)
        ends = [at for at in ends if at > start_iteration]
        return min(ends) if ends else None

    def wants_rescale(self, next_iteration: int) -> bool:
        """True when the current generation should stop: a re-scale, the end of a probe or a
        re-plan is due at or before the iteration after ``next_iteration`` (the generation
        stops at the next boundary)."""
        if self._pending is not None:
            return True
        if self._probe_until is not None and self._probe_until <= next_iteration + 1:
            return True
        return bool(self._rescales) and self._rescales[0].at <= next_iteration + 1

    def record(self, outcome: GenerationOutcome) -> Trial | None:
        """What the generation that just ended did; returns the trial it was, if any. The
        scheduler calls this before the generation's checkpoint is committed, so that the
        checkpoint carries the trial."""
        self._outcome = outcome
        self._spent_usd += outcome.cost_usd
        if outcome.startup_s is not None:
            self._startups.append(outcome.startup_s)
        if self.goal is None:
            return None
        probing = self._probe_until is not None
        measured = outcome.iterations >= 1 and outcome.s_per_iteration is not None
        # A worker out of memory is a trial wherever it happens: the memory model must know.
        if not (outcome.out_of_memory or (probing and measured)):
            return None
        trial = self._trial(outcome)
        self._trials.append((outcome.stop_iteration, trial))
        return trial

    def after_generation(self, stop_iteration: int, why: str) -> Config:
        """The configuration of the generation that starts at ``stop_iteration``."""
        assert self._current is not None, "initial() first"
        if self.goal is not None:
            return self._after_generation_goal(stop_iteration)
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

    def training_changed(
        self,
        at_iteration: int,
        *,
        batch_size: int | None = None,
        num_params: int | None = None,
        iterations: int | None = None,
    ) -> Decision:
        """The training changed at ``at_iteration`` (a new batch size, model, or number of
        iterations to run in all): plan again for it, from the trials so far (the physical
        model carries them over), and hand the decision to the scheduler at the next boundary
        through :meth:`wants_rescale`. Returns the decision."""
        if self.goal is None or self._workload is None:
            raise ConfigError("re-planning needs a goal (--deadline, --budget or --fastest)")
        self._workload = self._workload.changed(
            batch_size=batch_size, num_params=num_params, iterations=iterations
        )
        decision = self._plan(at_iteration)
        self._pending = decision
        return decision

    # -- what the run records --------------------------------------------------------------------

    @property
    def trials(self) -> tuple[Trial, ...]:
        return tuple(t for _stop, t in self._trials)

    def trials_before(self, iteration: int) -> list[dict[str, Any]]:
        """The trials that ended at or before ``iteration``, for that checkpoint's metadata."""
        return [t.to_dict() for stop, t in self._trials if stop <= iteration]

    def report(self) -> dict[str, Any] | None:
        """For ``result.json``: the goal, every trial with its measured s/iteration and cost,
        the decision the run ended with (its configuration and why), and the model behind it.
        None without a goal."""
        if self.goal is None or self._decision is None or self._problem is None:
            return None
        result = SearchResult(self._decision, self.trials, self._problem).to_dict()
        chosen = self._decision
        result["chosen"] = {
            "workers": chosen.workers,
            "memory_mb": chosen.memory_mb,
            "action": chosen.action,
            "reason": chosen.reason,
            "predicted_time_s": chosen.predicted.time_s,
            "predicted_cost_usd": chosen.predicted.cost_usd,
        }
        result["goal"] = self.goal.goal.to_dict()
        return _json_safe(result)

    # -- goal mode -------------------------------------------------------------------------------

    def _after_generation_goal(self, stop_iteration: int) -> Config:
        assert self._current is not None and self.goal is not None
        outcome, self._outcome = self._outcome, None
        if stop_iteration >= self.goal.workload.iterations and self._pending is None:
            self._probe_until = None
            return self._current
        pending, self._pending = self._pending, None
        oom = outcome is not None and outcome.out_of_memory
        if pending is None and self._probe_until is None and not oom:
            return self._current  # the search is over: keep running the chosen configuration
        decision = pending if pending is not None else self._plan(stop_iteration)
        if not decision.feasible:
            # Mid-run, the iterations already trained are paid for: go on as close to the goal
            # as the model says is possible (the fastest for a deadline, the cheapest for a
            # budget), and let result.json say the goal was missed.
            decision = replace(
                decision,
                action="run",
                reason=f"the {decision.goal} is out of reach ({decision.reason}); the closest "
                "configuration",
            )
        self._current = self._follow(decision, stop_iteration)
        return self._current

    def _follow(self, decision: Decision, start_iteration: int) -> Config:
        """The configuration that carries out ``decision`` from ``start_iteration``."""
        assert self.goal is not None
        self._decision = decision
        if decision.action == "probe":
            self._probe_until = start_iteration + self.goal.search.trial_iterations
            why = f"trial {len(self._trials) + 1}: {decision.reason}"
        else:
            self._probe_until = None
            why = f"chosen for the {decision.goal} ({decision.action}): {decision.reason}"
        return Config(start_iteration, decision.workers, decision.memory_mb, why)

    def _plan(self, iteration: int) -> Decision:
        from smlt.optimizer.bayes import plan  # scikit-optimize: seconds to import

        problem = self._problem_at(iteration)
        self._problem = problem
        return plan(problem, self.trials, self._search_settings())

    def _search_settings(self) -> SearchSettings:
        assert self.goal is not None
        return self.goal.search

    def _problem_at(self, iteration: int) -> Problem:
        goal, workload = self.goal, self._workload
        assert goal is not None and workload is not None
        limits = self.limits
        return Problem(
            goal=goal.goal,
            workload=workload.changed(iterations=max(0, goal.workload.iterations - iteration)),
            space=SearchSpace(
                max_workers=limits.max_concurrency,
                min_memory_mb=limits.min_memory_mb,
                max_memory_mb=limits.max_memory_mb,
                memory_step_mb=limits.memory_step_mb,
                max_workers_at=self._max_workers_at(),
            ),
            costs=goal.costs,
            prior=goal.prior,
            override=self._override,
            startup_s=self._startup_s(),
            max_run_s=_max_run_s(limits),
            elapsed_s=max(0.0, self._clock() - goal.started_unix_s),
            spent_usd=self._spent_usd,
        )

    def _startup_s(self) -> float:
        """What a generation from now on will pay before it iterates: the median measured
        hand-over. The execution's first generation is no measure of that (it started the
        platform's worker processes cold and imported torch: 38 s against 3 s for the next one
        on a loaded local Ray), so until a hand-over is measured it only lowers the default."""
        assert self.goal is not None
        handovers = sorted(self._startups[1:])
        if handovers:
            return handovers[len(handovers) // 2]
        return min([self.goal.startup_s, *self._startups])

    def _max_workers_at(self) -> Callable[[int], int] | None:
        """How many workers of a size the platform holds at once, from ``fits`` (a backend's
        ``check_fits``): a binary search per size, each size asked once per manager. On Ray
        every ``check_fits`` asks the cluster for its nodes; a decision weighs some 50 sizes,
        and a run takes several decisions. A cluster that shrinks later is caught by
        ``deploy``, which checks again."""
        fits = self._fits
        if fits is None:
            return None
        if self._room is not None:
            return self._room
        top = self.limits.max_concurrency

        @functools.cache
        def room(memory_mb: int) -> int:
            low, high = 0, top  # fits(low) holds (0 trivially); find the largest that fits
            while low < high:
                mid = (low + high + 1) // 2
                if fits(mid, memory_mb):
                    low = mid
                else:
                    high = mid - 1
            return low

        self._room = room
        return room

    def _trial(self, outcome: GenerationOutcome) -> Trial:
        assert self._workload is not None
        return Trial(
            workers=outcome.workers,
            memory_mb=outcome.memory_mb,
            workload=self._workload.changed(
                iterations=max(0, self._workload.iterations - outcome.start_iteration)
            ),
            outcome="oom" if outcome.out_of_memory else "ok",
            iterations=outcome.iterations,
            wall_s=outcome.wall_s,
            cost_usd=outcome.cost_usd,
            s_per_iteration=None if outcome.out_of_memory else outcome.s_per_iteration,
        )


def fits_of(backend: Backend) -> Callable[[int, int], bool]:
    """``fits(workers, memory_mb)``: whether the backend holds that many workers of that size
    at once (its ``check_fits``), for the search space's capacity."""

    def fits(workers: int, memory_mb: int) -> bool:
        try:
            backend.check_fits(workers, memory_mb)
        except CapacityError:
            return False
        return True

    return fits


def _max_run_s(limits: BackendLimits) -> float:
    """How long one invocation may train: the platform's limit less the scheduler's hand-over
    margin (a tenth, at least 30 s); unlimited on Ray."""
    if not math.isfinite(limits.max_duration_s):
        return math.inf
    margin_s = max(30.0, 0.1 * limits.max_duration_s)
    return max(1.0, limits.max_duration_s - margin_s)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: ``result.json`` is strict JSON, and an
    unlimited run time (Ray's) is infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def goal_from_dict(data: Mapping[str, Any]) -> Goal:
    """The goal ``Goal.to_dict()`` wrote (``run.json``, a checkpoint's metadata)."""
    kind = data.get("goal")
    if kind == Deadline.kind:
        return Deadline(float(data["time_s"]))
    if kind == Budget.kind:
        return Budget(float(data["cost_usd"]))
    if kind == Fastest.kind:
        return Fastest()
    raise ConfigError(f"not a goal smlt wrote: {dict(data)!r}")


def trial_from_dict(data: Mapping[str, Any]) -> Trial:
    """The trial ``Trial.to_dict()`` wrote."""
    return Trial(
        workers=int(data["workers"]),
        memory_mb=int(data["memory_mb"]),
        workload=Workload(**data["workload"]),
        outcome=data["outcome"],
        iterations=int(data["iterations"]),
        wall_s=float(data["wall_s"]),
        cost_usd=float(data["cost_usd"]),
        s_per_iteration=data.get("s_per_iteration"),
        peak_memory_mb=data.get("peak_memory_mb"),
    )
