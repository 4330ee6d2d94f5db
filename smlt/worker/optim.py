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

import msgpack
import numpy as np
import torch

from smlt.errors import CodecError, TaskError
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

    def state_bytes(self) -> bytes:
        """The optimizer state of this shard, msgpack-encoded (no pickle)."""
        if self.optimizer is None:
            return msgpack.packb({})
        state = self.optimizer.state_dict()["state"]
        return msgpack.packb(
            {int(i): {k: _pack_value(v) for k, v in s.items()} for i, s in state.items()}
        )

    def load_state_bytes(self, data: bytes, where: str) -> None:
        """Restore what :meth:`state_bytes` wrote (same shard bounds, same optimizer)."""
        if self.optimizer is None:
            return
        try:
            raw = msgpack.unpackb(data, strict_map_key=False)
            state = {int(i): {k: _unpack_value(v) for k, v in s.items()} for i, s in raw.items()}
        except Exception as exc:
            raise CodecError(f"{where}: optimizer state is not readable ({exc})") from exc
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _pack_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "data": t.numpy().tobytes(),
        }
    return value


def _unpack_value(value: Any) -> Any:
    if isinstance(value, dict) and "dtype" in value:
        dtype = getattr(torch, value["dtype"])
        array = np.frombuffer(value["data"], dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        return torch.from_numpy(array.copy()).reshape(value["shape"])
    return value
