"""A VPG replicated from a protected appliance to a recovery appliance over mutual TLS on loopback:
initial sync, live writes, checkpoints and status on both sides, and a sender with a certificate
the recovery appliance does not trust."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from replication_harness import (
    MiB,
    Node,
    Pki,
    Writer,
    eventually,
    free_port,
    journal_spec,
    protected_node,
    qemu_io,
    recovery_node,
    requires_peers,
    wait_identical,
)

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.control import ConflictError

pytestmark = [pytest.mark.qemu, requires_peers, pytest.mark.timeout(180)]

VPG = "db"
VOLUMES = {"vol0": 64 * MiB, "vol1": 32 * MiB}


async def test_writes_through_the_protected_export_reach_the_recovery_side(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    protected = protected_node(workdir, pki, "prot-a", port, VPG, VOLUMES)
    sources = {v: workdir / f"{v}.img" for v in VOLUMES}
    # Data that was there before protection started: the initial sync must bring it over.
    qemu_io(str(sources["vol0"]), "write -P 0x5a 3M 5M", "write -P 0x11 60M 1M")
    qemu_io(str(sources["vol1"]), "write -P 0x22 0 64k")
    nodes += [recovery, protected]
    recovery.start()
    protected.start()

    took = await wait_identical(sources, recovery, timeout=30)
    print(f"[initial sync] converged in {took:.2f} s")

    status = await eventually(
        lambda: _protected_when(protected, "Protected"), 20, "protected side Protected"
    )
    assert status.connected and status.consistent
    assert {v.state for v in status.volumes.values()} == {"Protected"}

    # Live writes (qemu-io through the protected appliance's in-path exports), then the replica.
    await asyncio.to_thread(
        qemu_io,
        protected.uri("vol0"),
        "write -P 0xab 1M 4M",
        "write -z 4M 64k",
        "discard 10M 1M",
        "write -P 0xcd 63M 1M",
    )
    await asyncio.to_thread(qemu_io, protected.uri("vol1"), "write -P 0xef 5M 3M")
    took = await wait_identical(sources, recovery, timeout=10)
    print(f"[live writes] converged in {took:.2f} s")

    rec = await eventually(lambda: _recovery_when(recovery, "Protected"), 20, "recovery Protected")
    assert rec.consistent and rec.replication is not None
    source = rec.replication.sources["prot-a"]
    assert source.connected and source.consistent and source.position > 0
    assert sorted(source.volumes) == sorted(VOLUMES)
    assert rec.newest_checkpoint is not None and rec.newest_checkpoint.consistent
    assert rec.rpo_seconds is not None and rec.rpo_seconds < 3
    assert rec.hold_ms and rec.hold_ms["p99_ms"] < 1000
    status = await protected.protected_status(VPG)
    assert status.rpo_seconds < 3 and status.buffer.used_bytes == 0
    assert status.stream.sessions == 1 and status.stream.durable_seq > 0
    # Each change shipped so far (initial sync and live writes) waited some time to be durable.
    lat = status.ack_latency_ms
    assert lat["count"] >= 5 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] < 30_000
    async with protected.client() as c:
        whole = await c.status()
    assert whole.name == "prot-a" and whole.vpgs == {}
    assert whole.protected[VPG].state == "Protected"
    assert whole.protected[VPG].volumes["vol0"].dirty_bytes == 0

    # A clean stop of both; the protected side comes back without a resync.
    protected.stop()
    recovery.stop()
    recovery.start()
    protected.start()
    status = await eventually(
        lambda: _protected_when(protected, "Protected"), 20, "protected side Protected again"
    )
    assert "sync-start" not in protected.log().rpartition("--- start 1")[2]
    await wait_identical(sources, recovery, timeout=10)
    protected.stop()
    recovery.stop()


async def test_sender_with_a_foreign_certificate_is_refused(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    """An appliance whose certificate another CA signed, claiming to be a source of the VPG, is
    refused at the TLS handshake (and logged); the recovery appliance goes on serving the good
    one."""
    port = free_port()
    recovery = recovery_node(workdir, pki, port, VPG, ["prot-a"])
    good = protected_node(workdir, pki, "prot-a", port, VPG, {"vol0": 16 * MiB})
    intruder_dir = workdir / "intruder-side"
    intruder_dir.mkdir()
    intruder = protected_node(
        intruder_dir, pki, "prot-a", port, VPG, {"vol0": 16 * MiB}, tls_name="intruder"
    )
    nodes += [recovery, good, intruder]
    recovery.start()
    good.start()
    intruder.start()
    writer = Writer(good, {"vol0": 16 * MiB}, depth=2, pause=0.005)
    writer.start()
    await asyncio.sleep(2.0)

    recovery.wait_log("event=tls-refused", timeout=20)
    status = await intruder.protected_status(VPG)
    assert status.state == "Disconnected" and not status.connected
    assert status.stream.connect_failures >= 1 and status.stream.sessions == 0
    assert "not connected to" in status.reason

    await writer.stop()
    assert writer.acked > 0
    await wait_identical({"vol0": workdir / "vol0.img"}, recovery, timeout=20)
    async with recovery.client() as c:
        st = await c.status()
    assert st.stream_rejected >= 1 and st.stream_connections == 1
    rec = st.vpgs[VPG]
    assert rec.replication is not None and rec.replication.sources["prot-a"].connected
    intruder.stop()
    good.stop()
    recovery.stop()
    assert "Traceback" not in recovery.log(400)


async def _protected_when(node: Node, state: str) -> object:
    st = await node.protected_status(VPG)
    return st if st.state == state else None


async def _recovery_when(node: Node, state: str) -> object:
    st = await node.vpg_status(VPG)
    return st if st.state == state else None


async def test_replication_configured_live_through_the_control_api(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    """Both appliances start with listen addresses only; `PUT /v1/config` adds the recovery
    journal and the protected VPG live, refuses what needs a restart, changes the bandwidth limit
    live, and removes the protected VPG again. `/metrics` shows the stream on both sides."""
    port = free_port()
    recovery = Node(
        workdir,
        "recovery",
        {"listen": {"stream": f"127.0.0.1:{port}"}, "streamTls": pki.tls("recovery")},
    )
    protected = Node(workdir, "prot-a", {"streamTls": pki.tls("prot-a")})
    nodes += [recovery, protected]
    recovery.start()
    protected.start()
    journal = journal_spec(workdir / "journal", VPG, ["prot-a"])
    volume = workdir / "vol0.img"
    with open(volume, "wb") as f:
        f.truncate(16 * MiB)
    prot_vpg = {"vpg": VPG, "recovery": f"127.0.0.1:{port}", "directory": str(workdir / "ps")}
    vol = {"name": "vol0", "vpg": VPG, "backing": str(volume)}

    async with recovery.client() as rc, protected.client() as pc:
        result = await rc.put_config(
            ApplianceConfig.model_validate({**recovery.raw, "journals": [journal]})
        )
        assert [(c.kind, c.name, str(c.action)) for c in result.changes] == [("vpg", VPG, "added")]
        desired = {**protected.raw, "protected": [prot_vpg], "volumes": [vol]}
        result = await pc.put_config(ApplianceConfig.model_validate(desired))
        assert [(c.kind, c.name, str(c.action)) for c in result.changes] == [
            ("protected", VPG, "added"),
            ("volume", "vol0", "added"),
        ]
        await asyncio.to_thread(qemu_io, protected.uri("vol0"), "write -P 0x77 1M 2M")
        await wait_identical({"vol0": volume}, recovery, timeout=20)

        bigger = {**desired, "protected": [{**prot_vpg, "bufferBytes": "1Gi"}]}
        with pytest.raises(ConflictError) as info:
            await pc.put_config(ApplianceConfig.model_validate(bigger))
        assert info.value.details[0]["path"] == f"protected.{VPG}.bufferBytes"
        assert "remove it and add it again" in info.value.details[0]["message"]

        limited = {**desired, "bandwidthLimit": "100M"}
        result = await pc.put_config(ApplianceConfig.model_validate(limited))
        assert [(c.kind, c.name) for c in result.changes] == [("appliance", "bandwidthLimit")]

        prot_metrics = await pc.metrics()
        assert f'secondsite_replication_connected{{vpg="{VPG}"}} 1.0' in prot_metrics
        assert 'secondsite_volume_in_sync{volume="vol0",vpg="db"} 1.0' in prot_metrics
        rec_metrics = await rc.metrics()
        assert 'secondsite_replication_source_connected{source="prot-a",vpg="db"} 1.0' in (
            rec_metrics
        )

        result = await pc.put_config(
            ApplianceConfig.model_validate({**protected.raw, "bandwidthLimit": "100M"})
        )
        assert [(c.kind, c.name, str(c.action)) for c in result.changes] == [
            ("protected", VPG, "removed"),
            ("volume", "vol0", "removed"),
        ]
        rec = await eventually(
            lambda: _recovery_when(recovery, "Disconnected"), 30, "the source to go away"
        )
        assert "prot-a" in rec.reason
    protected.stop()
    recovery.stop()
