"""One client connection: fixed-newstyle negotiation, then the request/reply state machine.

Negotiation is rare and stateful, so it is a coroutine reading from the receive buffer. The
transmission phase is the hot path and is a plain state machine driven by
``asyncio.BufferedProtocol``: the event loop receives straight into a preallocated buffer, headers
are decoded with precompiled ``struct`` layouts, small write payloads are sliced out of that buffer
and large ones are received directly into their own buffer. Replies produced while one receive is
parsed go out together with one ``writelines``.

Each request's export call is started as soon as its request is parsed: the coroutine is stepped
synchronously (so exports see calls in arrival order, see ``export.py``); when it completes without
suspending, as in-memory exports do, no task is created at all; otherwise a task finishes it.

Memory a client can make the server hold is bounded: the receive buffer, payloads up to the maximum
block size (larger ones are discarded as they arrive), the in-flight budget (requests and bytes),
and the transport's write buffer (reading pauses while it is above its high-water mark).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import logging
import socket
import types
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from . import _wire as w
from .export import MAX_BLOCK_SIZE, BytesLike, Export, ExportProvider, NBDError, UnknownExport

if TYPE_CHECKING:
    from .server import ServerSettings

log = logging.getLogger("secondsite.appliance.nbd")

_T = TypeVar("_T")

RECV_BUFFER_SIZE: Final = 512 * 1024
SMALL_WRITE: Final = 128 * 1024
"""Write payloads up to this size wait in the receive buffer; larger ones get their own buffer."""
MIN_FREE: Final = SMALL_WRITE + 4096
"""Free space kept at the end of the receive buffer (so a small write always fits)."""
NEGOTIATION_BACKLOG: Final = RECV_BUFFER_SIZE - MIN_FREE
"""Unconsumed negotiation bytes above which reading pauses."""
MAX_OPTION_LENGTH: Final = 64 * 1024
"""Option payloads longer than this are discarded unread and refused."""
OUT_FLUSH_BYTES: Final = 4 * 1024 * 1024
"""Queued reply bytes above which the parser flushes before parsing more."""
MAX_EXTENTS: Final = 1024
"""Most block-status descriptors in one reply."""
MAX_WARNINGS: Final = 100
"""Warnings logged per connection before further ones are suppressed."""

_REQUEST_SIZE: Final = w.REQUEST.size
_READ_FLAGS: Final = w.CMD_FLAG_FUA | w.CMD_FLAG_DF
_ZERO_FLAGS: Final = w.CMD_FLAG_FUA | w.CMD_FLAG_NO_HOLE | w.CMD_FLAG_FAST_ZERO
_STATUS_FLAGS: Final = w.CMD_FLAG_FUA | w.CMD_FLAG_REQ_ONE
_META_CONTEXT_ID: Final = 1
_NOT_STARTED: Final = object()
_connection_ids = itertools.count(1)


class _Phase(enum.Enum):
    NEGOTIATING = "negotiating"
    TRANSMITTING = "transmitting"
    CLOSING = "closing"  # NBD_CMD_DISC, EOF or server shutdown: finish in-flight, then close
    CLOSED = "closed"


class _Disconnected(Exception):
    """The peer went away during negotiation."""


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], yielded: Any) -> Generator[Any, Any, _T]:
    """Finish a coroutine that was stepped by hand and suspended, yielding ``yielded``.

    Runs inside a task: passes what the coroutine yields up to the task, and what the task sends
    or throws (results, cancellation) down to the coroutine.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                result: _T = stop.value
                return result
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                result = stop.value
                return result


class Connection(asyncio.BufferedProtocol):
    """The server side of one NBD connection (created by :class:`~.server.NBDServer`)."""

    def __init__(
        self,
        provider: ExportProvider,
        settings: ServerSettings,
        forget: Callable[[Connection], None],
    ) -> None:
        self._provider = provider
        self._settings = settings
        self._forget = forget
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of received data in _buf
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self._phase = _Phase.NEGOTIATING
        self._lost = False
        self._reading = True
        self._warnings = 0
        self.closed: asyncio.Future[None] = self._loop.create_future()

        # negotiation state
        self._waiter: asyncio.Future[None] | None = None
        self._negotiation: asyncio.Task[None] | None = None
        self._structured = False
        self._meta_export: str | None = None  # export named by the last SET_META_CONTEXT
        self._meta_selected = False  # ... and whether it selected base:allocation

        # transmission state (set when an export is selected)
        self._export: Export | None = None
        self.export_name = ""
        self._size = 0
        self._read_only = True
        self._can_trim = False
        self._can_zero = False
        self._block_status = False
        self._align = 1
        self._max_payload = 0
        self._eager = False
        self._payload: bytearray | None = None  # large write being received
        self._payload_view: memoryview | None = None
        self._payload_filled = 0
        self._payload_request = (0, 0, 0)  # flags, handle, offset
        self._discard = 0  # payload bytes still to drop (refused oversized write)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight_bytes = 0
        self._stalled = False  # parsing stopped at the in-flight limit
        self._write_paused = False
        self._out: list[BytesLike] = []
        self._out_bytes = 0
        self._batching = False
        self._flush_scheduled = False
        self._cleanup: asyncio.Task[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # -- asyncio protocol callbacks ---------------------------------------------------------------

    def refuse(self) -> None:
        """Drop this connection as soon as it is made (server full or closing)."""
        self._refused = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        if self._refused:
            log.warning("nbd refusing connection: server full or closing")
            self._phase = _Phase.CLOSED
            transport.abort()
            return
        self._transport = transport
        peer = transport.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.peer = f"{where}#{next(_connection_ids)}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # best effort
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        high = self._settings.write_buffer_high
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._negotiation = self._loop.create_task(self._negotiate())

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._payload_view
        if view is not None:
            return view[self._payload_filled :]
        if RECV_BUFFER_SIZE - self._end < MIN_FREE:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._payload_filled += nbytes
            if self._payload is not None and self._payload_filled == len(self._payload):
                payload = self._payload
                flags, handle, offset = self._payload_request
                self._payload = self._payload_view = None
                self._batching = True
                try:
                    self._write(flags, handle, offset, payload)
                finally:
                    self._batching = False
                self._parse()
            return
        self._end += nbytes
        phase = self._phase
        if phase is _Phase.TRANSMITTING:
            self._parse()
        elif phase is _Phase.NEGOTIATING:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self._update_reading()
        else:  # closing: the client must not send anything after NBD_CMD_DISC
            self._start = self._end = 0

    def eof_received(self) -> bool:
        if self._phase is _Phase.TRANSMITTING:
            # Keep the socket open for the replies still owed (the client may have shut down
            # only its sending side), then close.
            self._start_closing()
            return True
        return self._phase is _Phase.CLOSING

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self._kick()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._refused:
            self.closed.set_result(None)
            return
        if self._export is not None:
            log.info(
                "nbd client disconnected peer=%s export=%s error=%s",
                self.peer,
                self.export_name,
                exc,
            )
        self._lost = True
        self._phase = _Phase.CLOSED
        self._payload = self._payload_view = None
        self._out.clear()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._cleanup = self._loop.create_task(self._close_session())

    # -- lifecycle -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Server shutdown: stop taking requests, answer those in flight, then close."""
        if self._lost or self._transport is None:
            return
        if self._phase is _Phase.NEGOTIATING:
            self._transport.abort()
            return
        self._start_closing()

    def _start_closing(self) -> None:
        """Take no more requests; close once those in flight are answered, or drop the
        connection and cancel them if that takes longer than the drain timeout."""
        if self._phase is not _Phase.TRANSMITTING:
            return
        self._phase = _Phase.CLOSING
        self._update_reading()
        if self._tasks:
            self._drain_timer = self._loop.call_later(
                self._settings.drain_timeout, self._drain_expired
            )
        self._maybe_close()

    def _drain_expired(self) -> None:
        self._warn("nbd requests still running %.1fs after close", self._settings.drain_timeout)
        self.cancel_requests()
        self.abort()

    def abort(self) -> None:
        """Drop the connection now."""
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def cancel_requests(self) -> None:
        """Cancel the requests still being served (server shutdown past its drain timeout)."""
        for task in list(self._tasks):
            task.cancel()

    async def _close_session(self) -> None:
        try:
            grace = self._settings.drain_timeout
            if self._negotiation is not None and not self._negotiation.done():
                await self._await_or_cancel({self._negotiation}, grace)
            if self._tasks:
                await self._await_or_cancel(set(self._tasks), grace)
            export, self._export = self._export, None
            if export is not None:
                await self._release(export)
        finally:
            self._forget(self)
            if not self.closed.done():
                self.closed.set_result(None)

    async def _await_or_cancel(self, tasks: set[asyncio.Task[None]], grace: float) -> None:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            log.warning(
                "nbd cancelling requests that outlived the connection peer=%s export=%s count=%d",
                self.peer,
                self.export_name,
                len(pending),
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    async def _release(self, export: Export) -> None:
        try:
            await self._provider.release_export(export)
        except Exception:
            log.exception(
                "nbd release_export failed peer=%s export=%s", self.peer, self.export_name
            )

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return
        phase = self._phase
        if phase is _Phase.NEGOTIATING:
            want = self._end - self._start < NEGOTIATION_BACKLOG
        elif phase is _Phase.TRANSMITTING:
            want = not (self._stalled or self._write_paused)
        else:
            want = False
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _compact(self) -> None:
        n = self._end - self._start
        if n:
            self._buf[:n] = bytes(self._view[self._start : self._end])
        self._start = 0
        self._end = n

    def _warn(self, message: str, *args: object) -> None:
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            log.warning(message + " peer=%s export=%s", *args, self.peer, self.export_name)
            if self._warnings == MAX_WARNINGS:
                log.warning("nbd further warnings suppressed peer=%s", self.peer)

    def _hard_disconnect(self, reason: str, *args: object) -> None:
        self._warn("nbd disconnecting client: " + reason, *args)
        self._phase = _Phase.CLOSED
        self.abort()

    # -- negotiation -----------------------------------------------------------------------------

    async def _negotiate(self) -> None:
        try:
            async with asyncio.timeout(self._settings.handshake_timeout):
                await self._negotiate_options()
        except _Disconnected:
            pass
        except TimeoutError:
            self._hard_disconnect("negotiation timed out")
        except Exception:
            log.exception("nbd negotiation failed peer=%s", self.peer)
            self._hard_disconnect("internal error during negotiation")

    async def _read(self, n: int) -> bytes:
        while self._end - self._start < n:
            await self._wait_data()
        start = self._start
        data = bytes(self._view[start : start + n])
        self._start = start + n
        self._update_reading()
        return data

    async def _skip(self, n: int) -> None:
        while n:
            if self._end == self._start:
                await self._wait_data()
            step = min(n, self._end - self._start)
            self._start += step
            n -= step
        self._update_reading()

    async def _wait_data(self) -> None:
        if self._lost:
            raise _Disconnected
        if self._start == self._end:
            self._start = self._end = 0
        self._update_reading()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._lost:
            raise _Disconnected

    def _send_raw(self, data: bytes) -> None:
        if self._transport is not None and not self._lost:
            self._transport.write(data)

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._send_raw(w.option_reply(option, reply, payload))

    def _option_error(self, option: int, reply: int, message: str) -> None:
        self._send_raw(w.option_error(option, reply, message))

    async def _negotiate_options(self) -> None:
        self._send_raw(
            w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES)
        )
        (client_flags,) = w.CLIENT_FLAGS.unpack(await self._read(4))
        if client_flags & ~w.KNOWN_CLIENT_FLAGS:
            self._hard_disconnect("unknown client flags 0x%x", client_flags)
            return
        fixed = bool(client_flags & w.FLAG_C_FIXED_NEWSTYLE)
        no_zeroes = bool(client_flags & w.FLAG_C_NO_ZEROES)
        for _ in range(self._settings.max_options):
            magic, option, length = w.OPTION_HEADER.unpack(await self._read(16))
            if magic != w.IHAVEOPT:
                self._hard_disconnect("bad option magic 0x%x", magic)
                return
            if not fixed and option != w.OPT_EXPORT_NAME:
                self._hard_disconnect("option %d from a client without fixed newstyle", option)
                return
            if length > MAX_OPTION_LENGTH:
                if option == w.OPT_EXPORT_NAME:  # cannot be refused politely
                    self._hard_disconnect("export name of %d bytes", length)
                    return
                await self._skip(length)
                self._option_error(option, w.REP_ERR_TOO_BIG, "option payload too large")
                continue
            data = await self._read(length)
            if await self._handle_option(option, data, no_zeroes):
                return
        self._hard_disconnect("more than %d options", self._settings.max_options)

    async def _handle_option(self, option: int, data: bytes, no_zeroes: bool) -> bool:
        """Answer one option; True when negotiation is over (transmission or disconnect)."""
        if option == w.OPT_GO or option == w.OPT_INFO:
            return await self._handle_info(option, data)
        if option == w.OPT_EXPORT_NAME:
            return await self._handle_export_name(data, no_zeroes)
        if option == w.OPT_ABORT:
            self._option_reply(option, w.REP_ACK)
            self._phase = _Phase.CLOSED
            if self._transport is not None:
                self._transport.close()
            return True
        if option == w.OPT_LIST:
            self._handle_list(data)
        elif option == w.OPT_STRUCTURED_REPLY:
            if data:
                self._option_error(option, w.REP_ERR_INVALID, "option takes no payload")
            else:
                self._structured = True
                self._option_reply(option, w.REP_ACK)
        elif option == w.OPT_SET_META_CONTEXT or option == w.OPT_LIST_META_CONTEXT:
            self._handle_meta_context(option, data)
        else:
            self._option_error(option, w.REP_ERR_UNSUP, f"option {option} is not supported")
        return False

    def _handle_list(self, data: bytes) -> None:
        if data:
            self._option_error(w.OPT_LIST, w.REP_ERR_INVALID, "option takes no payload")
            return
        try:
            names = self._provider.list_exports()
        except Exception:
            log.exception("nbd list_exports failed peer=%s", self.peer)
            self._option_error(w.OPT_LIST, w.REP_ERR_POLICY, "listing exports failed")
            return
        for name in names:
            self._option_reply(w.OPT_LIST, w.REP_SERVER, w.rep_server(name))
        self._option_reply(w.OPT_LIST, w.REP_ACK)

    def _handle_meta_context(self, option: int, data: bytes) -> None:
        if option == w.OPT_SET_META_CONTEXT:
            self._meta_export, self._meta_selected = None, False
        if not self._structured:
            self._option_error(option, w.REP_ERR_INVALID, "structured replies not negotiated")
            return
        try:
            name, queries = w.parse_meta_context_request(data)
        except w.OptionError as exc:
            self._option_error(option, exc.reply, exc.message)
            return
        if option == w.OPT_LIST_META_CONTEXT:
            found = not queries or any(q in ("base:", w.META_BASE_ALLOCATION) for q in queries)
        else:
            found = w.META_BASE_ALLOCATION in queries
            self._meta_export, self._meta_selected = name, found
        if found:
            context_id = _META_CONTEXT_ID if option == w.OPT_SET_META_CONTEXT else 0
            payload = w.meta_context(context_id, w.META_BASE_ALLOCATION)
            self._option_reply(option, w.REP_META_CONTEXT, payload)
        self._option_reply(option, w.REP_ACK)

    async def _open(self, name: str) -> Export | str:
        """Open ``name``: the export, or the reason it cannot be used."""
        try:
            export = await self._provider.open_export(name)
        except UnknownExport as exc:
            return str(exc)
        except Exception as exc:
            log.exception("nbd open_export failed peer=%s export=%s", self.peer, name)
            return f"export {name!r} could not be opened: {exc}"
        try:
            size = export.size
            if not 0 <= size < 1 << 63:
                raise ValueError(f"size {size} out of range")
            export.block_sizes.validate()
        except Exception as exc:
            log.exception("nbd export misconfigured peer=%s export=%s", self.peer, name)
            await self._release(export)
            return f"export {name!r} is misconfigured: {exc}"
        return export

    def _transmission_flags(self, export: Export) -> int:
        flags = w.TF_HAS_FLAGS | w.TF_SEND_FLUSH | w.TF_SEND_FUA
        if export.read_only:
            flags |= w.TF_READ_ONLY
        else:
            if export.can_trim:
                flags |= w.TF_SEND_TRIM
            if export.can_write_zeroes:
                flags |= w.TF_SEND_WRITE_ZEROES | w.TF_SEND_FAST_ZERO
        if self._structured:
            flags |= w.TF_SEND_DF
        if export.can_multi_conn:
            flags |= w.TF_CAN_MULTI_CONN
        return flags

    async def _handle_info(self, option: int, data: bytes) -> bool:
        try:
            name, requests = w.parse_info_request(data)
        except w.OptionError as exc:
            self._option_error(option, exc.reply, exc.message)
            return False
        opened = await self._open(name)
        if isinstance(opened, str):
            self._option_error(option, w.REP_ERR_UNKNOWN, opened)
            return False
        export = opened
        if self._lost:
            await self._release(export)
            raise _Disconnected
        sizes = export.block_sizes
        self._option_reply(
            option, w.REP_INFO, w.info_export(export.size, self._transmission_flags(export))
        )
        if w.INFO_NAME in requests:
            self._option_reply(option, w.REP_INFO, w.info_string(w.INFO_NAME, name))
        if w.INFO_DESCRIPTION in requests and export.description:
            self._option_reply(
                option, w.REP_INFO, w.info_string(w.INFO_DESCRIPTION, export.description)
            )
        maximum = min(sizes.maximum, MAX_BLOCK_SIZE)
        self._option_reply(
            option, w.REP_INFO, w.info_block_size(sizes.minimum, sizes.preferred, maximum)
        )
        self._option_reply(option, w.REP_ACK)
        if option == w.OPT_INFO:
            await self._release(export)
            return False
        self._enter_transmission(export, name)
        return True

    async def _handle_export_name(self, data: bytes, no_zeroes: bool) -> bool:
        try:
            name = w.decode_string(data, "export name")
        except w.OptionError as exc:
            self._hard_disconnect("bad export name: %s", exc.message)
            return True
        opened = await self._open(name)
        if isinstance(opened, str):
            self._hard_disconnect("NBD_OPT_EXPORT_NAME: %s", opened)
            return True
        export = opened
        if self._lost:
            await self._release(export)
            raise _Disconnected
        reply = w.EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags(export))
        self._send_raw(reply if no_zeroes else reply + w.EXPORT_NAME_ZEROES)
        self._enter_transmission(export, name)
        return True

    def _enter_transmission(self, export: Export, name: str) -> None:
        sizes = export.block_sizes
        self._export = export
        self.export_name = name
        self._size = export.size
        self._read_only = export.read_only
        self._can_trim = export.can_trim and not self._read_only
        self._can_zero = export.can_write_zeroes and not self._read_only
        self._align = sizes.minimum
        self._max_payload = min(sizes.maximum, MAX_BLOCK_SIZE)
        self._eager = export.eager
        self._block_status = self._meta_selected and self._meta_export == name
        self._phase = _Phase.TRANSMITTING
        log.info(
            "nbd client connected peer=%s export=%s size=%d structured=%s",
            self.peer,
            name,
            self._size,
            self._structured,
        )
        self._update_reading()
        self._parse()

    # -- transmission: parsing -------------------------------------------------------------------

    def _kick(self) -> None:
        if self._phase is _Phase.TRANSMITTING and self._end > self._start:
            self._loop.call_soon(self._parse)

    def _parse(self) -> None:
        self._batching = True
        try:
            self._parse_requests()
        except Exception:
            log.exception("nbd internal error peer=%s export=%s", self.peer, self.export_name)
            self._hard_disconnect("internal error")
        finally:
            self._batching = False
        if self._out:
            self._flush()
        self._update_reading()

    def _parse_requests(self) -> None:
        buf = self._buf
        start = self._start
        end = self._end
        unpack = w.REQUEST.unpack_from
        settings = self._settings
        max_requests = settings.max_inflight_requests
        max_bytes = settings.max_inflight_bytes
        try:
            while True:
                if self._discard:
                    step = min(self._discard, end - start)
                    start += step
                    self._discard -= step
                    if self._discard:
                        break
                if end - start < _REQUEST_SIZE or self._phase is not _Phase.TRANSMITTING:
                    break
                if self._write_paused:
                    break
                if len(self._tasks) >= max_requests or self._inflight_bytes >= max_bytes:
                    self._stalled = True
                    break
                if self._out_bytes >= OUT_FLUSH_BYTES:
                    self._flush()
                    continue
                magic, flags, cmd, handle, offset, length = unpack(buf, start)
                if magic != w.REQUEST_MAGIC:
                    self._hard_disconnect("bad request magic 0x%08x", magic)
                    return
                if cmd == w.CMD_WRITE:
                    if length <= SMALL_WRITE:
                        if end - start - _REQUEST_SIZE < length:
                            break  # wait for the whole payload
                        start += _REQUEST_SIZE
                        # bytes, not a bytearray slice: as cheap, and the journal checksums
                        # bytes without copying them again.
                        data = bytes(self._view[start : start + length])
                        start += length
                        self._write(flags, handle, offset, data)
                        continue
                    start += _REQUEST_SIZE
                    refusal = self._check_write(flags, offset, length)
                    if refusal is not None:
                        self._reject(w.CMD_WRITE, handle, *refusal)
                        self._discard = length
                        continue
                    payload = bytearray(length)
                    have = min(end - start, length)
                    payload[:have] = self._view[start : start + have]
                    start += have
                    if have == length:
                        self._write(flags, handle, offset, payload)
                        continue
                    self._payload = payload
                    self._payload_view = memoryview(payload)
                    self._payload_filled = have
                    self._payload_request = (flags, handle, offset)
                    break
                start += _REQUEST_SIZE
                if cmd == w.CMD_READ:
                    self._read_request(flags, handle, offset, length)
                else:
                    self._command(cmd, flags, handle, offset, length)
        finally:
            if start == end:
                start = end = 0
            self._start = start
            self._end = end

    def _check_bounds(self, offset: int, length: int, beyond: int) -> tuple[int, str] | None:
        if offset > self._size or length > self._size - offset:
            return beyond, f"request [{offset}, +{length}) beyond export size {self._size}"
        align = self._align
        if align > 1 and (offset % align or length % align):
            return w.NBD_EINVAL, f"request not aligned to {align} bytes"
        return None

    def _check_write(self, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        if flags & ~w.CMD_FLAG_FUA:
            return w.NBD_EINVAL, f"unsupported flags 0x{flags:x} for write"
        if self._read_only:
            return w.NBD_EPERM, "export is read-only"
        if length > self._max_payload:
            return w.NBD_EINVAL, f"write of {length} bytes exceeds maximum {self._max_payload}"
        return self._check_bounds(offset, length, w.NBD_ENOSPC)

    def _write(self, flags: int, handle: int, offset: int, data: bytes | bytearray) -> None:
        length = len(data)
        refusal = self._check_write(flags, offset, length)
        if refusal is not None:
            self._reject(w.CMD_WRITE, handle, *refusal)
        elif not length:
            self._send_ack(handle)
        else:
            assert self._export is not None
            coro = self._export.write(offset, data, fua=bool(flags & w.CMD_FLAG_FUA))
            self._run(coro, w.CMD_WRITE, flags, handle, offset, length)

    def _read_request(self, flags: int, handle: int, offset: int, length: int) -> None:
        if flags & ~_READ_FLAGS or (flags & w.CMD_FLAG_DF and not self._structured):
            self._reject(w.CMD_READ, handle, w.NBD_EINVAL, f"unsupported flags 0x{flags:x}")
            return
        if length > self._max_payload:
            msg = f"read of {length} bytes exceeds maximum {self._max_payload}"
            self._reject(w.CMD_READ, handle, w.NBD_EINVAL, msg)
            return
        refusal = self._check_bounds(offset, length, w.NBD_EINVAL)
        if refusal is not None:
            self._reject(w.CMD_READ, handle, *refusal)
        elif not length:
            self._complete(w.CMD_READ, flags, handle, offset, 0, b"")
        else:
            assert self._export is not None
            self._run(self._export.read(offset, length), w.CMD_READ, flags, handle, offset, length)

    def _command(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        export = self._export
        assert export is not None
        coro: Coroutine[Any, Any, Any]
        fua = bool(flags & w.CMD_FLAG_FUA)
        if cmd == w.CMD_FLUSH:
            if flags & ~w.CMD_FLAG_FUA or offset or length:
                self._reject(cmd, handle, w.NBD_EINVAL, "flush takes no flags, offset or length")
                return
            coro = export.flush()
        elif cmd == w.CMD_WRITE_ZEROES:
            refusal = self._check_modify(cmd, flags, _ZERO_FLAGS, self._can_zero, offset, length)
            if refusal is not None:
                self._reject(cmd, handle, *refusal)
                return
            if not length:
                self._send_ack(handle)
                return
            coro = export.write_zeroes(
                offset,
                length,
                fua=fua,
                may_trim=not flags & w.CMD_FLAG_NO_HOLE,
                fast=bool(flags & w.CMD_FLAG_FAST_ZERO),
            )
        elif cmd == w.CMD_TRIM:
            refusal = self._check_modify(cmd, flags, w.CMD_FLAG_FUA, self._can_trim, offset, length)
            if refusal is not None:
                self._reject(cmd, handle, *refusal)
                return
            if not length:
                self._send_ack(handle)
                return
            coro = self._trim(export, offset, length, fua)
        elif cmd == w.CMD_BLOCK_STATUS:
            if not self._block_status:
                self._reject(cmd, handle, w.NBD_EINVAL, "no metadata context negotiated")
                return
            if flags & ~_STATUS_FLAGS:
                self._reject(cmd, handle, w.NBD_EINVAL, f"unsupported flags 0x{flags:x}")
                return
            refusal = self._check_bounds(offset, length, w.NBD_EINVAL)
            if refusal is None and not length:
                refusal = w.NBD_EINVAL, "block status of zero bytes"
            if refusal is not None:
                self._reject(cmd, handle, *refusal)
                return
            coro = export.block_status(offset, length)
        elif cmd == w.CMD_DISC:
            self._start_closing()
            return
        else:
            self._reject(cmd, handle, w.NBD_EINVAL, f"unknown command {cmd}")
            return
        self._run(coro, cmd, flags, handle, offset, length)

    def _check_modify(
        self, cmd: int, flags: int, allowed: int, advertised: bool, offset: int, length: int
    ) -> tuple[int, str] | None:
        name = w.COMMAND_NAMES[cmd]
        if flags & ~allowed:
            return w.NBD_EINVAL, f"unsupported flags 0x{flags:x} for {name}"
        if self._read_only:
            return w.NBD_EPERM, "export is read-only"
        if not advertised:
            return w.NBD_EINVAL, f"{name} is not supported by this export"
        beyond = w.NBD_ENOSPC if cmd == w.CMD_WRITE_ZEROES else w.NBD_EINVAL
        return self._check_bounds(offset, length, beyond)

    @staticmethod
    async def _trim(export: Export, offset: int, length: int, fua: bool) -> None:
        await export.trim(offset, length)
        if fua:
            await export.flush()

    # -- transmission: running requests ----------------------------------------------------------

    def _run(
        self,
        coro: Coroutine[Any, Any, Any],
        cmd: int,
        flags: int,
        handle: int,
        offset: int,
        length: int,
    ) -> None:
        """Start the export call now, in arrival order; reply when it completes."""
        yielded: Any = _NOT_STARTED
        if self._eager:
            # Step it here; only a call that suspends gets a task (see Export.eager).
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                self._complete(cmd, flags, handle, offset, length, stop.value)
                return
            except NBDError as exc:
                self._fail(cmd, handle, offset, length, exc)
                return
            except (Exception, asyncio.CancelledError) as exc:
                self._crash(cmd, handle, offset, length, exc)
                return
        nbytes = length if cmd == w.CMD_READ or cmd == w.CMD_WRITE else 0
        self._inflight_bytes += nbytes
        # Tasks start in creation order (the loop's ready queue is FIFO), so a call that is not
        # stepped here still starts before any call of a later request.
        task = self._loop.create_task(
            self._finish(coro, yielded, cmd, flags, handle, offset, length, nbytes)
        )
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _finish(
        self,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        cmd: int,
        flags: int,
        handle: int,
        offset: int,
        length: int,
        nbytes: int,
    ) -> None:
        try:
            if yielded is _NOT_STARTED:
                result = await coro
            else:
                result = await _resume(coro, yielded)
        except NBDError as exc:
            self._fail(cmd, handle, offset, length, exc)
        except Exception as exc:
            self._crash(cmd, handle, offset, length, exc)
        else:
            self._complete(cmd, flags, handle, offset, length, result)
        finally:
            self._inflight_bytes -= nbytes

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._stalled:
            settings = self._settings
            if (
                len(self._tasks) < settings.max_inflight_requests
                and self._inflight_bytes < settings.max_inflight_bytes
            ):
                self._stalled = False
                self._parse()
        self._maybe_close()

    def _complete(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, result: Any
    ) -> None:
        if cmd == w.CMD_READ:
            self._send_read(handle, offset, length, result)
        elif cmd == w.CMD_BLOCK_STATUS:
            try:
                extents = _clip_extents(result, length, bool(flags & w.CMD_FLAG_REQ_ONE))
            except Exception as exc:
                self._crash(cmd, handle, offset, length, exc)
                return
            self._send_extents(handle, extents)
        else:
            self._send_ack(handle)

    def _fail(self, cmd: int, handle: int, offset: int, length: int, exc: NBDError) -> None:
        code = w.nbd_errno(exc.errno_code)
        self._warn(
            "nbd request failed cmd=%s handle=0x%x offset=%d length=%d error=%s message=%r",
            w.COMMAND_NAMES.get(cmd, cmd),
            handle,
            offset,
            length,
            errno.errorcode.get(code, code),
            exc.message,
        )
        self._send_error(cmd, handle, code, exc.message, offset if length else None)

    def _crash(self, cmd: int, handle: int, offset: int, length: int, exc: BaseException) -> None:
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            log.error(
                "nbd export raised cmd=%s handle=0x%x offset=%d length=%d peer=%s export=%s",
                w.COMMAND_NAMES.get(cmd, cmd),
                handle,
                offset,
                length,
                self.peer,
                self.export_name,
                exc_info=exc,
            )
        self._send_error(cmd, handle, w.NBD_EIO, "internal error", offset if length else None)

    def _reject(self, cmd: int, handle: int, code: int, message: str) -> None:
        """Refuse a request the client should not have sent."""
        self._warn(
            "nbd request refused cmd=%s handle=0x%x error=%s message=%r",
            w.COMMAND_NAMES.get(cmd, cmd),
            handle,
            errno.errorcode.get(code, code),
            message,
        )
        self._send_error(cmd, handle, code, message, None)

    # -- transmission: replies -------------------------------------------------------------------

    def _send_ack(self, handle: int) -> None:
        self._queue(w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, handle), 16)

    def _send_error(
        self, cmd: int, handle: int, code: int, message: str, offset: int | None
    ) -> None:
        if self._structured:
            # Error offsets are for reads, whose content chunks they qualify.
            reply = w.error_chunk(handle, code, message, offset if cmd == w.CMD_READ else None)
        else:
            reply = w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, code, handle)
        self._queue(reply, len(reply))

    def _send_read(self, handle: int, offset: int, length: int, data: Any) -> None:
        if type(data) is bytes or type(data) is bytearray:
            size = len(data)
        elif isinstance(data, memoryview):
            size = data.nbytes
        else:
            size = -1
        if size != length:
            exc = TypeError(f"read returned {type(data).__name__} of {size} bytes, not {length}")
            self._crash(w.CMD_READ, handle, offset, length, exc)
            return
        if not length:
            if self._structured:
                header = w.CHUNK_HEADER.pack(
                    w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE, w.REPLY_TYPE_NONE, handle, 0
                )
            else:
                header = w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, handle)
            self._queue(header, len(header))
            return
        if self._structured:
            header = w.OFFSET_DATA_HEADER.pack(
                w.STRUCTURED_REPLY_MAGIC,
                w.REPLY_FLAG_DONE,
                w.REPLY_TYPE_OFFSET_DATA,
                handle,
                length + 8,
                offset,
            )
        else:
            header = w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, handle)
        self._queue(header, 0)
        self._queue(data, length)

    def _send_extents(self, handle: int, extents: list[tuple[int, int]]) -> None:
        parts = [
            w.BLOCK_STATUS_HEADER.pack(
                w.STRUCTURED_REPLY_MAGIC,
                w.REPLY_FLAG_DONE,
                w.REPLY_TYPE_BLOCK_STATUS,
                handle,
                4 + 8 * len(extents),
                _META_CONTEXT_ID,
            )
        ]
        parts.extend(w.EXTENT.pack(length, flags) for length, flags in extents)
        reply = b"".join(parts)
        self._queue(reply, len(reply))

    def _queue(self, data: BytesLike, nbytes: int) -> None:
        if self._lost:
            return
        self._out.append(data)
        self._out_bytes += nbytes
        if not self._batching and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out:
            self._out = []
            self._out_bytes = 0
            if self._transport is not None and not self._lost:
                self._transport.writelines(out)

    def _maybe_close(self) -> None:
        """After NBD_CMD_DISC, EOF or shutdown: close once every reply is out."""
        if self._phase is not _Phase.CLOSING or self._tasks:
            return
        self._payload = self._payload_view = None  # a write cut short by EOF or shutdown
        self._flush()
        self._phase = _Phase.CLOSED
        if self._transport is not None and not self._lost:
            self._transport.close()


def _clip_extents(
    extents: Sequence[tuple[int, int]], length: int, req_one: bool
) -> list[tuple[int, int]]:
    """Make an export's extents a valid block-status reply for a request of ``length`` bytes:
    positive lengths that stop at the request's end, merged runs, and at most one if REQ_ONE."""
    out: list[tuple[int, int]] = []
    covered = 0
    for extent_length, extent_flags in extents:
        extent_length = int(extent_length)
        if extent_length <= 0:
            break
        flags = int(extent_flags) & (w.STATE_HOLE | w.STATE_ZERO)
        extent_length = min(extent_length, length - covered)
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + extent_length, flags)
        elif (req_one and out) or len(out) == MAX_EXTENTS:
            break
        else:
            out.append((extent_length, flags))
        covered += extent_length
        if covered >= length:
            break
    if not out:
        raise ValueError("block_status returned no extent")
    return out
