"""The global gradient norm of a step, and clipping by it, as ``clip_grad_norm_`` on one worker.

``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` takes the L2 norm of every
parameter's gradient (those that have one, in model order), then the L2 norm of those norms, and
scales every gradient by ``max_norm / (norm + 1e-6)`` clamped to at most 1. Under scatter-reduce
no worker holds the whole mean gradient: owner r holds shard r. A norm of norms needs no more
than the pieces' norms, though: the owner takes the norm of each *piece* of its shard (a
parameter's gradient, or the part of it that falls in the shard), the owners swap these few
floats through the store (:meth:`~smlt.sync.scatter_reduce.ScatterReduce.share_norms`), and each
takes the norm of all of them, concatenated in shard order. Every owner thus computes the same
norm from the same floats in the same order, whatever the timing, so the step stays
deterministic; and at one worker the pieces are the parameters, so the norm, the coefficient and
the clipped gradient are bit for bit those of ``clip_grad_norm_`` (same kernels, same order).
At n workers a parameter cut by a shard boundary contributes two pieces, ``sqrt(a^2 + b^2)``
instead of one norm, which differs from it by rounding only.

A replicated optimizer's workers each hold the whole mean, so they take the parameters' norms
themselves; the norms travel with the published parameter shards either way
(:func:`~smlt.protocol.state.model_side`), so whoever adopts a published step, rather than
computing it, can report the same ``grad_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from smlt.protocol.model import FlatModel

__all__ = ["clip_", "norm_pieces", "piece_norms", "total_norm"]

Ranges = list[tuple[int, int]]


def norm_pieces(
    flat: FlatModel, lo: int, hi: int, has_grad: Sequence[bool], *, whole: bool = False
) -> Ranges:
    """The ``[start, stop)`` ranges of the flat vector whose norms ``[lo, hi)`` contributes, in
    order: each parameter with a gradient cut to ``[lo, hi)`` (an owner's shard), or with
    ``whole`` each such parameter whole if it *starts* in ``[lo, hi)`` (so that shards of a
    replicated step list every parameter once)."""
    ranges: Ranges = []
    for seg in flat.param_segments:
        if not has_grad[seg.index]:
            continue  # no .grad: clip_grad_norm_ leaves it out
        if whole:
            if lo <= seg.start < hi:
                ranges.append((seg.start, seg.stop))
        elif max(seg.start, lo) < min(seg.stop, hi):
            ranges.append((max(seg.start, lo), min(seg.stop, hi)))
    return ranges


def piece_norms(vector: np.ndarray, offset: int, ranges: Ranges) -> np.ndarray:
    """The L2 norm of each range of ``vector`` (which starts at element ``offset`` of the flat
    vector), as float32: by ``torch._foreach_norm``, the kernel ``clip_grad_norm_`` uses on CPU,
    so that one worker's norms are the reference's bit for bit."""
    if not ranges:
        return np.zeros(0, dtype=np.float32)
    whole = torch.from_numpy(np.asarray(vector))
    tensors = [whole[a - offset : b - offset] for a, b in ranges]
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.stack(list(norms)).numpy().astype(np.float32, copy=False)


def total_norm(parts: Sequence[np.ndarray]) -> torch.Tensor:
    """The norm of the norms in ``parts``, concatenated in order: ``clip_grad_norm_``'s total
    (a float32 scalar tensor; 0 if no parameter has a gradient, as there)."""
    norms = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]) if parts else None
    if norms is None or norms.size == 0:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.from_numpy(norms), 2.0)


def clip_(
    vector: np.ndarray, offset: int, flat: FlatModel, total: torch.Tensor, max_norm: float
) -> None:
    """Scale the parameter part of ``vector`` (elements from ``offset`` of the flat vector) in
    place by ``clip_grad_norm_``'s coefficient, ``min(max_norm / (total + 1e-6), 1)``: always
    multiplied, as there (by exactly 1.0 when nothing is clipped). The buffer part, which
    carries buffer values rather than gradients, is left alone."""
    coefficient = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    params = min(flat.num_params - offset, vector.size)
    if params > 0:
        torch.from_numpy(vector[:params]).mul_(coefficient)
