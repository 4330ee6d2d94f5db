"""Does smlt's optimizer find a near-optimal deployment in few trials? Against the exhaustive
optimum, random search and a coarse grid, on seeded scenarios of the ``sim`` platform.

    python -m benchmarks.optimizer --json benchmarks/results/optimizer.json \\
        --plot benchmarks/results/optimizer.png

Scenarios
---------
Synthetic :class:`~smlt.client.plan.TaskProfile`\\ s from a 1M-parameter MLP to a 340M-parameter
transformer (parameters, seconds per sample on one vCPU, samples, batch, epochs, activation
memory per sample, store shards: :data:`MODELS`), each with deadlines or budgets from tight to
loose and some out of reach (:data:`GOALS`). A goal is set relative to what the platform can
do, from the noise-free truth below: a deadline as a multiple of the fastest configuration's
time (or of the cheapest configuration's, for a loose one), a budget as a multiple of the
cheapest configuration's cost (or of the fastest's). The platform is :class:`~smlt.backends.
sim.SimPlatform` (Lambda's figures) with noise on: each rank's compute is multiplied by a
seeded log-normal factor (``--noise``, 0.1 by default) and an iteration waits for the slowest.

The truth: the exhaustive optimum
---------------------------------
The **grid** is the optimizer's own: ``SearchSpace.candidates`` for the platform's limits,
i.e. every worker count up to 32, then steps of 2^(1/16) up to min(1,000, batch size), times
the 52 memory sizes from 128 MB to 10,240 MB in steps of 2^(1/8) (up to 96 x 52 = 4,992
configurations). For each, :func:`job_truth` computes the whole job run there from a cold
start with the sim's **noise-free** model: :meth:`SimPlatform.iteration` with no noise, the
generations :meth:`SimPlatform.trial` makes (cold start with the platform's scaling delay, a
new warm generation at each function time limit), every invocation billed as the sim bills it,
and whether a worker fits in memory. The **optimum** is the configuration that fits, meets
the goal and minimises its objective (cost for a deadline, wall time for a budget); a scenario
where none does is **infeasible**.

The methods
-----------
All three measure with the same function, :class:`~smlt.client.plan.SimTrials` (the real
scheduler on the sim for trials of up to 250 rank-iterations, the sim's coarse model above,
as ``smlt plan`` does), each trial training ``trial_iterations`` (5) iterations that count
towards the job, and each method's k-th trial has the same noise seed.

- **smlt**: :func:`~smlt.client.plan.plan_task` with the scenario's goal, i.e. the
  :func:`~smlt.optimizer.bayes.search` ``smlt plan`` runs (its own stopping rule, at most
  ``max_trials`` = 12 trials).
- **random**: ``max_trials`` configurations drawn uniformly without replacement from the grid
  (seeded by the scenario).
- **grid**: a coarse grid of ``max_trials`` configurations, 4 worker counts x 3 memory sizes
  geometrically spaced over the same ranges (snapped to the grid), measured from the cheapest
  per second (workers x memory) up.

**The pick rule**, the same for all three: after k trials, a method chooses what smlt would
choose if it had to stop there, ``plan(problem after the k trials, the k trials,
max_trials=k)``: the measured configuration with the best predicted objective among those
believed (P >= 0.9) to fit and meet the goal with the trials' time and money counted, or
"infeasible" when none is. For smlt after its last trial that is its own final decision
(the benchmark checks it). The baselines so differ from smlt only in *where* they measure.

What is reported
----------------
- **trials to within 10 %**: the smallest k such that the configuration the method would
  choose after its first k trials (the pick rule) meets the goal when the whole job runs
  there (noise-free) and its objective is at most 1.10 x the optimum's. None (never) if no
  k up to the method's number of trials does; a method that never gets there counts as
  infinitely many in the median, which is over the feasible scenarios.
- **goal met** (feasible scenarios): the method's final choice is not "infeasible", fits, and
  the job meets the goal with everything counted, noise-free: the trials' own (noisy,
  measured) wall time and cost plus the rest of the iterations at the chosen configuration
  from a cold start.
- **infeasible detected** (infeasible scenarios): the method's final answer is "infeasible".
- **profiling cost fraction** (feasible scenarios where the method chose a configuration):
  the trials' cost over the whole job's (trials plus the rest, as above); the median.

The JSON also records, per scenario and method, every trial, the final choice and its true
time, cost and objective against the optimum's, and the machine's load.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks._output import command_line, write_outputs
from smlt.backends.sim import STOP_MARGIN_S, SimPlatform
from smlt.client.plan import PlanResult, SimTrials, TaskProfile, plan_task
from smlt.optimizer.bayes import plan
from smlt.optimizer.goals import Budget, Deadline, Goal, Override
from smlt.optimizer.perf import Trial, Workload
from smlt.optimizer.problem import Decision, Probe, Problem, SearchSettings
from smlt.worker.sampler import GlobalBatchSampler

__all__ = [
    "GOALS",
    "METHODS",
    "MODELS",
    "WITHIN",
    "JobTruth",
    "Model",
    "Scenario",
    "coarse_grid",
    "job_truth",
    "main",
    "scenarios",
    "trials_to_within",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

WITHIN = 0.10
METHODS = ("smlt", "random", "grid")
DEFAULT_NOISE_SIGMA = 0.1


@dataclass(frozen=True)
class Model:
    """A synthetic task: what ``smlt plan`` would measure, plus the platform figures that
    depend on the model (activation memory per sample, how many Redis shards hold it)."""

    name: str
    num_params: int
    s_per_sample_1_vcpu: float
    num_samples: int
    batch_size: int
    epochs: int
    activation_mb_per_sample: float
    store_instances: int = 1
    optimizer_state_shards: int = 2

    def profile(self) -> TaskProfile:
        return TaskProfile(
            task=f"synthetic:{self.name}",
            num_params=self.num_params,
            num_samples=self.num_samples,
            s_per_sample_1_vcpu=self.s_per_sample_1_vcpu,
            optimizer_state_shards=self.optimizer_state_shards,
            profile_s=0.0,
        )

    def figures(self) -> dict[str, Any]:
        """What differs from Lambda's defaults in the sim platform for this model."""
        return {
            "activation_mb_per_sample": self.activation_mb_per_sample,
            "store_instances": self.store_instances,
        }


#: Seconds per sample on one vCPU (forward and backward) from ~6 flops per parameter per
#: sample (x tokens or pixels for convolutions and sequences) at a few GFLOP/s per vCPU.
MODELS: tuple[Model, ...] = (
    Model("mlp-1m", 1_000_000, 0.0004, 60_000, 256, 20, 0.05),
    Model("cnn-5m", 5_000_000, 0.05, 50_000, 256, 10, 2.0),
    Model("resnet18-11m", 11_000_000, 0.06, 50_000, 512, 5, 4.0),
    Model("resnet50-25m", 25_000_000, 0.6, 100_000, 512, 3, 12.0, store_instances=4),
    Model("transformer-60m", 60_000_000, 0.5, 200_000, 256, 1, 8.0, store_instances=8),
    Model("bert-base-110m", 110_000_000, 1.2, 100_000, 256, 1, 12.0, store_instances=8),
    Model("bert-large-340m", 340_000_000, 3.5, 50_000, 128, 1, 25.0, store_instances=16),
)


@dataclass(frozen=True)
class GoalSpec:
    """A goal relative to the platform's extremes: ``kind`` is ``deadline`` or ``budget``;
    ``of`` names the truth figure it multiplies (``fastest`` time, ``cheapest`` cost, or the
    cheapest configuration's time / the fastest configuration's cost: ``cheapest_time``,
    ``fastest_cost``)."""

    label: str
    kind: str
    of: str
    factor: float


#: Per model, the goals it is planned for (tight to loose, and out of reach).
GOALS: dict[str, tuple[GoalSpec, ...]] = {
    "mlp-1m": (
        GoalSpec("deadline tight", "deadline", "fastest", 1.3),
        GoalSpec("budget loose", "budget", "fastest_cost", 1.0),
        GoalSpec("deadline infeasible", "deadline", "fastest", 0.8),
    ),
    "cnn-5m": (
        GoalSpec("deadline medium", "deadline", "fastest", 2.0),
        GoalSpec("budget tight", "budget", "cheapest", 1.3),
        GoalSpec("deadline loose", "deadline", "cheapest_time", 1.1),
    ),
    "resnet18-11m": (
        GoalSpec("deadline tight", "deadline", "fastest", 1.3),
        GoalSpec("budget medium", "budget", "cheapest", 2.0),
        GoalSpec("budget infeasible", "budget", "cheapest", 0.8),
        GoalSpec("deadline loose", "deadline", "fastest", 4.0),
    ),
    "resnet50-25m": (
        GoalSpec("deadline medium", "deadline", "fastest", 2.0),
        GoalSpec("budget tight", "budget", "cheapest", 1.3),
        GoalSpec("deadline infeasible", "deadline", "fastest", 0.7),
    ),
    "transformer-60m": (
        GoalSpec("deadline tight", "deadline", "fastest", 1.3),
        GoalSpec("budget loose", "budget", "cheapest", 4.0),
        GoalSpec("budget medium", "budget", "cheapest", 2.0),
    ),
    "bert-base-110m": (
        GoalSpec("deadline medium", "deadline", "fastest", 2.0),
        GoalSpec("budget tight", "budget", "cheapest", 1.3),
        GoalSpec("budget infeasible", "budget", "cheapest", 0.6),
    ),
    "bert-large-340m": (
        GoalSpec("deadline tight", "deadline", "fastest", 1.3),
        GoalSpec("budget medium", "budget", "cheapest", 2.0),
        GoalSpec("deadline infeasible", "deadline", "fastest", 0.8),
    ),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    model: Model
    goal_spec: GoalSpec
    seed: int


def scenarios() -> list[Scenario]:
    """Every scenario, each with its own seed."""
    found: list[Scenario] = []
    for model in MODELS:
        for spec in GOALS[model.name]:
            name = f"{model.name} {spec.label}"
            found.append(Scenario(name, model, spec, seed=len(found)))
    return found


# -- the truth -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobTruth:
    """The whole job's noise-free wall time and cost at arrays of configurations."""

    workers: IntArray
    memory_mb: IntArray
    time_s: FloatArray
    cost_usd: FloatArray
    fits: npt.NDArray[np.bool_]

    def met(self, goal: Goal) -> npt.NDArray[np.bool_]:
        ok = [goal.met(t, c) for t, c in zip(self.time_s, self.cost_usd, strict=True)]
        return self.fits & np.array(ok, dtype=bool)

    def objective(self, goal: Goal) -> FloatArray:
        return self.cost_usd if goal.objective == "cost_usd" else self.time_s

    def at(self, workers: int, memory_mb: int) -> int:
        hits = np.flatnonzero((self.workers == workers) & (self.memory_mb == memory_mb))
        if not hits.size:
            raise KeyError(f"{workers} x {memory_mb} MB is not in the truth table")
        return int(hits[0])


def job_truth(
    platform: SimPlatform, workers: Any, memory_mb: Any, batch_size: int, iterations: int
) -> JobTruth:
    """``iterations`` iterations at each (workers, memory_mb), from a cold start, as
    :meth:`SimPlatform.trial` runs them without noise (same generations, same bills), in
    closed form: a noise-free iteration takes the same time every time, so every generation
    after the first trains the same number of iterations."""
    if platform.noise_sigma or platform.failure_rate:
        raise ValueError("the truth is the noise-free, failure-free platform")
    n_all = np.atleast_1d(np.asarray(workers, dtype=np.int64))
    m_all = np.atleast_1d(np.asarray(memory_mb, dtype=np.int64))
    time_s = np.zeros(n_all.shape)
    cost_usd = np.zeros(n_all.shape)
    fits = np.zeros(n_all.shape, dtype=bool)
    limit_s = platform.max_duration_s - STOP_MARGIN_S
    for i, (n, m) in enumerate(zip(n_all.tolist(), m_all.tolist(), strict=True)):
        fits[i] = platform.need_mb(n, batch_size) <= m
        if iterations <= 0:
            continue
        s = platform.iteration(n, m, batch_size).total_s
        gens: list[tuple[float, int]] = []  # (billed seconds of each invocation, how many)
        cold = platform.startup_s(n - 1, warm=False)  # the last rank of the burst
        k0 = _iterations_in(cold, s, limit_s, iterations)
        gens.append((cold + k0 * s, 1))
        rest = iterations - k0
        if rest:
            warm = platform.startup_s(0, warm=True)
            k = _iterations_in(warm, s, limit_s, rest)
            full, last = divmod(rest, k)
            gens.append((warm + k * s, full))
            if last:
                gens.append((warm + last * s, 1))
        time_s[i] = sum(at * count for at, count in gens)
        cost_usd[i] = sum(
            n * count * platform.pricing.cost_usd(m, at) for at, count in gens if count
        )
    return JobTruth(n_all, m_all, time_s, cost_usd, fits)


def _iterations_in(ready_s: float, s: float, limit_s: float, left: int) -> int:
    """Iterations a generation trains: while they end before the limit, at least one."""
    k = max(1, min(left, math.floor((limit_s - ready_s) / s)))
    while k < left and ready_s + (k + 1) * s <= limit_s:
        k += 1
    while k > 1 and ready_s + k * s > limit_s:
        k -= 1
    return k


def goal_for(spec: GoalSpec, truth: JobTruth) -> Goal:
    """The scenario's goal from the truth's extremes (configurations that fit)."""
    fits = np.flatnonzero(truth.fits)
    fastest = int(fits[np.argmin(truth.time_s[fits])])
    cheapest = int(fits[np.argmin(truth.cost_usd[fits])])
    base = {
        "fastest": truth.time_s[fastest],
        "cheapest_time": truth.time_s[cheapest],
        "cheapest": truth.cost_usd[cheapest],
        "fastest_cost": truth.cost_usd[fastest],
    }[spec.of]
    value = float(base * spec.factor)
    if spec.kind == "deadline":
        return Deadline(round(value, 1))
    return Budget(float(f"{value:.4g}"))


# -- the baselines -------------------------------------------------------------------------------


def coarse_grid(
    workers: IntArray, memory_mb: IntArray, worker_points: int = 4, memory_points: int = 3
) -> list[tuple[int, int]]:
    """``worker_points`` x ``memory_points`` configurations geometrically spaced over the
    grid's ranges and snapped to its values, cheapest per second (workers x memory) first."""
    n_values, m_values = np.unique(workers), np.unique(memory_mb)

    def spaced(values: IntArray, points: int) -> list[int]:
        targets = np.geomspace(values[0], values[-1], points)
        snapped = {int(values[np.argmin(np.abs(np.log(values / t)))]) for t in targets}
        return sorted(snapped)

    pairs = [
        (n, m) for n in spaced(n_values, worker_points) for m in spaced(m_values, memory_points)
    ]
    return sorted(pairs, key=lambda p: (p[0] * p[1], p[0]))


def random_configs(
    workers: IntArray, memory_mb: IntArray, count: int, seed: int
) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, 17])
    order = rng.permutation(workers.size)[:count]
    return [(int(workers[i]), int(memory_mb[i])) for i in order]


def measure_in_order(
    problem: Problem,
    measure: Callable[[Probe], Trial],
    configs: Sequence[tuple[int, int]],
    settings: SearchSettings,
) -> list[Trial]:
    """Measure ``configs`` in order as the search would (each trial trains, the problem
    advances), until they or the job's iterations run out."""
    trials: list[Trial] = []
    for workers, memory_mb in configs:
        if problem.workload.iterations == 0:
            break
        iterations = min(settings.trial_iterations, problem.workload.iterations)
        trial = measure(Probe(workers, memory_mb, iterations, problem.workload))
        trials.append(trial)
        problem = problem.advanced(trial)
    return trials


# -- judging -------------------------------------------------------------------------------------


def pick(problem: Problem, trials: Sequence[Trial], settings: SearchSettings) -> Decision:
    """The pick rule: what smlt would choose if it had to stop after ``trials``."""
    after = problem
    for trial in trials:
        after = after.advanced(trial)
    return plan(after, trials, replace(settings, max_trials=max(1, len(trials))))


def trials_to_within(
    problem: Problem,
    trials: Sequence[Trial],
    settings: SearchSettings,
    good: Callable[[Decision], bool],
) -> int | None:
    """The smallest k >= 1 whose pick (after the first k trials) is ``good``; None if none."""
    for k in range(1, len(trials) + 1):
        if good(pick(problem, trials[:k], settings)):
            return k
    return None


@dataclass
class Judge:
    """The truth of one scenario, and how a choice fares against it."""

    platform: SimPlatform  # noise-free
    problem: Problem
    truth: JobTruth
    optimum: int | None
    within: float = WITHIN
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def goal(self) -> Goal:
        return self.problem.goal

    @property
    def optimum_objective(self) -> float:
        assert self.optimum is not None
        return float(self.truth.objective(self.goal)[self.optimum])

    def config(self, workers: int, memory_mb: int) -> tuple[float, float, bool]:
        """(time_s, cost_usd, fits) of the whole job at one configuration."""
        w = self.problem.workload
        one = job_truth(self.platform, [workers], [memory_mb], w.batch_size, w.iterations)
        return float(one.time_s[0]), float(one.cost_usd[0]), bool(one.fits[0])

    def near_optimal(self, decision: Decision) -> bool:
        if self.optimum is None or decision.action == "infeasible":
            return False
        time_s, cost_usd, fits = self.config(decision.workers, decision.memory_mb)
        objective = cost_usd if self.goal.objective == "cost_usd" else time_s
        met = fits and self.goal.met(time_s, cost_usd)
        return met and objective <= (1 + self.within) * self.optimum_objective

    def final(self, decision: Decision, trials: Sequence[Trial]) -> dict[str, Any]:
        """The job as it would go: the trials, then the rest at the choice (noise-free)."""
        trials_s = sum(t.wall_s for t in trials)
        trials_usd = sum(t.cost_usd for t in trials)
        out: dict[str, Any] = {
            "action": decision.action,
            "workers": decision.workers,
            "memory_mb": decision.memory_mb,
            "reason": decision.reason,
            "predicted_time_s": decision.predicted.time_s,
            "predicted_cost_usd": decision.predicted.cost_usd,
            "trials": len(trials),
            "trials_s": trials_s,
            "trials_cost_usd": trials_usd,
        }
        if decision.action == "infeasible":
            return out
        done = sum(t.iterations for t in trials if t.ok)
        rest = max(0, self.problem.workload.iterations - done)
        w = self.problem.workload
        one = job_truth(self.platform, [decision.workers], [decision.memory_mb], w.batch_size, rest)
        time_s = trials_s + float(one.time_s[0])
        cost_usd = trials_usd + float(one.cost_usd[0])
        fits = bool(one.fits[0])
        objective = cost_usd if self.goal.objective == "cost_usd" else time_s
        out.update(
            {
                "true_time_s": time_s,
                "true_cost_usd": cost_usd,
                "fits": fits,
                "goal_met": fits and self.goal.met(time_s, cost_usd),
                "objective_over_optimum": (
                    objective / self.optimum_objective if self.optimum is not None else None
                ),
                "profiling_cost_fraction": trials_usd / cost_usd if cost_usd > 0 else None,
            }
        )
        return out


# -- one scenario --------------------------------------------------------------------------------


def _trial_from_dict(data: dict[str, Any]) -> Trial:
    return Trial(
        workers=data["workers"],
        memory_mb=data["memory_mb"],
        workload=Workload(**data["workload"]),
        outcome=data["outcome"],
        iterations=data["iterations"],
        wall_s=data["wall_s"],
        cost_usd=data["cost_usd"],
        s_per_iteration=data["s_per_iteration"],
        peak_memory_mb=data["peak_memory_mb"],
    )


def _trial_row(data: dict[str, Any]) -> dict[str, Any]:
    keys = ("workers", "memory_mb", "outcome", "s_per_iteration", "wall_s", "cost_usd", "grain")
    return {k: data[k] for k in keys}


def run_scenario(
    scenario: Scenario, noise_sigma: float, settings: SearchSettings
) -> dict[str, Any]:
    started = time.perf_counter()
    model = scenario.model
    profile = model.profile()
    quiet = SimPlatform(
        s_per_sample_1_vcpu=profile.s_per_sample_1_vcpu,
        num_params=profile.num_params,
        optimizer_state_shards=profile.optimizer_state_shards,
        seed=scenario.seed,
        **model.figures(),
    )
    batch = min(model.batch_size, model.num_samples)
    per_epoch = GlobalBatchSampler(model.num_samples, model.batch_size, scenario.seed)
    iterations = model.epochs * per_epoch.iterations_per_epoch

    # The grid and the truth first (the goal is set from the platform's extremes).
    from smlt.optimizer.space import SearchSpace

    space = SearchSpace(quiet.max_concurrency, quiet.min_memory_mb, quiet.max_memory_mb)
    grid_n, grid_m = space.candidates(Override(), batch)
    truth = job_truth(quiet, grid_n, grid_m, batch, iterations)
    goal = goal_for(scenario.goal_spec, truth)

    # smlt: exactly what `smlt plan` runs.
    smlt_real = time.perf_counter()
    result: PlanResult = plan_task(
        profile,
        epochs=model.epochs,
        batch_size=model.batch_size,
        goal=goal,
        seed=scenario.seed,
        settings=replace(settings, seed=scenario.seed),
        noise_sigma=noise_sigma,
        **model.figures(),
    )
    smlt_real = time.perf_counter() - smlt_real
    platform = result.platform
    if platform is None or replace(platform, noise_sigma=0.0) != quiet:
        raise AssertionError("the benchmark's truth is not the platform smlt plan used")
    smlt_trials = [_trial_from_dict(d) for d in result.trials]
    settings = replace(settings, seed=scenario.seed)
    # The problem as it was before the first trial (plan_task returns it after the last).
    done = sum(t.iterations for t in smlt_trials if t.ok)
    final = result.problem
    problem = replace(
        final,
        workload=final.workload.changed(iterations=final.workload.iterations + done),
        elapsed_s=0.0,
        spent_usd=0.0,
    )
    if problem.workload.iterations != iterations or problem.workload.batch_size != batch:
        raise AssertionError("plan_task planned another workload than the benchmark's truth")
    cand_n, cand_m = problem.space.candidates(problem.override, batch)
    if not (np.array_equal(cand_n, grid_n) and np.array_equal(cand_m, grid_m)):
        raise AssertionError("plan_task searched another grid than the benchmark's truth")

    met = truth.met(goal)
    optimum = None
    if met.any():
        feasible = np.flatnonzero(met)
        optimum = int(feasible[np.argmin(truth.objective(goal)[feasible])])
    judge = Judge(quiet, problem, truth, optimum)

    methods: dict[str, dict[str, Any]] = {}
    decision = result.decision
    mine = pick(problem, smlt_trials, settings) if smlt_trials else decision
    methods["smlt"] = {
        "trials_detail": [_trial_row(d) for d in result.trials],
        "final": judge.final(decision, smlt_trials),
        "pick_rule_agrees": (mine.action == "infeasible") == (decision.action == "infeasible")
        and (
            decision.action == "infeasible"
            or (mine.workers, mine.memory_mb) == (decision.workers, decision.memory_mb)
        ),
        "real_s": smlt_real,
    }
    trial_sets = {"smlt": smlt_trials}
    plans = {
        "random": random_configs(grid_n, grid_m, settings.max_trials, scenario.seed),
        "grid": coarse_grid(grid_n, grid_m),
    }
    for name, configs in plans.items():
        real = time.perf_counter()
        with SimTrials(platform, iterations_per_epoch=per_epoch.iterations_per_epoch) as measure:
            trials = measure_in_order(problem, measure, configs, settings)
            detail = [_trial_row(d) for d in measure.measured]
        chosen = pick(problem, trials, settings)
        trial_sets[name] = trials
        methods[name] = {
            "trials_detail": detail,
            "final": judge.final(chosen, trials),
            "real_s": time.perf_counter() - real,
        }
    for name, trials in trial_sets.items():
        methods[name]["trials_to_within_10pct"] = (
            trials_to_within(problem, trials, settings, judge.near_optimal)
            if optimum is not None
            else None
        )

    fits = np.flatnonzero(truth.fits)
    fastest = int(fits[np.argmin(truth.time_s[fits])])
    cheapest = int(fits[np.argmin(truth.cost_usd[fits])])

    def config(i: int) -> dict[str, Any]:
        return {
            "workers": int(truth.workers[i]),
            "memory_mb": int(truth.memory_mb[i]),
            "time_s": float(truth.time_s[i]),
            "cost_usd": float(truth.cost_usd[i]),
        }

    return {
        "name": scenario.name,
        "seed": scenario.seed,
        "model": {
            "name": model.name,
            "num_params": model.num_params,
            "s_per_sample_1_vcpu": model.s_per_sample_1_vcpu,
            "num_samples": model.num_samples,
            "batch_size": batch,
            "epochs": model.epochs,
            "iterations": iterations,
            **model.figures(),
        },
        "goal": goal.to_dict() | {"label": scenario.goal_spec.label},
        "feasible": optimum is not None,
        "grid": {
            "configurations": int(grid_n.size),
            "worker_counts": int(np.unique(grid_n).size),
            "max_workers": int(grid_n.max()),
            "memory_sizes": int(np.unique(grid_m).size),
            "fitting": int(truth.fits.sum()),
            "meeting_goal": int(met.sum()),
        },
        "optimum": None if optimum is None else config(optimum),
        "fastest": config(fastest),
        "cheapest": config(cheapest),
        "methods": methods,
        "real_s": time.perf_counter() - started,
    }


# -- aggregates ----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    """The median; None when it is infinite (most never got there) or there is nothing."""
    if not values:
        return None
    value = statistics.median(values)
    return None if math.isinf(value) else float(value)


def aggregate(rows: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
    feasible = [r for r in rows if r["feasible"]]
    infeasible = [r for r in rows if not r["feasible"]]
    m = [r["methods"][method] for r in feasible]
    reached = [x["trials_to_within_10pct"] for x in m]
    fractions = [
        x["final"]["profiling_cost_fraction"]
        for x in m
        if x["final"]["action"] != "infeasible"
        and x["final"]["profiling_cost_fraction"] is not None
    ]
    detected = [r["methods"][method]["final"]["action"] == "infeasible" for r in infeasible]
    return {
        "median_trials_to_within_10pct": _median(
            [math.inf if k is None else float(k) for k in reached]
        ),
        "feasible_goal_met_fraction": (
            sum(bool(x["final"].get("goal_met")) for x in m) / len(m) if m else None
        ),
        "infeasible_detected_fraction": sum(detected) / len(detected) if detected else None,
        "median_profiling_cost_fraction": _median(fractions),
        "reached_within_10pct_fraction": (
            sum(k is not None for k in reached) / len(reached) if reached else None
        ),
        "median_trials": statistics.median(
            len(r["methods"][method]["trials_detail"]) for r in rows
        ),
        "feasible_scenarios": len(feasible),
        "infeasible_scenarios": len(infeasible),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()
    settings = SearchSettings()
    chosen = [s for s in scenarios() if not args.only or any(o in s.name for o in args.only)]
    rows = []
    for scenario in chosen:
        row = run_scenario(scenario, args.noise, settings)
        rows.append(row)
        parts = []
        for name in METHODS:
            x = row["methods"][name]
            f = x["final"]
            ratio = f.get("objective_over_optimum")
            parts.append(
                f"{name}: k={x['trials_to_within_10pct']} n={len(x['trials_detail'])} "
                f"{f['action']} {f['workers']}x{f['memory_mb']} "
                f"met={f.get('goal_met')} ratio={'-' if ratio is None else f'{ratio:.2f}'}"
            )
        print(
            f"[{row['real_s']:5.1f} s] {row['name']} "
            f"({'feasible' if row['feasible'] else 'infeasible'}): " + " | ".join(parts),
            flush=True,
        )
    smlt = aggregate(rows, "smlt")
    return {
        "command": command_line("benchmarks.optimizer", args.argv),
        "scenarios": rows,
        **{
            k: smlt[k]
            for k in (
                "median_trials_to_within_10pct",
                "feasible_goal_met_fraction",
                "infeasible_detected_fraction",
                "median_profiling_cost_fraction",
            )
        },
        "smlt": smlt,
        "baselines": {name: aggregate(rows, name) for name in METHODS[1:]},
        "settings": {
            "noise_sigma": args.noise,
            "within": WITHIN,
            "max_trials": settings.max_trials,
            "trial_iterations": settings.trial_iterations,
            "ei_stop": settings.ei_stop,
            "confidence": settings.confidence,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": list(load_before),
            "load_after": list(os.getloadavg()),
        },
        "wall_s": time.perf_counter() - started,
    }


# -- output ----------------------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["scenarios"]
    cap = data["settings"]["max_trials"]
    colors = {"smlt": "tab:blue", "random": "tab:orange", "grid": "tab:green"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    x = np.arange(len(rows))
    width = 0.27
    for j, name in enumerate(METHODS):
        offset = (j - 1) * width
        ks = [r["methods"][name]["trials_to_within_10pct"] for r in rows]
        heights = [
            0 if not r["feasible"] else (cap + 1 if k is None else k)
            for r, k in zip(rows, ks, strict=True)
        ]
        bars = top.bar(x + offset, heights, width, color=colors[name], label=name)
        for bar, r, k in zip(bars, rows, ks, strict=True):
            if r["feasible"] and k is None:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
        ratios = []
        for r in rows:
            f = r["methods"][name]["final"]
            if not r["feasible"]:
                ratios.append(math.nan)
            elif f["action"] == "infeasible" or not f.get("goal_met"):
                ratios.append(math.nan)
            else:
                ratios.append(f["objective_over_optimum"])
        bottom.plot(x + offset, ratios, "o", color=colors[name], label=name)
        for i, r in enumerate(rows):
            f = r["methods"][name]["final"]
            if r["feasible"] and not f.get("goal_met"):
                bottom.plot([x[i] + offset], [0.95], "x", color=colors[name], markersize=9)
            if not r["feasible"]:
                mark = "^" if f["action"] == "infeasible" else "v"
                bottom.plot([x[i] + offset], [1.0], mark, color=colors[name], markersize=7)
    top.axhline(10, color="tab:red", ls="--", lw=1, label="issue bar (10)")
    top.set_ylabel(f"trials to within {WITHIN:.0%}\n(hatched: never, drawn at {cap + 1})")
    top.legend(fontsize=8, ncol=4)
    top.set_title(
        "smlt's optimizer vs random search and a coarse grid (same trials, same pick rule)",
        fontsize=10,
    )
    bottom.axhline(1 + WITHIN, color="tab:red", ls="--", lw=1)
    bottom.set_ylabel("final choice's objective / optimum\n(x: goal missed; ^ infeasible found)")
    bottom.set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    bottom.set_ylim(0.9, None)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE_SIGMA)
    parser.add_argument(
        "--only", action="append", default=[], help="run the scenarios whose name contains this"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = argv
    write_outputs(run(args), args.json, args.plot, plot)


if __name__ == "__main__":
    main()
