"""Benchmark of replication between appliances over loopback (mutual TLS), against the single
appliance (replication to self) on the same workload.

Run: ``.venv/bin/python tests/bench/bench_replication.py`` (a script, not a test; five to ten
minutes; ``--help`` for options). Appliances are `secondsite appliance` processes, as in the e2e
tests. Every journal, single or recovery side, has the product's defaults for its segments
(``segmentBytes``) and the same checkpoint interval in a section, so the baseline differs from
the replicated run only by the stream.

1. Throughput at queue depth 16 on an in-path volume: ``qemu-img bench -t writeback`` with 1 MiB
   sequential and 4 KiB scattered writes (its buffers are zero-filled: compressible), and
   ``nbdcopy`` of a file of random bytes (1 MiB requests, one connection): (a) on a single
   appliance journaling the volume itself, (b) on a protected appliance streaming to a recovery
   appliance that journals it. The ratio (b) / (a) is the cost of replication (target >= 0.7).
   A protected appliance acks once the backing store has the write and its record is buffered
   (asynchronous replication), while the single appliance acks once its journal has the record
   durable; so every replicated run ends only when the recovery side has it all durable, and
   the second ratio counts that drain time in. Each side runs ``--repeat`` times, alternating,
   and the medians are compared (the spills and wire/body columns are of the last run). CPU
   columns: process CPU seconds per GB written of the single appliance, and of the protected and
   recovery appliances (until drained): the cost of replication to each node, which is less
   noisy than throughput on a shared machine (here the two appliances of the replicated run
   share its cores, where in production each has its node's).
2. RPO under sustained writes paced at ``--rates`` MB/s (256 KiB writes of random bytes, up to
   16 in flight), target p99 <= 1 s at 50 MB/s: per write, from capture (just before the write
   is acknowledged) to the recovery side's acknowledgement that it is durable, p50 / p99 / max
   over the run (the protected appliance's `ackLatencyMs`); and the protected side's
   replication lag, i.e. the age of the oldest change the recovery side has not acknowledged
   durable (what a loss of the protected site at that moment would lose), sampled every 20 ms
   (its p50 counts the moments when nothing is in flight); the recovery side's checkpoint RPO
   (now minus the newest durable checkpoint, which adds up to one checkpoint interval of 0.5 s);
   the bytes the recovery appliance wrote to storage per byte written (its journal, and zeros
   written ahead into spare segments); and how often the protected buffer overflowed into
   bitmap sync (whose RPO is the age of the sync).
3. Checkpoint holds across two protected appliances feeding one journal, both loaded at 25 MB/s,
   checkpoints every 0.1 s (200 in 20 s, so that p99 is not the max): how long each appliance
   held its acks (p50 / p99 / max, target p99 <= 20 ms), and how long the recovery side's cut
   took from HOLD to the checkpoint marked. A hold needs a wake-up of each of the three
   processes; as context, how late the scheduler wakes a process that only sleeps 1 ms at a
   time, measured meanwhile.
4. Compression: ``nbdcopy`` of a compressible (text-like) and of an incompressible (random) file
   to a protected volume, for each `compression` of the protected VPG (none, zstd, adaptive):
   bytes on the wire per byte written (the stream's counters), and the process CPU seconds
   (user + system, from ``/proc/<pid>/stat``) of the protected appliance (sender) and of the
   recovery appliance (receiver) per GB written, from the start of the copy until the recovery
   side has every write durable. `none` is the baseline of each workload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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

from secondsite.appliance.config import JournalSpec

VPG = "bench"
DEPTH = 16
RUN_TIMEOUT = 300.0
SEGMENT_BYTES = JournalSpec.model_fields["segment_bytes"].default
"""The product's segment size, for every journal here (the e2e harness rolls small ones often)."""
COMPRESSIONS = ("none", "zstd", "adaptive")


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


def nbdcopy(source: Path, uri: str) -> float:
    """Seconds ``nbdcopy`` took to copy ``source`` to ``uri`` (1 MiB requests, 16 in flight on
    one connection: the queue depth of ``qemu_img_bench``)."""
    argv = [
        "nbdcopy", "--connections=1", "--threads=1", f"--requests={DEPTH}",
        f"--request-size={MiB}", str(source), uri,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if proc.returncode:
        raise RuntimeError(f"nbdcopy failed: {proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def make_source(path: Path, kind: str, size: int) -> Path:
    """A file of ``size`` bytes: random (incompressible) or text-like words (compressible about
    4:1 by zstd, like logs or a database of text), tiled from a 16 MiB pool."""
    rng = random.Random(1)
    if kind == "compressible":
        words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(4000)]
        pool = " ".join(rng.choice(words) for _ in range(2_000_000)).encode()[: 16 * MiB]
    else:
        pool = b""
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(pool if pool else os.urandom(16 * MiB))
        f.flush()
        os.fsync(f.fileno())  # written back now, not while a measured run writes
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_written(pid: int) -> int:
    """Bytes process ``pid`` caused to be written to storage so far (``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


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


async def drained(node: Node, timeout: float = 120, period: float = 0.02) -> float:
    """Seconds until the protected side's buffer is empty and every volume Protected."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await node.protected_status(VPG)
        if st.buffer.records == 0 and st.state == "Protected":
            return time.monotonic() - t0
        await asyncio.sleep(period)
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
                    "segmentBytes": SEGMENT_BYTES,
                }
            ],
            "volumes": [{"name": "vol0", "vpg": VPG, "backing": str(backing)}],
        },
    )


def replicated_pair(
    workdir: Path, pki: Pki, size: int, checkpoint_interval: float = 1.0, **protected: Any
) -> tuple[Node, Node]:
    """A recovery appliance and a protected appliance with volume `vol0` of ``size`` bytes;
    ``protected``: settings of the protected VPG (e.g. `compression`)."""
    port = free_port()
    recovery = recovery_node(
        workdir, pki, port, VPG, ["prot-a"], hardLimit="64Gi", segmentBytes=SEGMENT_BYTES,
        checkpointIntervalSeconds=checkpoint_interval,
    )  # fmt: skip
    return recovery, protected_node(workdir, pki, "prot-a", port, VPG, {"vol0": size}, **protected)


# -- 1. throughput -------------------------------------------------------------------------------

Load = Callable[[str], float]
"""A workload: writes to an NBD URI, returns the seconds it took."""


async def throughput(
    workdir: Path, pki: Pki, size: int, scale: float, repeat: int
) -> list[list[str]]:
    copied = int(1024 * scale) * MiB
    source = await asyncio.to_thread(make_source, workdir / "random.src", "incompressible", copied)
    seq, scattered = int(1200 * scale), int(40_000 * scale)
    loads: list[tuple[str, str, float, int, Load]] = [
        ("1M seq write qd16, zero-filled (qemu-img bench)", "MB/s", seq * MiB / 1e6, seq * MiB,
         lambda uri: qemu_img_bench(uri, MiB, seq, MiB)),
        ("4k scattered write qd16, zero-filled (qemu-img bench)", "IOPS", scattered,
         scattered * 4096, lambda uri: qemu_img_bench(uri, 4096, scattered, 4096 * 100_003)),
        ("1M seq write qd16, random bytes (nbdcopy)", "MB/s", copied / 1e6, copied,
         lambda uri: nbdcopy(source, uri)),
    ]  # fmt: skip
    rows: list[list[str]] = []
    for name, unit, amount, nbytes, load in loads:
        singles, replicateds, drains = [], [], []
        cpu: dict[str, list[float]] = {"single": [], "protected": [], "recovery": []}
        for _ in range(repeat):  # alternating, so that a change of the machine's load hits both
            base_dir = Path(tempfile.mkdtemp(dir=workdir))
            local = local_node(base_dir, size)
            with started(local):
                await asyncio.sleep(1.0)
                cpu0 = cpu_seconds(local.pid)
                singles.append(await asyncio.to_thread(load, local.uri("vol0")))
                cpu["single"].append(cpu_seconds(local.pid) - cpu0)
            shutil.rmtree(base_dir, ignore_errors=True)

            rep_dir = Path(tempfile.mkdtemp(dir=workdir))
            recovery, prot = replicated_pair(rep_dir, pki, size)
            with started(recovery, prot):
                await synced(prot)
                cpu0, rcpu0 = cpu_seconds(prot.pid), cpu_seconds(recovery.pid)
                replicateds.append(await asyncio.to_thread(load, prot.uri("vol0")))
                drains.append(await drained(prot, period=0.05))
                cpu["protected"].append(cpu_seconds(prot.pid) - cpu0)
                cpu["recovery"].append(cpu_seconds(recovery.pid) - rcpu0)
                status = await prot.protected_status(VPG)
            shutil.rmtree(rep_dir, ignore_errors=True)
        single, replicated = statistics.median(singles), statistics.median(replicateds)
        drain = statistics.median(drains)
        rows.append(
            [
                name,
                unit,
                f"{amount / single:.0f}",
                f"{amount / replicated:.0f}",
                f"{single / replicated:.2f}",
                f"{single / (replicated + drain):.2f}",
                f"{drain:.2f}",
                f"{status.stream.wire_ratio:.2f}",
                f"{status.buffer.spills}",
                *(f"{statistics.median(cpu[k]) / (nbytes / 1e9):.2f}" for k in cpu),
            ]
        )
    source.unlink()
    return rows


# -- 2. RPO under paced load ---------------------------------------------------------------------


async def paced_load(
    node: Node, volume: str, size: int, rate: float, seconds: float, stop: asyncio.Event
) -> int:
    """256 KiB writes of random (incompressible) data at ``rate`` bytes/s, up to ``DEPTH`` in
    flight (one connection each): enough that the rate holds while a write takes up to
    DEPTH * 256 KiB / rate to be acknowledged (20 ms at 200 MB/s)."""
    length = 256 * 1024
    blocks = [random.randbytes(length) for _ in range(16)]
    clients: list[NBDClient] = [
        (await connect_and_go(str(node.nbd_socket), volume))[0] for _ in range(DEPTH)
    ]
    claimed = written = 0
    t0 = time.monotonic()

    async def lane(client: NBDClient, i: int) -> None:
        nonlocal claimed, written
        n = 0
        while not stop.is_set():
            claimed += length  # this lane's slot: lanes start their writes one after another
            delay = t0 + claimed / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop.is_set() or time.monotonic() - t0 >= seconds:
                break
            offset = random.randrange(size // length) * length
            await client.write(offset, blocks[(i + n) % len(blocks)])
            written += length
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
        recovery, prot = replicated_pair(rep_dir, pki, size, checkpoint_interval=0.5)
        with started(recovery, prot):
            await synced(prot)
            stop = asyncio.Event()

            async def lag(n: Node) -> float:
                return (await n.protected_status(VPG)).rpo_seconds

            async def cp_rpo(n: Node) -> float:
                return (await n.vpg_status(VPG)).rpo_seconds or 0.0

            lag_task = asyncio.create_task(sample(prot, lag, stop))
            rpo_task = asyncio.create_task(sample(recovery, cp_rpo, stop, 0.05))
            t0, disk0 = time.monotonic(), disk_written(recovery.pid)
            written = await paced_load(prot, "vol0", size, rate * 1e6, seconds, stop)
            elapsed = time.monotonic() - t0
            stop.set()
            lags, rpos = await lag_task, await rpo_task
            disk = disk_written(recovery.pid) - disk0
            status = await prot.protected_status(VPG)
        shutil.rmtree(rep_dir, ignore_errors=True)
        lp, cp, ack = pcts(lags), pcts(rpos), status.ack_latency_ms
        rows.append(
            [
                f"{rate:g}",
                f"{written / elapsed / 1e6:.0f}",
                *(f"{ack.get(k, float('nan')):.0f}" for k in ("p50_ms", "p99_ms", "max_ms")),
                f"{lp[0] * 1e3:.0f}",
                f"{lp[1] * 1e3:.0f}",
                f"{lp[2] * 1e3:.0f}",
                f"{cp[0] * 1e3:.0f}",
                f"{cp[1] * 1e3:.0f}",
                f"{disk / written:.2f}",
                f"{status.buffer.spills}",
            ]
        )
    return rows


# -- 3. holds across two protected appliances ----------------------------------------------------


WAKEUP_PROBE = """
import sys, time
end, late = time.monotonic() + float(sys.argv[1]), []
while time.monotonic() < end and len(late) < 100_000:
    t = time.monotonic()
    time.sleep(0.001)
    late.append(time.monotonic() - t - 0.001)
late.sort()
print(len(late), late[len(late) // 2], late[int(0.99 * len(late))], late[-1])
"""
"""Oversleep of a process that only sleeps 1 ms at a time: how late the scheduler wakes up a
process while the machine is loaded (a hold needs a wake-up in each of three processes)."""


def ms_row(what: str, h: dict[str, float]) -> list[str]:
    return [what, f"{h.get('count', 0):.0f}"] + [
        f"{h.get(k, 0):.2f}" for k in ("p50_ms", "p99_ms", "max_ms")
    ]


async def holds(workdir: Path, pki: Pki, size: int, seconds: float) -> list[list[str]]:
    rep_dir = Path(tempfile.mkdtemp(dir=workdir))
    port = free_port()
    recovery = recovery_node(
        rep_dir, pki, port, VPG, ["prot-a", "prot-b"], checkpointIntervalSeconds=0.1,
        hardLimit="64Gi", segmentBytes=SEGMENT_BYTES,
    )  # fmt: skip
    a = protected_node(rep_dir, pki, "prot-a", port, VPG, {"vol0": size})
    b = protected_node(rep_dir, pki, "prot-b", port, VPG, {"vol1": size})
    with started(recovery, a, b):
        await synced(a)
        await synced(b)
        stop = asyncio.Event()
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WAKEUP_PROBE, str(seconds), stdout=subprocess.PIPE
        )
        await asyncio.gather(
            paced_load(a, "vol0", size, 25e6, seconds, stop),
            paced_load(b, "vol1", size, 25e6, seconds, stop),
        )
        out, _ = await probe.communicate()
        sa, sb = await a.protected_status(VPG), await b.protected_status(VPG)
        rec = await recovery.vpg_status(VPG)
    shutil.rmtree(rep_dir, ignore_errors=True)
    count, p50, p99, most = (float(x) for x in out.split())
    wakeup = {"count": count, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "max_ms": most * 1e3}
    return [
        ms_row("prot-a acks held", sa.hold_ms),
        ms_row("prot-b acks held", sb.hold_ms),
        ms_row("recovery cut (HOLD to marked)", rec.hold_ms),
        ms_row("baseline: wake-up delay of a sleeper", wakeup),
    ]


# -- 4. compression -------------------------------------------------------------------------------


async def compression(workdir: Path, pki: Pki, size: int, scale: float) -> list[list[str]]:
    total = int(512 * scale) * MiB
    rows: list[list[str]] = []
    for kind in ("compressible", "incompressible"):
        source = await asyncio.to_thread(make_source, workdir / f"{kind}.src", kind, total)
        for mode in COMPRESSIONS:
            rep_dir = Path(tempfile.mkdtemp(dir=workdir))
            # A buffer that holds the whole copy: every write is streamed (none spills into
            # bitmap sync, which would ship regions instead), so the modes compare per byte.
            recovery, prot = replicated_pair(
                rep_dir, pki, size, compression=mode, bufferBytes=f"{2 * total}"
            )
            with started(recovery, prot):
                await synced(prot)
                before = (await prot.protected_status(VPG)).stream
                cpu0 = cpu_seconds(prot.pid), cpu_seconds(recovery.pid)
                t0 = time.perf_counter()
                await asyncio.to_thread(nbdcopy, source, prot.uri("vol0"))
                await drained(prot, period=0.1)
                elapsed = time.perf_counter() - t0
                cpu = cpu_seconds(prot.pid) - cpu0[0], cpu_seconds(recovery.pid) - cpu0[1]
                status = await prot.protected_status(VPG)
            shutil.rmtree(rep_dir, ignore_errors=True)
            written, after = source.stat().st_size, status.stream
            if status.buffer.spills or after.appended_bytes - before.appended_bytes != written:
                raise RuntimeError(f"{kind}/{mode}: not every write went through the buffer")
            wire = after.wire_bytes_sent - before.wire_bytes_sent
            rows.append(
                [
                    kind,
                    mode,
                    f"{written / elapsed / 1e6:.0f}",
                    f"{wire / written:.3f}",
                    f"{cpu[0] / (written / 1e9):.2f}",
                    f"{cpu[1] / (written / 1e9):.2f}",
                ]
            )
        source.unlink()
    return rows


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))  # fmt: skip


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ssbrep", dir=args.dir))
    pki_dir = Path(tempfile.mkdtemp(prefix="ssbpki"))
    started_at = time.monotonic()
    print(f"bench_replication: load average {load_average()} (1, 5, 15 min), cpus {os.cpu_count()}")
    summary: list[list[str]] = []
    try:
        pki = make_pki(pki_dir)
        size = args.size * (1 << 30)
        if "throughput" in args.only:
            rows = await throughput(workdir, pki, size, args.scale, args.repeat)
            table(
                "Throughput: single appliance vs replicated (protected -> recovery, mutual TLS),"
                f" median of {args.repeat}",
                ["workload", "unit", "single", "replicated", "ratio", "ratio+drain",
                 "drain s", "wire/body", "spills", "CPU single", "CPU prot.", "CPU rec."],
                rows,
            )  # fmt: skip
            summary += [
                [f"replicated / single throughput, {r[0]}", f"{r[4]} ({r[5]} with drain)", ">= 0.7"]
                for r in rows
            ]
            summary += [
                [f"single / protected CPU per GB (a CPU-bound node's ratio), {r[0]}",
                 f"{float(r[9]) / float(r[10]):.2f} ({r[9]} / {r[10]} s/GB)", ">= 0.7"]
                for r in rows
            ]  # fmt: skip
        if "rpo" in args.only:
            rows = await rpo(workdir, pki, size, args.rates, args.seconds)
            table(
                f"RPO under paced writes (256 KiB, up to {DEPTH} in flight): per write, sampled"
                " lag, checkpoint RPO",
                ["target MB/s", "got MB/s", "write p50 ms", "write p99 ms", "write max ms",
                 "lag p50 ms", "lag p99 ms", "lag max ms", "cp RPO p50 ms", "cp RPO p99 ms",
                 "rec. disk/written", "spills"],
                rows,
            )  # fmt: skip
            summary += [
                [f"RPO p50 / p99 at {r[0]} MB/s (got {r[1]}): per write; sampled lag",
                 f"{r[2]} / {r[3]} ms; {r[5]} / {r[6]} ms",
                 "p99 <= 1000 ms" if float(r[0]) <= 50 else "-"]
                for r in rows
            ]  # fmt: skip
        if "holds" in args.only:
            rows = await holds(workdir, pki, size, args.seconds)
            table(
                "Checkpoint holds across two protected appliances (25 MB/s each, every 0.1 s)",
                ["what", "count", "p50 ms", "p99 ms", "max ms"],
                rows,
            )
            worst = max(rows[:2], key=lambda r: float(r[3]))
            summary.append(
                [f"checkpoint hold p99, two appliances (worst: {worst[0].split()[0]})",
                 f"{worst[3]} ms (sleeper wake-up p99 {rows[3][3]} ms)", "<= 20 ms"]
            )  # fmt: skip
        if "compression" in args.only:
            rows = await compression(workdir, pki, size, args.scale)
            table(
                f"Compression: nbdcopy of {int(512 * args.scale)} MiB per row, until durable on the"
                " recovery side; CPU seconds per GB written",
                ["workload", "compression", "MB/s", "wire/written", "sender CPU", "receiver CPU"],
                rows,
            )  # fmt: skip
            summary += [
                [f"wire / written, {r[0]}, {r[1]}",
                 f"{r[3]} (CPU s/GB: sender {r[4]}, receiver {r[5]})", "-"]
                for r in rows
            ]  # fmt: skip
        table(
            f"Summary ({time.monotonic() - started_at:.0f} s; load average now {load_average()})",
            ["measure", "figure", "target"],
            summary,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pki_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2, help="GiB of each sparse volume (2)")
    parser.add_argument("--dir", default="/tmp", help="file system for volumes and journals")
    parser.add_argument("--scale", type=float, default=1.0, help="scale request counts")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each throughput workload, median (3)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of paced load (20)")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[50.0, 200.0], help="MB/s (50 200)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=["throughput", "rpo", "holds", "compression"],
        choices=["throughput", "rpo", "holds", "compression"],
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
