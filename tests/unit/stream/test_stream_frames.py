"""The frame codec: every frame type round-trips, and hostile input only ever yields
ProtocolError, with memory bounded by the header plus ``max_body``."""

from __future__ import annotations

import struct

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secondsite.appliance.stream import frames as f
from secondsite.appliance.stream.frames import (
    FLAG_ZSTD,
    HEADER_SIZE,
    NO_VOLUME,
    Ack,
    Data,
    Error,
    FrameDecoder,
    FrameType,
    Heartbeat,
    Hello,
    Hold,
    HoldFailed,
    Marked,
    Op,
    ProtocolError,
    Record,
    Release,
    Sums,
    SumsAsk,
    VolumeEntry,
    Welcome,
    block_digests,
    data_body,
    decode_all,
    encode,
    encode_data,
    pack_frame,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RECORDS = (
    Record(7, 0, Op.WRITE, 4096, 5, b"hello"),
    Record(8, 1, Op.ZERO, 0, 1 << 20),
    Record(9, 1, Op.TRIM, 8192, 4096),
    Record(10, NO_VOLUME, Op.CHECKPOINT_MARK, 42, 3, b"tag"),
)

EVERY_FRAME: list[f.Frame] = [
    Hello("vpg-a", "node-1", (VolumeEntry("disk0", 1 << 30), VolumeEntry("dísk1", 4096))),
    Hello("v", "s", ()),
    Welcome(123456789),
    Data(RECORDS),
    Data(()),
    Ack(2**64 - 1),
    Hold(1),
    Marked(1, 99),
    Release(1),
    HoldFailed(3, "buffer overflowed"),
    Heartbeat(),
    Error(2, "unknown vpg 'x'"),
    SumsAsk(5, 1, 8 << 20, 8 << 20, 4096),
    SumsAsk(6, 0, 0, 1, 1 << 24),
    Sums(5, block_digests(b"a" * 10000, 4096)),
    Sums(6, b""),
]


def _norm(frame: f.Frame) -> f.Frame:
    """Payloads decode as memoryviews: compare them as bytes."""
    if isinstance(frame, Data):
        return Data(
            tuple(
                Record(r.seq, r.volume, r.op, r.offset, r.length, bytes(r.payload))
                for r in frame.records
            )
        )
    return frame


@pytest.mark.parametrize("frame", EVERY_FRAME, ids=lambda fr: type(fr).__name__)
def test_round_trip(frame: f.Frame) -> None:
    wire = encode(frame)
    assert wire[:4] == f.MAGIC and len(wire) == HEADER_SIZE + struct.unpack(">I", wire[8:12])[0]
    assert [_norm(x) for x in decode_all(wire)] == [frame]


def test_compressed_data_round_trip() -> None:
    records = tuple(Record(i, 0, Op.WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(1, 9))
    body = data_body(records)
    packed = zstandard.ZstdCompressor(level=1).compress(body)
    wire = encode_data(body, packed)
    assert len(wire) < len(body) // 10
    assert wire[6:8] == FLAG_ZSTD.to_bytes(2, "big")
    assert [_norm(x) for x in decode_all(wire)] == [Data(records)]


def test_incremental_feed_byte_by_byte() -> None:
    wire = b"".join(encode(fr) for fr in EVERY_FRAME)
    dec = FrameDecoder()
    out: list[f.Frame] = []
    for i in range(len(wire)):
        out.extend(dec.feed(wire[i : i + 1]))
    dec.eof()
    assert [_norm(x) for x in out] == EVERY_FRAME
    assert dec.buffered == 0 and dec.bytes_in == len(wire)


def test_block_digests_are_xxh3_128_per_block_with_a_short_last_one() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: two blocks of 4096 and one of 2048
    digests = block_digests(data, 4096)
    assert len(digests) == 3 * f.DIGEST_SIZE
    assert digests[:16] == xxhash.xxh3_128_digest(data[:4096])
    assert digests[32:] == xxhash.xxh3_128_digest(data[8192:])
    changed = block_digests(data[:5000] + b"x" + data[5001:], 4096)
    assert changed[:16] == digests[:16] and changed[32:] == digests[32:]
    assert changed[16:32] != digests[16:32]


def test_encoder_refuses_out_of_bounds_checksum_requests() -> None:
    with pytest.raises(ValueError, match="block size"):
        encode(SumsAsk(1, 0, 0, 4096, 1000))
    with pytest.raises(ValueError, match="in blocks of"):
        encode(SumsAsk(1, 0, 0, (f.MAX_SUM_BLOCKS + 1) * 4096, 4096))
    with pytest.raises(ValueError, match="digest bytes"):
        encode(Sums(1, b"x" * 15))


def test_encoder_refuses_inconsistent_records() -> None:
    with pytest.raises(ValueError, match="payload"):
        data_body([Record(1, 0, Op.WRITE, 0, 10, b"short")])
    with pytest.raises(ValueError, match="no payload"):
        data_body([Record(1, 0, Op.ZERO, 0, 10, b"x" * 10)])
    with pytest.raises(ValueError, match="64 bits"):
        encode(Ack(-1))


# -- hostile input ------------------------------------------------------------------------------


def _header(
    ftype: int = FrameType.HEARTBEAT,
    length: int = 0,
    flags: int = 0,
    magic: bytes = f.MAGIC,
    version: int = f.FRAME_VERSION,
) -> bytes:
    return struct.pack(">4sBBHII", magic, version, ftype, flags, length, 0)


def _with_crc(ftype: int, body: bytes, flags: int = 0) -> bytes:
    """A frame with a valid CRC around any body: what a hostile peer (not a noisy line) sends."""
    return pack_frame(FrameType(ftype), body, flags)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_header(magic=b"HTTP"), "bad magic"),
        (_header(version=9), "frame version"),
        (_header(ftype=77), "unknown frame type"),
        (_header(flags=0x8000), "unknown flags"),
        (_header(FrameType.ACK, flags=FLAG_ZSTD), "unknown flags"),
        (_header(FrameType.DATA, length=f.MAX_BODY + 1), "exceeds"),
        (_header(FrameType.HEARTBEAT, 0)[:12] + b"\0\0\0\1", "CRC mismatch"),
        (_with_crc(FrameType.ACK, b"\0" * 7), "ends early"),
        (_with_crc(FrameType.ACK, b"\0" * 9), "trailing"),
        (_with_crc(FrameType.HEARTBEAT, b"x"), "trailing"),
        (_with_crc(FrameType.ERROR, b"\0\1\0\2\xff\xfe"), "UTF-8"),
        (_with_crc(FrameType.HELLO, b"\0\1\0\0\0\1s\0\0\0\0"), "empty"),
        (_with_crc(FrameType.HELLO, b"\0\1\0\1v\0\1s\xff\xff\xff\xff"), "volumes"),
        (_with_crc(FrameType.DATA, b"\xff\xff\xff\xff"), "cannot fit"),
        (_with_crc(FrameType.DATA, b"\0\0\0\1" + struct.pack(">QHBBQI", 1, 0, 9, 0, 0, 0)), "op"),
        (
            _with_crc(FrameType.DATA, b"\0\0\0\1" + struct.pack(">QHBBQI", 1, 0, 1, 0, 0, 10)),
            "early",
        ),
        (
            _with_crc(FrameType.DATA, b"\0\0\0\1" + struct.pack(">QHBBQI", 1, 3, 4, 0, 0, 0)),
            "volume index",
        ),
        (_with_crc(FrameType.DATA, b"not zstd at all", FLAG_ZSTD), "zstd"),
        (_with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 0, 4096, 4095)), "block size"),
        (_with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 0, 4096, 1 << 25)), "block"),
        (_with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 0, 0, 4096)), "0 bytes"),
        (
            _with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 0, (1 << 28) + 1, 1 << 24)),
            "in blocks of",
        ),
        (
            _with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 0, (1 << 28) + 4096, 4096)),
            "in blocks of",
        ),
        (
            _with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, NO_VOLUME, 0, 4096, 4096)),
            "volume index",
        ),
        (
            _with_crc(FrameType.SUMS_ASK, struct.pack(">QHQII", 1, 0, 2**64 - 4096, 8192, 4096)),
            "offset",
        ),
        (_with_crc(FrameType.SUMS_ASK, struct.pack(">QHQI", 1, 0, 0, 4096)), "ends early"),
        (_with_crc(FrameType.SUMS, struct.pack(">QI", 1, 2) + b"\0" * 31), "2 digests in 31"),
        (_with_crc(FrameType.SUMS, struct.pack(">QI", 1, 2) + b"\0" * 48), "2 digests in 48"),
        (
            _with_crc(FrameType.SUMS, struct.pack(">QI", 1, f.MAX_SUM_BLOCKS + 1)),
            "digests in 0",
        ),
    ],
)
def test_hostile_frames(wire: bytes, reason: str) -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=reason):
        dec.feed(wire)
    with pytest.raises(ProtocolError):  # the stream stays failed
        dec.feed(encode(Heartbeat()))


def test_oversize_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder(max_body=1024)
    with pytest.raises(ProtocolError, match="exceeds 1024"):
        dec.feed(_header(FrameType.DATA, length=1 << 31))
    assert dec.buffered == 0


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    with pytest.raises(ProtocolError, match="declares"):
        FrameDecoder(max_body=1 << 20).feed(_with_crc(FrameType.DATA, bomb, FLAG_ZSTD))


def test_zstd_without_content_size_is_refused() -> None:
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data_body(RECORDS))
    with pytest.raises(ProtocolError, match="declares"):
        FrameDecoder().feed(_with_crc(FrameType.DATA, no_size, FLAG_ZSTD))


def test_truncated_stream_is_an_error_at_eof() -> None:
    wire = encode(Data(RECORDS))
    dec = FrameDecoder()
    assert dec.feed(wire[:-1]) == []
    with pytest.raises(ProtocolError, match="inside a frame"):
        dec.eof()


# -- fuzzing: nothing but ProtocolError, whatever the input --------------------------------------


def _decode_or_protocol_error(data: bytes, max_body: int = 1 << 16) -> list[f.Frame]:
    dec = FrameDecoder(max_body=max_body)
    try:
        out = dec.feed(data)
        dec.eof()
    except ProtocolError:
        return []
    assert dec.buffered <= HEADER_SIZE + max_body
    return out


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_protocol_error(data)
    _decode_or_protocol_error(f.MAGIC + data)


@FUZZ
@given(st.sampled_from([int(t) for t in FrameType]), st.binary(max_size=512), st.booleans())
def test_fuzz_valid_crc_any_body(ftype: int, body: bytes, zstd: bool) -> None:
    flags = FLAG_ZSTD if zstd and ftype == FrameType.DATA else 0
    _decode_or_protocol_error(_with_crc(ftype, body, flags))


@FUZZ
@given(st.sampled_from(EVERY_FRAME), st.data())
def test_fuzz_flipped_bit_is_always_detected(frame: f.Frame, data: st.DataObject) -> None:
    wire = bytearray(encode(frame))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(bytes(wire))
        dec.eof()  # a flip in the length field leaves a frame waiting for bytes that never come


@FUZZ
@given(st.lists(st.sampled_from(EVERY_FRAME), min_size=1, max_size=6), st.data())
def test_fuzz_truncation_and_chunking(frames: list[f.Frame], data: st.DataObject) -> None:
    wire = b"".join(encode(fr) for fr in frames)
    cut = data.draw(st.integers(0, len(wire)))
    dec = FrameDecoder()
    out: list[f.Frame] = []
    pos = 0
    while pos < cut:
        step = data.draw(st.integers(1, 64))
        out.extend(dec.feed(wire[pos : min(cut, pos + step)]))
        pos += step
    complete = out
    assert [_norm(x) for x in complete] == frames[: len(complete)]
    if cut == len(wire):
        dec.eof()
        assert len(complete) == len(frames)
    elif dec.buffered:
        with pytest.raises(ProtocolError):
            dec.eof()
