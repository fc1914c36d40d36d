"""NBD wire format: magic numbers, flags, fixed message layouts and option payload codecs.

Everything here is pure (bytes in, values or bytes out) so that it can be tested and fuzzed without
sockets. Names follow the protocol document (``NBD_OPT_GO`` is ``OPT_GO`` here); all integers are
big-endian on the wire.

Option payload parsers raise :class:`OptionError` carrying the ``NBD_REP_ERR_*`` reply the server
should send; they never raise anything else, whatever the input.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

# -- magic numbers ------------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# -- transmission flags --------------------------------------------------------------------------
TF_HAS_FLAGS: Final = 1 << 0
TF_READ_ONLY: Final = 1 << 1
TF_SEND_FLUSH: Final = 1 << 2
TF_SEND_FUA: Final = 1 << 3
TF_ROTATIONAL: Final = 1 << 4
TF_SEND_TRIM: Final = 1 << 5
TF_SEND_WRITE_ZEROES: Final = 1 << 6
TF_SEND_DF: Final = 1 << 7
TF_CAN_MULTI_CONN: Final = 1 << 8
TF_SEND_RESIZE: Final = 1 << 9
TF_SEND_CACHE: Final = 1 << 10
TF_SEND_FAST_ZERO: Final = 1 << 11

# -- options -------------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

# -- option replies ------------------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

# -- NBD_REP_INFO types --------------------------------------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# -- commands and command flags ------------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

COMMAND_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}

# -- structured replies --------------------------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2

# -- base:allocation ---------------------------------------------------------------------------
META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# -- error values the protocol defines (they match Linux errno numbers) ---------------------------
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

_ERRNO_TO_NBD: Final = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(code: int) -> int:
    """Map a host errno to one of the values the protocol allows (EIO for anything else)."""
    return _ERRNO_TO_NBD.get(code, NBD_EIO)


# -- fixed layouts -------------------------------------------------------------------------------
GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER: Final = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OFFSET_DATA_HEADER: Final = struct.Struct(">IHHQIQ")  # chunk header + offset
ERROR_CHUNK: Final = struct.Struct(">IHHQIIH")  # chunk header + error + message length
BLOCK_STATUS_HEADER: Final = struct.Struct(">IHHQII")  # chunk header + context id
EXTENT: Final = struct.Struct(">II")  # length, flags

EXPORT_NAME_ZEROES: Final = bytes(124)
MAX_STRING: Final = 4096  # longest name or message the protocol allows


class OptionError(Exception):
    """An option request the server must refuse with ``reply`` (an ``NBD_REP_ERR_*`` value)."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


def decode_string(raw: bytes, what: str) -> str:
    """Decode a protocol string: UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > MAX_STRING:
        raise OptionError(REP_ERR_TOO_BIG, f"{what} longer than {MAX_STRING} bytes")
    if b"\0" in raw:
        raise OptionError(REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(REP_ERR_INVALID, f"{what} is not UTF-8") from None


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """Parse the payload of NBD_OPT_INFO / NBD_OPT_GO into (export name, info requests)."""
    if len(data) < 6:
        raise OptionError(REP_ERR_INVALID, "option payload too short")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > len(data) - 6:
        raise OptionError(REP_ERR_INVALID, "export name length exceeds option payload")
    name = decode_string(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = struct.unpack_from(">H", data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise OptionError(REP_ERR_INVALID, "information request count does not match payload")
    requests = list(struct.unpack_from(f">{count}H", data, pos))
    return name, requests


def parse_meta_context_request(data: bytes, *, max_queries: int = 256) -> tuple[str, list[str]]:
    """Parse NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT into (export name, queries)."""
    if len(data) < 8:
        raise OptionError(REP_ERR_INVALID, "option payload too short")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > len(data) - 8:
        raise OptionError(REP_ERR_INVALID, "export name length exceeds option payload")
    name = decode_string(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if count > max_queries:
        raise OptionError(REP_ERR_TOO_BIG, f"more than {max_queries} queries")
    queries: list[str] = []
    for _ in range(count):
        if len(data) - pos < 4:
            raise OptionError(REP_ERR_INVALID, "query length runs past option payload")
        (query_len,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if query_len > len(data) - pos:
            raise OptionError(REP_ERR_INVALID, "query runs past option payload")
        query = decode_string(data[pos : pos + query_len], "query")
        pos += query_len
        if ":" not in query:
            raise OptionError(REP_ERR_INVALID, "query lacks a namespace")
        queries.append(query)
    if pos != len(data):
        raise OptionError(REP_ERR_INVALID, "trailing bytes after the last query")
    return name, queries


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def option_error(option: int, reply: int, message: str) -> bytes:
    """An ``NBD_REP_ERR_*`` option reply with a human readable message."""
    return option_reply(option, reply, truncate_message(message))


def truncate_message(message: str) -> bytes:
    """Encode ``message`` as a protocol string (UTF-8, at most 4096 bytes, no NUL)."""
    raw = message.replace("\0", " ").encode("utf-8", "replace")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


def rep_server(name: str) -> bytes:
    """Payload of NBD_REP_SERVER: the export name with its length."""
    raw = name.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def info_export(size: int, flags: int) -> bytes:
    """Payload of NBD_REP_INFO / NBD_INFO_EXPORT."""
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_string(info_type: int, value: str) -> bytes:
    """Payload of NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return struct.pack(">H", info_type) + truncate_message(value)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """Payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE."""
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def meta_context(context_id: int, name: str) -> bytes:
    """Payload of NBD_REP_META_CONTEXT."""
    return struct.pack(">I", context_id) + name.encode("utf-8")


def error_chunk(handle: int, error: int, message: str, offset: int | None) -> bytes:
    """A structured error chunk (final): NBD_REPLY_TYPE_ERROR, or ERROR_OFFSET with ``offset``."""
    raw = truncate_message(message)
    if offset is None:
        return (
            ERROR_CHUNK.pack(
                STRUCTURED_REPLY_MAGIC,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                handle,
                6 + len(raw),
                error,
                len(raw),
            )
            + raw
        )
    return (
        ERROR_CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR_OFFSET,
            handle,
            14 + len(raw),
            error,
            len(raw),
        )
        + raw
        + struct.pack(">Q", offset)
    )
