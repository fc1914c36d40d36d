"""The protected side in one process, against a real stream receiver with an in-memory sink: what a
full buffer does to a mirror target (backpressure, then EIO) and to an in-path volume (bitmap
sync, then convergence once the link is back)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from secondsite.appliance.capture import InPathExport, MirrorTargetExport
from secondsite.appliance.config import InitialSync, ProtectedVpgSpec, VolumeSpec
from secondsite.appliance.nbd.export import NBDError
from secondsite.appliance.protected import ProtectedVpg
from secondsite.appliance.stream import (
    BandwidthLimiter,
    MemorySink,
    ReceiverSettings,
    SenderSettings,
    StreamReceiver,
)
from secondsite.appliance.vpg import SyncState

KiB = 1024
MiB = 1024 * KiB
FAST = SenderSettings(backoff_min=0.02, backoff_max=0.1, peer_timeout=2.0, heartbeat_interval=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.sink = MemorySink()
        self.receiver: StreamReceiver | None = None
        self.vpgs: list[ProtectedVpg] = []

    async def link_up(self) -> None:
        self.receiver = StreamReceiver(
            lambda vpg: self.sink if vpg == "db" else None,
            ReceiverSettings(idle_timeout=2.0, heartbeat_interval=0.2),
        )
        await self.receiver.listen("127.0.0.1", self.port)

    async def vpg(
        self, volumes: list[VolumeSpec], *, initial_sync: str = "full", **kw: float
    ) -> ProtectedVpg:
        spec = ProtectedVpgSpec(
            vpg="db",
            recovery=f"127.0.0.1:{self.port}",
            directory=self.tmp / "state",
            buffer_bytes="1Mi",
            initial_sync=InitialSync(initial_sync),
        )
        pvpg = ProtectedVpg(
            spec, volumes, source="prot-a", tls=None, limiter=BandwidthLimiter(None),
            settings=FAST, **kw,
        )  # fmt: skip
        await pvpg.start()
        self.vpgs.append(pvpg)
        return pvpg

    async def close(self) -> None:
        for pvpg in self.vpgs:
            await pvpg.stop()
        if self.receiver is not None:
            await self.receiver.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        await asyncio.wait_for(r.close(), 30)


async def until(check: object, timeout: float = 10.0) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_mirror_target_backpressure_then_eio(rig: Rig) -> None:
    mirror = VolumeSpec(name="m0", vpg="db", capture="mirrorTarget", size="4Mi")
    pvpg = await rig.vpg([mirror], backpressure_seconds=0.3)
    export = pvpg.volumes["m0"].export
    assert isinstance(export, MirrorTargetExport)
    block = b"m" * (128 * KiB)
    # The link is down: records stay in the 1 MiB buffer until it is full.
    for i in range(7):
        await export.write(i * len(block), block, fua=False)
    with pytest.raises(NBDError) as info:
        await export.write(7 * len(block), block, fua=False)
    assert info.value.errno_code == errno.EIO
    assert pvpg.volumes["m0"].state is SyncState.NOT_SYNCED
    assert "new full mirror" in pvpg.volumes["m0"].reason
    with pytest.raises(NBDError, match="keeps no copy"):
        await export.read(0, 4096)

    # A write waiting for room completes once the link is up and acknowledgements free it.
    pvpg.backpressure_seconds = 10.0
    waiting = asyncio.create_task(export.write(8 * len(block), block, fua=False))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await rig.link_up()
    await asyncio.wait_for(waiting, 10)
    await until(lambda: pvpg.buffer.count == 0)
    image = rig.sink.state.images["m0"]
    assert image[: 7 * len(block)] == block * 7
    assert image[8 * len(block) : 9 * len(block)] == block


async def test_in_path_overflow_falls_back_to_bitmap_sync_and_converges(
    rig: Rig, tmp_path: Path
) -> None:
    backing = tmp_path / "d0.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    disk = VolumeSpec(name="d0", vpg="db", backing=backing)
    await rig.link_up()
    pvpg = await rig.vpg([disk])
    await until(lambda: pvpg.volumes["d0"].synced)  # initial sync of an empty volume
    assert pvpg.state == "Protected" and pvpg.consistent
    await rig.receiver.close()  # type: ignore[union-attr]
    await until(lambda: pvpg.state == "Disconnected")

    export = pvpg.volumes["d0"].export
    assert isinstance(export, InPathExport)
    for i in range(24):  # 3 MiB into a 1 MiB buffer: the buffer spills, the volume falls back
        await export.write(i * 256 * KiB, bytes([i + 1]) * (256 * KiB), fua=False)
    vol = pvpg.volumes["d0"]
    assert vol.state is SyncState.BITMAP_SYNC and not pvpg.consistent
    assert pvpg.spills >= 1
    status = pvpg.status()
    assert status["volumes"]["d0"]["dirtyBytes"] > 0
    assert status["rpoSeconds"] > 0

    await rig.link_up()
    await until(lambda: vol.synced, 20)
    assert pvpg.state == "Protected"
    assert bytes(rig.sink.state.images["d0"]) == backing.read_bytes()
    progress = vol.progress
    assert progress is not None and progress.finished is not None and progress.percent == 100.0


async def test_recovery_side_that_lost_its_journal_gets_a_delta_sync(
    rig: Rig, tmp_path: Path
) -> None:
    backing = tmp_path / "d0.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    disk = VolumeSpec(name="d0", vpg="db", backing=backing)
    await rig.link_up()
    pvpg = await rig.vpg([disk])
    await until(lambda: pvpg.volumes["d0"].synced)
    export = pvpg.volumes["d0"].export
    await export.write(MiB, b"k" * (64 * KiB), fua=False)
    await until(lambda: pvpg.buffer.count == 0)
    await pvpg.stop()
    rig.vpgs.remove(pvpg)

    # The recovery side comes back empty (its journal was recreated): its position is 0, below
    # what it had acknowledged. A clean restart alone would trust the volume; the gap does not.
    assert rig.receiver is not None
    await rig.receiver.close()
    rig.sink = MemorySink()
    await rig.link_up()
    pvpg = await rig.vpg([disk])
    vol = pvpg.volumes["d0"]
    await until(lambda: vol.progress is not None and vol.synced, 10)
    assert vol.progress is not None and "lost records" in vol.progress.reason
    assert bytes(rig.sink.state.images["d0"]) == backing.read_bytes()
    # Every block compared; only the one write the empty recovery side lacks was shipped.
    assert vol.progress.done_bytes == 4 * MiB and vol.progress.changed_bytes == 64 * KiB


async def crash(pvpg: ProtectedVpg) -> None:
    """Stop like a killed process: nothing flushed, drained or recorded as a clean stop."""
    await pvpg.tasks.cancel_all()
    assert pvpg.sender is not None
    await pvpg.sender.close()
    pvpg._close_volumes()


async def test_unclean_stop_resyncs_only_the_regions_in_flight(rig: Rig, tmp_path: Path) -> None:
    backing = tmp_path / "d0.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    disk = VolumeSpec(name="d0", vpg="db", backing=backing)
    await rig.link_up()
    pvpg = await rig.vpg([disk])
    vol = pvpg.volumes["d0"]
    await until(lambda: vol.synced)
    export = pvpg.volumes["d0"].export
    await export.write(0, b"a" * (256 * KiB), fua=False)  # shipped and acknowledged: swept
    await until(lambda: pvpg.buffer.count == 0)
    pvpg._sweep()
    assert rig.receiver is not None
    await rig.receiver.close()  # the link goes down; two more writes stay in the buffer
    await export.write(5 * MiB, b"b" * (64 * KiB), fua=False)
    await export.write(9 * MiB + 4096, b"c" * 4096, fua=False)
    await crash(pvpg)
    rig.vpgs.remove(pvpg)

    await rig.link_up()
    pvpg = await rig.vpg([disk])
    vol = pvpg.volumes["d0"]
    assert vol.state is SyncState.DELTA_SYNC
    assert vol.progress is not None and vol.progress.total_bytes == 2 * MiB
    assert "delta sync of 2 MiB" in vol.reason
    await until(lambda: vol.synced, 30)
    assert bytes(rig.sink.state.images["d0"]) == backing.read_bytes()
    # Compared with the recovery side's checksums: only the two writes it missed were shipped.
    assert vol.progress.done_bytes == 2 * MiB
    assert vol.progress.changed_bytes == 64 * KiB + 4 * KiB
    # Once synced and acknowledged, the regions leave the intent map again.
    await until(lambda: pvpg.buffer.count == 0)
    intent = pvpg._sides["d0"].intent
    assert intent is not None and intent.set_regions == 2
    pvpg._sweep()
    assert intent.set_regions == 0


async def test_a_delta_sync_stopped_midway_goes_on_where_it_stood(rig: Rig, tmp_path: Path) -> None:
    backing = tmp_path / "d0.img"
    backing.write_bytes(os.urandom(32 * MiB))
    disk = VolumeSpec(name="d0", vpg="db", backing=backing)
    rig.sink = MemorySink(commit_delay=0.05)  # acks come slowly: the sync takes seconds
    await rig.link_up()
    pvpg = await rig.vpg([disk], initial_sync="delta")
    vol = pvpg.volumes["d0"]
    assert vol.state is SyncState.DELTA_SYNC and "initialSync: delta" in vol.reason
    await until(lambda: vol.progress is not None and vol.progress.done_bytes >= 8 * MiB, 20)
    await pvpg.stop()  # clean: what was shipped is acknowledged, its regions swept
    rig.vpgs.remove(pvpg)
    assert vol.progress is not None
    compared = vol.progress.done_bytes
    assert compared < 32 * MiB, "the sync finished before the stop: the test shows nothing"

    pvpg = await rig.vpg([disk], initial_sync="delta")
    vol = pvpg.volumes["d0"]
    assert vol.state is SyncState.DELTA_SYNC and "stopped with changes not shipped" in vol.reason
    assert vol.progress is not None and vol.progress.total_bytes == 32 * MiB - compared
    await until(lambda: vol.synced, 30)
    assert bytes(rig.sink.state.images["d0"]) == backing.read_bytes()
