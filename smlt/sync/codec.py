"""Wire frames for arrays in the parameter store.

A frame is a msgpack map (the header) immediately followed by a msgpack ``bin`` holding the raw
little-endian array bytes::

    {"v": 1, "kind": "grad", "job": J, "t": t, "s": s, "r": r,
     "dtype": "float32", "n": n_elements, "crc": crc32(payload)}  ++  bin(payload)

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

__all__ = ["FRAME_VERSION", "FrameHeader", "decode", "encode"]

FRAME_VERSION = 1
_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "uint8": np.dtype("u1"),
}
# The header is small; reading it never needs more than this many bytes of the frame.
_MAX_HEADER_BYTES = 1024


@dataclass(frozen=True)
class FrameHeader:
    """What a frame claims to be. ``rank`` is -1 for values that belong to no single writer."""

    kind: str
    job: str
    t: int
    shard: int
    rank: int = -1


def encode(header: FrameHeader, array: np.ndarray) -> bytes:
    """One frame for ``array`` (1-D, a dtype of ``_DTYPES``)."""
    arr = np.ascontiguousarray(array)
    dtype_name = next((k for k, v in _DTYPES.items() if v == arr.dtype), None)
    if dtype_name is None or arr.ndim != 1:
        raise TypeError(
            f"frames hold 1-D float32/float64/uint8 arrays, got {arr.dtype} {arr.shape}"
        )
    payload = memoryview(arr).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    head = msgpack.packb(
        {
            "v": FRAME_VERSION,
            "kind": header.kind,
            "job": header.job,
            "t": header.t,
            "s": header.shard,
            "r": header.rank,
            "dtype": dtype_name,
            "n": int(arr.size),
            "crc": zlib.crc32(payload),
        }
    )
    # Always bin 32 (marker 0xc6 + 4-byte big-endian length): up to 4 GiB, fixed-size header.
    # One copy of the payload (the join); redis-py then sends the bytes without copying again.
    return b"".join((head, b"\xc6", len(payload).to_bytes(4, "big"), payload))


def decode(frame: bytes | memoryview | None, expect: FrameHeader, key: str) -> np.ndarray:
    """The array in ``frame``, checked against ``expect``; raises CodecError naming ``key``."""
    if frame is None:
        raise CodecError(f"{key}: no value in the store (expired or never written)")
    view = memoryview(frame)
    unpacker = msgpack.Unpacker(raw=False, max_bin_len=0, max_buffer_size=_MAX_HEADER_BYTES)
    unpacker.feed(view[:_MAX_HEADER_BYTES])
    try:
        head = unpacker.unpack()
        offset = unpacker.tell()
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise CodecError(f"{key}: frame header is not valid msgpack ({exc})") from exc
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
    if zlib.crc32(payload) != head.get("crc"):
        raise CodecError(f"{key}: payload checksum mismatch (corrupted in the store or in transit)")
    return np.frombuffer(payload, dtype=dtype)


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
