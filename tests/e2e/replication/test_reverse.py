"""Reverse protection and failback between two real appliance processes over mutual TLS.

P protects two in-path disks to R. After writes, R fails over (promote to a checkpoint, commit)
and both appliances reverse: R serves the recovered disks (its former replicas) and streams them
back to P, whose former backing files are now the replicas of a journal; a delta sync finds them
equal and ships nothing. Writes through R's exports reach P's journal. Then the failback: promote
and commit on P, reverse both again, and the original direction works with P's original backing
files. Every acknowledged write is kept throughout: the disks are compared with `qemu-img
compare` at each step.
"""

from __future__ import annotations

import asyncio
import subprocess
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
    qemu_io,
    recovery_node,
    requires_peers,
    wait_identical,
)

from secondsite.appliance.control import ConflictError, InvalidRequestError, ServerError

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(300)]

VPG = "db"
VOLUMES = {"disk": 64 * MiB, "logs": 16 * MiB}
TOTAL = sum(VOLUMES.values())
JOURNAL = {"history": "1h", "checkpointIntervalSeconds": 0.5, "segmentBytes": 16 * MiB}
"""Settings of the journals the reverses make (as the harness's recovery journal has them)."""


def same_disks(a: dict[str, Path], b: dict[str, Path], what: str) -> None:
    """`qemu-img compare` of two files per volume."""
    for volume in a:
        proc = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a[volume]), str(b[volume])],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{what}: {volume}: {proc.stdout}{proc.stderr}"


async def fail_over(node: Node, tag: str, *, tagged: bool = False) -> None:
    """Promote to the checkpoint tagged ``tag`` and commit; unless ``tagged``, tag one first
    (after every write acknowledged so far)."""
    async with node.client() as c:
        if not tagged:
            await c.take_checkpoint(VPG, tag=tag)
        cp = await c.get_checkpoint(VPG, f"tag:{tag}")
        promoted = await c.promote(VPG, f"tag:{tag}")
        assert promoted.phase == "promoted" and promoted.checkpoint is not None
        assert promoted.checkpoint.id == cp.id
        await c.commit(VPG)


def pair(workdir: Path, pki: Pki, volumes: dict[str, int]) -> tuple[Node, Node, str, str]:
    """R (recovery) and P (protected, with a stream listener for the reverse direction), and
    their stream addresses."""
    r_port, p_port = free_port(), free_port()
    r_stream, p_stream = f"127.0.0.1:{r_port}", f"127.0.0.1:{p_port}"
    r = recovery_node(workdir, pki, r_port, VPG, ["prot-a"])
    p = protected_node(
        workdir,
        pki,
        "prot-a",
        r_port,
        VPG,
        volumes,
        appliance={"listen": {"stream": p_stream}},
    )
    return r, p, r_stream, p_stream


async def wait_streaming(protected: Node, recovery: Node) -> None:
    async def protected_ok() -> bool:
        st = await protected.protected_status(VPG)
        return st.state == "Protected" and st.connected

    async def recovery_ok() -> bool:
        return (await recovery.vpg_status(VPG)).state == "Protected"

    await eventually(protected_ok, 60, f"{protected.name} protecting {VPG}")
    await eventually(recovery_ok, 60, f"{recovery.name} journaling {VPG} consistently")


async def test_reverse_protection_and_failback(workdir: Path, pki: Pki, nodes: list[Node]) -> None:
    r, p, r_stream, p_stream = pair(workdir, pki, VOLUMES)
    r_journal, p_state = workdir / "recovery" / "journal", workdir / "prot-a" / "state"
    p_disks = {v: workdir / f"{v}.img" for v in VOLUMES}
    r_disks = {v: r_journal / "replicas" / f"{v}.img" for v in VOLUMES}
    nodes += [r, p]
    r.start()
    p.start()

    # 1. P protects the disks to R under random writes (bounded: a few seconds).
    writer = Writer(p, VOLUMES, seed=7, depth=4)
    writer.start()
    await asyncio.sleep(3)
    await writer.stop()
    assert writer.acked > 0
    await wait_identical(p_disks, r, timeout=60)
    await wait_streaming(p, r)

    # 2. Live failover on R. Reversing before the commit is refused, and changes nothing.
    async with r.client() as c:
        await c.take_checkpoint(VPG, tag="before-failover")
        await c.promote(VPG, "tag:before-failover")
        with pytest.raises(ConflictError) as info:
            await c.reverse(VPG, "protected", peer="prot-a", peer_stream=p_stream)
        assert info.value.code == "cannot-reverse" and "not committed" in info.value.message
        await c.rollback(VPG)
    await fail_over(r, "failover")
    same_disks(p_disks, r_disks, "R's recovered disks lost acknowledged writes")
    # The committed failover is the journal's: a restart of R in between does not lose it.
    r.stop()
    r.start()

    # 3. Reverse both: P first (its workload has moved), then R. A journal that cannot open
    #    undoes the switch: P protects the VPG again, as before.
    blocker = workdir / "not-a-directory"
    blocker.write_text("")
    async with p.client() as c:
        with pytest.raises(ServerError) as failed:
            await c.reverse(VPG, "recovery", peer="recovery", directory=blocker / "journal")
        assert failed.value.code == "apply-failed" and "restarted as before" in failed.value.message
        assert [e.vpg for e in (await c.get_config()).protected] == [VPG]
        assert (await c.protected_status(VPG)).volumes.keys() == VOLUMES.keys()
        with pytest.raises(InvalidRequestError) as invalid:
            await c.reverse(VPG, "recovery", peer="recovery", settings={"sources": ["x"]})
        assert "sources is decided by the reverse" in invalid.value.message
        result = await c.reverse(VPG, "recovery", peer="recovery", settings=JOURNAL)
    assert result.role == "recovery"
    assert {(ch.kind, ch.action) for ch in result.changes} == {
        ("protected", "removed"),
        ("volume", "removed"),
        ("vpg", "added"),
    }
    async with r.client() as c:
        image = await c.create_image(VPG, "disk", "latest")
        with pytest.raises(ConflictError) as info:
            await c.reverse(VPG, "protected", peer="prot-a", peer_stream=p_stream)
        assert f"images {image.id} of VPG {VPG} are open" in info.value.message
        await c.delete_image(VPG, image.id)
        result = await c.reverse(VPG, "protected", peer="prot-a", peer_stream=p_stream)
        # A retried request (its answer lost) changes nothing.
        again = await c.reverse(VPG, "protected", peer="prot-a", peer_stream=p_stream)
        assert again.role == "protected" and again.changes == []
        config = await c.get_config()
    assert result.role == "protected"
    assert config.journals == [] and {v.name: v.backing for v in config.volumes} == r_disks
    assert not (r_journal / "state.json").exists() and not (r_journal / "segments").exists()
    assert not (p_state / "capture-state.json").exists()
    await wait_streaming(r, p)

    # 4. Writes through R's new in-path exports reach P's journal: P's latest images are R's
    #    disks. Delta sync: P's replicas held the data already; only the writes on R travel.
    await asyncio.to_thread(
        qemu_io, r.uri("disk"), "write -P 0xa1 1M 2M", "write -z 8M 1M", "write -P 0xb2 60M 1M"
    )
    await asyncio.to_thread(qemu_io, r.uri("logs"), "write -P 0xa2 0 512k")
    took = await wait_identical(r_disks, p, timeout=60)
    source = (await p.vpg_status(VPG)).replication
    assert source is not None
    shipped = source.sources["recovery"].payload_bytes
    volumes = (await r.protected_status(VPG)).volumes
    deltas = {v: volumes[v].delta_sync for v in VOLUMES}
    for volume, delta in deltas.items():
        assert delta is not None and not delta.running
        assert delta.compared_bytes == VOLUMES[volume] and delta.shipped_bytes == 0
    print(
        f"[reverse] P's latest images equal R's disks {took:.2f} s after the writes; "
        f"payload bytes shipped R -> P: {shipped} ({shipped / TOTAL:.2%} of the volumes; the "
        "delta sync compared every block and shipped none)"
    )
    assert shipped < TOTAL // 8

    # 5. Failback: promote and commit on P, reverse both again; the original direction works.
    await fail_over(p, "failback")
    same_disks(p_disks, r_disks, "P's disks after the failback are not R's")
    async with r.client() as c:
        assert (await c.reverse(VPG, "recovery", peer="prot-a", settings=JOURNAL)).role == (
            "recovery"
        )
    async with p.client() as c:
        result = await c.reverse(VPG, "protected", peer="recovery", peer_stream=r_stream)
        config = await c.get_config()
    assert result.role == "protected"
    assert {v.name: v.backing for v in config.volumes} == p_disks
    await wait_streaming(p, r)
    await asyncio.to_thread(qemu_io, p.uri("disk"), "write -P 0xc3 30M 3M")
    await wait_identical(p_disks, r, timeout=60)
    back = (await r.vpg_status(VPG)).replication
    assert back is not None
    shipped = back.sources["prot-a"].payload_bytes
    print(f"[failback] payload bytes shipped P -> R: {shipped} ({shipped / TOTAL:.2%})")
    assert shipped < TOTAL // 8
    p.stop()
    r.stop()


async def test_reverse_while_the_protected_site_is_down(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    """The disaster case: P dies, R fails over to a checkpoint before P's last writes and
    reverses while P is down; R's workload writes meanwhile. When P is back (with its old
    config) and reverses, the delta sync makes P's replica R's disk: P's writes after the
    failover checkpoint are replaced, R's are all there."""
    size = 32 * MiB
    r, p, _, p_stream = pair(workdir, pki, {"disk": size})
    p_disk = workdir / "disk.img"
    r_disk = workdir / "recovery" / "journal" / "replicas" / "disk.img"
    nodes += [r, p]
    r.start()
    p.start()
    await asyncio.to_thread(qemu_io, p.uri("disk"), "write -P 0x11 0 8M")
    await wait_identical({"disk": p_disk}, r, timeout=60)
    async with r.client() as c:
        await c.take_checkpoint(VPG, tag="last-good")
    # Acknowledged on P after the checkpoint R will fail over to, then P dies.
    await asyncio.to_thread(qemu_io, p.uri("disk"), "write -P 0x22 4M 1M")
    p.kill()

    await fail_over(r, "last-good", tagged=True)
    async with r.client() as c:
        assert (
            await c.reverse(VPG, "protected", peer="prot-a", peer_stream=p_stream)
        ).role == "protected"
    await asyncio.to_thread(qemu_io, r.uri("disk"), "write -P 0x33 20M 2M")
    status = await r.protected_status(VPG)
    assert not status.connected

    p.start()  # its config file still protects the VPG
    async with p.client() as c:
        assert (await c.reverse(VPG, "recovery", peer="recovery")).role == "recovery"
    await wait_streaming(r, p)
    await wait_identical({"disk": r_disk}, p, timeout=60)
    delta = (await r.protected_status(VPG)).volumes["disk"].delta_sync
    assert delta is not None and delta.compared_bytes == size
    # What differed: P's 1 MiB written after the checkpoint, only. R's 2 MiB write waited in
    # R's buffer and goes first on the new stream; a checksum request is answered only once
    # the records sent before it are durable, so the comparison finds R's write already there.
    assert delta.shipped_bytes == 1 * MiB, delta
    print(f"[disaster] delta sync shipped {delta.shipped_bytes} bytes of {size}")
    r.stop()
    p.stop()
