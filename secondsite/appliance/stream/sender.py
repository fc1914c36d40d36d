"""The protected side of the replication stream: ships a :class:`ProtectedBuffer` to a receiver.

A :class:`StreamSender` keeps one connection to the recovery appliance for one VPG and reconnects,
with exponential backoff, after anything goes wrong (refused or lost connection, ProtocolError,
an ERROR from the receiver, or a receiver silent for ``peer_timeout``). Each connection:

1. HELLO (vpg, source, volume table); the receiver answers WELCOME(position), its durable seq.
2. Records up to the position are freed from the buffer; everything above it is (re)sent, in seq
   order, batched into DATA frames of up to ``batch_bytes`` (waiting up to ``linger`` for a small
   batch to fill), zstd-compressed when configured and worth it.
3. ACK(seq) frees records up to seq. Records stay in the buffer until then, whatever happens to
   the connection, so a resume never loses one; the receiver skips anything at or below its
   position, so a resend never applies one twice.
4. :meth:`StreamSender.checksums` sends SUMS_ASK at once and waits for its SUMS (up to
   ``sums_inflight`` at a time, within what the receiver takes); a connection lost meanwhile fails
   it with :class:`SumsLost` (ask again).
5. HOLD(id) calls ``on_hold(id)``: the caller holds acks to its writers, appends a
   CHECKPOINT_MARK for ``id`` to the buffer and returns its seq (``on_hold`` must not leave a hold
   behind if it raises). MARKED(id, seq) goes out at once, ahead of any DATA still queued, so a
   hold lasts a round trip however far behind the stream is. RELEASE(id) calls
   ``on_release(id)``. A hold the receiver does not release within ``hold_timeout`` (or whose
   connection is lost) is released here, and logged.

Metrics (:meth:`StreamSender.metrics`): bytes written by the workload against bytes on the wire,
durable seq, lag in records, bytes and seconds (the age of the oldest unacknowledged record: the
replication RPO as this side sees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .buffer import ProtectedBuffer
from .frames import (
    MAX_BODY,
    Ack,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Heartbeat,
    Hello,
    Hold,
    HoldFailed,
    Marked,
    ProtocolError,
    Record,
    Release,
    Sums,
    SumsAsk,
    VolumeEntry,
    Welcome,
    data_body,
    data_frame,
    encode,
)
from .ratelimit import Flow

__all__ = [
    "Connector",
    "RemoteError",
    "SenderMetrics",
    "SenderSettings",
    "StreamSender",
    "SumsLost",
    "tcp_connector",
]

log = logging.getLogger("secondsite.appliance.stream")

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
HoldCallback = Callable[[int], Awaitable[int]]
ReleaseCallback = Callable[[int], Coroutine[Any, Any, None]]


def tcp_connector(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    handshake_timeout: float = 10.0,
) -> Connector:
    """Connects over plain TCP, or TLS when ``ssl_context`` is given (the server's name is
    checked against ``server_hostname``, default ``host``, if the context checks hostnames)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if ssl_context is None:
            return await asyncio.open_connection(host, port)
        return await asyncio.open_connection(
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname or host,
            ssl_handshake_timeout=handshake_timeout,
        )

    return connect


class RemoteError(Exception):
    """The receiver sent ERROR."""

    def __init__(self, code: int, message: str) -> None:
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        super().__init__(f"{name}: {message}")
        self.code = code


class SumsLost(ConnectionError):
    """A SUMS_ASK got no answer: there was no connection, or it was lost before the answer."""


@dataclass(frozen=True, slots=True)
class SenderSettings:
    """Batching, compression, timeouts and backoff of a :class:`StreamSender`."""

    batch_bytes: int = 1024 * 1024
    """Record payload bytes per DATA frame (a larger single record goes alone)."""
    batch_records: int = 4096
    linger: float = 0.001
    """Seconds to wait for a batch smaller than half of ``batch_bytes`` to fill up."""
    compression_level: int | None = None
    """zstd level for DATA bodies (1-3 are cheap); None: never compress."""
    adaptive_compression: bool = True
    """After a batch that compressed poorly, send the next ``compression_probe_interval``
    batches uncompressed before trying again."""
    min_compression_gain: float = 0.1
    """A compressed body is sent only if at least this fraction smaller than the raw one."""
    compression_probe_interval: int = 16
    compress_min_bytes: int = 4096
    """Smaller DATA bodies go uncompressed and count for nothing in adaptive compression: a
    checkpoint mark or a few ZERO records alone never save ``min_compression_gain``, and must not
    turn compression off for the writes that follow."""
    compress_in_thread_bytes: int = 128 * 1024
    """Bodies at least this large are compressed in a worker thread (zstd releases the GIL)."""
    heartbeat_interval: float = 1.0
    peer_timeout: float = 5.0
    """Seconds without any frame from the receiver (it heartbeats) before reconnecting."""
    connect_timeout: float = 10.0
    """Seconds for TCP connect, TLS handshake and WELCOME together."""
    backoff_min: float = 0.05
    backoff_max: float = 5.0
    hold_timeout: float = 10.0
    """Seconds a checkpoint hold may last before it is released here."""
    max_body: int = MAX_BODY
    sums_inflight: int = 32
    """Checksum requests (SUMS_ASK) waiting for their answers at a time; more wait here (the
    receiver takes up to its ``max_sums_inflight``, 64 by default)."""
    write_buffer_high: int = 1024 * 1024
    """Unsent bytes in the socket's buffer above which the sender waits (bounded memory). Kept
    small: control frames (MARKED) queue behind these bytes."""


@dataclass
class SenderMetrics:
    """A snapshot of a sender's counters (monotonic totals unless noted)."""

    vpg: str
    source: str
    connected: bool
    sessions: int
    """Connections that got a WELCOME."""
    connect_failures: int
    last_error: str
    durable_seq: int
    """Newest seq the receiver acknowledged durable (or welcomed at)."""
    sent_seq: int
    appended_bytes: int
    """Bytes the workload wrote (WRITE payloads appended to the buffer)."""
    payload_bytes_sent: int
    """Record payload bytes sent, resends included."""
    body_bytes_sent: int
    """DATA bodies before compression."""
    wire_bytes_sent: int
    """Every frame as written to the socket (what compression saves on)."""
    records_sent: int
    frames_sent: int
    batches_compressed: int
    batches_uncompressed: int
    compress_cpu_seconds: float
    lag_records: int
    """Records not yet acknowledged (gauge)."""
    lag_bytes: int
    """Buffer bytes not yet acknowledged (gauge)."""
    lag_seconds: float
    """Age of the oldest unacknowledged record (gauge): the replication RPO from this side."""
    buffer_capacity: int
    holds: int
    holds_expired: int
    hold_seconds: list[float] = field(default_factory=list)
    """Recent holds, HOLD received to released, seconds."""

    @property
    def wire_ratio(self) -> float:
        """Bytes on the wire per byte of DATA body (below 1: compression pays)."""
        return self.wire_bytes_sent / self.body_bytes_sent if self.body_bytes_sent else 1.0


@dataclass(eq=False)
class _Hold:
    started: float
    marked: bool = False
    release_requested: bool = False
    timer: asyncio.TimerHandle | None = None


class _Stop(Exception):
    """End the current connection (the reason is logged)."""


class StreamSender:
    """Streams ``buffer`` to a receiver for (``vpg``, ``source``); see the module doc.

    ``start()`` it, ``await close()`` it. ``on_gap(position, durable)`` is called (and an error
    logged) when a receiver welcomes at a position below what it acknowledged before: it lost
    records that are no longer in the buffer, so the caller must resync. ``known_durable``: what
    the receiver acknowledged before this sender started (e.g. before a clean restart), so that
    the first welcome is checked against it too.
    """

    def __init__(
        self,
        *,
        vpg: str,
        source: str,
        volumes: Sequence[VolumeEntry] | Mapping[str, int],
        buffer: ProtectedBuffer,
        connect: Connector,
        settings: SenderSettings | None = None,
        on_hold: HoldCallback | None = None,
        on_release: ReleaseCallback | None = None,
        on_gap: Callable[[int, int], None] | None = None,
        bandwidth: Flow | None = None,
        known_durable: int = 0,
    ) -> None:
        self.vpg = vpg
        self.source = source
        if isinstance(volumes, Mapping):
            volumes = [VolumeEntry(n, s) for n, s in volumes.items()]
        self.volumes = tuple(volumes)
        self.buffer = buffer
        self.connect = connect
        self.settings = settings or SenderSettings()
        self.on_hold = on_hold
        self.on_release = on_release
        self.on_gap = on_gap
        self.bandwidth = bandwidth
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        """The current connection's writer, once welcomed (control frames go straight to it)."""
        self._holds: dict[int, _Hold] = {}
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._hold_seconds: list[float] = []
        self._zstd = (
            zstandard.ZstdCompressor(level=self.settings.compression_level)
            if self.settings.compression_level is not None
            else None
        )
        self._skip_compression = 0
        self.connected = False
        self.durable_seq = known_durable
        """Newest seq a receiver acknowledged (or welcomed at), or ``known_durable``."""
        self._sums: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        """SUMS_ASK request id -> (its answer's future, the digests expected)."""
        self._sum_ids = itertools.count(1)
        self._sum_slots = asyncio.Semaphore(self.settings.sums_inflight)
        self.sent_seq = buffer.acked_seq
        self._sent_high = buffer.acked_seq
        """Newest seq ever written to a socket by this sender (across connections)."""
        self._last_write = 0.0
        self._c: dict[str, int] = dict.fromkeys(
            (
                "sessions",
                "connect_failures",
                "payload_bytes_sent",
                "body_bytes_sent",
                "wire_bytes_sent",
                "records_sent",
                "frames_sent",
                "batches_compressed",
                "batches_uncompressed",
                "holds",
                "holds_expired",
            ),
            0,
        )
        self._compress_cpu = 0.0
        self.last_error = ""

    def _log(self, level: int, event: str, **kv: object) -> None:
        extra = "".join(f" {k}={v}" for k, v in kv.items())
        log.log(level, "vpg=%s source=%s event=%s%s", self.vpg, self.source, event, extra)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("sender already started")
        self.buffer.add_listener(self._wake.set)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"stream sender {self.vpg}/{self.source}"
        )

    async def close(self) -> None:
        """Disconnect and stop; records not acknowledged stay in the buffer."""
        task, self._task = self._task, None
        if task is not None:
            self.buffer.remove_listener(self._wake.set)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._release_all("sender closed")
        side = list(self._side_tasks)
        for t in side:
            t.cancel()
        for t in side:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def checksums(self, volume: int, offset: int, length: int, block_size: int) -> bytes:
        """Digests (``frames.DIGEST_SIZE`` bytes per block) of [offset, offset+length) of volume
        index ``volume`` as the receiver has it, with every record sent before this call in it.
        Raises :class:`SumsLost` without a connection, or when it is lost before the answer."""
        async with self._sum_slots:
            writer = self._writer
            if writer is None or writer.is_closing():
                raise SumsLost("not connected")
            ask = SumsAsk(next(self._sum_ids), volume, offset, length, block_size)
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._sums[ask.request] = (future, ask.blocks)
            try:
                self._write(writer, encode(ask))
                return await future
            finally:
                self._sums.pop(ask.request, None)

    def _lose_sums(self) -> None:
        for future, _ in self._sums.values():
            if not future.done():
                future.set_exception(SumsLost("connection lost before the answer"))
        self._sums.clear()

    async def wait_durable(self, seq: int) -> None:
        """Return once every record up to ``seq`` is acknowledged (or spilled)."""
        await self.buffer.wait_acked(seq)

    def metrics(self) -> SenderMetrics:
        b = self.buffer
        c = self._c
        return SenderMetrics(
            vpg=self.vpg,
            source=self.source,
            connected=self.connected,
            sessions=c["sessions"],
            connect_failures=c["connect_failures"],
            last_error=self.last_error,
            durable_seq=self.durable_seq,
            sent_seq=self.sent_seq,
            appended_bytes=b.appended_bytes,
            payload_bytes_sent=c["payload_bytes_sent"],
            body_bytes_sent=c["body_bytes_sent"],
            wire_bytes_sent=c["wire_bytes_sent"],
            records_sent=c["records_sent"],
            frames_sent=c["frames_sent"],
            batches_compressed=c["batches_compressed"],
            batches_uncompressed=c["batches_uncompressed"],
            compress_cpu_seconds=self._compress_cpu,
            lag_records=b.count,
            lag_bytes=b.used_bytes,
            lag_seconds=b.lag_seconds(),
            buffer_capacity=b.capacity_bytes,
            holds=c["holds"],
            holds_expired=c["holds_expired"],
            hold_seconds=list(self._hold_seconds),
        )

    # -- connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        s = self.settings
        backoff = s.backoff_min
        while True:
            sessions = self._c["sessions"]
            try:
                async with asyncio.timeout(s.connect_timeout):
                    reader, writer = await self.connect()
            except (OSError, TimeoutError) as e:
                self._c["connect_failures"] += 1
                self._failed("connect-failed", e)
            else:
                try:
                    await self._connection(reader, writer)
                except (OSError, TimeoutError, EOFError, ProtocolError, RemoteError, _Stop) as e:
                    self._failed("disconnected", e)
                except Exception as e:  # a bug: say so loudly, but keep replicating
                    self.last_error = repr(e)
                    log.exception("vpg=%s source=%s event=sender-bug", self.vpg, self.source)
                finally:
                    self.connected = False
                    self._release_all("connection lost")
                    self._writer = None
                    self._lose_sums()
                    writer.close()
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await writer.wait_closed()
            if self._c["sessions"] > sessions:
                backoff = s.backoff_min
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(s.backoff_max, backoff * 2)

    def _failed(self, event: str, e: BaseException) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        level = logging.WARNING if isinstance(e, ProtocolError | RemoteError) else logging.INFO
        self._log(level, event, error=repr(self.last_error))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, until it fails (it raises, or is cancelled by ``close()``)."""
        s = self.settings
        writer.transport.set_write_buffer_limits(high=s.write_buffer_high)
        decoder = FrameDecoder(s.max_body)
        self._write(writer, encode(Hello(self.vpg, self.source, self.volumes)))
        frames: list[Frame] = []
        async with asyncio.timeout(s.connect_timeout):
            while not frames:
                frames = await self._read(reader, decoder)
        first, rest = frames[0], frames[1:]
        if isinstance(first, Error):
            raise RemoteError(first.code, first.message)
        if not isinstance(first, Welcome):
            raise ProtocolError(f"expected WELCOME, got {type(first).__name__.upper()}")
        self._welcome(first.position)
        self._writer = writer
        self.connected = True
        self._c["sessions"] += 1
        loop = asyncio.get_running_loop()
        reading = loop.create_task(self._read_loop(reader, decoder, rest))
        writing = loop.create_task(self._write_loop(writer))
        try:
            done, _ = await asyncio.wait((reading, writing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reading, writing):
                t.cancel()
            for t in (reading, writing):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        for t in done:
            t.result()
        raise _Stop("connection ended")

    def _welcome(self, position: int) -> None:
        buf = self.buffer
        if position < self.durable_seq:
            self._log(
                logging.ERROR,
                "receiver-behind",
                position=position,
                acknowledged=self.durable_seq,
                action="resync needed",
            )
            if self.on_gap is not None:
                self.on_gap(position, self.durable_seq)
        if position > self._sent_high:
            shift = buf.renumber_after(position, self._sent_high)
            self._log(
                logging.WARNING,
                "receiver-ahead",
                position=position,
                sent=self._sent_high,
                renumbered_by=shift,
            )
            self._sent_high = position
        else:
            buf.ack(position)
        self.durable_seq = self.sent_seq = position
        self._log(
            logging.INFO,
            "welcomed",
            position=position,
            resend=buf.unacked_since(position),
        )

    # -- reading ----------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, decoder: FrameDecoder) -> list[Frame]:
        chunk = await reader.read(256 * 1024)
        if not chunk:
            decoder.eof()
            raise EOFError("receiver closed the connection")
        return decoder.feed(chunk)

    async def _read_loop(
        self, reader: asyncio.StreamReader, decoder: FrameDecoder, frames: list[Frame]
    ) -> None:
        timeout = self.settings.peer_timeout
        while True:
            for frame in frames:
                self._handle(frame)
            try:
                async with asyncio.timeout(timeout):
                    frames = await self._read(reader, decoder)
            except TimeoutError:
                raise _Stop(f"nothing from the receiver for {timeout:g} s") from None

    def _handle(self, frame: Frame) -> None:
        match frame:
            case Ack():
                if frame.seq > self._sent_high:
                    raise ProtocolError(f"ACK {frame.seq} beyond the newest seq sent")
                if frame.seq > self.durable_seq:
                    self.durable_seq = frame.seq
                    self.buffer.ack(frame.seq)
            case Hold():
                self._spawn(self._hold(frame.request))
            case Release():
                self._release(frame.request)
            case Sums():
                self._answer(frame)
            case Heartbeat():
                pass
            case Error():
                raise RemoteError(frame.code, frame.message)
            case _:
                raise ProtocolError(f"unexpected {type(frame).__name__.upper()} from a receiver")

    def _answer(self, frame: Sums) -> None:
        wait = self._sums.get(frame.request)
        if wait is None:
            return  # its asker gave up (cancelled)
        future, expected = wait
        if frame.count != expected:
            raise ProtocolError(f"SUMS {frame.request}: {frame.count} digests, {expected} asked")
        if not future.done():
            future.set_result(frame.digests)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, writer: asyncio.StreamWriter, *pieces: bytes) -> None:
        """Write one frame, whole or in pieces (not joined: a DATA body is not copied)."""
        writer.writelines(pieces)
        self._c["wire_bytes_sent"] += sum(map(len, pieces))
        self._c["frames_sent"] += 1
        self._last_write = time.monotonic()

    def _send_control(self, frame: Frame) -> None:
        """Send ``frame`` now, between DATA frames (each is written whole, so none is split);
        without a connection it is dropped, as is the request it answers."""
        if self._writer is not None and not self._writer.is_closing():
            self._write(self._writer, encode(frame))

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        buf = self.buffer
        while True:
            records = buf.after(self.sent_seq, s.batch_bytes, s.batch_records)
            if records and s.linger > 0:
                size = sum(len(r.payload) for r in records)
                if size < s.batch_bytes // 2 and len(records) < s.batch_records:
                    await asyncio.sleep(s.linger)
                    records = buf.after(self.sent_seq, s.batch_bytes, s.batch_records)
            if not records:
                self._wake.clear()
                if buf.unacked_since(self.sent_seq):
                    continue
                idle = s.heartbeat_interval - (time.monotonic() - self._last_write)
                if idle <= 0:
                    self._write(writer, encode(Heartbeat()))
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await self._wake.wait()
                continue
            frame = await self._encode(records)
            if self.bandwidth is not None:
                await self.bandwidth.acquire(sum(map(len, frame)))
            self._write(writer, *frame)
            last = records[-1].seq
            self.sent_seq = last
            self._sent_high = max(self._sent_high, last)
            self._c["records_sent"] += len(records)
            self._c["payload_bytes_sent"] += sum(len(r.payload) for r in records)
            await writer.drain()

    async def _encode(self, records: list[Record]) -> tuple[bytes, bytes]:
        s = self.settings
        body = data_body(records)
        self._c["body_bytes_sent"] += len(body)
        compressed: bytes | None = None
        if self._zstd is not None and len(body) >= s.compress_min_bytes:
            if self._skip_compression:
                self._skip_compression -= 1
            else:
                if len(body) >= s.compress_in_thread_bytes:
                    candidate = await asyncio.to_thread(self._compress, body)
                else:
                    candidate = self._compress(body)
                if len(candidate) <= len(body) * (1.0 - s.min_compression_gain):
                    compressed = candidate
                elif s.adaptive_compression:
                    self._skip_compression = s.compression_probe_interval
        self._c["batches_compressed" if compressed is not None else "batches_uncompressed"] += 1
        return data_frame(body, compressed)

    def _compress(self, body: bytes) -> bytes:
        assert self._zstd is not None
        t0 = time.thread_time()
        out: bytes = self._zstd.compress(body)
        self._compress_cpu += time.thread_time() - t0
        return out

    # -- checkpoint holds -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_done)

    def _side_done(self, task: asyncio.Task[Any]) -> None:
        self._side_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log(logging.ERROR, "callback-failed", error=repr(task.exception()))

    async def _hold(self, request: int) -> None:
        if request in self._holds:
            return
        if self.on_hold is None:
            self._send_control(HoldFailed(request, "this source takes no checkpoints"))
            return
        hold = self._holds[request] = _Hold(time.perf_counter())
        self._c["holds"] += 1
        try:
            async with asyncio.timeout(self.settings.hold_timeout):
                seq = await self.on_hold(request)
        except asyncio.CancelledError:
            self._holds.pop(request, None)
            raise
        except Exception as e:
            self._holds.pop(request, None)
            self._log(logging.WARNING, "hold-failed", request=request, error=repr(e))
            self._send_control(HoldFailed(request, f"{type(e).__name__}: {e}"))
            return
        hold.marked = True
        if hold.release_requested or self._holds.get(request) is not hold:
            self._finish_hold(request, hold, "released before marked")
            return
        hold.timer = asyncio.get_running_loop().call_later(
            self.settings.hold_timeout, self._expire, request
        )
        if self.sent_seq < seq < self.buffer.first_seq:
            # Spilled (the buffer overflowed) before it was sent: it will never arrive.
            self._send_control(HoldFailed(request, "mark dropped by a spill"))
        else:
            # At once, not after the mark record: the hold need only last until every source
            # has marked; the receiver keeps the cut itself in order (its barrier).
            self._send_control(Marked(request, seq))

    def _release(self, request: int) -> None:
        hold = self._holds.get(request)
        if hold is None:
            return  # released here already (expired), or never held
        if not hold.marked:
            hold.release_requested = True  # on_hold still running: release when it returns
            return
        self._finish_hold(request, hold, None)

    def _expire(self, request: int) -> None:
        hold = self._holds.get(request)
        if hold is not None:
            self._c["holds_expired"] += 1
            self._finish_hold(request, hold, "not released in time")

    def _release_all(self, why: str) -> None:
        for request, hold in list(self._holds.items()):
            if hold.marked:
                self._finish_hold(request, hold, why)
            else:
                hold.release_requested = True

    def _finish_hold(self, request: int, hold: _Hold, local_reason: str | None) -> None:
        self._holds.pop(request, None)
        if hold.timer is not None:
            hold.timer.cancel()
        held = time.perf_counter() - hold.started
        self._hold_seconds = [*self._hold_seconds[-999:], held]
        if local_reason is not None:
            self._log(
                logging.WARNING,
                "hold-released-locally",
                request=request,
                reason=repr(local_reason),
                hold_ms=f"{held * 1e3:.1f}",
            )
        if self.on_release is not None:
            self._spawn(self.on_release(request))
