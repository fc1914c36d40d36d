"""An export held in anonymous memory, for tests and benchmarks."""

from __future__ import annotations

import mmap

from .export import BlockSizes, BytesLike, Export

__all__ = ["MemoryExport"]

_ZERO_CHUNK = memoryview(bytes(1024 * 1024))


class MemoryExport(Export):
    """``size`` bytes of private anonymous memory, initially zero.

    Pages are allocated as they are first written; zeroing and trimming whole pages gives them
    back. Every call completes without suspending, so the server steps calls directly.
    """

    def __init__(
        self,
        size: int,
        *,
        read_only: bool = False,
        block_sizes: BlockSizes | None = None,
        description: str = "",
    ) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self._size = size
        self._read_only = read_only
        self._block_sizes = block_sizes or BlockSizes()
        self._description = description
        self._mem: mmap.mmap | bytearray
        if size:
            self._mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            self._mem = bytearray()

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
        return True  # no cache: every connection sees the same memory

    @property
    def eager(self) -> bool:
        return True

    @property
    def block_sizes(self) -> BlockSizes:
        return self._block_sizes

    @property
    def description(self) -> str:
        return self._description

    async def read(self, offset: int, length: int) -> BytesLike:
        return self._mem[offset : offset + length]

    async def write(self, offset: int, data: BytesLike, *, fua: bool) -> None:
        self._mem[offset : offset + len(data)] = data

    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool, fast: bool = False
    ) -> None:
        self._zero(offset, length)

    async def trim(self, offset: int, length: int) -> None:
        self._zero(offset, length)  # deterministic: trimmed ranges read back as zeroes

    async def flush(self) -> None:
        pass

    def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        page = mmap.PAGESIZE
        first = -(-offset // page) * page
        last = end // page * page
        if isinstance(self._mem, mmap.mmap) and last > first:
            # Dropping private anonymous pages makes them read as zeroes again.
            self._mem.madvise(mmap.MADV_DONTNEED, first, last - first)
            self._fill_zero(offset, first)
            self._fill_zero(last, end)
        else:
            self._fill_zero(offset, end)

    def _fill_zero(self, start: int, end: int) -> None:
        while start < end:
            step = min(end - start, len(_ZERO_CHUNK))
            self._mem[start : start + step] = _ZERO_CHUNK[:step]
            start += step
