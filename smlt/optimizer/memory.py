"""Will a configuration fit in memory? A probability, from the trials that ran and died.

A worker needs ``runtime + bytes_per_param · P + activation · B/n`` MB: the Python and torch
runtime, the model's parameters, gradients and optimizer state, and the activations of its
share of the batch. Trials that ran bound that from above, trials that ran out of memory bound
it from below, a reported peak pins it. The probability that a configuration fits is the
posterior mass of the coefficients under which it does, so it is a *constraint* the optimizer
multiplies in, never a penalty in the objective. Where a trial already decides (fewer samples
per worker and more memory than one that ran; more samples and less memory than one that
died) the answer is exact: 1 or 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import log_ndtr

from smlt.optimizer.perf import PerfPrior, Trial

__all__ = ["MEMORY_SAMPLES", "MEMORY_TOLERANCE", "MemoryFit", "fit_memory"]

FloatArray = npt.NDArray[np.float64]
MB = 2**20

#: Log-scale tolerance of the memory evidence: a worker may die a little below its limit, and a
#: reported peak is one sample of a noisy quantity.
MEMORY_TOLERANCE = 0.05
MEMORY_SAMPLES = 6000


@dataclass(frozen=True)
class MemoryFit:
    """Posterior samples of the memory model, and the trials that decide configurations
    exactly."""

    runtime_mb: FloatArray
    mb_per_param: FloatArray
    mb_per_sample: FloatArray
    weights: FloatArray
    #: (samples per worker, num_params, memory_mb) of trials that ran / ran out of memory.
    ran: tuple[tuple[float, int, int], ...] = field(default=())
    died: tuple[tuple[float, int, int], ...] = field(default=())

    def p_fits(self, workers: Any, memory_mb: Any, batch_size: int, num_params: int) -> FloatArray:
        """Probability that ``workers`` x ``memory_mb`` does not run out of memory."""
        n = np.asarray(workers, dtype=float)
        m = np.asarray(memory_mb, dtype=float)
        n, m = np.broadcast_arrays(n, m)
        per_worker = batch_size / n
        p = np.empty(n.shape)
        base = self.runtime_mb + self.mb_per_param * num_params
        for u in np.unique(per_worker):
            need = base + self.mb_per_sample * u
            order = np.argsort(need)
            cumulative = np.cumsum(self.weights[order])
            at = per_worker == u
            index = np.searchsorted(need[order], m[at], side="right")
            p[at] = np.where(index > 0, cumulative[np.maximum(index - 1, 0)], 0.0)
        # What a trial decides is certain: fewer samples per worker and more memory than a
        # trial that ran fits; more samples and less memory than one that died does not.
        for samples, params, limit in self.ran:
            if params == num_params:
                p[(per_worker <= samples + 1e-9) & (m >= limit)] = 1.0
        for samples, params, limit in self.died:
            if params == num_params:
                p[(per_worker >= samples - 1e-9) & (m <= limit)] = 0.0
        return np.clip(p, 0.0, 1.0)

    def expected_need_mb(self, workers: int, batch_size: int, num_params: int) -> float:
        need = (
            self.runtime_mb
            + self.mb_per_param * num_params
            + self.mb_per_sample * batch_size / workers
        )
        return float(np.sum(self.weights * need))


def fit_memory(trials: tuple[Trial, ...] | list[Trial], prior: PerfPrior) -> MemoryFit:
    """Weight prior samples of (runtime, bytes per parameter, MB per sample) by the trials.

    Importance sampling from the prior is enough here: three coefficients, a few dozen trials
    at most, and a fixed seed keeps :func:`~smlt.optimizer.bayes.plan` a pure function."""
    rng = np.random.default_rng(0)
    size = MEMORY_SAMPLES
    runtime = prior.runtime_mb * np.exp(prior.runtime_sigma * rng.standard_normal(size))
    per_param = (
        prior.bytes_per_param / MB * np.exp(prior.bytes_per_param_sigma * rng.standard_normal(size))
    )
    per_sample = prior.activation_mb_per_sample * np.exp(
        prior.activation_sigma * rng.standard_normal(size)
    )
    log_w = np.zeros(size)
    ran: list[tuple[float, int, int]] = []
    died: list[tuple[float, int, int]] = []
    tol = MEMORY_TOLERANCE
    for t in trials:
        u = t.workload.batch_size / t.workers
        need = runtime + per_param * t.workload.num_params + per_sample * u
        gap = (np.log(t.memory_mb) - np.log(need)) / tol
        if t.ok:
            ran.append((u, t.workload.num_params, t.memory_mb))
            log_w += _log_ndtr(gap)
            if t.peak_memory_mb:
                log_w += -0.5 * ((np.log(t.peak_memory_mb) - np.log(need)) / tol) ** 2
        else:
            died.append((u, t.workload.num_params, t.memory_mb))
            log_w += _log_ndtr(-gap)
    w = np.exp(log_w - log_w.max())
    return MemoryFit(runtime, per_param, per_sample, w / w.sum(), tuple(ran), tuple(died))


def _log_ndtr(x: FloatArray) -> FloatArray:
    return np.asarray(log_ndtr(x), dtype=float)
