"""MemorySink: what the loopback tests trust as their recovery side."""

from __future__ import annotations

import asyncio

import pytest

from secondsite.appliance.stream import (
    NO_VOLUME,
    MemorySink,
    MemorySinkState,
    Op,
    Record,
    SinkError,
    SinkRefused,
    VolumeEntry,
)

VOLS = (VolumeEntry("d0", 8192), VolumeEntry("d1", 4096))


async def test_records_become_durable_together_and_only_then_visible() -> None:
    sink = MemorySink(commit_delay=0.01)
    sink.attach("a", VOLS)
    futs = [
        sink.submit("a", Record(1, 0, Op.WRITE, 0, 4, b"abcd")),
        sink.submit("a", Record(2, 1, Op.WRITE, 10, 2, b"xy")),
        sink.submit("a", Record(3, 0, Op.ZERO, 1, 2)),
        sink.submit("a", Record(4, NO_VOLUME, Op.CHECKPOINT_MARK, 9, 0)),
    ]
    assert sink.position("a") == 0 and sink.state.images["d0"][:4] == bytes(4)
    await asyncio.gather(*futs)
    assert sink.commits == 1
    assert sink.position("a") == 4
    assert sink.state.images["d0"][:4] == b"a\0\0d"
    assert sink.state.images["d1"][10:12] == b"xy"
    assert sink.state.marks == {"a": [(4, 9)]}
    assert sink.state.applied == {"a": [1, 2, 3, 4]}


async def test_double_apply_is_refused() -> None:
    sink = MemorySink()
    sink.attach("a", VOLS)
    await sink.submit("a", Record(5, 0, Op.WRITE, 0, 1, b"x"))
    with pytest.raises(SinkError, match="double apply"):
        sink.submit("a", Record(5, 0, Op.WRITE, 0, 1, b"x"))
    sink.attach("b", VOLS)
    await sink.submit("b", Record(1, 0, Op.WRITE, 1, 1, b"y"))  # sources are independent


async def test_after_a_failed_commit_nothing_later_becomes_durable() -> None:
    sink = MemorySink(commit_delay=0.01)
    sink.attach("a", VOLS)
    sink.fail_next = OSError("disk gone")
    first = sink.submit("a", Record(1, 0, Op.WRITE, 0, 1, b"x"))
    await asyncio.sleep(0.005)
    second = sink.submit("a", Record(2, 0, Op.WRITE, 1, 1, b"y"))  # into the same group
    with pytest.raises(SinkError, match="disk gone"):
        await first
    with pytest.raises(SinkError):
        await second
    with pytest.raises(SinkError, match="earlier"):
        sink.submit("a", Record(3, 0, Op.WRITE, 2, 1, b"z"))
    assert sink.position("a") == 0 and sink.state.images["d0"][:3] == bytes(3)
    sink.attach("a", VOLS)  # a new connection: resubmitted from the position
    await sink.submit("a", Record(1, 0, Op.WRITE, 0, 1, b"x"))
    assert sink.position("a") == 1


async def test_state_survives_a_new_sink_and_sizes_are_checked() -> None:
    state = MemorySinkState()
    first = MemorySink(state)
    first.attach("a", VOLS)
    await first.submit("a", Record(3, 0, Op.WRITE, 0, 2, b"hi"))
    second = MemorySink(state)
    with pytest.raises(SinkRefused, match="d0"):
        second.attach("a", (VolumeEntry("d0", 4096),))
    second.attach("a", VOLS)
    assert second.position("a") == 3
    with pytest.raises(SinkError):
        second.submit("a", Record(3, 0, Op.WRITE, 0, 2, b"hi"))
