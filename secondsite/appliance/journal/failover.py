"""Undo log for promotion to a checkpoint (live failover).

Design choice: ``promote_to(C)`` writes the image at C into the replica itself, so the recovered
volume is the plain replica file (fast to serve, nothing to copy at commit). Before any replica
range is overwritten, its old bytes are appended to ``failover.undo`` and that log is fdatasynced.
The journal keeps all records (before and after C) and its promoted watermark W until the
decision:

* ``rollback()`` applies the undo entries newest first, which restores the replica to exactly its
  state at W; the journal is then as before promote_to and every checkpoint can be opened again.
  Replaying newest first makes a rollback interrupted by a crash safe to run again.
* ``commit()`` makes C the promoted watermark and drops every record (they are all either in the
  replica now or after C), then deletes the undo log.

Between promote_to() and the decision the recovered workload may write the replica through a
:class:`FailoverVolume`, which undo-logs each 4 KiB grain before its first write, so rollback()
takes those writes back as well.

A crash while promoting is rolled back at open (the undo log covers every replica write that may
have reached the disk); a crash after promote_to returned leaves the journal in the promoted phase
until commit or rollback.

Entry format: ``magic b"SSJU", volume id (u32), offset (u64), length (u64), crc32c (u32)`` then the
old bytes; the CRC covers the first four fields and the bytes. A torn tail is ignored: its
replica write had not started, because the log is synced before the replica is touched.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from pathlib import Path

from .errors import JournalClosedError, OutOfRangeError
from .pit import GRAIN
from .record import crc32c
from .replica import ReplicaFile

__all__ = ["FailoverVolume", "UndoLog"]

_ENTRY = struct.Struct("<4sIQQI")
_MAGIC = b"SSJU"


class UndoLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)

    def save(self, volume: int, offset: int, old: bytes | bytearray | memoryview) -> None:
        fields = _ENTRY.pack(_MAGIC, volume, offset, len(old), 0)[:-4]
        crc = crc32c(old, crc32c(fields))
        os.writev(self.fd, [fields + struct.pack("<I", crc), old])

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def entries(self, start: int = 0) -> list[tuple[int, int, int, int]]:
        """Valid entries in log order from byte ``start``: (volume, offset, data position in
        the log, length)."""
        out = []
        size = os.fstat(self.fd).st_size
        pos = start
        while pos + _ENTRY.size <= size:
            head = os.pread(self.fd, _ENTRY.size, pos)
            magic, vol, off, length, crc = _ENTRY.unpack(head)
            if magic != _MAGIC or pos + _ENTRY.size + length > size:
                break
            data = os.pread(self.fd, length, pos + _ENTRY.size)
            check = crc32c(data, crc32c(head[:-4]))
            if check != crc:
                break
            out.append((vol, off, pos + _ENTRY.size, length))
            pos += _ENTRY.size + length
        return out

    def rollback(self, replicas: dict[int, ReplicaFile]) -> int:
        """Restore every saved range, newest first; fdatasync the replicas. Returns entries."""
        entries = self.entries()
        for vol, off, at, length in reversed(entries):
            replicas[vol].pwrite(os.pread(self.fd, length, at), off)
        for r in replicas.values():
            r.sync()
        return len(entries)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class FailoverVolume:
    """A recovered volume between promote_to() and commit()/rollback(): the replica itself,
    written in place by the recovered workload, with every first write to a 4 KiB grain undo-
    logged first so that rollback() also takes back what the workload wrote.

    ``saved`` is the grain bitmap of what the undo log already holds since the promotion; it is
    rebuilt from the log when a journal is reopened in the promoted phase.
    """

    def __init__(
        self, name: str, volume: int, replica: ReplicaFile, undo: UndoLog, saved: set[int]
    ) -> None:
        self.name = name
        self.size = replica.size
        self._vid = volume
        self._replica = replica
        self._undo = undo
        self._saved = saved
        self._lock = threading.Lock()
        self.closed = False

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise JournalClosedError(f"failover volume {self.name} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"volume {self.name}: [{offset}, {offset + length}) outside size {self.size}"
            )

    def read_sync(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        buf = bytearray(length)
        self._replica.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def _save_grains(self, offset: int, length: int) -> None:
        g0, g1 = offset // GRAIN, (offset + length + GRAIN - 1) // GRAIN
        fresh = [g for g in range(g0, g1) if g not in self._saved]
        if not fresh:
            return
        runs: list[tuple[int, int]] = []
        for g in fresh:
            if runs and runs[-1][1] == g:
                runs[-1] = (runs[-1][0], g + 1)
            else:
                runs.append((g, g + 1))
        for a, b in runs:
            start, end = a * GRAIN, min(b * GRAIN, self.size)
            old = bytearray(end - start)
            self._replica.pread_into(memoryview(old), start)
            self._undo.save(self._vid, start, old)
        self._undo.sync()
        self._saved.update(fresh)

    def write_sync(self, offset: int, data: bytes | None, length: int) -> None:
        """Write ``data`` (zeros when None); the old bytes are in the undo log first."""
        self._check(offset, length)
        with self._lock:
            self._save_grains(offset, length)
            if data is None:
                self._replica.zero(offset, length)
            else:
                self._replica.pwrite(data, offset)

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.read_sync, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.to_thread(self.write_sync, offset, data, len(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await asyncio.to_thread(self.write_sync, offset, None, length)

    async def trim(self, offset: int, length: int) -> None:
        await asyncio.to_thread(self.write_sync, offset, None, length)

    async def flush(self) -> None:
        await asyncio.to_thread(self._replica.sync)

    def close(self) -> None:
        """Refuse further I/O (at commit or rollback); waits for a write in progress."""
        with self._lock:
            self.closed = True
