"""The model as every process of a job sees it: one contiguous float32 vector plus a few bytes.

Synchronization moves flat vectors; copying a model's tensors into one on every step and back out
again would cost two passes over the parameters per iteration. Instead every parameter (and every
floating-point buffer, such as BatchNorm running statistics) is re-pointed, once, at a view into
one vector: gathering the parameters of version t + 1 into that vector *is* loading the model.

Layout: ``[parameters..., float buffers...]`` in ``model.parameters()`` / ``model.buffers()``
order. The driver publishes version 0 in this layout, workers train in it, and the driver and
the evaluator read versions back in it, so it is part of the scheduler-worker contract.

Buffers that are not floating point (``num_batches_tracked``, index tables, boolean masks) cannot
be averaged and are few: they travel beside the vector, in the side value of every parameter
frame, as raw bytes (:meth:`discrete_state`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smlt.errors import TaskError

__all__ = ["FlatModel", "Segment"]


@dataclass(frozen=True)
class Segment:
    """One tensor's range ``[start, stop)`` in the flat vector; ``index`` counts parameters and
    float buffers separately, in model order."""

    tensor: torch.Tensor
    start: int
    stop: int
    is_param: bool
    index: int


class FlatModel:
    """Re-points ``model``'s parameters and float buffers into one vector ``self.values``."""

    def __init__(self, model: torch.nn.Module, where: str = "model()") -> None:
        params = list(model.parameters())
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        for tensor in (*params, *buffers):
            if tensor.dtype != torch.float32:
                raise TaskError(
                    f"{where}: smlt trains float32 models, but a tensor of shape "
                    f"{tuple(tensor.shape)} is {tensor.dtype}; call .float() on the model."
                )
        self.model = model
        self.num_params = sum(p.numel() for p in params)
        self.size = self.num_params + sum(b.numel() for b in buffers)
        self.values = torch.empty(self.size, dtype=torch.float32)
        self.grads = torch.zeros(self.size, dtype=torch.float32)
        self.segments: list[Segment] = []
        offset = 0
        tensors: list[tuple[torch.Tensor, bool, int]] = [(p, True, i) for i, p in enumerate(params)]
        tensors += [(b, False, i) for i, b in enumerate(buffers)]
        for tensor, is_param, index in tensors:
            stop = offset + tensor.numel()
            view = self.values[offset:stop].view_as(tensor)
            view.copy_(tensor.detach())
            tensor.data = view
            self.segments.append(Segment(tensor, offset, stop, is_param, index))
            offset = stop
        self.params = [s.tensor for s in self.segments if s.is_param]
        self.param_segments = [s for s in self.segments if s.is_param]
        self.buffer_segments = [s for s in self.segments if not s.is_param]
        #: Buffers that are not floating point, in model order, and their values as built.
        self.discrete = [b for b in model.buffers() if not b.is_floating_point()]
        self._discrete_initial = [_raw(b) for b in self.discrete]

    def values_numpy(self) -> np.ndarray:
        """The parameter vector as a numpy view (writing into it updates the model)."""
        return self.values.numpy()

    def gradient(self, scale: float) -> np.ndarray:
        """``scale`` x each parameter's gradient (0 where it has none) in the parameter part of
        ``self.grads``; the buffer part is left to the caller. A numpy view of ``self.grads``
        (valid until the next call).

        A sparse gradient (``nn.Embedding(sparse=True)``) is made dense: the exchange sums
        vectors, and the rows a worker did not touch are zeros in its contribution. The update
        is then the dense one, which for SGD is what PyTorch's sparse update does; optimizers
        that only take sparse gradients (``SparseAdam``) are refused by the client-side check.
        """
        for seg in self.param_segments:
            target = self.grads[seg.start : seg.stop]
            grad = seg.tensor.grad
            if grad is None:  # a parameter the loss did not touch, or a frozen one
                target.zero_()
                continue
            if grad.layout != torch.strided:
                grad = grad.to_dense()
            torch.mul(grad.reshape(-1), scale, out=target)
        return self.grads.numpy()

    def load_gradient(self, values: np.ndarray, has_grad: Sequence[bool]) -> None:
        """Give each parameter a dense ``.grad``, a copy of its range of ``values`` (None where
        ``has_grad`` is false): what a replicated optimizer steps on, on the workers and in
        the client-side check alike."""
        for seg in self.param_segments:
            seg.tensor.grad = (
                torch.from_numpy(values[seg.start : seg.stop]).view_as(seg.tensor).clone()
                if has_grad[seg.index]
                else None
            )

    def has_grad(self) -> list[bool]:
        """Per parameter (model order): did the last backward pass produce a gradient?"""
        return [seg.tensor.grad is not None for seg in self.param_segments]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def discrete_values(self) -> list[bytes]:
        """The raw bytes of every non-float buffer, in model order."""
        return [_raw(b) for b in self.discrete]

    def discrete_state(self) -> dict[str, bytes]:
        """Every non-float buffer as ``{index: raw bytes}``: what a reader needs besides the
        vector to rebuild the model. All of them, not only those training changed, so that a
        reader never depends on building the very same ``model()`` (a random index table built
        without a seed would otherwise come back different)."""
        return self.discrete_state_of(self.discrete_values())

    def discrete_state_of(self, values: list[bytes]) -> dict[str, bytes]:
        """:meth:`discrete_state` for the given values of every non-float buffer."""
        if len(values) != len(self.discrete):
            raise ValueError(f"{len(values)} values for {len(self.discrete)} non-float buffers")
        return {str(i): raw for i, raw in enumerate(values)}

    def load_discrete(self, state: dict[str, bytes] | None) -> None:
        """Set the non-float buffers: those in ``state`` to its bytes, the others to their
        values as built."""
        state = state or {}
        for i, buffer in enumerate(self.discrete):
            raw = state.get(str(i), self._discrete_initial[i])
            _assign(buffer, raw, f"buffer {i}")

    def set_discrete(self, index: int, raw: bytes) -> None:
        _assign(self.discrete[index], raw, f"buffer {index}")


def _raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _assign(tensor: torch.Tensor, raw: bytes, where: str) -> None:
    if len(raw) != tensor.numel() * tensor.element_size():
        raise TaskError(
            f"{where} of shape {tuple(tensor.shape)} and dtype {tensor.dtype} cannot take "
            f"{len(raw)} bytes: the model does not match the one the state was saved from"
        )
    if raw:
        source = torch.frombuffer(bytearray(raw), dtype=tensor.dtype).view_as(tensor)
        with torch.no_grad():
            tensor.copy_(source)
