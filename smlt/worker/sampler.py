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

__all__ = ["GlobalBatchSampler", "global_batches", "iteration_seed"]


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


def global_batches(num_samples: int, batch_size: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """The sample indices of every global batch of ``epoch``, in order, exactly as
    ``smlt train --seed SEED --batch-size B`` trains on them, whatever the number of workers.

    With :func:`iteration_seed`, this lets anyone replay an smlt run with a plain PyTorch loop
    (``tests/reference.py`` does, and the test suite holds smlt to it; the README has the
    loop, and a test runs it as printed there)::

        x, y = task.data()
        torch.manual_seed(seed); model = task.model(); opt = task.optimizer(model)
        t = 0
        for epoch in range(epochs):
            for idx in smlt.global_batches(len(x), batch_size, seed=seed, epoch=epoch):
                opt.zero_grad()
                torch.manual_seed(smlt.iteration_seed(seed, t))
                task.loss(model, (x[idx], y[idx])).backward()
                opt.step()
                t += 1
    """
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    sampler = GlobalBatchSampler(num_samples, batch_size, seed)
    first = epoch * sampler.iterations_per_epoch
    return [
        sampler.global_batch(t).copy() for t in range(first, first + sampler.iterations_per_epoch)
    ]


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """What rank ``rank`` seeds torch's global generator with before ``loss()`` at ``iteration``.

    Randomness inside the loss (dropout) is therefore reproducible: a re-executed iteration
    draws the same masks, and one worker (rank 0) draws what a plain PyTorch loop seeded the same
    way draws. With n > 1 workers each rank draws its own masks for its slice of the batch, so
    a model with dropout matches the single-worker run only at n = 1.
    """
    return (seed * 1_000_003 + iteration) * 1009 + rank
