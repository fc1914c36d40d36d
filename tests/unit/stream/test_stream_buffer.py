"""ProtectedBuffer (bounded, numbered, kept until acked, spilled to dirty regions) and DirtyMap."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secondsite.appliance.stream import NO_VOLUME, BufferFull, DirtyMap, Op, ProtectedBuffer
from secondsite.appliance.stream.buffer import ACK_LATENCIES, RECORD_OVERHEAD

KiB = 1024
MiB = 1024 * KiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_seqs_follow_call_order_across_volumes_and_ops() -> None:
    buf = ProtectedBuffer(1 * MiB, first_seq=10)
    seqs = [
        buf.append_write(0, 0, b"a" * 512),
        buf.append_zero(1, 4096, 8192),
        buf.append_trim(0, 0, 4096),
        buf.append_mark(7, b"tag"),
        buf.append_write(1, 512, b"b" * 512),
    ]
    assert seqs == [10, 11, 12, 13, 14]
    recs = buf.after(9, 1 * MiB, 100)
    assert [(r.seq, r.volume, r.op) for r in recs] == [
        (10, 0, Op.WRITE),
        (11, 1, Op.ZERO),
        (12, 0, Op.TRIM),
        (13, NO_VOLUME, Op.CHECKPOINT_MARK),
        (14, 1, Op.WRITE),
    ]
    assert recs[3].offset == 7 and recs[3].payload == b"tag"
    assert buf.last_seq == 14 and buf.next_seq == 15 and buf.count == 5


def test_default_first_seq_is_above_an_earlier_life() -> None:
    earlier = ProtectedBuffer(1 * MiB)
    last = earlier.append_write(0, 0, b"x")
    assert ProtectedBuffer(1 * MiB).first_seq > last


def test_bounded_bytes_and_buffer_full_is_atomic() -> None:
    cap = 4 * (4 * KiB + RECORD_OVERHEAD)
    buf = ProtectedBuffer(cap, first_seq=1)
    for i in range(4):
        buf.append_write(0, i * 4096, bytes(4096))
    assert buf.used_bytes == cap
    with pytest.raises(BufferFull):
        buf.append_write(0, 0, b"x")
    with pytest.raises(BufferFull):
        buf.append_zero(0, 0, 4096)  # records without payload still cost their overhead
    assert buf.count == 4 and buf.last_seq == 4  # nothing half-appended, no seq consumed
    buf.ack(1)
    assert buf.append_write(0, 0, bytes(4096)) == 5


def test_big_write_is_split_into_consecutive_records() -> None:
    buf = ProtectedBuffer(16 * MiB, max_record_bytes=1 * MiB, first_seq=1)
    data = bytes(range(256)) * (10 * KiB)  # 2.5 MiB
    last = buf.append_write(2, 4096, data)
    recs = buf.after(0, 64 * MiB, 100)
    assert last == 3 and [r.seq for r in recs] == [1, 2, 3]
    assert [(r.offset, r.length) for r in recs] == [
        (4096, MiB),
        (4096 + MiB, MiB),
        (4096 + 2 * MiB, MiB // 2),
    ]
    assert b"".join(bytes(r.payload) for r in recs) == data
    assert buf.appended_bytes == len(data)


def test_all_or_nothing_for_a_split_write() -> None:
    buf = ProtectedBuffer(2 * MiB, max_record_bytes=MiB, first_seq=1)
    with pytest.raises(BufferFull):
        buf.append_write(0, 0, bytes(3 * MiB))
    assert buf.count == 0 and buf.used_bytes == 0


def test_mutable_data_is_copied() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    data = bytearray(b"before")
    buf.append_write(0, 0, data)
    view = memoryview(bytearray(b"view!!"))
    buf.append_write(0, 0, view)
    data[:] = b"after!"
    view[:] = b"XXXXXX"
    assert [bytes(r.payload) for r in buf.after(0, MiB, 10)] == [b"before", b"view!!"]


def test_after_batches_by_bytes_and_count() -> None:
    buf = ProtectedBuffer(16 * MiB, first_seq=1)
    for i in range(10):
        buf.append_write(0, i * 4096, bytes(4096))
    assert [r.seq for r in buf.after(0, 3 * 4096, 100)] == [1, 2, 3]
    assert [r.seq for r in buf.after(3, 100 * 4096, 2)] == [4, 5]
    assert [r.seq for r in buf.after(8, MiB, 100)] == [9, 10]
    assert buf.after(10, MiB, 100) == []
    assert [r.seq for r in buf.after(0, 1, 100)] == [1]  # at least one, even if larger


def test_ack_frees_exactly_up_to_seq() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    for i in range(5):
        buf.append_write(0, i, b"x" * 100)
    assert buf.ack(3) == 3
    assert buf.first_seq == 4 and buf.count == 2 and buf.acked_seq == 3
    assert buf.used_bytes == 2 * (100 + RECORD_OVERHEAD)
    assert buf.ack(2) == 0  # an old ack frees nothing more
    assert [r.seq for r in buf.after(0, MiB, 10)] == [4, 5]  # resend from an old position
    assert buf.ack(99) == 2 and buf.count == 0 and buf.used_bytes == 0


def test_many_acks_compact_storage() -> None:
    buf = ProtectedBuffer(64 * MiB, first_seq=1)
    for i in range(20_000):
        buf.append_zero(0, i, 1)
        if i % 100 == 99:
            buf.ack(buf.last_seq - 10)
    assert buf.count == 10
    assert [r.seq for r in buf.after(0, MiB, 100)] == list(range(19_991, 20_001))


def test_lag_seconds_is_age_of_oldest_unacked() -> None:
    clock = FakeClock()
    buf = ProtectedBuffer(MiB, first_seq=1, clock=clock)
    assert buf.lag_seconds() == 0.0
    buf.append_write(0, 0, b"x")
    clock.now += 2.0
    buf.append_write(0, 0, b"y")
    clock.now += 1.5
    assert buf.lag_seconds() == pytest.approx(3.5)
    buf.ack(1)
    assert buf.lag_seconds() == pytest.approx(1.5)
    buf.ack(2)
    assert buf.lag_seconds() == 0.0


def test_ack_latencies_are_per_change_append_to_ack() -> None:
    clock = FakeClock()
    buf = ProtectedBuffer(4 * MiB, first_seq=1, clock=clock)
    buf.append_write(0, 0, b"x")
    clock.now += 0.5
    buf.append_zero(0, 4096, 4096)
    buf.append_mark(7)
    clock.now += 0.25
    buf.append_trim(0, 8192, 4096)
    clock.now += 1.0
    buf.ack(3)  # the write, the zero and the mark
    assert list(buf.ack_latencies) == pytest.approx([1.75, 1.25])
    clock.now += 0.5
    buf.ack(4)
    assert list(buf.ack_latencies) == pytest.approx([1.75, 1.25, 1.5])
    buf.ack(4)  # nothing new
    assert len(buf.ack_latencies) == 3
    for _ in range(ACK_LATENCIES + 5):
        buf.append_write(0, 0, b"y")
    buf.ack(buf.last_seq)
    assert len(buf.ack_latencies) == ACK_LATENCIES  # the newest only


def test_spill_marks_exactly_the_unacked_ranges() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    buf.append_write(0, 0, bytes(4096))  # acked below: must not be marked
    buf.append_write(0, 10 * 64 * KiB + 100, bytes(200))
    buf.append_zero(1, 3 * 64 * KiB, 2 * 64 * KiB)
    buf.append_mark(5)
    buf.append_trim(0, 20 * 64 * KiB, 1)
    buf.ack(1)
    maps = {0: DirtyMap(4 * MiB), 1: DirtyMap(4 * MiB)}
    stats = buf.spill(maps)
    assert (stats.records, stats.marked_bytes) == (4, 200 + 2 * 64 * KiB + 1)
    assert maps[0].extents() == [(10 * 64 * KiB, 64 * KiB), (20 * 64 * KiB, 64 * KiB)]
    assert maps[1].extents() == [(3 * 64 * KiB, 2 * 64 * KiB)]
    assert buf.count == 0 and buf.used_bytes == 0 and buf.acked_seq == 5
    assert buf.append_write(0, 0, b"z") == 6  # numbering goes on after the gap


def test_spill_without_a_map_changes_nothing() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    buf.append_write(3, 0, b"x")
    with pytest.raises(KeyError):
        buf.spill({0: DirtyMap(MiB)})
    assert buf.count == 1


def test_renumber_after_a_receiver_that_is_ahead() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    for i in range(6):
        buf.append_write(0, i, b"x")
    # Records 1-2 were sent in this life; the receiver says it has 1000 (an earlier life).
    shift = buf.renumber_after(1000, sent=2)
    assert shift == 998
    assert [r.seq for r in buf.after(0, MiB, 10)] == [1001, 1002, 1003, 1004]
    assert [r.offset for r in buf.after(0, MiB, 10)] == [2, 3, 4, 5]
    assert buf.append_write(0, 9, b"y") == 1005
    assert buf.renumber_after(1000, sent=999) == 0  # nothing at or below the position


async def test_listeners_and_ack_waiters_wake() -> None:
    buf = ProtectedBuffer(MiB, first_seq=1)
    calls: list[int] = []
    buf.add_listener(lambda: calls.append(buf.last_seq))
    acked = asyncio.create_task(buf.wait_acked(2))
    await asyncio.sleep(0)
    buf.append_write(0, 0, b"x")
    with pytest.raises(BufferFull):
        buf.append_write(0, 0, b"x" * 3 * MiB)  # does not fit: no call
    buf.append_write(0, 0, b"x")
    assert calls == [1, 2]
    buf.ack(1)
    await asyncio.sleep(0)
    assert not acked.done()
    buf.ack(2)
    await asyncio.wait_for(acked, 1)


# -- DirtyMap -----------------------------------------------------------------------------------


def test_dirty_map_counts_and_partial_last_region() -> None:
    m = DirtyMap(10 * 64 * KiB + 100)
    assert m.total_regions == 11 and m.dirty_bytes == 0
    m.mark(0, 1)
    m.mark(100, 64 * KiB)  # straddles regions 0 and 1
    m.mark(10 * 64 * KiB, 50)  # the short last region
    assert m.dirty_regions == 3
    assert m.dirty_bytes == 2 * 64 * KiB + 100
    assert m.extents() == [(0, 2 * 64 * KiB), (10 * 64 * KiB, 100)]
    with pytest.raises(ValueError):
        m.mark(10 * 64 * KiB, 101)


def test_take_batch_limits_merges_and_clears() -> None:
    r = 64 * KiB
    m = DirtyMap(64 * r)
    for i in (1, 2, 3, 10, 11, 40):
        m.mark(i * r, 1)
    assert m.take_batch(2 * r) == [(1 * r, 2 * r)]
    assert m.take_batch(3 * r) == [(3 * r, r), (10 * r, 2 * r)]
    m.mark(0, 1)  # behind the cursor: comes after the rest of this pass
    assert m.take_batch(10 * r) == [(40 * r, r), (0, r)]
    assert m.dirty_regions == 0 and m.take_batch(r) == []
    assert m.taken_bytes == 7 * r


def test_take_batch_returns_at_least_one_region() -> None:
    m = DirtyMap(MiB)
    m.mark_all()
    assert m.dirty_bytes == MiB
    assert m.take_batch(1) == [(0, 64 * KiB)]
    assert not m.is_dirty(0, 64 * KiB) and m.is_dirty(64 * KiB - 1, 2)
    m.clear()
    assert m.dirty_regions == 0 and not m.is_dirty(0, MiB)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4 * MiB - 1), st.integers(0, 300 * KiB)), max_size=40),
    st.integers(1, 2 * MiB),
    st.sampled_from([4 * KiB, 64 * KiB]),
)
def test_take_all_covers_exactly_what_was_marked(
    marks: list[tuple[int, int]], batch: int, region: int
) -> None:
    size = 4 * MiB + 123
    m = DirtyMap(size, region)
    expect = np.zeros(-(-size // region), dtype=bool)
    for off, length in marks:
        length = min(length, size - off)
        m.mark(off, length)
        if length:
            expect[off // region : -(-(off + length) // region)] = True
    got = np.zeros_like(expect)
    for _ in range(len(expect) + 1):
        taken = m.take_batch(batch)
        if not taken:
            break
        assert sum(length for _, length in taken) <= max(batch, region)
        for off, length in taken:
            assert off % region == 0 and off + length <= size
            first, last = off // region, -(-(off + length) // region)
            assert not got[first:last].any()  # each region handed out once
            got[first:last] = True
    assert (got == expect).all()
    assert m.dirty_regions == 0
