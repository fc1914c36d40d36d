"""Test doubles for the NBD server tests: a recording provider, exports that fail or wait."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbd_client import ExportInfo, NBDClient, connect_and_go

from secondsite.appliance.nbd import (
    BytesLike,
    DictExportProvider,
    Export,
    Extent,
    MemoryExport,
    NBDError,
    NBDServer,
)

MiB = 1024 * 1024


class RecordingProvider(DictExportProvider):
    """Shared exports by name, recording every open and release."""

    def __init__(self, exports: Mapping[str, Export], *, default: str | None = None) -> None:
        super().__init__(exports, default=default)
        self.opened: list[Export] = []
        self.released: list[Export] = []
        self.released_event = asyncio.Event()

    def add(self, name: str, export: Export) -> None:
        self._exports[name] = export

    async def open_export(self, name: str) -> Export:
        export = await super().open_export(name)
        self.opened.append(export)
        return export

    async def release_export(self, export: Export) -> None:
        self.released.append(export)
        self.released_event.set()

    async def wait_released(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.released) < count:
                self.released_event.clear()
                await self.released_event.wait()


@dataclass
class Harness:
    """A running server and what it serves."""

    server: NBDServer
    path: str
    provider: RecordingProvider
    exports: dict[str, Export] = field(default_factory=dict)

    async def client(self, name: str = "mem", **kwargs: Any) -> NBDClient:
        client, _ = await connect_and_go(self.path, name, **kwargs)
        return client

    async def client_info(self, name: str = "mem", **kwargs: Any) -> tuple[NBDClient, ExportInfo]:
        return await connect_and_go(self.path, name, **kwargs)


class GatedExport(MemoryExport):
    """A memory export whose writes and flushes wait until the test releases them.

    ``calls`` records each call when it *starts*, so tests can see the order the server called
    the export in. ``eager`` chooses which start-up path of the server is exercised.
    """

    def __init__(self, size: int, *, eager: bool) -> None:
        super().__init__(size)
        self._eager = eager
        self.calls: list[tuple[str, int, int]] = []
        self.gates: list[asyncio.Future[None]] = []
        self.started = asyncio.Event()
        self.finished: list[int] = []

    @property
    def eager(self) -> bool:
        return self._eager

    async def _gate(self, call: tuple[str, int, int]) -> None:
        self.calls.append(call)
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        self.started.set()
        await gate

    async def wait_calls(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                self.started.clear()
                await self.started.wait()

    def release(self, index: int) -> None:
        self.gates[index].set_result(None)

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        await self._gate(("write", offset, len(data)))
        await super().write(offset, data, fua=fua)
        self.finished.append(offset)

    async def flush(self) -> None:
        await self._gate(("flush", 0, 0))


class FaultyExport(MemoryExport):
    """A memory export that fails on purpose: ``fail[op] = exception`` (raised after an
    optional suspension, to exercise both server paths)."""

    def __init__(self, size: int, *, suspend: bool) -> None:
        super().__init__(size)
        self.suspend = suspend
        self.fail: dict[str, BaseException] = {}
        self.read_result: Any = None
        self.extents: Any = None

    @property
    def eager(self) -> bool:
        return True

    async def _maybe_fail(self, op: str) -> None:
        if self.suspend:
            await asyncio.sleep(0)
        if op in self.fail:
            raise self.fail[op]

    async def read(self, offset: int, length: int) -> BytesLike:
        await self._maybe_fail("read")
        if self.read_result is not None:
            result: BytesLike = self.read_result
            return result
        return await super().read(offset, length)

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        await self._maybe_fail("write")
        await super().write(offset, data, fua=fua)

    async def flush(self) -> None:
        await self._maybe_fail("flush")

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        await self._maybe_fail("block_status")
        if self.extents is not None:
            extents: Sequence[Extent] = self.extents
            return extents
        return await super().block_status(offset, length)


class CountingExport(MemoryExport):
    """Counts flushes and records trims (to check FUA handling)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0
        self.fua_writes = 0
        self.zero_calls: list[dict[str, Any]] = []

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        self.fua_writes += fua
        await super().write(offset, data, fua=fua)

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        self.zero_calls.append({"fua": fua, "may_trim": may_trim, "fast": fast})
        if fast and not may_trim:
            raise NBDError(errno.ENOTSUP, "not fast without trimming")
        await super().write_zeroes(offset, length, fua=fua, may_trim=may_trim, fast=fast)

    async def flush(self) -> None:
        self.flushes += 1
