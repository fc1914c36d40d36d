"""The server as the target of QEMU's active mirror (how a VM's writes reach the appliance).

qemu-storage-daemon mirrors a source image to our NBD export with ``sync=full`` and
``copy-mode=write-blocking``; writes to the source (through the daemon's own NBD export) go on
during and after the initial copy. Once the job is ready the target must equal the source.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nbd_peers import EXPORT_SIZE, ServerThread, qemu_io, requires_peers, run
from qmp import QMPClient

pytestmark = [pytest.mark.qemu, requires_peers]


@pytest.fixture
def target(nbd_server: ServerThread) -> str:
    # Garbage everywhere, so that only a complete copy makes the comparison pass.
    qemu_io(nbd_server.uri("target"), f"write -P 0xff 0 {EXPORT_SIZE}")
    return nbd_server.uri("target")


async def start_daemon(workdir: Path, source: Path, socket_path: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=src-file,filename={source}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev",
        f"driver=nbd,node-name=tgt,server.type=unix,server.path={socket_path},export=target",
        "--nbd-server", f"addr.type=unix,addr.path={workdir}/qsd-nbd.sock",
        "--export", "type=nbd,id=exp0,node-name=src,name=src,writable=on",
        "--chardev", f"socket,id=qmp,path={workdir}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=qmp",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_active_mirror_target(nbd_server: ServerThread, workdir: Path, target: str) -> None:
    source = workdir / "source.img"
    run("qemu-img", "create", "-f", "raw", str(source), str(EXPORT_SIZE))
    qemu_io(str(source), "write -P 0x11 0 8M", "write -P 0x22 20M 4M", "write -P 0x33 63M 1M")
    daemon = await start_daemon(workdir, source, nbd_server.socket_path)
    source_uri = f"nbd+unix:///src?socket={workdir}/qsd-nbd.sock"
    try:
        qmp = await QMPClient.connect(str(workdir / "qmp.sock"))
        await qmp.execute(
            "blockdev-mirror",
            {
                "job-id": "mirror0",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "copy-mode": "write-blocking",
            },
        )
        # Guest-like writes while the initial copy runs: unaligned, overlapping, zeroing, FUA.
        await asyncio.to_thread(
            qemu_io,
            source_uri,
            "write -P 0x44 1M 64k",
            "write -P 0x55 12345 6789",
            "write -z 22M 512k",
            "write -f -P 0x66 40M 1M",
            "aio_write -P 0x77 50M 4k",
            "aio_write -P 0x78 50M 2k",
            "aio_flush",
        )
        await qmp.wait_event("BLOCK_JOB_READY", lambda data: data["device"] == "mirror0")
        # Once ready, write-blocking mode acks each guest write only after the target has it.
        await asyncio.to_thread(
            qemu_io, source_uri, "write -P 0x88 2M 128k", "write -P 0x99 999 3", "discard 30M 1M"
        )
        # Equal while the job is still running (the source is read with force-share).
        await asyncio.to_thread(
            run, "qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(source), target
        )
        jobs = await qmp.execute("query-block-jobs")
        assert [(j["device"], j["ready"]) for j in jobs] == [("mirror0", True)]
        # After READY, cancelling a mirror completes it without switching to the target.
        await qmp.execute("block-job-cancel", {"device": "mirror0"})
        await qmp.wait_event("BLOCK_JOB_COMPLETED", lambda data: data["device"] == "mirror0")
        await qmp.execute("quit")
        await qmp.close()
        await asyncio.wait_for(daemon.wait(), 30)
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    output = (await daemon.stdout.read()).decode() if daemon.stdout else ""
    assert daemon.returncode == 0, output
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), target)
    qemu_io(target, "read -P 0x88 2M 128k", "read -P 0x66 40M 1M", "read -P 0x78 50M 2k")
