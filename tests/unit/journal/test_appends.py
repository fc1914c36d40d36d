"""Appends: group commit, sequence order, ack holding, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from secondsite.appliance.journal import (
    Journal,
    JournalClosedError,
    JournalConfig,
    OutOfRangeError,
    PendingAppend,
    UnknownCheckpointError,
    UnknownVolumeError,
    VolumeExistsError,
)


async def test_concurrent_appends_share_fsyncs(journal: Journal) -> None:
    before_fsyncs, before_batches = journal.fsyncs, journal.batches
    seqs = await asyncio.gather(
        *(journal.append_write("a", (i % 256) * 4096, bytes([i % 256]) * 4096) for i in range(400))
    )
    batches = journal.batches - before_batches
    # gather() submits all 400 before the flusher runs: far fewer batches than records.
    assert batches < 40
    assert journal.fsyncs - before_fsyncs < 100
    assert seqs == sorted(seqs) and len(set(seqs)) == 400


async def test_sequence_numbers_follow_call_order_across_volumes(journal: Journal) -> None:
    pa = journal.submit_write("a", 0, b"x" * 10)
    pb = journal.submit_zero("b", 100, 10)
    pc = journal.submit_trim("a", 4096, 512)
    cp, pcp = journal.mark_checkpoint("t")
    assert [pa.seq, pb.seq, pc.seq, cp.seq] == list(range(pa.seq, pa.seq + 4))
    await asyncio.gather(pa, pb, pc, pcp)
    assert journal.durable_seq == cp.seq


async def test_hold_acks_holds_new_acks_and_records_the_hold(journal: Journal) -> None:
    async with journal.hold_acks():
        task = asyncio.ensure_future(journal.append_write("a", 0, b"y" * 512))
        for _ in range(100):
            await asyncio.sleep(0.002)
            if journal.durable_seq >= 1:
                break
        assert journal.durable_seq >= 1  # durable...
        assert not task.done()  # ...but not acked while held
    assert await task == 1
    cp = await journal.checkpoint()
    assert cp.seq == 2
    stats = journal.hold_percentiles()
    assert stats["count"] >= 2 and stats["p99_ms"] < 1000


async def test_bad_input_is_rejected_before_a_sequence_number(journal: Journal) -> None:
    seq = journal.next_seq
    with pytest.raises(OutOfRangeError):
        await journal.append_write("a", (1 << 20) - 10, b"z" * 11)
    with pytest.raises(OutOfRangeError):
        await journal.append_zero("b", -1, 5)
    with pytest.raises(UnknownVolumeError):
        await journal.append_write("nope", 0, b"z")
    with pytest.raises(UnknownCheckpointError):
        await journal.open_image("a", 999)
    with pytest.raises(VolumeExistsError):
        await journal.add_volume("a", 4096)
    assert journal.next_seq == seq
    assert (await journal.add_volume("a", 1 << 20)).id == 0  # same spec: idempotent


async def test_volumes_and_records_persist(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j")
    await j.add_volume("disk0", 8192)
    await j.add_volume("disk1", 8192, tmp_path / "elsewhere.img")
    await j.append_write("disk1", 10, b"abc")
    cp = await j.checkpoint("t1")
    await j.close()
    with pytest.raises(JournalClosedError):
        j.submit_write("disk0", 0, b"a")
    j = await Journal.open(tmp_path / "j")
    assert [(v.name, v.id, v.size) for v in j.volumes()] == [("disk0", 0, 8192), ("disk1", 1, 8192)]
    assert (tmp_path / "elsewhere.img").stat().st_size == 8192
    async with await j.open_image("disk1", cp) as img:
        assert await img.read(8, 7) == b"\0\0abc\0\0"
    assert j.next_seq == cp.seq + 1
    await j.close()


async def test_segments_roll_at_the_configured_size(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j", JournalConfig(segment_size=64 << 10))
    await j.add_volume("a", 1 << 20)
    for i in range(40):
        await j.append_write("a", i * 4096, bytes([i]) * 4096)
    await j.close()
    segs = sorted(p.name for p in (tmp_path / "j" / "segments").glob("*.seg"))
    assert len(segs) >= 3
    assert segs[0] == "0000000000000001.seg"
    assert all(p.stat().st_size <= 64 << 10 for p in (tmp_path / "j" / "segments").glob("*.seg"))
    assert len(list((tmp_path / "j" / "segments").glob("*.idx"))) == len(segs) - 1


async def test_volumes_added_at_once_get_their_own_ids(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j")
    infos = await asyncio.gather(*(j.add_volume(f"v{i}", 4096 * (i + 1)) for i in range(4)))
    again = await asyncio.gather(j.add_volume("v0", 4096), j.add_volume("v0", 4096))
    assert sorted(v.id for v in infos) == [0, 1, 2, 3]
    assert [v.id for v in again] == [infos[0].id] * 2
    for i, v in enumerate(infos):
        await j.append_write(v.name, 0, bytes([i + 1]) * 4096)
    cp = await j.checkpoint()
    await j.close()
    j = await Journal.open(tmp_path / "j")
    assert sorted((v.name, v.id) for v in j.volumes()) == [(f"v{i}", i) for i in range(4)]
    for i in range(4):
        async with await j.open_image(f"v{i}", cp) as img:
            assert await img.read(0, 4096) == bytes([i + 1]) * 4096
    await j.close()


async def test_an_awaiter_giving_up_leaves_the_append_going(journal: Journal) -> None:
    """A client that goes away cancels its wait, not the record: it still becomes durable, and
    whoever awaits it later gets its outcome."""
    pending = journal.submit_write("a", 0, b"q" * 4096)
    waiter = asyncio.ensure_future(asyncio.wait_for(pending, timeout=1e-6))
    with pytest.raises(TimeoutError):
        await waiter
    await pending
    assert journal.durable_seq >= pending.seq
    await pending  # done: answers at once
    cp = await journal.checkpoint()
    async with await journal.open_image("a", cp) as img:
        assert await img.read(0, 4096) == b"q" * 4096


async def test_large_batches_synced_while_the_next_is_written(tmp_path: Path) -> None:
    """Large appends take the overlapped path (a batch syncs on its own thread while the next
    is written), across segment rolls: acks follow durability, and the journal reopens with
    every acked record and checkpoint."""
    size, chunk = 9 << 20, 300_000
    j = await Journal.open(tmp_path / "j", JournalConfig(segment_size=2 << 20))
    await j.add_volume("v", size)
    model = bytearray(size)
    images: dict[int, bytes] = {}

    def submit(round_: int, i: int) -> PendingAppend:
        off = ((round_ * 10 + i) * 700_001) % (size - chunk)
        data = bytes([1 + (round_ * 10 + i) % 255]) * chunk
        model[off : off + chunk] = data
        return j.submit_write("v", off, data)

    for round_ in range(4):
        first = [submit(round_, i) for i in range(5)]
        await asyncio.sleep(0)  # the flusher starts writing them...
        second = [submit(round_, i) for i in range(5, 10)]  # ...and these come meanwhile
        for pending in first + second:
            await pending
            assert j.durable_seq >= pending.seq
        cp = await j.checkpoint()
        images[cp.id] = bytes(model)
    assert len(list((tmp_path / "j" / "segments").glob("*.seg"))) >= 3
    await j.close()
    j = await Journal.open(tmp_path / "j", JournalConfig(segment_size=2 << 20))
    for cid, want in images.items():
        async with await j.open_image("v", cid) as img:
            assert await img.read(0, size) == want, f"checkpoint {cid}"
    await j.close()
