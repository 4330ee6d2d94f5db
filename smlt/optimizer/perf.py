"""How long an iteration takes at (workers, memory): a physical form fitted to the trials.

The optimizer's Gaussian process does not start from nothing. An iteration of data-parallel
training on functions is a sum of parts whose shape is known from the physics (SMLT paper §3.2
and §3.3, platform-facts.md); only their sizes are unknown::

    s/iteration = compute_s  * B·P / (n · vCPU(m))      the batch's forward and backward
                + link_s     * G · (2(n-1) + 1 + S)/n   a worker's scatter-reduce traffic
                + store_s    * G · (3n - 2 + S)         everything through the store
                + request_s  * n                        a round trip per peer shard
                + fixed_s                               the rest (polling, bookkeeping)

with B the global batch, P the parameter count, G = 4P gradient bytes, S the optimizer-state
shards each owner publishes with its parameter shard (2 for Adam, 0 for plain SGD: what
:class:`Workload` calls ``optimizer_state_shards``), vCPU(m) = m / 1769 capped at 6. A
worker's traffic falls towards 2G as n grows when S > 1: its own shard, state included, shrinks
as 1/n. (The sim's platform takes the slower of the link and the store, ``max``; this form
adds them, which keeps it linear in its coefficients; where one dominates they agree.)

Each coefficient has a log-normal prior centred on a measured figure (600 Mbit/s per function,
0.4 GB/s through one Redis, ...). :func:`fit_performance` finds the maximum a posteriori
coefficients from the trials and keeps their Laplace covariance, so a prediction far from every
trial (64 workers after probing 2 and 4) carries the uncertainty of the terms that dominate
there: exactly the information Expected Improvement needs. The GP in :mod:`smlt.optimizer.bayes`
then models what this form misses (the residual).

Why a parametric prior at all: a plain GP over two dimensions needs a dozen trials before it
extrapolates, and the extrapolation it does is flat. The physical form extrapolates from one
trial (compute scales as 1/(n·vCPU)) and transfers to a changed batch size or model, which is
what :func:`~smlt.optimizer.bayes.replan` needs: observations made at batch 256 still say what
batch 1024 will do.

Memory is a constraint, not an objective, and is modelled apart (:mod:`smlt.optimizer.memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import least_squares

from smlt.errors import ConfigError
from smlt.optimizer.cost import vcpus

__all__ = [
    "TERMS",
    "PerfFit",
    "PerfPrior",
    "Trial",
    "Workload",
    "features",
    "fit_performance",
]

FloatArray = npt.NDArray[np.float64]

#: The parts of an iteration, in the order of :func:`features` and of the coefficients.
TERMS = ("compute_s", "link_s", "store_s", "request_s", "fixed_s")
BYTES_PER_GRADIENT = 4  # float32 gradients, whatever the forward precision


@dataclass(frozen=True)
class Workload:
    """What is being trained: the global batch, the model's size, the iterations still to run.

    A change of any of these is what :func:`~smlt.optimizer.bayes.replan` reacts to."""

    batch_size: int
    num_params: int
    iterations: int
    checkpoint_every: int | None = None
    #: Tensors of optimizer state per parameter that travel with each owner's shard (Adam: 2).
    optimizer_state_shards: int = 0

    def __post_init__(self) -> None:
        if self.optimizer_state_shards < 0:
            raise ConfigError(
                f"optimizer_state_shards must be >= 0, got {self.optimizer_state_shards}"
            )
        if self.batch_size < 1 or self.num_params < 1 or self.iterations < 0:
            raise ConfigError(
                f"a workload needs batch_size >= 1, num_params >= 1 and iterations >= 0, "
                f"got {self.batch_size}, {self.num_params}, {self.iterations}"
            )

    @property
    def gradient_bytes(self) -> int:
        return BYTES_PER_GRADIENT * self.num_params

    def same_shape(self, other: Workload) -> bool:
        """Same time per iteration expected: batch and model equal (iterations may differ)."""
        return (self.batch_size, self.num_params) == (other.batch_size, other.num_params)

    def changed(
        self,
        *,
        batch_size: int | None = None,
        num_params: int | None = None,
        iterations: int | None = None,
    ) -> Workload:
        return replace(
            self,
            batch_size=self.batch_size if batch_size is None else batch_size,
            num_params=self.num_params if num_params is None else num_params,
            iterations=self.iterations if iterations is None else iterations,
        )

    def to_dict(self) -> dict[str, int | None]:
        return {
            "batch_size": self.batch_size,
            "num_params": self.num_params,
            "iterations": self.iterations,
            "checkpoint_every": self.checkpoint_every,
            "optimizer_state_shards": self.optimizer_state_shards,
        }


Outcome = Literal["ok", "oom"]


@dataclass(frozen=True)
class Trial:
    """One measured configuration: real training iterations at (workers, memory).

    The caller measures; this library only reads. ``iterations`` were trained (profiling is
    training: they count towards the job), taking ``wall_s`` (start-up included) and costing
    ``cost_usd``. ``s_per_iteration`` is the steady-state time per iteration (None when the
    trial ran out of memory). ``peak_memory_mb``, when the worker reports it, sharpens the
    memory model; ``workload`` is what was trained when this was measured."""

    workers: int
    memory_mb: int
    workload: Workload
    outcome: Outcome
    iterations: int
    wall_s: float
    cost_usd: float
    s_per_iteration: float | None = None
    peak_memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.outcome == "ok" and not (self.s_per_iteration and self.s_per_iteration > 0):
            raise ConfigError(
                f"trial at {self.workers} x {self.memory_mb} MB ran but has no positive "
                f"s_per_iteration ({self.s_per_iteration})"
            )
        if self.outcome not in ("ok", "oom"):
            raise ConfigError(f"a trial's outcome is 'ok' or 'oom', got {self.outcome!r}")

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "memory_mb": self.memory_mb,
            "outcome": self.outcome,
            "iterations": self.iterations,
            "s_per_iteration": self.s_per_iteration,
            "wall_s": self.wall_s,
            "cost_usd": self.cost_usd,
            "peak_memory_mb": self.peak_memory_mb,
            "workload": self.workload.to_dict(),
        }


@dataclass(frozen=True)
class PerfPrior:
    """Prior centres and log-spreads of the coefficients, and of the memory model.

    The centres are measured figures (platform-facts.md): per-function bandwidth about
    600 Mbit/s, one Redis moves about 0.4 GB/s, loopback round trips well under 1 ms (a
    function to a managed store: about 1 ms). ``compute_s`` (seconds per sample per parameter
    at 1 vCPU) is the one that varies with the model by orders of magnitude (6 flops per
    parameter per sample for an MLP, thousands for a convolution or a long sequence): its prior
    is wide unless :meth:`calibrated` by timing the task once. A spread of 1 means a factor
    e = 2.7 either way is unsurprising."""

    compute_s: float = 3e-9
    compute_sigma: float = 2.5
    link_bytes_per_s: float = 75e6
    link_sigma: float = 0.7
    store_bytes_per_s: float = 0.4e9
    store_sigma: float = 1.0
    request_s: float = 2e-3
    request_sigma: float = 1.5
    fixed_s: float = 0.05
    fixed_sigma: float = 1.5
    #: Spread of log(s/iteration) between two trials of one configuration.
    noise_sigma: float = 0.1
    runtime_mb: float = 400.0
    runtime_sigma: float = 0.4
    bytes_per_param: float = 16.0  # fp32 weights, gradients and two Adam moments
    bytes_per_param_sigma: float = 0.5
    activation_mb_per_sample: float = 1.0
    activation_sigma: float = 2.0

    def centres(self) -> FloatArray:
        """log of the coefficient centres, in :data:`TERMS` order."""
        return np.log(
            [
                self.compute_s,
                1 / self.link_bytes_per_s,
                1 / self.store_bytes_per_s,
                self.request_s,
                self.fixed_s,
            ]
        )

    def sigmas(self) -> FloatArray:
        return np.array(
            [
                self.compute_sigma,
                self.link_sigma,
                self.store_sigma,
                self.request_sigma,
                self.fixed_sigma,
            ]
        )

    def calibrated(
        self, s_per_sample_1_vcpu: float, num_params: int, sigma: float = 0.3
    ) -> PerfPrior:
        """This prior with ``compute_s`` from one local timing: seconds per sample (forward
        and backward) on one vCPU. It lets a plan say before any worker runs whether a goal
        is in reach."""
        if s_per_sample_1_vcpu <= 0:
            raise ConfigError(f"a calibration must be positive, got {s_per_sample_1_vcpu} s")
        return replace(self, compute_s=s_per_sample_1_vcpu / num_params, compute_sigma=sigma)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def features(
    workers: Any, memory_mb: Any, batch_size: Any, num_params: Any, state_shards: Any = 0
) -> FloatArray:
    """The five terms' multipliers (see the module docstring), one row per configuration.

    Arguments broadcast: arrays of candidates against one workload, or one row per trial."""
    n = np.asarray(workers, dtype=float)
    m = np.asarray(memory_mb, dtype=float)
    b = np.asarray(batch_size, dtype=float)
    p = np.asarray(num_params, dtype=float)
    s = np.asarray(state_shards, dtype=float)
    n, m, b, p, s = np.broadcast_arrays(n, m, b, p, s)
    g = BYTES_PER_GRADIENT * p
    return np.stack(
        [
            b * p / (n * vcpus(m)),
            g * (2 * (n - 1) + 1 + s) / n,
            g * (3 * n - 2 + s),
            n,
            np.ones_like(n),
        ],
        axis=-1,
    )


@dataclass(frozen=True)
class PerfFit:
    """The fitted coefficients (log scale) and their covariance."""

    log_coefficients: FloatArray
    covariance: FloatArray
    trials_used: int

    def coefficients(self) -> dict[str, float]:
        return dict(zip(TERMS, np.exp(self.log_coefficients).tolist(), strict=True))

    def predict_log(
        self,
        workers: Any,
        memory_mb: Any,
        batch_size: Any,
        num_params: Any,
        state_shards: Any = 0,
    ) -> tuple[FloatArray, FloatArray]:
        """Mean and variance of log(s/iteration) from the parametric part alone.

        The variance is the delta method's: each term's share of the iteration times the
        uncertainty of its coefficient, so an extrapolation into a regime no trial saw (the
        store's traffic at 500 workers) is as uncertain as that term's coefficient is."""
        f = features(workers, memory_mb, batch_size, num_params, state_shards)
        parts = f * np.exp(self.log_coefficients)
        total = parts.sum(axis=-1)
        shares = parts / total[..., None]
        variance = np.einsum("...i,ij,...j->...", shares, self.covariance, shares)
        return np.log(total), np.maximum(variance, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "coefficients": self.coefficients(),
            "log_sd": dict(zip(TERMS, np.sqrt(np.diag(self.covariance)).tolist(), strict=True)),
            "trials_used": self.trials_used,
        }


def fit_performance(trials: tuple[Trial, ...] | list[Trial], prior: PerfPrior) -> PerfFit:
    """MAP coefficients given the trials that ran (log-normal noise, log-normal priors).

    Solved as a least-squares problem in log-coefficient space; the Laplace covariance is the
    inverse Gauss-Newton Hessian at the optimum. With no trial it returns the prior."""
    ran = [t for t in trials if t.ok and t.s_per_iteration]
    z0, sd = prior.centres(), prior.sigmas()
    if not ran:
        return PerfFit(z0, np.diag(sd**2), 0)
    f = features(
        [t.workers for t in ran],
        [t.memory_mb for t in ran],
        [t.workload.batch_size for t in ran],
        [t.workload.num_params for t in ran],
        [t.workload.optimizer_state_shards for t in ran],
    )
    y = np.log([t.s_per_iteration or math.nan for t in ran])
    noise = prior.noise_sigma

    def residuals(z: FloatArray) -> FloatArray:
        predicted = f @ np.exp(z)
        return np.concatenate([(y - np.log(predicted)) / noise, (z - z0) / sd])

    def jacobian(z: FloatArray) -> FloatArray:
        parts = f * np.exp(z)
        shares = parts / parts.sum(axis=1, keepdims=True)
        return np.vstack([-shares / noise, np.diag(1 / sd)])

    # Start where the compute term alone explains the fastest-looking trial: least squares
    # from the prior centre can be far off when the compute prior is wide.
    start = z0.copy()
    others = f[:, 1:] @ np.exp(z0[1:])
    gap = np.exp(y) - others
    if np.all(gap > 0):
        start[0] = float(np.median(np.log(gap / f[:, 0])))
    solution = least_squares(residuals, start, jac=jacobian, method="trf")
    j = jacobian(solution.x)
    covariance = np.asarray(np.linalg.pinv(j.T @ j), dtype=float)
    return PerfFit(solution.x, covariance, len(ran))
