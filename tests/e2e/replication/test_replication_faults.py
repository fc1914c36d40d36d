"""Replication under faults, with a write load on the protected appliance all along:

- the link is cut (connections reset, then refused), delayed (30 ms a chunk each way) and
  stalled (nothing passes, nothing closes);
- the recovery appliance is killed with SIGKILL and restarted;
- the protected appliance is killed with SIGKILL and restarted;
- both appliances are killed with SIGKILL at once and restarted;
- a byte of the stream is flipped in flight, over plain TCP (the frame CRC catches it) and over
  TLS (its record MAC does);
- the protected buffer is too small for the load, so in-path volumes fall back to bitmap sync;
- intruders: an appliance of the site claiming another's name, peers speaking garbage to the
  stream listener and to both control APIs, requests with a wrong or no token.

Each time the replica converges to the source (`qemu-img compare` of the backing files against
the recovery side's latest images), which is what "no acknowledged write is lost" means for
in-path volumes (the backing file holds every acknowledged write), and the RPO comes back under
the alert level.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from replication_harness import (
    TOKEN,
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "control"))
from control_harness import exchange
from fault_scenario import (
    VOLUMES,
    VPG,
    backing,
    converge_after_restart,
    protected_state,
    rpo_back,
    start_load,
    start_pair,
)
from stream_harness import FaultProxy

from secondsite.appliance.control import ControlClient, UnauthorizedError
from secondsite.appliance.journal import Journal, JournalConfig
from secondsite.appliance.stream import client_context
from secondsite.appliance.stream import frames as f

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(300)]


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
            lambda: protected_state(prot, "Disconnected"),
            15,
            "the protected side to notice the cut",
        )
        await asyncio.sleep(2.0)
        assert writer.acked > before, "writes stopped while the link was down"
        rec = await recovery.vpg_status(VPG)
        assert rec.state == "Disconnected" and "prot-a" in rec.reason
        proxy.refuse = False

        await eventually(
            lambda: protected_state(prot, "Protected"), 30, "reconnection after the cut"
        )

        # Delay: every chunk waits 30 ms each way. The stream goes on over the same connection
        # (slower, but no timeout fires) and what is acked keeps moving.
        proxy.delay = 0.03
        slow = await prot.protected_status(VPG)
        await asyncio.sleep(3.0)
        delayed = await prot.protected_status(VPG)
        assert delayed.stream.sessions == slow.stream.sessions, "a delay is not a disconnect"
        assert delayed.stream.durable_seq > slow.stream.durable_seq
        proxy.delay = 0.0

        # Stall: nothing passes either way and nothing is closed (the sender's peer timeout
        # has to find out), then traffic flows again.
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
    writer = await start_load(prot)
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
    writer = await start_load(prot)
    prot.kill()
    await asyncio.sleep(0.5)
    prot.start()
    took, rpo = await converge_after_restart(workdir, recovery, prot, writer)
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
    status = await eventually(lambda: protected_state(prot, "BitmapSync"), 20, "bitmap sync")
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


async def test_both_appliances_killed_at_once_under_load(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    recovery, prot, _ = await start_pair(workdir, pki, nodes)
    writer = await start_load(prot)
    # Checkpoints listed a second before the crash are in the journal's files by then; keep one
    # image (vol1 at an older checkpoint) to compare with after the restart.
    async with recovery.client() as c:
        before = (await c.list_checkpoints(VPG, limit=1000)).checkpoints
    kept = next(cp for cp in before if cp.consistent and cp is not before[0])
    saved = workdir / "vol1-at-checkpoint.img"
    await asyncio.to_thread(
        subprocess.run,
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", recovery.uri(f"pit/vol1@{kept.id}"),
         str(saved)],
        check=True, timeout=60,
    )  # fmt: skip
    await asyncio.sleep(1.0)
    for node in (prot, recovery):
        assert node.proc is not None
        node.proc.kill()  # SIGKILL to both before waiting for either
    for node in (prot, recovery):
        node.kill()
    crashed_at = time.time()
    await asyncio.sleep(1.0)
    recovery.start()
    prot.start()
    took, rpo = await converge_after_restart(workdir, recovery, prot, writer)

    async with recovery.client() as c:
        after = {cp.id: cp for cp in (await c.list_checkpoints(VPG, limit=1000)).checkpoints}
    lost = [cp.id for cp in before if after.get(cp.id) != cp]
    assert not lost, f"checkpoints from before the crash lost or changed: {lost}"
    newest = max(after.values(), key=lambda cp: cp.id)
    assert newest.time.timestamp() > crashed_at and newest.consistent
    same, out = identical(saved, recovery, "vol1", str(kept.id))
    assert same, f"checkpoint {kept.id} changed across the crash: {out}"
    prot_status = await prot.protected_status(VPG)
    assert prot_status.buffer.records == 0
    print(
        f"[both killed] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f} "
        f"checkpoints_before={len(before)} after={len(after)}"
    )
    prot.stop()
    recovery.stop()


@pytest.mark.parametrize("transport", ["plain-tcp", "tls"])
async def test_a_byte_flipped_in_flight_is_caught_and_the_stream_resumes(
    workdir: Path, pki: Pki, nodes: list[Node], transport: str
) -> None:
    """Plain TCP: the frame's CRC catches the flipped byte; TLS: the record's MAC does. Either
    way the connection is reset, the stream resumes from the durable position and the replica
    holds the source's bytes, not the flipped one."""
    proxy = FaultProxy(("127.0.0.1", 0))
    try:
        recovery, prot, _ = await start_pair(
            workdir, pki if transport == "tls" else None, nodes, via=proxy
        )
        writer = await start_load(prot, settle=1.0)
        sessions = (await prot.protected_status(VPG)).stream.sessions
        proxy.flip_after = proxy.forwarded + 256 * KiB  # in the data frames of the load
        await eventually(
            lambda: _sessions_above(prot, sessions), 30, "a new session after the flip"
        )
        assert proxy.flipped == 1
        await asyncio.sleep(1.0)
        await writer.stop()
        took = await wait_identical(backing(workdir), recovery, timeout=60)
        rpo = await rpo_back(recovery, prot)
        caught = "CRC mismatch" if transport == "plain-tcp" else "event=connection-error"
        log = recovery.log(2000)
        assert caught in log, log
        async with recovery.client() as c:
            assert (await c.status()).stream_rejected == 1
        print(f"[flip {transport}] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f}")
        prot.stop()
        recovery.stop()
    finally:
        await proxy.close()


async def _sessions_above(node: Node, count: int) -> bool:
    return (await node.protected_status(VPG)).stream.sessions > count


async def test_intruders_are_refused_logged_and_everyone_else_served(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    """While prot-a replicates under load: an appliance of the site with prot-b's valid
    certificate claims to be prot-a; peers send garbage to the stream listener (without TLS,
    and inside a TLS session) and to both control APIs; requests come with a wrong or no
    token. Each is refused and logged; prot-a's stream is never interrupted."""
    recovery, prot, port = await start_pair(workdir, pki, nodes)
    writer = await start_load(prot, pause=0.005, settle=0)
    impostor_dir = workdir / "impostor"
    impostor_dir.mkdir()
    impostor = protected_node(
        impostor_dir, pki, "prot-a", port, VPG, {"vol0": VOLUMES["vol0"]}, tls_name="prot-b"
    )
    nodes.append(impostor)
    impostor.start()
    recovery.wait_log("not source 'prot-a'", timeout=20)
    status = await impostor.protected_status(VPG)
    assert not status.connected and status.stream.sessions == 0
    assert "REFUSED" in status.stream.last_error
    assert "names ['localhost', 'prot-b'], not source 'prot-a'" in status.stream.last_error

    # Garbage on the stream listener: not TLS at all; then a TLS session of a valid certificate
    # that sends no frames, but junk.
    assert await exchange("127.0.0.1", port, b"GET / HTTP/1.1\r\n\r\n", None) == b""
    files = pki.cert_files("prot-b")
    ctx = client_context(files.cert, files.key, files.ca)
    reply = await exchange("127.0.0.1", port, b"\x00" * 64 + b"junk" * 100, ctx)
    frames = f.decode_all(reply)
    assert len(frames) == 1 and isinstance(frames[0], f.Error), reply
    assert frames[0].code == f.ErrorCode.PROTOCOL

    # Garbage and bad tokens on both control APIs.
    for node in (recovery, prot):
        host, _, ctl_port = node.control_url.removeprefix("http://").rpartition(":")
        answer = await exchange(host, int(ctl_port), b"\x00\x01 nonsense\xff\r\n\r\n", None)
        assert answer.split(b" ", 2)[1] == b"400", answer
        async with ControlClient(node.control_url, token="wrong-token", retries=1) as c:
            with pytest.raises(UnauthorizedError):
                await c.status()
        request = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await exchange(host, int(ctl_port), request, None)
        assert answer.split(b" ", 2)[1] == b"401", answer
        assert "event=unauthorized reason=wrong-token" in node.log(4000)
        assert "event=unauthorized reason=missing-token" in node.log(4000)
        assert TOKEN not in node.log(4000)

    await asyncio.sleep(1.0)
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=30)
    rpo = await rpo_back(recovery, prot)
    prot_status = await prot.protected_status(VPG)
    assert prot_status.stream.sessions == 1, "prot-a's stream was interrupted"
    async with recovery.client() as c:
        st = await c.status()
    # The impostor (each retry), the plain-TCP peer and the junk inside TLS.
    assert st.stream_rejected >= 3 and st.stream_connections == 1
    log = recovery.log(4000)
    assert "event=tls-refused" in log and "event=protocol-error" in log
    assert "Traceback" not in log
    impostor.stop()
    print(f"[intruders] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f}")
    prot.stop()
    recovery.stop()
