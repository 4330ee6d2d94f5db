"""What one worker contributes to a step besides its gradient, and how owners combine it.

Averaging a vector is not enough to reproduce what one worker with the whole batch would do:

- **Parameters without a gradient.** PyTorch skips a parameter whose ``.grad`` is None (frozen,
  or unused by this batch): no weight decay, no momentum, no step count. A worker says which of
  its parameters got a gradient; a parameter is stepped if *any* worker's did.
- **Float buffers** (BatchNorm's running statistics, constant tables, masks). A buffer nobody's
  forward pass changed keeps its bytes exactly (averaging n equal values scaled by sample weights
  would drift it by an ulp per step, and ``0 * -inf`` is NaN). A buffer some workers changed
  becomes the mean of their new values weighted by their share of the batch: a worker's slot in
  the exchanged vector carries ``n * w_r * value`` (``w_r = b_r / B``) if it changed the buffer
  and 0 if not, so the exchange's plain mean is ``sum w_r value_r`` over the changers, which the
  owner divides by ``W = sum w_r`` over the changers. For BatchNorm this makes ``running_mean``
  track the mean over the global batch exactly as 1 x B does (up to rounding); ``running_var``
  becomes the sample-weighted mean of the workers' batch variances, which leaves out the spread
  between the workers' means (DDP without SyncBatchNorm keeps rank 0's statistics instead).
- **Non-float buffers** (``num_batches_tracked``) cannot be averaged: a buffer changed by any
  worker takes the value of the lowest rank that changed it (they agree when every worker ran one
  forward pass, as for ``num_batches_tracked``).

All of this travels in the side value of the gradient frames (:mod:`smlt.sync.codec`); every owner
receives every worker's side, so all owners combine them into the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlt.errors import CodecError
from smlt.protocol.model import FlatModel

__all__ = [
    "Before",
    "Combined",
    "apply_buffers",
    "combine",
    "contribute",
    "new_discrete",
    "snapshot",
]


@dataclass(frozen=True)
class Before:
    """The model's buffers as version t left them, taken before this step's forward pass."""

    buffers: np.ndarray  # the float-buffer part of the vector, copied
    discrete: list[bytes]


@dataclass(frozen=True)
class Combined:
    """What every owner derives from all workers' sides for one step."""

    has_grad: list[bool]  # per parameter
    weights: list[float]  # per float buffer: W, the batch share of the workers that changed it
    discrete: dict[int, bytes]  # per non-float buffer changed by someone: the new bytes

    def to_side(self) -> dict[str, Any]:
        return {
            "g": _pack(self.has_grad),
            "w": list(self.weights),
            "i": {str(k): v for k, v in sorted(self.discrete.items())},
        }

    @classmethod
    def from_side(cls, side: Any, flat: FlatModel) -> Combined:
        try:
            return cls(
                _unpack(side["g"], len(flat.param_segments)),
                [float(w) for w in side["w"]],
                {int(k): bytes(v) for k, v in side["i"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"a combined step side value is not readable ({exc})") from exc


def snapshot(flat: FlatModel) -> Before:
    return Before(flat.values_numpy()[flat.num_params :].copy(), flat.discrete_values())


def contribute(flat: FlatModel, before: Before, weight: float, workers: int) -> dict[str, Any]:
    """This worker's side value, and its buffer slots in ``flat.grads`` (after the backward pass
    and :meth:`FlatModel.gradient`); ``weight`` is its share of the global batch, ``b_r / B``."""
    grads = flat.grads.numpy()
    values = flat.values_numpy()
    changed = []
    for seg in flat.buffer_segments:
        now = values[seg.start : seg.stop]
        was = before.buffers[seg.start - flat.num_params : seg.stop - flat.num_params]
        moved = weight > 0 and not np.array_equal(now.view(np.uint32), was.view(np.uint32))
        changed.append(moved)
        slot = grads[seg.start : seg.stop]
        if moved:
            np.multiply(now, np.float32(workers * weight), out=slot)
        else:
            slot.fill(0)
    discrete = {
        str(i): now
        for i, (now, was) in enumerate(zip(flat.discrete_values(), before.discrete, strict=True))
        if now != was
    }
    return {"g": _pack(flat.has_grad()), "b": _pack(changed), "w": weight, "i": discrete}


def combine(sides: Sequence[Any], flat: FlatModel) -> Combined:
    """The owners' view of a step, from every worker's side (indexed by rank)."""
    params = len(flat.param_segments)
    buffers = len(flat.buffer_segments)
    has_grad = [False] * params
    weights = [0.0] * buffers
    discrete: dict[int, bytes] = {}
    for rank, side in enumerate(sides):
        if side is None:
            raise CodecError(f"rank {rank}'s gradient came without its side value")
        for i, got in enumerate(_unpack(side["g"], params)):
            has_grad[i] = has_grad[i] or got
        for i, moved in enumerate(_unpack(side["b"], buffers)):
            if moved:
                weights[i] += float(side["w"])
        for key, raw in side["i"].items():
            discrete.setdefault(int(key), bytes(raw))  # ranks come in order: the lowest wins
    return Combined(has_grad, weights, discrete)


def apply_buffers(
    out: np.ndarray,
    mean: np.ndarray,
    lo: int,
    flat: FlatModel,
    combined: Combined,
    before: Before,
) -> None:
    """Write the float-buffer elements of ``[lo, lo + len(out))`` after the step into ``out``,
    from the step's ``mean`` over the same range; other elements of ``out`` are left alone."""
    hi = lo + len(out)
    base = flat.num_params
    for seg in flat.buffer_segments:
        a, b = max(seg.start, lo), min(seg.stop, hi)
        if a >= b:
            continue
        weight = combined.weights[seg.index]
        if weight > 0:
            np.divide(mean[a - lo : b - lo], np.float32(weight), out=out[a - lo : b - lo])
        else:
            out[a - lo : b - lo] = before.buffers[a - base : b - base]


def new_discrete(before: Before, combined: Combined) -> list[bytes]:
    """Every non-float buffer after the step."""
    return [combined.discrete.get(i, raw) for i, raw in enumerate(before.discrete)]


def _pack(flags: Sequence[bool]) -> bytes:
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes()


def _unpack(raw: bytes, count: int) -> list[bool]:
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count)
    if bits.size != count:
        raise CodecError(f"a flag mask holds {bits.size} flags, expected {count}")
    return [bool(b) for b in bits]
