"""kill -9 `secondsite appliance` under dependent writes at random moments, and restart it.

The appliance serves two in-path volumes of one VPG (checkpoints every second, 1 MiB journal
segments so that they roll often). Each cycle starts it, loads it with the oracle's dependent
writes over NBD for a random 0.3-2 s, and kills it with SIGKILL; the workload goes on after the
restart. The write in flight at a kill is uncertain (no ack: it may or may not be there).

At the end, after a clean stop (DESIGN guarantees 1-3):
- the journal opens; the torn tails the restarts found were cut (a clean open finds none);
- the latest image of each volume is the replay of every acked write (an uncertain write may be
  there or not) and equals the in-path backing file;
- every consistent checkpoint passes the oracle. An unclean stop makes in-path volumes resync
  (delta), and checkpoints meanwhile are marked not consistent: the oracle need not hold for them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_harness import (
    ApplianceProcess,
    KiB,
    MiB,
    NBDClient,
    connect_and_go,
    env_seed,
    requires_peers,
)
from write_oracle import BLOCK, Verdict, Workload, check_monotonic, drive

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.journal import Journal, JournalConfig

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers]

VPG = "crashy"
VOLUMES = ("vol0", "vol1")
VOLUME_SIZE = 512 * MiB
"""Large enough (sparse) that the delta resync after each kill takes a good part of a second:
load, checkpoints and the next kill land during it."""
REGION = (256 * MiB - 128 * KiB, 64)
"""Where the workload writes (offset, blocks): across a boundary of the resync's chunks, which
reaches it while the workload runs."""
KILLS = 22
MAX_SECONDS = 200
SEGMENT = MiB


def appliance_config(workdir: Path) -> ApplianceConfig:
    volumes = []
    for name in VOLUMES:
        backing = workdir / f"{name}.img"
        backing.touch()
        os.truncate(backing, VOLUME_SIZE)
        volumes.append({"name": name, "vpg": VPG, "backing": str(backing)})
    return ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(workdir / "app.sock")},
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "journal"),
                    "checkpointIntervalSeconds": 1,
                    "segmentBytes": SEGMENT,
                }
            ],
            "volumes": volumes,
        }
    )


async def connect(socket: Path) -> list[NBDClient]:
    clients = []
    for name in VOLUMES:
        client, _ = await connect_and_go(str(socket), name)
        clients.append(client)
    return clients


async def close(clients: list[NBDClient]) -> None:
    for client in clients:
        await client.close()


async def load_until_killed(
    proc: ApplianceProcess, workload: Workload, socket: Path, kill_after: float
) -> int:
    """Dependent writes until the appliance, killed after ``kill_after`` s, drops them."""
    clients = await connect(socket)

    killed = asyncio.Event()

    async def killer() -> None:
        await asyncio.sleep(kill_after)
        killed.set()
        await asyncio.to_thread(proc.kill)

    kill = asyncio.create_task(killer())
    before = workload.acked_count
    try:
        await drive(workload, clients, seconds=kill_after + 20, max_writes=10**7)
        raise AssertionError("the workload outlived the kill")
    except (EOFError, ConnectionError) as e:  # the kill: IncompleteReadError, reset, broken pipe
        if not killed.is_set():
            raise AssertionError(f"connection lost before the kill: {e!r}\n{proc.log()}") from e
    finally:
        await kill
        await close(clients)
    return workload.acked_count - before


async def read_image(journal: Journal, volume: str, cid: int | None) -> bytes:
    """The workload's region of a volume at checkpoint ``cid`` (None: in its latest view)."""
    image = await (journal.open_latest(volume) if cid is None else journal.open_image(volume, cid))
    try:
        return await image.read(REGION[0], REGION[1] * BLOCK)
    finally:
        image.close()


async def assert_latest_is_backing(journal: Journal, volume: str, backing: Path) -> None:
    """In-path: after a clean stop the journal's latest view equals the backing file."""
    chunk = 32 * MiB
    image = await journal.open_latest(volume)
    try:
        with backing.open("rb") as f:
            for offset in range(0, VOLUME_SIZE, chunk):
                if await image.read(offset, chunk) != f.read(chunk):
                    raise AssertionError(f"{volume}: journal != backing in [{offset}, +{chunk})")
    finally:
        image.close()


async def verify(
    journal_dir: Path, workload: Workload, backing: dict[str, Path]
) -> tuple[int, int, int, dict[int, Verdict]]:
    """Open the journal after the clean stop and check everything; returns the number of
    checkpoints, of inconsistent ones, of those that are not prefixes, and the verdicts of the
    consistent ones."""
    oracle = workload.oracle()
    journal = await Journal.open(journal_dir, JournalConfig(vpg=VPG, segment_size=SEGMENT))
    try:
        # Every acked write, nothing unacked but the uncertain ones: the latest view.
        latest = {name: await read_image(journal, name, None) for name in VOLUMES}
        for name in VOLUMES:
            await assert_latest_is_backing(journal, name, backing[name])
        verdict = oracle.check(latest, time.time_ns(), "latest", REGION[0])
        assert oracle.certain_floor(verdict.prefix) == oracle.certain_floor(len(workload.writes))

        checkpoints = journal.checkpoints.between()
        verdicts: dict[int, Verdict] = {}
        not_prefixes = 0
        for cp in checkpoints:
            images = {name: await read_image(journal, name, cp.id) for name in VOLUMES}
            what = f"checkpoint {cp.id}"
            if cp.consistent:
                verdicts[cp.id] = oracle.check(images, cp.time_ns, what, REGION[0])
                continue
            try:  # marked not consistent, rightly so or not: count the ones that needed it
                oracle.check(images, cp.time_ns, what, REGION[0])
            except AssertionError:
                not_prefixes += 1
        check_monotonic(oracle, sorted(verdicts.items()))
        return len(checkpoints), len(checkpoints) - len(verdicts), not_prefixes, verdicts
    finally:
        await journal.close()


async def test_kill_9_under_load(
    workdir: Path,
    cleanup: list[Callable[[], object]],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(env_seed("CRASH_SEED", 20261125))
    config = appliance_config(workdir)
    socket = workdir / "app.sock"
    proc = ApplianceProcess(config, workdir)
    cleanup.append(proc.close)
    workload = Workload(
        VOLUMES, region_offset=REGION[0], region_blocks=REGION[1], seed=rng.randrange(2**32)
    )
    deadline = time.monotonic() + MAX_SECONDS
    kills = 0
    per_cycle: list[int] = []
    while kills < KILLS and time.monotonic() < deadline:
        proc.start()
        per_cycle.append(
            await load_until_killed(proc, workload, socket, kill_after=rng.uniform(0.3, 2.0))
        )
        kills += 1
    assert kills >= 20, f"only {kills} kills in {MAX_SECONDS}s"
    assert min(per_cycle) > 0, f"a cycle acked nothing: {per_cycle}"

    # A last run: more load during the resync, its end, a clean stop.
    proc.start()
    clients = await connect(socket)
    try:
        await drive(workload, clients, seconds=1.5, max_writes=10**7)
    finally:
        for client in clients:
            await client.disconnect()
        await close(clients)
    await asyncio.to_thread(proc.wait_log, "event=resync-done", len(VOLUMES))
    await asyncio.sleep(1.2)  # a consistent checkpoint after the last write
    proc.stop()

    log = proc.log_file.read_text()
    torn_cut = log.count("journal: torn tail cut")
    # Every start after a kill resyncs both volumes (a delta sync: fresh=False); kills often
    # land during one, and the next start begins it again.
    resyncs = sum(
        1 for line in log.splitlines() if "event=resync-start" in line and "fresh=False" in line
    )
    assert "Traceback" not in log and "level=ERROR" not in log, proc.log(200)
    assert resyncs >= kills * len(VOLUMES), f"{resyncs} delta resyncs after {kills} kills"
    resync_seconds = sorted(
        float(line.rpartition("seconds=")[2])
        for line in log.splitlines()
        if "event=resync-done" in line and "fresh=" not in line
    )
    uncertain = sum(1 for w in workload.writes if w.uncertain)

    with caplog.at_level(logging.WARNING, logger="secondsite.appliance.journal"):
        total, inconsistent, not_prefixes, verdicts = await verify(
            workdir / "journal", workload, {n: workdir / f"{n}.img" for n in VOLUMES}
        )
    assert not [r.getMessage() for r in caplog.records if "torn" in r.getMessage()], (
        "a torn tail after a clean stop"
    )
    with capsys.disabled():
        print(
            f"\n[crash] kills={kills} acked_writes={workload.acked_count} uncertain={uncertain} "
            f"torn_tails_cut={torn_cut} delta_resyncs={resyncs} "
            f"(finished {len(resync_seconds)}, median {resync_seconds[len(resync_seconds) // 2]}s) "
            f"checkpoints={total} "
            f"verified={len(verdicts)} inconsistent={inconsistent} "
            f"(of which not prefixes: {not_prefixes})"
        )
    # About one checkpoint per second of load (a cycle loads for 0.3-2 s).
    assert len(verdicts) >= kills // 2, f"only {len(verdicts)} consistent checkpoints"
