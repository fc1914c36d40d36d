"""Benchmark of the appliance's in-path capture (journaling on) against qemu-nbd on a plain file.

Run: ``.venv/bin/python tests/bench/bench_appliance.py`` (a script, not a test; about two
minutes; ``--help`` for options).

Both servers serve a sparse raw file of ``--size`` (2 GiB) on the same file system (``--dir``,
default /tmp), over a unix socket (qemu-nbd over TCP stalls on Nagle, see issue 3), each cell on a
fresh file and a fresh server, and are driven by ``qemu-img bench -t writeback`` at queue depth 16:

* 4 KiB writes scattered over the file (qemu-img bench has no random mode: the offset advances by
  a stride of 100003 blocks, a prime, which visits the blocks in a scrambled order): IOPS;
* 1 MiB sequential writes: MB/s.

Servers:

* ``qemu-nbd -k SOCK -f raw --cache=writeback -t FILE``: writes land in the page cache, no fsync;
* the appliance (``Appliance`` of ``secondsite appliance``, in a child process of this script so
  that it can report its journal's numbers): one in-path volume on the file, its VPG's journal in
  the same directory, a checkpoint every second. Every write is journaled and fdatasynced
  (group commit) before its ack.

Targets (issue 3): 4 KiB IOPS >= 0.5 x qemu-nbd, 1 MiB MB/s >= 0.8 x qemu-nbd, checkpoint hold
p99 <= 5 ms. Also reported: hold p50/p99/max under the load, journal records per fdatasync (group
commit batching), and server CPU per request. PIT-image open time on a 10 GiB journal and
promotion throughput are measured by ``tests/bench/bench_journal.py``, not here.
Each cell is the median of ``--repeat`` runs; every run is bounded in requests and wall time.
``--profile DIR`` writes a cProfile of each appliance run there and prints its top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
STRIDE_BLOCKS = 100_003
DEPTH = 16
RUN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Load:
    name: str
    size: int
    count: int
    step: int
    target: float
    """Minimum ratio to qemu-nbd (issue 3)."""

    @property
    def unit(self) -> str:
        return "MB/s" if self.size >= MiB else "IOPS"


def loads(image_size: int, scale: float) -> list[Load]:
    return [
        Load("4k random write qd16", 4096, int(100_000 * scale), 4096 * STRIDE_BLOCKS, 0.5),
        Load(
            "1M seq write qd16",
            MiB,
            min(int(1500 * scale), image_size // MiB),
            MiB,
            0.8,
        ),
    ]


@dataclass
class Result:
    value: float
    cpu_us: float
    stats: dict[str, Any]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@contextmanager
def running(
    server: str, workdir: Path, size: int, profile: Path | None
) -> Iterator[tuple[str, int, Path]]:
    """A fresh file and a fresh server on it; yields (NBD URI, server pid, stats file)."""
    run_dir = Path(tempfile.mkdtemp(prefix=server, dir=workdir))
    image = run_dir / "disk.img"
    create_sparse(image, size)
    sock = run_dir / "nbd.sock"
    stats = run_dir / "stats.json"
    if server.startswith("qemu-nbd"):
        cache = "writethrough" if server.endswith("durable") else "writeback"
        argv = ["qemu-nbd", "-k", str(sock), "-f", "raw", f"--cache={cache}", "-t", str(image)]
        uri = f"nbd+unix:///?socket={sock}"
    else:
        argv = [sys.executable, __file__, "--serve", str(run_dir)]
        if profile is not None:
            argv += ["--profile-to", str(profile / f"appliance-{run_dir.name}.prof")]
        uri = f"nbd+unix:///disk0?socket={sock}"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        ready = sock if server.startswith("qemu-nbd") else run_dir / "ready"
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
                raise RuntimeError(f"{server} did not start: {err}")
            time.sleep(0.05)
        yield uri, proc.pid, stats
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        if proc.returncode not in (0, -signal.SIGTERM) and proc.stderr:
            print(f"  {server} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if proc.stderr:
            proc.stderr.close()
        if stats.exists():
            shutil.copy(stats, workdir / "last-stats.json")
        shutil.rmtree(run_dir, ignore_errors=True)


def qemu_img_bench(uri: str, load: Load) -> float:
    argv = [
        "qemu-img", "bench", "-f", "raw", "-t", "writeback", "-w", "-d", str(DEPTH),
        "-c", str(load.count), "-s", str(load.size), "-S", str(load.step), uri,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    match = re.search(r"Run completed in ([0-9.]+) seconds", proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"qemu-img bench failed: {proc.stdout}{proc.stderr}")
    per_second = load.count / float(match.group(1))
    return per_second * load.size / 1e6 if load.unit == "MB/s" else per_second


def measure(server: str, load: Load, workdir: Path, size: int, profile: Path | None) -> Result:
    with running(server, workdir, size, profile) as (uri, pid, _stats):
        cpu0 = cpu_seconds(pid)
        value = qemu_img_bench(uri, load)
        cpu = cpu_seconds(pid) - cpu0
    stats: dict[str, Any] = {}
    last = workdir / "last-stats.json"
    if last.exists():
        stats = json.loads(last.read_text())
        last.unlink()
    return Result(value, cpu / load.count * 1e6, stats)


def fmt(value: float, unit: str) -> str:
    return f"{value / 1000:.1f}k" if unit == "IOPS" else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2, help="GiB of each sparse file (2)")
    parser.add_argument("--dir", default="/tmp", help="file system under test (/tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell, median (3)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale request counts")
    parser.add_argument("--profile", type=Path, help="write cProfile data of the appliance here")
    parser.add_argument(
        "--durable-baseline",
        action="store_true",
        help="also qemu-nbd --cache=writethrough (every write durable before its ack, like the "
        "appliance's journal): context for the ratios, not the issue's baseline",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.profile_to)
        return
    missing = [t for t in ("qemu-img", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (make debs)")
    size = args.size * GiB
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}  cpus: {os.cpu_count()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="appbench", dir=args.dir) as tmp:
        workdir = Path(tmp)
        for load in loads(size, args.scale):
            results: dict[str, list[Result]] = {"qemu-nbd": [], "appliance": []}
            if args.durable_baseline:
                results["qemu-nbd-durable"] = []
            for _ in range(args.repeat):
                for server in results:  # interleaved, so that drift hits both alike
                    r = measure(server, load, workdir, size, args.profile)
                    results[server].append(r)
                    print(
                        f"  {load.name:22} {server:10} {fmt(r.value, load.unit):>7} {load.unit}"
                        f"  cpu {r.cpu_us:6.1f} us/req",
                        flush=True,
                    )
            rows.append((load, results))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print_table(rows)
    if args.profile:
        print_profile(args.profile)


def print_table(rows: list[tuple[Load, dict[str, list[Result]]]]) -> None:
    header = (
        f"| {'workload':22} | {'qemu-nbd':>9} | {'appliance':>9} | {'ratio':>5} | {'target':>9} "
        f"| {'hold p50/p99/max ms':>20} | {'records/fsync':>13} | {'cpu us/req nbd/app':>18} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for load, results in rows:
        base = statistics.median(r.value for r in results["qemu-nbd"])
        ours = statistics.median(r.value for r in results["appliance"])
        ratio = ours / base
        stats = [r.stats for r in results["appliance"] if r.stats.get("hold")]
        holds = "-"
        batching = "-"
        if stats:
            p50 = statistics.median(s["hold"]["p50_ms"] for s in stats)
            p99 = statistics.median(s["hold"]["p99_ms"] for s in stats)
            worst = max(s["hold"]["max_ms"] for s in stats)
            holds = f"{p50:.2f}/{p99:.2f}/{worst:.2f}"
            batching = f"{statistics.median(s['records'] / max(1, s['fsyncs']) for s in stats):.1f}"
        cpu = (
            f"{statistics.median(r.cpu_us for r in results['qemu-nbd']):.1f}/"
            f"{statistics.median(r.cpu_us for r in results['appliance']):.1f}"
        )
        target = f">={load.target} " + ("ok" if ratio >= load.target else "MISS")
        print(
            f"| {load.name:22} | {fmt(base, load.unit):>9} | {fmt(ours, load.unit):>9} "
            f"| {ratio:5.2f} | {target:>9} | {holds:>20} | {batching:>13} | {cpu:>18} |"
        )
    for load, results in rows:
        if results.get("qemu-nbd-durable"):
            durable = statistics.median(r.value for r in results["qemu-nbd-durable"])
            ours = statistics.median(r.value for r in results["appliance"])
            print(
                f"| {load.name:22} | qemu-nbd --cache=writethrough (durable): "
                f"{fmt(durable, load.unit)} {load.unit}, appliance/durable = {ours / durable:.2f}"
            )
    print(
        "\n(IOPS and MB/s are medians; qemu-nbd does no fsync, the "
        "appliance fdatasyncs its journal before every ack; holds are the checkpoint cuts taken "
        "every second during the run; hold p99 target <= 5 ms)"
    )


def print_profile(directory: Path) -> None:
    files = sorted(directory.glob("appliance-*.prof"))
    if not files:
        return
    stats = pstats.Stats(str(files[0]))
    for f in files[1:]:
        stats.add(str(f))
    print(f"\nappliance profile ({len(files)} runs), top 25 by own time:")
    stats.sort_stats("tottime").print_stats(25)


# -- the appliance child --------------------------------------------------------------------------


def serve(run_dir: Path, profile_to: Path | None) -> None:
    """Run an appliance with one in-path volume on run_dir/disk.img until SIGTERM, then write
    its journal's numbers to run_dir/stats.json."""
    from secondsite.appliance.config import ApplianceConfig
    from secondsite.appliance.nbd.server import run
    from secondsite.appliance.runtime import Appliance

    config = ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(run_dir / "nbd.sock")},
            "journals": [
                {"vpg": "bench", "directory": str(run_dir / "journal"),
                 "checkpointIntervalSeconds": 1, "hardLimit": "150Gi", "history": "24h"}
            ],
            "volumes": [{"name": "disk0", "vpg": "bench", "backing": str(run_dir / "disk.img")}],
        }
    )  # fmt: skip

    async def main() -> None:
        appliance = Appliance(config)
        await appliance.start()
        vpg = appliance.vpgs["bench"]
        deadline = time.monotonic() + 30
        while not vpg.consistent and time.monotonic() < deadline:  # initial sync (of holes)
            await asyncio.sleep(0.01)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        (run_dir / "ready").write_text("ready\n")
        await stop.wait()
        journal = vpg.journal
        assert journal is not None
        stats = {
            "hold": journal.hold_percentiles(),
            "records": journal.next_seq - 1,
            "fsyncs": journal.fsyncs,
            "batches": journal.batches,
            "checkpoints": vpg.checkpoints_taken,
        }
        await appliance.stop()
        (run_dir / "stats.json").write_text(json.dumps(stats))

    if profile_to is None:
        run(main())
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(main())
    finally:
        profiler.disable()
        profiler.dump_stats(str(profile_to))


if __name__ == "__main__":
    main()
