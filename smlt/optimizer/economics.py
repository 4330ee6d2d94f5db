"""Wall time and cost of the rest of a run, as functions of seconds per iteration.

Given how long an iteration takes at a configuration, everything a goal is about follows:
the wall time (iterations, plus a start-up per generation) and the bill (workers and store by
the second, fees per invocation, object-store requests per checkpoint). Both are increasing in
s/iteration, so a deadline or a budget is a *largest admissible s/iteration* per configuration,
and the probability of meeting the goal is the probability that the model's s/iteration is
under it. The optimizer uses these for whole grids at once (numpy arrays); ``smlt plan`` can use
them for one fixed configuration.

The driver's own time (:attr:`~smlt.optimizer.problem.Problem.driver_s`) is wall time that
nothing is billed for: the workers have not started or have ended, and the store is billed for
the scheduler's time, as the scheduler's bill counts it. A new generation every ``max_run_s`` is
counted continuously (a fraction of a start-up), which keeps both functions monotone and
invertible; the error is at most one start-up."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr

from smlt.optimizer.goals import Budget, Deadline
from smlt.optimizer.problem import Problem

__all__ = ["GETS_PER_INVOCATION", "PUTS_PER_CHECKPOINT", "RunEconomics"]

FloatArray = npt.NDArray[np.float64]

#: Object-store requests per worker: two shards (parameters, optimizer state) per checkpoint,
#: one read of the task's artifact per invocation.
PUTS_PER_CHECKPOINT = 2
GETS_PER_INVOCATION = 1


class RunEconomics:
    """Time and money of ``iterations`` more iterations at arrays of (workers, memory_mb)."""

    def __init__(self, workers: Any, memory_mb: Any, iterations: float, problem: Problem):
        self.workers = np.atleast_1d(np.asarray(workers, dtype=float))
        self.memory_mb = np.atleast_1d(np.asarray(memory_mb, dtype=float))
        self.iterations = float(iterations)
        self.problem = problem
        costs, objects = problem.costs, problem.costs.objects
        self.usd_per_s = np.asarray(costs.usd_per_s(self.workers, self.memory_mb), dtype=float)
        # Fees paid per generation (an invocation and an artifact read per worker) and once.
        self.usd_per_generation = self.workers * (
            costs.functions.requests_usd(1) + GETS_PER_INVOCATION * objects.usd_per_get
        )
        every = problem.workload.checkpoint_every
        checkpoints = math.ceil(self.iterations / every) if every else 0
        self.usd_once = self.workers * PUTS_PER_CHECKPOINT * checkpoints * objects.usd_per_put

    def generations(self, s_per_iteration: Any) -> FloatArray:
        return np.maximum(1.0, self.iterations * s_per_iteration / self.problem.max_run_s)

    def wall_s(self, s_per_iteration: Any) -> FloatArray:
        t = np.asarray(s_per_iteration, dtype=float)
        wall = self.iterations * t + self.problem.startup_s * self.generations(t)
        wall = wall + self.problem.driver_s
        return np.broadcast_to(wall, self.workers.shape).astype(float)

    def breakdown(self, s_per_iteration: Any) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(workers, store, requests) USD; their sum is :meth:`cost_usd`."""
        costs = self.problem.costs
        wall = self.wall_s(s_per_iteration)
        billed = wall - self.problem.driver_s  # nothing is billed while the driver works alone
        workers_usd = self.workers * costs.functions.usd_per_worker_s(self.memory_mb) * billed
        store_usd = costs.store_usd_per_s * billed
        requests_usd = self.usd_per_generation * self.generations(s_per_iteration)
        requests_usd = requests_usd + self.usd_once
        shape = self.workers.shape
        return (
            np.broadcast_to(workers_usd, shape).astype(float),
            np.broadcast_to(store_usd, shape).astype(float),
            np.broadcast_to(requests_usd, shape).astype(float),
        )

    def cost_usd(self, s_per_iteration: Any) -> FloatArray:
        workers_usd, store_usd, requests_usd = self.breakdown(s_per_iteration)
        return workers_usd + store_usd + requests_usd

    def objective(self, s_per_iteration: Any) -> FloatArray:
        """What the goal minimises: cost for a deadline, wall time otherwise."""
        if self.problem.goal.objective == "cost_usd":
            return self.cost_usd(s_per_iteration)
        return self.wall_s(s_per_iteration)

    def s_within_wall(self, wall_s: float) -> FloatArray:
        """The largest s/iteration whose wall time is at most ``wall_s`` (0: none)."""
        startup, run, n = self.problem.startup_s, self.problem.max_run_s, self.iterations
        wall_s -= self.problem.driver_s
        one = (wall_s - startup) / n
        many = wall_s / (n * (1 + startup / run))
        t = one if n * one <= run else many
        return np.full(self.workers.shape, max(t, 0.0))

    def s_within_cost(self, cost_usd: float) -> FloatArray:
        """The largest s/iteration whose cost is at most ``cost_usd`` (0: none)."""
        startup, run, n = self.problem.startup_s, self.problem.max_run_s, self.iterations
        a, f, c0 = self.usd_per_s, self.usd_per_generation, self.usd_once
        with np.errstate(divide="ignore", invalid="ignore"):
            one = (cost_usd - c0 - f - a * startup) / (a * n)
            many = (cost_usd - c0) / (n * (a * (1 + startup / run) + f / run))
        return np.maximum(np.where(n * one <= run, one, many), 0.0)

    def p_goal(self, mean_log_s: FloatArray, sd_log_s: FloatArray) -> FloatArray:
        """P(the goal's constraint holds for the whole run), given log(s/iteration) ~
        N(mean, sd²)."""
        goal, problem = self.problem.goal, self.problem
        if isinstance(goal, Deadline):
            limit = self.s_within_wall(goal.time_s - problem.elapsed_s)
        elif isinstance(goal, Budget):
            limit = self.s_within_cost(goal.cost_usd - problem.spent_usd)
        else:
            return np.ones_like(mean_log_s)
        with np.errstate(divide="ignore"):
            z = (np.log(np.maximum(limit, 1e-300)) - mean_log_s) / np.maximum(sd_log_s, 1e-9)
        return np.where(limit > 0, ndtr(z), 0.0)

    def log_objective(
        self, mean_log_s: FloatArray, sd_log_s: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Mean and sd of log(objective), to first order in log(s/iteration): the objective
        is smooth and increasing in s/iteration, so its log is Gaussian to first order with
        the objective's elasticity as the slope."""
        eps = 1e-3
        low = np.log(self.objective(np.exp(mean_log_s - eps)))
        high = np.log(self.objective(np.exp(mean_log_s + eps)))
        elasticity = (high - low) / (2 * eps)
        return (low + high) / 2, np.abs(elasticity) * sd_log_s
