"""What every store-mediated synchronization scheme shares.

A scheme is one worker's side of an exchange: ``step(t, grad) -> vector of version t + 1``.
Scatter-reduce (the product) and the two baselines (the benchmark's comparison points) differ
only in who sends what to whom; sending through the worker's emulated link, counting bytes,
downloading and decoding a frame, and folding contributions in a fixed order live here so the
three measure the same thing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.link import Link
from smlt.sync.phases import PhaseTimes
from smlt.sync.store import (
    DEFAULT_GRAD_TTL_S,
    DEFAULT_PARAM_TTL_S,
    DEFAULT_SHARD_TIMEOUT_S,
    ParameterStore,
)

__all__ = ["UPLOAD_THREAD", "Exchange", "OrderedFold"]

#: Name prefix of the threads that upload a worker's slices (their CPU work is counted apart).
UPLOAD_THREAD = "smlt-ul"


class OrderedFold:
    """Sum contributions that arrive in any order, in one fixed order.

    Float addition is not associative, so a sum taken in arrival order would differ between a
    run and its re-execution. Early arrivals wait in ``pending`` until their turn; in the usual
    case (arrivals in the expected order) nothing waits and the fold overlaps the downloads.
    """

    def __init__(self, start: np.ndarray, order: Iterable[int]) -> None:
        self.acc = start
        self._order = list(order)
        self._next = 0
        self._pending: dict[int, np.ndarray] = {}

    def add(self, who: int, value: np.ndarray) -> None:
        self._pending[who] = value
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            np.add(self.acc, self._pending.pop(self._order[self._next]), out=self.acc)
            self._next += 1

    def mean(self, count: int) -> np.ndarray:
        """The average over ``count`` contributions (the start value included); in place."""
        if self._next != len(self._order):
            raise RuntimeError(f"fold incomplete: {self._order[self._next :]} still missing")
        if count > 1:
            np.divide(self.acc, np.float32(count), out=self.acc)
        return self.acc


class Exchange(ABC):
    """Base of the synchronization schemes: one worker's connection to one job's exchange."""

    scheme: str = ""

    def __init__(
        self,
        store: ParameterStore,
        job: str | JobKeys,
        *,
        rank: int,
        workers: int,
        num_params: int,
        link: Link | None = None,
        timeout_s: float = DEFAULT_SHARD_TIMEOUT_S,
        grad_ttl_s: int = DEFAULT_GRAD_TTL_S,
        param_ttl_s: int = DEFAULT_PARAM_TTL_S,
    ) -> None:
        if not 0 <= rank < workers:
            raise ValueError(f"rank {rank} out of range for {workers} workers")
        self.store = store
        self.keys = job if isinstance(job, JobKeys) else JobKeys(job)
        self.rank = rank
        self.workers = workers
        self.num_params = num_params
        self.link = link or Link()
        self.timeout_s = timeout_s
        self.grad_ttl_s = grad_ttl_s
        self.param_ttl_s = param_ttl_s
        self.last_phases = PhaseTimes()
        self._bytes_up = 0
        self._bytes_down = 0
        self._cpu = {"main": 0.0, "upload": 0.0}

    def step(
        self, t: int, grad: np.ndarray, out: np.ndarray | None = None, side: Any = None
    ) -> np.ndarray:
        """Average ``grad`` over the workers for iteration ``t``; returns version ``t + 1``.

        ``grad`` (float32, length P) must not change until the call returns; ``side`` is this
        worker's small metadata for the step (see :mod:`smlt.sync.codec`), handed to whoever
        reduces. Raises ShardTimeoutError when a peer's contribution does not arrive within
        ``timeout_s``, StoreUnavailableError when Redis is lost, CodecError for a corrupt frame.
        """
        phases, started = self._begin(grad)
        result = self._step(t, grad, out, phases, started, side)
        self._end(phases, started)
        return result

    def _begin(self, grad: np.ndarray) -> tuple[PhaseTimes, float]:
        self._check_grad(grad)
        self._bytes_up = self._bytes_down = 0
        self._cpu = {"main": 0.0, "upload": 0.0}
        return PhaseTimes(), time.monotonic()

    def _end(self, phases: PhaseTimes, started: float) -> None:
        phases.total_s = time.monotonic() - started
        phases.bytes_up, phases.bytes_down = self._bytes_up, self._bytes_down
        phases.codec_s, phases.upload_codec_s = self._cpu["main"], self._cpu["upload"]
        self.last_phases = phases

    @contextlib.contextmanager
    def cpu_work(self) -> Iterator[None]:
        """Count the enclosed CPU work (encode, decode, sum) as smlt's, per thread; callers use
        it for smlt's own work inside an update hook, which is then not counted as update."""
        began = time.perf_counter()
        try:
            yield
        finally:
            bucket = (
                "upload" if threading.current_thread().name.startswith(UPLOAD_THREAD) else "main"
            )
            self._cpu[bucket] += time.perf_counter() - began

    @abstractmethod
    def _step(
        self,
        t: int,
        grad: np.ndarray,
        out: np.ndarray | None,
        phases: PhaseTimes,
        started: float,
        side: Any,
    ) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - a hook: schemes without threads have nothing to free
        """Release threads; the store's client is the caller's."""

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared moves --------------------------------------------------------------------------

    def _check_grad(self, grad: np.ndarray) -> None:
        if grad.dtype != np.float32 or grad.shape != (self.num_params,):
            raise ValueError(
                f"gradient must be float32 of shape ({self.num_params},), "
                f"got {grad.dtype} {grad.shape}"
            )

    def _send(
        self,
        shard: int,
        key: str,
        header: codec.FrameHeader,
        values: np.ndarray,
        *,
        ttl_s: int,
        announce: tuple[str, int] | None,
        extra: Iterable[tuple[str, bytes]] = (),
        side: Any = None,
    ) -> None:
        """Encode, write to shard's instance, hold for the uplink, then announce.

        ``extra`` values are written *before* ``key`` in the same round trip: Redis runs one
        connection's commands in order, so whoever finds ``key`` (a parameter shard) also finds
        its extras (the optimizer state of the same version). The value goes to Redis at once
        but peers only read what is announced, so announcing after the emulated link would have
        delivered the bytes lets the real transfer hide inside the emulated one instead of
        adding to it.
        """
        with self.cpu_work():
            frame = codec.encode(header, values, side)
        items = [*extra, (key, frame)]
        self._bytes_up += sum(len(v) for _k, v in items)
        if self.link.up.bytes_per_s is None:  # no emulated link: value and announcement in one trip
            self.store.put(shard, items, ttl_s=ttl_s, announce=announce)
            return
        began = time.monotonic()
        self.store.put(shard, items, ttl_s=ttl_s)
        self.link.up.after_send(sum(len(v) for _k, v in items), began)
        if announce is not None:
            self.store.announce(shard, *announce, ttl_s=ttl_s)

    def _receive(self, shard: int, key: str, header: codec.FrameHeader) -> np.ndarray:
        """Download ``key`` through the downlink and decode it (a read-only view)."""
        return self._receive_frame(shard, key, header).array

    def _receive_frame(self, shard: int, key: str, header: codec.FrameHeader) -> codec.Frame:
        """Download ``key`` through the downlink and decode it with its side value."""
        began = time.monotonic()
        frame = self.store.get(shard, key)
        size = len(frame) if frame else 0
        self.link.down.after_receive(size, began)
        self._bytes_down += size
        with self.cpu_work():
            return codec.decode_frame(frame, header, key)
