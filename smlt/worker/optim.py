"""The user's optimizer, applied by the owner of a shard to that shard only (DESIGN §3 step 4).

Owner r holds optimizer state for shard r alone, so momentum or Adam moments cost each worker
1/n of the model instead of all of it. This is exact for *elementwise* optimizers (SGD with
momentum, Adam, AdamW, RMSprop, ...), whose update of one element depends only on that element's
gradient and state: the shard is cut into one piece per (parameter ∩ shard), each piece joins the
param group its parameter was in, and a fresh optimizer of the user's class with the user's
hyperparameters steps the pieces.

Optimizers that look across elements (LBFGS, or LAMB/LARS with per-tensor norms) cannot be cut
this way. For them :func:`make_update` says so and returns None: the trainer falls back to a
*replicated* update (every worker gathers the mean gradient and steps the full optimizer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from smlt.errors import TaskError
from smlt.protocol.state import ShardState
from smlt.worker.flat import FlatModel

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ShardOptimizer", "is_shardable"]

ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def is_shardable(optimizer: torch.optim.Optimizer) -> bool:
    """True for the optimizers whose update is elementwise (exact when sharded)."""
    return type(optimizer) in ELEMENTWISE_OPTIMIZERS


class ShardOptimizer:
    """The user's optimizer over elements ``[lo, hi)`` of ``flat``'s vector."""

    def __init__(
        self, user_optimizer: torch.optim.Optimizer, flat: FlatModel, lo: int, hi: int
    ) -> None:
        self.flat = flat
        self.lo, self.hi = lo, hi
        by_tensor = {id(seg.tensor): seg for seg in flat.segments if seg.is_param}
        groups: list[dict[str, Any]] = []
        self.pieces: list[tuple[torch.nn.Parameter, int, int]] = []
        for group in user_optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            pieces = []
            for p in group["params"]:
                seg = by_tensor.get(id(p))
                if seg is None:
                    raise TaskError(
                        "optimizer(model) holds a tensor that is not a parameter of model(); "
                        "build the optimizer from model.parameters()"
                    )
                a, b = max(seg.start, lo), min(seg.stop, hi)
                if a < b:
                    piece = torch.nn.Parameter(flat.values[a:b].clone())
                    pieces.append(piece)
                    self.pieces.append((piece, a, b))
            if pieces:
                groups.append({**hyper, "params": pieces})
        self.optimizer: torch.optim.Optimizer | None = (
            type(user_optimizer)(groups, **user_optimizer.defaults) if groups else None
        )

    def step(self, mean: np.ndarray) -> np.ndarray:
        """New values of the shard from its mean gradient (parameters) or mean value (buffers).

        Elements of parameters the user's optimizer does not hold keep their current value.
        """
        lo, hi = self.lo, self.hi
        out = self.flat.values[lo:hi].numpy().copy()
        mean_t = torch.from_numpy(np.asarray(mean))
        for piece, a, b in self.pieces:
            piece.grad = mean_t[a - lo : b - lo].clone()
        if self.optimizer is not None:
            self.optimizer.step()
        for piece, a, b in self.pieces:
            out[a - lo : b - lo] = piece.detach().numpy()
            piece.grad = None
        buffers_from = max(lo, self.flat.num_params)
        if buffers_from < hi:
            out[buffers_from - lo :] = mean[buffers_from - lo :]
        return out

    def sync_from_flat(self) -> None:
        """Reload the pieces from the flat vector (after loading parameters from elsewhere)."""
        with torch.no_grad():
            for piece, a, b in self.pieces:
                piece.copy_(self.flat.values[a:b])

    def state(self) -> ShardState:
        """This shard's optimizer state as flat arrays over ``[lo, hi)`` plus shared scalars.

        Elementwise optimizers keep one tensor per parameter element (momentum, Adam moments)
        and a few scalars (Adam's step count) that are equal for all pieces. Flattening them
        onto the shard's element range makes state independent of how the model is cut: shards
        of n workers concatenate into the full state, which re-splits for any other n.
        """
        size = self.hi - self.lo
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, tuple[float, str]] = {}
        if self.optimizer is None:
            return ShardState(self.lo, self.hi, arrays, scalars)
        for piece, a, b in self.pieces:
            for name, value in self.optimizer.state.get(piece, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    flat = arrays.setdefault(name, np.zeros(size, dtype=np.float32))
                    flat[a - self.lo : b - self.lo] = value.detach().reshape(-1).numpy()
                else:
                    number = float(value)
                    kind = (
                        str(value.dtype).removeprefix("torch.")
                        if isinstance(value, torch.Tensor)
                        else type(value).__name__
                    )
                    scalars[name] = (number, kind)
        return ShardState(self.lo, self.hi, arrays, scalars)

    def load_state(self, state: ShardState) -> None:
        """Restore a :meth:`state` taken over the same element range (re-slice first if not)."""
        if (state.lo, state.hi) != (self.lo, self.hi):
            raise ValueError(
                f"state covers [{state.lo}, {state.hi}), shard is [{self.lo}, {self.hi})"
            )
        if self.optimizer is None or (not state.arrays and not state.scalars):
            return
        for piece, a, b in self.pieces:
            entry: dict[str, Any] = {}
            for name, flat in state.arrays.items():
                entry[name] = torch.from_numpy(
                    np.array(flat[a - self.lo : b - self.lo], dtype=np.float32)
                ).reshape(piece.shape)
            for name, (number, kind) in state.scalars.items():
                entry[name] = (
                    torch.tensor(number, dtype=getattr(torch, kind))
                    if hasattr(torch, kind)
                    else (int(number) if kind == "int" else number)
                )
            self.optimizer.state[piece] = entry
