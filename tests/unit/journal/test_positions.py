"""Source positions: POSITION records, durable with the records before them, kept through
reopen, torn tails, sidecars, the header-only scan, retention promotion and failover."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

from secondsite.appliance.journal import (
    Checkpoint,
    FailoverStateError,
    Journal,
    JournalConfig,
)
from secondsite.appliance.journal.record import HEADER
from secondsite.appliance.journal.segment import (
    idx_path,
    list_segments,
    load_sidecar,
    scan_segment,
    seg_path,
)

from .conftest import Model, assert_images, random_ops

SIZES = {"a": 64 << 10, "b": 40_000}
CFG = JournalConfig(vpg="pos", segment_size=24 << 10)


async def _open(d: Path, cfg: JournalConfig = CFG) -> Journal:
    j = await Journal.open(d, cfg)
    for v, n in SIZES.items():
        await j.add_volume(v, n)
    return j


async def _history(
    j: Journal, model: Model, rng: random.Random, chunks: int, sent: dict[str, int]
) -> list[Checkpoint]:
    """Chunks of random ops, each ending in a checkpoint and then a position for one of two
    sources (gaps in the source seqs, as the stream has them). ``sent``: last position each."""
    cps: list[Checkpoint] = []
    for _ in range(chunks):
        cps += await random_ops(j, model, rng, 5, cp_every=5)
        source = rng.choice(["node-1", "node-2"])
        sent[source] = sent.get(source, 0) + rng.randrange(1, 50)
        await j.submit_position(source, sent[source])
    return cps


def _segments(d: Path) -> list[int]:
    return list_segments(d / "segments")


# ------------------------------------------------------------------ submit and durability


async def test_position_is_durable_once_awaited(journal: Journal) -> None:
    assert dict(journal.positions) == {}
    p = journal.submit_position("node-1", 41)
    assert p.seq == journal.next_seq - 1
    assert "node-1" not in journal.positions  # not durable yet
    await p
    assert dict(journal.positions) == {"node-1": 41}
    assert journal.durable_seq == p.seq
    with pytest.raises(TypeError):
        journal.positions["node-1"] = 99  # type: ignore[index]


async def test_position_shares_the_group_commit_of_the_records_before_it(
    journal: Journal,
) -> None:
    batches = journal.batches
    writes = [journal.submit_write("a", i * 4096, bytes([i]) * 4096) for i in range(30)]
    cp, pcp = journal.mark_checkpoint()
    pos = journal.submit_position("node-1", 30)
    assert pos.seq == cp.seq + 1 == writes[-1].seq + 2  # call order is sequence order
    await pos
    # Durable together with every record submitted before it: one write + fdatasync round.
    assert journal.batches == batches + 1
    assert all(w.future.done() for w in writes) and pcp.future.done()
    assert journal.positions["node-1"] == 30


async def test_positions_are_monotonic_per_source(journal: Journal) -> None:
    await journal.submit_position("node-1", 10)
    await journal.submit_position("node-1", 10)  # the same position again is fine
    pending = journal.submit_position("node-1", 20)
    seq = journal.next_seq
    with pytest.raises(ValueError, match="below 20"):
        journal.submit_position("node-1", 15)  # below a submitted, not yet durable one
    await pending
    with pytest.raises(ValueError):
        journal.submit_position("node-1", 19)
    await journal.submit_position("node-2", 3)  # sources are independent
    assert journal.next_seq == seq + 1  # refused submits took no sequence number
    assert dict(journal.positions) == {"node-1": 20, "node-2": 3}


@pytest.mark.parametrize(
    ("source", "source_seq"),
    [("", 1), ("x" * 256, 1), ("é" * 128, 1), ("\udc80", 1), ("n", -1), ("n", 1 << 64)],
)
async def test_bad_positions_are_refused_before_a_sequence_number(
    journal: Journal, source: str, source_seq: int
) -> None:
    seq = journal.next_seq
    with pytest.raises(ValueError):
        journal.submit_position(source, source_seq)
    assert journal.next_seq == seq and dict(journal.positions) == {}


async def test_longest_source_name_and_largest_seq(tmp_path: Path) -> None:
    j = await _open(tmp_path / "j")
    name = "é" * 127 + "x"  # 255 utf-8 bytes
    await j.submit_position(name, (1 << 64) - 1)
    await j.close()
    j = await Journal.open(tmp_path / "j", CFG)
    assert dict(j.positions) == {name: (1 << 64) - 1}
    await j.close()


async def test_positions_are_no_write_to_any_volume(tmp_path: Path) -> None:
    j = await _open(tmp_path / "j")
    model = Model(dict(SIZES))
    rng = random.Random(4)
    cps = await random_ops(j, model, rng, 20, cp_every=5)
    latest = await j.open_latest("a")
    used, segments = j.used_bytes(), len(_segments(tmp_path / "j"))
    for k in range(50):
        await j.submit_position("node-1", k + 1)
    cp = await j.checkpoint()
    model.checkpoint(cp)
    cps.append(cp)
    assert await latest.read(0, SIZES["a"]) == model.data["a"]  # the latest view moved on
    latest.close()
    await assert_images(j, model, cps)
    st = j.status()
    assert st.checkpoint_count == len(cps) and st.newest_checkpoint == cp
    # POSITION records take journal space like any record (plus the header of a new segment).
    rolled = len(_segments(tmp_path / "j")) - segments
    assert j.used_bytes() == used + 50 * (HEADER.size + 1 + 6 + 8) + HEADER.size + 11 + 64 * rolled
    await j.close()


async def test_a_held_ack_still_counts_as_a_durable_position(journal: Journal) -> None:
    async with journal.hold_acks():
        p = journal.submit_position("node-1", 7)
        for _ in range(200):
            await asyncio.sleep(0.002)
            if journal.durable_seq >= p.seq:
                break
        assert journal.positions["node-1"] == 7  # durable: a crash now would keep it...
        assert not p.future.done()  # ...but its ack is held like a write's
    await p


# ------------------------------------------------------------------ reopen, sidecars, scans


async def _journal_with_positions(d: Path) -> tuple[dict[str, int], int, Model, list[Checkpoint]]:
    j = await _open(d)
    model = Model(dict(SIZES))
    sent: dict[str, int] = {}
    cps = await _history(j, model, random.Random(5), 30, sent)
    next_seq = j.next_seq
    assert dict(j.positions) == sent
    await j.close()
    assert len(_segments(d)) > 3
    return sent, next_seq, model, cps


async def test_positions_survive_a_clean_reopen(tmp_path: Path) -> None:
    d = tmp_path / "j"
    sent, next_seq, model, cps = await _journal_with_positions(d)
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent
    assert j.next_seq == next_seq  # the journal ends with a POSITION record: its seq is taken
    await assert_images(j, model, cps)
    with pytest.raises(ValueError):
        j.submit_position("node-1", sent["node-1"] - 1)
    await j.submit_position("node-1", sent["node-1"] + 1)
    await j.close()


async def test_sidecars_carry_the_positions_of_their_segments(tmp_path: Path) -> None:
    d = tmp_path / "j"
    sent, next_seq, _model, _cps = await _journal_with_positions(d)
    segdir = d / "segments"
    merged: dict[str, int] = {}
    *sealed, active = _segments(d)
    for segno in sealed:
        full = scan_segment(seg_path(segdir, segno), verify_crc=True)
        side = load_sidecar(segdir, segno, full.first_seq, full.created_ns)
        assert side is not None and side.from_sidecar
        assert (side.positions, side.position_seq, side.last_seq) == (
            full.positions,
            full.position_seq,
            full.last_seq,
        )
        for s, v in side.positions.items():
            merged[s] = max(merged.get(s, 0), v)
    for s, v in scan_segment(seg_path(segdir, active), verify_crc=True).positions.items():
        merged[s] = max(merged.get(s, 0), v)
    assert merged == sent
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent and j.next_seq == next_seq
    await j.close()


async def test_positions_from_the_header_scan_without_sidecars(tmp_path: Path) -> None:
    d = tmp_path / "j"
    sent, next_seq, model, cps = await _journal_with_positions(d)
    for idx in (d / "segments").glob("*.idx"):
        idx.unlink()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent and j.next_seq == next_seq
    await assert_images(j, model, cps)
    await j.close()
    assert len(list((d / "segments").glob("*.idx"))) == len(_segments(d)) - 1  # written again


async def test_an_old_sidecar_is_ignored_and_rewritten(tmp_path: Path) -> None:
    d = tmp_path / "j"
    sent, _next_seq, _model, _cps = await _journal_with_positions(d)
    # The newest sealed segment: it holds records (a roll needs some in the active segment),
    # where the oldest may be an empty one, which the reopen removes.
    sealed = _segments(d)[-2]
    idx = idx_path(d / "segments", sealed)
    raw = bytearray(idx.read_bytes())
    raw[8:10] = (1).to_bytes(2, "little")  # version 1: no positions in it
    idx.write_bytes(bytes(raw))
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent
    await j.close()
    assert int.from_bytes(idx.read_bytes()[8:10], "little") == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header"])
async def test_a_torn_position_record_is_cut_and_not_counted(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await j.append_write("a", 0, b"w" * 4096)
    await j.submit_position("node-1", 5)
    await j.submit_position("node-2", 8)
    await j.append_write("a", 4096, b"v" * 4096)
    last = j.submit_position("node-1", 9)
    await last
    await j.close()
    seg = seg_path(d / "segments", _segments(d)[-1])
    size = seg.stat().st_size
    rec_len = HEADER.size + 1 + len("node-1") + 8
    with open(seg, "r+b") as f:
        if damage == "truncate":
            f.truncate(size - 3)
        else:
            at = size - 2 if damage == "flip_payload" else size - rec_len + 20
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x10]))
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == {"node-1": 5, "node-2": 8}
    assert j.next_seq == last.seq  # the cut record's seq is free again
    assert seg.stat().st_size == size - rec_len
    await j.submit_position("node-1", 7)  # below the lost 9: fine, 9 never was durable
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == {"node-1": 7, "node-2": 8}
    await j.close()


# ------------------------------------------------------------------ promotion and failover


async def test_retention_promotion_keeps_positions_of_deleted_segments(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    model = Model(dict(SIZES))
    rng = random.Random(6)
    sent: dict[str, int] = {}
    await _history(j, model, rng, 12, sent)
    early = dict(sent)
    cps = await random_ops(j, model, rng, 60, cp_every=5)  # no positions from here on
    assert dict(j.positions) == early
    saved = tmp_path / "saved"
    # Segments only: a sidecar or spare may be in the making on the background thread.
    shutil.copytree(d / "segments", saved, ignore=shutil.ignore_patterns("*.tmp", "*.spare"))
    await j.promote(cps[-2])
    segdir = d / "segments"
    # Every segment that held a POSITION record is gone.
    assert all(
        not scan_segment(seg_path(segdir, s), verify_crc=True).positions for s in _segments(d)
    )
    assert dict(j.positions) == early
    await assert_images(j, model, cps[-2:])
    state = json.loads((d / "state.json").read_text())
    assert state["positions"] == early
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == early
    await j.close()
    # A crash after the watermark was saved but before the segments went: they go at open.
    for p in saved.glob("*.seg"):
        if not (segdir / p.name).exists():
            shutil.copy(p, segdir / p.name)
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == early
    assert _segments(d)[0] > int(min(p.stem for p in saved.glob("*.seg")))
    await assert_images(j, model, cps[-2:])
    await j.close()


async def test_interrupted_promotion_is_finished_with_the_positions(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    model = Model(dict(SIZES))
    rng = random.Random(8)
    sent: dict[str, int] = {}
    await _history(j, model, rng, 10, sent)
    cps = await random_ops(j, model, rng, 50, cp_every=5)
    await j.close()
    state = json.loads((d / "state.json").read_text())
    state["promoting"] = cps[-1].to_json()  # died in the middle of promoting to it
    (d / "state.json").write_text(json.dumps(state))
    j = await Journal.open(d, CFG)
    assert j.promoted_seq == cps[-1].seq
    assert dict(j.positions) == sent
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent
    await j.close()


async def test_failover_rollback_keeps_positions(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    model = Model(dict(SIZES))
    sent: dict[str, int] = {}
    cps = await _history(j, model, random.Random(9), 12, sent)
    await j.promote_to(cps[4])
    assert dict(j.positions) == sent
    with pytest.raises(FailoverStateError):
        j.submit_position("node-1", sent["node-1"] + 1)  # no appends while promoted
    await j.close()
    j = await Journal.open(d, CFG)  # the appliance restarts before the decision
    assert j.failover_phase == "promoted" and dict(j.positions) == sent
    await j.rollback()
    assert dict(j.positions) == sent
    await j.submit_position("node-1", sent["node-1"] + 1)
    sent["node-1"] += 1
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent
    await j.close()


@pytest.mark.parametrize("crash_in_commit", [False, True])
async def test_failover_commit_keeps_positions(tmp_path: Path, crash_in_commit: bool) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    model = Model(dict(SIZES))
    sent: dict[str, int] = {}
    cps = await _history(j, model, random.Random(10), 12, sent)
    target = cps[2]  # most POSITION records come after it: commit drops them
    await j.promote_to(target)
    if crash_in_commit:
        await j.close()
        state = json.loads((d / "state.json").read_text())
        state["failover"]["phase"] = "committing"  # died before any segment was deleted
        (d / "state.json").write_text(json.dumps(state))
        j = await Journal.open(d, CFG)
        assert j.failover_phase is None
    else:
        await j.commit()
    assert j.promoted_seq == target.seq and j.used_bytes() < 1024
    assert dict(j.positions) == sent  # what was received, not what is applied
    with pytest.raises(ValueError):
        j.submit_position("node-2", sent["node-2"] - 1)
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == sent
    await j.close()


async def test_untouched_journals_have_no_positions(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = await _open(d)
    await j.append_write("a", 0, b"x")
    await j.close()
    state = json.loads((d / "state.json").read_text())
    del state["positions"]  # as written before positions existed
    (d / "state.json").write_text(json.dumps(state))
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == {}
    await j.submit_position("node-1", 1)
    await j.close()
    j = await Journal.open(d, CFG)
    assert dict(j.positions) == {"node-1": 1}
    await j.close()
