"""Records go into space written ahead (spare segment files, zero-filled or recycled): what the
scan takes after the last record (never old records of a recycled file), what open says about
that tail, crash states of pre-zeroing and recycling, sealed segments, used bytes."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from secondsite.appliance.journal import Journal, JournalConfig
from secondsite.appliance.journal.record import (
    HEADER,
    SEGMENT_HEADER,
    SEGMENT_MAGIC,
    RecordType,
    crc32c,
    crc_ok,
    decode_header,
    decode_segment_header,
    encode_header,
    encode_segment_header,
)
from secondsite.appliance.journal.segment import (
    list_segments,
    load_sidecar,
    scan_headers,
    scan_segment,
    seg_path,
    torn_extent,
)
from secondsite.appliance.journal.spares import SparePool

SEG = 64 << 10
CFG = JournalConfig(vpg="prep", segment_size=SEG)
NO_SPARES = JournalConfig(vpg="prep", segment_size=SEG, spare_segments=0)
"""Segments exactly as the records fill them (no early move to a spare that became ready)."""
REC = HEADER.size + 4096
PER_SEGMENT = (SEG - SEGMENT_HEADER.size) // REC


def _segdir(d: Path) -> Path:
    return d / "segments"


def _header(path: Path) -> tuple[int, int, int, int, bool]:
    with open(path, "rb") as f:
        hdr = decode_segment_header(f.read(SEGMENT_HEADER.size))
    assert hdr is not None
    return hdr


def _newest(d: Path) -> Path:
    return seg_path(_segdir(d), list_segments(_segdir(d))[-1])


def _crash_copy(d: Path, to: Path) -> Path:
    """The directory as a kill -9 leaves it (every append awaited so far is in it)."""
    shutil.copytree(d, to, ignore=shutil.ignore_patterns("*.tmp"))
    return to


async def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _open(d: Path, cfg: JournalConfig = CFG) -> Journal:
    j = await Journal.open(d, cfg)
    await j.add_volume("a", 1 << 20)
    return j


async def _spare_ready(j: Journal) -> None:
    """Wait until a spare is ready (the active segment must be a new file: no prepared part)."""
    await _wait(lambda: j.status().prepared_bytes >= SEG, "a spare")


def _payload(seq: int, n: int) -> bytes:
    return bytes([seq % 251 + 1]) * n


async def _write(j: Journal, count: int, n: int = 4096) -> list[int]:
    """``count`` writes of ``n`` bytes, each awaited; returns their seqs."""
    seqs = []
    for _ in range(count):
        seq = j.next_seq
        seqs.append(await j.append_write("a", (seq % 200) * 4096, _payload(seq, n)))
    return seqs


async def _check_latest(j: Journal, seqs: list[int]) -> None:
    img = await j.open_latest("a")
    try:
        for s in seqs[-150:]:
            assert await img.read((s % 200) * 4096, 8) == _payload(s, 8), s
    finally:
        img.close()


# ------------------------------------------------------------------ the scan, on built files


def _build(
    path: Path,
    *,
    first_seq: int,
    incarnation: int,
    recycled: bool,
    records: list[tuple[int, int, int]],
    size: int = SEG,
) -> list[int]:
    """A segment file: header, then (seq, incarnation, payload length) records, then zeros up
    to ``size``. Returns the offset where each record starts."""
    at = [SEGMENT_HEADER.size]
    with open(path, "wb") as f:
        f.write(encode_segment_header(int(path.stem), first_seq, 1, incarnation, recycled=recycled))
        for seq, inc, n in records:
            payload = _payload(seq, n)
            f.write(
                encode_header(RecordType.WRITE, 0, seq, 0, n, 1, payload, incarnation=inc) + payload
            )
            at.append(f.tell())
        f.truncate(max(size, f.tell()))
    return at[:-1]


@pytest.mark.parametrize("header_only", [False, True])
def test_scan_takes_no_record_of_another_incarnation(tmp_path: Path, header_only: bool) -> None:
    path = tmp_path / "0000000000000009.seg"
    live = [(100 + i, 0xA, 4040) for i in range(5)]
    # After the live records: one with a higher seq but another incarnation (what a guest could
    # have planted in an old payload), then old records of the earlier incarnation.
    at = _build(
        path,
        first_seq=100,
        incarnation=0xA,
        recycled=True,
        records=[*live, (105, 0xB, 4040), *[(40 + i, 0xB, 4040) for i in range(5)]],
    )
    scan = scan_headers(path) if header_only else scan_segment(path, verify_crc=True)
    assert scan.records["seq"].tolist() == [100, 101, 102, 103, 104]
    assert scan.valid_end == at[5]
    assert torn_extent(path, scan) == 0  # old records after the end are no torn tail


def test_scan_takes_no_record_at_or_below_the_last_seq(tmp_path: Path) -> None:
    path = tmp_path / "0000000000000009.seg"
    at = _build(
        path,
        first_seq=100,
        incarnation=0xA,
        recycled=True,
        records=[(100, 0xA, 10), (101, 0xA, 10), (101, 0xA, 10), (102, 0xA, 10)],
    )
    scan = scan_segment(path, verify_crc=True)
    assert scan.records["seq"].tolist() == [100, 101]
    assert scan.valid_end == at[2]
    # Behind the end, the record header of this incarnation marks the extent as torn.
    assert torn_extent(path, scan) == at[3] + HEADER.size + 10 - at[2]


def test_torn_extent_in_zero_filled_space(tmp_path: Path) -> None:
    path = tmp_path / "0000000000000009.seg"
    at = _build(
        path,
        first_seq=1,
        incarnation=0xA,
        recycled=False,
        records=[(1, 0xA, 100), (2, 0xA, 100)],
    )
    end = at[1] + HEADER.size + 100
    scan = scan_segment(path, verify_crc=True)
    assert scan.valid_end == end and scan.torn_bytes == SEG - end
    assert torn_extent(path, scan) == 0
    with open(path, "r+b") as f:  # a torn record: its first page landed, then zeros
        f.seek(end + 3000)
        f.write(b"\x01" * 700)
    assert torn_extent(path, scan) == 3700


def test_torn_extent_of_a_torn_record_in_a_recycled_file(tmp_path: Path) -> None:
    path = tmp_path / "0000000000000009.seg"
    at = _build(
        path,
        first_seq=100,
        incarnation=0xA,
        recycled=True,
        records=[(100, 0xA, 500), (101, 0xA, 5000), (30, 0xB, 5000), (31, 0xB, 5000)],
    )
    with open(path, "r+b") as f:  # record 101 fails its CRC
        f.seek(at[1] + HEADER.size + 4000)
        f.write(b"\xff")
    scan = scan_segment(path, verify_crc=True)
    assert scan.valid_end == at[1]
    assert torn_extent(path, scan) == HEADER.size + 5000


# ------------------------------------------------------------------ open after a crash


async def test_open_with_a_zero_filled_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await _spare_ready(j)
    seqs = await _write(j, 3)  # the first moves to the spare
    active = _newest(d)
    assert active.stat().st_size == SEG  # the records went into written space
    assert not _header(active)[4]
    crash = _crash_copy(d, tmp_path / "crash")
    await j.close()
    end = SEGMENT_HEADER.size + 3 * REC
    active = seg_path(_segdir(crash), int(active.stem))
    tail = active.read_bytes()[end:]
    assert len(tail) == SEG - end and tail == bytes(len(tail))
    caplog.set_level(logging.INFO)
    j = await Journal.open(crash, CFG)
    assert "torn tail" not in caplog.text
    assert f"end of records in prepared space vpg=prep segment={active.stem.lstrip('0')}" in (
        caplog.text
    )
    assert f"prepared_bytes={SEG - end}" in caplog.text
    assert j.durable_seq == seqs[-1]
    assert active.stat().st_size == end
    await _check_latest(j, seqs)
    seq = await j.append_write("a", 0, b"after")
    await j.close()
    j = await Journal.open(crash, CFG)
    assert j.durable_seq == seq
    await j.close()


async def test_open_with_a_recycled_file_holding_old_records_after_the_live_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "j"
    j = await _open(d, NO_SPARES)
    seqs = await _write(j, 6 * PER_SEGMENT)  # segments 1..6, full
    await j.close()
    j = await Journal.open(d, CFG)
    await _spare_ready(j)
    cp = await j.checkpoint()  # goes into a spare: segments 1..6 are sealed
    await j.promote(cp)  # they are freed: the first becomes a spare, the others go
    assert j.used_bytes() < SEG
    # Fill segments until the recycled one is active, then put a second record into it.
    for _ in range(4 * PER_SEGMENT):
        seqs += await _write(j, 1)
        if _header(_newest(d))[4]:
            break
    else:
        pytest.fail("the recycled spare did not become a segment")
    seqs += await _write(j, 1)
    active = _newest(d)
    end = SEGMENT_HEADER.size + 2 * REC
    raw = active.read_bytes()
    assert len(raw) == SEG
    incarnation = _header(active)[3]
    # After the live records: the zeros that finished the last batch's page, then whole valid
    # records of the file's earlier incarnation (its 3rd to 15th record).
    assert raw[end : -end % 4096 + end] == bytes(-end % 4096)
    for k in range(3, PER_SEGMENT):
        at = SEGMENT_HEADER.size + k * REC
        old = decode_header(raw, at)
        assert old is not None and old.incarnation != incarnation and old.seq == k + 1
        assert crc_ok(raw[at : at + HEADER.size], raw[at + HEADER.size : at + REC], old.crc)
    crash = _crash_copy(d, tmp_path / "crash")
    await j.close()
    caplog.set_level(logging.INFO)
    j = await Journal.open(crash, CFG)
    assert "torn tail" not in caplog.text
    assert "end of records in prepared space" in caplog.text
    assert j.durable_seq == seqs[-1]
    assert seg_path(_segdir(crash), int(active.stem)).stat().st_size == end
    await _check_latest(j, seqs)
    await j.close()


async def test_torn_record_in_prepared_space_is_cut_with_its_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await _spare_ready(j)
    seqs = await _write(j, 3)
    crash = _crash_copy(d, tmp_path / "crash")
    await j.close()
    third = SEGMENT_HEADER.size + 2 * REC
    with open(_newest(crash), "r+b") as f:  # the 3rd record's last 1096 bytes did not land
        f.seek(third + HEADER.size + 3000)
        f.write(bytes(1096))
    caplog.set_level(logging.INFO)
    j = await Journal.open(crash, CFG)
    assert "torn tail cut" in caplog.text
    # Up to the record's last written byte, not the whole prepared tail.
    assert "bytes_cut=3056 " in caplog.text
    assert j.durable_seq == seqs[1]
    await j.close()


async def test_crash_states_of_pre_zeroing_and_recycling(tmp_path: Path) -> None:
    """After a crash: a promoted segment whose recycling did not happen; a freed segment renamed
    to a spare but not yet topped up; a spare whose zero-filling stopped; a spare that became
    the newest segment (header written, renamed) before a record went in. Open copes with each
    and the spares take records."""
    d = tmp_path / "j"
    j = await _open(d, NO_SPARES)
    seqs = await _write(j, PER_SEGMENT + 5)
    cp = await j.checkpoint()
    seqs += await _write(j, 20)
    await j.close()
    segdir = _segdir(d)
    first = seg_path(segdir, 1).read_bytes()
    j = await Journal.open(d, NO_SPARES)
    await j.promote(cp)
    assert not seg_path(segdir, 1).exists()
    await j.close()
    seg_path(segdir, 1).write_bytes(first)
    (segdir / "0000000000000010.spare").write_bytes(first)
    (segdir / "0000000000000011.spare").write_bytes(bytes(12 << 10))
    newest = list_segments(segdir)[-1] + 1
    head = encode_segment_header(newest, seqs[-1] + 1, 1, 0x5EED, recycled=True)
    seg_path(segdir, newest).write_bytes(head + first[SEGMENT_HEADER.size :])

    j = await Journal.open(d, CFG)
    assert j.durable_seq == seqs[-1]
    assert not seg_path(segdir, 1).exists()
    assert seg_path(segdir, newest).stat().st_size == SEGMENT_HEADER.size
    spares = sorted(segdir.glob("*.spare"))
    assert [p.name for p in spares] == ["0000000000000010.spare", "0000000000000011.spare"]
    await _wait(lambda: j.status().prepared_bytes == 2 * SEG, "both spares finished")
    assert all(p.stat().st_size == SEG for p in spares)
    await _check_latest(j, seqs)
    # The spares become segments; their old bytes are no records of them.
    seqs += await _write(j, 2 * PER_SEGMENT)
    assert any(_header(seg_path(segdir, s))[4] for s in list_segments(segdir))
    await _check_latest(j, seqs)
    await j.close()
    j = await Journal.open(d, CFG)
    assert j.durable_seq == seqs[-1]
    await _check_latest(j, seqs)
    await j.close()


async def test_extra_spares_are_removed_and_none_kept_without_spare_segments(
    tmp_path: Path,
) -> None:
    d = tmp_path / "j"
    j = await _open(d, NO_SPARES)
    _segdir(d).joinpath("0000000000000003.spare").write_bytes(bytes(100))
    await j.close()
    j = await Journal.open(d, NO_SPARES)
    assert not list(_segdir(d).glob("*.spare"))
    await _write(j, 3 * PER_SEGMENT)
    cp = await j.checkpoint()
    await j.promote(cp)
    assert len(list_segments(_segdir(d))) == 1
    assert not list(_segdir(d).glob("*.spare"))
    assert j.status().prepared_bytes == 0
    await j.close()


# ------------------------------------------------------------------ sealed segments, accounting


async def test_sealed_segments_end_at_their_last_record(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await _spare_ready(j)
    prepared: set[int] = set()
    for _ in range(4 * PER_SEGMENT):
        await _write(j, 1)
        if _newest(d).stat().st_size == SEG:
            prepared.add(int(_newest(d).stem))
    segnos = list_segments(_segdir(d))
    await j.close()
    assert len(segnos) >= 4 and set(segnos[:-1]) & prepared
    for segno in segnos[:-1]:
        path = seg_path(_segdir(d), segno)
        full = scan_segment(path, verify_crc=True)
        assert full.valid_end == path.stat().st_size
        hdr = _header(path)
        side = load_sidecar(_segdir(d), segno, hdr[1], hdr[2])
        assert side is not None  # the sidecar matches the cut file
        assert side.records["seq"].tolist() == full.records["seq"].tolist()
        assert scan_headers(path).records["seq"].tolist() == full.records["seq"].tolist()


async def test_used_bytes_count_records_not_prepared_space(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await _spare_ready(j)
    await _write(j, 2 * PER_SEGMENT)

    def on_disk() -> int:
        files = [*_segdir(d).glob("*.seg"), *_segdir(d).glob("*.spare")]
        return sum(p.stat().st_size for p in files)

    segs = list_segments(_segdir(d))
    st = j.status()
    assert (
        st.retention.used_bytes
        == j.used_bytes()
        == SEGMENT_HEADER.size * len(segs) + (2 * PER_SEGMENT * REC)
    )
    # The active segment's unused part and the ready spares make up the rest of the files.
    await _wait(
        lambda: (
            on_disk() == j.used_bytes() + j.status().prepared_bytes
            and j.status().prepared_bytes > SEG
        ),
        "accounting of the prepared space",
    )
    # Promotion frees segments: one is recycled into a spare, and none counts as used.
    cp = await j.checkpoint()
    await j.promote(cp)
    assert j.used_bytes() < SEG
    await _wait(
        lambda: on_disk() == j.used_bytes() + j.status().prepared_bytes,
        "accounting after promotion",
    )
    assert len(list(_segdir(d).glob("*.spare"))) <= CFG.spare_segments
    await j.close()


# ------------------------------------------------------------------ the spare pool alone


@pytest.mark.parametrize("direct", ["O_DIRECT", "EINVAL"])
@pytest.mark.parametrize("size", [SEG, 20_000, (5 << 20) + 4096])
async def test_spares_are_written_to_their_whole_size(
    tmp_path: Path, direct: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh spares are zeros, a recycled one keeps its bytes and gets zeros after them: with
    O_DIRECT, buffered at unaligned edges, and all buffered where O_DIRECT writes fail."""
    pwrite = os.pwrite
    direct_writes = []

    def checked(fd: int, data: bytes, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if direct == "EINVAL":
                raise OSError(errno.EINVAL, "not on this device")
            direct_writes.append(len(data))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", checked)
    old = os.urandom(size // 3 + 123)
    (tmp_path / "0000000000000099.seg").write_bytes(old)
    with ThreadPoolExecutor(1) as executor:
        pool = SparePool(tmp_path, size, 2, executor)
        pool.load()
        await _wait(pool.has_ready, "a fresh spare")
        assert pool.adopt(tmp_path / "0000000000000099.seg")
        await _wait(lambda: pool.spare_bytes() == 2 * size, "the recycled spare")
        fresh, recycled = pool.take(), pool.take()
        pool.close()
    assert fresh is not None and recycled is not None
    assert not fresh.recycled and fresh.path.read_bytes() == bytes(size)
    assert recycled.recycled
    assert recycled.path.read_bytes() == old + bytes(size - len(old))
    assert bool(direct_writes) == (direct == "O_DIRECT")


async def test_a_journal_of_version_1_segments_is_read_and_continued(tmp_path: Path) -> None:
    """A journal written before incarnations: its segment is read, the next records go after
    its records (incarnation 0, as its header says), then into version 2 segments."""
    d = tmp_path / "j"
    j = await _open(d, NO_SPARES)  # state.json, volumes.json ("a" is volume 0)
    await j.close()
    v1 = struct.Struct("<8sHHQQQI24x")
    fields = (SEGMENT_MAGIC, 1, SEGMENT_HEADER.size, 1, 1, 1)
    with open(seg_path(_segdir(d), 1), "wb") as f:
        f.write(v1.pack(*fields, crc32c(v1.pack(*fields, 0))))
        for seq in range(1, 6):
            payload = _payload(seq, 4096)
            off = (seq % 200) * 4096
            f.write(encode_header(RecordType.WRITE, 0, seq, off, 4096, 1, payload, incarnation=0))
            f.write(payload)
    j = await Journal.open(d, NO_SPARES)
    assert j.durable_seq == 5
    seqs = [1, 2, 3, 4, 5, *await _write(j, 2)]  # into the version 1 segment
    await j.close()
    seg1 = scan_segment(seg_path(_segdir(d), 1), verify_crc=True)
    assert seg1.records["seq"].tolist() == seqs and seg1.incarnation == 0
    j = await Journal.open(d, CFG)
    await _spare_ready(j)
    seqs += await _write(j, 2)  # into a version 2 segment made from a spare
    await j.close()
    assert _header(_newest(d))[3] != 0
    j = await Journal.open(d, CFG)
    assert j.durable_seq == seqs[-1]
    await _check_latest(j, seqs)
    await j.close()
