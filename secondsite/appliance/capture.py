"""Capture: the NBD exports through which every write of a protected volume reaches its VPG.

A capture export submits each change to a :class:`WriteTarget`: the VPG's :class:`Journal` when the
VPG is journaled on this appliance, or the protected buffer of the replication stream
(`protected.py`) when it is replicated to another appliance. ``submit_*`` fixes the change's place
in the VPG's order synchronously, in arrival order; awaiting the result is the target's word that
the change may be acknowledged (journal: the record is durable; protected buffer: the record is
buffered and no checkpoint cut holds acks).

Two modes (see `config.CaptureMode`):

- :class:`InPathExport` serves the volume itself from its backing store. A write is submitted to
  the target and written to the backing store at the same time; the client gets its ack once
  both are done. FUA and FLUSH reach the backing store.
- :class:`MirrorTargetExport` is the target of a hypervisor's active mirror. It keeps no copy of the
  source: a write is acked once the target took it. Reads (rare for a mirror target) are served
  from the journal's latest view, when the VPG has a journal here.

Both defer to the target's ack hold: while a checkpoint's cut is being marked, new writes are taken
but not acknowledged, which is what makes a checkpoint a prefix of the acked writes.

:class:`RegionGuard` keeps a resync (initial or delta sync of an in-path volume) from racing
concurrent writes: the copier claims a window, waits for writes in flight over it, reads the
source and journals what differs; writes into the window wait until it is released.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Sequence
from typing import Protocol

from secondsite.appliance.journal import (
    FailoverStateError,
    Journal,
    JournalClosedError,
    JournalError,
    JournalIOError,
    OutOfRangeError,
    PitImage,
)
from secondsite.appliance.nbd.export import BlockSizes, BytesLike, Export, Extent, NBDError
from secondsite.appliance.nbd.file import FileExport

__all__ = ["InPathExport", "MirrorTargetExport", "RegionGuard", "WriteTarget", "journal_error"]

_LATEST_IDLE_SECONDS = 5.0


def journal_error(exc: JournalError, operation: str) -> NBDError:
    """The NBD error a client gets when the journal refuses or fails an operation."""
    if isinstance(exc, OutOfRangeError):
        return NBDError(errno.EINVAL, f"{operation}: {exc}")
    if isinstance(exc, FailoverStateError):
        return NBDError(errno.EROFS, f"{operation}: {exc}")
    if isinstance(exc, JournalClosedError):
        return NBDError(errno.ESHUTDOWN, f"{operation}: {exc}")
    if isinstance(exc, JournalIOError):
        return NBDError(errno.EIO, f"{operation}: {exc}")
    return NBDError(errno.EIO, f"{operation}: {exc}")


class WriteTarget(Protocol):
    """What a capture export submits changes to (see the module docstring). Each method fixes the
    change's order when called and may raise :class:`JournalError` or :class:`NBDError` at once;
    the awaitable raises them too if the change cannot be acknowledged. ``data`` must stay
    unchanged until the awaitable completes. :class:`Journal` is one."""

    def submit_write(
        self, volume: str, offset: int, data: bytes | memoryview
    ) -> Awaitable[None]: ...

    def submit_zero(self, volume: str, offset: int, length: int) -> Awaitable[None]: ...

    def submit_trim(self, volume: str, offset: int, length: int) -> Awaitable[None]: ...


def _view(data: BytesLike) -> bytes | memoryview:
    return memoryview(data) if isinstance(data, bytearray) else data


class RegionGuard:
    """Orders a resync copier against concurrent writes of one volume (see the module docstring).

    Writes are cheap when no copier runs: one attribute test. The set of writes in flight is as
    small as the client's queue depth, so overlap checks are linear scans.
    """

    def __init__(self) -> None:
        self._window: tuple[int, int] | None = None
        self._window_released = asyncio.Event()
        self._window_released.set()
        self._inflight: dict[int, tuple[int, int]] = {}
        self._inflight_changed = asyncio.Event()
        self._next_token = 0

    def _overlaps_window(self, start: int, end: int) -> bool:
        w = self._window
        return w is not None and start < w[1] and w[0] < end

    async def enter_write(self, start: int, end: int) -> int:
        """Register a write in flight; waits while a copier's window overlaps it."""
        while (token := self.enter_idle(start, end)) is None:
            await self._window_released.wait()
        return token

    def enter_idle(self, start: int, end: int) -> int | None:
        """:meth:`enter_write` without waiting: its token, or None when a copier's window
        overlaps (then await :meth:`enter_write`)."""
        if self._overlaps_window(start, end):
            return None
        token = self._next_token
        self._next_token += 1
        self._inflight[token] = (start, end)
        return token

    def exit_write(self, token: int) -> None:
        del self._inflight[token]
        if self._window is not None:
            self._inflight_changed.set()

    async def claim(self, start: int, end: int) -> None:
        """Claim a copy window: later writes into it wait; returns when earlier ones are done."""
        assert self._window is None, "one copier per volume"
        self._window = (start, end)
        self._window_released.clear()
        while any(s < end and start < e for s, e in self._inflight.values()):
            self._inflight_changed.clear()
            await self._inflight_changed.wait()

    def release(self) -> None:
        self._window = None
        self._window_released.set()


class _CaptureExport(Export):
    """What both capture modes share: the write target, the volume's name, and the region guard."""

    def __init__(self, name: str, target: WriteTarget, size: int) -> None:
        self.name = name
        self.target = target
        self._size = size
        self.guard = RegionGuard()
        self.writes = 0
        self.bytes_written = 0
        self.last_write_ns = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def can_trim(self) -> bool:
        return True

    @property
    def can_write_zeroes(self) -> bool:
        return True

    @property
    def can_multi_conn(self) -> bool:
        # Acks mean the target took the change, and the backing store has no per-connection
        # cache.
        return True

    @property
    def block_sizes(self) -> BlockSizes:
        return BlockSizes(minimum=1, preferred=4096)

    def _count(self, length: int) -> None:
        self.writes += 1
        self.bytes_written += length
        self.last_write_ns = time.time_ns()


class InPathExport(_CaptureExport):
    """Serves the volume from its backing store and hands every change to the target before
    acking it."""

    def __init__(self, name: str, target: WriteTarget, backing: FileExport) -> None:
        super().__init__(name, target, backing.size)
        self.backing = backing

    @property
    def description(self) -> str:
        return f"SecondSite in-path capture of volume {self.name}"

    async def read(self, offset: int, length: int) -> BytesLike:
        return await self.backing.read(offset, length)

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        # The hot path of in-path capture: one coroutine frame when no copier runs.
        guard = self.guard
        end = offset + len(data)
        token = guard.enter_idle(offset, end)
        if token is None:
            token = await guard.enter_write(offset, end)
        try:
            try:
                pending = self.target.submit_write(self.name, offset, _view(data))
            except JournalError as e:
                raise journal_error(e, "write") from e
            await self.backing.write(offset, data, fua=fua)
            try:
                await pending
            except JournalError as e:
                raise journal_error(e, "write") from e
        finally:
            guard.exit_write(token)
        self._count(len(data))

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        token = await self.guard.enter_write(offset, offset + length)
        try:
            try:
                pending = self.target.submit_zero(self.name, offset, length)
            except JournalError as e:
                raise journal_error(e, "write zeroes") from e
            await self.backing.write_zeroes(offset, length, fua=fua, may_trim=may_trim, fast=fast)
            await self._durable(pending, "write zeroes")
        finally:
            self.guard.exit_write(token)
        self._count(length)

    async def trim(self, offset: int, length: int) -> None:
        token = await self.guard.enter_write(offset, offset + length)
        try:
            try:
                pending = self.target.submit_trim(self.name, offset, length)
            except JournalError as e:
                raise journal_error(e, "trim") from e
            await self.backing.trim(offset, length)
            await self._durable(pending, "trim")
        finally:
            self.guard.exit_write(token)

    async def flush(self) -> None:
        # Journal records are durable before their acks; the backing store needs its own flush.
        await self.backing.flush()

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.backing.block_status(offset, length)

    async def _durable(self, pending: Awaitable[None], operation: str) -> None:
        try:
            await pending
        except JournalError as e:
            raise journal_error(e, operation) from e


class MirrorTargetExport(_CaptureExport):
    """The target of an active mirror: hands every write to the target and acks it once taken.

    ``journal`` (the VPG's, when it has one here) serves reads; without one, reads fail: the
    appliance keeps no copy of a replicated mirror target's data.
    """

    def __init__(
        self, name: str, target: WriteTarget, size: int, journal: Journal | None = None
    ) -> None:
        super().__init__(name, target, size)
        self.journal = journal
        self._latest: PitImage | None = None
        self._latest_used = 0.0
        self._latest_lock = asyncio.Lock()

    @property
    def description(self) -> str:
        return f"SecondSite mirror target for volume {self.name}"

    async def read(self, offset: int, length: int) -> BytesLike:
        if self.journal is None:
            raise NBDError(
                errno.EIO,
                "read: this appliance keeps no copy of the mirror target (the source is the "
                "hypervisor's disk; the replica is on the recovery appliance)",
            )
        async with self._latest_lock:
            if self._latest is None:
                try:
                    self._latest = await self.journal.open_latest(self.name)
                except JournalError as e:
                    raise journal_error(e, "read") from e
            image = self._latest
        self._latest_used = time.monotonic()
        return await image.read(offset, length)

    def close_idle_view(self, now: float | None = None) -> None:
        """Drop the cached latest view when unused for a while: it pins journal records."""
        now = time.monotonic() if now is None else now
        if self._latest is not None and now - self._latest_used > _LATEST_IDLE_SECONDS:
            self._latest.close()
            self._latest = None

    def close(self) -> None:
        if self._latest is not None:
            self._latest.close()
            self._latest = None

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        try:
            pending = self.target.submit_write(self.name, offset, _view(data))
            await pending
        except JournalError as e:
            raise journal_error(e, "write") from e
        self._count(len(data))

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        try:
            pending = self.target.submit_zero(self.name, offset, length)
            await pending
        except JournalError as e:
            raise journal_error(e, "write zeroes") from e
        self._count(length)

    async def trim(self, offset: int, length: int) -> None:
        try:
            pending = self.target.submit_trim(self.name, offset, length)
            await pending
        except JournalError as e:
            raise journal_error(e, "trim") from e

    async def flush(self) -> None:
        # Every acknowledged write is already with the target: nothing is cached here.
        return None
