"""Retention: the pure planning and status functions, and promotion keeping the PIT invariant."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from secondsite.appliance.journal import (
    HistoryLevel,
    ImagesOpenError,
    Journal,
    JournalConfig,
    RetentionPolicy,
)
from secondsite.appliance.journal.retention import SegmentUsage, history_status, plan_promotion

from .conftest import Model, assert_images, random_ops

S = 1_000_000_000


def test_plan_by_time_keeps_the_configured_history() -> None:
    seq = np.arange(10, 110, 10, dtype=np.int64)  # checkpoints at t=1..10 s
    times = np.arange(1, 11, dtype=np.int64) * S
    segs = SegmentUsage(np.zeros(0, np.int64), np.zeros(0, np.int64))
    pol = RetentionPolicy(history_seconds=4)
    i = plan_promotion(
        now_ns=11 * S,
        policy=pol,
        cp_seq=seq,
        cp_time_ns=times,
        segments=segs,
        used_bytes=0,
        promoted_seq=0,
    )
    assert i is not None and times[i] < 7 * S and times[i + 1] >= 7 * S  # newest before now-4s
    capped = plan_promotion(
        now_ns=11 * S,
        policy=pol,
        cp_seq=seq,
        cp_time_ns=times,
        segments=segs,
        used_bytes=0,
        promoted_seq=0,
        max_seq=35,
    )
    assert capped == 2  # open images pin seq 35: checkpoint at seq 30 at most
    assert (
        plan_promotion(
            now_ns=11 * S,
            policy=pol,
            cp_seq=seq,
            cp_time_ns=times,
            segments=segs,
            used_bytes=0,
            promoted_seq=int(seq[i]),
        )
        is None
    )


def test_plan_by_size_frees_whole_segments() -> None:
    seq = np.array([5, 15, 25, 35], dtype=np.int64)
    times = np.array([100, 101, 102, 103], dtype=np.int64) * S
    segs = SegmentUsage(np.array([9, 19, 29], np.int64), np.array([100, 100, 100], np.int64))
    pol = RetentionPolicy(history_seconds=10**6, hard_limit_bytes=350, size_low_water=0.8)
    # used 400 > 350; goal 280: drop the first two segments (last seqs 9, 19) -> cp seq 25.
    i = plan_promotion(
        now_ns=104 * S,
        policy=pol,
        cp_seq=seq,
        cp_time_ns=times,
        segments=segs,
        used_bytes=400,
        promoted_seq=0,
    )
    assert i == 2


def test_history_status_levels() -> None:
    pol = RetentionPolicy(history_seconds=100, hard_limit_bytes=1000, warning_percent=80)
    ok = history_status(
        now_ns=1000 * S, created_ns=0, policy=pol, oldest_cp_time_ns=895 * S, used_bytes=10
    )
    assert ok.history_met and ok.level is HistoryLevel.OK
    warn = history_status(
        now_ns=1000 * S, created_ns=0, policy=pol, oldest_cp_time_ns=920 * S, used_bytes=10
    )
    assert not warn.history_met and warn.level is HistoryLevel.WARNING
    err = history_status(
        now_ns=1000 * S, created_ns=0, policy=pol, oldest_cp_time_ns=950 * S, used_bytes=10
    )
    assert err.level is HistoryLevel.ERROR
    young = history_status(
        now_ns=1000 * S, created_ns=990 * S, policy=pol, oldest_cp_time_ns=990 * S, used_bytes=10
    )
    assert young.history_met and young.history_seconds_expected == 10
    full = history_status(
        now_ns=1000 * S, created_ns=0, policy=pol, oldest_cp_time_ns=800 * S, used_bytes=850
    )
    assert full.history_met and full.level is HistoryLevel.WARNING and full.used_percent == 85


async def test_hard_limit_promotes_and_keeps_images(tmp_path: Path) -> None:
    pol = RetentionPolicy(history_seconds=10**6, hard_limit_bytes=200 << 10)
    cfg = JournalConfig(segment_size=32 << 10, retention=pol)
    j = await Journal.open(tmp_path / "j", cfg)
    sizes = {"a": 96 << 10, "b": 50_000}
    for v, n in sizes.items():
        await j.add_volume(v, n)
    model = Model(sizes)
    rng = random.Random(7)
    cps = []
    for _ in range(12):
        cps += await random_ops(j, model, rng, 25, cp_every=5)
        await j.enforce_retention()
    st = j.status()
    assert j.used_bytes() <= 200 << 10 or st.promoted_seq > 0
    assert st.promoted_seq > 0
    oldest = st.oldest_checkpoint
    assert oldest is not None and oldest.seq == st.promoted_seq
    kept = [c for c in cps if c.seq >= st.promoted_seq]
    assert kept and len(kept) < len(cps)
    await assert_images(j, model, kept)
    # The replica alone is the image at the promoted checkpoint.
    replica = (tmp_path / "j" / "replicas" / "a.img").read_bytes()
    assert replica == model.at_checkpoint[oldest.id]["a"]
    # The history is far below the configured one: reported.
    assert not st.retention.history_met or st.retention.history_seconds_expected < 1
    await j.close()
    j = await Journal.open(tmp_path / "j", cfg)
    assert j.checkpoints.oldest() == oldest
    await assert_images(j, model, kept)
    await j.close()


async def test_open_image_pins_its_checkpoint(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j", JournalConfig(segment_size=16 << 10))
    await j.add_volume("a", 64 << 10)
    model = Model({"a": 64 << 10})
    cps = await random_ops(j, model, random.Random(3), 40, cp_every=4)
    img = await j.open_image("a", cps[1])
    with pytest.raises(ImagesOpenError):
        await j.promote(cps[5])
    await j.promote(cps[1])  # up to the pinned checkpoint is fine
    # Records the image uses were promoted (some segments deleted): it reads the replica.
    assert await img.read(0, 64 << 10) == model.at_checkpoint[cps[1].id]["a"]
    img.close()
    await j.promote(cps[5])
    await assert_images(j, model, cps[5:])
    st = j.status(now_ns=time.time_ns())
    assert st.oldest_checkpoint == cps[5]
    await j.close()


async def test_latest_view_stays_right_across_promotion(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j", JournalConfig(segment_size=16 << 10))
    await j.add_volume("a", 64 << 10)
    model = Model({"a": 64 << 10})
    rng = random.Random(9)
    cps = await random_ops(j, model, rng, 30, cp_every=5)
    latest = await j.open_latest("a")
    assert await latest.read(0, 64 << 10) == model.data["a"]
    more = await random_ops(j, model, rng, 30, cp_every=5)
    # The latest view pins what it has shown, so promote to at most that...
    await j.promote(cps[-1])
    assert await latest.read(0, 64 << 10) == model.data["a"]  # ...rebuilds after the drop
    await j.promote(more[-1])  # the read above moved its pin forward
    await random_ops(j, model, rng, 10, cp_every=5)
    assert await latest.read(0, 64 << 10) == model.data["a"]
    latest.close()
    await j.close()
