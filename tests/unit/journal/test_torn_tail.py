"""A torn or damaged tail is found by CRC and cut at open; nothing before it is lost."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from secondsite.appliance.journal import CorruptJournalError, Journal, JournalConfig
from secondsite.appliance.journal.record import HEADER

CFG = JournalConfig(vpg="torn", segment_size=1 << 20)


async def _write(d: Path, n: int) -> list[int]:
    j = await Journal.open(d, CFG)
    await j.add_volume("a", 1 << 20)
    seqs = [await j.append_write("a", i * 4096, bytes([i + 1]) * 4096) for i in range(n)]
    await j.checkpoint("last")
    await j.close()
    return seqs


def _last_segment(d: Path) -> Path:
    return sorted((d / "segments").glob("*.seg"))[-1]


async def _read_all(j: Journal) -> bytes:
    img = await j.open_latest("a")
    try:
        return await img.read(0, 1 << 20)
    finally:
        img.close()


@pytest.mark.parametrize(
    "damage",
    ["garbage", "partial_header", "partial_payload", "flip_payload", "flip_header"],
)
async def test_torn_tail_is_cut(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "j"
    await _write(d, 10)
    seg = _last_segment(d)
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        if damage == "garbage":
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(3000))
            lost = 0
        elif damage == "partial_header":
            f.seek(0, os.SEEK_END)
            f.write(b"SSJR\x01\x01\0\0" + b"\0" * 20)
            lost = 0
        else:
            # The journal ends with: write 10 (header + 4096) then the checkpoint record.
            cp_len = HEADER.size + 11 + len("last")
            last_write = size - cp_len - 4096 - HEADER.size
            if damage == "partial_payload":
                f.truncate(last_write + HEADER.size + 1000)
            elif damage == "flip_payload":
                f.seek(last_write + HEADER.size + 2000)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0xFF]))
            else:
                f.seek(last_write + 30)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0x01]))
            lost = 1
    caplog.set_level(logging.WARNING)
    j = await Journal.open(d, CFG)
    assert any("torn tail cut" in r.getMessage() for r in caplog.records)
    assert "bytes_cut=" in caplog.text
    data = await _read_all(j)
    for i in range(10 - lost):
        assert data[i * 4096 : (i + 1) * 4096] == bytes([i + 1]) * 4096
    if lost:
        assert data[9 * 4096 : 10 * 4096] == bytes(4096)
        assert j.checkpoints.by_tag("last") == []
        assert j.next_seq == 10
    else:
        assert len(j.checkpoints.by_tag("last")) == 1
    # The journal is writable again and the cut is durable.
    seq = await j.append_write("a", 0, b"again")
    await j.close()
    j = await Journal.open(d, CFG)
    assert j.durable_seq == seq
    await j.close()


async def test_damage_before_the_last_segment_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "j"
    cfg = JournalConfig(segment_size=20_000)
    j = await Journal.open(d, cfg)
    await j.add_volume("a", 1 << 20)
    for i in range(20):
        await j.append_write("a", i * 4096, b"z" * 4096)
    await j.close()
    segs = sorted((d / "segments").glob("*.seg"))
    assert len(segs) > 2
    for idx in (d / "segments").glob("*.idx"):
        idx.unlink()  # force a scan of the sealed segments
    with open(segs[0], "r+b") as f:
        f.seek(64 + 10)
        f.write(b"\xff\xff")
    with pytest.raises(CorruptJournalError):
        await Journal.open(d, cfg)


async def test_half_created_segment_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "j"
    await _write(d, 3)
    last = _last_segment(d)
    nxt = last.with_name(f"{int(last.stem) + 1:016d}.seg")
    nxt.write_bytes(b"SSJSEG")
    j = await Journal.open(d, CFG)
    assert not nxt.exists()
    assert j.next_seq == 5
    await j.close()
