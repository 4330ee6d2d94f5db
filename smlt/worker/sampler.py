"""Which samples worker r trains on at iteration t.

The global batch of iteration t is the same whatever the number of workers: a permutation of the
training set seeded by (seed, epoch), cut into batches of B (the last batch of an epoch may be
shorter). Worker r of n takes the r-th contiguous slice of it, with the same shard arithmetic as
the gradient (:func:`smlt.sync.shards.shard_slice`), so the union over workers is exactly the
global batch. That is what makes n workers x B/n equal one worker x B.
"""

from __future__ import annotations

import numpy as np

from smlt.errors import ConfigError
from smlt.sync.shards import shard_slice

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler:
    """Deterministic global batches over ``num_samples`` samples."""

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ConfigError("the training set is empty")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = min(batch_size, num_samples)
        self.seed = seed
        self.iterations_per_epoch = -(-num_samples // self.batch_size)
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def epoch_of(self, t: int) -> int:
        return t // self.iterations_per_epoch

    def is_epoch_end(self, t: int) -> bool:
        """True if iteration ``t`` is the last of its epoch."""
        return (t + 1) % self.iterations_per_epoch == 0

    def global_batch(self, t: int) -> np.ndarray:
        epoch, b = divmod(t, self.iterations_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_samples)
            self._epoch = epoch
        return self._perm[b * self.batch_size : (b + 1) * self.batch_size]

    def worker_indices(self, t: int, rank: int, workers: int) -> tuple[np.ndarray, int]:
        """Worker ``rank``'s sample indices at iteration ``t`` and the global batch size."""
        batch = self.global_batch(t)
        return batch[shard_slice(len(batch), workers, rank)], len(batch)
