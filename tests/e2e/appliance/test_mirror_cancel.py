"""A checkpoint taken right after QEMU's mirror job stopped is not marked consistent.

qemu-storage-daemon mirrors a disk to the appliance (mirrorTarget, write-blocking) until the job
is ready and a checkpoint is consistent. Then the job is cancelled on another QMP monitor, and as
soon as QEMU has announced the end of the job there, a checkpoint is taken: from that moment guest
writes no longer reach the appliance, so the checkpoint must not vouch for the volume (the
appliance used to learn it only at its next poll of QEMU, up to half a second later). A write to
the disk afterwards shows why: the newest image no longer equals the disk.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_harness import (
    ApplianceThread,
    MiB,
    StorageDaemon,
    nbd_uri,
    peer,
    requires_peers,
)

from secondsite.appliance.config import ApplianceConfig
from secondsite.appliance.qmp import QmpClient, mirror_job_ready

pytestmark = [pytest.mark.qemu, requires_peers]

VPG = "vm1"
VOLUME = "disk0"
SIZE = 8 * MiB
ROUNDS = 3


async def job_ended(qmp: QmpClient, job: str, timeout: float = 30) -> None:
    """Wait until QEMU no longer lists ``job`` (it has announced its end on every monitor)."""
    deadline = time.monotonic() + timeout
    while await mirror_job_ready(qmp, job) is not None:
        assert time.monotonic() < deadline, f"job {job} still there after {timeout}s"
        await asyncio.sleep(0.001)


async def test_checkpoint_right_after_a_cancelled_mirror_is_not_consistent(
    workdir: Path, cleanup: list[Callable[[], object]]
) -> None:
    source = workdir / "source.img"
    peer("qemu-img", "create", "-f", "raw", source, str(SIZE))
    socket = workdir / "app.sock"
    daemon = StorageDaemon(workdir, {VOLUME: source}, socket, monitors=("test", VOLUME))
    job = daemon.mirror_job(VOLUME)
    config = ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(socket)},
            "journals": [
                {
                    "vpg": VPG,
                    "directory": str(workdir / "journal"),
                    "checkpointIntervalSeconds": 3600,
                }
            ],
            "volumes": [daemon.volume_spec(VOLUME, VPG, SIZE, monitor=VOLUME)],
        }
    )
    appliance = ApplianceThread(config)
    cleanup.append(appliance.stop)
    appliance.start()
    cleanup.append(daemon.close)
    daemon.start()
    qmp = await daemon.qmp()
    vpg = appliance.vpg(VPG)
    # Several rounds: before the fix, each passed only when a poll happened to fall between the
    # end of the job and the checkpoint.
    for round_ in range(ROUNDS):
        pattern = 0x40 + round_
        peer("qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 1M", daemon.uri(VOLUME))
        await daemon.start_mirror(qmp, VOLUME)
        await StorageDaemon.wait_ready(qmp, [job])
        await asyncio.to_thread(appliance.wait_consistent, VPG, 10)
        synced = await appliance.acall(vpg.checkpoint(f"synced-{round_}"))
        assert synced.consistent
        peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", source,
             nbd_uri(socket, f"pit/{VOLUME}@latest"))  # fmt: skip

        await qmp.execute("block-job-cancel", {"device": job})
        await job_ended(qmp, job)
        after = await appliance.acall(vpg.checkpoint(f"cancelled-{round_}"))
        assert not after.consistent, f"round {round_}: checkpoint right after the job ended"
        status = await appliance.async_sync(vpg.status)
        assert status["volumes"][VOLUME]["state"] == "NotSynced"
        assert job in status["volumes"][VOLUME]["reason"]

        # Not mirrored any more: the disk and the newest image part ways.
        peer("qemu-io", "-f", "raw", "-c", f"write -P {pattern + 0x10} 2M 64k", daemon.uri(VOLUME))
        later = await appliance.acall(vpg.checkpoint(f"later-{round_}"))
        assert not later.consistent
        out = compare(source, nbd_uri(socket, f"pit/{VOLUME}@{later.id}"))
        assert "mismatch at offset 2097152" in out, out

    await daemon.quit(qmp)
    appliance.stop()
    assert not appliance.errors.messages()


def compare(source: Path, uri: str) -> str:
    """`qemu-img compare` that may find a difference (exit 1); its output."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(source), uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout
