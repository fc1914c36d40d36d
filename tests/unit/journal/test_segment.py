"""Segment scanning: the vectorised header scan agrees with the record-by-record scan."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from secondsite.appliance.journal import Journal, JournalConfig
from secondsite.appliance.journal.segment import scan_headers, scan_segment

POSITION = -1
"""In a list of record sizes: a POSITION record (of source "s0", "s1" or "s2")."""


async def _journal(d: Path, sizes: list[int]) -> Path:
    # No spares: a ready spare would start a new segment early, and these tests want one.
    j = await Journal.open(d, JournalConfig(segment_size=64 << 20, spare_segments=0))
    await j.add_volume("a", 1 << 20)
    await j.add_volume("b", 1 << 20)
    for i, n in enumerate(sizes):
        vol = "ab"[i % 2]
        if n == POSITION:
            await j.submit_position(f"s{i % 3}", i)
        elif n < 0:
            await j.append_trim(vol, 4096, -n)
        elif n == 0:
            await j.checkpoint(tag="t" if i % 3 == 0 else None, consistent=i % 2 == 0)
        else:
            await j.append_write(vol, i * 7, os.urandom(n))
    await j.close()
    return sorted((d / "segments").glob("*.seg"))[-1]


def _same(a: object, b: object) -> None:
    ra, rb = a.records, b.records  # type: ignore[attr-defined]
    for k in ra:
        assert np.array_equal(ra[k], rb[k]), k
    ca, cb = a.checkpoints, b.checkpoints  # type: ignore[attr-defined]
    for k in ca:
        assert np.array_equal(ca[k], cb[k]), k
    assert a.tags == b.tags  # type: ignore[attr-defined]
    assert a.positions == b.positions  # type: ignore[attr-defined]
    assert a.position_seq == b.position_seq  # type: ignore[attr-defined]
    assert a.last_seq == b.last_seq  # type: ignore[attr-defined]
    assert a.valid_end == b.valid_end  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_header_scan_matches_full_scan(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sizes = []
    for _ in range(40):  # runs of equal sizes with odd ones between, as workloads do
        n = rng.choice([4096, 512, 65536, 1, 0, -8192, POSITION])
        sizes += [n] * rng.randrange(1, 60)
    seg = await _journal(tmp_path / "j", sizes)
    full = scan_segment(seg, verify_crc=True)
    assert full.positions and full.position_seq > 0
    _same(scan_headers(seg), full)


async def test_header_scan_stops_at_a_torn_or_damaged_record(tmp_path: Path) -> None:
    seg = await _journal(tmp_path / "j", [4096] * 100)
    full = scan_segment(seg, verify_crc=True)
    with open(seg, "r+b") as f:
        f.truncate(full.valid_end - 100)  # last record torn
    torn = scan_headers(seg)
    assert len(torn.records["seq"]) == 99
    assert torn.valid_end == full.valid_end - 4096 - 56
    with open(seg, "r+b") as f:
        f.seek(int(full.records["pos"][50]) - 56)  # header of record 51: bad magic
        f.write(b"XXXX")
    assert len(scan_headers(seg).records["seq"]) == 50
