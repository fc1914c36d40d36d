"""The recovery side of the replication stream: an asyncio server feeding :class:`StreamSink`\\ s.

One connection per (VPG, protected appliance). With a TLS context, each connection completes a
mutual-TLS handshake first (a refusal is logged with the peer's address and counted in
``rejected``), and its HELLO is refused unless the peer's certificate names the source the HELLO
claims (:func:`.tls.identity_refusal`). Per connection:

1. HELLO names the vpg, the source and its volume table. An unknown vpg, or a sink that refuses
   the source, gets an ERROR and the connection is closed. A newer connection of the same vpg and
   source replaces an older one: the older is told so (ERROR REPLACED) and closed, and its records
   in flight are allowed to become durable *before* the newer one is welcomed, so that the
   position the newer one resumes from counts them.
2. WELCOME carries ``sink.position(source)``: the sender resumes right after it.
3. DATA records above the position are submitted to the sink in order, without waiting for each
   to be durable; records at or below it are skipped (a resend after a reconnect is never applied
   twice). Seqs must grow strictly within a connection; volume indexes and ranges must fit the
   volume table. ACK(seq) tells the sender that every record up to seq is durable; one ACK is
   sent per group of records that became durable together.
4. SUMS_ASK (delta sync) is answered with SUMS once every record received before it is durable:
   the digests are of the volume's newest state in the sink, with those records in it
   (``sink.checksums``). At most ``max_sums_inflight`` may wait at a time.
5. HEARTBEATs flow both ways when there is nothing else to send; a sender silent for
   ``idle_timeout`` is dropped.

Anything malformed gets an ERROR and a closed connection, and a warning in the log naming the
peer (and vpg and source once known); other connections are unaffected.

:meth:`StreamReceiver.request_checkpoint` takes a cut across every source of a VPG in two steps.
The *hold*: HOLD to each source, which holds its acks and appends a CHECKPOINT_MARK; once every
MARKED is in, RELEASE to all. The hold lasts a round trip, whatever backlog the stream has. The
*cut*: each connection submits records up to its mark and then holds back what follows (a barrier)
until every source's mark has been submitted; ``on_cut`` is called right then, and the barriers
lift. So a sink that journals several sources in one order can mark its checkpoint in ``on_cut``
and get exactly the records before the marks, from every source, in front of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .frames import (
    MAX_BODY,
    PROTOCOL_VERSION,
    RECORD_HEADER_SIZE,
    Ack,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
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
    Welcome,
    encode,
)
from .sink import SinkRefused, StreamSink
from .tls import identity_refusal

__all__ = [
    "CheckpointError",
    "ReceiverSettings",
    "SessionStats",
    "StreamReceiver",
]

log = logging.getLogger("secondsite.appliance.stream")

SinkLookup = Callable[[str], StreamSink | None]


class CheckpointError(Exception):
    """A checkpoint cut could not be taken: a source is not connected, refused, or timed out."""


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """Limits and timeouts of a :class:`StreamReceiver`."""

    handshake_timeout: float = 10.0
    """Seconds a peer has from connecting (TLS included) to a complete HELLO."""
    idle_timeout: float = 10.0
    """Seconds without any frame from a sender (it heartbeats when idle) before it is dropped."""
    heartbeat_interval: float = 1.0
    """Seconds of silence towards a sender after which a HEARTBEAT is sent."""
    max_body: int = MAX_BODY
    """Largest frame body accepted (and largest DATA body once decompressed)."""
    max_inflight_bytes: int = 64 * 1024 * 1024
    """Record bytes per connection submitted but not yet durable; reading pauses beyond."""
    checkpoint_timeout: float = 5.0
    """Default seconds :meth:`StreamReceiver.request_checkpoint` waits for every MARKED (the
    sources hold their acks meanwhile)."""
    cut_timeout: float = 30.0
    """Default seconds it then waits for every mark record to arrive (the backlog before it)."""
    drain_timeout: float = 10.0
    """Seconds a closing or replaced connection waits for its records in flight to be durable."""
    read_size: int = 256 * 1024
    max_sums_inflight: int = 64
    """SUMS_ASK requests per connection answered concurrently; more is a protocol error."""


@dataclass
class SessionStats:
    """Counters of one connection, for status and tests."""

    vpg: str = ""
    source: str = ""
    peer: str = ""
    position: int = 0
    """The sink's position when this connection was welcomed."""
    last_seq: int = 0
    """Newest seq received."""
    durable_seq: int = 0
    """Newest seq acknowledged durable (after ``position``)."""
    records: int = 0
    skipped: int = 0
    """Records at or below ``position`` (resent after a reconnect), not applied."""
    payload_bytes: int = 0
    wire_bytes: int = 0
    connected_at: float = field(default_factory=time.time)


class _Closed(Exception):
    """The session ends; ``code`` and the message are sent to the peer when a code is given.
    ``warn``: the peer or the sink is at fault (logged as a warning and counted as rejected)."""

    def __init__(self, message: str, code: ErrorCode | None = None, *, warn: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.warn = warn


@dataclass(eq=False)
class _HoldWait:
    """One connection's part in a checkpoint request."""

    marked: asyncio.Future[int]
    """MARKED arrived: the source holds its acks; the result is the seq of its mark."""
    reached: asyncio.Future[int]
    """The mark record was submitted to the sink (and a barrier holds back what follows)."""
    marked_seq: int | None = None

    def fail(self, why: str) -> None:
        for fut in (self.marked, self.reached):
            if not fut.done():
                fut.set_exception(CheckpointError(why))

    def settle(self) -> None:
        for fut in (self.marked, self.reached):
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: a failure is reported by request_checkpoint


class _Session:
    """One sender's connection, after the handshake."""

    def __init__(
        self,
        receiver: StreamReceiver,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: FrameDecoder,
        peer: str,
    ) -> None:
        self.receiver = receiver
        self.settings = receiver.settings
        self.reader = reader
        self.writer = writer
        self.decoder = decoder
        self.stats = SessionStats(peer=peer)
        self.hello: Hello | None = None
        self.sink: StreamSink | None = None
        self._pending: collections.deque[tuple[int, Awaitable[None], int]] = collections.deque()
        self._pending_event = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._inflight = 0
        self._acked = 0
        self._ack_scheduled = False
        self._last_write = time.monotonic()
        self._holds: dict[int, _HoldWait] = {}
        self._barrier: int | None = None
        """The checkpoint request whose mark this connection reached: later records wait."""
        self._held_back: collections.deque[Record] = collections.deque()
        self.finished = asyncio.Event()
        self._stop: _Closed | None = None
        self._ending = False
        self._reading: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.acker: asyncio.Task[None] | None = None
        self._sum_tasks: set[asyncio.Task[None]] = set()
        self._durable_waits: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque()
        )
        """(seq, future): completed once the record of seq (and all before it) is durable."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.stats.vpg, self.stats.source)

    def log(self, level: int, event: str, **kv: object) -> None:
        s = self.stats
        extra = "".join(f" {k}={v}" for k, v in kv.items())
        log.log(level, "vpg=%s source=%s peer=%s event=%s%s", s.vpg, s.source, s.peer, event, extra)

    # -- writing ----------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(encode(frame))
        self._last_write = time.monotonic()

    def _schedule_ack(self) -> None:
        # Called as records become durable, possibly many in one event-loop step (a group
        # commit): the ACK goes out once that step yields, covering the whole group.
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_ack)

    def _flush_ack(self) -> None:
        self._ack_scheduled = False
        durable = self.stats.durable_seq
        if durable > self._acked:
            self._acked = durable
            self.send(Ack(durable))

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(max(0.0, self._last_write + interval - time.monotonic()))
            if time.monotonic() - self._last_write >= interval:
                self.send(Heartbeat())

    # -- reading ----------------------------------------------------------------------------

    async def _read_frames(self, timeout: float) -> list[Frame]:
        """Frames from at least one chunk of input; raises _Closed at a clean EOF."""
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await self.reader.read(self.settings.read_size)
            except TimeoutError:
                raise _Closed(f"nothing received for {timeout:g} s") from None
            if not chunk:
                self.decoder.eof()
                raise _Closed("peer closed the connection")
            self.stats.wire_bytes += len(chunk)
            frames = self.decoder.feed(chunk)
            if frames:
                return frames

    async def handshake(self) -> Hello:
        deadline = self.settings.handshake_timeout
        async with asyncio.timeout(deadline):
            frames = await self._read_frames(deadline)
        hello = frames[0]
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected HELLO, got {type(hello).__name__.upper()}")
        if len(frames) > 1:
            raise ProtocolError("frames after HELLO before WELCOME")
        self.stats.vpg, self.stats.source = hello.vpg, hello.source
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol {hello.protocol} not supported ({PROTOCOL_VERSION})")
        self.hello = hello
        return hello

    def welcome(self, sink: StreamSink) -> None:
        assert self.hello is not None
        try:
            sink.attach(self.hello.source, self.hello.volumes)
            position = sink.position(self.hello.source)
        except SinkRefused as e:
            raise _Closed(f"refused: {e}", ErrorCode.REFUSED, warn=True) from None
        except Exception as e:  # the sink's own failure, not this peer's
            raise _Closed(f"sink failed: {e!r}", ErrorCode.SINK_FAILED, warn=True) from e
        self.sink = sink
        self.stats.position = self.stats.last_seq = self.stats.durable_seq = position
        self._acked = position
        self.send(Welcome(position))
        self.log(
            logging.INFO,
            "welcome",
            position=position,
            volumes=len(self.hello.volumes),
        )

    async def serve(self) -> None:
        """Process frames until the peer goes, fails, or the session is stopped."""
        loop = asyncio.get_running_loop()
        self.acker = loop.create_task(self._acker(), name=f"stream acker {self.key}")
        self._heartbeat_task = loop.create_task(self._heartbeat(), name=f"heartbeat {self.key}")
        self._reading = reading = loop.create_task(self._read_loop(), name=f"reader {self.key}")
        try:
            await asyncio.wait((reading, self.acker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        if self.acker.done():
            self.acker.result()  # raises the sink's failure
        if reading.cancelled():
            raise self._stop or _Closed("stopped")
        reading.result()

    async def _read_loop(self) -> None:
        while True:
            await self._room.wait()
            for frame in await self._read_frames(self.settings.idle_timeout):
                self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        match frame:
            case Data():
                self._data(frame.records)
            case Heartbeat():
                pass
            case Marked():
                self._marked(frame.request, frame.seq)
            case SumsAsk():
                self._ask_sums(frame)
            case HoldFailed():
                wait = self._holds.get(frame.request)
                if wait is not None:
                    wait.fail(f"hold failed: {frame.reason}")
            case Error():
                raise _Closed(f"peer error {frame.code}: {frame.message}")
            case _:
                raise ProtocolError(f"unexpected {type(frame).__name__.upper()} from a sender")

    def _data(self, records: tuple[Record, ...]) -> None:
        hello, stats = self.hello, self.stats
        assert hello is not None
        volumes = hello.volumes
        for r in records:
            if r.seq <= stats.position:
                # A resend (after a reconnect) of what the sink has durably: never apply twice.
                stats.skipped += 1
                continue
            if r.seq <= stats.last_seq:
                raise ProtocolError(f"seq {r.seq} after {stats.last_seq}")
            if r.op is not Op.CHECKPOINT_MARK and (
                r.volume >= len(volumes) or r.offset + r.length > volumes[r.volume].size
            ):
                raise ProtocolError(
                    f"record {r.seq}: [{r.offset}, {r.offset + r.length}) outside volume index "
                    f"{r.volume}"
                )
            stats.last_seq = r.seq
            self._inflight += RECORD_HEADER_SIZE + len(r.payload)
            if self._barrier is not None:
                self._held_back.append(r)
            else:
                self._submit(r)
        if self._pending:
            self._pending_event.set()
        if self._inflight > self.settings.max_inflight_bytes:
            self._room.clear()
        self._check_marks()

    def _ask_sums(self, ask: SumsAsk) -> None:
        volumes = self.hello.volumes if self.hello is not None else ()
        if ask.volume >= len(volumes) or ask.offset + ask.length > volumes[ask.volume].size:
            raise ProtocolError(
                f"SUMS_ASK {ask.request}: [{ask.offset}, {ask.offset + ask.length}) outside "
                f"volume index {ask.volume}"
            )
        if len(self._sum_tasks) >= self.settings.max_sums_inflight:
            raise ProtocolError(f"more than {self.settings.max_sums_inflight} SUMS_ASK in flight")
        task = asyncio.get_running_loop().create_task(self._answer_sums(ask, self.stats.last_seq))
        self._sum_tasks.add(task)
        task.add_done_callback(self._sum_tasks.discard)

    async def _answer_sums(self, ask: SumsAsk, after: int) -> None:
        hello, sink = self.hello, self.sink
        assert hello is not None and sink is not None
        try:
            if self.stats.durable_seq < after:
                waiter = asyncio.get_running_loop().create_future()
                self._durable_waits.append((after, waiter))
                await waiter
            digests = await sink.checksums(
                hello.source, ask.volume, ask.offset, ask.length, ask.block_size
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the sink's failure, not this peer's
            self.stop(_Closed(f"checksums failed: {e!r}", ErrorCode.SINK_FAILED, warn=True))
            return
        self.send(Sums(ask.request, digests))

    def _durable_to(self, seq: int) -> None:
        waits = self._durable_waits
        while waits and waits[0][0] <= seq:
            _, waiter = waits.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _submit(self, r: Record) -> None:
        hello, sink = self.hello, self.sink
        assert hello is not None and sink is not None
        try:
            durable = sink.submit(hello.source, r)
        except Exception as e:  # SinkError, or whatever the sink's storage raised
            raise _Closed(
                f"sink refused record {r.seq}: {e}", ErrorCode.SINK_FAILED, warn=True
            ) from None
        self._pending.append((r.seq, durable, RECORD_HEADER_SIZE + len(r.payload)))
        self.stats.records += 1
        self.stats.payload_bytes += len(r.payload)
        wait = self._holds.get(r.offset) if r.op is Op.CHECKPOINT_MARK else None
        if wait is not None and not wait.reached.done():
            # This source's side of the cut is complete: hold back the rest until every
            # source of the request got here too.
            self._barrier = r.offset
            wait.reached.set_result(r.seq)

    def lift_barrier(self, request: int) -> None:
        """The cut is marked (or abandoned): submit what was held back, in order."""
        if self._barrier != request:
            return
        self._barrier = None
        while self._held_back and self._barrier is None:
            self._submit(self._held_back.popleft())
        if self._pending:
            self._pending_event.set()

    async def _acker(self) -> None:
        """Await durability in seq order and ACK what became durable; once the session is
        ending, return when nothing is left in flight."""
        stats = self.stats
        while True:
            while not self._pending:
                if self._ending:
                    return
                self._pending_event.clear()
                await self._pending_event.wait()
            seq, durable, size = self._pending[0]
            try:
                await durable
            except Exception as e:
                self._abandon_pending()
                raise _Closed(
                    f"record {seq} not durable: {e!r}", ErrorCode.SINK_FAILED, warn=True
                ) from e
            self._pending.popleft()
            self._inflight -= size
            stats.durable_seq = seq
            self._durable_to(seq)
            self._schedule_ack()
            if self._inflight <= self.settings.max_inflight_bytes // 2:
                self._room.set()

    def _abandon_pending(self) -> None:
        """The sink failed: records after the failed one are not waited for any more; their
        futures' failures are expected, not errors of their own."""
        for _, durable, _ in self._pending:
            if isinstance(durable, asyncio.Future):
                durable.add_done_callback(_consume)
        self._pending.clear()
        self._inflight = 0

    async def drain(self) -> bool:
        """Stop taking records; wait (bounded) until those in flight are durable. False if some
        are still in flight (the acker then goes on in the background)."""
        self._ending = True
        self._pending_event.set()
        acker = self.acker
        if acker is None:
            return True
        await asyncio.wait({acker}, timeout=self.settings.drain_timeout)
        self._flush_ack()
        if not acker.done():
            self.log(logging.WARNING, "drain-timeout", pending=len(self._pending))
            return False
        if not acker.cancelled() and acker.exception() is not None:
            self.log(logging.WARNING, "drain-failed", error=repr(str(acker.exception())))
        return True

    # -- checkpoints ------------------------------------------------------------------------

    def begin_hold(self, request: int) -> _HoldWait:
        loop = asyncio.get_running_loop()
        wait = self._holds[request] = _HoldWait(loop.create_future(), loop.create_future())
        if self._ending:  # gone, registered only until its records in flight are durable
            wait.fail("source disconnected")
        else:
            self.send(Hold(request))
        return wait

    def release(self, request: int) -> None:
        self.send(Release(request))

    def end_request(self, request: int) -> None:
        wait = self._holds.pop(request, None)
        if wait is not None:
            wait.settle()
        self.lift_barrier(request)

    def _marked(self, request: int, seq: int) -> None:
        wait = self._holds.get(request)
        if wait is None or wait.marked.done():
            return  # late: the request timed out and was released already
        wait.marked_seq = seq
        wait.marked.set_result(seq)
        self._check_marks()

    def _check_marks(self) -> None:
        """A MARKED whose mark record this connection went past without seeing: the mark was
        lost (spilled on the protected side), so this cut cannot be taken."""
        for request, wait in self._holds.items():
            seq = wait.marked_seq
            if seq is None or wait.reached.done() or seq > self.stats.last_seq:
                continue
            wait.reached.set_exception(
                CheckpointError(f"MARKED {request} at seq {seq} without its mark record")
            )

    def stop(self, reason: _Closed) -> None:
        """Make the session end with ``reason``."""
        self._stop = reason
        if self._reading is not None:
            self._reading.cancel()

    def fail_holds(self, why: str) -> None:
        for wait in self._holds.values():
            wait.fail(why)

    async def close(self) -> None:
        tasks = list(self._sum_tasks)
        if self._heartbeat_task is not None:
            tasks.append(self._heartbeat_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class StreamReceiver:
    """Serves replication streams on any number of listeners; see the module doc."""

    def __init__(
        self,
        sinks: SinkLookup,
        settings: ReceiverSettings | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sinks = sinks
        self.settings = settings or ReceiverSettings()
        self.ssl_context = ssl_context
        self._listeners: list[tuple[socket.socket, asyncio.Task[None]]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._handshakes: dict[tuple[str, str], asyncio.Lock] = {}
        self._draining: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._request_ids = itertools.count(1)
        self._cut_locks: dict[str, asyncio.Lock] = {}
        self._hold_times: collections.deque[float] = collections.deque(maxlen=1000)
        self._closing = False
        self.rejected = 0
        """Connections refused or dropped for a protocol, TLS or sink error."""

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP (port 0 picks one); returns the bound address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"stream accept {host}:{port}"
        )
        self._listeners.append((sock, task))
        addr = sock.getsockname()
        log.info(
            "event=stream-listening address=%s:%d tls=%s",
            addr[0],
            addr[1],
            self.ssl_context is not None,
        )
        return str(addr[0]), int(addr[1])

    async def _accept_loop(self, sock: socket.socket) -> None:
        # Accepting by hand, and completing TLS per connection with connect_accepted_socket,
        # lets a failed TLS handshake be logged and counted here (asyncio's and uvloop's own
        # TLS servers drop those silently), and works the same on both loops.
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # e.g. out of file descriptors: back off, don't spin
                log.warning("event=accept-failed error=%r", e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._connection(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _open(self, conn: socket.socket, peer: str) -> _Session:
        loop = asyncio.get_running_loop()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        tls = self.ssl_context
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=tls,
                ssl_handshake_timeout=self.settings.handshake_timeout if tls else None,
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            conn.close()
            self.rejected += 1
            log.warning("peer=%s event=tls-refused reason=%r", peer, f"TLS handshake failed: {e!r}")
            raise
        # (uvloop returns its TLS wrapper as the protocol: the stream's own is the one to use.)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return _Session(self, reader, writer, FrameDecoder(self.settings.max_body), peer)

    async def _connection(self, conn: socket.socket) -> None:
        try:
            addr = conn.getpeername()
            peer = f"{addr[0]}:{addr[1]}"
        except OSError:
            conn.close()
            return
        try:
            session = await self._open(conn, peer)
        except (OSError, TimeoutError):
            return
        registered = False
        try:
            if self._closing:
                raise _Closed("shutting down", ErrorCode.SHUTDOWN)
            hello = await session.handshake()
            registered = await self._register(session, hello)
            await session.serve()
        except _Closed as e:
            if e.code is not None:
                session.send(Error(e.code, str(e)))
            self.rejected += e.warn
            session.log(logging.WARNING if e.warn else logging.INFO, "closed", reason=repr(str(e)))
        except ProtocolError as e:
            self.rejected += 1
            session.send(Error(ErrorCode.PROTOCOL, e.reason))
            session.log(logging.WARNING, "protocol-error", reason=repr(e.reason))
        except ConnectionError as e:  # the peer went away (a sender closing resets, too)
            session.log(logging.INFO, "connection-lost", error=repr(e))
        except (TimeoutError, OSError) as e:
            self.rejected += 1
            session.log(logging.WARNING, "connection-error", error=repr(e))
        except Exception as e:  # a bug: say so, and keep serving everyone else
            self.rejected += 1
            session.send(Error(ErrorCode.INTERNAL, "internal error"))
            log.exception("peer=%s event=internal-error error=%r", peer, e)
        finally:
            await self._finish(session, registered)

    async def _register(self, session: _Session, hello: Hello) -> bool:
        key = (hello.vpg, hello.source)
        lock = self._handshakes.setdefault(key, asyncio.Lock())
        async with lock:
            if self.ssl_context is not None:  # plain TCP has no certificate to check
                refusal = identity_refusal(hello.source, session.writer.get_extra_info("peercert"))
                if refusal is not None:
                    raise _Closed(f"sender identity: {refusal}", ErrorCode.REFUSED, warn=True)
            sink = self.sinks(hello.vpg)
            if sink is None:
                raise _Closed(f"unknown vpg {hello.vpg!r}", ErrorCode.UNKNOWN_VPG, warn=True)
            old = self._sessions.get(key)
            if old is not None:
                old.log(logging.INFO, "replaced", by=session.stats.peer)
                old.stop(_Closed("replaced by a newer connection", ErrorCode.REPLACED))
                await old.finished.wait()
            # Records an earlier connection submitted must be durable (and so counted in the
            # sink's position) before this one is told where to resume: else they come twice.
            draining = self._draining.get(key)
            if draining is not None and not draining.done():
                await asyncio.wait({draining}, timeout=self.settings.drain_timeout)
                if not draining.done():
                    raise _Closed(
                        "records of an earlier connection are not durable yet",
                        ErrorCode.SINK_FAILED,
                        warn=True,
                    )
            if self._closing:
                raise _Closed("shutting down", ErrorCode.SHUTDOWN)
            session.welcome(sink)
            self._sessions[key] = session
        return True

    async def _finish(self, session: _Session, registered: bool) -> None:
        session.fail_holds("source disconnected")
        try:
            if registered and not await session.drain():
                assert session.acker is not None
                self._draining[session.key] = session.acker
                session.acker.add_done_callback(functools.partial(self._drained, session))
        finally:
            if registered and self._sessions.get(session.key) is session:
                del self._sessions[session.key]
            await session.close()
            session.finished.set()

    def _drained(self, session: _Session, task: asyncio.Task[None]) -> None:
        if self._draining.get(session.key) is task:
            del self._draining[session.key]
        if not task.cancelled() and task.exception() is not None:
            session.log(logging.WARNING, "late-sink-failure", error=repr(task.exception()))

    # -- checkpoints ------------------------------------------------------------------------

    def sources(self, vpg: str) -> list[str]:
        """Sources of ``vpg`` connected now."""
        return sorted(src for (v, src) in self._sessions if v == vpg)

    async def request_checkpoint(
        self,
        vpg: str,
        sources: Collection[str] | None = None,
        *,
        timeout: float | None = None,
        cut_timeout: float | None = None,
        on_cut: Callable[[Mapping[str, int]], None] | None = None,
    ) -> dict[str, int]:
        """Take a cut across ``sources`` of ``vpg`` (default: all connected); returns each
        source's mark seq once the cut is complete.

        Hold: HOLD goes to each source, which holds new acks to its writers and appends a
        CHECKPOINT_MARK after every write it acked; RELEASE goes to all as soon as every MARKED
        is in (or ``timeout`` passed). Cut: once every source's mark record has been submitted
        to the sink, with nothing after any mark submitted yet, ``on_cut(marks)`` is called;
        records submitted before it are exactly those before the marks. A sink journaling
        several sources in one order marks its recovery-side checkpoint there (synchronously).

        One request per vpg at a time (later ones wait). Raises :class:`CheckpointError` if a
        source is not connected, refuses, disconnects, does not mark within ``timeout``, or its
        mark record does not arrive within ``cut_timeout``; every source is released and every
        connection resumes either way. The hold is timed: :meth:`hold_times`.
        """
        hold_timeout = self.settings.checkpoint_timeout if timeout is None else timeout
        cut_wait = self.settings.cut_timeout if cut_timeout is None else cut_timeout
        async with self._cut_locks.setdefault(vpg, asyncio.Lock()):
            live = {src: s for (v, src), s in self._sessions.items() if v == vpg}
            wanted = sorted(live if sources is None else set(sources))
            missing = [s for s in wanted if s not in live]
            if not wanted or missing:
                raise CheckpointError(f"vpg {vpg}: sources not connected: {missing or 'none'}")
            request = next(self._request_ids)
            sessions = [live[s] for s in wanted]
            start = time.perf_counter()
            waits = {s.stats.source: s.begin_hold(request) for s in sessions}
            released = False
            try:
                try:
                    async with asyncio.timeout(hold_timeout):
                        for w in waits.values():
                            await asyncio.shield(w.marked)
                except TimeoutError:
                    late = [src for src, w in waits.items() if not w.marked.done()]
                    raise CheckpointError(f"vpg {vpg}: no MARKED from {late} in time") from None
                finally:
                    self._release(vpg, request, sessions, start)
                    released = True
                try:
                    async with asyncio.timeout(cut_wait):
                        marks = {src: await asyncio.shield(w.reached) for src, w in waits.items()}
                except TimeoutError:
                    late = [src for src, w in waits.items() if not w.reached.done()]
                    raise CheckpointError(f"vpg {vpg}: marks of {late} not in time") from None
                if on_cut is not None:
                    on_cut(marks)
                return marks
            finally:
                if not released:
                    self._release(vpg, request, sessions, start)
                for s in sessions:
                    s.end_request(request)

    def _release(self, vpg: str, request: int, sessions: list[_Session], start: float) -> None:
        for s in sessions:
            s.release(request)
        held = time.perf_counter() - start
        self._hold_times.append(held)
        log.debug("vpg=%s event=checkpoint-hold request=%d hold_ms=%.3f", vpg, request, held * 1e3)

    def hold_times(self) -> list[float]:
        """Recent checkpoint hold durations (HOLD sent to RELEASE sent), seconds, oldest first."""
        return list(self._hold_times)

    # -- status and shutdown ----------------------------------------------------------------

    def stats(self) -> list[SessionStats]:
        return [s.stats for s in self._sessions.values()]

    async def close(self) -> None:
        """Stop listening, let connections' records in flight become durable, close them."""
        self._closing = True
        for sock, accepting in self._listeners:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            sock.close()
        self._listeners.clear()
        for session in list(self._sessions.values()):
            session.stop(_Closed("shutting down", ErrorCode.SHUTDOWN))
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=self.settings.drain_timeout + 2.0)
        leftovers = list(self._handlers) + list(self._draining.values())
        for task in leftovers:
            task.cancel()
        for task in leftovers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
