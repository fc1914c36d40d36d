"""Sender -> receiver -> MemorySink over loopback: every record arrives in order, exactly once,
and the replica equals the source, whatever happens to the connection in between."""

from __future__ import annotations

import asyncio
import logging
import os
import random

import pytest
from stream_harness import KiB, MiB, Rig, assert_replicated

from secondsite.appliance.stream import (
    MemorySink,
    MemorySinkState,
    ProtectedBuffer,
    ReceiverSettings,
    SenderSettings,
    StreamSender,
    tcp_connector,
)

FAST = SenderSettings(peer_timeout=0.5, heartbeat_interval=0.1, backoff_min=0.02, backoff_max=0.2)


async def _while(work: asyncio.Task[None], every: float, action: object, times: int) -> int:
    """Run ``action()`` every ``every`` seconds while ``work`` runs, at most ``times`` times."""
    done = 0
    while not work.done() and done < times:
        await asyncio.sleep(every)
        assert callable(action)
        action()
        done += 1
    await work
    return done


async def test_in_order_exactly_once(rig: Rig) -> None:
    sink = MemorySink(commit_delay=0.001)
    rx, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    await src.random_workload(random.Random(1), 2000)
    await src.flushed()
    assert_replicated(src, sink)
    m = src.sender.metrics()
    assert m.sessions == 1 and m.durable_seq == src.buffer.last_seq
    assert m.lag_records == 0 and m.lag_bytes == 0 and m.lag_seconds == 0.0
    assert sink.commits < len(src.seqs) / 4  # group commit: records are not acked one by one
    [stats] = rx.stats()
    assert stats.records == len(src.seqs) and stats.skipped == 0


async def test_socket_closed_mid_stream_several_times(rig: Rig) -> None:
    sink = MemorySink(commit_delay=0.002)
    _, port = await rig.receiver({"vpg-a": sink})
    proxy, pport = await rig.proxy(port)
    src = rig.source("node-1", tcp_connector("127.0.0.1", pport), settings=FAST)
    work = asyncio.create_task(src.random_workload(random.Random(2), 6000, pause_every=20))
    drops = await _while(work, 0.08, proxy.drop, 6)
    await src.flushed()
    assert drops >= 3
    assert src.sender.metrics().sessions >= drops  # each cut was followed by a resume
    assert_replicated(src, sink)


async def test_proxy_delays_stalls_cuts_and_drops(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "secondsite.appliance.stream")
    sink = MemorySink()
    # The receiver waits longer than the sender, so that after a silent cut the old connection
    # is still open on the receiver's side when the sender reconnects: it gets replaced.
    _, port = await rig.receiver(
        {"vpg-a": sink}, ReceiverSettings(idle_timeout=5.0, heartbeat_interval=0.1)
    )
    proxy, pport = await rig.proxy(port)
    src = rig.source("node-1", tcp_connector("127.0.0.1", pport), settings=FAST)
    rng = random.Random(3)

    proxy.delay = 0.005  # every chunk, both ways
    await src.random_workload(rng, 500)
    await src.flushed()
    proxy.delay = 0.0

    proxy.stall()  # nothing moves, connections stay open: the sender's peer timeout fires
    await src.random_workload(rng, 300)
    await asyncio.sleep(1.0)
    assert src.sender.durable_seq < src.buffer.last_seq
    proxy.resume()
    await src.random_workload(rng, 300)
    await src.flushed()
    sessions = src.sender.metrics().sessions
    assert sessions >= 2

    proxy.cut()
    await src.random_workload(rng, 300)
    await src.flushed()
    assert "event=replaced" in caplog.text

    proxy.drop()
    await src.random_workload(rng, 300)
    await src.flushed()
    assert src.sender.metrics().sessions >= sessions + 2
    assert_replicated(src, sink)


async def test_flipped_byte_is_caught_and_the_stream_resumes(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    proxy, pport = await rig.proxy(port)
    src = rig.source("node-1", tcp_connector("127.0.0.1", pport), settings=FAST)
    proxy.flip_after = 300 * KiB  # inside the DATA frames, well past HELLO
    await src.random_workload(random.Random(4), 1500)
    await src.flushed()
    assert proxy.flipped == 1
    assert "CRC mismatch" in caplog.text
    assert rx.rejected >= 1
    assert src.sender.metrics().sessions == 2
    assert_replicated(src, sink)


async def test_receiver_restart_with_persisted_sink(rig: Rig) -> None:
    state = MemorySinkState()
    first = MemorySink(state, commit_delay=0.001)
    rx1, port = await rig.receiver({"vpg-a": first})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    rng = random.Random(5)
    await src.random_workload(rng, 1000)
    await rx1.close()  # graceful: what was submitted becomes durable first
    await src.random_workload(rng, 500)  # buffered while the receiver is away
    second = MemorySink(state)
    await rig.receiver({"vpg-a": second}, port=port)
    await src.random_workload(rng, 500)
    await src.flushed()
    assert_replicated(src, second)


async def test_receiver_crash_loses_nothing_acknowledged(rig: Rig) -> None:
    """The first sink stops making anything durable (a crash): records it took but never
    committed are not acknowledged, so the sender still has them and sends them again."""
    state = MemorySinkState()
    first = MemorySink(state, commit_delay=3600.0)
    rx1, port = await rig.receiver(
        {"vpg-a": first}, ReceiverSettings(drain_timeout=0.1, heartbeat_interval=0.1)
    )
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    rng = random.Random(6)
    await src.random_workload(rng, 300)
    await asyncio.sleep(0.2)
    assert src.sender.durable_seq == 0 and state.applied == {}
    await rx1.close()
    second = MemorySink(state)
    await rig.receiver({"vpg-a": second}, port=port)
    await src.random_workload(rng, 300)
    await src.flushed()
    assert_replicated(src, second)


async def test_sink_failure_drops_the_connection_and_resumes(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    sink = MemorySink(commit_delay=0.001)
    _, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    rng = random.Random(7)
    await src.random_workload(rng, 500)
    await src.flushed()
    sink.fail_next = OSError("journal disk gone")
    await src.random_workload(rng, 500)
    await src.flushed()
    assert "SINK_FAILED" in caplog.text
    assert src.sender.metrics().sessions == 2
    assert_replicated(src, sink)


async def test_idle_connection_is_kept_alive_by_heartbeats(rig: Rig) -> None:
    sink = MemorySink()
    _, port = await rig.receiver(
        {"vpg-a": sink}, ReceiverSettings(idle_timeout=0.5, heartbeat_interval=0.1)
    )
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    src.write(0, 0, b"x" * 4096)
    await src.flushed()
    await asyncio.sleep(1.5)  # three times either side's timeout, with nothing to send
    src.write(0, 4096, b"y" * 4096)
    await src.flushed()
    assert src.sender.metrics().sessions == 1
    assert_replicated(src, sink)


async def test_unknown_vpg_is_refused_and_retried(rig: Rig) -> None:
    _, port = await rig.receiver({"vpg-a": MemorySink()})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), vpg="nope", settings=FAST)
    src.write(0, 0, b"x")
    await asyncio.sleep(0.5)
    m = src.sender.metrics()
    assert not m.connected and m.sessions == 0
    assert "UNKNOWN_VPG" in m.last_error
    assert m.lag_records == 1  # kept for when the vpg exists


async def test_volume_table_mismatch_is_refused(rig: Rig) -> None:
    sink = MemorySink()
    _, port = await rig.receiver({"vpg-a": sink})
    a = rig.source("node-1", tcp_connector("127.0.0.1", port), volumes={"disk0": MiB})
    a.write(0, 0, b"x")
    await a.flushed()
    b = rig.source("node-2", tcp_connector("127.0.0.1", port), volumes={"disk0": 2 * MiB})
    await asyncio.sleep(0.3)
    assert b.sender.metrics().sessions == 0 and "REFUSED" in b.sender.metrics().last_error


async def test_buffer_overflow_falls_back_to_dirty_regions(rig: Rig) -> None:
    """The link is down long enough for the buffer to overflow: the source spills it into its
    dirty maps, and once the receiver is back ships the dirty regions; the replica converges
    (the records that were spilled leave a gap in the seqs, which the receiver accepts)."""
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    await rx.close()  # nobody listens on `port` for now
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), capacity=512 * KiB, settings=FAST)
    rng = random.Random(8)
    buffered = [
        src.write_or_spill(rng.randrange(2), rng.randrange(0, MiB), os.urandom(8 * KiB))
        for _ in range(400)
    ]
    assert not all(buffered) and src.buffer.spills >= 1
    dirty = sum(d.dirty_bytes for d in src.dirty.values())
    assert dirty > 0
    await rig.receiver({"vpg-a": sink}, port=port)
    for _ in range(1000):  # bitmap sync: ship a batch of regions, let it drain, repeat
        if not src.ship_dirty(128 * KiB):
            break
        await src.flushed()
    assert_replicated(src, sink, exactly=False)
    applied = sink.state.applied["node-1"]
    assert applied == sorted(set(applied))  # in order, none twice
    assert len(applied) < len(src.seqs)  # the spilled records were never sent


async def test_restarted_source_with_reset_numbering_is_renumbered(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that restarts numbering from 1 (no persisted seq, default clock-based start
    overridden) must not have its new records skipped as already applied."""
    sink = MemorySink()
    _, port = await rig.receiver({"vpg-a": sink})
    old = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    await old.random_workload(random.Random(9), 200)
    await old.flushed()
    await old.sender.close()
    position = sink.position("node-1")

    buf = ProtectedBuffer(MiB, first_seq=1)
    buf.append_write(0, 0, b"n" * 4096)
    new = StreamSender(
        vpg="vpg-a",
        source="node-1",
        volumes=old.volumes,
        buffer=buf,
        connect=tcp_connector("127.0.0.1", port),
        settings=FAST,
    )
    new.start()
    try:
        buf.append_write(1, 8192, b"m" * 4096)
        await asyncio.wait_for(new.wait_durable(buf.last_seq), 10)
    finally:
        await new.close()
    assert "event=receiver-ahead" in caplog.text
    assert sink.state.images["disk0"][:4096] == b"n" * 4096
    assert sink.state.images["disk1"][8192 : 8192 + 4096] == b"m" * 4096
    assert sink.state.applied["node-1"][-2:] == [position + 1, position + 2]


@pytest.mark.parametrize("level", [1, 3])
async def test_compression_saves_wire_bytes_only_when_it_pays(rig: Rig, level: int) -> None:
    sink = MemorySink()
    _, port = await rig.receiver({"vpg-a": sink})
    settings = SenderSettings(compression_level=level, compression_probe_interval=4)
    text = rig.source(
        "text", tcp_connector("127.0.0.1", port), volumes={"t": 8 * MiB}, settings=settings
    )
    noise = rig.source(
        "noise", tcp_connector("127.0.0.1", port), volumes={"n": 8 * MiB}, settings=settings
    )
    words = [os.urandom(6).hex() for _ in range(300)]
    rng = random.Random(10)
    for i in range(256):
        line = " ".join(rng.choice(words) for _ in range(3000)).encode()[: 32 * KiB]
        text.write(0, i * 32 * KiB, line)
        noise.write(0, i * 32 * KiB, os.urandom(32 * KiB))
    await text.flushed()
    await noise.flushed()
    t, n = text.sender.metrics(), noise.sender.metrics()
    assert t.appended_bytes == n.appended_bytes == 8 * MiB
    assert t.wire_bytes_sent < 0.6 * t.appended_bytes
    assert t.batches_compressed > 0 and t.compress_cpu_seconds > 0
    assert n.wire_bytes_sent <= 1.01 * n.appended_bytes + 64 * KiB
    assert n.batches_uncompressed > n.batches_compressed  # adaptive: stops trying
    assert sink.state.images["t"] == text.images["t"]
    assert sink.state.images["n"] == noise.images["n"]


async def test_adaptive_compression_stays_on_across_checkpoints(rig: Rig) -> None:
    """A checkpoint mark alone in its DATA frame cannot be compressed; that must not turn
    adaptive compression off for the compressible writes that follow it."""
    sink = MemorySink()
    rx, port = await rig.receiver({"vpg-a": sink})
    text = rig.source(
        "text",
        tcp_connector("127.0.0.1", port),
        volumes={"t": 8 * MiB},
        settings=SenderSettings(compression_level=3),  # adaptive, as the appliance's default
    )
    while rx.sources("vpg-a") != ["text"]:
        await asyncio.sleep(0.01)
    words = [os.urandom(6).hex() for _ in range(300)]
    rng = random.Random(11)
    for i in range(32):
        for j in range(8):
            line = " ".join(rng.choice(words) for _ in range(3000)).encode()[: 32 * KiB]
            text.write(0, (i * 8 + j) * 32 * KiB, line)
        await text.flushed()
        marks = await asyncio.wait_for(rx.request_checkpoint("vpg-a"), 10)
        assert marks["text"] == text.buffer.last_seq  # the mark went alone, after the writes
    m = text.sender.metrics()
    assert m.appended_bytes == 8 * MiB
    assert m.wire_bytes_sent < 0.6 * m.appended_bytes
    assert m.batches_compressed >= 32
    assert sink.state.images["t"] == text.images["t"]


async def test_default_numbering_and_a_receiver_that_lost_its_state(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Clock-based first seq against a fresh receiver: no alarm. A receiver that comes back
    without what it acknowledged (its journal was reset): on_gap tells the source to resync."""
    gaps: list[tuple[int, int]] = []
    rx, port = await rig.receiver({"vpg-a": MemorySink()})
    buf = ProtectedBuffer(MiB)
    tx = StreamSender(
        vpg="vpg-a",
        source="node-1",
        volumes={"disk0": MiB},
        buffer=buf,
        connect=tcp_connector("127.0.0.1", port),
        settings=FAST,
        on_gap=lambda position, durable: gaps.append((position, durable)),
    )
    tx.start()
    try:
        buf.append_write(0, 0, b"a" * 512)
        await asyncio.wait_for(tx.wait_durable(buf.last_seq), 10)
        assert buf.last_seq > 10**18 and gaps == []
        acknowledged = tx.durable_seq
        await rx.close()
        await rig.receiver({"vpg-a": MemorySink()}, port=port)  # empty: position 0
        buf.append_write(0, 512, b"b" * 512)
        await asyncio.wait_for(tx.wait_durable(buf.last_seq), 10)
    finally:
        await tx.close()
    assert gaps == [(0, acknowledged)]
    assert "event=receiver-behind" in caplog.text
