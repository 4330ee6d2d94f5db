"""The user's optimizer, applied by the owner of a shard to that shard only (DESIGN §3 step 4).

Owner r holds optimizer state for shard r alone, so momentum or Adam moments cost each worker
1/n of the model instead of all of it. This is exact for *elementwise* optimizers, whose update
of one element depends only on that element's gradient and state, and on per-parameter scalars
such as a step count: the shard is cut into one *piece* per (parameter ∩ shard), each piece joins
the param group its parameter was in, and a new optimizer of the user's class with the user's
hyperparameters steps the pieces. A piece whose parameter got no gradient on any worker gets
``grad = None``, so, as in PyTorch, it is skipped: no weight decay, no momentum, no step count.

Which optimizers are elementwise is a list of classes (:data:`ELEMENTWISE_OPTIMIZERS`), checked by
exact type: a user's subclass may override ``step`` to look across elements, so it is treated as
any other optimizer, *replicated*: every worker steps the full optimizer on the whole mean
gradient (see :mod:`smlt.worker.trainer`). That is exact for every optimizer, at n times the
optimizer memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from smlt.errors import TaskError
from smlt.protocol.model import FlatModel
from smlt.protocol.state import ParamRecord, ShardState

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ShardOptimizer", "is_shardable", "rebuild_optimizer"]

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
    torch.optim.Rprop,
    torch.optim.ASGD,
)


def is_shardable(optimizer: torch.optim.Optimizer) -> bool:
    """True for the optimizers whose update is elementwise (exact when sharded)."""
    return type(optimizer) in ELEMENTWISE_OPTIMIZERS


def rebuild_optimizer(
    user_optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """An optimizer of ``user_optimizer``'s class over ``groups`` (each with its hyperparameters).

    The constructor is called with only the defaults it accepts: ``opt.defaults`` holds keys a
    class sets itself (AdamW adds ``decoupled_weight_decay``, which its constructor rejects), and
    constructors do work besides storing hyperparameters (Adagrad fills its state), so neither
    ``type(opt)(groups, **opt.defaults)`` nor a copy without the constructor works for every
    class. Per-group hyperparameters, the constructor's own keys included, come from ``groups``.
    """
    cls = type(user_optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in user_optimizer.defaults.items() if k in accepted}
    try:
        return cls(groups, **kwargs)
    except Exception as exc:
        raise TaskError(
            f"cannot rebuild {cls.__name__} over a shard of the model "
            f"({type(exc).__name__}: {exc}); smlt shards only the optimizers in "
            "smlt.worker.optim.ELEMENTWISE_OPTIMIZERS"
        ) from exc


class ShardOptimizer:
    """The user's optimizer over elements ``[lo, hi)`` of ``flat``'s vector.

    The pieces are views of one shard-sized vector, :attr:`values`, which the optimizer steps
    in place; the owner publishes that vector, so a step copies nothing it does not have to.
    """

    def __init__(
        self, user_optimizer: torch.optim.Optimizer, flat: FlatModel, lo: int, hi: int
    ) -> None:
        self.flat = flat
        self.lo, self.hi = lo, hi
        self.values = flat.values[lo:hi].clone()
        by_tensor = {id(seg.tensor): seg for seg in flat.param_segments}
        groups: list[dict[str, Any]] = []
        #: (piece, start, stop, parameter index, parameter's [start, stop))
        self.pieces: list[tuple[torch.nn.Parameter, int, int, int, int, int]] = []
        #: For each group of the rebuilt optimizer, the index of the user's group it comes from
        #: (a user group with no parameter in this shard has none).
        self.group_of: list[int] = []
        for index, group in enumerate(user_optimizer.param_groups):
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
                    piece = torch.nn.Parameter(self.values[a - lo : b - lo])  # a view
                    pieces.append(piece)
                    self.pieces.append((piece, a, b, seg.index, seg.start, seg.stop))
            if pieces:
                groups.append({**hyper, "params": pieces})
                self.group_of.append(index)
        self.optimizer = rebuild_optimizer(user_optimizer, groups) if groups else None

    def values_numpy(self) -> np.ndarray:
        """:attr:`values` as a numpy view: the shard as this owner last stepped or loaded it."""
        return self.values.numpy()

    def step(self, mean: np.ndarray, has_grad: Sequence[bool]) -> np.ndarray:
        """Step the pieces on the shard's mean gradient, in place in :attr:`values` (returned);
        pieces of parameters without a gradient on any worker are skipped. Elements outside the
        pieces (buffers, parameters the optimizer does not hold) are the caller's to set."""
        lo = self.lo
        mean_t = torch.from_numpy(np.asarray(mean))
        for piece, a, b, index, _start, _stop in self.pieces:
            # A view, not a copy: optimizers read gradients and the mean is not used after.
            piece.grad = mean_t[a - lo : b - lo] if has_grad[index] else None
        if self.optimizer is not None:
            self.optimizer.step()
        for piece, *_rest in self.pieces:
            piece.grad = None
        return self.values.numpy()

    def set_hyperparameters(self, values: Sequence[Mapping[str, Any]]) -> None:
        """Set ``values[i]`` on the groups that came from the user's param group i (what a
        learning-rate schedule drives: :mod:`smlt.worker.schedule`)."""
        if self.optimizer is None:
            return
        for group, index in zip(self.optimizer.param_groups, self.group_of, strict=True):
            group.update(values[index])

    def sync_from_flat(self) -> None:
        """Reload the shard from the flat vector (after loading parameters from elsewhere)."""
        with torch.no_grad():
            self.values.copy_(self.flat.values[self.lo : self.hi])

    def state(self) -> ShardState:
        """This shard's optimizer state: per-element arrays over ``[lo, hi)`` and, per parameter
        with any state, which arrays it has and its scalars. Names are sorted, so the same state
        always gives the same bytes, however it came to be (stepped, or loaded)."""
        if self.optimizer is None:
            return ShardState(self.lo, self.hi)
        size = self.hi - self.lo
        entries = [(p, self.optimizer.state.get(p[0])) for p in self.pieces]
        dtypes: dict[str, np.dtype[Any]] = {}
        for (_piece, a, b, *_r), entry in entries:
            for name, value in (entry or {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if value.numel() != b - a:
                        raise TaskError(
                            f"{type(self.optimizer).__name__} keeps state {name!r} of "
                            f"{value.numel()} elements for a parameter of {b - a}: it is not "
                            "elementwise and cannot be sharded"
                        )
                    dtypes.setdefault(name, np.dtype(str(value.dtype).removeprefix("torch.")))
        # One buffer for every array, zeros where a parameter has no such state.
        names = sorted(dtypes)
        packed = np.zeros(sum(size * dtypes[n].itemsize for n in names), dtype=np.uint8)
        arrays, offset = {}, 0
        for name in names:
            nbytes = size * dtypes[name].itemsize
            arrays[name] = packed[offset : offset + nbytes].view(dtypes[name])
            offset += nbytes
        records: dict[int, ParamRecord] = {}
        for (_piece, a, b, index, start, stop), entry in entries:
            if not entry:
                continue
            have, scalars = [], {}
            for name in sorted(entry):
                value = entry[name]
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    arrays[name][a - self.lo : b - self.lo] = value.detach().reshape(-1).numpy()
                    have.append(name)
                else:
                    scalars[name] = _encode_scalar(value)
            previous = records.get(index)
            if previous is not None and (previous.arrays, previous.scalars) != (
                tuple(have),
                scalars,
            ):
                raise TaskError(f"pieces of parameter {index} disagree on their optimizer state")
            records[index] = ParamRecord(index, start, stop, tuple(have), scalars)
        return ShardState(self.lo, self.hi, arrays, records, packed=packed)

    def load_state(self, state: ShardState) -> None:
        """Restore a :meth:`state` taken over the same element range (re-cut first if not).
        Pieces of parameters without a record get no state, as in a fresh optimizer."""
        if (state.lo, state.hi) != (self.lo, self.hi):
            raise ValueError(
                f"state covers [{state.lo}, {state.hi}), shard is [{self.lo}, {self.hi})"
            )
        if self.optimizer is None:
            return
        for piece, a, b, index, _start, _stop in self.pieces:
            record = state.params.get(index)
            if record is None:
                self.optimizer.state.pop(piece, None)
                continue
            entry: dict[str, Any] = {}
            for name in record.arrays:
                values = np.array(state.arrays[name][a - self.lo : b - self.lo])
                entry[name] = torch.from_numpy(values).reshape(piece.shape)
            for name, encoded in record.scalars.items():
                entry[name] = _decode_scalar(encoded)
            self.optimizer.state[piece] = dict(sorted(entry.items()))


def _encode_scalar(value: Any) -> list[Any]:
    """A per-parameter scalar of optimizer state as ``[kind, ...]``, exactly."""
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.item()]
    if value is None:
        return ["none"]
    if isinstance(value, bool | int | float):
        return [type(value).__name__, value]
    raise TaskError(f"optimizer state holds a {type(value).__name__}, which smlt cannot shard")


def _decode_scalar(encoded: list[Any]) -> Any:
    kind = encoded[0]
    if kind == "tensor":
        return torch.tensor(encoded[2], dtype=getattr(torch, encoded[1]))
    if kind == "none":
        return None
    return {"bool": bool, "int": int, "float": float}[kind](encoded[1])
