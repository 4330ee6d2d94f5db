"""The comparison points of the communication benchmark, on the same store and harness.

- :class:`Centralized` (Siren-like): every worker uploads its whole gradient to one aggregator,
  which downloads all ``n``, uploads the mean, and everyone downloads it. The aggregator's link
  carries ``nG`` down and its work is serial: the scheme's time grows linearly with ``n``.
- :class:`AllToAll` (Cirrus / LambdaML AllReduce-like): every worker uploads its gradient once
  and downloads all ``n - 1`` others. No aggregator, but ``(n-1)G`` down per worker and ``n^2 G``
  through the store.

Both fold contributions in rank order, so they produce the same mean as scatter-reduce up to
float rounding, and the benchmark compares like with like. They are baselines, not products:
no update hook, no sharded optimizer state.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from smlt.sync import codec
from smlt.sync.exchange import Exchange, OrderedFold
from smlt.sync.phases import PhaseTimes

__all__ = ["AGGREGATOR_RANK", "AllToAll", "Centralized"]

AGGREGATOR_RANK = 0


def _into(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """``values`` copied into ``out`` if given, else ``values`` itself."""
    if out is None:
        return values
    np.copyto(out, values)
    return out


class Centralized(Exchange):
    """Siren-like: one aggregator (rank 0) reduces everything."""

    scheme = "centralized"

    def _step(
        self,
        t: int,
        grad: np.ndarray,
        out: np.ndarray | None,
        phases: PhaseTimes,
        started: float,
        side: Any = None,
    ) -> np.ndarray:
        n, r, job, keys = self.workers, self.rank, self.keys.job, self.keys
        agg = AGGREGATOR_RANK
        if r != agg:
            self._send(
                agg,
                keys.full_grad(t, r),
                codec.FrameHeader("full", job, t, -1, r),
                grad,
                ttl_s=self.grad_ttl_s,
                announce=(keys.full_ready(t), r),
            )
            phases.ul_shard_s = time.monotonic() - started
        else:
            fold = OrderedFold(grad.copy(), [p for p in range(n) if p != agg])
            arrivals = self.store.announcements(
                agg,
                keys.full_ready(t),
                [p for p in range(n) if p != agg],
                timeout_s=self.timeout_s,
                what=f"aggregator at iteration {t} waiting for gradients",
            )
            for peer in arrivals:
                key = keys.full_grad(t, peer)
                fold.add(peer, self._receive(agg, key, codec.FrameHeader("full", job, t, -1, peer)))
            mean = fold.mean(n)
            phases.dl_shard_s = time.monotonic() - started
            aggr_started = time.monotonic()
            self._send(
                agg,
                keys.mean(t),
                codec.FrameHeader("mean", job, t, -1),
                mean,
                ttl_s=self.grad_ttl_s,
                announce=(keys.mean_ready(t), agg),
            )
            phases.ul_aggr_s = time.monotonic() - aggr_started
            # Everyone has read mean(t-1): they sent gradients of step t after reading it.
            stale = [keys.full_grad(t, p) for p in range(n) if p != agg]
            self.store.unlink(
                agg, [*stale, keys.full_ready(t), keys.mean(t - 1), keys.mean_ready(t - 1)]
            )
            return _into(out, mean)
        for _ in self.store.announcements(
            agg,
            keys.mean_ready(t),
            [agg],
            timeout_s=self.timeout_s,
            what=f"worker {r} at iteration {t} waiting for the aggregator's mean",
        ):
            pass
        got_mean = time.monotonic()
        mean = self._receive(agg, keys.mean(t), codec.FrameHeader("mean", job, t, -1))
        phases.dl_grad_s = time.monotonic() - got_mean
        return _into(out, mean)


class AllToAll(Exchange):
    """Cirrus / LambdaML AllReduce-like: every worker reads every gradient."""

    scheme = "all_to_all"

    def _step(
        self,
        t: int,
        grad: np.ndarray,
        out: np.ndarray | None,
        phases: PhaseTimes,
        started: float,
        side: Any = None,
    ) -> np.ndarray:
        n, r, job, keys = self.workers, self.rank, self.keys.job, self.keys
        # Each gradient lives on its writer's instance; the announcements on instance 0.
        self._send(
            r,
            keys.full_grad(t, r),
            codec.FrameHeader("full", job, t, -1, r),
            grad,
            ttl_s=self.grad_ttl_s,
            announce=None,
        )
        self.store.announce(0, keys.full_ready(t), r, ttl_s=self.grad_ttl_s)
        phases.ul_shard_s = time.monotonic() - started
        dl_started = time.monotonic()
        # Every worker must end with the same bytes, so all fold in global rank order.
        fold = OrderedFold(_into(out, np.zeros(self.num_params, np.float32)), range(n))
        fold.add(r, grad)
        arrivals = self.store.announcements(
            0,
            keys.full_ready(t),
            [p for p in range(n) if p != r],
            timeout_s=self.timeout_s,
            what=f"worker {r} at iteration {t} waiting for gradients",
        )
        for peer in arrivals:
            key = keys.full_grad(t, peer)
            fold.add(peer, self._receive(peer, key, codec.FrameHeader("full", job, t, -1, peer)))
        phases.dl_shard_s = time.monotonic() - dl_started
        # Every peer has finished step t - 1 (it sent its gradient of step t): drop ours of t - 1.
        self.store.unlink(r, [keys.full_grad(t - 1, r)])
        if r == 0:
            self.store.unlink(0, [keys.full_ready(t - 1)])
        return fold.mean(n)
