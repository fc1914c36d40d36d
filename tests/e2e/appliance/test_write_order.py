"""Write-order fidelity (DESIGN guarantee 2) under both capture modes, checked by the oracle.

A dependent-write workload alternates 4 KiB writes across two volumes of one VPG while the VPG
takes a checkpoint every second (and a few tagged ones on request). Afterwards every consistent
checkpoint's PIT images, read over NBD by id, must be the replay of a prefix of the workload that
holds every write acked before the checkpoint was marked (see write_oracle.py).

- in-path: the workload writes to the appliance's own exports.
- mirror-target: the workload writes to qemu-storage-daemon's NBD exports of two source disks;
  the daemon mirrors each (blockdev-mirror, sync=full, copy-mode=write-blocking) to the
  appliance, which learns from QMP when each job is ready. Checkpoints before that are not
  consistent, and `latest` never picks them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_harness import (
    ApplianceThread,
    MiB,
    StorageDaemon,
    connect_and_go,
    env_seed,
    export_description,
    nbd_uri,
    peer,
    read_images,
    requires_peers,
)
from nbd_client import OptionFailed
from write_oracle import Oracle, Verdict, Workload, check_monotonic, drive

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.journal import Checkpoint
from secondsite.appliance.vpg import SyncState

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers]

VPG = "vpg1"
VOLUMES = ("vol0", "vol1")
VOLUME_SIZE = MiB
LOAD_SECONDS = 8.0
MAX_WRITES = 100_000
TAGS = 3


def appliance_config(workdir: Path, mirror: StorageDaemon | None) -> ApplianceConfig:
    volumes: list[dict[str, object]] = []
    for name in VOLUMES:
        if mirror is None:
            backing = workdir / f"{name}.img"
            backing.touch()
            os.truncate(backing, VOLUME_SIZE)
            volumes.append({"name": name, "vpg": VPG, "backing": str(backing)})
        else:
            volumes.append(mirror.volume_spec(name, VPG, VOLUME_SIZE, monitor="appliance"))
    return ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(workdir / "app.sock")},
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "journal"),
                    "checkpointIntervalSeconds": 1,
                    "segmentBytes": 4 * MiB,
                }
            ],
            "volumes": volumes,
        }
    )


async def load_with_tags(
    appliance: ApplianceThread, workload: Workload, socket: Path, export_prefix: str = ""
) -> dict[str, int]:
    """Run the workload for LOAD_SECONDS and request TAGS tagged checkpoints meanwhile;
    returns tag -> wall-clock time it was requested."""
    clients = []
    for name in VOLUMES:
        client, info = await connect_and_go(str(socket), export_prefix + name)
        assert info.size == VOLUME_SIZE
        clients.append(client)
    requested: dict[str, int] = {}

    async def tagger() -> None:
        for i in range(TAGS):
            await asyncio.sleep(LOAD_SECONDS / (TAGS + 1))
            tag = f"t{i}"
            requested[tag] = time.time_ns()
            cp = await appliance.acall(appliance.vpg(VPG).checkpoint(tag))
            assert cp.tag == tag

    try:
        acked, _ = await asyncio.gather(
            drive(workload, clients, seconds=LOAD_SECONDS, max_writes=MAX_WRITES), tagger()
        )
    finally:
        for client in clients:
            await client.disconnect()
            await client.close()
    assert acked > 500, f"only {acked} writes in {LOAD_SECONDS}s"
    return requested


async def verify_checkpoints(
    appliance: ApplianceThread, socket: Path, oracle: Oracle, requested: dict[str, int]
) -> tuple[list[Checkpoint], dict[int, Verdict]]:
    """Check every consistent checkpoint's images against the oracle, read over NBD by id; the
    tagged ones also by tag. Returns all checkpoints and the verdicts."""
    journal = appliance.vpg(VPG).journal
    assert journal is not None
    checkpoints = await appliance.async_sync(journal.checkpoints.between)
    verdicts: dict[int, Verdict] = {}
    for cp in checkpoints:
        if not cp.consistent:
            continue
        images = await read_images(socket, VOLUMES, str(cp.id))
        verdicts[cp.id] = oracle.check(images, cp.time_ns, f"checkpoint {cp.id}")
        if cp.tag is not None:
            assert cp.time_ns >= requested[cp.tag]
            assert await read_images(socket, VOLUMES, f"tag:{cp.tag}") == images
    check_monotonic(oracle, sorted(verdicts.items()))
    assert sorted(cp.tag for cp in checkpoints if cp.tag in requested) == sorted(requested)
    return checkpoints, verdicts


async def assert_latest_is(socket: Path, cid: int) -> None:
    for name in VOLUMES:
        description = await export_description(socket, f"pit/{name}@latest")
        assert f"at checkpoint {cid} " in description, description


def report(capsys: pytest.CaptureFixture[str], what: str, line: str) -> None:
    with capsys.disabled():
        print(f"\n[{what}] {line}")


async def test_in_path_checkpoints_are_prefixes(
    workdir: Path, cleanup: list[Callable[[], object]], capsys: pytest.CaptureFixture[str]
) -> None:
    appliance = ApplianceThread(appliance_config(workdir, None))
    cleanup.append(appliance.stop)
    appliance.start()
    await asyncio.to_thread(appliance.wait_consistent, VPG)
    socket = workdir / "app.sock"
    workload = Workload(VOLUMES, seed=env_seed("ORACLE_SEED", 1))
    started_ns = time.time_ns()
    requested = await load_with_tags(appliance, workload, socket)
    final = await appliance.acall(appliance.vpg(VPG).checkpoint("final"))
    requested["final"] = final.time_ns

    oracle = workload.oracle()
    checkpoints, verdicts = await verify_checkpoints(appliance, socket, oracle, requested)
    # The final checkpoint holds every write: all were acked before it.
    assert verdicts[final.id].prefix == len(workload.writes)
    assert not [c.id for c in checkpoints if not c.consistent and c.time_ns >= started_ns]
    during = [c for c in checkpoints if started_ns <= c.time_ns and c.tag is None]
    assert len(during) >= LOAD_SECONDS - 2, f"only {len(during)} automatic checkpoints"
    await assert_latest_is(socket, final.id)
    # In-path: the backing files are the volumes; they equal the final checkpoint's images.
    for name in VOLUMES:
        peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", workdir / f"{name}.img",
             nbd_uri(socket, f"pit/{name}@latest"))  # fmt: skip
    appliance.stop()
    assert not appliance.errors.messages()
    report(
        capsys,
        "oracle in-path",
        f"writes={len(workload.writes)} checkpoints_verified={len(verdicts)} "
        f"tagged={len(requested)} inconsistent={len(checkpoints) - len(verdicts)}",
    )


async def test_mirror_target_checkpoints_are_prefixes(
    workdir: Path, cleanup: list[Callable[[], object]], capsys: pytest.CaptureFixture[str]
) -> None:
    sources = {name: workdir / f"src-{name}.img" for name in VOLUMES}
    for path in sources.values():
        peer("qemu-img", "create", "-f", "raw", path, str(VOLUME_SIZE))
    socket = workdir / "app.sock"
    # The appliance follows both jobs on one QMP monitor (QMP serves one client per socket:
    # both volumes must share the connection); the test drives the daemon on another.
    daemon = StorageDaemon(workdir, sources, socket, monitors=("test", "appliance"))
    appliance = ApplianceThread(appliance_config(workdir, daemon))
    cleanup.append(appliance.stop)
    appliance.start()
    cleanup.append(daemon.close)
    daemon.start()
    qmp = await daemon.qmp()
    vpg = appliance.vpg(VPG)

    # No mirror job yet: the volumes are not synced, checkpoints are not consistent, and
    # `latest` has nothing to offer.
    early = await appliance.acall(vpg.checkpoint("before-mirror"))
    assert not early.consistent
    with pytest.raises(OptionFailed):
        await export_description(socket, f"pit/{VOLUMES[0]}@latest")
    await asyncio.sleep(1.2)  # at least one automatic checkpoint too
    mirror_requested_ns = time.time_ns()
    jobs = [await daemon.start_mirror(qmp, name) for name in VOLUMES]
    await StorageDaemon.wait_ready(qmp, jobs)
    await asyncio.to_thread(appliance.wait_consistent, VPG, 10)
    states = await appliance.async_sync(lambda: {n: v.state for n, v in vpg.volumes.items()})
    assert set(states.values()) == {SyncState.PROTECTED}

    workload = Workload(VOLUMES, seed=env_seed("ORACLE_SEED", 2))
    started_ns = time.time_ns()
    requested = await load_with_tags(appliance, workload, daemon.nbd_socket)
    final = await appliance.acall(vpg.checkpoint("final"))
    requested["final"] = final.time_ns
    requested["before-mirror"] = early.time_ns
    for name, path in sources.items():
        peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", path,
             nbd_uri(socket, f"pit/{name}@latest"))  # fmt: skip

    oracle = workload.oracle()
    checkpoints, verdicts = await verify_checkpoints(appliance, socket, oracle, requested)
    assert verdicts[final.id].prefix == len(workload.writes)
    before = [c for c in checkpoints if c.time_ns < mirror_requested_ns]
    assert len(before) >= 2 and not [c.id for c in before if c.consistent]
    assert not [c.id for c in checkpoints if not c.consistent and c.time_ns >= started_ns]
    await assert_latest_is(socket, final.id)

    # The mirror goes away: the appliance learns it, later checkpoints are not consistent, and
    # `latest` names the newest one taken before.
    await daemon.quit(qmp)
    deadline = time.monotonic() + 10
    while await appliance.async_sync(lambda: vpg.consistent):
        assert time.monotonic() < deadline, "the appliance did not notice the mirror jobs ended"
        await asyncio.sleep(0.1)
    after = await appliance.acall(vpg.checkpoint("after-mirror"))
    assert not after.consistent
    assert vpg.journal is not None
    last = [c for c in await appliance.async_sync(vpg.journal.checkpoints.between) if c.consistent]
    # (The appliance polls QMP: checkpoints up to one poll after QEMU quit may be consistent.)
    assert final.id <= last[-1].id < after.id
    await assert_latest_is(socket, last[-1].id)
    appliance.stop()
    assert not appliance.errors.messages()
    report(
        capsys,
        "oracle mirror-target",
        f"writes={len(workload.writes)} checkpoints_verified={len(verdicts)} "
        f"inconsistent={len(checkpoints) - len(verdicts)} (before the mirrors were ready)",
    )
