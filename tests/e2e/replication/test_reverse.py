"""Reverse protection and failback between two real appliance processes over mutual TLS.

P protects an in-path disk to R. After writes, R fails over (promote to a checkpoint, commit) and
both appliances reverse: R serves the recovered disk (its former replica) and streams it back to
P, whose former backing file is now the replica of a journal. Writes through R's export reach P's
journal. Then the failback: promote and commit on P, reverse both again, and the original
direction works with P's original backing file. Every acknowledged write is kept throughout: the
disks are compared with `qemu-img compare` at each step.
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

from secondsite.appliance.control import ConflictError, ServerError

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(300)]

VPG = "db"
SIZE = 64 * MiB


def same_files(a: Path, b: Path) -> tuple[bool, str]:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


async def fail_over(node: Node, tag: str) -> int:
    """Tag a checkpoint (after every write acknowledged so far), promote to it and commit."""
    async with node.client() as c:
        cp = await c.take_checkpoint(VPG, tag=tag)
        promoted = await c.promote(VPG, f"tag:{tag}")
        assert promoted.phase == "promoted" and promoted.checkpoint is not None
        assert promoted.checkpoint.id == cp.id
        await c.commit(VPG)
    return cp.id


async def wait_streaming(protected: Node, recovery: Node) -> None:
    async def protected_ok() -> bool:
        st = await protected.protected_status(VPG)
        return st.state == "Protected" and st.connected

    async def recovery_ok() -> bool:
        return (await recovery.vpg_status(VPG)).state == "Protected"

    await eventually(protected_ok, 60, f"{protected.name} protecting {VPG}")
    await eventually(recovery_ok, 60, f"{recovery.name} journaling {VPG} consistently")


async def test_reverse_protection_and_failback(workdir: Path, pki: Pki, nodes: list[Node]) -> None:
    r_port, p_port = free_port(), free_port()
    r = recovery_node(workdir, pki, r_port, VPG, ["prot-a"])
    p = protected_node(
        workdir,
        pki,
        "prot-a",
        r_port,
        VPG,
        {"disk": SIZE},
        appliance={"listen": {"stream": f"127.0.0.1:{p_port}"}},
    )
    p_disk = workdir / "disk.img"
    r_journal, p_state = workdir / "recovery" / "journal", workdir / "prot-a" / "state"
    r_disk = r_journal / "replicas" / "disk.img"
    nodes += [r, p]
    r.start()
    p.start()

    # 1. P protects the disk to R under random writes (bounded: a few seconds).
    writer = Writer(p, {"disk": SIZE}, seed=7, depth=4)
    writer.start()
    await asyncio.sleep(3)
    await writer.stop()
    assert writer.acked > 0
    await wait_identical({"disk": p_disk}, r, timeout=60)
    await wait_streaming(p, r)

    # 2. Live failover on R. Reversing before the commit is refused, and changes nothing.
    async with r.client() as c:
        await c.take_checkpoint(VPG, tag="before-failover")
        await c.promote(VPG, "tag:before-failover")
        with pytest.raises(ConflictError) as info:
            await c.reverse(VPG, peer="prot-a", peer_stream=f"127.0.0.1:{p_port}")
        assert info.value.code == "cannot-reverse" and "not committed" in info.value.message
        await c.rollback(VPG)
    await fail_over(r, "failover")
    same, why = same_files(p_disk, r_disk)
    assert same, f"R's recovered disk lost acknowledged writes: {why}"
    # The committed failover is the journal's: a restart of R in between does not lose it.
    r.stop()
    r.start()

    # 3. Reverse both: P first (its workload has moved), then R. A journal that cannot open
    #    undoes the switch: P protects the VPG again, as before.
    blocker = workdir / "not-a-directory"
    blocker.write_text("")
    async with p.client() as c:
        with pytest.raises(ServerError) as failed:
            await c.reverse(VPG, peer="recovery", directory=blocker / "journal")
        assert failed.value.code == "apply-failed" and "restarted as before" in failed.value.message
        assert [e.vpg for e in (await c.get_config()).protected] == [VPG]
        assert (await c.protected_status(VPG)).volumes.keys() == {"disk"}
        result = await c.reverse(VPG, peer="recovery")
    assert result.role == "recovery"
    assert {(ch.kind, ch.action) for ch in result.changes} == {
        ("protected", "removed"),
        ("volume", "removed"),
        ("vpg", "added"),
    }
    async with r.client() as c:
        result = await c.reverse(VPG, peer="prot-a", peer_stream=f"127.0.0.1:{p_port}")
        config = await c.get_config()
    assert result.role == "protected"
    assert config.journals == [] and [v.backing for v in config.volumes] == [r_disk]
    assert not (r_journal / "state.json").exists() and not (r_journal / "segments").exists()
    assert not (p_state / "capture-state.json").exists()
    await wait_streaming(r, p)

    # 4. Writes through R's new in-path export reach P's journal: P's latest image is R's disk.
    await asyncio.to_thread(
        qemu_io, r.uri("disk"), "write -P 0xa1 1M 2M", "write -z 8M 1M", "write -P 0xb2 60M 1M"
    )
    took = await wait_identical({"disk": r_disk}, p, timeout=60)
    source = (await p.vpg_status(VPG)).replication
    assert source is not None
    shipped = source.sources["recovery"].payload_bytes
    delta = (await r.protected_status(VPG)).volumes["disk"].delta_sync
    assert delta is not None and not delta.running and delta.compared_bytes == SIZE
    print(
        f"[reverse] P's latest image equals R's disk {took:.2f} s after the writes; "
        f"payload bytes shipped R -> P: {shipped} ({shipped / SIZE:.2%} of the volume), of "
        f"which delta sync {delta.shipped_bytes}"
    )
    # Delta sync: the replicas on P held the data already; only the writes on R travel.
    assert shipped < SIZE // 8

    # 5. Failback: promote and commit on P, reverse both again; the original direction works.
    await fail_over(p, "failback")
    same, why = same_files(p_disk, r_disk)
    assert same, f"P's disk after the failback is not R's: {why}"
    async with r.client() as c:
        assert (await c.reverse(VPG, peer="prot-a")).role == "recovery"
    async with p.client() as c:
        assert (await c.reverse(VPG, peer="recovery", peer_stream=f"127.0.0.1:{r_port}")).role == (
            "protected"
        )
        config = await c.get_config()
    assert [v.backing for v in config.volumes] == [p_disk]
    await wait_streaming(p, r)
    await asyncio.to_thread(qemu_io, p.uri("disk"), "write -P 0xc3 30M 3M")
    await wait_identical({"disk": p_disk}, r, timeout=60)
    back = (await r.vpg_status(VPG)).replication
    assert back is not None
    shipped = back.sources["prot-a"].payload_bytes
    print(f"[failback] payload bytes shipped P -> R: {shipped} ({shipped / SIZE:.2%})")
    assert shipped < SIZE // 8
    p.stop()
    r.stop()
