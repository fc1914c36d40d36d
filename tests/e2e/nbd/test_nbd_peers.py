"""The NBD server against real clients: qemu-io, qemu-img, nbdinfo and nbdcopy, over unix sockets
and TCP."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from nbd_peers import EXPORT_SIZE, MiB, ServerThread, qemu_io, requires_peers, run

pytestmark = [pytest.mark.qemu, requires_peers]

TRANSPORTS = [pytest.param(False, id="unix"), pytest.param(True, id="tcp")]


def make_source(path: Path, size: int = EXPORT_SIZE) -> None:
    """A raw image with a few distinct patterns, a zeroed stretch and a hole."""
    run("qemu-img", "create", "-f", "raw", str(path), str(size))
    qemu_io(
        str(path),
        "write -P 0x11 0 4M",
        "write -P 0x22 5M 3M",
        "write -P 0x33 12345 6789",
        f"write -P 0x44 {size - MiB} 1M",
    )


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("export", ["mem", "file"])
def test_qemu_io_patterns(nbd_server: ServerThread, export: str, tcp: bool) -> None:
    uri = nbd_server.uri(export, tcp=tcp)
    qemu_io(
        uri,
        "write -P 0xa5 0 1M",
        "write -P 0x5a 513 1000",  # unaligned
        "write -f -P 0x77 2M 64k",  # FUA
        "aio_write -P 0x01 4M 4k",
        "aio_write -P 0x02 8M 128k",
        "aio_flush",
        "flush",
        "read -P 0xa5 0 513",
        "read -P 0x5a 513 1000",
        "read -P 0xa5 1513 1047063",
        "read -P 0x77 2M 64k",
        "read -P 0x01 4M 4k",
        "read -P 0x02 8M 128k",
        "write -z 0 64k",
        "read -P 0 0 64k",
        "write -z -u 1M 1M",  # may unmap
        "read -P 0 1M 1M",
        "discard 2M 64k",
        "read -P 0 2M 64k",  # both exports read zeroes after discard
        f"write -P 0xee {EXPORT_SIZE - 4096} 4096",
        f"read -P 0xee {EXPORT_SIZE - 4096} 4096",
    )
    # A second connection sees the same data.
    qemu_io(uri, "read -P 0xa5 64k 448k", "read -P 0x02 8M 128k")


def test_read_only_export_refuses_writes(nbd_server: ServerThread) -> None:
    uri = nbd_server.uri("ro")
    proc = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri, check=False)
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr  # QEMU saw NBD_FLAG_READ_ONLY
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 1M", uri).stdout
    assert "failed" not in out


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("export", ["mem", "file"])
def test_qemu_img_convert_both_ways_and_compare(
    nbd_server: ServerThread, workdir: Path, export: str, tcp: bool
) -> None:
    source = workdir / "source.img"
    make_source(source)
    uri = nbd_server.uri(export, tcp=tcp)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri, timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri, timeout=120)
    back = workdir / "back.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(back), timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(back), timeout=120)
    # A difference is noticed (compare is not vacuous).
    qemu_io(uri, "write -P 0x99 7M 512")
    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_qemu_img_map_sees_holes_of_file_export(nbd_server: ServerThread) -> None:
    uri = nbd_server.uri("file")
    qemu_io(uri, "write -P 0x42 8M 2M")
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(8 * MiB, 2 * MiB)], extents
    assert all(e["zero"] for e in extents if not e["data"])


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_qemu_img_bench(nbd_server: ServerThread, tcp: bool) -> None:
    uri = nbd_server.uri("mem", tcp=tcp)
    for extra in (["-w"], []):
        out = run(
            "qemu-img",
            "bench",
            "-f",
            "raw",
            "-c",
            "20000",
            "-d",
            "16",
            "-s",
            "4k",
            *extra,
            uri,
            timeout=120,
        ).stdout
        assert "Run completed" in out


def test_nbdinfo_size_flags_and_list(nbd_server: ServerThread) -> None:
    info = json.loads(run("nbdinfo", "--json", nbd_server.uri("mem")).stdout)
    (export,) = info["exports"]
    assert info["structured"] is True
    assert export["export-size"] == EXPORT_SIZE
    assert export["description"] == "memory"
    assert export["contexts"] == ["base:allocation"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert (export["block_size_minimum"], export["block_size_maximum"]) == (1, 32 * MiB)

    ro = json.loads(run("nbdinfo", "--json", nbd_server.uri("ro", tcp=True)).stdout)
    assert ro["exports"][0]["is_read_only"] is True

    listing = json.loads(
        run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={nbd_server.socket_path}").stdout
    )
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"mem": EXPORT_SIZE, "file": EXPORT_SIZE, "ro": MiB, "target": EXPORT_SIZE}


def test_nbdinfo_unknown_export_fails(nbd_server: ServerThread) -> None:
    proc = run("nbdinfo", nbd_server.uri("nope"), check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_nbdcopy_both_directions(nbd_server: ServerThread, workdir: Path, tcp: bool) -> None:
    source = workdir / "source.img"
    make_source(source)
    uri = nbd_server.uri("file", tcp=tcp)
    run("nbdcopy", "--flush", str(source), uri, timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uri, timeout=120)
    copy = workdir / "copy.img"
    run("qemu-img", "create", "-f", "raw", str(copy), str(EXPORT_SIZE))
    run("nbdcopy", uri, str(copy), timeout=120)
    assert copy.read_bytes() == source.read_bytes()
    # Memory to memory through the server as both source and destination.
    run("nbdcopy", uri, nbd_server.uri("mem", tcp=tcp), timeout=120)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), nbd_server.uri("mem"))


def test_many_peers_at_once(nbd_server: ServerThread) -> None:
    procs = [
        subprocess.Popen(
            [
                "qemu-io",
                "-f",
                "raw",
                "-c",
                f"write -P {i + 1} {i * 4}M 4M",
                "-c",
                f"read -P {i + 1} {i * 4}M 4M",
                nbd_server.uri("mem", tcp=bool(i % 2)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(8)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "failed" not in out.lower(), out
    for i in range(8):
        qemu_io(nbd_server.uri("mem"), f"read -P {i + 1} {i * 4}M 4M")
