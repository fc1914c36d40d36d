"""Retention under load: a journal with a small hard limit promotes, keeps the oracle, and reports
the history it could not keep.

An appliance (in-process) journals two in-path volumes with `hardLimit: 4Mi` and 1 MiB segments
while a paced dependent-write workload writes about 1 MiB/s, with checkpoints every second. While
it runs, the VPG's status is sampled and the oldest checkpoint's images are read over NBD and
checked against the oracle (an open image pins its checkpoint: promotion must wait for it, not
pull the data from under it). Afterwards every checkpoint left in the window passes the oracle.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from appliance_harness import (
    ApplianceThread,
    MiB,
    NBDClient,
    connect_and_go,
    env_seed,
    requires_peers,
)
from nbd_client import OptionFailed
from write_oracle import Verdict, Workload, check_monotonic, drive

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.journal import Journal, JournalConfig

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers]

VPG = "small"
VOLUMES = ("vol0", "vol1")
VOLUME_SIZE = MiB
HARD_LIMIT = 4 * MiB
SEGMENT = MiB
LOAD_WRITES = 4 * HARD_LIMIT // 4096
LOAD_SECONDS = 40.0
"""At most; the paced load takes about 13 s for its LOAD_WRITES here."""
PAUSE = 0.002  # between writes: about 250 writes (1 MiB) per second
RETENTION_PERIOD = 2.0  # how often the appliance enforces retention (vpg.py)
HOLD = 0.5
CHECK_EVERY = 3.1
"""The live check keeps the oldest checkpoint's images open HOLD seconds every CHECK_EVERY
(out of step with retention passes). Open images pin their checkpoint and cap promotion: held
all the time, or at every pass, they would keep the journal over its limit."""


def appliance_config(workdir: Path) -> ApplianceConfig:
    volumes = []
    for name in VOLUMES:
        backing = workdir / f"{name}.img"
        backing.touch()
        os.truncate(backing, VOLUME_SIZE)
        volumes.append({"name": name, "vpg": VPG, "backing": str(backing)})
    return ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(workdir / "app.sock")},
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "journal"),
                    "history": "1h",
                    "hardLimit": str(HARD_LIMIT),
                    "segmentBytes": SEGMENT,
                    "checkpointIntervalSeconds": 1,
                }
            ],
            "volumes": volumes,
        }
    )


async def check_oldest(
    appliance: ApplianceThread, socket: Path, workload: Workload
) -> tuple[int, Verdict] | None:
    """Open both volumes at the oldest checkpoint (both at once: they pin it), hold them a
    moment while the load goes on, read and check them. None if there is none yet, or if
    promotion took it first."""
    journal = appliance.vpg(VPG).journal
    assert journal is not None
    oldest = await appliance.async_sync(journal.checkpoints.oldest)
    if oldest is None:
        return None  # none taken yet
    clients: list[NBDClient] = []
    try:
        for name in VOLUMES:
            try:
                client, _ = await connect_and_go(str(socket), f"pit/{name}@{oldest.id}")
            except OptionFailed:
                return None  # promoted between listing and opening
            clients.append(client)
        await asyncio.sleep(HOLD)  # now and then a retention pass comes while they are open
        images = {
            name: await c.read(0, VOLUME_SIZE) for name, c in zip(VOLUMES, clients, strict=True)
        }
    finally:
        for client in clients:
            await client.disconnect()
            await client.close()
    oracle = workload.oracle()
    return oldest.id, oracle.check(images, oldest.time_ns, f"oldest checkpoint {oldest.id}")


async def test_small_hard_limit_promotes_and_keeps_the_oracle(
    workdir: Path, cleanup: list[Callable[[], object]], capsys: pytest.CaptureFixture[str]
) -> None:
    appliance = ApplianceThread(appliance_config(workdir))
    cleanup.append(appliance.stop)
    appliance.start()
    await asyncio.to_thread(appliance.wait_consistent, VPG)
    vpg = appliance.vpg(VPG)
    socket = workdir / "app.sock"
    workload = Workload(VOLUMES, seed=env_seed("RETENTION_SEED", 5))
    samples: list[dict[str, Any]] = []
    live_checks: list[tuple[int, Verdict]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(await appliance.async_sync(vpg.status))
            await asyncio.sleep(0.25)

    async def check_while_loaded() -> None:
        while not done.is_set():
            checked = await check_oldest(appliance, socket, workload)
            if checked is not None:
                live_checks.append(checked)
            await asyncio.sleep(CHECK_EVERY - HOLD)

    clients = []
    for name in VOLUMES:
        client, _ = await connect_and_go(str(socket), name)
        clients.append(client)
    tasks = [asyncio.create_task(sample()), asyncio.create_task(check_while_loaded())]
    try:
        started = time.monotonic()
        await drive(workload, clients, seconds=LOAD_SECONDS, max_writes=LOAD_WRITES, pause=PAUSE)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.disconnect()
            await client.close()
    written = sum(len(workload.data(w)) for w in workload.writes)
    # One more retention pass with the load stopped.
    await asyncio.sleep(RETENTION_PERIOD + 1)
    final = await appliance.async_sync(vpg.status)
    appliance.stop()
    assert not appliance.errors.messages()

    promoted = sorted({s["promotedSeq"] for s in samples})
    oldest_ids = [s["oldestCheckpoint"]["id"] for s in samples if s["oldestCheckpoint"]]
    used = [s["journal"]["usedBytes"] for s in samples]
    rate = written / elapsed
    journal_status = final["journal"]
    report = {
        "written_MiB": round(written / MiB, 1),
        "load_s": round(elapsed, 1),
        "limit_MiB": HARD_LIMIT / MiB,
        "max_used_MiB": round(max(used) / MiB, 2),
        "final_used_MiB": round(final["journal"]["usedBytes"] / MiB, 2),
        "promotions": len(promoted) - 1,
        "oldest_checkpoint": f"{oldest_ids[0]}->{oldest_ids[-1]}",
        "oldest_checked_under_load": len(live_checks),
        "history_s": round(journal_status["historySecondsActual"], 1),
        "level": journal_status["level"],
    }
    with capsys.disabled():
        print(f"\n[retention] {report}")
    # Between two retention passes the journal grows by the load's rate; a pass frees whole
    # segments down to 90 % of the limit.
    slack = rate * (RETENTION_PERIOD + 0.5) + 2 * SEGMENT
    assert written == LOAD_WRITES * 4096, f"only {written} bytes written in {elapsed:.0f}s"
    assert len(promoted) >= 3, f"promotedSeq took only the values {promoted}"
    assert oldest_ids[-1] > oldest_ids[0] and oldest_ids == sorted(oldest_ids)
    assert max(used) <= HARD_LIMIT + slack, f"journal used {max(used)} bytes (limit {HARD_LIMIT})"
    assert final["journal"]["usedBytes"] <= HARD_LIMIT
    assert journal_status["historyMet"] is False
    assert journal_status["level"] in ("warning", "error")
    assert any("history" in m for m in journal_status["messages"]), journal_status
    assert len(live_checks) >= 2, f"only {len(live_checks)} oldest checkpoints checked under load"

    # Every checkpoint left in the window, the promoted-to one (the replica alone) first.
    oracle = workload.oracle()
    journal = await Journal.open(workdir / "journal", JournalConfig(vpg=VPG, segment_size=SEGMENT))
    try:
        checkpoints = journal.checkpoints.between()
        assert checkpoints[0] == journal.checkpoints.floor
        verdicts: dict[int, Verdict] = {}
        for cp in checkpoints:
            images = {}
            for name in VOLUMES:
                image = await journal.open_image(name, cp.id)
                try:
                    images[name] = await image.read(0, VOLUME_SIZE)
                finally:
                    image.close()
            verdicts[cp.id] = oracle.check(images, cp.time_ns, f"checkpoint {cp.id}")
        check_monotonic(oracle, sorted({**dict(live_checks), **verdicts}.items()))
    finally:
        await journal.close()
    with capsys.disabled():
        print(f"[retention] window checkpoints verified after the run: {len(verdicts)}")
