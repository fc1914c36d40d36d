"""Replication stream benchmark (not a test): zstd cost and gain, loopback throughput, lag, holds.

    .venv/bin/python tests/bench/bench_stream.py [--total 512MiB] [--seconds 8] [--loop uvloop]

Sections, each bounded in bytes and time:

1. zstd on a compressible (text-like) and an incompressible (random) workload: bytes out per
   byte in, and CPU seconds per GiB to compress and to decompress, against the cost of what every
   frame pays anyway (CRC32C) on the same bytes.
2. Loopback throughput sender -> receiver -> MemorySink (one process, 64 KiB writes): plain TCP,
   mutual TLS, zstd level 1, and the appliance's `compression` modes `zstd` (level 3, every
   batch) and `adaptive` (level 3, pausing after a batch that did not compress) on both
   workloads; bytes on the wire against bytes written, and process CPU seconds per GiB.
   Baseline: raw TCP on loopback in the same run (asyncio streams, same chunk size, no
   framing), so the ratio says what the protocol costs.
3. Lag at a paced write rate (50 and 200 MB/s): append to acknowledged-durable latency, p50/p99.
4. Checkpoint hold time across two senders under load: HOLD sent to RELEASE sent, p50/p99.
   Everything shares one process and event loop here (in production the two senders and the
   receiver are three processes on three nodes), so this is an upper bound.

Temp files (TLS certificates) are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zstandard

from secondsite.appliance.config import Compression
from secondsite.appliance.protected import sender_settings
from secondsite.appliance.stream import (
    BufferFull,
    MemorySink,
    ProtectedBuffer,
    SenderSettings,
    StreamReceiver,
    StreamSender,
    client_context,
    server_context,
    tcp_connector,
)
from secondsite.appliance.stream.frames import crc32c

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KIB
VOLUME = 256 * MIB


def parse_size(text: str) -> int:
    units = {"k": KIB, "m": MIB, "g": GIB}
    t = text.lower().rstrip("ib").rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def row(name: str, value: str, note: str = "") -> None:
    print(f"| {name:<44} | {value:>24} | {note}")


class Workload:
    """64 KiB blocks drawn at random offsets from a 16 MiB pool: text-like or random bytes."""

    def __init__(self, kind: str, seed: int = 1) -> None:
        rng = random.Random(seed)
        if kind == "compressible":
            words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(4000)]
            text = " ".join(rng.choice(words) for _ in range(2_000_000)).encode()
            self.pool = (text * (16 * MIB // len(text) + 1))[: 16 * MIB]
        else:
            self.pool = os.urandom(16 * MIB)
        self.rng = rng
        self.kind = kind

    def block(self) -> bytes:
        at = self.rng.randrange(0, len(self.pool) - CHUNK)
        return self.pool[at : at + CHUNK]


# -- 1. zstd alone ----------------------------------------------------------------------------


def bench_zstd(total: int) -> None:
    print("\n## zstd on 1 MiB DATA bodies\n")
    row("workload / level", "out/in", "CPU s/GiB: compress, decompress (CRC32C baseline)")
    for kind in ("compressible", "incompressible"):
        w = Workload(kind)
        bodies = [b"".join(w.block() for _ in range(16)) for _ in range(max(1, total // MIB))]
        t0 = time.process_time()
        for b in bodies:
            crc32c(b)
        crc_cpu = (time.process_time() - t0) / (len(bodies) * MIB) * GIB
        for level in (1, 3):
            cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            t0 = time.process_time()
            packed = [cctx.compress(b) for b in bodies]
            c_cpu = time.process_time() - t0
            t0 = time.process_time()
            for p in packed:
                dctx.decompress(p)
            d_cpu = time.process_time() - t0
            gib = len(bodies) * MIB / GIB
            ratio = sum(map(len, packed)) / (len(bodies) * MIB)
            row(
                f"{kind} / {level}",
                f"{ratio:.3f}",
                f"{c_cpu / gib:.2f}, {d_cpu / gib:.2f} ({crc_cpu:.3f})",
            )


# -- 2. loopback throughput -------------------------------------------------------------------


async def raw_tcp_mbps(total: int) -> float:
    """Baseline: the same bytes over a loopback asyncio stream, read and dropped."""
    got = 0
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal got
        while data := await reader.read(256 * KIB):
            got += len(data)
        done.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    for _ in range(total // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.close()
    await done.wait()
    elapsed = time.perf_counter() - t0
    server.close()
    await server.wait_closed()
    return got / elapsed / 1e6


class Pair:
    """One receiver with a MemorySink and one sender over loopback."""

    def __init__(self, settings: SenderSettings, tls: tuple[Any, Any] | None = None) -> None:
        self.settings = settings
        self.tls = tls
        self.sink = MemorySink()
        self.buffer = ProtectedBuffer(256 * MIB, first_seq=1)
        self.rx: StreamReceiver | None = None
        self.tx: StreamSender | None = None

    async def __aenter__(self) -> Pair:
        server_ctx, client_ctx = self.tls or (None, None)
        self.rx = StreamReceiver(lambda _: self.sink, ssl_context=server_ctx)
        _, port = await self.rx.listen()
        self.tx = StreamSender(
            vpg="bench",
            source="node",
            volumes={"vol": VOLUME},
            buffer=self.buffer,
            connect=tcp_connector("127.0.0.1", port, ssl_context=client_ctx),
            settings=self.settings,
        )
        self.tx.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.tx is not None and self.rx is not None
        await self.tx.close()
        await self.rx.close()

    async def push(self, w: Workload, total: int, deadline: float) -> int:
        """Append ``total`` bytes as fast as the stream takes them (keeping <= 64 MiB queued)."""
        assert self.tx is not None
        n = 0
        while n < total and time.monotonic() < deadline:
            if self.buffer.used_bytes > 64 * MIB:
                await self.tx.wait_durable(self.buffer.first_seq + self.buffer.count // 2)
            self.buffer.append_write(0, random.randrange(VOLUME // CHUNK) * CHUNK, w.block())
            n += CHUNK
            if n % (4 * MIB) == 0:
                await asyncio.sleep(0)
        await self.tx.wait_durable(self.buffer.last_seq)
        return n


async def bench_throughput(total: int, seconds: float, pki_dir: Path) -> None:
    print("\n## loopback throughput, sender -> receiver -> MemorySink, 64 KiB writes\n")
    raw = await raw_tcp_mbps(total)
    row("raw TCP (baseline, no framing)", f"{raw:,.0f} MB/s", "")
    row("case", "MB/s (x raw)", "wire/written, CPU s/GiB")
    tls = _tls(pki_dir)
    cases: list[tuple[str, SenderSettings, str, tuple[Any, Any] | None]] = [
        ("plain TCP, no compression", SenderSettings(), "incompressible", None),
        ("mutual TLS, no compression", SenderSettings(), "incompressible", tls),
        ("zstd 1, compressible", SenderSettings(compression_level=1), "compressible", None),
    ]
    cases += [
        (f"appliance '{mode}', {kind}", sender_settings(mode), kind, None)
        for mode in (Compression.ZSTD, Compression.ADAPTIVE)
        for kind in ("compressible", "incompressible")
    ]
    for name, settings, kind, ctx in cases:
        w = Workload(kind)
        async with Pair(settings, ctx) as pair:
            assert pair.tx is not None
            cpu0, t0 = time.process_time(), time.perf_counter()
            written = await pair.push(w, total, time.monotonic() + seconds)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            m = pair.tx.metrics()
        mbps = written / elapsed / 1e6
        row(
            name,
            f"{mbps:,.0f} ({mbps / raw:.2f})",
            f"{m.wire_bytes_sent / written:.3f}, {cpu / (written / GIB):.2f}",
        )


def _tls(directory: Path) -> tuple[Any, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "stream"))
    from stream_certs import make_pki

    pki = make_pki(directory, sender="node")  # the Pair's source
    r, s = pki.receiver, pki.sender
    return server_context(r.cert, r.key, r.ca), client_context(s.cert, s.key, s.ca)


# -- 3. lag at a paced rate -------------------------------------------------------------------


async def paced(
    buffer: ProtectedBuffer,
    w: Workload,
    rate: float,
    seconds: float,
    appended: list[tuple[int, float]],
    on_tick: Callable[[], None] | None = None,
) -> bool:
    """Append at ``rate`` bytes/s for ``seconds``, recording (seq, append time) of each write
    in ``appended``. Returns False if the buffer overflowed (the stream could not keep up)."""
    start = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate)
        while sent < due:
            try:
                seq = buffer.append_write(0, random.randrange(VOLUME // CHUNK) * CHUNK, w.block())
            except BufferFull:
                return False
            appended.append((seq, time.perf_counter()))
            sent += CHUNK
        if on_tick is not None:
            on_tick()
        await asyncio.sleep(0.001)  # uvloop's timer resolution: shorter sleeps would spin
    return True


class LagProbe:
    """When each appended write was first seen acknowledged (polled at every pacing tick)."""

    def __init__(self, sender: StreamSender) -> None:
        self.sender = sender
        self.appended: list[tuple[int, float]] = []
        self.acked: dict[int, float] = {}
        self._cursor = 0

    def sample(self) -> None:
        now, durable = time.perf_counter(), self.sender.durable_seq
        while self._cursor < len(self.appended) and self.appended[self._cursor][0] <= durable:
            self.acked[self.appended[self._cursor][0]] = now
            self._cursor += 1

    @property
    def done(self) -> bool:
        return self._cursor == len(self.appended)

    def lags_ms(self) -> list[float]:
        return sorted((self.acked[s] - t) * 1e3 for s, t in self.appended)


async def bench_lag(seconds: float) -> None:
    print("\n## lag: append -> acknowledged durable, paced 64 KiB writes (compressible data)\n")
    row("rate, compression", "p50 / p99 ms", "max ms")
    for rate, level in ((50e6, None), (50e6, 1), (200e6, None), (200e6, 1)):
        w = Workload("compressible")
        async with Pair(SenderSettings(compression_level=level)) as pair:
            assert pair.tx is not None
            probe = LagProbe(pair.tx)
            kept_up = await paced(pair.buffer, w, rate, seconds, probe.appended, probe.sample)
            while not probe.done:
                await asyncio.sleep(0.001)
                probe.sample()
        lags = probe.lags_ms()
        p50, p99 = statistics.median(lags), lags[max(0, int(len(lags) * 0.99) - 1)]
        name = f"{rate / 1e6:.0f} MB/s, " + ("zstd 1" if level else "none")
        note = f"{lags[-1]:.2f}" + ("" if kept_up else " (buffer overflowed: cannot keep up)")
        row(name, f"{p50:.2f} / {p99:.2f}", note)


# -- 4. checkpoint holds across two senders ---------------------------------------------------


async def bench_holds(seconds: float) -> None:
    print("\n## checkpoint hold across two senders (HOLD sent -> RELEASE sent), 2 x 50 MB/s\n")
    sink = MemorySink()
    rx = StreamReceiver(lambda _: sink)
    _, port = await rx.listen()
    senders = []
    for name in ("node-a", "node-b"):
        buffer = ProtectedBuffer(256 * MIB, first_seq=1)

        def hold(buffer: ProtectedBuffer = buffer) -> Callable[[int], Awaitable[int]]:
            async def on_hold(request: int) -> int:
                return buffer.append_mark(request)

            return on_hold

        async def release(request: int) -> None:
            return None

        tx = StreamSender(
            vpg="bench",
            source=name,
            volumes={name: VOLUME},
            buffer=buffer,
            connect=tcp_connector("127.0.0.1", port),
            settings=SenderSettings(),
            on_hold=hold(),
            on_release=release,
        )
        tx.start()
        senders.append((tx, buffer))
    while rx.sources("bench") != ["node-a", "node-b"]:
        await asyncio.sleep(0.01)
    w = Workload("compressible")
    load = [asyncio.create_task(paced(b, w, 50e6, seconds, [])) for _, b in senders]
    cuts = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and cuts < 10_000:
        await rx.request_checkpoint("bench")
        cuts += 1
        await asyncio.sleep(0.02)
    await asyncio.gather(*load)
    for tx, _ in senders:
        await tx.close()
    await rx.close()
    holds = sorted(h * 1e3 for h in rx.hold_times())
    row("checkpoints", f"{cuts}", "")
    row(
        "hold p50 / p99 / max",
        f"{statistics.median(holds):.2f} / {holds[int(len(holds) * 0.99) - 1]:.2f} ms",
        f"{holds[-1]:.2f} ms (target p99 <= 20 ms)",
    )


async def main(args: argparse.Namespace) -> None:
    pki_dir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        bench_zstd(min(args.total, 128 * MIB))
        await bench_throughput(args.total, args.seconds, pki_dir)
        await bench_lag(min(args.seconds, 5.0))
        await bench_holds(min(args.seconds, 5.0))
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--total", type=parse_size, default=parse_size("512MiB"))
    p.add_argument("--seconds", type=float, default=8.0, help="cap per throughput case")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    a = p.parse_args()
    print(
        f"bench_stream: total={a.total // MIB} MiB per case, loop={a.loop}, cpus={os.cpu_count()}"
    )
    if a.loop == "uvloop":
        import uvloop

        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
