"""Write-order fidelity across two protected appliances feeding one recovery journal.

One VPG, two volumes on two protected appliances (prot-a has vol0, prot-b has vol1), journaled on
the recovery appliance. The dependent-write workload of `tests/e2e/appliance/write_oracle.py`
alternates between the volumes, so every write depends on one acknowledged by the *other*
appliance. Each checkpoint is a cut across both appliances (hold acks on each, mark, release):
every consistent checkpoint must be the replay of a prefix of the workload holding every write
acknowledged before the checkpoint's time, and later checkpoints hold longer prefixes.

The checkpoint's time: the recovery side marks its journal's checkpoint once both marks have
reached it, which may be after the appliances were released. Until the journal takes the time of
the cut (``mark_checkpoint(..., time_ns=...)``), a checkpoint is dated when marked, so the check
uses the previous checkpoint's time instead (cuts are taken one after another: every write
acknowledged before the previous checkpoint was marked was acknowledged before this cut began).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from pathlib import Path

import pytest
from appliance_harness import connect_and_go, env_seed
from replication_harness import (
    MiB,
    Node,
    Pki,
    free_port,
    protected_node,
    recovery_node,
    requires_peers,
    wait_identical,
)
from write_oracle import BLOCK, Verdict, Workload, check_monotonic, drive

from secondsite.appliance.journal import Journal, JournalConfig

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers, pytest.mark.timeout(240)]

VPG = "db"
SIZE = 4 * MiB
REGION = (MiB, 64)
"""Where the workload writes (offset, blocks)."""
LOAD_SECONDS = 12.0
EXACT_TIMES = "time_ns" in inspect.signature(Journal.mark_checkpoint).parameters


async def read_region(journal: Journal, volume: str, cid: int | None) -> bytes:
    image = await (journal.open_latest(volume) if cid is None else journal.open_image(volume, cid))
    try:
        return await image.read(REGION[0], REGION[1] * BLOCK)
    finally:
        image.close()


async def test_checkpoints_are_cuts_across_two_protected_appliances(
    workdir: Path, pki: Pki, nodes: list[Node]
) -> None:
    port = free_port()
    recovery = recovery_node(
        workdir, pki, port, VPG, ["prot-a", "prot-b"], checkpointIntervalSeconds=0.2
    )
    prot_a = protected_node(workdir, pki, "prot-a", port, VPG, {"vol0": SIZE})
    prot_b = protected_node(workdir, pki, "prot-b", port, VPG, {"vol1": SIZE})
    nodes += [recovery, prot_a, prot_b]
    recovery.start()
    prot_a.start()
    prot_b.start()
    sources = {"vol0": workdir / "vol0.img", "vol1": workdir / "vol1.img"}
    await wait_identical(sources, recovery, timeout=30)

    workload = Workload(
        ["vol0", "vol1"],
        region_offset=REGION[0],
        region_blocks=REGION[1],
        seed=env_seed("REPLICATION_ORACLE_SEED", 20261125),
    )
    clients = [
        (await connect_and_go(str(prot_a.nbd_socket), "vol0"))[0],
        (await connect_and_go(str(prot_b.nbd_socket), "vol1"))[0],
    ]
    started = time.time_ns()
    try:
        acked = await drive(workload, clients, seconds=LOAD_SECONDS, max_writes=10**6)
    finally:
        for c in clients:
            await c.close()
    await wait_identical(sources, recovery, timeout=20)
    await asyncio.sleep(1.0)  # a few checkpoints after the last write
    status = await recovery.vpg_status(VPG)
    hold = status.hold_ms
    prot_a.stop()
    prot_b.stop()
    recovery.stop()

    oracle = workload.oracle()
    journal = await Journal.open(workdir / "recovery" / "journal", JournalConfig(vpg=VPG))
    try:
        latest = {v: await read_region(journal, v, None) for v in ("vol0", "vol1")}
        final = oracle.check(latest, time.time_ns(), "latest", REGION[0])
        assert final.prefix == len(workload.writes)
        verdicts: dict[int, Verdict] = {}
        checkpoints = journal.checkpoints.between()
        for previous, cp in itertools.pairwise(checkpoints):
            if cp.time_ns < started:
                continue
            assert cp.consistent, f"checkpoint {cp.id} not consistent: both sources were synced"
            images = {v: await read_region(journal, v, cp.id) for v in ("vol0", "vol1")}
            at = cp.time_ns if EXACT_TIMES else previous.time_ns
            verdicts[cp.id] = oracle.check(images, at, f"checkpoint {cp.id}", REGION[0])
        check_monotonic(oracle, sorted(verdicts.items()))
    finally:
        await journal.close()
    prefixes = sorted({v.prefix for v in verdicts.values()})
    print(
        f"[oracle two sources] writes={acked} checkpoints_verified={len(verdicts)} "
        f"distinct_prefixes={len(prefixes)} hold_ms={hold}"
    )
    assert len(verdicts) >= LOAD_SECONDS / 0.2 / 2, "too few checkpoints were taken under load"
    assert len(prefixes) >= len(verdicts) // 2, "checkpoints did not advance with the load"
