"""Benchmark of reverse protection: resync with a delta sync against a full initial sync, in one
run.

Run: ``.venv/bin/python tests/bench/bench_reverse.py`` (a script, not a test; ``--help`` for
options). Twice, once per ``initialSync`` of the reversed protection (``delta``, then ``full`` as
the baseline), on loopback with two `secondsite appliance` processes (mutual TLS, as in the e2e
tests):

1. P protects a volume of ``--size`` bytes of random data to R (initial sync, not timed);
2. R tags a checkpoint; P stops, and ``--changed-percent`` of its 4 KiB blocks (scattered) change
   on its disk: writes P acknowledged after the checkpoint R fails over to;
3. R promotes to the checkpoint, commits and reverses; P starts again and reverses.

Timed from P's reverse until R's protected status says the volume is Protected again (every
block that differs shipped and durable on P); then P's latest image must equal R's disk. Printed:
seconds, payload and wire bytes R -> P, and the ratios delta / full.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e" / "replication"))
from bench_delta_sync import fill, scatter
from replication_harness import (
    MiB,
    Node,
    Pki,
    eventually,
    free_port,
    make_pki,
    protected_node,
    recovery_node,
    wait_identical,
)

VPG = "bench"
TIMEOUT = 900.0
JOURNAL = {"history": "1h", "checkpointIntervalSeconds": 0.5, "segmentBytes": 64 * MiB}


async def reverse_run(
    root: Path, pki: Pki, size: int, percent: float, initial_sync: str
) -> dict[str, float]:
    work = root / initial_sync
    work.mkdir()
    r_port, p_port = free_port(), free_port()
    p_disk = work / "vol0.img"
    fill(p_disk, size, seed=1)
    r = recovery_node(work, pki, r_port, VPG, ["prot-a"], **JOURNAL)
    p = protected_node(
        work,
        pki,
        "prot-a",
        r_port,
        VPG,
        {"vol0": size},
        appliance={"listen": {"stream": f"127.0.0.1:{p_port}"}},
    )
    nodes: list[Node] = [r, p]
    try:
        r.start()
        p.start()
        await wait_identical({"vol0": p_disk}, r, timeout=TIMEOUT)
        async with r.client() as c:
            await c.take_checkpoint(VPG, tag="failover")
        p.stop()
        changed = scatter(p_disk, size, percent, seed=2)
        async with r.client() as c:
            await c.promote(VPG, "tag:failover")
            await c.commit(VPG)
            await c.reverse(
                VPG,
                "protected",
                peer="prot-a",
                peer_stream=f"127.0.0.1:{p_port}",
                settings={"initialSync": initial_sync},
            )
        p.start()
        started = time.monotonic()
        async with p.client() as c:
            await c.reverse(VPG, "recovery", peer="recovery", settings=JOURNAL)

        async def protected() -> bool:
            st = await r.protected_status(VPG)
            return st.connected and st.volumes["vol0"].state == "Protected"

        await eventually(protected, TIMEOUT, "R's reversed protection Protected")
        seconds = time.monotonic() - started
        r_disk = work / "recovery" / "journal" / "replicas" / "vol0.img"
        await wait_identical({"vol0": r_disk}, p, timeout=TIMEOUT)
        source = (await p.vpg_status(VPG)).replication
        assert source is not None
        got = source.sources["recovery"]
        p.stop()
        r.stop()
        return {
            "seconds": seconds,
            "changed": float(changed),
            "payload": float(got.payload_bytes),
            "wire": float(got.wire_bytes or 0),
        }
    finally:
        for node in nodes:
            node.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512 * MiB, help="volume bytes (512 MiB)")
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--dir", default="/var/tmp", help="where the volume files go")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ssrev", dir=args.dir))
    try:
        pki_dir = root / "pki"
        pki_dir.mkdir()
        pki = make_pki(pki_dir)
        runs = {
            mode: await reverse_run(root, pki, args.size, args.changed_percent, mode)
            for mode in ("delta", "full")
        }
        load = os.getloadavg()
        delta, full = runs["delta"], runs["full"]
        print(
            f"volume {args.size / MiB:.0f} MiB of random data; {delta['changed'] / MiB:.1f} MiB "
            f"({args.changed_percent:g} %) changed on P after the failover checkpoint"
        )
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores shared)")
        print(f"{'initialSync':<14}{'seconds':>10}{'payload MiB':>14}{'wire MiB':>12}  (R -> P)")
        for mode, run in runs.items():
            print(
                f"{mode:<14}{run['seconds']:>10.2f}{run['payload'] / MiB:>14.1f}"
                f"{run['wire'] / MiB:>12.1f}"
            )
        print(
            f"ratio delta / full: time {delta['seconds'] / full['seconds']:.2f}, payload bytes "
            f"{delta['payload'] / max(full['payload'], 1):.4f}, wire bytes "
            f"{delta['wire'] / max(full['wire'], 1):.4f}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
