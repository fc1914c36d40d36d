"""The exports themselves, without the server: FileExport, MemoryExport, DictExportProvider."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from secondsite.appliance.nbd import (
    BlockSizes,
    DictExportProvider,
    FileExport,
    MemoryExport,
    NBDError,
    UnknownExport,
)

MiB = 1024 * 1024


@pytest.fixture(params=[False, True], ids=["inline", "threaded"])
def file_export(request: pytest.FixtureRequest, tmp_path: Path) -> FileExport:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    export = FileExport(path, threaded=request.param)
    request.addfinalizer(export.close)
    return export


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


async def test_file_export_reads_back_writes(file_export: FileExport) -> None:
    assert file_export.size == 8 * MiB
    await file_export.write(4096, b"abc" * 1000, fua=False)
    await file_export.write(MiB, bytearray(b"x" * MiB), fua=True)
    await file_export.flush()
    assert await file_export.read(4096, 3000) == b"abc" * 1000
    assert await file_export.read(MiB, MiB) == b"x" * MiB
    with open(file_export.path, "rb") as f:
        f.seek(4096)
        assert f.read(3000) == b"abc" * 1000


async def test_file_export_trim_and_zero_free_space(file_export: FileExport) -> None:
    await file_export.write(0, b"y" * 4 * MiB, fua=False)
    before = allocated(file_export.path)
    await file_export.trim(0, MiB)
    await file_export.write_zeroes(MiB, MiB, fua=True, may_trim=True)
    # Freed: 2 MiB, give or take a block of file system metadata (the extent tree may grow).
    assert allocated(file_export.path) <= before - 2 * MiB + 64 * 1024
    await file_export.write_zeroes(2 * MiB, MiB, fua=False, may_trim=False)
    assert await file_export.read(0, 3 * MiB) == bytes(3 * MiB)
    assert await file_export.read(3 * MiB, MiB) == b"y" * MiB
    extents = await file_export.block_status(0, 8 * MiB)
    assert extents[0] == (2 * MiB, 3)  # punched: a hole reading as zeroes


async def test_file_export_unaligned_zeroing(file_export: FileExport) -> None:
    await file_export.write(0, b"z" * 10000, fua=False)
    await file_export.write_zeroes(100, 5000, fua=False, may_trim=True)
    assert await file_export.read(0, 10000) == b"z" * 100 + bytes(5000) + b"z" * 4900


async def test_file_export_changes_land_in_request_order(file_export: FileExport) -> None:
    """A large write goes to the worker thread; smaller changes started after it, over the same
    bytes, must not overtake it."""
    changes = [
        file_export.write(0, bytearray(b"\xaa" * 2 * MiB), fua=False),
        file_export.write(4096, b"\xbb" * 4096, fua=False),
        file_export.write_zeroes(8192, 4096, fua=False, may_trim=False),
        file_export.trim(12288, 4096),
        file_export.write(MiB, b"\xcc" * 100, fua=False),
    ]
    await asyncio.gather(*changes)
    want = bytearray(b"\xaa" * 2 * MiB)
    want[4096:8192] = b"\xbb" * 4096
    want[8192:16384] = bytes(8192)
    want[MiB : MiB + 100] = b"\xcc" * 100
    assert await file_export.read(0, 2 * MiB) == want
    assert await file_export.read(0, 16) == b"\xaa" * 16  # served inline again afterwards


async def test_file_export_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"r" * 4096)
    with FileExport(path, read_only=True) as export:
        assert export.read_only
        assert await export.read(0, 4) == b"rrrr"
        with pytest.raises(NBDError) as failed:
            await export.write(0, b"w", fua=False)
        assert failed.value.errno_code == errno.EBADF


def test_file_export_rejects_other_file_types() -> None:
    with pytest.raises(ValueError):
        FileExport(os.devnull)  # a character device


async def test_memory_export_zeroes_whole_and_partial_pages() -> None:
    export = MemoryExport(64 * 1024)
    await export.write(0, b"m" * 65536, fua=False)
    await export.write_zeroes(100, 20000, fua=False, may_trim=True)
    await export.trim(40000, 10)
    expected = bytearray(b"m" * 65536)
    expected[100:20100] = bytes(20000)
    expected[40000:40010] = bytes(10)
    assert await export.read(0, 65536) == expected


def test_block_sizes_are_validated() -> None:
    BlockSizes().validate()
    BlockSizes(512, 4096, 1024 * 1024).validate()
    for bad in [BlockSizes(3), BlockSizes(1, 256), BlockSizes(512, 4096, 1000), BlockSizes(131072)]:
        with pytest.raises(ValueError):
            bad.validate()


async def test_dict_provider() -> None:
    a, b = MemoryExport(1), MemoryExport(2)
    provider = DictExportProvider({"a": a, "b": b}, default="b")
    assert provider.list_exports() == ["a", "b"]
    assert await provider.open_export("a") is a
    assert await provider.open_export("") is b
    with pytest.raises(UnknownExport):
        await provider.open_export("c")
    with pytest.raises(ValueError):
        DictExportProvider({"a": a}, default="z")
