"""Delta sync by block checksums between real appliance processes (mutual TLS on loopback): a
replica that differs from its source in scattered blocks converges after a force sync, shipping
about what differs; writes during the sync are kept; a stream cut in the middle resumes; and an
initial sync with `initialSync: delta` over a replica that holds an older copy ships only the
difference; so does the resync after an unclean stop across a reboot of the node."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from replication_harness import (
    KiB,
    MiB,
    Node,
    Pki,
    Writer,
    eventually,
    free_port,
    identical,
    protected_node,
    recovery_node,
    requires_peers,
    wait_identical,
)

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control import ConflictError, NotFoundError
from secondsite.appliance.control.models import DeltaSyncStatus, ProtectedVpgStatus

pytestmark = [pytest.mark.qemu, requires_peers, pytest.mark.timeout(240)]

VPG = "db"


def fill(path: Path, size: int, seed: int) -> None:
    """Random data over the whole file (incompressible, no holes), 1 MiB at a time."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for offset in range(0, size, MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))


def scatter(path: Path, size: int, blocks: int, seed: int, block: int = 4 * KiB) -> int:
    """Overwrite ``blocks`` distinct random aligned blocks; returns the bytes changed."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for index in rng.sample(range(size // block), blocks):
            f.seek(index * block)
            f.write(rng.randbytes(block))
        f.flush()
        os.fsync(f.fileno())
    return blocks * block


async def state(node: Node) -> ProtectedVpgStatus:
    return await node.protected_status(VPG)


async def delta_done(node: Node, volume: str) -> DeltaSyncStatus | None:
    """The volume's finished delta sync once the VPG is Protected again, else None."""
    st = await state(node)
    delta = st.volumes[volume].delta_sync
    if st.state != "Protected" or delta is None or delta.running:
        return None
    return delta


async def start_synced(
    workdir: Path, pki: Pki, nodes: list[Node], size: int, **protected: object
) -> tuple[Node, Node, Path]:
    """A recovery and a protected appliance with one in-path volume ``vol0`` of random data,
    initially synced in full."""
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    prot = protected_node(workdir, pki, "prot-a", port, VPG, {"vol0": size}, **protected)
    source = workdir / "vol0.img"
    fill(source, size, seed=7)
    nodes += [recovery, prot]
    recovery.start()
    prot.start()
    await wait_identical({"vol0": source}, recovery, timeout=60)
    await eventually(lambda: _protected(prot), 30, "Protected after the initial sync")
    return recovery, prot, source


async def _protected(node: Node) -> bool:
    return (await state(node)).state == "Protected"


async def diverge(prot: Node, recovery: Node, source: Path, size: int, blocks: int) -> int:
    """Change ``blocks`` scattered blocks of the source behind the appliance's back (stopped
    cleanly, so it restarts trusting the replica); returns the bytes changed."""
    prot.stop()
    changed = scatter(source, size, blocks, seed=11)
    prot.start()
    await eventually(lambda: _protected(prot), 30, "Protected after a clean restart")
    same, _ = await asyncio.to_thread(identical, source, recovery, "vol0")
    assert not same, "the replica should differ from the changed source before the force sync"
    return changed


async def test_force_sync_ships_only_the_blocks_that_differ(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    size = 64 * MiB
    recovery, prot, source = await start_synced(workdir, pki, nodes, size)
    changed = await diverge(prot, recovery, source, size, blocks=40)
    sent_before = (await state(prot)).stream.payload_bytes_sent

    async with prot.client() as c:
        started = await c.force_sync(VPG)
    assert started.volumes["vol0"].state == "DeltaSync"
    assert started.volumes["vol0"].delta_sync is not None
    delta = await eventually(lambda: delta_done(prot, "vol0"), 60, "delta sync done")
    await wait_identical({"vol0": source}, recovery, timeout=30)

    sent = (await state(prot)).stream.payload_bytes_sent - sent_before
    print(
        f"[force sync] changed={changed} shipped={delta.shipped_bytes} payload_sent={sent} "
        f"compared={delta.compared_bytes}"
    )
    assert delta.compared_bytes == size
    assert changed <= delta.shipped_bytes <= 2 * changed
    assert sent <= 2 * changed
    assert "force sync" in delta.reason


async def test_force_sync_refusals(workdir: Path, pki: Pki, nodes: list[Node]) -> None:
    """404 for a VPG not protected here; 409 for one with nothing to delta-sync here (mirror
    targets only: their source is QEMU's)."""
    port = free_port()
    mirror = {"name": "m0", "vpg": VPG, "capture": "mirrorTarget", "size": "4Mi"}
    prot = protected_node(workdir, pki, "prot-a", port, VPG, {}, appliance={"volumes": [mirror]})
    nodes.append(prot)
    prot.start()
    async with prot.client() as c:
        with pytest.raises(NotFoundError):
            await c.force_sync("other")
        with pytest.raises(ConflictError) as info:
            await c.force_sync(VPG)
    assert info.value.code == "nothing-to-sync" and "mirror" in info.value.message


async def test_writes_during_a_delta_sync_are_kept(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    size = 128 * MiB
    recovery, prot, source = await start_synced(workdir, pki, nodes, size)
    await diverge(prot, recovery, source, size, blocks=2000)

    writer = Writer(prot, {"vol0": size}, depth=4, pause=0.002)
    writer.start()
    await asyncio.sleep(0.3)
    async with prot.client() as c:
        await c.force_sync(VPG)
    acked_at_start = writer.acked
    # The writes go on for the whole delta sync, and some time after.
    delta = await eventually(lambda: delta_done(prot, "vol0"), 90, "delta sync done")
    acked_during = writer.acked - acked_at_start
    await asyncio.sleep(0.3)
    await writer.stop()
    await wait_identical({"vol0": source}, recovery, timeout=60)
    print(f"[writes during delta] acked={writer.acked} during={acked_during} {delta}")
    assert acked_during > 0 and delta.compared_bytes == size


async def test_a_stream_cut_during_delta_sync_resumes_and_converges(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    size = 128 * MiB
    recovery, prot, source = await start_synced(workdir, pki, nodes, size, bufferBytes="8Mi")
    changed = await diverge(prot, recovery, source, size, blocks=8000)
    # A bandwidth limit (set live) makes shipping the differing 31 MiB last a few seconds.
    async with prot.client() as c:
        await c.put_config(ApplianceConfig.model_validate({**prot.raw, "bandwidthLimit": "8Mi"}))
        await c.force_sync(VPG)
    forced = time.time()
    await eventually(lambda: _shipping(prot), 20, "the delta sync shipping differing blocks")
    recovery.kill()
    await asyncio.sleep(0.5)
    recovery.start()
    delta = await eventually(lambda: delta_done(prot, "vol0"), 120, "delta sync done")
    done = time.time()
    await wait_identical({"vol0": source}, recovery, timeout=60)
    st = await state(prot)
    log = prot.log(4000).rpartition("--- start")[2]
    welcomed = [line for line in log.splitlines() if "event=welcomed" in line]
    print(
        f"[cut during delta] changed={changed} shipped={delta.shipped_bytes} "
        f"sessions={st.stream.sessions}"
    )
    # The sync went on over a second connection, from where it stood: the volume was compared
    # once, and what differed was shipped about once.
    assert st.stream.sessions == 2 and len(welcomed) == 2
    assert delta.compared_bytes == size
    assert changed <= delta.shipped_bytes <= 2 * changed
    # Checkpoints cut while the sync ran say they are not consistent; after it, they are.
    await asyncio.sleep(1.5)
    async with recovery.client() as c:
        during = await c.list_checkpoints(VPG, since=forced, until=done - 0.5, limit=1000)
        after = await c.list_checkpoints(VPG, since=done + 1.0, limit=1000)
    assert during.checkpoints and not any(cp.consistent for cp in during.checkpoints)
    assert after.checkpoints and all(cp.consistent for cp in after.checkpoints)


async def _shipping(node: Node) -> bool:
    delta = (await state(node)).volumes["vol0"].delta_sync
    return delta is not None and delta.running and delta.shipped_bytes > 0


async def test_initial_delta_sync_over_an_older_copy_ships_the_difference(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    size = 64 * MiB
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    prot = protected_node(workdir, pki, "prot-a", port, VPG, {"vol0": size}, initialSync="delta")
    source = workdir / "vol0.img"
    fill(source, size, seed=3)
    # The recovery side's replica holds an older copy of the volume (as after a failover, when
    # protection is reversed): the source then moved on in scattered blocks.
    replica = workdir / "recovery" / "journal" / "replicas" / "vol0.img"
    replica.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, replica)
    changed = scatter(source, size, blocks=64, seed=5)
    nodes += [recovery, prot]
    recovery.start()
    prot.start()

    delta = await eventually(lambda: delta_done(prot, "vol0"), 60, "initial delta sync done")
    await wait_identical({"vol0": source}, recovery, timeout=30)
    print(f"[initial delta] changed={changed} shipped={delta.shipped_bytes}")
    assert "initialSync: delta" in delta.reason
    assert delta.compared_bytes == size
    assert changed <= delta.shipped_bytes <= 2 * changed
    st = await state(prot)
    assert st.stream.payload_bytes_sent <= 2 * changed


async def test_unclean_stop_across_a_reboot_delta_syncs_the_whole_volume(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    """A protected appliance killed under load, and restarted as if the node had rebooted (its
    intent map may be stale): every block is compared, only what differs is shipped."""
    size = 64 * MiB
    recovery, prot, source = await start_synced(workdir, pki, nodes, size)
    writer = Writer(prot, {"vol0": size}, depth=2, pause=0.002)
    writer.start()
    await asyncio.sleep(1.5)
    prot.kill()
    state_file = workdir / "prot-a" / "state" / "capture-state.json"
    saved = json.loads(state_file.read_text())
    assert saved["cleanShutdown"] is False
    state_file.write_text(json.dumps({**saved, "bootId": "another-boot"}))
    prot.start()
    await writer.stop()
    delta = await eventually(lambda: delta_done(prot, "vol0"), 60, "delta sync done")
    await wait_identical({"vol0": source}, recovery, timeout=30)
    print(f"[reboot] acked={writer.acked} shipped={delta.shipped_bytes} {delta.reason}")
    assert "across a restart of the node" in delta.reason
    assert delta.compared_bytes == size
    # The writes in flight at the kill, and those while it restarted, at most: not the volume.
    assert delta.shipped_bytes < size // 4
