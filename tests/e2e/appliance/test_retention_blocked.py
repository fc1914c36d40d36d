"""An open PIT image that keeps retention from promoting is reported, not hidden.

An appliance journals one in-path volume with a hard limit of 4 MiB. A client opens the image of
the oldest checkpoint over NBD (it pins that checkpoint) and writes three times the limit. The
VPG's status (the control API's model) and `/metrics` must then say that promotion is blocked, and
at which seq, besides the space written ahead of the records; once the image is closed, retention
promotes and the report clears.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_harness import ApplianceThread, MiB, connect_and_go, requires_peers

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control.metrics import ApplianceMetrics
from secondsite.appliance.control.models import VpgStatus

pytestmark = [pytest.mark.qemu, requires_peers]

VPG = "pinned"
VOLUME = "vol0"
HARD_LIMIT = 4 * MiB
WAIT = 20.0
"""At most, for each state to show (retention runs every 2 s)."""


def config(workdir: Path) -> ApplianceConfig:
    backing = workdir / f"{VOLUME}.img"
    backing.touch()
    os.truncate(backing, 16 * MiB)
    return ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(workdir / "app.sock")},
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "journal"),
                    "history": "1h",
                    "hardLimit": str(HARD_LIMIT),
                    "segmentBytes": MiB,
                    "checkpointIntervalSeconds": 1,
                }
            ],
            "volumes": [{"name": VOLUME, "vpg": VPG, "backing": str(backing)}],
        }
    )


def metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{vpg="{VPG}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


async def test_an_open_image_that_blocks_promotion_is_reported(
    workdir: Path, cleanup: list[Callable[[], object]]
) -> None:
    appliance = ApplianceThread(config(workdir))
    cleanup.append(appliance.stop)
    appliance.start()
    await asyncio.to_thread(appliance.wait_consistent, VPG)
    assert appliance.appliance is not None
    metrics = ApplianceMetrics(appliance.appliance)
    vpg = appliance.vpg(VPG)
    socket = str(workdir / "app.sock")

    async def status() -> tuple[VpgStatus, bytes]:
        st = VpgStatus.model_validate(await appliance.async_sync(vpg.status))
        return st, await appliance.async_sync(metrics.exposition)

    async def until(what: str, ok: Callable[[VpgStatus], bool]) -> tuple[VpgStatus, str]:
        deadline = time.monotonic() + WAIT
        while True:
            st, text = await status()
            if ok(st):
                return st, text.decode()
            assert time.monotonic() < deadline, f"{what}: {st.journal}"
            await asyncio.sleep(0.1)

    first, _ = await until("a checkpoint", lambda s: s.oldest_checkpoint is not None)
    assert first.oldest_checkpoint is not None
    pinned = first.oldest_checkpoint
    image, _ = await connect_and_go(socket, f"pit/{VOLUME}@{pinned.id}")
    writer, _ = await connect_and_go(socket, VOLUME)
    try:
        block = os.urandom(64 * 1024)
        for i in range(3 * HARD_LIMIT // len(block)):
            await writer.write((i * len(block)) % (16 * MiB), block)
        blocked, text = await until(
            "promotion blocked", lambda s: s.journal.promotion_blocked_at_seq is not None
        )
        assert blocked.journal.promotion_blocked_at_seq == pinned.seq
        assert blocked.journal.used_bytes > HARD_LIMIT
        assert blocked.oldest_checkpoint is not None and blocked.oldest_checkpoint.id == pinned.id
        assert metric(text, "secondsite_journal_promotion_blocked") == 1.0
        _, text = await until("space written ahead", lambda s: s.journal.prepared_bytes > 0)
        assert metric(text, "secondsite_journal_prepared_bytes") > 0
    finally:
        await image.disconnect()
        await image.close()
        await writer.disconnect()
        await writer.close()
    freed, text = await until(
        "promotion after the image closed",
        lambda s: s.journal.promotion_blocked_at_seq is None and s.promoted_seq > pinned.seq,
    )
    assert freed.journal.used_bytes <= HARD_LIMIT
    assert metric(text, "secondsite_journal_promotion_blocked") == 0.0
    appliance.stop()
    assert not appliance.errors.messages()
