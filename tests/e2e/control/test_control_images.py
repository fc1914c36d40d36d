"""PIT images, failover and capture through the control API, checked with QEMU and libnbd.

An image created through the API is served as `image/<id>` until deleted; `qemu-img compare`
against a copy of the source taken at the checkpoint proves it is the point-in-time content.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from control_harness import (
    QEMU_TOOLS,
    ApplianceProcess,
    HeldConnection,
    MiB,
    eventually,
    journal,
    make_disk,
    qemu_io,
    run,
)

from secondsite.appliance.control import ConflictError, ControlClient, NotFoundError

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in QEMU_TOOLS),
        reason=f"needs {', '.join(QEMU_TOOLS)} (make debs)",
    ),
]

SIZE = 16 * MiB


async def protect(appliance: ApplianceProcess, client: ControlClient, workdir: Path) -> Path:
    """Configure VPG `app` with the in-path volume `disk0`; wait until it is protected."""
    disk = make_disk(workdir / "disk0.img", SIZE)
    await client.put_config(
        appliance.config(
            [journal(workdir, "app")], [{"name": "disk0", "vpg": "app", "backing": str(disk)}]
        )
    )
    await eventually(
        lambda: client.vpg_status("app"),
        lambda s: s.volumes["disk0"].state == "Protected" and s.newest_checkpoint is not None,
    )
    return disk


def same(a: str | Path, b: str | Path) -> bool:
    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b), check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


async def test_read_only_image_is_the_volume_at_its_checkpoint(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = await protect(appliance, client, workdir)
    capture = appliance.nbd_uri("disk0")
    qemu_io(capture, "write -P 0x11 0 1M", "write -P 0x22 4M 2M")
    cp = await client.take_checkpoint("app", tag="v1")
    at_v1 = shutil.copy(disk, workdir / "v1.img")

    image = await client.create_image("app", "disk0", "tag:v1")
    assert image.export == f"image/{image.id}" and not image.writable
    assert image.checkpoint.id == cp.id and image.size == SIZE
    uri = image.nbd[0]
    assert uri == appliance.nbd_uri(image.export)
    assert run("nbdinfo", "--size", uri).stdout.strip() == str(SIZE)
    assert same(at_v1, uri)

    # The source moves on; the image stays at its checkpoint.
    qemu_io(capture, "write -P 0x33 0 64k", "write -P 0x44 12M 1M")
    assert same(at_v1, uri)
    assert not same(disk, uri)
    assert "Permission denied" in qemu_io(uri, "write -P 0x55 0 4k", check=False)

    # Deleting waits for its NBD clients (or force).
    held = HeldConnection(uri, read_only=True)
    try:
        await eventually(lambda: client.get_image("app", image.id), lambda i: i.connections == 1)
        with pytest.raises(ConflictError) as info:
            await client.delete_image("app", image.id)
        assert info.value.code == "image-busy"
    finally:
        held.close()
    await eventually(lambda: client.get_image("app", image.id), lambda i: i.connections == 0)
    deleted = await client.delete_image("app", image.id)
    assert deleted.id == image.id
    assert await client.list_images("app") == []
    with pytest.raises(NotFoundError):
        await client.get_image("app", image.id)
    assert run("nbdinfo", "--size", uri, check=False).returncode != 0


async def test_writable_image_keeps_its_writes_until_deleted(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = await protect(appliance, client, workdir)
    qemu_io(appliance.nbd_uri("disk0"), "write -P 0x11 0 1M")
    await client.take_checkpoint("app", tag="base")
    source = shutil.copy(disk, workdir / "source.img")

    image = await client.create_image("app", "disk0", "tag:base", writable=True)
    uri = image.nbd[0]
    qemu_io(uri, "write -P 0x66 0 64k", "write -z 8M 1M")
    # A second connection sees the first one's writes: the image and its overlay are shared.
    qemu_io(uri, "read -P 0x66 0 64k", "read -P 0x11 64k 960k", "read -P 0 8M 1M")
    assert same(disk, source), "a test image must never write to the volume"
    assert (await client.list_images("app"))[0].writable

    # Force closes it even with a client connected.
    held = HeldConnection(uri)
    try:
        await eventually(lambda: client.get_image("app", image.id), lambda i: i.connections == 1)
        await client.delete_image("app", image.id, force=True)
    finally:
        held.close()
    again = await client.create_image("app", "disk0", "tag:base", writable=True)
    qemu_io(again.nbd[0], "read -P 0x11 0 64k")  # the old overlay is gone
    await client.delete_image("app", again.id)


async def test_promote_rollback_and_commit(
    appliance: ApplianceProcess, client: ControlClient, workdir: Path
) -> None:
    disk = await protect(appliance, client, workdir)
    capture = appliance.nbd_uri("disk0")
    replica = workdir / "journal-app" / "replicas" / "disk0.img"
    qemu_io(capture, "write -P 0x0a 0 1M")
    a = await client.take_checkpoint("app", tag="a")
    at_a = shutil.copy(disk, workdir / "a.img")
    qemu_io(capture, "write -P 0x0b 0 512k", "write -P 0x0c 8M 2M")
    b = await client.take_checkpoint("app", tag="b")
    replica_before = shutil.copy(replica, workdir / "replica-before.img")

    image = await client.create_image("app", "disk0", "latest")
    with pytest.raises(ConflictError) as info:
        await client.promote("app", "tag:a")
    assert info.value.code == "images-open" and image.id in info.value.message
    await client.delete_image("app", image.id)
    with pytest.raises(NotFoundError):
        await client.promote("app", "tag:nope")

    state = await client.promote("app", "tag:a")
    assert state.phase == "promoted" and state.checkpoint is not None
    assert state.checkpoint.id == a.id
    assert (await client.failover_state("app")).phase == "promoted"
    promoted = await client.vpg_status("app")
    assert (promoted.failover_phase, promoted.state) == ("promoted", "FailingOver")
    assert same(at_a, replica)
    for refused in (
        client.promote("app", "tag:b"),
        client.take_checkpoint("app"),
        client.create_image("app", "disk0", "latest"),
    ):
        with pytest.raises(ConflictError) as info:
            await refused
        assert info.value.code == "failover-state"
    with pytest.raises(ConflictError) as info:
        await client.put_config(appliance.config([], []))
    assert info.value.details[0]["path"] == "vpgs.app"
    assert "failed" in qemu_io(capture, "write -P 0x0d 0 4k", check=False).lower()

    state = await client.rollback("app")
    assert state.phase is None
    assert same(replica_before, replica)
    with pytest.raises(ConflictError):
        await client.commit("app")
    qemu_io(capture, "write -P 0x0e 12M 4k")  # capture goes on
    assert (await client.get_checkpoint("app", "tag:b")).id == b.id

    await client.promote("app", a.id)
    state = await client.commit("app")
    assert state.phase is None
    assert same(at_a, replica)
    status = await client.vpg_status("app")
    assert status.oldest_checkpoint is not None and status.oldest_checkpoint.id == a.id
    with pytest.raises(NotFoundError):
        await client.get_checkpoint("app", "tag:b")
    assert [c.id for c in (await client.list_checkpoints("app", tag="a")).checkpoints] == [a.id]
