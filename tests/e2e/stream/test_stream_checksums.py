"""Block checksums over the stream (delta sync): an answer counts every record sent before its
request, a lost connection fails the request, and a peer asking for what it may not gets a
protocol error."""

from __future__ import annotations

import asyncio

import pytest
from stream_harness import KiB, MiB, Rig

from secondsite.appliance.stream import (
    ErrorCode,
    FrameDecoder,
    MemorySink,
    SenderSettings,
    SumsLost,
    tcp_connector,
)
from secondsite.appliance.stream.frames import (
    Error,
    Hello,
    SumsAsk,
    VolumeEntry,
    Welcome,
    block_digests,
    encode,
)

FAST = SenderSettings(peer_timeout=0.5, heartbeat_interval=0.1, backoff_min=0.02, backoff_max=0.2)


async def test_an_answer_counts_every_record_sent_before_the_request(rig: Rig) -> None:
    # Commits take a while: an answer that did not wait for them would hash zeroes.
    sink = MemorySink(commit_delay=0.2)
    _, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    while not src.sender.connected:
        await asyncio.sleep(0.01)
    src.write(0, 64 * KiB, b"a" * (128 * KiB))
    src.write(0, 1 * MiB + 4096, b"b" * 4096)
    while src.sender.sent_seq < src.buffer.last_seq:
        await asyncio.sleep(0.001)
    assert sink.state.images["disk0"][64 * KiB] == 0, "committed already: the test shows nothing"
    answers = await asyncio.gather(
        src.sender.checksums(0, 0, 2 * MiB, 4096),
        src.sender.checksums(0, 1 * MiB, 1 * MiB, 64 * KiB),
        src.sender.checksums(1, 0, 2 * MiB, 1 * MiB),
    )
    image = bytes(src.images["disk0"])
    assert answers[0] == block_digests(image[: 2 * MiB], 4096)
    assert answers[1] == block_digests(image[MiB : 2 * MiB], 64 * KiB)
    assert answers[2] == block_digests(bytes(2 * MiB), 1 * MiB)


async def test_many_requests_at_once_stay_within_what_the_receiver_takes(rig: Rig) -> None:
    sink = MemorySink()
    _, port = await rig.receiver({"vpg-a": sink})
    src = rig.source("node-1", tcp_connector("127.0.0.1", port), settings=FAST)
    while not src.sender.connected:
        await asyncio.sleep(0.01)
    # Many volumes in delta sync at once ask more than the receiver's 64 in flight.
    answers = await asyncio.gather(
        *(src.sender.checksums(i % 2, (i % 32) * 64 * KiB, 64 * KiB, 4096) for i in range(200))
    )
    assert all(a == block_digests(bytes(64 * KiB), 4096) for a in answers)
    assert src.sender.metrics().sessions == 1


async def test_a_lost_connection_fails_the_request(rig: Rig) -> None:
    sink = MemorySink(commit_delay=5.0)  # the answer waits for a commit that comes too late
    _, port = await rig.receiver({"vpg-a": sink})
    proxy, pport = await rig.proxy(port)
    src = rig.source("node-1", tcp_connector("127.0.0.1", pport), settings=FAST)
    while not src.sender.connected:
        await asyncio.sleep(0.01)
    src.write(0, 0, b"c" * 4096)
    while src.sender.sent_seq < src.buffer.last_seq:
        await asyncio.sleep(0.001)
    asking = asyncio.ensure_future(src.sender.checksums(0, 0, 4096, 4096))
    await asyncio.sleep(0.1)
    assert not asking.done()
    proxy.drop()
    with pytest.raises(SumsLost, match="connection lost"):
        await asyncio.wait_for(asking, 5)
    await proxy.close()  # no connection at all: a request fails at once
    while src.sender.connected:
        await asyncio.sleep(0.01)
    with pytest.raises(SumsLost, match="not connected"):
        await src.sender.checksums(0, 0, 4096, 4096)


async def _raw_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Hello("vpg-a", "raw", (VolumeEntry("disk0", 1 * MiB),))))
    dec = FrameDecoder()
    frames = dec.feed(await reader.read(4096))
    assert isinstance(frames[0], Welcome)
    return reader, writer


@pytest.mark.parametrize(
    "ask",
    [
        SumsAsk(1, 0, 1 * MiB - 4096, 8192, 4096),  # past the end of the volume
        SumsAsk(1, 1, 0, 4096, 4096),  # no volume index 1
    ],
    ids=["out-of-range", "unknown-volume"],
)
async def test_a_request_outside_the_volume_table_is_a_protocol_error(
    rig: Rig, ask: SumsAsk
) -> None:
    rx, port = await rig.receiver({"vpg-a": MemorySink()})
    reader, writer = await _raw_session(port)
    try:
        writer.write(encode(ask))
        frames = FrameDecoder().feed(await asyncio.wait_for(reader.read(4096), 5))
        assert isinstance(frames[0], Error) and frames[0].code == ErrorCode.PROTOCOL
        assert "outside volume index" in frames[0].message
        assert await asyncio.wait_for(reader.read(4096), 5) == b""
        assert rx.rejected == 1
    finally:
        writer.close()


async def test_too_many_requests_in_flight_is_a_protocol_error(rig: Rig) -> None:
    rx, port = await rig.receiver({"vpg-a": MemorySink()})
    reader, writer = await _raw_session(port)
    try:
        # In one write, so the receiver reads them all before it answers any.
        writer.write(b"".join(encode(SumsAsk(i, 0, 0, 4096, 4096)) for i in range(65)))
        frames = []
        dec = FrameDecoder()
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            frames += dec.feed(chunk)
        assert isinstance(frames[-1], Error) and frames[-1].code == ErrorCode.PROTOCOL
        assert "more than 64 SUMS_ASK in flight" in frames[-1].message
        assert rx.rejected == 1
    finally:
        writer.close()
