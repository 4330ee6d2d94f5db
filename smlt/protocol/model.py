"""A model whose parameters live in one contiguous float32 vector.

Synchronization moves flat vectors; copying a model's tensors into one on every step and back out
again would cost two passes over the parameters per iteration. Instead every parameter (and every
floating-point buffer, such as BatchNorm running statistics) is re-pointed, once, at a view into
one vector: gathering the parameters of version t + 1 into that vector *is* loading the model.

Layout: ``[parameters..., float buffers...]`` in ``model.parameters()`` / ``named_buffers()``
order. Buffers travel with the parameters so that every worker keeps the same running
statistics: their "gradient" slot carries the buffer's value, and the owner publishes the
(sample-weighted) mean instead of an optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smlt.errors import TaskError

__all__ = ["FlatModel", "Segment"]


@dataclass(frozen=True)
class Segment:
    """One tensor's range ``[start, stop)`` in the flat vector."""

    tensor: torch.Tensor
    start: int
    stop: int
    is_param: bool


class FlatModel:
    """Re-points ``model``'s parameters and float buffers into one vector ``self.values``."""

    def __init__(self, model: torch.nn.Module, where: str = "model()") -> None:
        params = [p for p in model.parameters()]
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
        for tensor, is_param in [(p, True) for p in params] + [(b, False) for b in buffers]:
            stop = offset + tensor.numel()
            view = self.values[offset:stop].view_as(tensor)
            view.copy_(tensor.detach())
            tensor.data = view
            self.segments.append(Segment(tensor, offset, stop, is_param))
            offset = stop
        self.params = [s.tensor for s in self.segments if s.is_param]

    def values_numpy(self) -> np.ndarray:
        """The parameter vector as a numpy view (writing into it updates the model)."""
        return self.values.numpy()

    def gradient(self, scale: float) -> np.ndarray:
        """The vector to synchronize: ``scale`` x each parameter's gradient, and ``scale`` x
        each buffer's value; a numpy view of ``self.grads`` (valid until the next call)."""
        for seg in self.segments:
            target = self.grads[seg.start : seg.stop]
            source = seg.tensor.grad if seg.is_param else seg.tensor.detach()
            if source is None:  # a parameter the loss did not touch
                target.zero_()
            else:
                torch.mul(source.reshape(-1), scale, out=target)
        return self.grads.numpy()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
