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

A crash while promoting is rolled back at open (the undo log covers every replica write that may
have reached the disk); a crash after promote_to returned leaves the journal in the promoted phase
until commit or rollback.

Entry format: ``magic b"SSJU", volume id (u32), offset (u64), length (u64), crc32c (u32)`` then the
old bytes; the CRC covers the first four fields and the bytes. A torn tail is ignored: its
replica write had not started, because the log is synced before the replica is touched.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .record import crc32c
from .replica import ReplicaFile

__all__ = ["UndoLog"]

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

    def entries(self) -> list[tuple[int, int, int, int]]:
        """Valid entries in log order: (volume, offset, data position in the log, length)."""
        out = []
        size = os.fstat(self.fd).st_size
        pos = 0
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
