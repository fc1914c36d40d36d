"""PIT images equal a bytearray model replayed to their checkpoint, for any alignment."""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secondsite.appliance.journal import Journal, JournalConfig, PitImage

from .conftest import Model, assert_images, random_ops

SIZES = {"a": 64 << 10, "b": 40_000}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 60), cp_every=st.integers(1, 12))
def test_images_match_the_model_before_and_after_reopen(
    seed: int, count: int, cp_every: int
) -> None:
    async def scenario(d: Path) -> None:
        cfg = JournalConfig(segment_size=48 << 10)
        j = await Journal.open(d, cfg)
        for v, n in SIZES.items():
            await j.add_volume(v, n)
        model = Model(dict(SIZES))
        cps = await random_ops(j, model, random.Random(seed), count, cp_every)
        await assert_images(j, model, cps)
        await j.close()
        j = await Journal.open(d, cfg)
        await assert_images(j, model, cps)
        await j.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(Path(d)))


async def test_unaligned_reads_of_unaligned_writes(journal: Journal) -> None:
    model = Model({"a": 1 << 20, "b": 300_000})
    await journal.append_write("a", 100, b"A" * 5000)
    model.write("a", 100, b"A" * 5000)
    await journal.append_write("a", 4095, b"B" * 2)
    model.write("a", 4095, b"B" * 2)
    await journal.append_zero("a", 1000, 513)
    model.zero("a", 1000, 513)
    cp = await journal.checkpoint()
    model.checkpoint(cp)
    img = await journal.open_image("a", cp)
    rng = random.Random(5)
    for _ in range(200):
        off = rng.randrange(0, 12000)
        n = rng.randrange(0, 9000)
        assert await img.read(off, n) == model.data["a"][off : off + n]
    img.close()


async def test_scratch_overlay_takes_writes_and_is_dropped(journal: Journal) -> None:
    await journal.append_write("a", 0, b"1" * 8192)
    cp = await journal.checkpoint()
    img = await journal.open_image("a", cp, writable=True)
    expect = bytearray(b"1" * 8192 + bytes(8192))
    await img.write(4000, b"2" * 300)  # straddles a grain boundary: read-modify-write
    expect[4000:4300] = b"2" * 300
    await img.write_zeroes(0, 100)
    expect[0:100] = bytes(100)
    await img.trim(8192, 4096)
    expect[8192:12288] = bytes(4096)
    await img.write(12288, b"3" * 4096)
    expect[12288:16384] = b"3" * 4096
    assert await img.read(0, 16384) == bytes(expect)
    assert await img.read(3990, 20) == bytes(expect[3990:4010])
    # Replication goes on meanwhile and does not show through the frozen image.
    await journal.append_write("a", 4100, b"9" * 50)
    assert await img.read(0, 16384) == bytes(expect)
    img.close()
    # Neither the replica nor the journal saw the scratch writes.
    again = await journal.open_image("a", cp)
    assert await again.read(0, 16384) == b"1" * 8192 + bytes(8192)
    again.close()
    replica = journal.volumes()[0].replica_path.read_bytes()
    assert replica == bytes(1 << 20)


async def test_read_only_image_refuses_writes_and_bounds(journal: Journal) -> None:
    cp = await journal.checkpoint()
    img: PitImage = await journal.open_image("b", cp)
    with pytest.raises(PermissionError):
        await img.write(0, b"x")
    from secondsite.appliance.journal import OutOfRangeError

    with pytest.raises(OutOfRangeError):
        await img.read(299_999, 2)
    img.close()


async def test_latest_view_follows_appends(journal: Journal) -> None:
    latest = await journal.open_latest("b")
    assert await latest.read(0, 10) == bytes(10)
    await journal.append_write("b", 2, b"abc")
    assert await latest.read(0, 6) == b"\0\0abc\0"
    for i in range(50):
        await journal.append_write("b", 3 + i, bytes([65 + i % 26]))
    assert await latest.read(2, 4) == b"aABC"
    await journal.append_trim("b", 0, 300_000)
    assert await latest.read(0, 100) == bytes(100)
    latest.close()
