"""QEMU's active mirror into the appliance, end to end, and a test-failover image beside it.

qemu-storage-daemon mirrors a disk that already holds data to the appliance (mirrorTarget,
blockdev-mirror sync=full copy-mode=write-blocking, rate-limited so that the initial copy takes a
while) while qemu-io writes to the disk through the daemon's NBD export: random patterns at
unaligned offsets, write-zeroes and discards (the source is opened with discard=unmap). Once the
job is ready and a checkpoint is taken, `qemu-img compare` says the source and the newest PIT image
are identical.

Then `test/<volume>@latest` (DESIGN guarantee 4): it takes writes, a new connection sees the
checkpoint again (the scratch overlay was dropped), and neither the replica nor the journal changed;
replication goes on while a test image is open.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from appliance_harness import (
    ApplianceThread,
    KiB,
    MiB,
    StorageDaemon,
    connect_and_go,
    env_seed,
    export_description,
    nbd_uri,
    peer,
    read_export,
    requires_peers,
)

from secondsite.appliance.config import ApplianceConfig

pytestmark = [pytest.mark.qemu, pytest.mark.slow, requires_peers]

VPG = "vm1"
VOLUME = "disk0"
SIZE = 64 * MiB
MIRROR_SPEED = 24 * MiB  # bytes/s of the initial copy: about 2.5 s for the disk


def random_io(rng: random.Random, count: int) -> list[str]:
    """qemu-io commands: patterned writes (often unaligned), write-zeroes, discards."""
    commands = []
    for _ in range(count):
        kind = rng.choices(["write", "zero", "discard"], weights=[6, 2, 2])[0]
        if rng.random() < 0.5:
            length = rng.randrange(1, 256 * KiB)
            offset = rng.randrange(SIZE - length)
        else:
            length = rng.randrange(1, 64) * 4 * KiB
            offset = rng.randrange((SIZE - length) // (4 * KiB)) * 4 * KiB
        if kind == "write":
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
        elif kind == "zero":
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
    return commands


def qemu_io(uri: str, commands: list[str]) -> None:
    args: list[str] = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    out = peer(*args, uri, timeout=120)
    assert "failed" not in out.lower() and "error" not in out.lower(), out


def digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def open_scratch_files(scratch: Path) -> int:
    """Files of this process open under ``scratch`` (scratch overlays are nameless temp files)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(scratch)):
                count += 1
        except OSError:
            continue
    return count


async def test_active_mirror_and_test_image(
    workdir: Path, cleanup: list[Callable[[], object]], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(env_seed("MIRROR_SEED", 7))
    source = workdir / "source.img"
    peer("qemu-img", "create", "-f", "raw", source, str(SIZE))
    qemu_io(str(source), ["write -P 0x11 0 8M", "write -P 0x22 20M 4M", "write -P 0x33 63M 1M"])
    socket = workdir / "app.sock"
    journal_dir = workdir / "journal"
    daemon = StorageDaemon(
        workdir, {VOLUME: source}, socket, monitors=("test", VOLUME), discard=True
    )
    config = ApplianceConfig.model_validate(
        {
            "listen": {"nbdUnix": str(socket)},
            "journals": [
                # Checkpoints on request only, so that the journal changes only when told.
                {"vpg": VPG, "directory": str(journal_dir), "checkpointIntervalSeconds": 3600}
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

    job = await daemon.start_mirror(qmp, VOLUME, speed=MIRROR_SPEED)
    during = random_io(rng, 150)
    await asyncio.to_thread(qemu_io, daemon.uri(VOLUME), during)
    jobs = await qmp.execute("query-block-jobs")
    assert [j["ready"] for j in jobs] == [False], "the initial copy ended before the writes did"
    early = await appliance.acall(vpg.checkpoint("initial-sync"))
    assert not early.consistent
    await StorageDaemon.wait_ready(qmp, [job])
    await asyncio.to_thread(appliance.wait_consistent, VPG, 10)
    after = random_io(rng, 150)
    await asyncio.to_thread(qemu_io, daemon.uri(VOLUME), after)
    cp = await appliance.acall(vpg.checkpoint("after-writes"))
    assert cp.consistent
    assert f"at checkpoint {cp.id} " in await export_description(socket, f"pit/{VOLUME}@latest")
    peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", source,
         nbd_uri(socket, f"pit/{VOLUME}@latest"))  # fmt: skip

    # -- a test image: writable, dropped on disconnect, the replica and journal untouched.
    def journal_files() -> list[Path]:
        return [p for p in journal_dir.rglob("*") if p.is_file() and "scratch" not in p.parts]

    before = digest(journal_files())
    assert any(name.endswith(".img") for name in before), "no replica file"
    scratch = journal_dir / "scratch"
    test_image = f"test/{VOLUME}@latest"
    client, info = await connect_and_go(str(socket), test_image)
    try:
        assert info.size == SIZE
        await client.write(5 * MiB + 123, b"\xab" * 70_000)
        await client.write_zeroes(0, MiB)
        await client.trim(20 * MiB, 2 * MiB)
        assert await client.read(5 * MiB + 123, 70_000) == b"\xab" * 70_000
        assert await client.read(0, MiB) == bytes(MiB)
        assert await client.read(20 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert open_scratch_files(scratch) == 1
    finally:
        await client.disconnect()
        await client.close()
    for _ in range(100):  # the server releases the export once the connection is gone
        if open_scratch_files(scratch) == 0:
            break
        await asyncio.sleep(0.05)
    assert open_scratch_files(scratch) == 0, "scratch overlay still open after disconnect"
    peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", source,
         nbd_uri(socket, test_image))  # fmt: skip
    assert digest(journal_files()) == before, "a test image changed the replica or the journal"

    # -- replication goes on while a test image is open.
    client, _ = await connect_and_go(str(socket), test_image)
    try:
        await client.write(0, b"\xcd" * 4096)
        more = [*random_io(rng, 50), "write -P 0x5a 30M 64k"]
        await asyncio.to_thread(qemu_io, daemon.uri(VOLUME), more)
        newer = await appliance.acall(vpg.checkpoint("while-testing"))
        assert newer.consistent
        peer("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", source,
             nbd_uri(socket, f"pit/{VOLUME}@latest"))  # fmt: skip
        assert await client.read(0, 4096) == b"\xcd" * 4096
        # The test image still shows its checkpoint, not what was replicated since.
        old = await client.read(30 * MiB, 64 * KiB)
        assert old != b"\x5a" * (64 * KiB)
        assert old == await read_export(socket, f"pit/{VOLUME}@{cp.id}", 30 * MiB, 64 * KiB)
    finally:
        await client.disconnect()
        await client.close()

    await daemon.quit(qmp)
    appliance.stop()
    assert not appliance.errors.messages()
    with capsys.disabled():
        print(
            f"\n[active mirror] qemu-io commands={len(during) + len(after) + len(more)} "
            f"checkpoints={early.id}..{newer.id} identical=yes test-image dropped=yes"
        )
