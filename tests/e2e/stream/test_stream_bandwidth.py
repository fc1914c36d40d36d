"""A bandwidth limit shared by the senders of one appliance, through real connections: the rate
holds, and VPG priorities share it 4:2:1 when contended. Two-second windows."""

from __future__ import annotations

import asyncio
import time

import pytest
from stream_harness import Rig

from secondsite.appliance.stream import (
    BandwidthLimiter,
    MemorySink,
    Priority,
    SenderSettings,
    tcp_connector,
)

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LIMIT = 12 * MiB
WINDOW = 2.0
SETTINGS = SenderSettings(batch_bytes=256 * 1024)


def _fill(buffer_append: object, nbytes: int) -> None:
    block = bytes(range(256)) * 256  # 64 KiB, shared by every record: no copies
    assert callable(buffer_append)
    for i in range(nbytes // len(block)):
        buffer_append(0, (i % 64) * len(block), block)


async def _sent_in_window(rig: Rig, priorities: list[Priority]) -> dict[str, float]:
    limiter = BandwidthLimiter(LIMIT)
    sinks = {f"vpg-{i}": MemorySink() for i in range(len(priorities))}
    _, port = await rig.receiver(sinks)
    sources = []
    for i, prio in enumerate(priorities):
        src = rig.source(
            f"node-{i}",
            tcp_connector("127.0.0.1", port),
            vpg=f"vpg-{i}",
            volumes={f"v{i}": 4 * MiB},
            capacity=64 * MiB,
            settings=SETTINGS,
            bandwidth=limiter.flow(f"vpg-{i}", prio),
            start=False,
        )
        _fill(src.buffer.append_write, int(LIMIT * WINDOW * 1.5))
        sources.append(src)
    for src in sources:
        src.sender.start()
    await asyncio.sleep(0.3)  # connected, past the first burst
    before = [s.sender.metrics().wire_bytes_sent for s in sources]
    start = time.monotonic()
    await asyncio.sleep(WINDOW)
    elapsed = time.monotonic() - start
    after = [s.sender.metrics().wire_bytes_sent for s in sources]
    for s in sources:
        assert s.buffer.count > 0, "a sender ran dry: the window did not measure the limit"
    return {p.value: (a - b) / elapsed for p, a, b in zip(priorities, after, before, strict=True)}


async def test_one_sender_stays_within_ten_percent_of_the_limit(rig: Rig) -> None:
    rates = await _sent_in_window(rig, [Priority.MEDIUM])
    assert rates["Medium"] == pytest.approx(LIMIT, rel=0.10)


async def test_priorities_share_the_limit(rig: Rig) -> None:
    rates = await _sent_in_window(rig, [Priority.HIGH, Priority.MEDIUM, Priority.LOW])
    total = sum(rates.values())
    assert total == pytest.approx(LIMIT, rel=0.10)
    for prio in Priority:
        assert rates[prio.value] / total == pytest.approx(prio.weight / 7, rel=0.2), rates
