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
centralized scheme. A stateful optimizer adds its state: each owner also writes its state
shard with every new parameter shard (``2G/n`` for Adam's two moments), so that whoever runs
the next step, a replacement included, resumes from it exactly.

Two things make it run close to its floor: uploads run on their own thread while the owner
downloads (a NIC is full duplex), and each worker sends its slices in rotated order (to ``r+1``
first), so every owner gets its first slice at once and reduces slices as they arrive instead of
after the slowest peer. Arrival order is not the summation order, though: slices are folded in the
fixed order ``r, r-1, r-2, ...`` (early arrivals wait their turn), which makes the sum, and so
every byte written for ``(t, s)``, independent of timing. A re-executed worker therefore writes
exactly what the first execution wrote, and duplicates are harmless.

Whoever comes to run step t (first invocation, replacement, duplicate) continues from what the
store holds: if this rank's shard of version t + 1 is already published, the step does not redo
the owner's work but adopts the published shard (:attr:`ScatterReduce.adopted` says so, and the
caller then loads the optimizer state of t + 1 published beside it).

Optimizers that are not elementwise cannot be sharded; for them :meth:`ScatterReduce.allreduce`
runs the same exchange but publishes the *mean gradient* shards (``mgrad``), every worker gathers
the whole mean and steps the full optimizer, and each owner then publishes its parameter shard
of t + 1 with :meth:`ScatterReduce.publish`, so that the parameter keys always hold parameters.

A task that clips its gradient by global norm needs one more, tiny, exchange inside the owner's
update: :meth:`ScatterReduce.share_norms` publishes the owner's few gradient norms of step t and
reads every other owner's, in shard order (see :mod:`smlt.worker.clipping`).

Hooks for fault injection (``on_phase(phase, t)``) mark the points where a worker can die:
``during-upload``, ``after-upload`` (on the upload thread), ``before-announce``,
``after-publish`` and ``during-gather``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlt.errors import CodecError
from smlt.sync import codec
from smlt.sync.exchange import UPLOAD_THREAD, Exchange, OrderedFold
from smlt.sync.keys import JobKeys
from smlt.sync.phases import PhaseTimes
from smlt.sync.shards import shard_slice
from smlt.sync.store import DEFAULT_PARAM_TTL_S, ParameterStore

__all__ = [
    "CombineHook",
    "PhaseHook",
    "ScatterReduce",
    "ShardUpdate",
    "UpdateHook",
    "publish_params",
]

# Announcements of parameter shards for one version all go to one stream on instance 0, and
# so do those of mean-gradient shards.
_READY_INSTANCE = 0


@dataclass(frozen=True)
class ShardUpdate:
    """What the owner publishes for version ``t + 1``: the parameter shard, its side value, and
    in the same round trip (written first) extra (key, frame) pairs such as its optimizer-state
    shard."""

    params: np.ndarray
    extra: Sequence[tuple[str, bytes]] = ()
    side: Any = None


UpdateHook = Callable[[int, int, np.ndarray, Sequence[Any]], ShardUpdate]
"""``(t, shard, mean_gradient_shard, sides_by_rank) -> ShardUpdate``; without one the mean is
published as it is."""

CombineHook = Callable[[Sequence[Any]], Any]
"""``(sides_by_rank) -> side``: what an owner publishes with a mean-gradient shard."""

PhaseHook = Callable[[str, int], None]
"""``(phase, t)``: called at the points where a worker may fail (fault injection)."""


def publish_params(
    store: ParameterStore,
    keys: JobKeys,
    t: int,
    params: np.ndarray,
    workers: int,
    *,
    side: Any = None,
    ttl_s: int = DEFAULT_PARAM_TTL_S,
) -> None:
    """Write the whole parameter vector as version ``t`` (the driver does this before step 0,
    and after a re-scale), announcing every shard so workers can gather it. ``side`` goes with
    every shard."""
    for s in range(workers):
        sl = shard_slice(params.size, workers, s)
        frame = codec.encode(codec.FrameHeader("param", keys.job, t, s), params[sl], side)
        store.put(s, [(keys.param(t, s), frame)], ttl_s=ttl_s)
        _announce(store, keys.param_ready(t), s, ttl_s)


def _announce(store: ParameterStore, stream: str, shard: int, ttl_s: int) -> None:
    # The value was written on shard's instance before this call returns, so announcing on
    # another instance afterwards cannot overtake it.
    store.announce(_READY_INSTANCE, stream, shard, ttl_s=ttl_s)


def _no_phase(phase: str, t: int) -> None:
    return None


class ScatterReduce(Exchange):
    """One worker's side of scatter-reduce. One step at a time per instance."""

    scheme = "scatter_reduce"

    def __init__(
        self,
        *args: Any,
        update: UpdateHook | None = None,
        combine: CombineHook | None = None,
        on_phase: PhaseHook | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.update = update
        self.combine = combine
        self.on_phase: PhaseHook = on_phase or _no_phase
        self.slices = [shard_slice(self.num_params, self.workers, s) for s in range(self.workers)]
        #: True if the last step found this rank's shard of t + 1 already published and took it.
        self.adopted = False
        #: Side values of the frames the last gather read, by shard.
        self.gathered_sides: dict[int, Any] = {}
        #: The combined side the last :meth:`allreduce` published or read.
        self.combined_side: Any = None
        self._uploader = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{UPLOAD_THREAD}-{self.rank}"
        )
        self._uploads: Future[float] | None = None
        self._norm_s = 0.0  # this step's time in share_norms (inside the update hook)

    def close(self) -> None:
        self._uploader.shutdown(wait=True)

    def _check_uploads(self) -> None:
        """Raise our own upload's error while we wait for peers: a worker whose upload failed
        would otherwise wait for shards that its failure holds back, until the timeout."""
        uploads = self._uploads
        if uploads is not None and uploads.done():
            error = uploads.exception()
            if error is not None:
                raise error

    # -- sharded: the owner applies the optimizer to its shard ---------------------------------

    def _step(
        self,
        t: int,
        grad: np.ndarray,
        out: np.ndarray | None,
        phases: PhaseTimes,
        started: float,
        side: Any,
    ) -> np.ndarray:
        with self._uploading(t, grad, started, side, phases):
            published = self.published_shard(t + 1)
            self.adopted = published is not None
            if published is not None:
                # The invocation that wrote it may have died before announcing it: announce
                # again (peers skip a repeated announcement), or they would wait forever.
                self.reannounce(t + 1)
            else:
                mean, sides = self._reduce_own_shard(t, grad, side)
                phases.dl_shard_s = time.monotonic() - started
                aggr_started = time.monotonic()
                cpu_before = self._cpu["main"]
                self._norm_s = 0.0
                result = (
                    self.update(t, self.rank, mean, sides) if self.update else ShardUpdate(mean)
                )
                hook_cpu_s = self._cpu["main"] - cpu_before  # encoding inside the hook
                # The norm exchange is communication, not the optimizer's time.
                phases.norm_s = self._norm_s
                phases.update_s = time.monotonic() - aggr_started - hook_cpu_s - self._norm_s
                self._publish_param(t + 1, result)
                phases.ul_aggr_s = time.monotonic() - aggr_started
                self.on_phase("after-publish", t)
                published = codec.Frame(result.params, result.side)
            gather_started = time.monotonic()
            full = self._gather(t + 1, published, out, t)
            phases.dl_grad_s = time.monotonic() - gather_started
        return full

    @contextlib.contextmanager
    def _uploading(
        self, t: int, grad: np.ndarray, started: float, side: Any, phases: PhaseTimes
    ) -> Iterator[None]:
        """Upload our slices on the upload thread while the body runs (a NIC is full duplex).

        Never leaves an upload running behind a failed body: if the body failed, its own error
        is the one to report; an upload's error surfaces only after an otherwise good body."""
        uploads = self._uploader.submit(self._upload_slices, t, grad, started, side)
        self._uploads = uploads
        try:
            yield
        finally:
            upload_error = uploads.exception()
        if upload_error is not None:
            raise upload_error
        phases.ul_shard_s = uploads.result()

    def reannounce(self, version: int) -> None:
        """Announce our parameter shard of ``version`` (again): announcing is idempotent, and
        a shard found published must be announced in case its writer died just before."""
        _announce(self.store, self.keys.param_ready(version), self.rank, self.param_ttl_s)

    def published_shard(self, version: int) -> codec.Frame | None:
        """This rank's parameter shard of ``version`` if some invocation of this rank already
        published it (a replacement, a duplicate, or a resume finds it so).

        Such an invocation must not redo the owner's update: the optimizer state it would start
        from is stale, and the result is already in the store. It takes the published shard.
        """
        key = self.keys.param(version, self.rank)
        frame = self.store.get(self.rank, key)
        if frame is None:
            return None
        return codec.decode_frame(
            frame, codec.FrameHeader("param", self.keys.job, version, self.rank), key
        )

    def share_norms(self, t: int, norms: np.ndarray) -> list[np.ndarray]:
        """Every owner's gradient norms of step ``t``, by shard: ours (``norms``, float32) are
        written and announced, the others' read as they are announced. Call it from the update
        hook, between the reduce and the optimizer step; every owner does, so nobody waits for
        an owner that is not on its way.

        Like every write here it is deterministic: a re-executed owner writes the same bytes and
        announces again (peers skip a repetition). An owner whose parameter shard of t + 1 is
        published (adopted rather than recomputed) wrote its norms before it, so whoever still
        waits for them finds them.
        """
        began = time.monotonic()
        r, job = self.rank, self.keys.job
        stream = self.keys.grad_norm_ready(t)
        mine = np.ascontiguousarray(norms, dtype=np.float32)
        self._send(
            r,
            self.keys.grad_norm(t, r),
            codec.FrameHeader("gnorm", job, t, r),
            mine,
            ttl_s=self.grad_ttl_s,
            announce=None,
        )
        _announce(self.store, stream, r, self.grad_ttl_s)
        out: list[np.ndarray] = [mine] * self.workers
        for s, got in self._collect(
            stream,
            lambda s: (self.keys.grad_norm(t, s), codec.FrameHeader("gnorm", job, t, s)),
            skip=r,
            what=f"owner {r} of {self.workers} waiting for the gradient norms of step {t}",
            sized=False,
        ):
            out[s] = np.array(got.array)
        self._norm_s += time.monotonic() - began
        return out

    # -- replicated: owners publish the mean gradient, everyone steps the full optimizer -------

    def allreduce(
        self, t: int, grad: np.ndarray, out: np.ndarray | None = None, side: Any = None
    ) -> np.ndarray:
        """The mean gradient of step ``t`` over all workers, whole, in ``out``.

        Owner r reduces shard r as in :meth:`step` and publishes it as ``mgrad(t, r)`` with the
        ``combine`` hook's side (read back afterwards from :attr:`combined_side`). Call
        :meth:`publish` with the new parameters once the optimizer has stepped.
        """
        phases, started = self._begin(grad)
        with self._uploading(t, grad, started, side, phases):
            key = self.keys.mean_grad(t, self.rank)
            header = codec.FrameHeader("mgrad", self.keys.job, t, self.rank)
            frame = self.store.get(self.rank, key)
            if frame is not None:  # a duplicate or replacement: the mean is already there
                own = codec.decode_frame(frame, header, key)
                # Its writer may have died before announcing it (peers skip a repetition).
                _announce(self.store, self.keys.mean_grad_ready(t), self.rank, self.grad_ttl_s)
            else:
                mean, sides = self._reduce_own_shard(t, grad, side)
                phases.dl_shard_s = time.monotonic() - started
                combined = self.combine(sides) if self.combine else None
                self._send(
                    self.rank,
                    key,
                    header,
                    mean,
                    ttl_s=self.grad_ttl_s,
                    announce=None,
                    side=combined,
                )
                self.on_phase("before-announce", t)
                _announce(self.store, self.keys.mean_grad_ready(t), self.rank, self.grad_ttl_s)
                own = codec.Frame(mean, combined)
            self.combined_side = own.side
            gather_started = time.monotonic()
            full = out if out is not None else np.empty(self.num_params, dtype=np.float32)
            full[self.slices[self.rank]] = own.array
            first = True
            for s, got in self._collect(
                self.keys.mean_grad_ready(t),
                lambda s: (
                    self.keys.mean_grad(t, s),
                    codec.FrameHeader("mgrad", self.keys.job, t, s),
                ),
                skip=self.rank,
                what=f"worker {self.rank} of {self.workers} gathering the mean of step {t}",
            ):
                full[self.slices[s]] = got.array
                if first:
                    first = False
                    self.on_phase("during-gather", t)
            phases.dl_grad_s = time.monotonic() - gather_started
        self._end(phases, started)
        return full

    def publish(self, version: int, update: ShardUpdate, *, update_s: float = 0.0) -> None:
        """Publish this owner's parameter shard of ``version`` after a replicated step whose
        optimizer update took ``update_s`` (counted in the step's phases)."""
        began = time.monotonic()
        cpu_before = self._cpu["main"]
        self._publish_param(version, update)
        phases = self.last_phases
        phases.ul_aggr_s = time.monotonic() - began
        phases.update_s = update_s
        phases.codec_s += self._cpu["main"] - cpu_before
        phases.total_s += phases.ul_aggr_s + update_s
        phases.bytes_up = self._bytes_up
        self.on_phase("after-publish", version - 1)

    # -- shared moves --------------------------------------------------------------------------

    def _upload_slices(self, t: int, grad: np.ndarray, started: float, side: Any) -> float:
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
                side=side,
            )
            if k == 1:
                self.on_phase("during-upload", t)
        self.on_phase("after-upload", t)
        return time.monotonic() - started

    def _reduce_own_shard(
        self, t: int, grad: np.ndarray, side: Any
    ) -> tuple[np.ndarray, list[Any]]:
        """The mean of shard r over all workers, and every worker's side value (by rank)."""
        n, r, job = self.workers, self.rank, self.keys.job
        fold_order = [(r - k) % n for k in range(1, n)]  # the order slices usually arrive in
        fold = OrderedFold(np.array(grad[self.slices[r]], dtype=np.float32), fold_order)
        sides: list[Any] = [None] * n
        sides[r] = side
        peers = self.store.announcements(
            r,
            self.keys.grad_ready(t, r),
            fold_order,
            timeout_s=self.timeout_s,
            what=f"owner {r} of {n} at iteration {t} waiting for gradient slices",
            interrupt=self._check_uploads,
        )
        for peer in peers:
            key = self.keys.grad(t, r, peer)
            got = self._receive_frame(r, key, codec.FrameHeader("grad", job, t, r, peer))
            if got.array.size != fold.acc.size:
                raise CodecError(
                    f"{key}: a slice of {got.array.size} values for shard {r} of {fold.acc.size} "
                    "(written under another sharding: a stale invocation?)"
                )
            sides[peer] = got.side
            with self.cpu_work():
                fold.add(peer, got.array)
        with self.cpu_work():
            return fold.mean(n), sides

    def _publish_param(self, version: int, result: ShardUpdate) -> None:
        r, t = self.rank, version - 1
        params = np.ascontiguousarray(result.params, dtype=np.float32)
        size = self.slices[r].stop - self.slices[r].start
        if params.shape != (size,):
            raise ValueError(f"update hook returned shape {params.shape} for shard {r} of {size}")
        self._send(
            r,
            self.keys.param(version, r),
            codec.FrameHeader("param", self.keys.job, version, r),
            params,
            ttl_s=self.param_ttl_s,
            announce=None,
            extra=result.extra,
            side=result.side,
        )
        self.on_phase("before-announce", t)
        self.reannounce(version)
        # Everything of step t stays one more step: a replacement for a worker that died during
        # step t restarts at t and needs version t and the slices of t; a duplicate owner racing
        # this one needs them too. What step t-1 wrote goes now, rather than holding (3n-2)G per
        # step until the TTL.
        stale = [self.keys.grad(t - 1, r, p) for p in range(self.workers) if p != r]
        stale += [self.keys.grad_ready(t - 1, r), self.keys.param(t - 1, r)]
        stale += [self.keys.optim(t - 1, r), self.keys.mean_grad(t - 1, r)]
        stale += [self.keys.grad_norm(t - 1, r)]
        self.store.unlink(r, stale)
        if r == 0:
            ready = [self.keys.param_ready(t - 1), self.keys.mean_grad_ready(t - 1)]
            ready += [self.keys.grad_norm_ready(t - 1)]
            self.store.unlink(_READY_INSTANCE, ready)

    def gather(self, version: int, out: np.ndarray | None = None) -> np.ndarray:
        """All ``n`` shards of ``version`` from the store (a worker's start, or a resume); their
        side values land in :attr:`gathered_sides`."""
        return self._gather(version, None, out, version)

    def _gather(
        self,
        version: int,
        own: codec.Frame | None,
        out: np.ndarray | None,
        t: int,
    ) -> np.ndarray:
        full = out if out is not None else np.empty(self.num_params, dtype=np.float32)
        r, n, job = self.rank, self.workers, self.keys.job
        self.gathered_sides = {}
        if own is not None:
            full[self.slices[r]] = own.array
            self.gathered_sides[r] = own.side
        first = True
        for s, got in self._collect(
            self.keys.param_ready(version),
            lambda s: (self.keys.param(version, s), codec.FrameHeader("param", job, version, s)),
            skip=None if own is None else r,
            what=f"worker {r} of {n} gathering parameters v{version}",
        ):
            full[self.slices[s]] = got.array
            self.gathered_sides[s] = got.side
            if first:
                first = False
                self.on_phase("during-gather", t)
        return full

    def _collect(
        self,
        stream: str,
        where: Callable[[int], tuple[str, codec.FrameHeader]],
        *,
        skip: int | None,
        what: str,
        sized: bool = True,
    ) -> Any:
        """Yield ``(shard, frame)`` for every shard but ``skip`` as its announcement arrives on
        ``stream``, starting with the next rank's (each rank starts elsewhere, spreading the
        load over the owners). With ``sized``, a frame must hold exactly its shard."""
        r, n = self.rank, self.workers
        wanted = [(r + k) % n for k in range(n) if (r + k) % n != skip]
        announced = self.store.announcements(
            _READY_INSTANCE,
            stream,
            wanted,
            timeout_s=self.timeout_s,
            what=what,
            interrupt=self._check_uploads,
        )
        for s in announced:
            key, header = where(s)
            frame = self._receive_frame(s, key, header)
            size = self.slices[s].stop - self.slices[s].start
            if sized and frame.array.size != size:
                raise CodecError(
                    f"{key}: holds {frame.array.size} values, shard {s} of {self.workers} has "
                    f"{size} (written under another sharding: a stale invocation?)"
                )
            yield s, frame
