"""Pieces the stream end-to-end tests share: a protected appliance in miniature (:class:`Source`),
a TCP proxy that can delay, stall, drop and corrupt traffic (:class:`FaultProxy`), and checks."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

from secondsite.appliance.stream import (
    BufferFull,
    Connector,
    DirtyMap,
    MemorySink,
    ProtectedBuffer,
    ReceiverSettings,
    SenderSettings,
    StreamReceiver,
    StreamSender,
)
from secondsite.appliance.stream.ratelimit import Flow

KiB = 1024
MiB = 1024 * KiB


class Source:
    """Volumes as bytearrays (the truth), a protected buffer and a sender, and the capture side
    of checkpoint holds: a hold makes new writes wait for their acks until it is released."""

    def __init__(
        self,
        name: str,
        connect: Connector,
        *,
        vpg: str = "vpg-a",
        volumes: dict[str, int] | None = None,
        capacity: int = 64 * MiB,
        settings: SenderSettings | None = None,
        first_seq: int = 1,
        bandwidth: Flow | None = None,
        checkpoints: bool = True,
    ) -> None:
        self.name = name
        self.volumes = volumes or {"disk0": 4 * MiB, "disk1": 2 * MiB}
        self.names = list(self.volumes)
        self.images = {n: bytearray(s) for n, s in self.volumes.items()}
        self.buffer = ProtectedBuffer(capacity, first_seq=first_seq)
        self.dirty = {i: DirtyMap(s) for i, s in enumerate(self.volumes.values())}
        self.seqs: list[int] = []
        """Seq of every record appended, in order (marks included)."""
        self.acks_open = asyncio.Event()
        self.acks_open.set()
        self.holds: list[int] = []
        self.hold_delay = 0.0
        self.releases: list[int] = []
        self.sender = StreamSender(
            vpg=vpg,
            source=name,
            volumes=self.volumes,
            buffer=self.buffer,
            connect=connect,
            settings=settings
            or SenderSettings(peer_timeout=1.0, heartbeat_interval=0.2, backoff_max=0.3),
            on_hold=self.on_hold if checkpoints else None,
            on_release=self.on_release if checkpoints else None,
            bandwidth=bandwidth,
        )

    # -- capture ----------------------------------------------------------------------------

    def _seqs_since(self, before: int) -> None:
        self.seqs.extend(range(before + 1, self.buffer.last_seq + 1))

    def write(self, volume: int, offset: int, data: bytes) -> None:
        before = self.buffer.last_seq
        self.buffer.append_write(volume, offset, data)
        self._seqs_since(before)
        self.images[self.names[volume]][offset : offset + len(data)] = data

    def zero(self, volume: int, offset: int, length: int, trim: bool = False) -> None:
        before = self.buffer.last_seq
        if trim:
            self.buffer.append_trim(volume, offset, length)
        else:
            self.buffer.append_zero(volume, offset, length)
        self._seqs_since(before)
        self.images[self.names[volume]][offset : offset + length] = bytes(length)

    async def acked_write(self, volume: int, offset: int, data: bytes) -> int:
        """A workload write: appended, then acknowledged unless a checkpoint holds acks."""
        self.write(volume, offset, data)
        seq = self.buffer.last_seq
        await self.acks_open.wait()
        return seq

    async def on_hold(self, request: int) -> int:
        if self.hold_delay:  # a slower appliance, or a longer way for the HOLD
            await asyncio.sleep(self.hold_delay)
        self.acks_open.clear()
        self.holds.append(request)
        before = self.buffer.last_seq
        seq = self.buffer.append_mark(request)
        self._seqs_since(before)
        return seq

    async def on_release(self, request: int) -> None:
        self.releases.append(request)
        self.acks_open.set()

    def write_or_spill(self, volume: int, offset: int, data: bytes) -> bool:
        """Bitmap sync as the VPG runtime does it: when the buffer is full, spill it into the
        dirty maps and track this write there too. Returns whether it was buffered."""
        try:
            self.write(volume, offset, data)
            return True
        except BufferFull:
            self.buffer.spill(self.dirty)
            self.dirty[volume].mark(offset, len(data))
            self.images[self.names[volume]][offset : offset + len(data)] = data
            return False

    def ship_dirty(self, max_bytes: int = 256 * KiB) -> int:
        """Read dirty regions back from the source and append them as writes."""
        shipped = 0
        for vi, dmap in self.dirty.items():
            for off, length in dmap.take_batch(max_bytes):
                self.write(vi, off, bytes(self.images[self.names[vi]][off : off + length]))
                shipped += length
        return shipped

    async def random_workload(
        self, rng: random.Random, count: int, *, pause_every: int = 50, max_len: int = 64 * KiB
    ) -> None:
        """Writes of random sizes and content, some zeroes and trims, yielding now and then."""
        for i in range(count):
            vi = rng.randrange(len(self.names))
            size = self.volumes[self.names[vi]]
            length = rng.choice([512, 4 * KiB, rng.randrange(1, max_len)])
            offset = rng.randrange(0, size - length)
            kind = rng.random()
            if kind < 0.05:
                self.zero(vi, offset, length)
            elif kind < 0.08:
                self.zero(vi, offset, length, trim=True)
            else:
                self.write(vi, offset, rng.randbytes(length))
            if i % pause_every == 0:
                await asyncio.sleep(0.001)

    async def flushed(self, timeout: float = 20.0) -> None:
        """Until the receiver has acknowledged everything appended so far."""
        await asyncio.wait_for(self.sender.wait_durable(self.buffer.last_seq), timeout)


def assert_replicated(source: Source, sink: MemorySink, *, exactly: bool = True) -> None:
    """The recovery side has the source's content, and (``exactly``) every record exactly once,
    in order."""
    for name in source.names:
        assert sink.state.images[name] == source.images[name], f"volume {name} differs"
    if exactly:
        applied = sink.state.applied.get(source.name, [])
        assert applied == source.seqs, (
            f"{len(applied)} applied, {len(source.seqs)} appended; "
            f"duplicates: {len(applied) - len(set(applied))}"
        )


# -- a TCP proxy that misbehaves on request ------------------------------------------------------


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    cut: bool = False
    """Traffic is discarded and the receiver's side is never closed (a silent network cut)."""

    def abort(self) -> None:
        self.client.transport.abort()
        if not self.cut:
            self.upstream.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1 connections to ``upstream``; can delay every chunk, stall (hold all
    traffic), drop every connection (reset), cut them silently (:meth:`cut`), refuse new ones,
    and flip one byte of the sender's stream: the one at offset ``flip_after`` of all it has
    forwarded (``forwarded``, over every connection so far)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.flip_after: int | None = None
        self.forwarded = 0
        """Sender -> receiver bytes forwarded, all connections together."""
        self.flipped = 0
        self.connections = 0
        self.refuse = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pipes: set[_Pipe] = set()
        self._cut: list[_Pipe] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Silently lose all traffic of the open connections, and never tell the receiver when
        the sender gives up on them (as if the network vanished): new connections work."""
        for p in self._pipes:
            p.cut = True
            self._cut.append(p)

    def drop(self) -> int:
        """Reset every open connection; returns how many."""
        pipes = list(self._pipes)
        for p in pipes:
            p.abort()
        return len(pipes)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            self.connections += 1
            if self.refuse:
                writer.transport.abort()
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            pipe = _Pipe(writer, up_w)
            self._pipes.add(pipe)
            pipe.tasks = [
                asyncio.create_task(self._pump(reader, up_w, pipe, outbound=True)),
                asyncio.create_task(self._pump(up_r, writer, pipe, outbound=False)),
            ]
            try:
                await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pipe.abort()
                for t in pipe.tasks:
                    t.cancel()
                await asyncio.gather(*pipe.tasks, return_exceptions=True)
                self._pipes.discard(pipe)
        finally:
            self._handlers.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pipe: _Pipe,
        *,
        outbound: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(64 * KiB):
                await self._flowing.wait()
                if pipe.cut:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                if outbound:
                    at = self.flip_after
                    if at is not None and self.forwarded <= at < self.forwarded + len(data):
                        buf = bytearray(data)
                        buf[at - self.forwarded] ^= 0x5A
                        data = bytes(buf)
                        self.flip_after = None
                        self.flipped += 1
                    self.forwarded += len(data)
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for p in self._cut:
            p.upstream.transport.abort()
        self._flowing.set()
        # Handlers end once their connections are reset. (Cancelling a handler task of
        # asyncio.start_server makes asyncio report the cancellation as an unhandled error.)
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()


def records_of(sink: MemorySink, source: str) -> list[int]:
    return sink.state.applied.get(source, [])


def mark_seqs(sink: MemorySink, source: str) -> dict[int, int]:
    """request id -> seq of its mark, as the sink got them."""
    return {req: seq for seq, req in sink.state.marks.get(source, [])}


class Rig:
    """Builds receivers, proxies and sources for one test, and closes them all afterwards."""

    def __init__(self) -> None:
        self.receivers: list[StreamReceiver] = []
        self.proxies: list[FaultProxy] = []
        self.sources: list[Source] = []

    async def receiver(
        self,
        sinks: dict[str, MemorySink],
        settings: ReceiverSettings | None = None,
        port: int = 0,
        **kw: Any,
    ) -> tuple[StreamReceiver, int]:
        rx = StreamReceiver(
            sinks.get,
            settings or ReceiverSettings(idle_timeout=2.0, heartbeat_interval=0.2),
            **kw,
        )
        self.receivers.append(rx)
        _, bound = await rx.listen("127.0.0.1", port)
        return rx, bound

    async def proxy(self, port: int) -> tuple[FaultProxy, int]:
        p = FaultProxy(("127.0.0.1", port))
        self.proxies.append(p)
        _, bound = await p.start()
        return p, bound

    def source(self, *args: Any, start: bool = True, **kw: Any) -> Source:
        src = Source(*args, **kw)
        self.sources.append(src)
        if start:
            src.sender.start()
        return src

    async def close(self) -> None:
        for s in self.sources:
            await s.sender.close()
        for p in self.proxies:
            await p.close()
        for r in self.receivers:
            await r.close()
