"""Moving a job's state between shardings: re-scaling, and restoring a checkpoint.

The state of a job at version t is the flat parameter vector plus the optimizer state as flat
arrays over the same elements (:class:`~smlt.worker.optim.ShardState`). Both are cut into n
shards by the same arithmetic, so changing n is: gather the old shards into whole vectors, cut
them again, publish. Parameters are announced last, after their optimizer shards, so a worker
that sees a parameter shard announced always finds the optimizer shard beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from smlt.errors import CodecError
from smlt.storage.checkpoint import Checkpoint
from smlt.sync import codec
from smlt.sync.keys import JobKeys
from smlt.sync.scatter_reduce import publish_params
from smlt.sync.shards import shard_slice
from smlt.sync.store import DEFAULT_PARAM_TTL_S, ParameterStore

__all__ = [
    "ShardState",
    "collect_from_store",
    "publish_state",
    "reshard_store",
    "restore_checkpoint",
]


def _decode_param(frame: bytes | None, job: str, version: int, shard: int, key: str) -> np.ndarray:
    return codec.decode(frame, codec.FrameHeader("param", job, version, shard), key)


def _decode_state(frame: bytes | None, job: str, version: int, shard: int, key: str) -> ShardState:
    raw = codec.decode(frame, codec.FrameHeader("optim", job, version, shard), key)
    return ShardState.from_bytes(raw.tobytes(), key)


def collect_from_store(
    store: ParameterStore, keys: JobKeys, version: int, workers: int, num_params: int
) -> tuple[np.ndarray, ShardState]:
    """The whole parameter vector and optimizer state of ``version``, sharded over ``workers``."""
    params = np.empty(num_params, dtype=np.float32)
    states = []
    for s in range(workers):
        sl = shard_slice(num_params, workers, s)
        key = keys.param(version, s)
        params[sl] = _decode_param(store.get(s, key), keys.job, version, s, key)
        okey = keys.optim(version, s)
        frame = store.get(s, okey)
        states.append(
            _decode_state(frame, keys.job, version, s, okey)
            if frame is not None
            else ShardState(sl.start, sl.stop, {}, {})
        )
    return params, ShardState.concatenate(states)


def publish_state(
    store: ParameterStore,
    keys: JobKeys,
    version: int,
    params: np.ndarray,
    state: ShardState,
    workers: int,
    *,
    ttl_s: int = DEFAULT_PARAM_TTL_S,
) -> None:
    """Write ``version`` for ``workers`` owners: optimizer shards first, then parameters."""
    num_params = params.size
    for s in range(workers):
        sl = shard_slice(num_params, workers, s)
        part = state.slice(sl.start, sl.stop).to_bytes()
        frame = codec.encode(
            codec.FrameHeader("optim", keys.job, version, s), np.frombuffer(part, dtype=np.uint8)
        )
        store.put(s, [(keys.optim(version, s), frame)], ttl_s=ttl_s)
    publish_params(store, keys, version, params, workers, ttl_s=ttl_s)


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
    params, state = collect_from_store(store, keys, version, old_workers, num_params)
    _drop_version(store, keys, version, old_workers)
    publish_state(store, keys, version, params, state, new_workers)


def restore_checkpoint(
    store: ParameterStore, keys: JobKeys, checkpoint: Checkpoint, workers: int
) -> int:
    """Publish a committed checkpoint into the store for ``workers`` owners; its iteration."""
    version = checkpoint.iteration
    num_params = checkpoint.num_params
    params = np.empty(num_params, dtype=np.float32)
    states = []
    for s in range(checkpoint.workers):
        where = f"checkpoint {version} shard {s}"
        sl = shard_slice(num_params, checkpoint.workers, s)
        params[sl] = _decode_param(checkpoint.read_shard("param", s), keys.job, version, s, where)
        states.append(_decode_state(checkpoint.read_shard("optim", s), keys.job, version, s, where))
    _drop_version(store, keys, version, max(workers, checkpoint.workers))
    publish_state(store, keys, version, params, ShardState.concatenate(states), workers)
    return version


@dataclass(frozen=True)
class ShardState:
    """Optimizer state of elements ``[lo, hi)``: per-element arrays and shared scalars."""

    lo: int
    hi: int
    arrays: dict[str, np.ndarray]
    scalars: dict[str, tuple[float, str]]

    def to_bytes(self) -> bytes:
        """msgpack: no pickle, so a worker never unpickles what another process wrote."""
        return msgpack.packb(
            {
                "lo": self.lo,
                "hi": self.hi,
                "arrays": {k: v.astype(np.float32).tobytes() for k, v in self.arrays.items()},
                "scalars": {k: list(v) for k, v in self.scalars.items()},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ShardState:
        try:
            raw = msgpack.unpackb(data)
            arrays = {k: np.frombuffer(v, dtype=np.float32) for k, v in raw["arrays"].items()}
            scalars = {k: (float(v[0]), str(v[1])) for k, v in raw["scalars"].items()}
            state = cls(int(raw["lo"]), int(raw["hi"]), arrays, scalars)
        except Exception as exc:
            raise CodecError(f"{where}: optimizer state is not readable ({exc})") from exc
        for name, flat in arrays.items():
            if flat.size != state.hi - state.lo:
                raise CodecError(
                    f"{where}: state {name!r} has {flat.size} elements, "
                    f"expected {state.hi - state.lo}"
                )
        return state

    @staticmethod
    def concatenate(parts: list[ShardState]) -> ShardState:
        """Join the states of consecutive shards (in shard order) into one."""
        parts = sorted(parts, key=lambda p: p.lo)
        lo, hi = parts[0].lo, parts[-1].hi
        names = {name for p in parts for name in p.arrays}
        arrays = {}
        for name in names:
            flat = np.zeros(hi - lo, dtype=np.float32)
            for p in parts:
                if name in p.arrays:
                    flat[p.lo - lo : p.hi - lo] = p.arrays[name]
            arrays[name] = flat
        scalars: dict[str, tuple[float, str]] = {}
        for p in parts:
            scalars.update(p.scalars)
        return ShardState(lo, hi, arrays, scalars)

    def slice(self, lo: int, hi: int) -> ShardState:
        """The state of elements ``[lo, hi)`` (a sub-range of this one)."""
        if not self.lo <= lo <= hi <= self.hi:
            raise ValueError(f"[{lo}, {hi}) is not inside [{self.lo}, {self.hi})")
        arrays = {k: v[lo - self.lo : hi - self.lo].copy() for k, v in self.arrays.items()}
        return ShardState(lo, hi, arrays, dict(self.scalars))
