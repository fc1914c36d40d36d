"""Checkpoint cuts across the protected appliances of one VPG: HOLD, MARKED, RELEASE.

The fidelity test is the oracle of guarantee 2 across two senders: a workload whose every write
depends on the previous one (issued only once the previous is acknowledged) alternates between
two sources; every cut must contain a prefix of that chain, both as the sources' marks define it
and as a sink that journals sources into one order sees it at ``on_cut``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import Mapping

import pytest
from stream_harness import KiB, MiB, Rig, Source, assert_replicated

from secondsite.appliance.stream import (
    BandwidthLimiter,
    CheckpointError,
    MemorySink,
    Record,
    SenderSettings,
    StreamReceiver,
    frames,
    tcp_connector,
)
from secondsite.appliance.stream.frames import FrameDecoder

FAST = SenderSettings(peer_timeout=1.0, heartbeat_interval=0.1, backoff_min=0.02, backoff_max=0.2)


class OrderingSink(MemorySink):
    """Remembers the newest seq submitted per source: what a journal would hold so far."""

    def __init__(self) -> None:
        super().__init__(commit_delay=0.001)
        self.submitted: dict[str, int] = {}

    def submit(self, source: str, record: Record) -> asyncio.Future[None]:
        fut = super().submit(source, record)
        self.submitted[source] = record.seq
        return fut


async def _two_sources(rig: Rig, sink: MemorySink) -> tuple[StreamReceiver, Source, Source]:
    rx, port = await rig.receiver({"vpg-a": sink})
    conn = tcp_connector("127.0.0.1", port)
    # Volumes of one VPG on two appliances are different volumes.
    a = rig.source("node-a", conn, settings=FAST, volumes={"a0": 4 * MiB, "a1": MiB})
    b = rig.source("node-b", conn, settings=FAST, volumes={"b0": 4 * MiB, "b1": MiB})
    for _ in range(200):
        if rx.sources("vpg-a") == ["node-a", "node-b"]:
            break
        await asyncio.sleep(0.01)
    return rx, a, b


async def test_two_senders_give_their_marks(rig: Rig) -> None:
    sink = OrderingSink()
    rx, a, b = await _two_sources(rig, sink)
    rng = random.Random(1)
    work = asyncio.gather(a.random_workload(rng, 1500), b.random_workload(rng, 1500))
    results: list[dict[str, int]] = []
    cuts: list[dict[str, int]] = []

    def on_cut(marks: Mapping[str, int]) -> None:
        # Every source's mark is the last record the sink got from it: nothing after a mark
        # was submitted before the cut.
        assert {src: sink.submitted[src] for src in marks} == marks
        cuts.append(dict(marks))

    for _ in range(20):
        results.append(await rx.request_checkpoint("vpg-a", on_cut=on_cut))
        await asyncio.sleep(0.005)
    await work
    await a.flushed()
    await b.flushed()
    assert_replicated(a, sink)
    assert_replicated(b, sink)
    assert cuts == results
    for src in (a, b):
        assert len(src.holds) == len(src.releases) == 20  # every hold released
        marks = {seq for seq, _ in sink.state.marks[src.name]}
        assert [r[src.name] for r in results] == sorted(marks)
    holds = rx.hold_times()
    assert len(holds) == 20
    p50, p99 = statistics.median(holds), max(holds)
    logging.getLogger(__name__).info("hold p50=%.2f ms max=%.2f ms", p50 * 1e3, p99 * 1e3)
    assert p99 < 1.0


async def test_write_order_fidelity_across_two_sources(rig: Rig) -> None:
    sink = OrderingSink()
    rx, a, b = await _two_sources(rig, sink)
    chain: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def dependent_writes() -> None:
        rng = random.Random(2)
        k = 0
        while not stop.is_set() and k < 20_000:
            src = rng.choice((a, b))
            seq = await src.acked_write(0, rng.randrange(256) * 4 * KiB, k.to_bytes(8) * 512)
            chain.append((src.name, seq))
            k += 1
            if k % 8 == 0:
                await asyncio.sleep(0.0002)

    cuts: list[tuple[dict[str, int], dict[str, int]]] = []

    def on_cut(marks: Mapping[str, int]) -> None:
        cuts.append((dict(marks), dict(sink.submitted)))

    writer = asyncio.create_task(dependent_writes())
    try:
        for i in range(30):
            # One source takes a few ms longer to mark: the other must hold its acks meanwhile,
            # or the chain goes on there and then on the late one, before its mark.
            (a if i % 2 else b).hold_delay, (b if i % 2 else a).hold_delay = 0.005, 0.0
            await asyncio.sleep(0.01)
            await rx.request_checkpoint("vpg-a", on_cut=on_cut)
    finally:
        stop.set()
        await writer
    await a.flushed()
    await b.flushed()
    assert len(cuts) == 30 and len(chain) > 100

    def prefix_length(included: list[bool]) -> int:
        n = included.index(False) if False in included else len(included)
        assert not any(included[n:]), "a write is in the cut while one it depends on is not"
        return n

    sizes = []
    for marks, journaled in cuts:
        # The cut as the marks define it is what a sink journaling both sources has at on_cut.
        assert journaled == marks
        sizes.append(prefix_length([seq < marks[src] for src, seq in chain]))
    assert sizes == sorted(sizes) and 0 < sizes[len(sizes) // 2] < len(chain)


async def test_a_sender_that_does_not_answer_times_out_and_all_are_released(rig: Rig) -> None:
    sink = MemorySink()
    rx, a, b = await _two_sources(rig, sink)
    slow_hold = b.on_hold

    answered = asyncio.Event()

    async def slow(request: int) -> int:
        seq = await slow_hold(request)  # holds acks, then takes its time to answer
        await asyncio.sleep(2.0)
        answered.set()
        return seq

    b.sender.on_hold = slow
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="node-b"):
        await rx.request_checkpoint("vpg-a", timeout=0.2)
    assert time.monotonic() - start < 1.0
    # node-a is released at once (polled: the machine may be busy), long before node-b answers.
    for _ in range(100):
        if a.releases:
            break
        await asyncio.sleep(0.01)
    assert a.releases == a.holds == [1]
    assert not answered.is_set() and not b.acks_open.is_set()  # still answering...
    await asyncio.wait_for(answered.wait(), 5)
    for _ in range(100):
        if b.releases:
            break
        await asyncio.sleep(0.01)
    assert b.releases == [1] and b.acks_open.is_set()  # ...then released when it returns
    b.sender.on_hold = slow_hold
    marks = await rx.request_checkpoint("vpg-a", timeout=2.0)  # and the next one works
    assert set(marks) == {"node-a", "node-b"}


async def test_a_source_without_checkpoints_refuses_quickly(rig: Rig) -> None:
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    a = rig.source("node-a", tcp_connector("127.0.0.1", port), settings=FAST)
    b = rig.source("node-b", tcp_connector("127.0.0.1", port), settings=FAST, checkpoints=False)
    a.write(0, 0, b"x")
    b.write(0, 0, b"y")
    await a.flushed()
    await b.flushed()
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="takes no checkpoints"):
        await rx.request_checkpoint("vpg-a", timeout=5.0)
    assert time.monotonic() - start < 1.0
    await asyncio.sleep(0.05)
    assert a.releases == [1]


async def test_sources_not_connected(rig: Rig) -> None:
    rx, _ = await rig.receiver({"vpg-a": MemorySink()})
    with pytest.raises(CheckpointError, match="not connected"):
        await rx.request_checkpoint("vpg-a")
    with pytest.raises(CheckpointError, match="node-z"):
        await rx.request_checkpoint("vpg-a", ["node-z"])


async def test_disconnect_during_a_hold_fails_the_cut_and_releases(rig: Rig) -> None:
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    proxy, pport = await rig.proxy(port)
    a = rig.source("node-a", tcp_connector("127.0.0.1", port), settings=FAST)
    b = rig.source("node-b", tcp_connector("127.0.0.1", pport), settings=FAST)
    a.write(0, 0, b"x")
    b.write(0, 0, b"y")
    await a.flushed()
    await b.flushed()
    proxy.stall()  # b's HOLD never arrives; then b's connection is reset
    cut = asyncio.create_task(rx.request_checkpoint("vpg-a", timeout=3.0))
    await asyncio.sleep(0.1)
    proxy.drop()
    with pytest.raises(CheckpointError, match="disconnected"):
        await cut
    proxy.resume()
    await asyncio.sleep(0.1)
    assert a.releases == [1]
    await b.flushed()


async def test_a_hold_never_released_is_released_locally(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that asks for a hold and then goes quiet must not freeze the source's acks."""
    got_marked = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        while not got_marked.is_set():
            data = await reader.read(65536)
            if not data:
                return
            for frame in dec.feed(data):
                if isinstance(frame, frames.Hello):
                    writer.write(frames.encode(frames.Welcome(0)))
                    writer.write(frames.encode(frames.Hold(7)))
                elif isinstance(frame, frames.Marked):
                    got_marked.set()
        while await reader.read(65536):  # heartbeats only from here; no RELEASE ever
            writer.write(frames.encode(frames.Heartbeat()))

    async def scripted_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except ConnectionError:
            pass  # the sender may reset the connection when the test closes it
        finally:
            writer.close()

    server = await asyncio.start_server(scripted_receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = SenderSettings(hold_timeout=0.3, heartbeat_interval=0.05, peer_timeout=2.0)
        src = rig.source("node-a", tcp_connector("127.0.0.1", port), settings=settings)
        await asyncio.wait_for(got_marked.wait(), 5)
        assert not src.acks_open.is_set()
        await asyncio.sleep(0.5)
        assert src.releases == [7] and src.acks_open.is_set()
        assert src.sender.metrics().holds_expired == 1
        assert "event=hold-released-locally" in caplog.text
        await src.sender.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_mark_spilled_before_it_was_sent_fails_the_cut(rig: Rig) -> None:
    """The buffer overflows right after the mark was appended (bitmap sync starts): the mark
    never reaches the recovery side, so the cut must fail rather than be claimed."""
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("node-a", tcp_connector("127.0.0.1", port), settings=FAST, capacity=256 * KiB)
    src.write(0, 0, b"x")
    await src.flushed()
    marking = src.on_hold

    async def mark_then_overflow(request: int) -> int:
        seq = await marking(request)
        while src.write_or_spill(0, 0, bytes(64 * KiB)):  # no await: the sender cannot run
            pass
        return seq

    src.sender.on_hold = mark_then_overflow
    with pytest.raises(CheckpointError, match="mark dropped by a spill"):
        await rx.request_checkpoint("vpg-a", timeout=2.0)
    assert sink.state.marks == {}
    await asyncio.sleep(0.05)
    assert src.releases == [1]


async def test_the_hold_does_not_wait_for_the_backlog(rig: Rig) -> None:
    """Over a slow link with a second of backlog, sources hold their acks for a round trip
    only; the cut itself completes once the backlog up to the marks has arrived."""
    sink = OrderingSink()
    rx, port = await rig.receiver({"vpg-a": sink})
    limiter = BandwidthLimiter(8 * MiB)
    conn = tcp_connector("127.0.0.1", port)
    a = rig.source("node-a", conn, settings=FAST, bandwidth=limiter.flow("a"), volumes={"a": MiB})
    b = rig.source("node-b", conn, settings=FAST, volumes={"b": MiB})
    a.write(0, 0, b"x")
    b.write(0, 0, b"y")
    await a.flushed()
    await b.flushed()
    for i in range(128):
        a.write(0, (i % 16) * 64 * KiB, bytes(64 * KiB))  # 8 MiB: a second at 8 MiB/s
    cuts: list[dict[str, int]] = []
    start = time.monotonic()
    marks = await rx.request_checkpoint("vpg-a", on_cut=lambda m: cuts.append(dict(m)))
    took = time.monotonic() - start
    [hold] = rx.hold_times()
    assert hold < 0.1 and took > 0.5
    assert cuts == [marks] and marks["node-a"] == a.buffer.last_seq
    assert a.releases == b.releases == [1]
    await a.flushed()


async def test_a_source_gone_while_its_records_drain_fails_the_cut_at_once(rig: Rig) -> None:
    """A connection that ended stays registered while its records in flight become durable;
    a checkpoint meanwhile must not wait the whole hold timeout for a MARKED that cannot come."""
    sink = MemorySink(commit_delay=2.0)  # records become durable 2 s after they arrive
    rx, port = await rig.receiver({"vpg-a": sink})
    proxy, pport = await rig.proxy(port)
    src = rig.source("node-a", tcp_connector("127.0.0.1", pport), settings=FAST)
    src.write(0, 0, b"x" * 4096)
    await asyncio.sleep(0.3)  # arrived, not durable yet
    proxy.refuse = True
    proxy.drop()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="disconnected"):
        await rx.request_checkpoint("vpg-a", timeout=3.0)
    assert time.monotonic() - started < 1.0
    proxy.refuse = False
    await src.flushed()
