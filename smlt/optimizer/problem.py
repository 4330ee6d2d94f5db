"""What goes into a decision and what comes out of it: plain frozen values.

A :class:`Problem` (goal, workload, search space, prices, what the run used so far) and the
trials go into :func:`~smlt.optimizer.bayes.plan`; a :class:`Decision` comes out. All of them
serialize with ``to_dict()`` for ``result.json`` and ``smlt plan --json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from smlt.errors import ConfigError, InfeasibleGoalError
from smlt.optimizer.cost import CostBreakdown, CostModel
from smlt.optimizer.goals import Goal, Override, format_duration
from smlt.optimizer.perf import PerfPrior, Trial, Workload
from smlt.optimizer.space import SearchSpace

__all__ = [
    "Action",
    "Decision",
    "Prediction",
    "Probe",
    "Problem",
    "SearchResult",
    "SearchSettings",
]


@dataclass(frozen=True)
class Problem:
    """Everything a decision depends on besides the trials.

    ``startup_s`` is what every generation pays before its first iteration (the platform's
    cold start with torch: 5-15 s on Lambda). ``max_run_s`` is how long one invocation may
    train before the scheduler hands over to a new generation (Lambda: 900 s less the
    scheduler's margin; inf for Ray). ``driver_s`` is what the run spends once outside any
    worker, in wall time but not in the workers' bill: the driver starting Ray, the store and
    the scheduler, the last evaluation, writing the result (measured by ``smlt plan --backend
    ray``'s trials; 0 where it is unknown, which the sim's platforms leave it). ``elapsed_s``
    and ``spent_usd`` are what the run has used so far, trials included: a deadline and a
    budget are for the whole run."""

    goal: Goal
    workload: Workload
    space: SearchSpace
    costs: CostModel = field(default_factory=CostModel)
    prior: PerfPrior = field(default_factory=PerfPrior)
    override: Override = field(default_factory=Override)
    startup_s: float = 10.0
    max_run_s: float = math.inf
    driver_s: float = 0.0
    elapsed_s: float = 0.0
    spent_usd: float = 0.0

    def __post_init__(self) -> None:
        if self.startup_s < 0 or self.max_run_s <= 0 or self.driver_s < 0:
            raise ConfigError(
                f"startup_s and driver_s must be >= 0 and max_run_s > 0, got {self.startup_s}, "
                f"{self.driver_s}, {self.max_run_s}"
            )
        self.space.check(self.override)

    def advanced(self, trial: Trial) -> Problem:
        """The problem after ``trial``: its iterations are done, its time and money spent."""
        done = trial.iterations if trial.ok else 0
        return replace(
            self,
            workload=self.workload.changed(iterations=max(0, self.workload.iterations - done)),
            elapsed_s=self.elapsed_s + trial.wall_s,
            spent_usd=self.spent_usd + trial.cost_usd,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.goal.to_dict(),
            "workload": self.workload.to_dict(),
            "override": self.override.to_dict(),
            "costs": self.costs.to_dict(),
            "startup_s": self.startup_s,
            "max_run_s": self.max_run_s,
            "driver_s": self.driver_s,
            "elapsed_s": self.elapsed_s,
            "spent_usd": self.spent_usd,
        }


@dataclass(frozen=True)
class SearchSettings:
    """The optimizer's knobs.

    ``ei_stop``: stop when no configuration is expected to beat the incumbent by this much
    (EI is on log scale: 0.02 is 2 %; below about the measurement noise a further trial mostly
    measures noise). ``confidence``: the probability of meeting the goal (and of fitting in
    memory) a recommendation needs. ``p_infeasible``: below this everywhere, the goal is out of
    reach. ``cost_exponent``: how hard a trial's cost counts against it (0: not at all; 1:
    expected improvement per dollar of probing). ``trial_iterations``: how many iterations a
    probe trains, to predict its cost."""

    max_trials: int = 12
    trial_iterations: int = 5
    ei_stop: float = 0.02
    xi: float = 0.01
    confidence: float = 0.9
    p_infeasible: float = 0.02
    cost_exponent: float = 1.0
    trial_budget_usd: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_trials < 1 or self.trial_iterations < 1:
            raise ConfigError("max_trials and trial_iterations must be at least 1")
        if not 0 < self.p_infeasible < self.confidence < 1:
            raise ConfigError("need 0 < p_infeasible < confidence < 1")


@dataclass(frozen=True)
class Prediction:
    """The model's forecast for the rest of the run at one configuration.

    ``time_s`` and ``cost_usd`` are for the whole run (what it used so far included): what a
    goal is about. ``remaining_time_s`` and ``breakdown`` are for the rest only."""

    workers: int
    memory_mb: int
    s_per_iteration: float
    time_s: float
    cost_usd: float
    remaining_time_s: float
    breakdown: CostBreakdown
    p_fits: float
    p_goal: float
    measured: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "memory_mb": self.memory_mb,
            "s_per_iteration": self.s_per_iteration,
            "time_s": self.time_s,
            "cost_usd": self.cost_usd,
            "remaining_time_s": self.remaining_time_s,
            "remaining_cost": self.breakdown.to_dict(),
            "p_fits": self.p_fits,
            "p_goal": self.p_goal,
            "measured": self.measured,
        }


Action = Literal["probe", "run", "infeasible"]


@dataclass(frozen=True)
class Decision:
    """What to do next, and why.

    ``action`` is ``"probe"`` (train a few iterations at ``workers`` x ``memory_mb`` and plan
    again), ``"run"`` (train the rest there) or ``"infeasible"`` (no configuration meets the
    goal; ``workers`` x ``memory_mb`` misses it least: the fastest for a deadline, the cheapest
    for a budget). ``fastest`` and ``cheapest`` are the model's best in each direction,
    ``frontier`` the time-cost trade-off (fastest first); ``model`` the fitted coefficients."""

    action: Action
    workers: int
    memory_mb: int
    reason: str
    goal: Goal
    predicted: Prediction
    trials: int
    trials_cost_usd: float
    expected_improvement: float | None = None
    fastest: Prediction | None = None
    cheapest: Prediction | None = None
    frontier: tuple[Prediction, ...] = ()
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.action != "infeasible"

    def error(self) -> InfeasibleGoalError:
        """The error for an infeasible goal, naming the fastest time and the cheapest cost
        that are in reach."""
        parts = [f"no configuration meets the {self.goal}"]
        if self.fastest is not None:
            parts.append(
                f"the fastest predicted is {format_duration(self.fastest.time_s)} "
                f"({_config(self.fastest)})"
            )
        if self.cheapest is not None:
            parts.append(
                f"the cheapest predicted is ${self.cheapest.cost_usd:.4f} "
                f"({_config(self.cheapest)})"
            )
        return InfeasibleGoalError("; ".join(parts))

    def to_dict(self) -> dict[str, Any]:
        """For ``result.json`` and ``smlt plan --json`` (whose keys are the first ones)."""
        return {
            "feasible": self.feasible,
            "workers": self.workers,
            "memory_mb": self.memory_mb,
            "predicted_time_s": self.predicted.time_s,
            "predicted_cost_usd": self.predicted.cost_usd,
            "trials": self.trials,
            "frontier": [p.to_dict() for p in self.frontier],
            "action": self.action,
            "reason": self.reason,
            "goal": self.goal.to_dict(),
            "predicted": self.predicted.to_dict(),
            "trials_cost_usd": self.trials_cost_usd,
            "expected_improvement": self.expected_improvement,
            "fastest": None if self.fastest is None else self.fastest.to_dict(),
            "cheapest": None if self.cheapest is None else self.cheapest.to_dict(),
            "model": self.model,
        }


def _config(p: Prediction) -> str:
    return f"{p.workers} worker{'s' if p.workers != 1 else ''} x {p.memory_mb} MB"


@dataclass(frozen=True)
class Probe:
    """What :func:`~smlt.optimizer.bayes.search` asks its ``measure`` function to run."""

    workers: int
    memory_mb: int
    iterations: int
    workload: Workload


@dataclass(frozen=True)
class SearchResult:
    """The final decision, every trial in order, and the problem as it stands after them."""

    decision: Decision
    trials: tuple[Trial, ...]
    problem: Problem

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "trials": [t.to_dict() for t in self.trials],
            "problem": self.problem.to_dict(),
        }
