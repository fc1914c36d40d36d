"""Replication across a real network link: the recovery appliance runs in a network namespace of
its own, and the stream crosses a veth pair that the test takes down, shapes with `tc`, and (where
the kernel has netem) delays, drops and reorders.

A second veth pair carries the recovery appliance's control API, so the test can watch it while
the stream's link is down. The recovery side's NBD socket is a unix socket in the filesystem,
reachable from every namespace. Namespaces need root: without it (or when `ip netns add` is
refused) the tests are skipped. Each namespace and link is removed at teardown whatever happened.

Each test checks what "no acked write is lost" means for in-path volumes (the recovery side's
latest images equal the protected backing files) and that the RPO comes back under the alert.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_scenario import (
    RPO_ALERT,
    VOLUMES,
    VPG,
    backing,
    protected_state,
    rpo_back,
    start_pair,
)
from replication_harness import (
    MiB,
    Node,
    Pki,
    Writer,
    eventually,
    make_pki,
    requires_peers,
    wait_identical,
)

from secondsite.appliance.control.models import VpgStatus

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(300)]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class Link:
    """The namespace and its two veth pairs, each a /30: `.1` on the host, `.2` inside."""

    ns: str
    data: str
    """Host end of the stream's veth pair."""
    control: str
    """Host end of the control API's veth pair."""
    subnet: str
    """`10.x.y`: the stream's pair is `10.x.y.0/30`, the control API's `10.x.y.4/30`."""

    @property
    def stream_host(self) -> str:
        return f"{self.subnet}.2"

    @property
    def control_host(self) -> str:
        return f"{self.subnet}.6"

    def set(self, state: str) -> None:
        """`up` or `down`: the host end of the stream's link."""
        ip("link", "set", "dev", self.data, state)

    def sent_bytes(self) -> int:
        """Bytes sent on the host end of the stream's link so far (towards the receiver)."""
        return int(Path(f"/sys/class/net/{self.data}/statistics/tx_bytes").read_text())

    def tc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A `tc qdisc` command on the host end of the stream's link (sender -> receiver)."""
        return subprocess.run(
            ["tc", "qdisc", *args[:1], "dev", self.data, *args[1:]],
            capture_output=True, text=True, timeout=30, check=check,
        )  # fmt: skip


@pytest.fixture
def link() -> Iterator[Link]:
    tag = f"{random.randrange(16**6):06x}"
    ns = f"ssrep-{tag}"
    made = ip("netns", "add", ns, check=False)
    if made.returncode != 0:
        pytest.skip(f"network namespaces unavailable (needs root): {made.stderr.strip()}")
    octet = random.randrange(64) * 4
    subnet = f"10.{random.randrange(200, 250)}.{octet}"
    link = Link(ns=ns, data=f"ssd{tag}", control=f"ssc{tag}", subnet=subnet)
    try:
        for host_end, base in ((link.data, 0), (link.control, 4)):
            inside = host_end + "n"
            ip("link", "add", host_end, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("addr", "add", f"{subnet}.{base + 1}/30", "dev", host_end)
            ip("-n", ns, "addr", "add", f"{subnet}.{base + 2}/30", "dev", inside)
            ip("link", "set", host_end, "up")
            ip("-n", ns, "link", "set", inside, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield link
    finally:
        # Deleting the namespace deletes the inside ends, and with them each pair.
        ip("netns", "del", ns, check=False)
        for host_end in (link.data, link.control):
            ip("link", "del", host_end, check=False)


async def start_across(workdir: Path, link: Link, nodes: list[Node]) -> tuple[Node, Node]:
    """The recovery appliance inside the namespace (stream and control API on its veth ends),
    the protected one outside, replicating with mutual TLS across the link; initial sync done."""
    (workdir / "pki").mkdir()
    pki: Pki = make_pki(workdir / "pki")
    # The sender checks the recovery appliance's certificate against the address it dials.
    pki.cert("recovery", "site-ca", sans=("localhost", "127.0.0.1", link.stream_host))
    recovery, prot, _ = await start_pair(
        workdir, pki, nodes,
        host=link.stream_host, control=f"{link.control_host}:0",
        prefix=["ip", "netns", "exec", link.ns],
    )  # fmt: skip
    return recovery, prot


async def _recovery_disconnected(node: Node) -> VpgStatus | None:
    st = await node.vpg_status(VPG)
    return st if st.state == "Disconnected" else None


async def test_link_down_and_up_under_load(workdir: Path, link: Link, nodes: list[Node]) -> None:
    recovery, prot = await start_across(workdir, link, nodes)
    writer = Writer(prot, VOLUMES, depth=2, pause=0.005)
    writer.start()
    await asyncio.sleep(1.5)
    link.set("down")
    before = writer.acked
    await eventually(lambda: protected_state(prot, "Disconnected"), 20, "the sender to notice")
    await asyncio.sleep(2.0)
    assert writer.acked > before, "writes stopped while the link was down"
    # The recovery appliance, watched over the other pair, hears nothing more: no reset comes
    # over a link that is down, so it drops the source after its idle timeout (10 s).
    down = await eventually(
        lambda: _recovery_disconnected(recovery), 20, "the receiver to drop the source"
    )
    assert "prot-a" in down.reason, down
    assert down.rpo_seconds is not None and down.rpo_seconds > 5, down
    link.set("up")
    await eventually(lambda: protected_state(prot, "Protected"), 40, "reconnection after link up")
    await asyncio.sleep(1.0)
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=60)
    rpo = await rpo_back(recovery, prot)
    status = await prot.protected_status(VPG)
    assert status.stream.sessions >= 2
    print(
        f"[netns link down] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f} "
        f"sessions={status.stream.sessions} rpo_while_down_s={down.rpo_seconds:.1f}"
    )
    prot.stop()
    recovery.stop()


async def test_rate_limited_link_under_load(workdir: Path, link: Link, nodes: list[Node]) -> None:
    """A token bucket (`tc ... tbf`) of 2 MB/s on the stream's link: the stream gets no more than
    that through, the RPO grows while the load is faster; without the limit it catches up."""
    rate = 2_000_000
    recovery, prot = await start_across(workdir, link, nodes)
    link.tc("add", "root", "tbf", "rate", f"{rate * 8 // 1000}kbit", "burst", "32kb",
            "latency", "200ms")  # fmt: skip
    writer = Writer(prot, VOLUMES, depth=2, pause=0.01)
    writer.start()
    await asyncio.sleep(1.0)
    # What left through the link (the sender's own counter would include what its socket
    # buffer took in ahead of the bucket).
    first, started = link.sent_bytes(), time.monotonic()
    await asyncio.sleep(5.0)
    shaped = await prot.protected_status(VPG)
    got = (link.sent_bytes() - first) / (time.monotonic() - started)
    assert got < rate * 1.25, f"{got / 1e6:.1f} MB/s through a {rate / 1e6:.0f} MB/s link"
    # The load outran the link: a backlog grew (or overflowed the buffer into bitmap sync).
    assert shaped.buffer.used_bytes > 4 * MiB or shaped.state == "BitmapSync", shaped
    assert shaped.rpo_seconds > 1.0, "the load outran the link: the RPO should grow"
    link.tc("del", "root")
    await asyncio.sleep(1.0)
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=90)
    rpo = await rpo_back(recovery, prot, timeout=60)
    print(
        f"[netns tbf] acked={writer.acked} MiB={writer.acked_bytes / MiB:.0f} "
        f"shaped_MBps={got / 1e6:.2f} rpo_shaped_s={shaped.rpo_seconds:.1f} "
        f"backlog_MiB={shaped.buffer.used_bytes / MiB:.0f} "
        f"converged_s={took:.1f} rpo_s={rpo:.2f}"
    )
    prot.stop()
    recovery.stop()


async def test_delay_loss_and_reorder_with_netem(
    workdir: Path, link: Link, nodes: list[Node]
) -> None:
    """With netem on the link (50 ms +- 10 ms delay, 2 % loss, 5 % reordering) the stream keeps
    working: the replica converges and the RPO stays under the alert while netem is on."""
    netem = ("root", "netem", "delay", "50ms", "10ms", "loss", "2%", "reorder", "5%")
    probe = link.tc("add", *netem, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no netem qdisc in this kernel (sch_netem): {probe.stderr.strip()}")
    link.tc("del", "root")
    recovery, prot = await start_across(workdir, link, nodes)
    link.tc("add", *netem)
    writer = Writer(prot, VOLUMES, depth=2, pause=0.01)
    writer.start()
    await asyncio.sleep(5.0)
    await writer.stop()
    took = await wait_identical(backing(workdir), recovery, timeout=90)
    rpo = await rpo_back(recovery, prot, timeout=60)
    assert rpo < RPO_ALERT
    link.tc("del", "root")
    print(f"[netns netem] acked={writer.acked} converged_s={took:.1f} rpo_s={rpo:.2f}")
    prot.stop()
    recovery.stop()
