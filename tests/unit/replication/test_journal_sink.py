"""The recovery side's sink: records of several sources into one journal, positions durable with
them, marks read for consistency, refusals, block checksums of the journal's latest view, cuts
dated when held; and the protected side's ack gate and mark payload."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from secondsite.appliance.journal import Journal, JournalConfig
from secondsite.appliance.protected import AckGate, mark_payload, parse_mark
from secondsite.appliance.recovery import JournalSink
from secondsite.appliance.stream import NO_VOLUME, Op, Record, SinkError, SinkRefused, VolumeEntry
from secondsite.appliance.stream.frames import block_digests

KiB = 1024


def write(seq: int, volume: int, offset: int, data: bytes) -> Record:
    return Record(seq, volume, Op.WRITE, offset, len(data), memoryview(data))


def mark(seq: int, request: int, consistent: bool) -> Record:
    payload = mark_payload(consistent, "Protected" if consistent else "BitmapSync")
    return Record(seq, NO_VOLUME, Op.CHECKPOINT_MARK, request, len(payload), payload)


async def open_journal(path: Path) -> Journal:
    return await Journal.open(path, JournalConfig(vpg="db"))


async def attached(journal: Journal, view_idle: float = 2.0) -> JournalSink:
    sink = JournalSink("db", journal, ["prot-a", "prot-b"], view_idle=view_idle)
    sink.attach("prot-a", [VolumeEntry("a0", 64 * KiB)])
    sink.attach("prot-b", [VolumeEntry("b0", 64 * KiB)])
    # New volumes are added in the background; records meanwhile wait, in order.
    first = sink.submit("prot-a", write(100, 0, 0, b"x" * 4096))
    await asyncio.wait_for(first, 5)
    return sink


async def test_records_are_journaled_and_positions_follow_them(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    sink = await attached(journal)
    assert {v.name for v in journal.volumes()} == {"a0", "b0"}
    assert sink.position("prot-a") == 100
    pending = [
        sink.submit("prot-a", write(101, 0, 4096, b"a" * 4096)),
        sink.submit("prot-b", write(7, 0, 0, b"b" * 4096)),
        sink.submit("prot-a", Record(102, 0, Op.ZERO, 0, 4096)),
        sink.submit("prot-b", mark(8, 1, consistent=True)),
    ]
    # One turn, one position record per source: every record of the turn shares its future.
    assert pending[0] is pending[2] and pending[1] is pending[3]
    assert sink.position("prot-a") == 100  # not durable yet
    await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert dict(journal.positions) == {"prot-a": 102, "prot-b": 8}
    assert sink.mark("prot-b", 8) == (True, "Protected")
    view = await journal.open_latest("a0")
    assert await view.read(0, 8192) == bytes(4096) + b"a" * 4096
    view.close()
    view = await journal.open_latest("b0")
    assert await view.read(0, 4096) == b"b" * 4096
    view.close()
    await journal.close()

    # Reopened (as after a restart), the journal says where each source resumes.
    journal = await open_journal(tmp_path)
    assert dict(journal.positions) == {"prot-a": 102, "prot-b": 8}
    sink = JournalSink("db", journal, ["prot-a", "prot-b"])
    sink.attach("prot-a", [VolumeEntry("a0", 64 * KiB)])
    assert sink.position("prot-a") == 102
    await journal.close()


async def test_refusals(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    sink = await attached(journal)
    with pytest.raises(SinkRefused, match="not a source of VPG db"):
        sink.attach("intruder", [VolumeEntry("z", 4096)])
    with pytest.raises(SinkRefused, match="the journal has 65536"):
        sink.attach("prot-a", [VolumeEntry("a0", 128 * KiB)])
    with pytest.raises(SinkRefused, match="comes from prot-a"):
        sink.attach("prot-b", [VolumeEntry("a0", 64 * KiB), VolumeEntry("b0", 64 * KiB)])
    with pytest.raises(SinkError, match="no volume index"):
        sink.submit("prot-a", write(200, 3, 0, b"q"))
    await journal.close()


async def test_sources_are_refused_during_a_failover_and_after_its_commit(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    sink = await attached(journal)
    checkpoint, pending = journal.mark_checkpoint("before")
    await asyncio.wait_for(pending, 5)
    await journal.promote_to(checkpoint)
    with pytest.raises(SinkRefused, match="failover phase promoted"):
        sink.attach("prot-a", [VolumeEntry("a0", 64 * KiB)])
    await journal.rollback()
    sink.attach("prot-a", [VolumeEntry("a0", 64 * KiB)])  # rolled back: replication resumes
    await journal.promote_to(checkpoint)
    await journal.commit()
    refusal = f"failed over to checkpoint {checkpoint.id} \\(committed\\).*reverse the VPG"
    with pytest.raises(SinkRefused, match=refusal):
        sink.attach("prot-a", [VolumeEntry("a0", 64 * KiB)])
    await journal.close()
    # The commit is the journal's: after a restart the old site is still refused.
    journal = await open_journal(tmp_path)
    with pytest.raises(SinkRefused, match=refusal):
        JournalSink("db", journal, ["prot-a", "prot-b"]).attach(
            "prot-b", [VolumeEntry("b0", 64 * KiB)]
        )
    await journal.close()


def test_mark_payload_round_trip_and_garbage() -> None:
    assert parse_mark(mark_payload(True, "Protected")) == (True, "Protected")
    assert parse_mark(mark_payload(False, "InitialSync")) == (False, "InitialSync")
    assert parse_mark(b"") == (False, "unknown")
    assert parse_mark(b'{"consistent": 1}') == (False, "")
    assert parse_mark(b"\xff\x00") == (False, "unknown")


async def test_ack_gate_holds_only_writes_submitted_during_a_hold() -> None:
    gate = AckGate()
    before = gate.passage()
    gate.close(1)
    during = asyncio.ensure_future(gate.passage())
    await before  # submitted before the hold: numbered before the mark, free to go
    gate.close(2)  # overlapping holds: the gate opens when the last one ends
    gate.open(1)
    await asyncio.sleep(0)
    assert not during.done()
    gate.open(2)
    await asyncio.wait_for(during, 1)
    assert not gate.held and len(gate.hold_seconds) == 1
    gate.open(3)  # a release of an unknown hold changes nothing
    await gate.passage()


async def test_checksums_are_of_the_latest_durable_view(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    sink = await attached(journal, view_idle=0.05)
    await asyncio.wait_for(sink.submit("prot-a", write(101, 0, 12 * KiB, b"y" * 8192)), 5)
    image = bytearray(64 * KiB)
    image[0:4096] = b"x" * 4096
    image[12 * KiB : 20 * KiB] = b"y" * 8192
    # Concurrent requests (one shared view of the volume), each of its own range.
    whole, tail = await asyncio.gather(
        sink.checksums("prot-a", 0, 0, 64 * KiB, 4096),
        sink.checksums("prot-a", 0, 60 * KiB, 4 * KiB, 4096),
    )
    assert whole == block_digests(image, 4096)
    assert tail == block_digests(bytes(4096), 4096)
    assert await sink.checksums("prot-b", 0, 0, 64 * KiB, 16 * KiB) == block_digests(
        bytes(64 * KiB), 16 * KiB
    )
    with pytest.raises(SinkError, match="no volume index 3"):
        await sink.checksums("prot-a", 3, 0, 4096, 4096)
    # No view stays open once no request came for view_idle: it would pin the journal.
    await asyncio.sleep(0.2)
    cp = await journal.checkpoint()
    await journal.promote(cp)
    assert journal.promoted_seq >= cp.seq
    await journal.close()


async def test_a_checkpoint_is_dated_when_its_cut_was_held(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    now = time.time_ns()
    held, _ = journal.mark_checkpoint(time_ns=now - 2_000_000_000)
    assert held.time_ns == now - 2_000_000_000
    # Never before the newest checkpoint, never in the future.
    earlier, _ = journal.mark_checkpoint(time_ns=now - 5_000_000_000)
    assert earlier.time_ns == held.time_ns
    future, pending = journal.mark_checkpoint(time_ns=now + 60_000_000_000)
    assert held.time_ns <= future.time_ns <= time.time_ns()
    await pending
    await journal.close()
    journal = await open_journal(tmp_path)
    undated, _ = journal.mark_checkpoint()
    assert undated.time_ns >= future.time_ns
    await journal.close()


async def test_checksums_of_a_span_larger_than_a_read_piece(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path)
    sink = JournalSink("db", journal, ["prot-a"])
    sink.attach("prot-a", [VolumeEntry("big", 20 << 20)])
    image = bytearray(20 << 20)
    for seq, offset in enumerate((0, (8 << 20) - 4096, 12 << 20, (20 << 20) - 4096), start=1):
        data = bytes([seq]) * 8192 if offset + 8192 <= len(image) else bytes([seq]) * 4096
        image[offset : offset + len(data)] = data
        await asyncio.wait_for(sink.submit("prot-a", write(seq, 0, offset, data)), 5)
    assert await sink.checksums("prot-a", 0, 0, 20 << 20, 4096) == block_digests(image, 4096)
    assert await sink.checksums("prot-a", 0, 4 << 20, 16 << 20, 1 << 24) == block_digests(
        image[4 << 20 :], 1 << 24
    )
    sink.close()
    await journal.close()
