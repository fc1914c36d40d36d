"""A small, strict NBD client for testing the server byte by byte.

It speaks fixed-newstyle negotiation and both simple and structured replies, and it checks what the
server sends against the protocol (magic numbers, chunk bounds, DONE flags, error payloads) so that
tests fail on a malformed reply, not only on wrong data. It can also send arbitrary raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from secondsite.appliance.nbd import _wire as w


class ProtocolViolation(AssertionError):
    """The server sent something the protocol does not allow."""


class OptionFailed(Exception):
    """An option ended with an NBD_REP_ERR_* reply."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(f"option failed: 0x{reply:x} {message}")
        self.reply = reply
        self.message = message


class ReplyError(Exception):
    """A request failed with an NBD error."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(f"NBD error {error}: {message}")
        self.error = error
        self.message = message


@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes


@dataclass
class ExportInfo:
    size: int = -1
    flags: int = 0
    name: str | None = None
    description: str | None = None
    block_sizes: tuple[int, int, int] | None = None
    info_types: list[int] = field(default_factory=list)


@dataclass
class Reply:
    handle: int
    error: int = 0
    message: str = ""
    data: bytes | None = None
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)  # structured chunk types, in order


@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int
    reply: Reply
    data: bytearray | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)


class NBDClient:
    """One connection. Use :meth:`connect_unix` / :meth:`connect_tcp`, then :meth:`handshake`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.server_flags = 0
        self._next_handle = 1
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, Reply] = {}

    @classmethod
    async def connect_unix(cls, path: str) -> NBDClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @classmethod
    async def connect_tcp(cls, host: str, port: int) -> NBDClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- raw I/O --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self, n: int, timeout: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def expect_closed(self, timeout: float = 10.0) -> bytes:
        """Read until the server closes the connection; return what arrived before that."""
        received = b""
        try:
            while chunk := await asyncio.wait_for(self.reader.read(65536), timeout):
                received += chunk
        except ConnectionError:
            pass
        return received

    # -- negotiation ----------------------------------------------------------------------------

    async def handshake(
        self, client_flags: int = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES
    ) -> int:
        magic, opt_magic, flags = w.GREETING.unpack(await self.recv(w.GREETING.size))
        flags = int(flags)
        if magic != w.NBDMAGIC or opt_magic != w.IHAVEOPT:
            raise ProtocolViolation("bad greeting")
        if flags & ~(w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES):
            raise ProtocolViolation(f"unknown handshake flags {flags:#x}")
        self.server_flags = flags
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(w.OPTION_HEADER.pack(w.IHAVEOPT, option, len(data)) + data)

    async def read_option_reply(self) -> OptionReply:
        magic, option, reply, length = w.OPTION_REPLY_HEADER.unpack(
            await self.recv(w.OPTION_REPLY_HEADER.size)
        )
        if magic != w.OPTION_REPLY_MAGIC:
            raise ProtocolViolation(f"bad option reply magic {magic:#x}")
        return OptionReply(option, reply, await self.recv(length) if length else b"")

    async def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; return every reply up to the final ACK (raise OptionFailed on error)."""
        self.send_option(option, data)
        replies: list[OptionReply] = []
        while True:
            reply = await self.read_option_reply()
            if reply.option != option:
                raise ProtocolViolation(f"reply for option {reply.option}, sent {option}")
            if reply.reply & w.REP_FLAG_ERROR:
                raise OptionFailed(reply.reply, reply.data.decode("utf-8", "replace"))
            if reply.reply == w.REP_ACK:
                if reply.data:
                    raise ProtocolViolation("NBD_REP_ACK with payload")
                return replies
            replies.append(reply)

    async def list_exports(self) -> list[str]:
        names = []
        for reply in await self.option(w.OPT_LIST):
            if reply.reply != w.REP_SERVER:
                raise ProtocolViolation(f"unexpected reply {reply.reply} to NBD_OPT_LIST")
            (length,) = struct.unpack_from(">I", reply.data)
            if length > len(reply.data) - 4:
                raise ProtocolViolation("NBD_REP_SERVER name overruns")
            names.append(reply.data[4 : 4 + length].decode())
        return names

    async def negotiate_structured(self) -> None:
        await self.option(w.OPT_STRUCTURED_REPLY)
        self.structured = True

    @staticmethod
    def info_payload(name: str, requests: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return (
            struct.pack(">I", len(raw))
            + raw
            + struct.pack(f">H{len(requests)}H", len(requests), *requests)
        )

    async def info(
        self, name: str, requests: tuple[int, ...] = (), *, go: bool = False
    ) -> ExportInfo:
        replies = await self.option(
            w.OPT_GO if go else w.OPT_INFO, self.info_payload(name, requests)
        )
        info = ExportInfo()
        for reply in replies:
            if reply.reply != w.REP_INFO:
                raise ProtocolViolation(f"unexpected reply {reply.reply} to NBD_OPT_INFO/GO")
            (kind,) = struct.unpack_from(">H", reply.data)
            info.info_types.append(kind)
            if kind == w.INFO_EXPORT:
                if len(reply.data) != 12:
                    raise ProtocolViolation("NBD_INFO_EXPORT length")
                _, info.size, info.flags = struct.unpack(">HQH", reply.data)
            elif kind == w.INFO_NAME:
                info.name = reply.data[2:].decode()
            elif kind == w.INFO_DESCRIPTION:
                info.description = reply.data[2:].decode()
            elif kind == w.INFO_BLOCK_SIZE:
                if len(reply.data) != 14:
                    raise ProtocolViolation("NBD_INFO_BLOCK_SIZE length")
                info.block_sizes = struct.unpack(">III", reply.data[2:])
        if w.INFO_EXPORT not in info.info_types:
            raise ProtocolViolation("success without NBD_INFO_EXPORT")
        if not info.flags & w.TF_HAS_FLAGS:
            raise ProtocolViolation("NBD_FLAG_HAS_FLAGS missing")
        if go:
            self.server_flags = info.flags
        return info

    async def go(self, name: str, requests: tuple[int, ...] = (w.INFO_BLOCK_SIZE,)) -> ExportInfo:
        return await self.info(name, requests, go=True)

    async def export_name(self, name: str, *, no_zeroes: bool = True) -> tuple[int, int]:
        self.send_option(w.OPT_EXPORT_NAME, name.encode())
        size, flags = w.EXPORT_NAME_REPLY.unpack(await self.recv(w.EXPORT_NAME_REPLY.size))
        if not no_zeroes and await self.recv(124) != bytes(124):
            raise ProtocolViolation("reserved bytes not zero")
        return size, flags

    @staticmethod
    def meta_payload(name: str, queries: list[str]) -> bytes:
        raw = name.encode()
        out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for query in queries:
            q = query.encode()
            out += struct.pack(">I", len(q)) + q
        return out

    async def meta_context(
        self, name: str, queries: list[str], *, set_: bool = True
    ) -> list[tuple[int, str]]:
        option = w.OPT_SET_META_CONTEXT if set_ else w.OPT_LIST_META_CONTEXT
        contexts = []
        for reply in await self.option(option, self.meta_payload(name, queries)):
            if reply.reply != w.REP_META_CONTEXT:
                raise ProtocolViolation(f"unexpected reply {reply.reply} to meta context option")
            (context_id,) = struct.unpack_from(">I", reply.data)
            contexts.append((context_id, reply.data[4:].decode()))
        return contexts

    # -- transmission ---------------------------------------------------------------------------

    def frame(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        handle: int | None = None,
    ) -> tuple[int, bytes]:
        """Encode one request and expect its reply; returns (handle, bytes to send)."""
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
        if cmd != w.CMD_DISC:
            self._pending[handle] = _Pending(cmd, offset, length, Reply(handle))
        header = w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, handle, offset, length)
        return handle, header + payload

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        handle: int | None = None,
    ) -> int:
        """Send one request (not waiting for its reply); returns its handle."""
        handle, data = self.frame(cmd, offset, length, flags=flags, payload=payload, handle=handle)
        self.send(data)
        return handle

    async def reply(self, handle: int, timeout: float = 20.0) -> Reply:
        """Wait for the reply to ``handle`` (reading and keeping others that arrive first)."""
        while handle not in self._done:
            await asyncio.wait_for(self._read_one_message(), timeout)
        return self._done.pop(handle)

    async def _read_one_message(self) -> None:
        (magic,) = struct.unpack(">I", await self.recv(4))
        if magic == w.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", await self.recv(12))
            pending = self._take(handle)
            pending.reply.error = error
            if pending.cmd == w.CMD_READ and not error:
                if self.structured:
                    raise ProtocolViolation("simple reply to a read after structured replies")
                pending.reply.data = await self.recv(pending.length)
            self._done[handle] = pending.reply
        elif magic == w.STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise ProtocolViolation("structured reply not negotiated")
            flags, kind, handle, length = struct.unpack(">HHQI", await self.recv(16))
            payload = await self.recv(length) if length else b""
            chunk_for = self._pending.get(handle)
            if chunk_for is None:
                raise ProtocolViolation(f"chunk for unknown handle {handle:#x}")
            self._chunk(chunk_for, flags, kind, payload)
            if flags & w.REPLY_FLAG_DONE:
                del self._pending[handle]
                self._finish_structured(chunk_for)
                self._done[handle] = chunk_for.reply
        else:
            raise ProtocolViolation(f"bad reply magic {magic:#x}")

    def _take(self, handle: int) -> _Pending:
        try:
            return self._pending.pop(handle)
        except KeyError:
            raise ProtocolViolation(f"reply for unknown handle {handle:#x}") from None

    def _chunk(self, pending: _Pending, flags: int, kind: int, payload: bytes) -> None:
        reply = pending.reply
        reply.chunks.append(kind)
        if kind == w.REPLY_TYPE_NONE:
            if payload or not flags & w.REPLY_FLAG_DONE:
                raise ProtocolViolation("bad NBD_REPLY_TYPE_NONE")
        elif kind in (w.REPLY_TYPE_OFFSET_DATA, w.REPLY_TYPE_OFFSET_HOLE):
            if pending.cmd != w.CMD_READ:
                raise ProtocolViolation("content chunk for a non-read")
            (offset,) = struct.unpack_from(">Q", payload)
            if kind == w.REPLY_TYPE_OFFSET_DATA:
                if len(payload) < 9:
                    raise ProtocolViolation("OFFSET_DATA too short")
                data = payload[8:]
            else:
                if len(payload) != 12:
                    raise ProtocolViolation("OFFSET_HOLE length")
                (size,) = struct.unpack_from(">I", payload, 8)
                data = bytes(size)
            start = offset - pending.offset
            if start < 0 or start + len(data) > pending.length:
                raise ProtocolViolation("content chunk outside the request")
            for a, b in pending.covered:
                if start < b and a < start + len(data):
                    raise ProtocolViolation("overlapping content chunks")
            pending.covered.append((start, start + len(data)))
            if pending.data is None:
                pending.data = bytearray(pending.length)
            pending.data[start : start + len(data)] = data
        elif kind == w.REPLY_TYPE_BLOCK_STATUS:
            if pending.cmd != w.CMD_BLOCK_STATUS:
                raise ProtocolViolation("block status chunk for another command")
            if len(payload) < 12 or (len(payload) - 4) % 8:
                raise ProtocolViolation("block status chunk length")
            (context_id,) = struct.unpack_from(">I", payload)
            extents = [struct.unpack_from(">II", payload, pos) for pos in range(4, len(payload), 8)]
            if any(length == 0 for length, _ in extents):
                raise ProtocolViolation("zero-length extent")
            if sum(length for length, _ in extents[:-1]) >= pending.length:
                raise ProtocolViolation("extents beyond the request")
            reply.extents[context_id] = extents
        elif kind in (w.REPLY_TYPE_ERROR, w.REPLY_TYPE_ERROR_OFFSET):
            error, message_length = struct.unpack_from(">IH", payload)
            tail = 8 if kind == w.REPLY_TYPE_ERROR_OFFSET else 0
            if error == 0 or 6 + message_length + tail != len(payload):
                raise ProtocolViolation("bad error chunk")
            if tail:
                (offset,) = struct.unpack_from(">Q", payload, 6 + message_length)
                if not pending.offset <= offset < pending.offset + pending.length:
                    raise ProtocolViolation("error offset outside the request")
            reply.error = error
            reply.message = payload[6 : 6 + message_length].decode()
        else:
            raise ProtocolViolation(f"unknown chunk type {kind}")

    @staticmethod
    def _finish_structured(pending: _Pending) -> None:
        reply = pending.reply
        if pending.cmd == w.CMD_READ and not reply.error:
            covered = sum(b - a for a, b in pending.covered)
            if covered != pending.length:
                raise ProtocolViolation("read reply does not cover the request")
            reply.data = bytes(pending.data or b"")

    async def call(
        self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, payload: bytes = b""
    ) -> Reply:
        reply = await self.reply(self.request(cmd, offset, length, flags=flags, payload=payload))
        if reply.error:
            raise ReplyError(reply.error, reply.message)
        return reply

    async def read(self, offset: int, length: int, *, flags: int = 0) -> bytes:
        reply = await self.call(w.CMD_READ, offset, length, flags=flags)
        assert reply.data is not None
        return reply.data

    async def write(self, offset: int, data: bytes, *, flags: int = 0) -> None:
        await self.call(w.CMD_WRITE, offset, len(data), flags=flags, payload=data)

    async def flush(self) -> None:
        await self.call(w.CMD_FLUSH)

    async def trim(self, offset: int, length: int, *, flags: int = 0) -> None:
        await self.call(w.CMD_TRIM, offset, length, flags=flags)

    async def write_zeroes(self, offset: int, length: int, *, flags: int = 0) -> None:
        await self.call(w.CMD_WRITE_ZEROES, offset, length, flags=flags)

    async def block_status(
        self, offset: int, length: int, *, flags: int = 0
    ) -> dict[int, list[tuple[int, int]]]:
        return (await self.call(w.CMD_BLOCK_STATUS, offset, length, flags=flags)).extents

    async def disconnect(self) -> None:
        self.request(w.CMD_DISC)
        await self.drain()


async def connect_and_go(
    path: str, name: str, *, structured: bool = True, meta: bool = False
) -> tuple[NBDClient, ExportInfo]:
    """Connect over a unix socket, negotiate, and enter transmission on export ``name``."""
    client = await NBDClient.connect_unix(path)
    await client.handshake()
    if structured:
        await client.negotiate_structured()
    if meta:
        await client.meta_context(name, [w.META_BASE_ALLOCATION])
    info = await client.go(name)
    return client, info
