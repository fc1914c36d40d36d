"""Benchmark of delta sync by block checksums against a full copy with ``nbdcopy``, in one run.

Run: ``.venv/bin/python tests/bench/bench_delta_sync.py`` (a script, not a test; ``--help`` for
options). A volume of ``--size`` bytes (default 4 GiB) of random data is the source; the recovery
appliance's replica holds an older copy of it, in which ``--changed-percent`` of the 4 KiB blocks
(default 1 %, scattered) differ. Then, on loopback:

1. delta: a recovery and a protected appliance (`secondsite appliance` processes, mutual TLS, as
   in the e2e tests) with ``initialSync: delta``: the protected side asks for block checksums of
   the replica and ships only the blocks that differ. Timed from the protected appliance's start
   until its status says the delta sync is done (the appliance's own figure, from its log, is
   printed too); then the replica must compare identical (``qemu-img compare``).
2. baseline: ``nbdcopy`` of the whole source to an NBD target (``qemu-nbd`` on a file).

Both go through a TCP proxy of this script's that counts the bytes on the wire, both ways. Printed:
seconds, wire bytes, and the ratios delta / baseline. Files are on the disk under ``--dir`` and are
read through the page cache (dropped before each run when ``/proc/sys/vm/drop_caches`` is writable,
i.e. as root, unless ``--keep-caches``; the output says which). Here the source, the replica and
the nbdcopy target share one disk: the delta sync reads the volume twice from it (source and
replica), nbdcopy once (its writes land in the page cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "replication"))
from replication_harness import (
    MiB,
    Node,
    eventually,
    free_port,
    make_pki,
    protected_node,
    recovery_node,
    wait_identical,
)

VPG = "bench"
BLOCK = 4096
RUN_TIMEOUT = 900.0


class CountingProxy:
    """Forwards TCP connections from a loopback port to ``target``, counting bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0
        """Bytes from the client to the target."""
        self.down = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer, "up"),
            self._pipe(up_reader, writer, "down"),
            return_exceptions=True,
        )
        self._writers -= {writer, up_writer}

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        try:
            while chunk := await reader.read(1 << 20):
                if way == "up":
                    self.up += len(chunk)
                else:
                    self.down += len(chunk)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    @property
    def total(self) -> int:
        return self.up + self.down

    async def close(self) -> None:
        """Stop listening and reset the connections still open (their handlers then end)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def proxy_to(port: int) -> AsyncIterator[CountingProxy]:
    proxy = CountingProxy(("127.0.0.1", port))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def fill(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(0, size, 8 * MiB):
            f.write(rng.randbytes(8 * MiB))


def scatter(path: Path, size: int, percent: float, seed: int) -> int:
    rng = random.Random(seed)
    blocks = size // BLOCK
    chosen = rng.sample(range(blocks), max(1, int(blocks * percent / 100)))
    with open(path, "r+b") as f:
        for index in sorted(chosen):
            f.seek(index * BLOCK)
            f.write(rng.randbytes(BLOCK))
    return len(chosen) * BLOCK


def drop_caches(keep: bool) -> bool:
    os.sync()
    if keep:
        return False
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


async def delta_run(work: Path, size: int, source: Path, keep: bool) -> dict[str, float]:
    (work / "pki").mkdir()
    pki = make_pki(work / "pki", ("recovery", "prot-a"))
    port = free_port()
    recovery = recovery_node(work, pki, port, VPG, ["prot-a"])
    nodes: list[Node] = [recovery]
    async with proxy_to(port) as proxy:
        prot = protected_node(
            work, pki, "prot-a", port, VPG, {"vol0": size},
            recovery=f"127.0.0.1:{proxy.port}", initialSync="delta",
        )  # fmt: skip
        nodes.append(prot)
        try:
            recovery.start()
            dropped = drop_caches(keep)
            started = time.monotonic()
            prot.start()

            async def done() -> bool:
                st = await prot.protected_status(VPG)
                delta = st.volumes["vol0"].delta_sync
                return st.state == "Protected" and delta is not None and not delta.running

            await eventually(done, RUN_TIMEOUT, "the delta sync to finish")
            seconds = time.monotonic() - started
            st = await prot.protected_status(VPG)
            delta = st.volumes["vol0"].delta_sync
            assert delta is not None
            logged = re.findall(r"event=delta-compared .* seconds=([0-9.]+)", prot.log(200))
            wire = proxy.total
            # (The recovery side lists a new volume's PIT export shortly after it joined.)
            await wait_identical({"vol0": source}, recovery, timeout=120)
            return {
                "seconds": seconds,
                "appliance_seconds": float(logged[-1]) if logged else float("nan"),
                "wire": float(wire),
                "up": float(proxy.up),
                "down": float(proxy.down),
                "shipped": float(delta.shipped_bytes),
                "dropped": float(dropped),
            }
        finally:
            for node in nodes:
                node.close()


async def nbdcopy_run(work: Path, size: int, source: Path, keep: bool) -> dict[str, float]:
    target = work / "target.img"
    with open(target, "wb") as f:
        f.truncate(size)
    port = free_port()
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), str(target)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with proxy_to(port) as proxy:
            deadline = time.monotonic() + 10
            while subprocess.run(
                ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, check=False
            ).returncode:
                if time.monotonic() > deadline:
                    raise SystemExit("qemu-nbd did not come up")
                await asyncio.sleep(0.1)
            dropped = drop_caches(keep)
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                "nbdcopy", str(source), f"nbd://127.0.0.1:{proxy.port}"
            )
            if await asyncio.wait_for(proc.wait(), RUN_TIMEOUT):
                raise SystemExit("nbdcopy failed")
            seconds = time.monotonic() - started
            return {"seconds": seconds, "wire": float(proxy.total), "dropped": float(dropped)}
    finally:
        server.terminate()
        server.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4 << 30, help="volume bytes (4 GiB)")
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--dir", default="/var/tmp", help="where the volume files go")
    parser.add_argument(
        "--keep-caches", action="store_true", help="do not drop the page cache before each run"
    )
    args = parser.parse_args()
    size = args.size
    work = Path(tempfile.mkdtemp(prefix="ssdelta", dir=args.dir))
    try:
        source = work / "vol0.img"
        t0 = time.monotonic()
        fill(source, size, seed=1)
        replica = work / "recovery" / "journal" / "replicas" / "vol0.img"
        replica.parent.mkdir(parents=True)
        shutil.copyfile(source, replica)
        changed = scatter(source, size, args.changed_percent, seed=2)
        print(
            f"volume {size / MiB:.0f} MiB of random data, {changed / MiB:.1f} MiB changed in "
            f"{changed // BLOCK} scattered 4 KiB blocks ({args.changed_percent:g} %); "
            f"set up in {time.monotonic() - t0:.1f} s"
        )
        base = await nbdcopy_run(work, size, source, args.keep_caches)
        (work / "target.img").unlink()
        delta = await delta_run(work, size, source, args.keep_caches)
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores shared)")
        print(f"caches dropped before each run: {bool(base['dropped'] and delta['dropped'])}")
        print(f"{'run':<28}{'seconds':>10}{'wire MiB':>12}")
        print(f"{'nbdcopy (whole volume)':<28}{base['seconds']:>10.2f}{base['wire'] / MiB:>12.1f}")
        print(
            f"{'delta sync (start to done)':<28}{delta['seconds']:>10.2f}"
            f"{delta['wire'] / MiB:>12.1f}"
        )
        print(f"{'delta sync (appliance log)':<28}{delta['appliance_seconds']:>10.2f}")
        print(
            f"delta: shipped {delta['shipped'] / MiB:.1f} MiB of blocks; wire "
            f"{delta['up'] / MiB:.1f} MiB protected->recovery, {delta['down'] / MiB:.1f} MiB back"
        )
        print(
            f"ratio delta / nbdcopy: time {delta['seconds'] / base['seconds']:.2f} "
            f"(appliance's own {delta['appliance_seconds'] / base['seconds']:.2f}), "
            f"wire bytes {delta['wire'] / base['wire']:.4f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
