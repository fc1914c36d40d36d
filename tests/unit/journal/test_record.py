"""On-disk record format: round trips, and the CRC catches damage."""

from __future__ import annotations

import struct

import pytest

from secondsite.appliance.journal.record import (
    HEADER,
    SEGMENT_MAGIC,
    CheckpointPayload,
    PositionPayload,
    RecordType,
    crc32c,
    crc_ok,
    decode_checkpoint,
    decode_header,
    decode_position,
    decode_segment_header,
    encode_checkpoint,
    encode_header,
    encode_position,
    encode_segment_header,
)


def test_header_round_trip_and_crc() -> None:
    payload = b"hello world" * 100
    raw = encode_header(
        RecordType.WRITE, 7, 42, 4096, len(payload), 123456789, payload, incarnation=0xDEADBEEF
    )
    assert len(raw) == HEADER.size == 56
    h = decode_header(raw)
    assert h is not None
    assert (h.type, h.volume, h.seq, h.offset, h.length, h.time_ns, h.payload_len) == (
        RecordType.WRITE,
        7,
        42,
        4096,
        len(payload),
        123456789,
        len(payload),
    )
    assert h.incarnation == 0xDEADBEEF
    assert crc_ok(raw, payload, h.crc)


@pytest.mark.parametrize("size", [1, 4096, (64 << 10) - 1, 64 << 10, (1 << 20) + 3])
def test_a_payload_in_any_buffer_gets_the_crc_of_its_bytes(size: int) -> None:
    """NBD hands large writes over as bytearrays (checksummed in place): the header must be the
    same as for the bytes, and a scan must accept it."""
    data = bytes((i * 7 + size) % 251 for i in range(size))
    for payload in (bytearray(data), memoryview(bytearray(data)), memoryview(data)[0:]):
        raw = encode_header(RecordType.WRITE, 1, 9, 0, size, 5, payload, incarnation=3)
        assert raw == encode_header(RecordType.WRITE, 1, 9, 0, size, 5, data, incarnation=3)
        h = decode_header(raw)
        assert h is not None and crc_ok(raw, data, h.crc)
    assert crc32c(memoryview(bytearray(data))[1:], 17) == crc32c(data[1:], 17)


@pytest.mark.parametrize("where", [0, 10, 500, 1099])
def test_crc_detects_a_flipped_payload_byte(where: int) -> None:
    payload = bytearray(b"x" * 1100)
    raw = encode_header(RecordType.WRITE, 0, 1, 0, len(payload), 1, bytes(payload), incarnation=5)
    h = decode_header(raw)
    assert h is not None
    payload[where] ^= 0x01
    assert not crc_ok(raw, bytes(payload), h.crc)


@pytest.mark.parametrize("where", [8, 16, 24, 32, 40, 52])
def test_crc_detects_a_flipped_header_byte(where: int) -> None:
    raw = bytearray(encode_header(RecordType.ZERO, 3, 9, 512, 1024, 5, b"", incarnation=77))
    crc = decode_header(bytes(raw))
    assert crc is not None
    raw[where] ^= 0x80
    h = decode_header(bytes(raw))
    assert h is None or not crc_ok(bytes(raw), b"", crc.crc)


def test_bad_magic_version_or_type_is_not_a_header() -> None:
    raw = encode_header(RecordType.TRIM, 0, 1, 0, 1, 1, b"", incarnation=1)
    assert decode_header(b"XXXX" + raw[4:]) is None
    assert decode_header(raw[:4] + b"\x09" + raw[5:]) is None
    assert decode_header(raw[:5] + b"\x63" + raw[6:]) is None
    assert decode_header(raw[:-1]) is None


def test_checkpoint_payload_round_trip() -> None:
    for p in (CheckpointPayload(5, True, None), CheckpointPayload(6, False, "before-upgrade ✓")):
        assert decode_checkpoint(encode_checkpoint(p)) == p
    with pytest.raises(ValueError):
        decode_checkpoint(encode_checkpoint(CheckpointPayload(1, True, "x")) + b"junk")


def test_position_payload_round_trip() -> None:
    for p in (PositionPayload("n", 0), PositionPayload("node-ü" * 36, (1 << 64) - 1)):
        raw = encode_position(p)
        assert raw[0] == len(p.source.encode()) and len(raw) == 1 + raw[0] + 8
        assert decode_position(raw) == p
    raw = encode_position(PositionPayload("node-1", 77))
    for bad in (raw[:-1], raw + b"\0", b"\0" + raw[1:], raw[:3]):
        with pytest.raises(ValueError):
            decode_position(bad)


@pytest.mark.parametrize(
    "p", [PositionPayload("", 1), PositionPayload("x" * 256, 1), PositionPayload("n", -1)]
)
def test_position_payload_limits(p: PositionPayload) -> None:
    with pytest.raises(ValueError):
        encode_position(p)


def test_record_types_keep_their_numbers() -> None:
    assert [(t.name, t.value) for t in RecordType] == [
        ("WRITE", 1),
        ("ZERO", 2),
        ("TRIM", 3),
        ("CHECKPOINT", 4),
        ("POSITION", 5),
    ]


@pytest.mark.parametrize("recycled", [False, True])
def test_segment_header_round_trip_and_damage(recycled: bool) -> None:
    raw = encode_segment_header(12, 3456, 789, 0xCAFE, recycled=recycled)
    assert len(raw) == 64
    assert decode_segment_header(raw) == (12, 3456, 789, 0xCAFE, recycled)
    for where in (20, 40, 44, 50):  # first seq, incarnation, flags, padding
        damaged = bytearray(raw)
        damaged[where] ^= 1
        assert decode_segment_header(bytes(damaged)) is None, where
    assert decode_segment_header(raw[:63]) is None


def test_version_1_segment_header_is_read_with_incarnation_0() -> None:
    """Segments written before incarnations (version 1: CRC over the fields, zero padding)."""
    v1 = struct.Struct("<8sHHQQQI24x")
    fields = (SEGMENT_MAGIC, 1, 64, 12, 3456, 789)
    raw = v1.pack(*fields, crc32c(v1.pack(*fields, 0)))
    assert decode_segment_header(raw) == (12, 3456, 789, 0, False)
    assert decode_segment_header(raw[:40] + b"\1" + raw[41:]) is None
