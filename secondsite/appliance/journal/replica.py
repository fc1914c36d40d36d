"""Replica volume files: sparse files of the volume's size that hold everything promoted."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

__all__ = ["ReplicaFile", "punch_or_zero"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 8 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def punch_or_zero(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: punch a hole, or write zeros if unsupported."""
    if length <= 0:
        return
    if _fallocate is not None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, offset, length) == 0:
            return
    zeros = bytes(min(length, _ZERO_CHUNK))
    done = 0
    while done < length:
        n = min(length - done, len(zeros))
        os.pwrite(fd, memoryview(zeros)[:n], offset + done)
        done += n


class ReplicaFile:
    """One volume's replica. Created sparse at the volume size; never grows or shrinks."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        created = not path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if created:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        elif os.fstat(self.fd).st_size != size:
            actual = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise ValueError(f"replica {path} has size {actual}, volume size is {size}")

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` (the file is exactly the volume size, so no short reads)."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from replica {self.path}")
            done += n

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        punch_or_zero(self.fd, offset, length)

    def start_writeback(self) -> None:
        """Start writing the dirty pages back without waiting (sync_file_range), so that a
        later :meth:`sync` finds most of them written: promotion overlaps its copying with the
        disk writes. Advisory: does nothing where unsupported."""
        if _sync_file_range is not None:
            _sync_file_range(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
