"""Wire format of the replication stream: frames, records, and an incremental decoder.

Every frame is a fixed 16-byte header followed by a body::

    magic    4 bytes  b"SSRS"
    version  u8       FRAME_VERSION
    type     u8       FrameType
    flags    u16      FLAG_ZSTD (DATA only); other bits must be zero
    length   u32      body length in bytes, at most the decoder's ``max_body``
    crc32c   u32      CRC32C of the first 12 header bytes followed by the body (as sent)

All integers are big-endian; strings are a u16 byte length then UTF-8. Bodies by type:

=========== ================================================================================
HELLO       u16 protocol, str vpg, str source, u32 n, n x (str volume name, u64 size)
WELCOME     u16 protocol, u64 position (the receiver's durable seq for this vpg and source)
DATA        u32 n, n x record (below); with FLAG_ZSTD the whole body is one zstd frame that
            states its content size
ACK         u64 durable seq: every record of this stream with seq <= it is durable
HOLD        u64 checkpoint request id
MARKED      u64 request id, u64 seq of the CHECKPOINT_MARK record appended for it
RELEASE     u64 request id
HOLD_FAILED u64 request id, str reason (the sender could not mark: e.g. its buffer overflowed)
HEARTBEAT   empty
ERROR       u16 ErrorCode, str message; the sender of an ERROR closes the connection
SUMS_ASK    u64 request id, u16 volume index, u64 offset, u32 length, u32 block size: the
            sender asks for one digest per block of [offset, offset+length) of the volume's
            newest state on the receiving side (the last block may be short); block size a
            power of two from MIN_SUM_BLOCK to MAX_SUM_BLOCK, at most MAX_SUM_BLOCKS blocks
            and MAX_SUM_SPAN bytes
SUMS        u64 request id, u32 n, n x DIGEST_SIZE bytes: the answer, one digest per block
=========== ================================================================================

A digest is the XXH3-128 of the block's bytes (:func:`block_digests`), 16 bytes big-endian.

A record is ``u64 seq, u16 volume index, u8 op, u8 zero, u64 offset, u32 length`` followed, for
WRITE and CHECKPOINT_MARK, by ``length`` payload bytes (ZERO and TRIM carry none). A
CHECKPOINT_MARK has volume index ``NO_VOLUME``, the checkpoint request id in ``offset`` and an
opaque payload chosen by the protected side.

Everything here is pure. :class:`FrameDecoder` never raises anything but :class:`ProtocolError`,
whatever bytes it is fed, and never buffers more than one header plus ``max_body`` bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

import google_crc32c
import xxhash
import zstandard

__all__ = [
    "DIGEST_SIZE",
    "FLAG_ZSTD",
    "FRAME_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BODY",
    "MAX_SUM_BLOCK",
    "MAX_SUM_BLOCKS",
    "MAX_SUM_SPAN",
    "MIN_SUM_BLOCK",
    "NO_VOLUME",
    "PROTOCOL_VERSION",
    "RECORD_HEADER_SIZE",
    "Ack",
    "Data",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Heartbeat",
    "Hello",
    "Hold",
    "HoldFailed",
    "Marked",
    "Op",
    "ProtocolError",
    "Record",
    "Release",
    "Sums",
    "SumsAsk",
    "VolumeEntry",
    "Welcome",
    "block_digests",
    "crc32c",
    "data_body",
    "data_frame",
    "decode_all",
    "encode",
    "encode_data",
    "frame_header",
    "pack_frame",
    "sum_blocks",
]

MAGIC: Final = b"SSRS"
FRAME_VERSION: Final = 1
PROTOCOL_VERSION: Final = 2
"""2: SUMS_ASK and SUMS (delta sync)."""
FLAG_ZSTD: Final = 1 << 0
MAX_BODY: Final = 16 * 1024 * 1024
"""Default bound on a frame body (compressed or not) and on a DATA body once decompressed."""
NO_VOLUME: Final = 0xFFFF
MAX_VOLUMES: Final = 4096
MAX_NAME: Final = 1024
"""Bytes of a vpg, source or volume name, and of an ERROR / HOLD_FAILED message."""
DIGEST_SIZE: Final = 16
MIN_SUM_BLOCK: Final = 4096
MAX_SUM_BLOCK: Final = 16 * 1024 * 1024
MAX_SUM_BLOCKS: Final = 65536
"""Most digests one SUMS_ASK may ask for (a SUMS body of 1 MiB)."""
MAX_SUM_SPAN: Final = 256 * 1024 * 1024
"""Most bytes of a volume one SUMS_ASK may cover (the work one request can cause)."""

_HEADER = struct.Struct(">4sBBHII")
HEADER_SIZE: Final = _HEADER.size
_RECORD = struct.Struct(">QHBBQI")
RECORD_HEADER_SIZE: Final = _RECORD.size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U64X2 = struct.Struct(">QQ")
_WELCOME = struct.Struct(">HQ")
_SUMS_ASK = struct.Struct(">QHQII")
_SUMS_HEAD = struct.Struct(">QI")
_MAX_U64: Final = (1 << 64) - 1


class ProtocolError(Exception):
    """The peer sent something this side cannot accept; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FrameType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DATA = 3
    ACK = 4
    HOLD = 5
    MARKED = 6
    RELEASE = 7
    HEARTBEAT = 8
    ERROR = 9
    HOLD_FAILED = 10
    SUMS_ASK = 11
    SUMS = 12


class Op(enum.IntEnum):
    """What a record does to its volume (or, for a mark, to the stream)."""

    WRITE = 1
    ZERO = 2
    TRIM = 3
    CHECKPOINT_MARK = 4


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    """The peer broke the protocol (bad frame, bad order, out-of-range record)."""
    UNKNOWN_VPG = 2
    REFUSED = 3
    """The receiver's sink refused the source (e.g. a volume table that does not match)."""
    SINK_FAILED = 4
    """The receiver could not make records durable (e.g. its journal stopped)."""
    SHUTDOWN = 5
    REPLACED = 6
    """A newer connection of the same vpg and source took over."""
    INTERNAL = 7


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing ``crc`` (google_crc32c accepts only ``bytes``)."""
    return int(google_crc32c.extend(crc, data))


def block_digests(data: bytes | memoryview, block_size: int) -> bytes:
    """One XXH3-128 digest per ``block_size`` bytes of ``data`` (the last block may be short),
    concatenated."""
    view = memoryview(data)
    digest = xxhash.xxh3_128_digest
    return b"".join([digest(view[i : i + block_size]) for i in range(0, len(view), block_size)])


def sum_blocks(length: int, block_size: int) -> int:
    """How many digests cover ``length`` bytes in blocks of ``block_size``."""
    return -(-length // block_size)


# -- typed frames -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One change of the protected side, numbered by the source's sequence."""

    seq: int
    volume: int
    op: Op
    offset: int
    length: int
    payload: bytes | memoryview = b""

    @property
    def wire_size(self) -> int:
        return RECORD_HEADER_SIZE + len(self.payload)


@dataclass(frozen=True, slots=True)
class VolumeEntry:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[FrameType] = FrameType.HELLO
    vpg: str
    source: str
    volumes: tuple[VolumeEntry, ...]
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    position: int
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Data:
    TYPE: ClassVar[FrameType] = FrameType.DATA
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[FrameType] = FrameType.ACK
    seq: int


@dataclass(frozen=True, slots=True)
class Hold:
    TYPE: ClassVar[FrameType] = FrameType.HOLD
    request: int


@dataclass(frozen=True, slots=True)
class Marked:
    TYPE: ClassVar[FrameType] = FrameType.MARKED
    request: int
    seq: int


@dataclass(frozen=True, slots=True)
class Release:
    TYPE: ClassVar[FrameType] = FrameType.RELEASE
    request: int


@dataclass(frozen=True, slots=True)
class HoldFailed:
    TYPE: ClassVar[FrameType] = FrameType.HOLD_FAILED
    request: int
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    TYPE: ClassVar[FrameType] = FrameType.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class SumsAsk:
    """Digests of blocks of a volume's newest state on the receiving side, please."""

    TYPE: ClassVar[FrameType] = FrameType.SUMS_ASK
    request: int
    volume: int
    offset: int
    length: int
    block_size: int

    @property
    def blocks(self) -> int:
        return sum_blocks(self.length, self.block_size)


@dataclass(frozen=True, slots=True)
class Sums:
    """The answer to SUMS_ASK ``request``: ``DIGEST_SIZE`` bytes per block."""

    TYPE: ClassVar[FrameType] = FrameType.SUMS
    request: int
    digests: bytes

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_SIZE


Frame = (
    Hello
    | Welcome
    | Data
    | Ack
    | Hold
    | Marked
    | Release
    | HoldFailed
    | Heartbeat
    | Error
    | SumsAsk
    | Sums
)


# -- encoding -----------------------------------------------------------------------------------


def _str(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > MAX_NAME:
        raise ValueError(f"string of {len(raw)} bytes is longer than {MAX_NAME}")
    return _U16.pack(len(raw)) + raw


def _u64(v: int) -> int:
    if not 0 <= v <= _MAX_U64:
        raise ValueError(f"{v} does not fit in 64 bits")
    return v


def frame_header(ftype: FrameType, body: bytes, flags: int = 0) -> bytes:
    """The header that goes before ``body`` in its frame, with the CRC over both."""
    head = _HEADER.pack(MAGIC, FRAME_VERSION, ftype, flags, len(body), 0)[:12]
    return head + _U32.pack(crc32c(body, crc32c(head)))


def pack_frame(ftype: FrameType, body: bytes, flags: int = 0) -> bytes:
    """Header + body, with the CRC over both."""
    return frame_header(ftype, body, flags) + body


def data_body(records: Iterable[Record]) -> bytes:
    """The uncompressed body of a DATA frame."""
    parts: list[bytes | memoryview] = [b""]
    n = 0
    for r in records:
        has_payload = r.op in (Op.WRITE, Op.CHECKPOINT_MARK)
        if has_payload and len(r.payload) != r.length:
            raise ValueError(
                f"record {r.seq}: payload of {len(r.payload)} bytes, length {r.length}"
            )
        if not has_payload and r.payload:
            raise ValueError(f"record {r.seq}: {r.op.name} carries no payload")
        parts.append(_RECORD.pack(_u64(r.seq), r.volume, r.op, 0, _u64(r.offset), r.length))
        if has_payload:
            parts.append(r.payload)
        n += 1
    parts[0] = _U32.pack(n)
    return b"".join(parts)


def _body(frame: Frame) -> bytes:
    match frame:
        case Hello():
            vols = b"".join(_str(v.name) + _U64.pack(_u64(v.size)) for v in frame.volumes)
            return (
                _U16.pack(frame.protocol)
                + _str(frame.vpg)
                + _str(frame.source)
                + _U32.pack(len(frame.volumes))
                + vols
            )
        case Welcome():
            return _WELCOME.pack(frame.protocol, _u64(frame.position))
        case Data():
            return data_body(frame.records)
        case Ack():
            return _U64.pack(_u64(frame.seq))
        case Hold() | Release():
            return _U64.pack(_u64(frame.request))
        case Marked():
            return _U64X2.pack(_u64(frame.request), _u64(frame.seq))
        case HoldFailed():
            return _U64.pack(_u64(frame.request)) + _str(frame.reason[:256])
        case Heartbeat():
            return b""
        case Error():
            return _U16.pack(frame.code) + _str(frame.message[:256])
        case SumsAsk():
            _check_sums_ask(frame, ValueError)
            return _SUMS_ASK.pack(
                _u64(frame.request), frame.volume, _u64(frame.offset), frame.length,
                frame.block_size,
            )  # fmt: skip
        case Sums():
            if len(frame.digests) % DIGEST_SIZE or frame.count > MAX_SUM_BLOCKS:
                raise ValueError(f"SUMS of {len(frame.digests)} digest bytes")
            return _SUMS_HEAD.pack(_u64(frame.request), frame.count) + frame.digests


def encode(frame: Frame) -> bytes:
    """One frame as bytes (DATA uncompressed; see :func:`encode_data` for compression)."""
    return pack_frame(frame.TYPE, _body(frame))


def data_frame(body: bytes, compressed: bytes | None) -> tuple[bytes, bytes]:
    """A DATA frame from its raw body, or from that body compressed by zstd when given, as
    (header, body): written one after the other, the body is not copied into a frame."""
    if compressed is None:
        return frame_header(FrameType.DATA, body), body
    return frame_header(FrameType.DATA, compressed, FLAG_ZSTD), compressed


def encode_data(body: bytes, compressed: bytes | None) -> bytes:
    """A DATA frame as one bytes object (see :func:`data_frame`)."""
    return b"".join(data_frame(body, compressed))


# -- decoding -----------------------------------------------------------------------------------


class _Cursor:
    """Bounds-checked reads from a body; any overrun is the peer's ProtocolError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise ProtocolError(f"{self.what}: body ends early")
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        if st.size > len(self.buf) - self.pos:
            raise ProtocolError(f"{self.what}: body ends early")
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def u16(self) -> int:
        return self.unpack(_U16)[0]

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def string(self) -> str:
        n = self.u16()
        if n > MAX_NAME:
            raise ProtocolError(f"{self.what}: string of {n} bytes")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{self.what}: {len(self.buf) - self.pos} trailing bytes")

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos


def _hello(c: _Cursor) -> Hello:
    protocol = c.u16()
    vpg, source = c.string(), c.string()
    n = c.u32()
    if n > MAX_VOLUMES:
        raise ProtocolError(f"HELLO: {n} volumes, at most {MAX_VOLUMES}")
    vols = tuple(VolumeEntry(c.string(), c.u64()) for _ in range(n))
    if not vpg or not source:
        raise ProtocolError("HELLO: empty vpg or source name")
    if len({v.name for v in vols}) != len(vols):
        raise ProtocolError("HELLO: duplicate volume names")
    return Hello(vpg, source, vols, protocol)


def _check_sums_ask(ask: SumsAsk, error: type[Exception]) -> None:
    """The bounds of a SUMS_ASK (raised as ``error``: ValueError here, ProtocolError there)."""
    bs = ask.block_size
    if not MIN_SUM_BLOCK <= bs <= MAX_SUM_BLOCK or bs & (bs - 1):
        raise error(f"SUMS_ASK: block size {bs}")
    if not 0 < ask.length <= MAX_SUM_SPAN or ask.blocks > MAX_SUM_BLOCKS:
        raise error(f"SUMS_ASK: {ask.length} bytes in blocks of {bs}")
    if ask.volume == NO_VOLUME or not 0 <= ask.offset <= _MAX_U64 - ask.length:
        raise error(f"SUMS_ASK: volume index {ask.volume}, offset {ask.offset}")


def _sums(c: _Cursor) -> Sums:
    request, n = c.unpack(_SUMS_HEAD)
    if n > MAX_SUM_BLOCKS or n * DIGEST_SIZE != c.remaining:
        raise ProtocolError(f"SUMS: {n} digests in {c.remaining} bytes")
    return Sums(request, bytes(c.take(n * DIGEST_SIZE)))


_OPS = {int(op): op for op in Op}


def _records(c: _Cursor) -> tuple[Record, ...]:
    n = c.u32()
    if n * RECORD_HEADER_SIZE > c.remaining:
        raise ProtocolError(f"DATA: {n} records cannot fit in {c.remaining} bytes")
    out: list[Record] = []
    for _ in range(n):
        seq, volume, op_code, zero, offset, length = c.unpack(_RECORD)
        op = _OPS.get(op_code)
        if op is None or zero:
            raise ProtocolError(f"DATA: record {seq}: unknown op {op_code} or reserved bits set")
        payload: bytes | memoryview = b""
        if op in (Op.WRITE, Op.CHECKPOINT_MARK):
            payload = c.take(length)
        if (op is Op.CHECKPOINT_MARK) != (volume == NO_VOLUME):
            raise ProtocolError(f"DATA: record {seq}: {op.name} with volume index {volume}")
        out.append(Record(seq, volume, op, offset, length, payload))
    c.end()
    return tuple(out)


def _decode_body(ftype: FrameType, body: bytes) -> Frame:
    c = _Cursor(body, ftype.name)
    frame: Frame
    match ftype:
        case FrameType.HELLO:
            frame = _hello(c)
        case FrameType.WELCOME:
            protocol, position = c.unpack(_WELCOME)
            frame = Welcome(position, protocol)
        case FrameType.DATA:
            return Data(_records(c))
        case FrameType.ACK:
            frame = Ack(c.u64())
        case FrameType.HOLD:
            frame = Hold(c.u64())
        case FrameType.MARKED:
            request, seq = c.unpack(_U64X2)
            frame = Marked(request, seq)
        case FrameType.RELEASE:
            frame = Release(c.u64())
        case FrameType.HOLD_FAILED:
            frame = HoldFailed(c.u64(), c.string())
        case FrameType.HEARTBEAT:
            frame = Heartbeat()
        case FrameType.ERROR:
            frame = Error(c.u16(), c.string())
        case FrameType.SUMS_ASK:
            frame = SumsAsk(*c.unpack(_SUMS_ASK))
            _check_sums_ask(frame, ProtocolError)
        case FrameType.SUMS:
            frame = _sums(c)
    c.end()
    return frame


_TYPES = {int(t): t for t in FrameType}


class FrameDecoder:
    """Turns a byte stream into frames, incrementally: ``feed(chunk) -> [frames]``.

    After a :class:`ProtocolError` the stream is unusable (framing is lost): every later call
    raises again. Call :meth:`eof` when the peer closed, to learn whether it cut a frame short.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._failed: ProtocolError | None = None
        self._dctx = zstandard.ZstdDecompressor()
        self.bytes_in = 0
        """Bytes fed so far (what the peer sent on the wire)."""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self.bytes_in += len(data)
        self._buf += data
        frames: list[Frame] = []
        try:
            pos = 0
            buf = self._buf
            while len(buf) - pos >= HEADER_SIZE:
                magic, version, tcode, flags, length, crc = _HEADER.unpack_from(buf, pos)
                self._check_header(magic, version, tcode, flags, length)
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    break
                with memoryview(buf) as view:  # one copy out of the buffer, not two
                    head = bytes(view[pos : pos + 12])
                    body = bytes(view[pos + HEADER_SIZE : end])
                if crc32c(body, crc32c(head)) != crc:
                    raise ProtocolError(f"{_TYPES[tcode].name}: CRC mismatch")
                if flags & FLAG_ZSTD:
                    body = self._decompress(body)
                frames.append(_decode_body(_TYPES[tcode], body))
                pos = end
            del buf[:pos]
        except ProtocolError as e:
            self._fail(e)
            raise
        return frames

    def _fail(self, e: ProtocolError) -> None:
        self._failed = e
        self._buf = bytearray()

    def _check_header(
        self, magic: bytes, version: int, tcode: int, flags: int, length: int
    ) -> None:
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            raise ProtocolError(f"unsupported frame version {version}")
        if tcode not in _TYPES:
            raise ProtocolError(f"unknown frame type {tcode}")
        if flags & ~FLAG_ZSTD or (flags & FLAG_ZSTD and tcode != FrameType.DATA):
            raise ProtocolError(f"unknown flags {flags:#x} on frame type {tcode}")
        if length > self.max_body:
            raise ProtocolError(f"frame body of {length} bytes exceeds {self.max_body}")

    def _decompress(self, body: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(body)
            if size < 0 or size > self.max_body:
                # A content size we cannot trust a buffer to (unknown, or too large): refuse.
                raise ProtocolError(f"DATA: compressed body declares {size} bytes")
            out = self._dctx.decompress(body, max_output_size=size)
        except zstandard.ZstdError as e:
            raise ProtocolError(f"DATA: bad zstd body: {e}") from None
        if len(out) != size:
            raise ProtocolError("DATA: compressed body does not match its content size")
        return out

    def eof(self) -> None:
        """The peer closed: raise if it left a partial frame behind."""
        if self._failed is not None:
            raise self._failed
        if self._buf:
            e = ProtocolError(f"connection closed inside a frame ({len(self._buf)} bytes)")
            self._fail(e)
            raise e


def decode_all(data: bytes, max_body: int = MAX_BODY) -> Sequence[Frame]:
    """Every frame of ``data``, which must end on a frame boundary (for tests and tools)."""
    dec = FrameDecoder(max_body)
    frames = dec.feed(data)
    dec.eof()
    return frames
