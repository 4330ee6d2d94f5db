"""The Bayesian optimizer over workers x memory (SMLT paper §3.2, DESIGN §5).

:func:`plan` is a pure function: a :class:`~smlt.optimizer.problem.Problem` and the trials so
far in, one :class:`~smlt.optimizer.problem.Decision` out: *probe* a configuration (train a
few real iterations there: profiling is training), *run* one (the search is over), or the goal
is *infeasible* (with the fastest time and the cheapest cost in reach). The caller measures and
calls again; :func:`search` is that loop for a caller that measures synchronously (the sim
backend, benchmarks, tests). :func:`replan` is :func:`plan` for a workload that changed.

How a decision is made
----------------------
- **Model.** log(s/iteration) = the physical form of :mod:`smlt.optimizer.perf` (MAP fit, with
  its Laplace uncertainty) + a GP on the residual. The GP is scikit-optimize's: an
  ``Optimizer(base_estimator=GP, acq_func="EI")`` over log2(workers) x log2(memory) is told the
  residuals and fits it. Its amplitude is bounded below: the physical form is an
  approximation, and a GP free to shrink its amplitude after three agreeing trials would claim
  certainty about 500 workers it never saw.
- **Objective.** The time or cost of the *rest* of the run, increasing in s/iteration, so its
  log is Gaussian to first order: the posterior skopt's ``gaussian_ei`` evaluates. EI is on
  the log, hence relative: 0.02 means "2 % better than the incumbent".
- **Constraints are probabilities**, never penalties in the objective (a huge value for a trial
  that ran out of memory would wreck the GP's fit all around it): P(fits in memory) from the
  memory model, P(meets the deadline or budget) from the same posterior of s/iteration. The
  acquisition is EI x P(feasible) (Gardner et al., ICML 2014); while no configuration is likely
  feasible it is P(feasible) alone.
- **Trial cost.** The acquisition is divided by the trial's predicted cost relative to the
  cheapest trial, to the power ``cost_exponent``: expected improvement per dollar of probing
  (as MLCD/HeterBO weigh profiling cost), so 2 x 1 GB is tried before 64 x 10 GB unless the big
  one is worth it.
- **Stop** when the best EI x P(feasible) is under ``ei_stop``, after ``max_trials``, or when
  the next trial would overrun ``trial_budget_usd``. The recommendation is the best *measured*
  configuration feasible with probability ``confidence``: the model proposes, a measurement
  decides. Without one (a new workload after :func:`replan`), the model's best is probed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from skopt import Optimizer
from skopt.acquisition import gaussian_ei
from skopt.learning import GaussianProcessRegressor
from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from skopt.space import Integer

from smlt.errors import CapacityError
from smlt.optimizer.cost import CostBreakdown
from smlt.optimizer.economics import RunEconomics
from smlt.optimizer.goals import Budget, Fastest, Override
from smlt.optimizer.memory import MemoryFit, fit_memory
from smlt.optimizer.perf import PerfFit, Trial, fit_performance
from smlt.optimizer.problem import (
    Action,
    Decision,
    Prediction,
    Probe,
    Problem,
    SearchResult,
    SearchSettings,
)

__all__ = ["SKOPT_SETTINGS", "plan", "replan", "residual_optimizer", "search"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: How the skopt Optimizer is built. EI explicitly: skopt's default is ``gp_hedge``.
#: Extra trials at most of a measured incumbent whose margin to the goal is within the noise.
MAX_REMEASURES = 2
SKOPT_SETTINGS: dict[str, Any] = {
    "acq_func": "EI",
    "acq_optimizer": "sampling",
    "n_initial_points": 1,
}
#: Residual GP: amplitude (log scale) between 0.1 and 0.7, i.e. model error between 10 % and a
#: factor 2 where no trial is near; measurement noise between 1 % and 30 %.
RESIDUAL_AMPLITUDE_BOUNDS = (0.1**2, 0.7**2)
RESIDUAL_NOISE_BOUNDS = (0.01**2, 0.3**2)
#: Extra residual noise of a trial measured under another workload: the physical form carries
#: it over, its residual only loosely.
TRANSFER_SIGMA = 0.2


# -- the posterior -------------------------------------------------------------------------------


def residual_optimizer(
    problem: Problem, trials: Sequence[Trial], perf: PerfFit, seed: int = 0, xi: float = 0.01
) -> Optimizer:
    """An skopt Optimizer told log(measured) - log(parametric) of every trial that ran; its
    last model is the residual GP (it has none before the first such trial)."""
    space = problem.space
    # Trials outside today's space (a cluster that shrank) still inform the parametric fit,
    # but skopt refuses points outside its dimensions.
    ran = [
        t
        for t in trials
        if t.ok
        and t.s_per_iteration
        and 1 <= t.workers <= max(2, space.max_workers)
        and space.min_memory_mb <= t.memory_mb <= max(space.min_memory_mb + 1, space.max_memory_mb)
    ]
    transfer = [0.0 if t.workload.same_shape(problem.workload) else TRANSFER_SIGMA**2 for t in ran]
    kernel = ConstantKernel(0.2**2, RESIDUAL_AMPLITUDE_BOUNDS) * Matern(
        length_scale=[0.3, 0.3], length_scale_bounds=(0.05, 3.0), nu=2.5
    ) + WhiteKernel(noise_level=0.05**2, noise_level_bounds=RESIDUAL_NOISE_BOUNDS)
    gp = GaussianProcessRegressor(
        kernel=kernel,
        alpha=np.asarray(transfer) + 1e-8 if ran else 1e-8,
        normalize_y=False,  # residuals are centred by construction; keep the amplitude prior
        noise="gaussian",  # skopt then predicts the latent function, without the noise
        n_restarts_optimizer=0,
        random_state=seed,
    )
    dimensions = [
        Integer(
            1,
            max(2, space.max_workers),
            prior="log-uniform",
            base=2,
            transform="normalize",
            name="workers",
        ),
        Integer(
            space.min_memory_mb,
            max(space.min_memory_mb + 1, space.max_memory_mb),
            prior="log-uniform",
            base=2,
            transform="normalize",
            name="memory_mb",
        ),
    ]
    optimizer = Optimizer(
        dimensions,
        base_estimator=gp,
        acq_func_kwargs={"xi": xi},
        acq_optimizer_kwargs={"n_points": 64},
        random_state=seed,
        **SKOPT_SETTINGS,
    )
    if ran:
        base, _ = perf.predict_log(
            [t.workers for t in ran],
            [t.memory_mb for t in ran],
            [t.workload.batch_size for t in ran],
            [t.workload.num_params for t in ran],
            [t.workload.optimizer_state_shards for t in ran],
        )
        residuals = np.log([t.s_per_iteration or math.nan for t in ran]) - base
        with warnings.catch_warnings():
            # A hyperparameter at its bound is the bound doing its job (see above).
            warnings.simplefilter("ignore")
            optimizer.tell([[t.workers, t.memory_mb] for t in ran], residuals.tolist())
    return optimizer


class _Posterior:
    """log(s/iteration) under the current workload (parametric fit + residual GP), and
    P(fits in memory)."""

    def __init__(self, problem: Problem, trials: Sequence[Trial], settings: SearchSettings):
        self.workload = problem.workload
        self.perf: PerfFit = fit_performance(list(trials), problem.prior)
        self.memory: MemoryFit = fit_memory(list(trials), problem.prior)
        self.optimizer = residual_optimizer(problem, trials, self.perf, settings.seed, settings.xi)

    def transform(self, workers: Any, memory_mb: Any) -> FloatArray:
        points = np.column_stack([workers, memory_mb]).astype(int).tolist()
        return np.asarray(self.optimizer.space.transform(points), dtype=float)

    def log_s(
        self, workers: Any, memory_mb: Any, measured: Any = False
    ) -> tuple[FloatArray, FloatArray]:
        """Mean and sd of log(s/iteration). Where ``measured`` (a trial of this workload ran
        there), the measurement, not the physical form's coefficients, says what an iteration
        takes: the residual GP interpolates it, and the form's coefficient uncertainty, which
        that measurement removed, is not added again (it would count the same doubt twice: a
        configuration measured without noise 7 % inside a deadline was not 90 % likely to
        meet it)."""
        w = self.workload
        mean, var = self.perf.predict_log(
            workers, memory_mb, w.batch_size, w.num_params, w.optimizer_state_shards
        )
        if self.optimizer.models:
            gp = self.optimizer.models[-1]
            residual, sd = gp.predict(self.transform(workers, memory_mb), return_std=True)
            var = np.where(measured, 0.0, var)
            mean, var = mean + residual, var + sd**2
        return mean, np.sqrt(var)

    def p_fits(self, workers: Any, memory_mb: Any) -> FloatArray:
        w = self.workload
        return self.memory.p_fits(workers, memory_mb, w.batch_size, w.num_params)


class _LogObjectiveModel:
    """The posterior of log(objective) at skopt-transformed points, in the shape skopt's
    acquisition functions call: ``predict(X, return_std=True)``."""

    def __init__(self, posterior: _Posterior, problem: Problem):
        self.posterior = posterior
        self.problem = problem

    def predict(self, x: Any, return_std: bool = False) -> Any:
        space = self.posterior.optimizer.space
        points = np.asarray(space.inverse_transform(np.asarray(x)), dtype=float)
        workers, memory_mb = points[:, 0], points[:, 1]
        mean_s, sd_s = self.posterior.log_s(workers, memory_mb)
        economics = RunEconomics(
            workers, memory_mb, max(self.problem.workload.iterations, 1), self.problem
        )
        mean, sd = economics.log_objective(mean_s, sd_s)
        return (mean, sd) if return_std else mean


# -- the decision --------------------------------------------------------------------------------


@dataclass
class _Grid:
    """Every candidate configuration with its forecast."""

    workers: IntArray
    memory_mb: IntArray
    measured: npt.NDArray[np.bool_]
    mean_log_s: FloatArray
    sd_log_s: FloatArray
    p_fits: FloatArray
    p_goal: FloatArray
    y_mean: FloatArray
    time_s: FloatArray
    cost_usd: FloatArray
    trial_usd: FloatArray
    confidence: float

    @property
    def p_feasible(self) -> FloatArray:
        return self.p_fits * self.p_goal


def plan(
    problem: Problem, trials: Sequence[Trial] = (), settings: SearchSettings | None = None
) -> Decision:
    """The next decision, from the problem and the trials so far. Pure: the same arguments
    give the same decision (the GP's restarts and the memory model's samples are seeded)."""
    settings = settings or SearchSettings()
    trials = tuple(trials)
    posterior = _Posterior(problem, trials, settings)
    grid = _forecast(problem, trials, posterior, settings)
    spent_on_trials = sum(t.cost_usd for t in trials)
    model = {"performance": posterior.perf.to_dict(), "candidates": int(grid.workers.size)}

    def decide(action: Action, i: int, reason: str, ei: float | None = None) -> Decision:
        fastest, cheapest = _extremes(grid)
        w = problem.workload
        need_mb = posterior.memory.expected_need_mb(
            int(grid.workers[i]), w.batch_size, w.num_params
        )
        return Decision(
            action=action,
            workers=int(grid.workers[i]),
            memory_mb=int(grid.memory_mb[i]),
            reason=reason,
            goal=problem.goal,
            predicted=_prediction(problem, grid, i),
            trials=len(trials),
            trials_cost_usd=spent_on_trials,
            expected_improvement=ei,
            fastest=None if fastest is None else _prediction(problem, grid, fastest),
            cheapest=None if cheapest is None else _prediction(problem, grid, cheapest),
            frontier=tuple(_prediction(problem, grid, j) for j in _frontier(grid)),
            model={**model, "memory_need_mb": need_mb},
        )

    if problem.override.fixed:
        return decide("run", 0, "workers and memory fixed by the user")

    feasible = grid.p_feasible
    believed = np.flatnonzero(feasible >= settings.confidence)
    untried = np.flatnonzero(~grid.measured & (grid.p_fits > 0))
    # The cap is per workload: after a replan the search starts over (the old trials still
    # inform the model).
    current = sum(t.workload.same_shape(problem.workload) for t in trials)
    capped = current >= settings.max_trials

    # Trials at a single worker count say nothing about how an iteration scales with workers:
    # the model's claims there are the physical form's extrapolation alone, which a platform
    # that form does not fit (traffic that shrinks as the optimizer state is sharded, say) gets
    # wrong by a factor. Before such a claim ends the search, measure another worker count.
    scaling = _scaling_probe(problem, trials, grid, untried, settings, current)

    def probe_scaling(why: str) -> Decision | None:
        if scaling is None or capped:
            return None
        if _over_trial_budget(settings, spent_on_trials, float(grid.trial_usd[scaling])):
            return None
        return decide("probe", scaling, f"{why}, but every trial ran at one worker count")

    def remeasure(i: int) -> Decision | None:
        """A measured incumbent believed to meet the goal with less margin than one trial's
        noise (the prior's ``noise_sigma``) is measured again before the run is committed to
        it, at most :data:`MAX_REMEASURES` more times: the GP, sure of its fitted noise level,
        would otherwise take one lucky trial at its word."""
        if capped or isinstance(problem.goal, Fastest):
            return None
        k = sum(
            1
            for t in trials
            if t.ok
            and t.workload.same_shape(problem.workload)
            and (t.workers, t.memory_mb) == (int(grid.workers[i]), int(grid.memory_mb[i]))
        )
        if not 1 <= k <= MAX_REMEASURES:
            return None
        noise = problem.prior.noise_sigma / math.sqrt(2 * k)  # one trial's, over k of them
        one = RunEconomics(
            grid.workers[i : i + 1],
            grid.memory_mb[i : i + 1],
            max(problem.workload.iterations, 1),
            problem,
        )
        sd = np.array([max(float(grid.sd_log_s[i]), noise)])
        p = float(one.p_goal(grid.mean_log_s[i : i + 1], sd)[0])
        if p >= settings.confidence:
            return None
        if _over_trial_budget(settings, spent_on_trials, float(grid.trial_usd[i])):
            return None
        return decide(
            "probe",
            i,
            f"measured again: its margin to the goal is within the trials' noise "
            f"(P = {p:.2f} after {k} trial{'s' if k > 1 else ''})",
        )

    if not believed.size:
        # Nothing is likely to meet the goal yet: look where it most probably can be met.
        likely = int(np.argmax(feasible))
        if feasible[likely] < settings.p_infeasible:
            reason = f"P(goal met) < {settings.p_infeasible:.0%} for every configuration"
            return probe_scaling(f"the model puts the goal out of reach ({reason})") or decide(
                "infeasible", _closest(problem, grid), reason
            )
        if capped or not untried.size:
            reason = f"no configuration met the goal in {current} trials"
            return decide("infeasible", _closest(problem, grid), reason)
        hopeful = int(
            untried[np.argmax(feasible[untried] * _weights(grid, untried, settings, current))]
        )
        if _over_trial_budget(settings, spent_on_trials, float(grid.trial_usd[hopeful])):
            reason = "the trial budget is spent before the goal was met"
            return decide("infeasible", _closest(problem, grid), reason)
        return decide("probe", hopeful, "the most likely to meet the goal per trial dollar")

    measured = believed[grid.measured[believed]]
    incumbent = int(measured[np.argmin(grid.y_mean[measured])]) if measured.size else None
    model_best = int(believed[np.argmin(grid.y_mean[believed])])
    y_opt = float(grid.y_mean[incumbent if incumbent is not None else model_best])
    top = 0.0
    pick: int | None = None
    if untried.size:
        x = posterior.transform(grid.workers[untried], grid.memory_mb[untried])
        ei = gaussian_ei(x, _LogObjectiveModel(posterior, problem), y_opt=y_opt, xi=settings.xi)
        ei = ei * feasible[untried]
        top = float(np.max(ei))
        pick = int(untried[np.argmax(ei * _weights(grid, untried, settings, current))])

    if incumbent is None:
        # Nothing measured under this workload (a replan): the model's best is worth a look.
        if capped or pick is None:
            return decide("run", model_best, "the model's best; not measured", top)
        if top < settings.ei_stop or _over_trial_budget(
            settings, spent_on_trials, float(grid.trial_usd[pick])
        ):
            return decide("probe", model_best, "the model's best, to be measured", top)
        return decide("probe", pick, "largest expected improvement per trial dollar", top)
    if pick is None:
        return decide("run", incumbent, "every candidate has been measured", top)
    if capped:
        return decide("run", incumbent, f"trial cap reached ({settings.max_trials})", top)
    if top < settings.ei_stop:
        reason = (
            f"no configuration is expected to improve on it by {settings.ei_stop:.0%} "
            f"(best expected improvement {top:.2%})"
        )
        return (
            probe_scaling("the model expects no improvement")
            or remeasure(incumbent)
            or decide("run", incumbent, reason, top)
        )
    if _over_trial_budget(settings, spent_on_trials, float(grid.trial_usd[pick])):
        return decide("run", incumbent, "the trial budget is spent", top)
    return decide("probe", pick, "largest expected improvement per trial dollar", top)


def replan(
    problem: Problem,
    trials: Sequence[Trial],
    *,
    batch_size: int | None = None,
    num_params: int | None = None,
    iterations: int | None = None,
    settings: SearchSettings | None = None,
) -> Decision:
    """A new decision for changed training dynamics, from the trials kept so far.

    The trials keep the workload they were measured under: the physical model carries them
    over to the new batch size or model (compute scales with B·P, traffic with P, memory with
    B/n), and the residual GP counts them as looser evidence. Nothing is measured under the
    new workload yet, so the decision is a probe of the model's best (or of a configuration
    worth more): the first generation after the change measures it."""
    workload = problem.workload.changed(
        batch_size=batch_size, num_params=num_params, iterations=iterations
    )
    return plan(replace(problem, workload=workload), trials, settings)


def search(
    problem: Problem,
    measure: Callable[[Probe], Trial],
    settings: SearchSettings | None = None,
    trials: Sequence[Trial] = (),
    advance: Callable[[Problem, Trial], Problem] = Problem.advanced,
) -> SearchResult:
    """Plan, measure, repeat until the decision is not a probe (or the job is done).

    ``trials`` are earlier observations to start from (after a :func:`replan`, say); the
    result lists them too, followed by the new ones. ``advance`` gives the problem after a
    trial: by default its iterations, time and money count towards the job (profiling is
    training); a caller whose trials are runs of their own passes another."""
    settings = settings or SearchSettings()
    seen = list(trials)
    while True:
        decision = plan(problem, seen, settings)
        if decision.action != "probe" or problem.workload.iterations == 0:
            return SearchResult(decision, tuple(seen), problem)
        iterations = min(settings.trial_iterations, problem.workload.iterations)
        trial = measure(Probe(decision.workers, decision.memory_mb, iterations, problem.workload))
        seen.append(trial)
        problem = advance(problem, trial)


# -- helpers -------------------------------------------------------------------------------------


def _forecast(
    problem: Problem, trials: Sequence[Trial], posterior: _Posterior, settings: SearchSettings
) -> _Grid:
    workers, memory = problem.space.candidates(problem.override, problem.workload.batch_size)
    if not workers.size:
        raise CapacityError(
            f"no configuration of the search space fits the platform's capacity "
            f"(override: {problem.override.to_dict()})"
        )
    current = [t for t in trials if t.workload.same_shape(problem.workload)]
    ran = {
        (t.workers, t.memory_mb)
        for t in current
        if t.ok and _allowed(problem.override, t.workers, t.memory_mb)
    }
    # A configuration measured under this workload joins the grid (a user's probe may be off
    # it), and one tried before is not proposed again, whether it ran or died.
    extra = sorted(ran - set(zip(workers.tolist(), memory.tolist(), strict=True)))
    if extra:
        workers = np.concatenate([workers, [w for w, _ in extra]]).astype(np.int64)
        memory = np.concatenate([memory, [m for _, m in extra]]).astype(np.int64)
    pairs = list(zip(workers.tolist(), memory.tolist(), strict=True))
    measured = np.array([p in ran for p in pairs], dtype=bool)
    died = {(t.workers, t.memory_mb) for t in current if not t.ok}
    n, m = workers.astype(float), memory.astype(float)
    mean, sd = posterior.log_s(n, m, measured)
    p_fits = posterior.p_fits(n, m)
    if died:
        p_fits = np.where([p in died and p not in ran for p in pairs], 0.0, p_fits)
    economics = RunEconomics(n, m, max(problem.workload.iterations, 1), problem)
    trial = RunEconomics(n, m, settings.trial_iterations, replace(problem, max_run_s=math.inf))
    s = np.exp(mean)
    return _Grid(
        workers=workers,
        memory_mb=memory,
        measured=measured,
        mean_log_s=mean,
        sd_log_s=sd,
        p_fits=p_fits,
        p_goal=economics.p_goal(mean, sd),
        y_mean=economics.log_objective(mean, sd)[0],
        time_s=economics.wall_s(s) + problem.elapsed_s,
        cost_usd=economics.cost_usd(s) + problem.spent_usd,
        trial_usd=trial.cost_usd(s),
        confidence=settings.confidence,
    )


def _allowed(override: Override, workers: int, memory_mb: int) -> bool:
    return override.workers in (None, workers) and override.memory_mb in (None, memory_mb)


def _weights(grid: _Grid, among: IntArray, settings: SearchSettings, done: int) -> FloatArray:
    """Each candidate's trial cost relative to the cheapest, to the power -gamma, where gamma
    cools from ``cost_exponent`` to 0 over ``max_trials`` (cost-cooling, Lee et al. 2020):
    early trials are cheap because early knowledge is cheap to get anywhere (the compute
    coefficient, the memory need); later ones go where the improvement is, or EI per dollar
    would creep towards an expensive optimum one cheap step at a time."""
    gamma = settings.cost_exponent * max(0.0, 1 - done / settings.max_trials)
    cheapest = max(float(np.min(grid.trial_usd[among])), 1e-12)
    return np.asarray((grid.trial_usd[among] / cheapest) ** -gamma, dtype=float)


def _prediction(problem: Problem, grid: _Grid, i: int) -> Prediction:
    s = float(np.exp(grid.mean_log_s[i]))
    economics = RunEconomics(
        grid.workers[i], grid.memory_mb[i], max(problem.workload.iterations, 1), problem
    )
    workers_usd, store_usd, requests_usd = (float(v[0]) for v in economics.breakdown(s))
    return Prediction(
        workers=int(grid.workers[i]),
        memory_mb=int(grid.memory_mb[i]),
        s_per_iteration=s,
        time_s=float(grid.time_s[i]),
        cost_usd=float(grid.cost_usd[i]),
        remaining_time_s=float(grid.time_s[i]) - problem.elapsed_s,
        breakdown=CostBreakdown(workers_usd, store_usd, requests_usd),
        p_fits=float(grid.p_fits[i]),
        p_goal=float(grid.p_goal[i]),
        measured=bool(grid.measured[i]),
    )


def _likely_fits(grid: _Grid) -> IntArray:
    """Candidates that fit in memory with the recommendation's confidence (failing that, more
    likely than not; failing that, all): what the fastest, cheapest and frontier are from."""
    for threshold in (grid.confidence, 0.5):
        fits = np.flatnonzero(grid.p_fits >= threshold)
        if fits.size:
            return fits
    return np.arange(grid.workers.size)


def _extremes(grid: _Grid) -> tuple[int | None, int | None]:
    """The fastest and the cheapest configuration that probably fit in memory."""
    fits = _likely_fits(grid)
    if not fits.size:
        return None, None
    return int(fits[np.argmin(grid.time_s[fits])]), int(fits[np.argmin(grid.cost_usd[fits])])


def _closest(problem: Problem, grid: _Grid) -> int:
    """For an infeasible goal, the configuration that misses it least."""
    fastest, cheapest = _extremes(grid)
    pick = cheapest if isinstance(problem.goal, Budget) else fastest
    return 0 if pick is None else pick


def _frontier(grid: _Grid, points: int = 24) -> list[int]:
    """The time-cost Pareto front (fastest first), thinned to at most ``points``."""
    fits = _likely_fits(grid)
    order = fits[np.lexsort((grid.cost_usd[fits], grid.time_s[fits]))]
    front: list[int] = []
    cheapest = math.inf
    for i in order:
        if grid.cost_usd[i] < cheapest:
            front.append(int(i))
            cheapest = float(grid.cost_usd[i])
    if len(front) > points:
        keep = np.unique(np.round(np.linspace(0, len(front) - 1, points)).astype(int))
        front = [front[k] for k in keep]
    return front


def _scaling_probe(
    problem: Problem,
    trials: Sequence[Trial],
    grid: _Grid,
    untried: IntArray,
    settings: SearchSettings,
    done: int,
) -> int | None:
    """While every trial of this workload that ran used one worker count (and the user left
    the count free), the configuration at another count to measure: the most likely to meet
    the goal per trial dollar, or, where the model gives every one next to no chance, the one
    it predicts closest to the goal (the fastest for a deadline or none, the cheapest for a
    budget). None once two counts have run, or when no other count probably fits."""
    counts = {t.workers for t in trials if t.ok and t.workload.same_shape(problem.workload)}
    if problem.override.workers is not None or len(counts) != 1:
        return None
    others = untried[~np.isin(grid.workers[untried], list(counts)) & (grid.p_fits[untried] >= 0.5)]
    if not others.size:
        return None
    chance = grid.p_feasible[others]
    if float(np.max(chance)) >= settings.p_infeasible:
        return int(others[np.argmax(chance * _weights(grid, others, settings, done))])
    closest = grid.cost_usd if isinstance(problem.goal, Budget) else grid.time_s
    return int(others[np.argmin(closest[others])])


def _over_trial_budget(settings: SearchSettings, spent_usd: float, next_usd: float) -> bool:
    budget = settings.trial_budget_usd
    return budget is not None and spent_usd + next_usd > budget
