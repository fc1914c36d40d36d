"""Benchmark of replication between appliances over loopback (mutual TLS), against the single
appliance (replication to self) on the same workload.

Run: ``.venv/bin/python tests/bench/bench_replication.py`` (a script, not a test; a few minutes;
``--help`` for options). Appliances are `secondsite appliance` processes, as in the e2e tests.

1. Throughput: ``qemu-img bench -t writeback`` at queue depth 16 on an in-path volume, 1 MiB
   sequential and 4 KiB scattered writes, (a) on a single appliance journaling the volume itself,
   (b) on a protected appliance streaming to a recovery appliance that journals it. The ratio (b)
   / (a) is the cost of replication (target >= 0.7). A protected appliance acks once the backing
   store has the write and its record is buffered (asynchronous replication); the recovery side
   journals with group commit; every run ends only when the recovery side has it all durable
   (the drain time is reported and counted in a second ratio).
2. RPO under sustained writes paced at ``--rates`` MB/s (256 KiB writes, 4 in flight): the
   protected side's replication lag (the age of the oldest change the recovery side has not
   acknowledged durable) sampled every 20 ms, p50 / p99 / max (target p99 <= 1 s at 50 MB/s), and
   the recovery side's checkpoint RPO (now minus the newest durable checkpoint, which adds up to
   one checkpoint interval of 0.5 s).
3. Checkpoint holds across two protected appliances feeding one journal, both loaded at 25 MB/s,
   checkpoints every 0.2 s: how long each appliance held its acks (p50 / p99 / max, target p99 <=
   20 ms), and how long the recovery side's cut took from HOLD to the checkpoint marked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "replication"))
from replication_harness import (
    MiB,
    Node,
    Pki,
    free_port,
    make_pki,
    protected_node,
    recovery_node,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "nbd"))
from nbd_client import NBDClient, connect_and_go

VPG = "bench"
DEPTH = 16
RUN_TIMEOUT = 300.0


def qemu_img_bench(uri: str, size: int, count: int, step: int) -> float:
    """Seconds ``qemu-img bench`` took for ``count`` writes of ``size`` bytes."""
    argv = [
        "qemu-img", "bench", "-f", "raw", "-t", "writeback", "-w", "-d", str(DEPTH),
        "-c", str(count), "-s", str(size), "-S", str(step), uri,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    match = re.search(r"Run completed in ([0-9.]+) seconds", proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"qemu-img bench failed: {proc.stdout}{proc.stderr}")
    return float(match.group(1))


@contextlib.contextmanager
def started(*nodes: Node) -> Iterator[None]:
    try:
        for node in nodes:
            node.start(timeout=60)
        yield
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop()
            node.close()


async def drained(node: Node, timeout: float = 120) -> float:
    """Seconds until the protected side's buffer is empty and every volume Protected."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await node.protected_status(VPG)
        if st.buffer.records == 0 and st.state == "Protected":
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{node.name} did not drain in {timeout}s")


async def synced(node: Node, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while (await node.protected_status(VPG)).state != "Protected":
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{node.name}: no initial sync in {timeout}s")
        await asyncio.sleep(0.1)


def local_node(workdir: Path, size: int) -> Node:
    backing = workdir / "local.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    return Node(
        workdir,
        "local",
        {
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "local" / "journal"),
                    "checkpointIntervalSeconds": 1,
                    "hardLimit": "64Gi",
                }
            ],
            "volumes": [{"name": "vol0", "vpg": VPG, "backing": str(backing)}],
        },
    )


# -- 1. throughput -------------------------------------------------------------------------------


async def throughput(workdir: Path, pki: Pki, size: int, scale: float) -> list[list[str]]:
    loads = [
        ("1M seq write qd16", MiB, int(1200 * scale), MiB),
        ("4k scattered write qd16", 4096, int(40_000 * scale), 4096 * 100_003),
    ]
    rows: list[list[str]] = []
    for name, req, count, step in loads:
        base_dir = Path(tempfile.mkdtemp(dir=workdir))
        local = local_node(base_dir, size)
        with started(local):
            await asyncio.sleep(1.0)
            single = await asyncio.to_thread(qemu_img_bench, local.uri("vol0"), req, count, step)
        shutil.rmtree(base_dir, ignore_errors=True)

        rep_dir = Path(tempfile.mkdtemp(dir=workdir))
        port = free_port()
        recovery = recovery_node(rep_dir, pki, port, VPG, ["prot-a"], hardLimit="64Gi")
        prot = protected_node(rep_dir, pki, "prot-a", port, VPG, {"vol0": size})
        with started(recovery, prot):
            await synced(prot)
            replicated = await asyncio.to_thread(qemu_img_bench, prot.uri("vol0"), req, count, step)
            drain = await drained(prot)
            status = await prot.protected_status(VPG)
        shutil.rmtree(rep_dir, ignore_errors=True)
        unit, scale_of = ("MB/s", req * count / 1e6) if req >= MiB else ("IOPS", count)
        rows.append(
            [
                name,
                unit,
                f"{scale_of / single:.0f}",
                f"{scale_of / replicated:.0f}",
                f"{single / replicated:.2f}",
                f"{single / (replicated + drain):.2f}",
                f"{drain:.2f}",
                f"{status.stream.wire_ratio:.2f}",
            ]
        )
    return rows


# -- 2. RPO under paced load ---------------------------------------------------------------------


async def paced_load(
    node: Node, volume: str, size: int, rate: float, seconds: float, stop: asyncio.Event
) -> int:
    """256 KiB writes of random (incompressible) data at ``rate`` bytes/s, 4 in flight."""
    length = 256 * 1024
    blocks = [random.randbytes(length) for _ in range(16)]
    clients: list[NBDClient] = [
        (await connect_and_go(str(node.nbd_socket), volume))[0] for _ in range(4)
    ]
    written = 0
    t0 = time.monotonic()

    async def lane(client: NBDClient, i: int) -> None:
        nonlocal written
        n = 0
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            due = t0 + (written + length) / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            offset = random.randrange(size // length) * length
            written += length
            await client.write(offset, blocks[(i + n) % len(blocks)])
            n += 1

    try:
        await asyncio.gather(*(lane(c, i) for i, c in enumerate(clients)))
    finally:
        for c in clients:
            await c.close()
    return written


async def sample(node: Node, fn: Any, stop: asyncio.Event, period: float = 0.02) -> list[float]:
    out: list[float] = []
    while not stop.is_set():
        out.append(await fn(node))
        await asyncio.sleep(period)
    return out


def pcts(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if not ordered:
        return (float("nan"),) * 3
    return (
        statistics.median(ordered),
        ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        ordered[-1],
    )


async def rpo(
    workdir: Path, pki: Pki, size: int, rates: list[float], seconds: float
) -> list[list[str]]:
    rows: list[list[str]] = []
    for rate in rates:
        rep_dir = Path(tempfile.mkdtemp(dir=workdir))
        port = free_port()
        recovery = recovery_node(rep_dir, pki, port, VPG, ["prot-a"], hardLimit="64Gi")
        prot = protected_node(rep_dir, pki, "prot-a", port, VPG, {"vol0": size})
        with started(recovery, prot):
            await synced(prot)
            stop = asyncio.Event()

            async def lag(n: Node) -> float:
                return (await n.protected_status(VPG)).rpo_seconds

            async def cp_rpo(n: Node) -> float:
                return (await n.vpg_status(VPG)).rpo_seconds or 0.0

            lag_task = asyncio.create_task(sample(prot, lag, stop))
            rpo_task = asyncio.create_task(sample(recovery, cp_rpo, stop, 0.05))
            t0 = time.monotonic()
            written = await paced_load(prot, "vol0", size, rate * 1e6, seconds, stop)
            elapsed = time.monotonic() - t0
            stop.set()
            lags, rpos = await lag_task, await rpo_task
        shutil.rmtree(rep_dir, ignore_errors=True)
        lp, cp = pcts(lags), pcts(rpos)
        rows.append(
            [
                f"{rate:g}",
                f"{written / elapsed / 1e6:.0f}",
                f"{lp[0] * 1e3:.0f}",
                f"{lp[1] * 1e3:.0f}",
                f"{lp[2] * 1e3:.0f}",
                f"{cp[0] * 1e3:.0f}",
                f"{cp[1] * 1e3:.0f}",
            ]
        )
    return rows


# -- 3. holds across two protected appliances ----------------------------------------------------


async def holds(workdir: Path, pki: Pki, size: int, seconds: float) -> list[list[str]]:
    rep_dir = Path(tempfile.mkdtemp(dir=workdir))
    port = free_port()
    recovery = recovery_node(
        rep_dir, pki, port, VPG, ["prot-a", "prot-b"], checkpointIntervalSeconds=0.2
    )
    a = protected_node(rep_dir, pki, "prot-a", port, VPG, {"vol0": size})
    b = protected_node(rep_dir, pki, "prot-b", port, VPG, {"vol1": size})
    with started(recovery, a, b):
        await synced(a)
        await synced(b)
        stop = asyncio.Event()
        await asyncio.gather(
            paced_load(a, "vol0", size, 25e6, seconds, stop),
            paced_load(b, "vol1", size, 25e6, seconds, stop),
        )
        sa, sb = await a.protected_status(VPG), await b.protected_status(VPG)
        rec = await recovery.vpg_status(VPG)
    shutil.rmtree(rep_dir, ignore_errors=True)
    rows = []
    for who, h in (("prot-a acks held", sa.hold_ms), ("prot-b acks held", sb.hold_ms)):
        rows.append(
            [who, f"{h.get('count', 0):.0f}", f"{h.get('p50_ms', 0):.2f}",
             f"{h.get('p99_ms', 0):.2f}", f"{h.get('max_ms', 0):.2f}"]
        )  # fmt: skip
    h = rec.hold_ms
    rows.append(
        ["recovery cut (HOLD to marked)", f"{h.get('count', 0):.0f}", f"{h.get('p50_ms', 0):.2f}",
         f"{h.get('p99_ms', 0):.2f}", f"{h.get('max_ms', 0):.2f}"]
    )  # fmt: skip
    return rows


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))  # fmt: skip


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ssbrep", dir=args.dir))
    pki_dir = Path(tempfile.mkdtemp(prefix="ssbpki"))
    try:
        pki = make_pki(pki_dir)
        size = args.size * (1 << 30)
        if "throughput" in args.only:
            rows = await throughput(workdir, pki, size, args.scale)
            table(
                "Throughput: single appliance vs replicated (protected -> recovery, mutual TLS)",
                ["workload", "unit", "single", "replicated", "ratio", "ratio+drain",
                 "drain s", "wire/body"],
                rows,
            )  # fmt: skip
        if "rpo" in args.only:
            rows = await rpo(workdir, pki, size, args.rates, args.seconds)
            table(
                "RPO under paced writes (256 KiB, 4 in flight): replication lag and checkpoint RPO",
                ["target MB/s", "got MB/s", "lag p50 ms", "lag p99 ms", "lag max ms",
                 "cp RPO p50 ms", "cp RPO p99 ms"],
                rows,
            )  # fmt: skip
        if "holds" in args.only:
            rows = await holds(workdir, pki, size, args.seconds)
            table(
                "Checkpoint holds across two protected appliances (25 MB/s each, every 0.2 s)",
                ["what", "count", "p50 ms", "p99 ms", "max ms"],
                rows,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pki_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2, help="GiB of each sparse volume (2)")
    parser.add_argument("--dir", default="/tmp", help="file system for volumes and journals")
    parser.add_argument("--scale", type=float, default=1.0, help="scale request counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of paced load (10)")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[50.0, 200.0], help="MB/s (50 200)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["throughput", "rpo", "holds"],
        choices=["throughput", "rpo", "holds"],
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
