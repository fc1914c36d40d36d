"""On-disk record and segment-header format.

A segment file starts with a 64-byte segment header, then records back to back. A record is a
56-byte header followed by ``payload_len`` bytes of payload::

    offset size field
         0    4 magic        b"SSJR"
         4    1 version      RECORD_VERSION
         5    1 type         RecordType
         6    2 flags        0 (reserved)
         8    4 volume       volume id (0xFFFFFFFF for records that belong to no volume)
        12    4 payload_len  bytes of payload that follow the header
        16    8 seq          VPG-wide sequence number, strictly increasing through the journal
        24    8 offset       byte offset in the volume
        32    8 length       byte length of the extent (== payload_len for WRITE, 0 for CHECKPOINT
                             and POSITION)
        40    8 time_ns      wall-clock time the record was appended
        48    4 crc          CRC32C over the header (with this field zero) and the payload
        52    4 incarnation  the segment header's incarnation (0 in version 1 segments)

All integers are little-endian. A CHECKPOINT record's payload is ``checkpoint id (u64), consistent
(u8), tag length (u16), tag (utf-8)``. A POSITION record's payload is ``source length (u8), source
name (utf-8, 1..255 bytes), source seq (u64)``: every record of that replication source up to that
source sequence number has been submitted before it. CHECKPOINT and POSITION records belong to no
volume (``NO_VOLUME``).

The segment header (version 2)::

    offset size field
         0    8 magic        SEGMENT_MAGIC
         8    2 version      SEGMENT_VERSION
        10    2 header size  64
        12    8 segno        the number in the file name
        20    8 first seq    sequence number of the segment's first record
        28    8 created_ns
        36    4 crc          CRC32C over the 64 bytes (with this field zero)
        40    4 incarnation  random, non-zero, new each time a file becomes a segment
        44    4 flags        SEGMENT_RECYCLED: the file held an earlier segment
        48   16 zero

Segment files are written ahead of their records (spares.py): after the last record there may be
zeros or, in a recycled file, records of an earlier incarnation. Those are never records of this
segment: a record counts only if its incarnation is the header's and its seq is above the previous
record's (the earlier incarnation's records all have seqs below ``first seq``). Version 1 headers
(zeros from offset 40) are still read: their incarnation is 0, which their records carry.
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import google_crc32c

__all__ = [
    "HEADER",
    "MAX_SOURCE_NAME",
    "NO_VOLUME",
    "POSITION_PAYLOAD_MAX",
    "POSITION_PAYLOAD_MIN",
    "RECORD_MAGIC",
    "RECORD_VERSION",
    "SEGMENT_HEADER",
    "SEGMENT_MAGIC",
    "SEGMENT_RECYCLED",
    "SEGMENT_VERSION",
    "CheckpointPayload",
    "PositionPayload",
    "RecordHeader",
    "RecordType",
    "SegmentHeader",
    "crc32c",
    "crc_ok",
    "decode_checkpoint",
    "decode_header",
    "decode_position",
    "decode_segment_header",
    "encode_checkpoint",
    "encode_header",
    "encode_position",
    "encode_segment_header",
    "new_incarnation",
]

RECORD_MAGIC = b"SSJR"
RECORD_VERSION = 1
NO_VOLUME = 0xFFFFFFFF
HEADER = struct.Struct("<4sBBHIIQQQQII")
_CRC_AT = 48

SEGMENT_MAGIC = b"SSJSEG\r\n"
SEGMENT_VERSION = 2
"""2: incarnation and flags (1 is read, never written)."""
#: magic, version, header size, segment number, first seq, created ns, crc, incarnation, flags
SEGMENT_HEADER = struct.Struct("<8sHHQQQIII16x")
_SEGMENT_CRC_AT = 36
SEGMENT_RECYCLED = 1
"""Segment flag: the file held an earlier segment, so bytes after the last record may be its."""
assert HEADER.size == 56 and SEGMENT_HEADER.size == 64

_CHECKPOINT = struct.Struct("<QBH")
_SOURCE_SEQ = struct.Struct("<Q")
MAX_SOURCE_NAME = 255
#: Smallest and largest payload of a POSITION record.
POSITION_PAYLOAD_MIN = 1 + 1 + _SOURCE_SEQ.size
POSITION_PAYLOAD_MAX = 1 + MAX_SOURCE_NAME + _SOURCE_SEQ.size


_extend = google_crc32c.extend
_BUFFER_CRC_FROM = 64 << 10
"""Payloads from this size on that are not ``bytes`` are checksummed in place (see
_buffer_extend) instead of being copied into a ``bytes`` first."""


def _load_buffer_extend() -> Callable[[int, int, int], int] | None:
    """google_crc32c's ``extend`` takes only ``bytes``: a 1 MiB bytearray (an NBD write's
    payload) would be copied first, which costs several times the checksum itself. Its C
    extension links the C library's ``crc32c_extend(crc, pointer, length)``; called through
    ctypes it reads any buffer in place (and releases the GIL). None when not available (the
    pure-Python build)."""
    cext = getattr(google_crc32c, "_crc32c", None)
    path = getattr(cext, "__file__", None)
    if path is None:
        return None
    try:
        function = ctypes.CDLL(path).crc32c_extend  # found in the library it links
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_uint32
    extend: Callable[[int, int, int], int] = function
    return extend


_buffer_extend = _load_buffer_extend()


def _extend_any(crc: int, data: bytes | bytearray | memoryview) -> int:
    """``_extend`` over any contiguous buffer, without a copy for large writable ones."""
    if isinstance(data, bytes):
        return int(_extend(crc, data))
    if _buffer_extend is not None and len(data) >= _BUFFER_CRC_FROM:
        view = memoryview(data)
        if view.contiguous and not view.readonly:
            cells = (ctypes.c_char * view.nbytes).from_buffer(view)
            return int(_buffer_extend(crc, ctypes.addressof(cells), view.nbytes))
    return int(_extend(crc, bytes(data)))


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing ``crc``."""
    return _extend_any(crc, data)


class RecordType(enum.IntEnum):
    """What a record means. Values are on disk: never renumber."""

    WRITE = 1
    ZERO = 2
    TRIM = 3
    CHECKPOINT = 4
    POSITION = 5


@dataclass(frozen=True, slots=True)
class RecordHeader:
    type: RecordType
    volume: int
    payload_len: int
    seq: int
    offset: int
    length: int
    time_ns: int
    crc: int
    incarnation: int


class SegmentHeader(NamedTuple):
    segno: int
    first_seq: int
    created_ns: int
    incarnation: int
    """What every record of the segment carries (0 for a version 1 segment)."""
    recycled: bool


@dataclass(frozen=True, slots=True)
class CheckpointPayload:
    checkpoint_id: int
    consistent: bool
    tag: str | None


@dataclass(frozen=True, slots=True)
class PositionPayload:
    """How far a replication source has been journaled: its records up to ``source_seq``."""

    source: str
    source_seq: int


def encode_header(
    rtype: RecordType,
    volume: int,
    seq: int,
    offset: int,
    length: int,
    time_ns: int,
    payload: bytes | memoryview,
    *,
    incarnation: int,
) -> bytes:
    """Return the header for ``payload`` in a segment of ``incarnation``, its CRC filled in.

    On the append path for every record: one pack per step, no helper calls.
    """
    fields = (RECORD_MAGIC, RECORD_VERSION, rtype, 0, volume, len(payload), seq, offset, length)
    crc = _extend(0, HEADER.pack(*fields, time_ns, 0, incarnation))
    if payload:
        crc = _extend_any(crc, payload)
    return HEADER.pack(*fields, time_ns, crc, incarnation)


def decode_header(buf: bytes | memoryview, at: int = 0) -> RecordHeader | None:
    """Parse a header at ``buf[at:]``; None on bad magic, version or type."""
    if len(buf) - at < HEADER.size:
        return None
    magic, version, rtype, _flags, volume, plen, seq, offset, length, time_ns, crc, inc = (
        HEADER.unpack_from(buf, at)
    )
    if magic != RECORD_MAGIC or version != RECORD_VERSION or rtype not in _TYPES:
        return None
    return RecordHeader(RecordType(rtype), volume, plen, seq, offset, length, time_ns, crc, inc)


_TYPES = frozenset(int(t) for t in RecordType)


def crc_ok(header_bytes: bytes | memoryview, payload: bytes | memoryview, expected: int) -> bool:
    """Check a record's CRC given its raw header (crc field as stored) and payload."""
    hb = bytes(header_bytes[: HEADER.size])
    zeroed = hb[:_CRC_AT] + b"\0\0\0\0" + hb[_CRC_AT + 4 :]
    return crc32c(payload, crc32c(zeroed)) == expected


def encode_checkpoint(p: CheckpointPayload) -> bytes:
    tag = (p.tag or "").encode()
    if len(tag) > 0xFFFF:
        raise ValueError("checkpoint tag longer than 65535 bytes")
    # An empty tag on disk means "no tag"; tags are never empty strings in the API.
    return _CHECKPOINT.pack(p.checkpoint_id, 1 if p.consistent else 0, len(tag)) + tag


def decode_checkpoint(payload: bytes | memoryview) -> CheckpointPayload:
    cid, consistent, tlen = _CHECKPOINT.unpack_from(payload, 0)
    if _CHECKPOINT.size + tlen != len(payload):
        raise ValueError("checkpoint payload length mismatch")
    tag = bytes(payload[_CHECKPOINT.size :]).decode() or None
    return CheckpointPayload(cid, bool(consistent), tag)


def encode_position(p: PositionPayload) -> bytes:
    """Encode a POSITION payload; ValueError for a name of 0 or over 255 bytes (or not
    encodable as utf-8) or a seq outside u64."""
    name = p.source.encode()
    if not 1 <= len(name) <= MAX_SOURCE_NAME:
        raise ValueError(f"a source name takes 1..{MAX_SOURCE_NAME} utf-8 bytes, not {len(name)}")
    if not 0 <= p.source_seq < 1 << 64:
        raise ValueError(f"source seq {p.source_seq} is not a u64")
    return bytes([len(name)]) + name + _SOURCE_SEQ.pack(p.source_seq)


def decode_position(payload: bytes | memoryview) -> PositionPayload:
    """Decode a POSITION payload; ValueError if it is malformed."""
    if len(payload) < POSITION_PAYLOAD_MIN:
        raise ValueError("position payload too short")
    n = payload[0]
    if n == 0 or 1 + n + _SOURCE_SEQ.size != len(payload):
        raise ValueError("position payload length mismatch")
    source = bytes(payload[1 : 1 + n]).decode()
    (seq,) = _SOURCE_SEQ.unpack_from(payload, 1 + n)
    return PositionPayload(source, int(seq))


def new_incarnation() -> int:
    """A random non-zero incarnation for a new segment."""
    while True:
        value = int.from_bytes(os.urandom(4), "little")
        if value:
            return value


def encode_segment_header(
    segno: int, first_seq: int, created_ns: int, incarnation: int, *, recycled: bool
) -> bytes:
    flags = SEGMENT_RECYCLED if recycled else 0
    fields = (SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_HEADER.size, segno, first_seq, created_ns)
    crc = crc32c(SEGMENT_HEADER.pack(*fields, 0, incarnation, flags))
    return SEGMENT_HEADER.pack(*fields, crc, incarnation, flags)


def decode_segment_header(buf: bytes) -> SegmentHeader | None:
    """Parse a segment header (version 1 or 2); None if it is bad."""
    if len(buf) < SEGMENT_HEADER.size:
        return None
    raw = bytes(buf[: SEGMENT_HEADER.size])
    magic, version, hsize, segno, first_seq, created_ns, crc, incarnation, flags = (
        SEGMENT_HEADER.unpack(raw)
    )
    zeroed = raw[:_SEGMENT_CRC_AT] + b"\0\0\0\0" + raw[_SEGMENT_CRC_AT + 4 :]
    if magic != SEGMENT_MAGIC or hsize != SEGMENT_HEADER.size or crc32c(zeroed) != crc:
        return None
    if version == 1 and not incarnation and not flags:  # all padding in version 1
        return SegmentHeader(segno, first_seq, created_ns, 0, False)
    if version != SEGMENT_VERSION or not incarnation or flags & ~SEGMENT_RECYCLED:
        return None
    return SegmentHeader(segno, first_seq, created_ns, incarnation, bool(flags & SEGMENT_RECYCLED))
