"""Which samples worker r trains on at iteration t: a shard-aware order independent of n.

The promise: the global batch of iteration t is the same whatever the number of workers, so n
workers x B/n equal one worker x B. The cost we refuse to pay for it: that every worker reads
every shard of the data set every epoch (a global permutation cut into batches makes each
worker's slice of every batch a random draw from the whole set, so each worker downloads and
reads everything).

The order of epoch e, a pure function of (seed, e, the shard layout, B):

1. **Shards are permuted**, seeded by (seed, e).
2. **Samples are shuffled within windows** of :data:`WINDOW_SHARDS` consecutive shards of that
   permutation. The epoch's *order* is the concatenation of the shuffled windows.
3. **The order is cut into C contiguous streams** (C = :data:`STREAMS`, or B if smaller), stream
   c long enough for ``k_c`` samples per iteration (``k_c`` = the c-th part of B split C ways,
   the same arithmetic as the gradient's shards: :func:`smlt.sync.shards.shard_slice`).
4. **Global batch t** is, for c = 0..C-1, the next ``k_c`` samples of stream c, concatenated.
   The last batch of an epoch (N not divisible by B) takes the remainder split the same way.

Worker r of n takes the r-th contiguous slice of each global batch, exactly as before. Because
the batch is laid out stream by stream, that slice covers about C/n contiguous streams, so over
an epoch worker r reads about 1/n of the order (plus the streams it shares with a neighbour
when n does not divide C), and at any moment only the windows its streams are in: a few shards,
which it can prefetch (:meth:`GlobalBatchSampler.worker_shards`). Nothing in steps 1-4 depends on
n, so the global batch does not either; the split among workers is the only thing n changes,
and the gradient's mean over the global batch does not depend on the split.

**What the shuffle gives up.** A global batch is C runs of B/C consecutive samples of the
order, each run a uniform draw from one window (W shards). With one shard (small data sets,
every test) or a window covering the set, this is a uniform random partition into batches,
as good as a global permutation. With data whose shards are each homogeneous (say sorted by
label), a batch mixes at most C windows, i.e. C x W shards, instead of all of them;
``benchmarks/data.py`` measures the gap (total-variation distance of each batch's label
histogram to the data set's) against a global permutation and no shuffle at all.

Resuming mid-epoch and re-scaling need nothing: the order is recomputed from (seed, epoch)
wherever a worker starts, whatever n it starts with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smlt.errors import ConfigError
from smlt.sync.shards import shard_offsets, shard_slice

__all__ = [
    "STREAMS",
    "WINDOW_SHARDS",
    "GlobalBatchSampler",
    "global_batches",
    "iteration_seed",
]

#: C, the number of streams a global batch is drawn from. More streams mix more of the data set
#: into each batch; each worker reads about C/n streams at a time, so its working set grows with
#: C/n windows. 16 keeps a worker of 4 on 4 windows while a batch mixes 16.
STREAMS = 16
#: W, the shards whose samples are shuffled together (the window); a worker reading a stream
#: holds about one window of shards per stream.
WINDOW_SHARDS = 2
# Changing C, W or the rule changes every run's order: bump smlt.storage.artifacts'
# MANIFEST_FORMAT with it, so that a run packaged before is refused on resume.


class GlobalBatchSampler:
    """Deterministic global batches over a data set of ``shard_sizes`` samples per shard.

    ``shard_sizes`` are the manifest's per-shard sample counts in index order (shard i holds
    global indices ``[sum(sizes[:i]), sum(sizes[:i+1]))``); None means one shard of
    ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        *,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ConfigError("the training set is empty")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        sizes = np.asarray([num_samples] if shard_sizes is None else shard_sizes, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or (sizes < 1).any():
            raise ConfigError(f"shard sizes must be positive sample counts, got {shard_sizes!r}")
        if int(sizes.sum()) != num_samples:
            raise ConfigError(
                f"shard sizes add up to {int(sizes.sum())} samples, not the {num_samples} of the "
                "data set"
            )
        self.num_samples = num_samples
        self.batch_size = min(batch_size, num_samples)
        self.seed = seed
        self.iterations_per_epoch = -(-num_samples // self.batch_size)
        self.shard_sizes = sizes
        self.shard_starts = np.concatenate([[0], np.cumsum(sizes)])
        self.streams = min(STREAMS, self.batch_size)
        full, rest = divmod(num_samples, self.batch_size)
        self._full = full
        per_iteration = np.diff(shard_offsets(self.batch_size, self.streams))
        last = np.diff(shard_offsets(rest, self.streams))
        self._take = per_iteration  # k_c: samples stream c gives each full batch
        self._take_last = last  # what it gives the epoch's short last batch
        lengths = full * per_iteration + last
        self._stream_start = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._shard_of_order = np.empty(0, dtype=np.int32)
        # The orders of the two epochs used last: a plan that looks past an epoch's end, and the
        # iterations before it, alternate between two epochs without working either out again.
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- the order -----------------------------------------------------------------------------

    def epoch_of(self, t: int) -> int:
        return t // self.iterations_per_epoch

    def is_epoch_end(self, t: int) -> bool:
        """True if iteration ``t`` is the last of its epoch."""
        return (t + 1) % self.iterations_per_epoch == 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every sample index once, in the order epoch ``epoch`` lays its streams out."""
        self._use_epoch(epoch)
        return self._order

    def _use_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        if epoch not in self._orders:
            self._orders[epoch] = self._work_out(epoch)
            while len(self._orders) > 2:
                del self._orders[max(self._orders, key=lambda e: abs(e - epoch))]
        self._order, self._shard_of_order = self._orders[epoch]
        self._epoch = epoch

    def _work_out(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch ``epoch``'s order, and the shard of each of its positions."""
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(self.shard_sizes.size)
        pieces = []
        for first in range(0, shards.size, WINDOW_SHARDS):
            window = shards[first : first + WINDOW_SHARDS]
            samples = np.concatenate(
                [np.arange(self.shard_starts[s], self.shard_starts[s + 1]) for s in window]
            )
            pieces.append(rng.permutation(samples))
        order = np.concatenate(pieces)
        owner = np.repeat(np.arange(self.shard_sizes.size, dtype=np.int32), self.shard_sizes)
        return order, owner[order]

    def _positions(self, t: int) -> np.ndarray:
        """Where in the epoch's order the samples of global batch ``t`` sit, in batch order."""
        b = t % self.iterations_per_epoch
        if b < self._full:
            starts, takes = self._stream_start + b * self._take, self._take
        else:
            starts, takes = self._stream_start + self._full * self._take, self._take_last
        return np.concatenate(
            [np.arange(s, s + k, dtype=np.int64) for s, k in zip(starts, takes, strict=True)]
        )

    def global_batch(self, t: int) -> np.ndarray:
        """The sample indices of global batch ``t``, in the order workers slice it."""
        self._use_epoch(self.epoch_of(t))
        return self._order[self._positions(t)]

    def worker_indices(self, t: int, rank: int, workers: int) -> tuple[np.ndarray, int]:
        """Worker ``rank``'s sample indices at iteration ``t`` and the global batch size."""
        batch = self.global_batch(t)
        return batch[shard_slice(len(batch), workers, rank)], len(batch)

    def worker_shards(self, first: int, stop: int, rank: int, workers: int) -> list[int]:
        """The shards worker ``rank`` of ``workers`` reads in iterations ``[first, stop)``, in
        the order it first needs them: what its reader should fetch ahead."""
        seen: dict[int, None] = {}
        for t in range(first, stop):
            self._use_epoch(self.epoch_of(t))
            positions = self._positions(t)
            positions = positions[shard_slice(len(positions), workers, rank)]
            shards = self._shard_of_order[positions]
            _, firsts = np.unique(shards, return_index=True)
            for shard in shards[np.sort(firsts)]:
                seen.setdefault(int(shard), None)
        return list(seen)


def global_batches(
    num_samples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shard_sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """The sample indices of every global batch of ``epoch``, in order, exactly as
    ``smlt train --seed SEED --batch-size B`` trains on them, whatever the number of workers.

    ``shard_sizes`` is the packaged data set's shard layout (the manifest's per-shard sample
    counts, ``run.json``'s ``shard_sizes``); leave it out for a data set in one shard, which is
    any data set under ``--shard-mb`` (64 MiB by default).

    With :func:`iteration_seed`, this lets anyone replay an smlt run with a plain PyTorch loop
    (``tests/reference.py`` does, and the test suite holds smlt to it; the README has the
    loop, and a test runs it as printed there)::

        x, y = task.data()
        shards = result.data["shard_sizes"]
        torch.manual_seed(seed); model = task.model(); opt = task.optimizer(model)
        t = 0
        for epoch in range(epochs):
            for idx in smlt.global_batches(
                len(x), batch_size, seed=seed, epoch=epoch, shard_sizes=shards
            ):
                batch = task.transform((x[idx], y[idx]), epoch, smlt.SampleRandom(seed, epoch, idx))
                opt.zero_grad()
                torch.manual_seed(smlt.iteration_seed(seed, t))
                task.loss(model, batch).backward()
                opt.step()
                t += 1
    """
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    sampler = GlobalBatchSampler(num_samples, batch_size, seed, shard_sizes=shard_sizes)
    first = epoch * sampler.iterations_per_epoch
    return [sampler.global_batch(t) for t in range(first, first + sampler.iterations_per_epoch)]


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """What rank ``rank`` seeds torch's global generator with before ``loss()`` at ``iteration``.

    Randomness inside the loss (dropout) is therefore reproducible: a re-executed iteration
    draws the same masks, and one worker (rank 0) draws what a plain PyTorch loop seeded the same
    way draws. With n > 1 workers each rank draws its own masks for its slice of the batch, so
    a model with dropout matches the single-worker run only at n = 1.
    """
    return (seed * 1_000_003 + iteration) * 1009 + rank
