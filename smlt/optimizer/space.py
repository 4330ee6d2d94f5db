"""The configurations the optimizer may choose among: workers x memory.

Both axes are stepped geometrically, not linearly, and the steps are what the model can tell
apart:

- **memory**: CPU comes with memory (1,769 MB per vCPU) and so does the price, so the effect of
  going from 1 GB to 1.1 GB is the effect of going from 8 GB to 8.8 GB: equal *ratios* matter,
  not equal megabytes. Steps of 2^(1/8) (9 %) from the backend's minimum to its maximum give 52
  sizes on Lambda (128 MB to 10,240 MB) instead of 10,113 one-megabyte ones, and cost at most
  half a step (about 4.5 %) against the best size between two steps. The GP sees log2(memory).
- **workers**: every count up to 32 (where one worker more is a large relative change), then
  steps of 2^(1/16) (4.4 %) up to the backend's concurrency, and never more workers than
  samples in a batch (a worker without a sample is billed for nothing).

A configuration the user fixed (:class:`~smlt.optimizer.goals.Override`) collapses its axis to
that one value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from smlt.errors import ConfigError
from smlt.optimizer.goals import Override

__all__ = ["SearchSpace", "memory_grid_mb", "worker_grid"]

IntArray = npt.NDArray[np.int64]

DEFAULT_MEMORY_RATIO = 2 ** (1 / 8)
DEFAULT_WORKERS_RATIO = 2 ** (1 / 16)
DEFAULT_DENSE_WORKERS = 32


def memory_grid_mb(
    min_mb: int, max_mb: int, *, step_mb: int = 1, ratio: float = DEFAULT_MEMORY_RATIO
) -> IntArray:
    """Memory sizes from ``min_mb`` to ``max_mb`` (both included), ``ratio`` apart, each a
    multiple of ``step_mb`` above ``min_mb``."""
    count = math.ceil(math.log(max_mb / min_mb) / math.log(ratio)) if max_mb > min_mb else 0
    raw = min_mb * ratio ** np.arange(count + 1)
    snapped = min_mb + np.round((raw - min_mb) / step_mb) * step_mb
    return np.unique(np.clip(np.append(snapped, max_mb), min_mb, max_mb).astype(np.int64))


def worker_grid(
    max_workers: int,
    *,
    ratio: float = DEFAULT_WORKERS_RATIO,
    dense_up_to: int = DEFAULT_DENSE_WORKERS,
) -> IntArray:
    """Worker counts: all up to ``dense_up_to``, then ``ratio`` apart, and ``max_workers``."""
    dense = np.arange(1, min(dense_up_to, max_workers) + 1)
    if max_workers <= dense_up_to:
        return dense.astype(np.int64)
    count = math.ceil(math.log(max_workers / dense_up_to) / math.log(ratio))
    sparse = np.round(dense_up_to * ratio ** np.arange(count + 1))
    counts = np.clip(np.concatenate([dense, sparse, [max_workers]]), 1, max_workers)
    return np.unique(counts).astype(np.int64)


@dataclass(frozen=True)
class SearchSpace:
    """Workers 1..``max_workers`` and memory ``min_memory_mb``..``max_memory_mb``.

    Build it from the backend's limits (``BackendLimits.max_concurrency``, ``min_memory_mb``,
    ``max_memory_mb``, ``memory_step_mb``). ``max_workers_at(memory_mb)``, when given, is how
    many workers of that size the platform holds at once (a Ray cluster's CPUs); a
    configuration over it is never proposed."""

    max_workers: int
    min_memory_mb: int
    max_memory_mb: int
    memory_step_mb: int = 1
    memory_ratio: float = DEFAULT_MEMORY_RATIO
    workers_ratio: float = DEFAULT_WORKERS_RATIO
    max_workers_at: Callable[[int], int] | None = None

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ConfigError(f"the search needs max_workers >= 1, got {self.max_workers}")
        if not 0 < self.min_memory_mb <= self.max_memory_mb:
            raise ConfigError(
                f"the search needs 0 < min_memory_mb <= max_memory_mb, got "
                f"{self.min_memory_mb}..{self.max_memory_mb}"
            )
        if self.memory_ratio <= 1 or self.workers_ratio <= 1 or self.memory_step_mb < 1:
            raise ConfigError("grid ratios must be > 1 and the memory step >= 1 MB")

    def check(self, override: Override) -> None:
        """Refuse an override outside the backend's range, naming the flag."""
        if override.workers is not None and not 1 <= override.workers <= self.max_workers:
            raise ConfigError(
                f"--workers {override.workers} is outside this backend's range "
                f"[1, {self.max_workers}]"
            )
        if override.memory_mb is not None and not (
            self.min_memory_mb <= override.memory_mb <= self.max_memory_mb
        ):
            raise ConfigError(
                f"--memory-mb {override.memory_mb} is outside this backend's range "
                f"[{self.min_memory_mb}, {self.max_memory_mb}] MB"
            )

    def candidates(self, override: Override, batch_size: int) -> tuple[IntArray, IntArray]:
        """Every configuration to consider, as two flat arrays (workers, memory_mb)."""
        self.check(override)
        if override.workers is not None:
            workers = np.array([override.workers], dtype=np.int64)
        else:
            workers = worker_grid(
                max(1, min(self.max_workers, batch_size)), ratio=self.workers_ratio
            )
        if override.memory_mb is not None:
            memory = np.array([override.memory_mb], dtype=np.int64)
        else:
            memory = memory_grid_mb(
                self.min_memory_mb,
                self.max_memory_mb,
                step_mb=self.memory_step_mb,
                ratio=self.memory_ratio,
            )
        n, m = (a.ravel() for a in np.meshgrid(workers, memory, indexing="ij"))
        if self.max_workers_at is not None:
            room = {int(mb): self.max_workers_at(int(mb)) for mb in np.unique(m)}
            keep = np.array([w <= room[int(mb)] for w, mb in zip(n, m, strict=True)], dtype=bool)
            n, m = n[keep], m[keep]
        return n.astype(np.int64), m.astype(np.int64)
