"""Replication under faults, with a write load on the protected appliance all along:

- the link is cut (connections reset, then refused) and stalled (nothing passes, nothing closes);
- the recovery appliance is killed with SIGKILL and restarted;
- the protected appliance is killed with SIGKILL and restarted;
- the protected buffer is too small for the load, so in-path volumes fall back to bitmap sync.

Each time the replica converges to the source (`qemu-img compare` of the backing files against
the recovery side's latest images), which is what "no acknowledged write is lost" means for
in-path volumes (the backing file holds every acknowledged write), and the RPO comes back under
the alert level.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from replication_harness import (
    MiB,
    Node,
    Pki,
    Writer,
    eventually,
    free_port,
    protected_node,
    recovery_node,
    requires_peers,
    wait_identical,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream"))
from stream_harness import FaultProxy

from secondsite.appliance.journal import Journal, JournalConfig

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(300)]

VPG = "db"
VOLUMES = {"vol0": 48 * MiB, "vol1": 16 * MiB}
RPO_ALERT = 5.0


def backing(workdir: Path) -> dict[str, Path]:
    return {v: workdir / f"{v}.img" for v in VOLUMES}


async def rpo_back(recovery: Node, protected: Node, timeout: float = 30) -> float:
    """Wait until both sides report the VPG Protected with an RPO under the alert."""

    async def ok() -> float | None:
        rec = await recovery.vpg_status(VPG)
        prot = await protected.protected_status(VPG)
        fine = (
            rec.state == "Protected"
            and prot.state == "Protected"
            and rec.rpo_seconds is not None
            and rec.rpo_seconds < RPO_ALERT
            and prot.rpo_seconds < RPO_ALERT
            and rec.newest_checkpoint is not None
            and rec.newest_checkpoint.consistent
        )
        return rec.rpo_seconds if fine else None

    rpo: float = await eventually(ok, timeout, "RPO back under the alert")
    return rpo


async def start_pair(
    workdir: Path, pki: Pki, nodes: list[Node], interval: float = 0.5
) -> tuple[Node, Node, int]:
    port = free_port()
    recovery = recovery_node(
        workdir, pki, port, VPG, ["prot-a"], checkpointIntervalSeconds=interval
    )
    prot = protected_node(workdir, pki, "prot-a", port, VPG, VOLUMES)
    nodes += [recovery, prot]
    recovery.start()
    prot.start()
    await wait_identical(backing(workdir), recovery, timeout=30)
    return recovery, prot, port


async def test_link_cut_and_stalled_under_load(workdir: Path, pki: Pki, nodes: list[Node]) -> None:
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    nodes.append(recovery)
    recovery.start()
    proxy = FaultProxy(("127.0.0.1", port))
    _, proxy_port = await proxy.start()
    try:
        prot = protected_node(
            workdir, pki, "prot-a", port, VPG, VOLUMES, recovery=f"127.0.0.1:{proxy_port}"
        )
        nodes.append(prot)
        prot.start()
        await wait_identical(backing(workdir), recovery, timeout=30)
        writer = Writer(prot, VOLUMES, depth=2, pause=0.002)
        writer.start()
        await asyncio.sleep(1.5)

        # Cut: reset every connection and refuse new ones for a while; writes go on.
        proxy.refuse = True
        assert proxy.drop() >= 1
        before = writer.acked
        await eventually(
            lambda: _state(prot, "Disconnected"), 15, "the protected side to notice the cut"
        )
        await asyncio.sleep(2.0)
        assert writer.acked > before, "writes stopped while the link was down"
        rec = await recovery.vpg_status(VPG)
        assert rec.state == "Disconnected" and "prot-a" in rec.reason
        proxy.refuse = False

        # Stall: nothing passes either way and nothing is closed (the sender's peer timeout
        # has to find out), then traffic flows again.
        await eventually(lambda: _state(prot, "Protected"), 30, "reconnection after the cut")
        proxy.stall()
        await asyncio.sleep(7.0)
        prot_status = await prot.protected_status(VPG)
        assert prot_status.rpo_seconds > 3, "the RPO should grow while nothing gets through"
        proxy.resume()

        await writer.stop()
        took = await wait_identical(backing(workdir), recovery, timeout=60)
        rpo = await rpo_back(recovery, prot)
        print(
            f"[link faults] acked={writer.acked} MiB={writer.acked_bytes / MiB:.0f} "
            f"converged_after_load_s={took:.1f} rpo_s={rpo:.2f} "
            f"sessions={prot_status.stream.sessions}"
        )
        prot.stop()
        recovery.stop()
    finally:
        await proxy.close()


async def test_recovery_appliance_killed_under_load(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    recovery, prot, _ = await start_pair(workdir, pki, nodes)
    writer = Writer(prot, VOLUMES, depth=2, pause=0.002)
    writer.start()
    await asyncio.sleep(2.0)
    before = await recovery.vpg_status(VPG)
    assert before.replication is not None
    recovery.kill()
    killed_at = time.time()
    await asyncio.sleep(2.0)
    recovery.start()
    await asyncio.sleep(2.0)
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=60)
    rpo = await rpo_back(recovery, prot)

    rec = await recovery.vpg_status(VPG)
    assert rec.newest_checkpoint is not None
    assert rec.newest_checkpoint.time.timestamp() > killed_at, "checkpoints did not resume"
    assert rec.replication is not None
    source = rec.replication.sources["prot-a"]
    prot_status = await prot.protected_status(VPG)
    # The stream resumed where the journal's durable position said; everything the protected
    # side appended is durable over there, exactly once by position.
    assert prot_status.buffer.records == 0
    assert source.position == prot_status.stream.durable_seq
    assert prot_status.stream.sessions >= 2
    welcomed = [
        int(line.split("position=")[1].split()[0])
        for line in prot.log(2000).splitlines()
        if "event=welcomed" in line
    ]
    assert len(welcomed) >= 2 and welcomed == sorted(welcomed), welcomed
    prot.stop()
    recovery.stop()

    # Offline: the positions the journal keeps are the ones it welcomed the sender at.
    journal = await Journal.open(workdir / "recovery" / "journal", JournalConfig(vpg=VPG))
    try:
        assert journal.positions["prot-a"] == source.position
    finally:
        await journal.close()
    print(
        f"[recovery kill] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f} "
        f"welcomed_at={welcomed}"
    )


async def test_protected_appliance_killed_under_load(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    # Checkpoints every 0.1 s: some land during the resync (a fraction of a second here).
    recovery, prot, _ = await start_pair(workdir, pki, nodes, interval=0.1)
    writer = Writer(prot, VOLUMES, depth=2, pause=0.002)
    writer.start()
    await asyncio.sleep(2.0)
    prot.kill()
    await asyncio.sleep(0.5)
    prot.start()
    prot.wait_log("state=DeltaSync", timeout=20)
    await asyncio.sleep(2.0)
    await writer.stop()
    assert writer.reconnects >= 1
    took = await wait_identical(backing(workdir), recovery, timeout=60)
    rpo = await rpo_back(recovery, prot)
    status = await prot.protected_status(VPG)
    assert {v.state for v in status.volumes.values()} == {"Protected"}
    async with recovery.client() as c:
        page = await c.list_checkpoints(VPG, limit=1000)
    assert any(not cp.consistent for cp in page.checkpoints), (
        "checkpoints during the resync should be marked not consistent"
    )
    resync = [
        line.split("reason=", 1)[1]
        for line in prot.log(4000).splitlines()
        if "event=sync-start state=DeltaSync" in line
    ]
    assert resync and "regions with changes in flight" in resync[-1], resync
    print(
        f"[protected kill] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f} "
        f"resync={resync[-1]}"
    )
    prot.stop()
    recovery.stop()


async def test_tiny_buffer_falls_back_to_bitmap_sync(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    # A slow link (2 MB/s) against a faster workload: the 1 MiB buffer overflows at once.
    prot = protected_node(
        workdir,
        pki,
        "prot-a",
        port,
        VPG,
        VOLUMES,
        bufferBytes="1Mi",
        appliance={"bandwidthLimit": "2M"},
    )
    nodes += [recovery, prot]
    recovery.start()
    prot.start()
    await wait_identical(backing(workdir), recovery, timeout=60)
    writer = Writer(prot, VOLUMES, depth=2, pause=0.001, region=8 * MiB)
    writer.start()
    status = await eventually(lambda: _state(prot, "BitmapSync"), 20, "bitmap sync")
    assert status.buffer.spills >= 1
    assert any((v.dirty_bytes or 0) > 0 for v in status.volumes.values())
    await asyncio.sleep(3.0)
    rec = await recovery.vpg_status(VPG)
    assert rec.state == "BitmapSync" and not rec.consistent, rec
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=120)
    rpo = await rpo_back(recovery, prot, timeout=60)
    async with recovery.client() as c:
        page = await c.list_checkpoints(VPG, limit=1000)
    flags = [cp.consistent for cp in reversed(page.checkpoints)]
    assert False in flags and flags[-1], "not-consistent checkpoints, then consistent ones"
    print(
        f"[bitmap sync] acked={writer.acked} MiB={writer.acked_bytes / MiB:.0f} "
        f"spills={status.buffer.spills} converged_s={took:.1f} rpo_s={rpo:.2f} "
        f"inconsistent_checkpoints={flags.count(False)}"
    )
    prot.stop()
    recovery.stop()


async def _state(node: Node, state: str) -> object:
    st = await node.protected_status(VPG)
    return st if st.state == state else None
