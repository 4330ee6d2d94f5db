"""A job's state at one version, and moving it between shardings, stores and checkpoints.

The state of a job at version t is
- the flat vector (parameters, then float buffers; :mod:`smlt.protocol.model`), cut into n
  parameter shards, each stored as a frame whose side value holds the model's non-float buffers
  (:meth:`~smlt.protocol.model.FlatModel.discrete_state`, the same in every shard);
- the optimizer state, cut the same way: one :class:`ShardState` per shard.

How the optimizer state is cut depends on the optimizer. An *elementwise* optimizer (SGD, Adam,
...) keeps one array per parameter element (momentum, moments) plus a few per-parameter scalars
(Adam's step count, which differs between parameters that did and did not get gradients): a shard
holds the arrays over its element range and the records of the parameters that meet it, so
shards of n workers concatenate into the whole state, which re-cuts for any other n. Any other
optimizer is *replicated*: every worker holds the whole state, serialized deterministically
(:func:`encode_optimizer_state`), and shard s holds bytes ``shard_slice(L, n, s)`` of it, so the
store and the checkpoint carry it once, not n times.

Changing n is therefore: collect the old shards into a :class:`Version`, cut it again, publish.
Parameters are published after their optimizer shards (same connection, in order), so a worker
that finds a parameter shard always finds the optimizer shard beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from smlt.errors import CodecError
from smlt.protocol.model import FlatModel
from smlt.storage.checkpoint import Checkpoint
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import publish_params
from smlt.sync.shards import shard_slice
from smlt.sync.store import DEFAULT_PARAM_TTL_S, ParameterStore

__all__ = [
    "ParamRecord",
    "ShardState",
    "Version",
    "collect_from_store",
    "decode_optimizer_state",
    "encode_optimizer_state",
    "model_side",
    "optim_frame",
    "publish_version",
    "read_optim_state",
    "read_snapshot",
    "reshard_store",
    "restore_checkpoint",
    "side_buffers",
    "side_grad_norms",
]

_STATE_FORMAT = 2


# -- the side value of a parameter frame ----------------------------------------------------------


def model_side(buffers: dict[str, bytes], grad_norms: np.ndarray | None = None) -> dict[str, Any]:
    """The side value every parameter frame carries: the model's non-float buffers; and, in a
    frame a step published, the gradient norms its shard contributes to the step's global
    gradient norm (float32, in order: see :mod:`smlt.worker.clipping`)."""
    side: dict[str, Any] = {"buffers": buffers}
    if grad_norms is not None:
        side["gnorm"] = np.ascontiguousarray(grad_norms, dtype="<f4").tobytes()
    return side


def side_buffers(side: Any, where: str) -> dict[str, bytes]:
    """The non-float buffers out of a parameter frame's side value."""
    if side is None:
        return {}
    buffers = side.get("buffers") if isinstance(side, dict) else None
    if not isinstance(buffers, dict) or not all(
        isinstance(k, str) and isinstance(v, bytes) for k, v in buffers.items()
    ):
        raise CodecError(f"{where}: parameter frame's side value has no readable buffers")
    return dict(buffers)


def side_grad_norms(side: Any, where: str) -> np.ndarray | None:
    """The gradient norms out of a parameter frame's side value; None if it has none (the
    frames of version 0, and of a re-sharded or restored version, which no step published)."""
    raw = side.get("gnorm") if isinstance(side, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise CodecError(f"{where}: parameter frame's gradient norms are not float32 values")
    return np.frombuffer(raw, dtype="<f4")


# -- optimizer state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRecord:
    """The optimizer state of one parameter (by its index in model order) that has any: which
    per-element arrays it has, and its scalars (each ``[kind, ...]``, see ``_encode_scalar``)."""

    index: int
    start: int
    stop: int
    arrays: tuple[str, ...]
    scalars: dict[str, list[Any]]


@dataclass(frozen=True)
class ShardState:
    """Optimizer state of elements ``[lo, hi)`` (one shard, or the whole vector).

    Elementwise optimizers fill ``arrays`` (per element, zeros where a parameter has no such
    state) and ``params`` (the parameters meeting ``[lo, hi)`` that have state). A replicated
    optimizer fills ``blob`` instead: bytes ``[blob_start, blob_start + len(blob))`` of its
    serialized whole state of ``blob_total`` bytes.
    """

    lo: int
    hi: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[int, ParamRecord] = field(default_factory=dict)
    blob: bytes = b""
    blob_start: int = 0
    blob_total: int = 0
    #: The arrays' bytes, one after the other in ``arrays`` order, when the arrays are views of
    #: one buffer (as :meth:`ShardOptimizer.state` builds them): encoding then copies nothing.
    packed: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def empty(self) -> bool:
        return not self.params and not self.blob_total

    def encode(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The state as a flat byte payload (the arrays one after the other, or the replicated
        slice) and a small description of it: a frame's array and side value. Large states
        travel without a pass through msgpack, and decode as views into the frame."""
        layout: list[list[Any]] = []
        if self.blob_total:
            payload = np.frombuffer(self.blob, dtype=np.uint8)
        elif self.packed is not None:
            payload, offset = self.packed, 0
            for name, values in self.arrays.items():
                layout.append([name, str(values.dtype), offset, values.nbytes])
                offset += values.nbytes
        else:
            views, offset = [], 0
            for name, values in self.arrays.items():
                raw = np.ascontiguousarray(values).view(np.uint8)
                layout.append([name, str(values.dtype), offset, raw.size])
                views.append(raw)
                offset += raw.size
            payload = _joined(views, offset)
        meta = {
            "format": _STATE_FORMAT,
            "lo": self.lo,
            "hi": self.hi,
            "arrays": layout,
            "params": [
                [r.index, r.start, r.stop, list(r.arrays), r.scalars] for r in self.params.values()
            ],
            "blob": [self.blob_start, self.blob_total],
        }
        return payload, meta

    @classmethod
    def decode(cls, payload: np.ndarray, meta: Any, where: str) -> ShardState:
        """The inverse of :meth:`encode`; arrays are read-only views into ``payload``."""
        try:
            if meta.get("format") != _STATE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_STATE_FORMAT}")
            lo, hi = int(meta["lo"]), int(meta["hi"])
            raw = payload.view(np.uint8)
            arrays = {
                name: raw[offset : offset + size].view(np.dtype(dtype))
                for name, dtype, offset, size in meta["arrays"]
            }
            params = {
                int(p[0]): ParamRecord(int(p[0]), int(p[1]), int(p[2]), tuple(p[3]), dict(p[4]))
                for p in meta["params"]
            }
            blob_start, blob_total = (int(v) for v in meta["blob"])
            blob = raw.tobytes() if blob_total else b""
            state = cls(lo, hi, arrays, params, blob, blob_start, blob_total)
        except Exception as exc:
            raise CodecError(f"{where}: optimizer state is not readable ({exc})") from exc
        for name, flat in arrays.items():
            if flat.size != hi - lo:
                raise CodecError(
                    f"{where}: state {name!r} has {flat.size} elements, expected {hi - lo}"
                )
        return state

    def to_bytes(self) -> bytes:
        """One self-contained byte string (msgpack; no pickle, so a worker never unpickles
        what another process wrote). Equal states give equal bytes."""
        payload, meta = self.encode()
        return msgpack.packb([meta, payload.tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ShardState:
        try:
            meta, payload = msgpack.unpackb(data, strict_map_key=False)
        except Exception as exc:
            raise CodecError(f"{where}: optimizer state is not readable ({exc})") from exc
        return cls.decode(np.frombuffer(payload, dtype=np.uint8), meta, where)

    @staticmethod
    def concatenate(parts: list[ShardState]) -> ShardState:
        """Join the states of consecutive shards (in any order) into one."""
        parts = sorted(parts, key=lambda p: (p.lo, p.blob_start))
        lo, hi = parts[0].lo, parts[-1].hi
        arrays: dict[str, np.ndarray] = {}
        for p in parts:
            for name, values in p.arrays.items():
                if name not in arrays:
                    arrays[name] = np.zeros(hi - lo, dtype=values.dtype)
                arrays[name][p.lo - lo : p.hi - lo] = values
        params: dict[int, ParamRecord] = {}
        for p in parts:
            for index, record in p.params.items():
                params.setdefault(index, record)
        blob_total = max(p.blob_total for p in parts)
        blob = b"".join(p.blob for p in parts)
        if len(blob) != blob_total:
            raise CodecError(
                f"replicated optimizer state: the shards hold {len(blob)} of {blob_total} bytes"
            )
        return ShardState(lo, hi, arrays, dict(sorted(params.items())), blob, 0, blob_total)

    def split(self, num_params: int, workers: int) -> list[ShardState]:
        """This whole state (``[0, num_params)``) cut for ``workers`` owners."""
        if (self.lo, self.hi) != (0, num_params) or self.blob_start != 0:
            raise ValueError(f"split() needs the whole state, got [{self.lo}, {self.hi})")
        out = []
        for s in range(workers):
            sl = shard_slice(num_params, workers, s)
            bl = shard_slice(self.blob_total, workers, s)
            out.append(
                ShardState(
                    sl.start,
                    sl.stop,
                    {k: v[sl].copy() for k, v in self.arrays.items()},
                    {
                        i: r
                        for i, r in self.params.items()
                        if r.start < sl.stop and sl.start < r.stop
                    },
                    self.blob[bl],
                    bl.start,
                    self.blob_total,
                )
            )
        return out


def encode_optimizer_state(optimizer: torch.optim.Optimizer) -> bytes:
    """The whole state of a (replicated) optimizer, deterministically: ``state_dict()`` in
    msgpack, tensors as (dtype, shape, raw bytes), tuples kept as tuples. Equal states give
    equal bytes, which is what lets every worker publish its slice of the same whole."""
    return msgpack.packb(optimizer.state_dict(), default=_encode_object, strict_types=True)


def decode_optimizer_state(data: bytes, where: str) -> dict[str, Any]:
    """A ``state_dict`` from :func:`encode_optimizer_state`'s bytes."""
    try:
        state: dict[str, Any] = msgpack.unpackb(
            data, ext_hook=_decode_object, strict_map_key=False, use_list=True
        )
    except Exception as exc:
        raise CodecError(f"{where}: replicated optimizer state is not readable ({exc})") from exc
    return state


_EXT_TENSOR, _EXT_TUPLE = 1, 2


def _encode_object(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        return msgpack.ExtType(_EXT_TENSOR, msgpack.packb([dtype, list(t.shape), raw]))
    if isinstance(value, tuple):
        return msgpack.ExtType(
            _EXT_TUPLE, msgpack.packb(list(value), default=_encode_object, strict_types=True)
        )
    # strict_types hands subclasses of the plain types here (e.g. an IntEnum, an OrderedDict).
    plain: Any
    for plain in (bool, int, float, str, bytes, list, dict):
        if isinstance(value, plain):
            return plain(value)
    raise TypeError(f"optimizer state holds a {type(value).__name__}, which smlt cannot store")


def _decode_object(code: int, data: bytes) -> Any:
    if code == _EXT_TENSOR:
        dtype_name, shape, raw = msgpack.unpackb(data)
        dtype = getattr(torch, dtype_name)
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()
    if code == _EXT_TUPLE:
        return tuple(msgpack.unpackb(data, ext_hook=_decode_object, strict_map_key=False))
    raise ValueError(f"unknown extension type {code}")


def optim_frame(keys: JobKeys, version: int, shard: int, state: ShardState) -> bytes:
    """The frame of one optimizer-state shard, as stored in Redis and in checkpoints: the
    state's payload as the array, its description as the side value."""
    payload, meta = state.encode()
    return codec.encode(codec.FrameHeader("optim", keys.job, version, shard), payload, meta)


def _decode_state(frame: bytes | None, job: str, version: int, shard: int, key: str) -> ShardState:
    got = codec.decode_frame(frame, codec.FrameHeader("optim", job, version, shard), key)
    return ShardState.decode(got.array, got.side, key)


def _joined(parts: list[np.ndarray], size: int) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    out = np.empty(size, dtype=np.uint8)
    offset = 0
    for part in parts:
        out[offset : offset + part.size] = part
        offset += part.size
    return out


def read_optim_state(
    store: ParameterStore, keys: JobKeys, version: int, shard: int
) -> ShardState | None:
    """Optimizer-state shard ``shard`` of ``version`` from the store, or None if there is none."""
    key = keys.optim(version, shard)
    frame = store.get(shard, key)
    return None if frame is None else _decode_state(frame, keys.job, version, shard, key)


# -- whole versions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """Everything a job's state at one version is, whole (not sharded)."""

    values: np.ndarray
    buffers: dict[str, bytes]
    optimizer: ShardState

    @classmethod
    def initial(cls, model: FlatModel) -> Version:
        """Version 0: the model as built, no optimizer state yet."""
        values = model.values_numpy().copy()
        return cls(values, model.discrete_state(), ShardState(0, values.size))


def _read_model(
    read: Callable[[int], tuple[bytes | None, str]],
    job: str,
    version: int,
    workers: int,
    num_params: int,
) -> tuple[np.ndarray, dict[str, bytes]]:
    """The vector and non-float buffers of ``version`` from its ``workers`` parameter frames;
    ``read(s)`` gives shard s's frame and a name for it (a key, a checkpoint object)."""
    values = np.empty(num_params, dtype=np.float32)
    buffers: dict[str, bytes] = {}
    for s in range(workers):
        raw, where = read(s)
        frame = codec.decode_frame(raw, codec.FrameHeader("param", job, version, s), where)
        sl = shard_slice(num_params, workers, s)
        if frame.array.size != sl.stop - sl.start:
            raise CodecError(
                f"{where}: holds {frame.array.size} values, shard {s} of {workers} over "
                f"{num_params} has {sl.stop - sl.start} (written under another sharding?)"
            )
        values[sl] = frame.array
        buffers = side_buffers(frame.side, where)
    return values, buffers


def collect_from_store(
    store: ParameterStore, keys: JobKeys, version: int, workers: int, num_params: int
) -> Version:
    """The whole state of ``version``, sharded over ``workers`` in the store."""
    values, buffers = _read_model(
        lambda s: (store.get(s, keys.param(version, s)), keys.param(version, s)),
        keys.job,
        version,
        workers,
        num_params,
    )
    states = []
    for s in range(workers):
        sl = shard_slice(num_params, workers, s)
        state = read_optim_state(store, keys, version, s)
        states.append(state if state is not None else ShardState(sl.start, sl.stop))
    return Version(values, buffers, ShardState.concatenate(states))


def read_snapshot(
    store: ParameterStore, keys: JobKeys, version: int, workers: int, num_params: int
) -> tuple[np.ndarray, dict[str, bytes]]:
    """The model (vector and non-float buffers) of ``version`` from the copies its owners kept
    for the evaluator (``snapshot`` keys), which outlive the version's own keys."""
    return _read_model(
        lambda s: (store.get(s, keys.snapshot(version, s)), keys.snapshot(version, s)),
        keys.job,
        version,
        workers,
        num_params,
    )


def publish_version(
    store: ParameterStore,
    keys: JobKeys,
    version: int,
    state: Version,
    workers: int,
    *,
    ttl_s: int = DEFAULT_PARAM_TTL_S,
) -> None:
    """Write ``state`` as ``version`` for ``workers`` owners: optimizer shards first, then the
    parameters (announced, so workers can gather them)."""
    num_params = state.values.size
    for s, part in enumerate(state.optimizer.split(num_params, workers)):
        store.put(s, [(keys.optim(version, s), optim_frame(keys, version, s, part))], ttl_s=ttl_s)
    publish_params(
        store, keys, version, state.values, workers, side=model_side(state.buffers), ttl_s=ttl_s
    )


def _drop_version(store: ParameterStore, keys: JobKeys, version: int, workers: int) -> None:
    for s in range(workers):
        store.unlink(s, [keys.param(version, s), keys.optim(version, s)])
    store.unlink(0, [keys.param_ready(version)])


def reshard_store(
    store: ParameterStore,
    keys: JobKeys,
    version: int,
    old_workers: int,
    new_workers: int,
    num_params: int,
) -> None:
    """Re-cut ``version`` from ``old_workers`` shards into ``new_workers`` (re-scaling)."""
    state = collect_from_store(store, keys, version, old_workers, num_params)
    _drop_version(store, keys, version, old_workers)
    publish_version(store, keys, version, state, new_workers)


def read_checkpoint(checkpoint: Checkpoint, job: str) -> Version:
    """The whole state saved in a committed checkpoint (every shard verified by its hash)."""
    version, workers = checkpoint.iteration, checkpoint.workers
    where = f"checkpoint {version} shard"
    values, buffers = _read_model(
        lambda s: (checkpoint.read_shard("param", s), f"{where} param-{s}"),
        job,
        version,
        workers,
        checkpoint.num_params,
    )
    states = [
        _decode_state(checkpoint.read_shard("optim", s), job, version, s, f"{where} optim-{s}")
        for s in range(workers)
    ]
    return Version(values, buffers, ShardState.concatenate(states))


def restore_checkpoint(
    store: ParameterStore, keys: JobKeys, checkpoint: Checkpoint, workers: int
) -> int:
    """Publish a committed checkpoint into the store for ``workers`` owners; its iteration."""
    state = read_checkpoint(checkpoint, keys.job)
    _drop_version(store, keys, checkpoint.iteration, max(workers, checkpoint.workers))
    publish_version(store, keys, checkpoint.iteration, state, workers)
    return checkpoint.iteration
