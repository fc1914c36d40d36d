"""Fixtures for NBD tests against real peers: a server thread with memory and file exports."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_peers import EXPORT_SIZE, MiB, ServerThread

from secondsite.appliance.nbd import Export, FileExport, MemoryExport

# tests/e2e holds helpers shared by the e2e suites (qmp.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="nbde", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nbd_server(workdir: Path) -> Iterator[ServerThread]:
    disk = workdir / "export.img"
    with open(disk, "wb") as f:
        f.truncate(EXPORT_SIZE)
    file_export = FileExport(disk)
    exports: dict[str, Export] = {
        "mem": MemoryExport(EXPORT_SIZE, description="memory"),
        "file": file_export,
        "ro": MemoryExport(MiB, read_only=True),
        "target": MemoryExport(EXPORT_SIZE, description="mirror target"),
    }
    server = ServerThread(str(workdir / "nbd.sock"), exports, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        file_export.close()
    assert not server.errors.records, [r.getMessage() for r in server.errors.records]
