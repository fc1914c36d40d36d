"""The scenario the replication fault tests share: a VPG of two in-path volumes replicated from
prot-a to a recovery appliance, a write load on prot-a, and the checks after a fault: the
replica converges to the source (`qemu-img compare` of the backing files against the recovery
side's latest images: for in-path volumes the backing file holds every acknowledged write) and
the RPO comes back under the alert."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from replication_harness import (
    MiB,
    Node,
    Pki,
    Writer,
    eventually,
    free_port,
    protected_node,
    recovery_node,
    wait_identical,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream"))
from stream_harness import FaultProxy

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


async def start_load(prot: Node, pause: float = 0.002, settle: float = 2.0) -> Writer:
    """The write load on ``prot``, running for ``settle`` seconds already."""
    writer = Writer(prot, VOLUMES, depth=2, pause=pause)
    writer.start()
    await asyncio.sleep(settle)
    return writer


async def converge_after_restart(
    workdir: Path, recovery: Node, prot: Node, writer: Writer
) -> tuple[float, float]:
    """After an unclean restart of ``prot``: it resyncs, the load goes on for a while and stops;
    then the replica converges and the RPO comes back. Returns the seconds to converge after the
    load and the RPO."""
    prot.wait_log("state=DeltaSync", timeout=20)
    await asyncio.sleep(2.0)
    await writer.stop()
    assert writer.reconnects >= 1
    took = await wait_identical(backing(workdir), recovery, timeout=90)
    return took, await rpo_back(recovery, prot)


async def start_pair(
    workdir: Path,
    pki: Pki | None,
    nodes: list[Node],
    interval: float = 0.5,
    via: FaultProxy | None = None,
    *,
    host: str = "127.0.0.1",
    control: str = "127.0.0.1:0",
    prefix: Sequence[str] = (),
) -> tuple[Node, Node, int]:
    """A recovery and a protected appliance (plain TCP without a ``pki``), the stream through
    the proxy ``via`` if given, once the initial sync is done. The recovery appliance listens on
    ``host`` (stream) and ``control``, and runs through the command ``prefix``."""
    port = free_port()
    recovery = recovery_node(
        workdir, pki, port, VPG, ["prot-a"],
        host=host, listen={"control": control}, checkpointIntervalSeconds=interval,
    )  # fmt: skip
    recovery.prefix = list(prefix)
    target = f"{host}:{port}"
    if via is not None:
        via.upstream = (host, port)
        _, proxy_port = await via.start()
        target = f"127.0.0.1:{proxy_port}"
    prot = protected_node(workdir, pki, "prot-a", port, VPG, VOLUMES, recovery=target)
    nodes += [recovery, prot]
    recovery.start()
    prot.start()
    await wait_identical(backing(workdir), recovery, timeout=30)
    return recovery, prot, port


async def protected_state(node: Node, state: str) -> object:
    """The protected side's status of the VPG if it is in ``state``, else None."""
    st = await node.protected_status(VPG)
    return st if st.state == state else None
