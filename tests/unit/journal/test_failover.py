"""promote_to() + commit() / rollback(), including a crash in between."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from secondsite.appliance.journal import (
    FailoverStateError,
    ImagesOpenError,
    Journal,
    JournalConfig,
)

from .conftest import Model, assert_images, random_ops

SIZES = {"a": 80 << 10, "b": 30_000}
CFG = JournalConfig(segment_size=24 << 10)


async def _setup(d: Path) -> tuple[Journal, Model, list]:  # type: ignore[type-arg]
    j = await Journal.open(d, CFG)
    for v, n in SIZES.items():
        await j.add_volume(v, n)
    model = Model(dict(SIZES))
    cps = await random_ops(j, model, random.Random(11), 80, cp_every=8)
    return j, model, cps


def _replica(d: Path, vol: str) -> bytes:
    return (d / "replicas" / f"{vol}.img").read_bytes()


async def test_promote_to_then_rollback_keeps_every_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, model, cps = await _setup(d)
    await j.promote(cps[1])
    before = {v: _replica(d, v) for v in SIZES}
    target = cps[5]
    img = await j.open_image("a", target)
    with pytest.raises(ImagesOpenError):
        await j.promote_to(target)
    img.close()
    await j.promote_to(target)
    assert j.failover_phase == "promoted"
    for v in SIZES:
        assert _replica(d, v) == model.at_checkpoint[target.id][v]
    with pytest.raises(FailoverStateError):
        await j.append_write("a", 0, b"x")
    with pytest.raises(FailoverStateError):
        await j.open_image("a", target)
    await j.rollback()
    assert j.failover_phase is None
    assert {v: _replica(d, v) for v in SIZES} == before
    await assert_images(j, model, cps[1:])
    seq = await j.append_write("a", 0, b"after")  # appends resume
    assert seq == j.durable_seq
    await j.close()


async def test_promote_to_then_commit_drops_later_entries(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, model, cps = await _setup(d)
    target = cps[4]
    next_seq = j.next_seq
    await j.promote_to(target)
    await j.commit()
    for v in SIZES:
        assert _replica(d, v) == model.at_checkpoint[target.id][v]
    assert j.checkpoints.newest() == target and j.checkpoints.oldest() == target
    assert j.used_bytes() < 1024 and j.promoted_seq == target.seq
    assert not (d / "failover.undo").exists()
    # Sequence numbers never go back, and the journal works on from the committed state.
    seq = await j.append_write("b", 5, b"new")
    assert seq >= next_seq
    model.data = {v: bytearray(model.at_checkpoint[target.id][v]) for v in SIZES}
    model.write("b", 5, b"new")
    cp = await j.checkpoint()
    model.checkpoint(cp)
    await j.close()
    j = await Journal.open(d, CFG)
    await assert_images(j, model, [target, cp])
    await j.close()


async def test_failover_phase_survives_reopen_and_rollback_still_works(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, model, cps = await _setup(d)
    before = {v: _replica(d, v) for v in SIZES}
    await j.promote_to(cps[3])
    await j.close()
    j = await Journal.open(d, CFG)
    assert j.failover_phase == "promoted"
    await j.rollback()
    assert {v: _replica(d, v) for v in SIZES} == before
    await assert_images(j, model, cps)
    await j.close()


async def test_crash_while_promoting_is_rolled_back_at_open(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, model, cps = await _setup(d)
    before = {v: _replica(d, v) for v in SIZES}
    await j.promote_to(cps[6])
    await j.close()
    # Pretend the process died before promote_to() returned.
    import json

    state = json.loads((d / "state.json").read_text())
    state["failover"]["phase"] = "promoting"
    (d / "state.json").write_text(json.dumps(state))
    j = await Journal.open(d, CFG)
    assert j.failover_phase is None
    assert {v: _replica(d, v) for v in SIZES} == before
    await assert_images(j, model, cps)
    await j.close()


async def test_workload_writes_after_promote_to_are_undone_by_rollback(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, model, cps = await _setup(d)
    before = {v: _replica(d, v) for v in SIZES}
    target = cps[6]
    await j.promote_to(target)
    fv = j.failover_volume("a")
    await fv.write(100, b"W" * 5000)  # unaligned, two grains
    await fv.write_zeroes(40960, 8192)
    await fv.write(200, b"V" * 10)  # grain already saved: no second undo entry needed
    await fv.flush()
    expect = bytearray(model.at_checkpoint[target.id]["a"])
    expect[100:5100] = b"W" * 5000
    expect[40960:49152] = bytes(8192)
    expect[200:210] = b"V" * 10
    assert await fv.read(0, SIZES["a"]) == bytes(expect)
    assert _replica(d, "a") == bytes(expect)
    await j.close()  # e.g. the appliance restarts before the decision
    j = await Journal.open(d, CFG)
    fv = j.failover_volume("a")
    await fv.write(0, b"X" * 4096)
    await j.rollback()
    assert {v: _replica(d, v) for v in SIZES} == before
    await assert_images(j, model, cps)
    with pytest.raises(FailoverStateError):
        j.failover_volume("a")
    await j.close()


async def test_workload_writes_are_kept_by_commit(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j, _model, cps = await _setup(d)
    await j.promote_to(cps[2])
    fv = j.failover_volume("b")
    await fv.write(0, b"kept")
    await j.commit()
    assert _replica(d, "b")[:4] == b"kept"
    assert not (d / "failover.undo").exists()
    from secondsite.appliance.journal import JournalClosedError

    with pytest.raises(JournalClosedError):
        await fv.write(0, b"late")
    await j.close()
