"""Hierarchical synchronization: scatter-reduce through the parameter store (DESIGN §3).

Worker ``r`` of ``n`` owns shard ``r`` of the flat float32 gradient. One step:

1. **UL-shard**: upload slice ``s`` of the local gradient to owner ``s`` for every ``s != r``
   (the own slice never leaves the worker).
2. **DL-shard + reduce**: wait for the ``n - 1`` slices of shard ``r`` and average them with the
   own slice.
3. **UL-aggr**: turn the mean into the new parameter shard (the owner's update hook: the
   optimizer step on shard ``r``) and publish it as version ``t + 1``.
4. **DL-grad**: gather the ``n`` shards of version ``t + 1`` into the full vector.

Per worker this moves ``G`` up and ``2(n-1)G/n`` down; the store carries ``(3n-2)G``
(platform-facts.md), against ``n^2 G`` for all-to-all and one aggregator's ``nG`` for the
centralized scheme.

Two things make it run close to its floor: uploads run on their own thread while the owner
downloads (a NIC is full duplex), and each worker sends its slices in rotated order (to ``r+1``
first), so every owner gets its first slice at once and reduces slices as they arrive instead of
after the slowest peer. Arrival order is not the summation order, though: slices are folded in the
fixed order ``r, r-1, r-2, ...`` (early arrivals wait their turn), which makes the sum, and so
every byte written for ``(t, s)``, independent of timing. A re-executed worker therefore writes
exactly what the first execution wrote, and duplicates are harmless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlt.sync import codec
from smlt.sync.exchange import Exchange, OrderedFold
from smlt.sync.keys import JobKeys
from smlt.sync.phases import PhaseTimes
from smlt.sync.shards import shard_slice
from smlt.sync.store import DEFAULT_PARAM_TTL_S, ParameterStore

__all__ = ["ScatterReduce", "ShardUpdate", "UpdateHook", "publish_params"]

# Announcements of parameter shards for one version all go to one stream on instance 0.
_PREADY_INSTANCE = 0


@dataclass(frozen=True)
class ShardUpdate:
    """What the owner publishes for version ``t + 1``: the parameter shard and, in the same
    round trip, any extra (key, frame) pairs such as its optimizer-state shard."""

    params: np.ndarray
    extra: Sequence[tuple[str, bytes]] = ()


UpdateHook = Callable[[int, int, np.ndarray], ShardUpdate]
"""``(t, shard, mean_gradient_shard) -> ShardUpdate``; without one the mean is published."""


def publish_params(
    store: ParameterStore,
    keys: JobKeys,
    t: int,
    params: np.ndarray,
    workers: int,
    *,
    ttl_s: int = DEFAULT_PARAM_TTL_S,
) -> None:
    """Write the whole parameter vector as version ``t`` (the driver does this before step 0,
    and after a re-scale), announcing every shard so workers can gather it."""
    for s in range(workers):
        sl = shard_slice(params.size, workers, s)
        frame = codec.encode(codec.FrameHeader("param", keys.job, t, s), params[sl])
        store.put(s, [(keys.param(t, s), frame)], ttl_s=ttl_s)
        _announce_param(store, keys, t, s, ttl_s)


def _announce_param(store: ParameterStore, keys: JobKeys, t: int, shard: int, ttl_s: int) -> None:
    # The value was written on shard's instance before this call returns, so announcing on
    # another instance afterwards cannot overtake it.
    store.announce(_PREADY_INSTANCE, keys.param_ready(t), shard, ttl_s=ttl_s)


class ScatterReduce(Exchange):
    """One worker's side of scatter-reduce. One step at a time per instance."""

    scheme = "scatter_reduce"

    def __init__(self, *args: Any, update: UpdateHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.update = update
        self.slices = [shard_slice(self.num_params, self.workers, s) for s in range(self.workers)]
        self._uploader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"smlt-ul-{self.rank}"
        )

    def close(self) -> None:
        self._uploader.shutdown(wait=True)

    def _step(
        self, t: int, grad: np.ndarray, out: np.ndarray | None, phases: PhaseTimes, started: float
    ) -> np.ndarray:
        uploads = self._uploader.submit(self._upload_slices, t, grad, started)
        try:
            published = self._already_published(t + 1)
            if published is None:
                mean = self._reduce_own_shard(t, grad)
                phases.dl_shard_s = time.monotonic() - started
                aggr_started = time.monotonic()
                result = self.update(t, self.rank, mean) if self.update else ShardUpdate(mean)
                self._publish_own_shard(t, result)
                phases.ul_aggr_s = time.monotonic() - aggr_started
                published = result.params
            gather_started = time.monotonic()
            full = self._gather(t + 1, published, out)
            phases.dl_grad_s = time.monotonic() - gather_started
        finally:
            # Never leave an upload running behind a failed step. If the step failed, its own
            # error is the one to report; an upload error surfaces only on an otherwise good step.
            upload_error = uploads.exception()
        if upload_error is not None:
            raise upload_error
        phases.ul_shard_s = uploads.result()
        return full

    def _already_published(self, version: int) -> np.ndarray | None:
        """Our shard of ``version`` if an earlier invocation of this rank already published it.

        A duplicate invocation (at-least-once platforms, or a retry racing a slow original)
        must not redo the owner's update: the optimizer state it would start from is gone, and
        the result is already in the store. It takes the published shard and only gathers.
        """
        key = self.keys.param(version, self.rank)
        frame = self.store.get(self.rank, key)
        if frame is None:
            return None
        return codec.decode(
            frame, codec.FrameHeader("param", self.keys.job, version, self.rank), key
        )

    def _upload_slices(self, t: int, grad: np.ndarray, started: float) -> float:
        n, r, job = self.workers, self.rank, self.keys.job
        for k in range(1, n):
            s = (r + k) % n
            self._send(
                s,
                self.keys.grad(t, s, r),
                codec.FrameHeader("grad", job, t, s, r),
                grad[self.slices[s]],
                ttl_s=self.grad_ttl_s,
                announce=(self.keys.grad_ready(t, s), r),
            )
        return time.monotonic() - started

    def _reduce_own_shard(self, t: int, grad: np.ndarray) -> np.ndarray:
        n, r, job = self.workers, self.rank, self.keys.job
        fold_order = [(r - k) % n for k in range(1, n)]  # the order slices usually arrive in
        fold = OrderedFold(np.array(grad[self.slices[r]], dtype=np.float32), fold_order)
        peers = self.store.announcements(
            r,
            self.keys.grad_ready(t, r),
            fold_order,
            timeout_s=self.timeout_s,
            what=f"owner {r} of {n} at iteration {t} waiting for gradient slices",
        )
        for peer in peers:
            key = self.keys.grad(t, r, peer)
            fold.add(peer, self._receive(r, key, codec.FrameHeader("grad", job, t, r, peer)))
        return fold.mean(n)

    def _publish_own_shard(self, t: int, result: ShardUpdate) -> None:
        r = self.rank
        params = np.ascontiguousarray(result.params, dtype=np.float32)
        size = self.slices[r].stop - self.slices[r].start
        if params.shape != (size,):
            raise ValueError(f"update hook returned shape {params.shape} for shard {r} of {size}")
        self._send(
            r,
            self.keys.param(t + 1, r),
            codec.FrameHeader("param", self.keys.job, t + 1, r),
            params,
            ttl_s=self.param_ttl_s,
            announce=None,
            extra=result.extra,
        )
        _announce_param(self.store, self.keys, t + 1, r, self.param_ttl_s)
        # Everything of step t stays one more step: a replacement for a worker that died during
        # step t restarts at t and needs version t and the slices of t; a duplicate owner racing
        # this one needs them too. What step t-1 wrote goes now, rather than holding (3n-2)G per
        # step until the TTL.
        stale = [self.keys.grad(t - 1, r, p) for p in range(self.workers) if p != r]
        stale += [self.keys.grad_ready(t - 1, r), self.keys.param(t - 1, r)]
        stale += [self.keys.optim(t - 1, r)]
        self.store.unlink(r, stale)
        if r == 0:
            self.store.unlink(_PREADY_INSTANCE, [self.keys.param_ready(t - 1)])

    def gather(self, version: int, out: np.ndarray | None = None) -> np.ndarray:
        """All ``n`` shards of ``version`` from the store (a worker's start, or a resume)."""
        return self._gather(version, None, out)

    def _gather(self, version: int, own: np.ndarray | None, out: np.ndarray | None) -> np.ndarray:
        full = out if out is not None else np.empty(self.num_params, dtype=np.float32)
        r, n, job = self.rank, self.workers, self.keys.job
        if own is not None:
            full[self.slices[r]] = own
        wanted = [(r + k) % n for k in range(0 if own is None else 1, n)]
        announced = self.store.announcements(
            _PREADY_INSTANCE,
            self.keys.param_ready(version),
            wanted,
            timeout_s=self.timeout_s,
            what=f"worker {r} of {n} gathering parameters v{version}",
        )
        for s in announced:
            key = self.keys.param(version, s)
            full[self.slices[s]] = self._receive(
                s, key, codec.FrameHeader("param", job, version, s)
            )
        return full
