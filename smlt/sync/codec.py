"""Wire frames for arrays in the parameter store.

A frame is a msgpack map (the header) immediately followed by a msgpack ``bin`` holding the raw
little-endian array bytes::

    {"v": 1, "kind": "grad", "job": J, "t": t, "s": s, "r": r,
     "dtype": "float32", "n": n_elements, "crc": crc32(payload)[, "x": side]}  ++  bin(payload)

The optional ``side`` is a small msgpack value that travels with the array and is covered by
the same checksum: what a writer must say about its array that is not an array element (which
parameters had a gradient at all, which buffers its forward pass changed, the model's integer
buffers). It never holds tensors of the model's size.

The header says exactly which (job, iteration, shard, rank) the bytes belong to, so a frame read
under the wrong key, a truncated frame and a corrupted payload are all caught here and reported
with the key that held them (:class:`~smlt.errors.CodecError`), never silently averaged into a
model. Decoding is zero-copy: the returned array is a read-only view into the frame.

Encoding is deterministic (same array, same header -> same bytes), which is what makes a
re-executed worker's write harmless.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from smlt.errors import CodecError

__all__ = ["FRAME_VERSION", "Frame", "FrameHeader", "decode", "decode_frame", "encode"]

FRAME_VERSION = 1
_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "uint8": np.dtype("u1"),
}
# Headers are read in steps of this many bytes (most fit in the first), up to the limit: a side
# is metadata, and a frame claiming a bigger header is corrupt.
_HEADER_STEP_BYTES = 1024
_MAX_HEADER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class FrameHeader:
    """What a frame claims to be. ``rank`` is -1 for values that belong to no single writer."""

    kind: str
    job: str
    t: int
    shard: int
    rank: int = -1


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its array (a read-only view into the frame) and its side value."""

    array: np.ndarray
    side: Any = None


def encode(header: FrameHeader, array: np.ndarray, side: Any = None) -> bytes:
    """One frame for ``array`` (1-D, a dtype of ``_DTYPES``), with an optional ``side`` value
    (anything msgpack encodes; dicts keep their insertion order, so equal sides built the same
    way encode to equal bytes)."""
    arr = np.ascontiguousarray(array)
    dtype_name = next((k for k, v in _DTYPES.items() if v == arr.dtype), None)
    if dtype_name is None or arr.ndim != 1:
        raise TypeError(
            f"frames hold 1-D float32/float64/uint8 arrays, got {arr.dtype} {arr.shape}"
        )
    payload = memoryview(arr).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    fields: dict[str, Any] = {
        "v": FRAME_VERSION,
        "kind": header.kind,
        "job": header.job,
        "t": header.t,
        "s": header.shard,
        "r": header.rank,
        "dtype": dtype_name,
        "n": int(arr.size),
    }
    side_bytes = b""
    if side is not None:
        side_bytes = msgpack.packb(side)
        fields["x"] = side_bytes
    fields["crc"] = zlib.crc32(payload, zlib.crc32(side_bytes))
    head = msgpack.packb(fields)
    # Always bin 32 (marker 0xc6 + 4-byte big-endian length): up to 4 GiB, fixed-size header.
    # One copy of the payload (the join); redis-py then sends the bytes without copying again.
    return b"".join((head, b"\xc6", len(payload).to_bytes(4, "big"), payload))


def decode(frame: bytes | memoryview | None, expect: FrameHeader, key: str) -> np.ndarray:
    """The array in ``frame``, checked against ``expect``; raises CodecError naming ``key``."""
    return decode_frame(frame, expect, key).array


def decode_frame(frame: bytes | memoryview | None, expect: FrameHeader, key: str) -> Frame:
    """The array and side value in ``frame``, checked against ``expect`` and the checksum;
    raises CodecError naming ``key``."""
    if frame is None:
        raise CodecError(f"{key}: no value in the store (expired or never written)")
    view = memoryview(frame)
    head, offset = _read_header(view, key)
    if not isinstance(head, dict) or head.get("v") != FRAME_VERSION:
        version = head.get("v") if isinstance(head, dict) else None
        raise CodecError(f"{key}: not an smlt frame of version {FRAME_VERSION} (got {version!r})")
    got = FrameHeader(
        str(head.get("kind")),
        str(head.get("job")),
        _int(head.get("t")),
        _int(head.get("s")),
        _int(head.get("r")),
    )
    if got != expect:
        raise CodecError(f"{key}: frame belongs to {got}, expected {expect}")
    dtype: np.dtype[Any] | None = _DTYPES.get(str(head.get("dtype", "")))
    if dtype is None:
        raise CodecError(f"{key}: unknown dtype {head.get('dtype')!r}")
    payload_len, offset = _read_bin_header(view, offset, key)
    n = _int(head.get("n"))
    if payload_len != n * dtype.itemsize or len(view) - offset != payload_len:
        raise CodecError(
            f"{key}: truncated or padded frame: header says {n} x {dtype.name}, "
            f"bin says {payload_len} bytes, {len(view) - offset} bytes present"
        )
    payload = view[offset:]
    side_bytes = head.get("x", b"")
    if not isinstance(side_bytes, bytes) or zlib.crc32(payload, zlib.crc32(side_bytes)) != head.get(
        "crc"
    ):
        raise CodecError(f"{key}: payload checksum mismatch (corrupted in the store or in transit)")
    side = None
    if side_bytes:
        try:
            side = msgpack.unpackb(side_bytes, strict_map_key=False)
        except Exception as exc:  # the checksum matched, so this is a writer's bug
            raise CodecError(f"{key}: frame side value is not valid msgpack ({exc})") from exc
    return Frame(np.frombuffer(payload, dtype=dtype), side)


def _read_header(view: memoryview, key: str) -> tuple[Any, int]:
    """The header map and where it ends. Fed in small steps: copying the whole frame into the
    unpacker to read a header of a few hundred bytes would cost a pass over the payload."""
    unpacker = msgpack.Unpacker(raw=False, max_bin_len=_MAX_HEADER_BYTES)
    fed = 0
    while True:
        step = view[fed : fed + _HEADER_STEP_BYTES]
        if not step or fed >= _MAX_HEADER_BYTES:
            raise CodecError(f"{key}: frame header is truncated or larger than its limit")
        unpacker.feed(step)
        fed += len(step)
        try:
            head = unpacker.unpack()
            return head, unpacker.tell()
        except msgpack.OutOfData:
            continue
        except Exception as exc:  # msgpack raises several unrelated types for bad bytes
            raise CodecError(f"{key}: frame header is not valid msgpack ({exc})") from exc


def _int(value: object) -> int:
    """A header integer; anything else becomes -2, which matches no expected header."""
    return value if isinstance(value, int) else -2


def _read_bin_header(view: memoryview, offset: int, key: str) -> tuple[int, int]:
    marker = view[offset] if offset < len(view) else None
    widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
    if marker not in widths:
        raise CodecError(f"{key}: frame has no binary payload after its header")
    width = widths[marker]
    raw = bytes(view[offset + 1 : offset + 1 + width])
    if len(raw) != width:
        raise CodecError(f"{key}: frame truncated inside its payload header")
    return int.from_bytes(raw, "big"), offset + 1 + width
