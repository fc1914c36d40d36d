"""Benchmark of the appliance's NBD server against Debian's qemu-nbd and nbdkit.

Run: ``.venv/bin/python tests/bench/bench_nbd.py`` (a script, not a test; about two minutes).

Every server runs as its own process behind a unix socket (TCP adds Nagle-related stalls to
qemu-nbd, see issue 3) and is driven by ``qemu-img bench``:

* 4 KiB writes and reads at queue depth 16 and 32, scattered over a 1 GiB image: qemu-img bench
  has no random mode, so the offset advances by a stride of 100003 blocks (a prime), which visits
  the blocks of the image in a scrambled order;
* 1 MiB sequential writes at queue depth 16 and 32.

Servers: ours with a MemoryExport, ours with a FileExport (inline I/O, and ``threaded=True``),
``qemu-nbd`` on a raw file (``--cache=writeback``), and ``nbdkit memory``. Files are sparse files
of the same size in the same directory. The table gives IOPS (4 KiB) or MB/s (1 MiB), the ratio to
qemu-nbd, and the server's CPU time per request. Each cell is the median of ``--repeat`` runs;
every run is bounded in request count and wall time. On a 2-core machine the client and the server
share the CPUs, so anything else running (a build) depresses the numbers: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

GiB = 1024**3
IMAGE_SIZE = 1 * GiB
STRIDE_BLOCKS = 100_003
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Workload:
    name: str
    write: bool
    size: int
    depth: int
    count: int
    step: int

    @property
    def per_second_unit(self) -> str:
        return "MB/s" if self.size >= 1 << 20 else "IOPS"


def workloads(scale: float) -> list[Workload]:
    small = int(200_000 * scale)
    large = int(3_000 * scale)
    stride = 4096 * STRIDE_BLOCKS
    out = []
    for depth in (16, 32):
        out.append(Workload(f"4k write qd{depth}", True, 4096, depth, small, stride))
        out.append(Workload(f"4k read  qd{depth}", False, 4096, depth, small, stride))
    for depth in (16, 32):
        out.append(Workload(f"1M seq write qd{depth}", True, 1 << 20, depth, large, 1 << 20))
    return out


@dataclass(frozen=True)
class Server:
    name: str
    uri_name: str  # export name in the URI

    def command(self, workdir: Path, socket_path: str) -> list[str]:
        image = str(workdir / f"{self.name.replace(':', '_')}.img")
        if self.name == "qemu-nbd":
            create_sparse(image)
            return ["qemu-nbd", "-k", socket_path, "-f", "raw", "--cache=writeback", "-t", image]
        if self.name == "nbdkit:memory":
            return ["nbdkit", "-f", "-U", socket_path, "memory", str(IMAGE_SIZE)]
        kind = self.name.split(":", 1)[1]
        if kind != "mem":
            create_sparse(image)
        return [sys.executable, __file__, "--serve", kind, image, socket_path]


SERVERS = [
    Server("qemu-nbd", ""),
    Server("ours:mem", "disk"),
    Server("ours:file", "disk"),
    Server("ours:file-threaded", "disk"),
    Server("nbdkit:memory", ""),
]
BASELINE = "qemu-nbd"


def create_sparse(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running(server: Server, workdir: Path) -> Iterator[tuple[str, int]]:
    socket_path = str(workdir / "bench.sock")
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    proc = subprocess.Popen(
        server.command(workdir, socket_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} did not start: {proc.stderr and proc.stderr.read()}"
                )
            time.sleep(0.05)
        time.sleep(0.2)
        yield f"nbd+unix:///{server.uri_name}?socket={socket_path}", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(uri: str, workload: Workload, pid: int) -> tuple[float, float]:
    """One qemu-img bench run: (requests or MB per second, server CPU µs per request)."""
    args = [
        "qemu-img", "bench", "-f", "raw", "-c", str(workload.count), "-d", str(workload.depth),
        "-s", str(workload.size), "-S", str(workload.step),
    ]  # fmt: skip
    if workload.write:
        args.append("-w")
    cpu_before = cpu_seconds(pid)
    proc = subprocess.run(
        [*args, uri], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    cpu = cpu_seconds(pid) - cpu_before
    match = re.search(r"Run completed in ([0-9.]+) seconds", proc.stdout)
    if proc.returncode or not match:
        raise RuntimeError(f"qemu-img bench failed: {proc.stdout}{proc.stderr}")
    seconds = float(match.group(1))
    per_second = workload.count / seconds
    if workload.per_second_unit == "MB/s":
        per_second = per_second * workload.size / 1e6
    return per_second, cpu / workload.count * 1e6


def fmt(value: float, unit: str) -> str:
    return f"{value / 1000:.1f}k" if unit == "IOPS" else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale request counts")
    parser.add_argument(
        "--servers", default=",".join(s.name for s in SERVERS), help="comma-separated subset"
    )
    parser.add_argument(
        "--serve", nargs=3, metavar=("KIND", "IMAGE", "SOCKET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    missing = [tool for tool in ("qemu-img", "qemu-nbd", "nbdkit") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (make debs)")
    selected = [s for s in SERVERS if s.name in args.servers.split(",")]
    loads = workloads(args.scale)
    print(f"load average before: {os.getloadavg()[0]:.2f}  cpus: {os.cpu_count()}")
    results: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nbdbench", dir="/tmp") as tmp:
        for server in selected:
            with running(server, Path(tmp)) as (uri, pid):
                for workload in loads:
                    runs = [bench(uri, workload, pid) for _ in range(args.repeat)]
                    value = statistics.median(r[0] for r in runs)
                    cpu = statistics.median(r[1] for r in runs)
                    results[(server.name, workload.name)] = (value, cpu)
                    print(
                        f"  {server.name:20} {workload.name:16} "
                        f"{fmt(value, workload.per_second_unit):>8} {workload.per_second_unit}"
                        f"  server cpu {cpu:6.1f} us/req",
                        flush=True,
                    )
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    header = f"{'workload':18}" + "".join(f"{s.name:>26}" for s in selected)
    print(header)
    print("-" * len(header))
    for workload in loads:
        base = results.get((BASELINE, workload.name))
        row = f"{workload.name:18}"
        for server in selected:
            value, cpu = results[(server.name, workload.name)]
            ratio = f" ({value / base[0]:.2f}x)" if base else ""
            cell = f"{fmt(value, workload.per_second_unit)}{ratio} {cpu:.1f}us"
            row += f"{cell:>26}"
        print(f"{row}   [{workload.per_second_unit}, ratio vs {BASELINE}, server CPU/req]")


def serve(kind: str, image: str, socket_path: str) -> None:
    """The benchmarked server process: one export named 'disk' until SIGTERM."""
    from secondsite.appliance.nbd import (
        DictExportProvider,
        Export,
        FileExport,
        MemoryExport,
        run,
        serve_unix,
    )

    async def main() -> None:
        export: Export
        if kind == "mem":
            export = MemoryExport(IMAGE_SIZE)
        else:
            export = FileExport(image, threaded=kind == "file-threaded")
        server = await serve_unix(socket_path, DictExportProvider({"disk": export}))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()

    run(main())


if __name__ == "__main__":
    main()
