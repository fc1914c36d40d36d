"""Journal benchmark (not a test): append throughput, PIT open time, promotion, ack-hold time.

    .venv/bin/python tests/bench/bench_journal.py [--size 2GiB] [--dir /tmp] [--seconds 5]
        [--appends-only]

Baselines are measured in the same run on the same file system: a loop of pwrite + fdatasync
(what an append costs without group commit) and a plain sequential write + one fdatasync.
Everything is bounded in count and time; temp files are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from secondsite.appliance.journal import Journal, JournalConfig, RetentionPolicy

GIB = 1 << 30
MIB = 1 << 20
VOLUME_SIZE = 256 * GIB
"""Sparse; large so that random 4 KiB writes rarely overlap (--volume-size changes it)."""


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MIB, "g": GIB, "t": 1 << 40}
    t = text.lower().rstrip("ib").rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def row(name: str, value: str, note: str = "") -> None:
    print(f"| {name:<46} | {value:>22} | {note}")


def baseline_fsync_iops(d: Path, seconds: float) -> float:
    p = d / "baseline"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    buf = os.urandom(4096)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and n < 100_000:
        os.pwrite(fd, buf, n * 4096)
        os.fdatasync(fd)
        n += 1
    el = time.perf_counter() - t0
    os.close(fd)
    p.unlink()
    return n / el


def baseline_seq_mbps(d: Path, total: int) -> float:
    p = d / "baseline"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    buf = os.urandom(MIB)
    t0 = time.perf_counter()
    for i in range(total // MIB):
        os.pwrite(fd, buf, i * MIB)
    os.fdatasync(fd)
    el = time.perf_counter() - t0
    os.close(fd)
    p.unlink()
    return total / el / 1e6


def baseline_scatter_mbps(d: Path, count: int) -> float:
    """Random 4 KiB pwrites into a sparse file of the volume size, then one fdatasync: what
    promoting a journal of random 4 KiB writes costs the file system at best."""
    p = d / "baseline"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.ftruncate(fd, VOLUME_SIZE)
    buf = os.urandom(4096)
    offs = (np.random.default_rng(3).integers(0, VOLUME_SIZE // 4096, count) * 4096).tolist()
    t0 = time.perf_counter()
    for o in offs:
        os.pwrite(fd, buf, o)
    os.fdatasync(fd)
    el = time.perf_counter() - t0
    os.close(fd)
    p.unlink()
    return count * 4096 / el / 1e6


async def promote_large_writes(d: Path, total: int) -> float:
    """Promotion throughput for a journal of 1 MiB writes (not IOPS-bound)."""
    j = await Journal.open(d / "large", JournalConfig(vpg="bench"))
    await j.add_volume("v", 64 * GIB)
    await j.checkpoint()
    buf = os.urandom(MIB)
    rng = random.Random(4)
    for _ in range(total // (16 * MIB)):
        await asyncio.gather(
            *[j.submit_write("v", rng.randrange(64 * 1024) * MIB, buf) for _ in range(16)]
        )
    cp = await j.checkpoint()
    t = time.perf_counter()
    applied = await j.promote(cp)
    el = time.perf_counter() - t
    await j.close()
    shutil.rmtree(d / "large")
    return applied / el / 1e6


async def append_bench(
    d: Path, block: int, concurrency: int, seconds: float, checkpoint_every: float | None
) -> dict[str, float]:
    j = await Journal.open(d / f"append-{block}", JournalConfig(vpg="bench"))
    await j.add_volume("v", VOLUME_SIZE)
    bufs = [os.urandom(block) for _ in range(16)]
    grains = VOLUME_SIZE // block
    stop = time.perf_counter() + seconds
    done = 0
    cp_lat: list[float] = []

    async def worker(k: int) -> None:
        nonlocal done
        rng = random.Random(k)
        while time.perf_counter() < stop:
            await j.append_write("v", rng.randrange(grains) * block, bufs[done % 16])
            done += 1

    async def checkpointer() -> None:
        assert checkpoint_every is not None
        while time.perf_counter() < stop:
            await asyncio.sleep(checkpoint_every)
            t = time.perf_counter()
            await j.checkpoint()
            cp_lat.append(time.perf_counter() - t)

    f0, b0, t0 = j.fsyncs, j.batches, time.perf_counter()
    tasks = [worker(k) for k in range(concurrency)]
    if checkpoint_every:
        tasks.append(checkpointer())
    await asyncio.gather(*tasks)
    el = time.perf_counter() - t0
    out = {
        "iops": done / el,
        "mbps": done * block / el / 1e6,
        "per_batch": done / max(1, j.batches - b0),
        "fsyncs_per_s": (j.fsyncs - f0) / el,
    }
    out.update({f"hold_{k}": v for k, v in j.hold_percentiles().items()})
    if cp_lat:
        lat = np.asarray(cp_lat)
        out["cp_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
        out["cp_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    await j.close()
    shutil.rmtree(d / f"append-{block}")
    return out


async def build_big_journal(d: Path, size: int, max_seconds: float) -> tuple[Journal, int, float]:
    j = await Journal.open(
        d / "big", JournalConfig(vpg="bench", retention=RetentionPolicy(history_seconds=1e9))
    )
    await j.add_volume("v", VOLUME_SIZE)
    await j.checkpoint("oldest")
    rng = np.random.default_rng(1)
    bufs = [os.urandom(4096) for _ in range(64)]
    written, t0 = 0, time.perf_counter()
    grains = VOLUME_SIZE // 4096
    since_cp = 0
    while written < size and time.perf_counter() - t0 < max_seconds:
        offs = (rng.integers(0, grains, 512) * 4096).tolist()
        pend = [j.submit_write("v", o, bufs[i % 64]) for i, o in enumerate(offs)]
        await asyncio.gather(*pend)
        written += 512 * 4096
        since_cp += 512 * 4096
        if since_cp >= 64 * MIB:
            await j.checkpoint()
            since_cp = 0
    await j.checkpoint("newest")
    return j, written, time.perf_counter() - t0


async def timed_open(j: Journal, cp_tag: str) -> tuple[float, float]:
    cp = j.checkpoints.by_tag(cp_tag)[0]
    t = time.perf_counter()
    img = await j.open_image("v", cp)
    opened = time.perf_counter() - t
    rng = random.Random(2)
    t = time.perf_counter()
    for _ in range(2000):
        await img.read(rng.randrange(VOLUME_SIZE // 4096) * 4096, 4096)
    reads = 2000 / (time.perf_counter() - t)
    img.close()
    return opened, reads


async def main() -> None:
    global VOLUME_SIZE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=2 * GIB, help="big journal size (2GiB)")
    ap.add_argument("--dir", default=None, help="where temp data goes (default: system temp)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per append benchmark")
    ap.add_argument(
        "--appends-only", action="store_true", help="only the baselines and append rows"
    )
    ap.add_argument("--build-seconds", type=float, default=300.0, help="cap on building")
    ap.add_argument(
        "--volume-size", type=parse_size, default=256 * GIB, help="volume size (256GiB)"
    )
    args = ap.parse_args()
    VOLUME_SIZE = args.volume_size
    d = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=args.dir))
    print(
        f"data in {d}; cores={os.cpu_count()} load={os.getloadavg()[0]:.2f};"
        f" volume {VOLUME_SIZE / GIB:.0f} GiB (sparse)"
    )
    print(f"| {'measure':<46} | {'value':>22} | note")
    print(f"|{'-' * 48}|{'-' * 24}|------")
    try:
        base_iops = baseline_fsync_iops(d, 2.0)
        row("baseline: 4 KiB pwrite+fdatasync loop", f"{base_iops:,.0f} IOPS")
        base_seq = baseline_seq_mbps(d, 512 * MIB)
        row("baseline: sequential 1 MiB writes + fdatasync", f"{base_seq:,.0f} MB/s", "512 MiB")
        r = await append_bench(d, 4096, 16, args.seconds, checkpoint_every=0.01)
        row(
            "append 4 KiB random, concurrency 16",
            f"{r['iops']:,.0f} IOPS",
            f"x{r['iops'] / base_iops:.1f} of baseline; {r['per_batch']:.1f} records/fsync",
        )
        row(
            "  checkpoint ack-hold p50 / p99 (every 10 ms)",
            f"{r['hold_p50_ms']:.3f} / {r['hold_p99_ms']:.3f} ms",
            f"{r['hold_count']:.0f} checkpoints; target p99 <= 5 ms",
        )
        row(
            "  checkpoint() until durable p50 / p99",
            f"{r['cp_p50_ms']:.2f} / {r['cp_p99_ms']:.2f} ms",
            "includes one group fsync",
        )
        r = await append_bench(d, MIB, 4, args.seconds, checkpoint_every=None)
        row(
            "append 1 MiB random, concurrency 4",
            f"{r['mbps']:,.0f} MB/s",
            f"x{r['mbps'] / base_seq:.2f} of sequential baseline",
        )
        if args.appends_only:
            return

        j, written, el = await build_big_journal(d, args.size, args.build_seconds)
        row(
            "build journal of 4 KiB random writes",
            f"{written / GIB:.2f} GiB",
            f"{written / el / 1e6:,.0f} MB/s, {written // 4096:,} records",
        )
        for tag in ("oldest", "newest"):
            opened, rps = await timed_open(j, tag)
            note = f"{rps:,.0f} random 4 KiB reads/s"
            if tag == "newest":
                est = opened * (10 * GIB / written)
                note += f"; 10 GiB extrapolated (linear): {est:.1f} s, target <= 5 s"
            row(f"open PIT image at {tag} checkpoint", f"{opened:.3f} s", note)
        await j.close()
        t = time.perf_counter()
        j = await Journal.open(d / "big")
        row("reopen journal (sidecar index)", f"{time.perf_counter() - t:.2f} s")
        await j.close()
        for idx in (d / "big" / "segments").glob("*.idx"):
            idx.unlink()
        t = time.perf_counter()
        j = await Journal.open(d / "big")
        row(
            "reopen journal, index rebuilt by scanning",
            f"{time.perf_counter() - t:.2f} s",
            "no sidecars: every segment's headers read",
        )
        newest = j.checkpoints.by_tag("newest")[0]
        t = time.perf_counter()
        applied = await j.promote(newest)
        el = time.perf_counter() - t
        row(
            "promote whole journal into replica",
            f"{applied / el / 1e6:,.0f} MB/s",
            f"{applied / GIB:.2f} GiB incl. replica fdatasync; target >= 500 MB/s",
        )
        await j.close()
        shutil.rmtree(d / "big")
        base_scatter = baseline_scatter_mbps(d, min(written // 4096, 1 << 20))
        row(
            "baseline: random 4 KiB pwrites + 1 fdatasync",
            f"{base_scatter:,.0f} MB/s",
            "into a sparse file of the volume size",
        )
        row("  promotion / that baseline", f"x{applied / el / 1e6 / base_scatter:.2f}")
        mbps = await promote_large_writes(d, min(args.size, GIB))
        row(
            "promote journal of 1 MiB random writes",
            f"{mbps:,.0f} MB/s",
            f"{min(args.size, GIB) / GIB:.2f} GiB; target >= 500 MB/s",
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
