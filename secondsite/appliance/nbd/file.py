"""An export backed by a regular file or a block device.

Reads and writes are ``pread``/``pwrite`` issued in request order. By default they run directly
on the event loop: on these machines a 4 KiB ``pwrite`` to the page cache costs a few microseconds,
far less than handing it to a thread and back (see ``tests/bench/bench_nbd.py``). Large writes
(from ``THREAD_WRITE_BYTES``) go to one worker thread even so: a 1 MiB ``pwrite`` holds the loop
for 0.1-0.2 ms, during which it could take in the next requests. While such a write is under way,
later changes (writes, zeroing, trim) queue behind it on the same thread, so they reach the file in
request order as before. ``threaded=True`` moves every operation to the worker thread (same
order), for backends where a single call may block for long, such as a cold disk.
``fdatasync`` (flush, FUA) always runs in a thread.

Trim punches holes (``fallocate(PUNCH_HOLE)``); write zeroes punches holes when the client allows
it and otherwise uses ``fallocate(ZERO_RANGE)``, falling back to writing zeroes; block status
reports holes of regular files with ``SEEK_DATA``/``SEEK_HOLE``. Both fallocate modes also work on
block devices, where the kernel turns them into discard / write-zeroes commands.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from .export import BlockSizes, BytesLike, Export, Extent, NBDError

__all__ = ["FileExport"]

_T = TypeVar("_T")

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
_HOLE_AND_ZERO: Final = 3  # base:allocation NBD_STATE_HOLE | NBD_STATE_ZERO
_MAX_EXTENTS: Final = 256
_ZERO_CHUNK: Final = memoryview(bytes(1024 * 1024))
_UNSUPPORTED: Final = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)
THREAD_WRITE_BYTES: Final = 256 * 1024
"""Writes from this size on run on the worker thread (see the module docstring)."""


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    fallocate: Callable[[int, int, int, int], int] = function
    return fallocate


_fallocate = _load_fallocate()


def _nbd_error(exc: OSError, operation: str) -> NBDError:
    return NBDError(exc.errno or errno.EIO, f"{operation}: {exc.strerror or exc}")


class FileExport(Export):
    """Serves the file or block device at ``path`` (opened once; call :meth:`close` when done)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        threaded: bool = False,
        block_sizes: BlockSizes | None = None,
        description: str = "",
    ) -> None:
        self.path = os.fspath(path)
        self._read_only = read_only
        self._fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            mode = os.fstat(self._fd).st_mode
            self._regular = stat.S_ISREG(mode)
            if not (self._regular or stat.S_ISBLK(mode)):
                raise ValueError(f"{self.path} is neither a regular file nor a block device")
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise
        self._block_sizes = block_sizes or BlockSizes()
        self._description = description
        self._threaded = threaded
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nbd-file") if threaded else None
        self._queued = 0
        """Changes handed to the worker thread and not finished (default mode)."""
        self._can_punch = _fallocate is not None
        self._can_zero_range = _fallocate is not None
        self._can_seek_data = self._regular

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def can_trim(self) -> bool:
        return True

    @property
    def can_write_zeroes(self) -> bool:
        return True

    @property
    def can_multi_conn(self) -> bool:
        return True  # one file descriptor for every connection: fdatasync covers them all

    @property
    def eager(self) -> bool:
        return True  # calls either complete inline or suspend on a thread future

    @property
    def block_sizes(self) -> BlockSizes:
        return self._block_sizes

    @property
    def description(self) -> str:
        return self._description

    def close(self) -> None:
        """Close the file (and stop the worker thread)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileExport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def _call(self, function: Callable[..., _T], *args: object) -> _T:
        if not self._threaded:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _change(self, large: bool, function: Callable[..., _T], *args: object) -> _T:
        """Run a change of the file: inline, or on the worker thread when it is large or when
        changes queued there are not finished (they keep request order)."""
        if self._threaded or not (large or self._queued):
            return await self._call(function, *args)
        return await self._queue_change(function, *args)

    async def _queue_change(self, function: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="nbd-file")
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, function, *args)
        finally:
            self._queued -= 1

    async def read(self, offset: int, length: int) -> BytesLike:
        return await self._call(self._pread, offset, length)

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        if self._threaded or self._queued or len(data) >= THREAD_WRITE_BYTES:
            await self._change(True, self._pwrite, offset, data)
        else:  # the common case, without a coroutine per call
            self._pwrite(offset, data)
        if fua:
            await self._sync()

    async def flush(self) -> None:
        await self._sync()

    async def trim(self, offset: int, length: int) -> None:
        await self._change(False, self._punch, offset, length)

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        await self._change(False, self._zero, offset, length, may_trim, fast)
        if fua:
            await self._sync()

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        if not self._can_seek_data:
            return [(length, 0)]
        return await self._call(self._extents, offset, length)

    async def _sync(self) -> None:
        fd = self._fd
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, os.fdatasync, fd)
        except OSError as exc:
            raise _nbd_error(exc, "fdatasync") from None

    # -- blocking helpers (inline or on the worker thread) ---------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    raise NBDError(errno.EIO, f"file shrank: short read at {offset + got}")
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise _nbd_error(exc, "pread") from None

    def _pwrite(self, offset: int, data: BytesLike) -> None:
        try:
            written = os.pwrite(self._fd, data, offset)
            if written < len(data):
                view = memoryview(data)
                while written < len(view):
                    written += os.pwrite(self._fd, view[written:], offset + written)
        except OSError as exc:
            raise _nbd_error(exc, "pwrite") from None

    def _fallocate_mode(self, mode: int, offset: int, length: int) -> bool:
        """fallocate(); False if the file system or device does not support ``mode``."""
        assert _fallocate is not None
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            return False
        raise NBDError(code, f"fallocate: {os.strerror(code)}")

    def _punch(self, offset: int, length: int) -> bool:
        if self._can_punch:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if self._fallocate_mode(mode, offset, length):
                return True
            self._can_punch = False
        return False  # trim is advisory: doing nothing is correct

    def _zero(self, offset: int, length: int, may_trim: bool, fast: bool) -> None:
        if may_trim and self._punch(offset, length):
            return
        if self._can_zero_range:
            if self._fallocate_mode(FALLOC_FL_ZERO_RANGE, offset, length):
                return
            self._can_zero_range = False
        if fast:
            raise NBDError(errno.ENOTSUP, "zeroing would be no faster than writing zeroes")
        end = offset + length
        while offset < end:
            step = min(end - offset, len(_ZERO_CHUNK))
            self._pwrite(offset, _ZERO_CHUNK[:step])
            offset += step

    def _extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        position = offset
        extents: list[Extent] = []
        try:
            while position < end and len(extents) < _MAX_EXTENTS:
                try:
                    data = os.lseek(self._fd, position, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # nothing but a hole up to the end of the file
                if data > position:
                    extents.append((min(data, end) - position, _HOLE_AND_ZERO))
                    position = data
                    continue
                hole = os.lseek(self._fd, position, os.SEEK_HOLE)
                if hole <= position:  # pragma: no cover - the file changed under us
                    break
                extents.append((min(hole, end) - position, 0))
                position = hole
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._can_seek_data = False
                return [(length, 0)]
            raise _nbd_error(exc, "lseek") from None
        return extents or [(length, 0)]
