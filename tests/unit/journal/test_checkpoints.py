"""The checkpoint table: queries, and persistence through the segment records and sidecars."""

from __future__ import annotations

import time
from pathlib import Path

from secondsite.appliance.journal import Journal, JournalConfig


async def test_checkpoint_queries_survive_reopen(tmp_path: Path) -> None:
    cfg = JournalConfig(segment_size=16 << 10)
    j = await Journal.open(tmp_path / "j", cfg)
    await j.add_volume("a", 1 << 20)
    made = []
    for i in range(30):
        await j.append_write("a", i * 1000, b"q" * 1000)
        tag = "nightly" if i % 10 == 0 else None
        made.append(await j.checkpoint(tag=tag, consistent=i % 7 != 3))
        time.sleep(0.001)
    await j.close()

    for _ in range(2):  # the second open reads the sidecars written at the first
        j = await Journal.open(tmp_path / "j", cfg)
        t = j.checkpoints
        assert t.oldest() == made[0] and t.newest() == made[-1] and len(t) == 30
        assert [c.id for c in t.by_tag("nightly")] == [made[0].id, made[10].id, made[20].id]
        assert t.by_id(made[5].id) == made[5]
        assert not t.by_id(made[3].id).consistent  # type: ignore[union-attr]
        mid = t.between(made[10].time_ns, made[19].time_ns)
        assert mid == made[10:20]
        assert t.latest_at_or_before(made[12].time_ns + 1) == made[12]
        assert t.latest_at_or_before(made[0].time_ns - 1) is None
        await j.close()
