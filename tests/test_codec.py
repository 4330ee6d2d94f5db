from __future__ import annotations

import numpy as np
import pytest

from smlt.errors import CodecError
from smlt.sync.codec import FrameHeader, decode, decode_frame, encode

HEADER = FrameHeader("grad", "job-a", 7, 2, 1)


def test_round_trip_is_exact_and_zero_copy() -> None:
    values = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    frame = encode(HEADER, values)
    decoded = decode(frame, HEADER, "k")
    np.testing.assert_array_equal(decoded, values)
    assert decoded.dtype == np.float32
    assert not decoded.flags.writeable  # a view into the frame, not a copy


def test_encoding_is_deterministic() -> None:
    values = np.arange(50, dtype=np.float32)
    assert encode(HEADER, values) == encode(HEADER, values.copy())


def test_empty_array_round_trips() -> None:
    frame = encode(HEADER, np.zeros(0, np.float32))
    assert decode(frame, HEADER, "k").size == 0


def test_truncated_frame_names_the_key() -> None:
    frame = encode(HEADER, np.ones(100, np.float32))
    with pytest.raises(CodecError, match=r"smlt:job-a:t7:grad:2:1: truncated"):
        decode(frame[:-1], HEADER, "smlt:job-a:t7:grad:2:1")


def test_corrupted_payload_is_caught_by_checksum() -> None:
    frame = bytearray(encode(HEADER, np.ones(100, np.float32)))
    frame[-10] ^= 0xFF
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(frame), HEADER, "k")


@pytest.mark.parametrize(
    "other",
    [
        FrameHeader("grad", "job-b", 7, 2, 1),
        FrameHeader("grad", "job-a", 8, 2, 1),
        FrameHeader("grad", "job-a", 7, 3, 1),
        FrameHeader("grad", "job-a", 7, 2, 0),
        FrameHeader("param", "job-a", 7, 2, 1),
    ],
)
def test_frame_under_the_wrong_key_is_rejected(other: FrameHeader) -> None:
    frame = encode(HEADER, np.ones(4, np.float32))
    with pytest.raises(CodecError, match="frame belongs to"):
        decode(frame, other, "k")


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00" * 40, b"not msgpack at all \xc1\xc1", b"\x93\x01"]
)
def test_garbage_is_a_codec_error(garbage: bytes) -> None:
    with pytest.raises(CodecError, match="^k: "):
        decode(garbage, HEADER, "k")


def test_missing_value_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="no value"):
        decode(None, HEADER, "k")


def test_unsupported_dtype_is_refused_at_encode() -> None:
    with pytest.raises(TypeError, match="1-D"):
        encode(HEADER, np.ones((2, 2), np.float32))
    with pytest.raises(TypeError):
        encode(HEADER, np.ones(3, np.int64))


def test_side_value_round_trips_and_is_covered_by_the_checksum() -> None:
    values = np.arange(10, dtype=np.float32)
    side = {"g": b"\x05", "w": 0.25, "i": {"3": b"\x01\x00"}}
    frame = encode(HEADER, values, side)
    got = decode_frame(frame, HEADER, "k")
    assert got.side == side
    np.testing.assert_array_equal(got.array, values)
    assert decode_frame(encode(HEADER, values), HEADER, "k").side is None
    # A flipped bit in the side (inside the header) is caught like one in the payload.
    raw = bytearray(frame)
    raw[raw.index(b"\x05")] ^= 0x01
    with pytest.raises(CodecError, match="checksum"):
        decode_frame(bytes(raw), HEADER, "k")


def test_a_large_side_value_is_read_whole() -> None:
    side = {"blob": bytes(range(256)) * 400}  # 100 KB: many header read steps
    frame = encode(HEADER, np.ones(3, np.float32), side)
    assert decode_frame(frame, HEADER, "k").side == side
