"""Spare segment files: journal space written before records go into it.

Why: on ext4, an fdatasync after appending to a file must commit the new size and block allocation
through the file system's journal; after overwriting blocks that are allocated and written it only
flushes the data. Measured on the 2-core dev VMs, a 4 KiB write + fdatasync costs ~536 us when
appending, ~229 us when overwriting a written file, ~1086 us into fallocate'd (unwritten) space.
Group commit pays one of these per batch, so records should go into written space.

A spare is a file ``<n>.spare`` in the segments folder, one segment long, every block of which
has been written: zeros written here (a fresh spare) or a segment that promotion freed, renamed
here (a recycled spare: it still holds its old records). A spare is not a segment. The writer
makes it one by writing a new segment header (new incarnation, SEGMENT_RECYCLED if it was
recycled), syncing it, and renaming it to ``<segno>.seg`` (writer.py); the old records are then
no records of the segment (record.py). So a crash anywhere here leaves at worst a spare that is
not fully written, which :meth:`SparePool.load` finishes at the next open.

At most ``keep`` spares exist. A freed segment becomes a spare while there is room (cheap: a
rename and zeros for the few bytes it lacks), or in place of a fresh spare still being
zero-filled; a fresh one is zero-filled only when no spare is ready or being prepared. So under
retention the journal recycles instead of writing zeros. The file work runs on the journal's
background thread, never on the append path, in steps of SYNC_EVERY bytes so that other work
(sidecars, recycled spares) need not wait for a whole segment of zeros. Zeros are written with
O_DIRECT where the file system takes it: no copy into the page cache (measured: a tenth of the
CPU time of buffered writes, which matters on 2 cores) and no cache pages to evict. The journal
then writes whole pages (writer.py), so it never reads the uncached pages back.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from .record import SEGMENT_HEADER, decode_segment_header

__all__ = ["Spare", "SparePool"]

log = logging.getLogger(__name__)

ZERO_CHUNK = 4 << 20
"""Bytes of zeros per write while preparing a spare."""
SYNC_EVERY = 64 << 20
"""fdatasync this often while zero-filling (a step of the background work)."""
_ALIGN = 4096
_ZEROS = mmap.mmap(-1, ZERO_CHUNK)
"""Page-aligned zeros, as O_DIRECT wants them."""


@dataclass(frozen=True, slots=True)
class Spare:
    """A spare ready to become a segment: ``size`` bytes, all written."""

    path: Path
    size: int
    recycled: bool
    """It held a segment (or might have): bytes after the new records may be old records."""


def _spare_path(directory: Path, n: int) -> Path:
    return directory / f"{n:016d}.spare"


class SparePool:
    """The spares of one journal. ``take`` and ``has_ready`` are called from the event loop,
    ``adopt`` from whichever thread deletes segments; files are prepared on ``executor``."""

    def __init__(
        self, directory: Path, size: int, keep: int, executor: Executor, vpg: str = ""
    ) -> None:
        self.directory = directory
        self.vpg = vpg
        self.size = size
        self.keep = keep
        self._executor = executor
        self._lock = threading.Lock()
        self._ready: list[Spare] = []
        self._preparing = 0
        self._fresh: _Filling | None = None
        """The fresh spare being zero-filled, if any (a recycled one may take its place)."""
        self._next = 1
        self._closed = False

    def load(self) -> None:
        """At open: spares left by an earlier run are finished and kept (up to ``keep``)."""
        found = []
        for p in self.directory.glob("*.spare"):
            try:
                found.append((int(p.stem), p))
            except ValueError:
                continue
        found.sort()
        if found:
            self._next = found[-1][0] + 1
        for k, (_, p) in enumerate(found):
            if k < self.keep:
                with self._lock:
                    self._preparing += 1
                self._executor.submit(self._start, _Filling(p, None))
            else:
                p.unlink(missing_ok=True)
        self._refill()

    def has_ready(self) -> bool:
        return bool(self._ready)

    def take(self) -> Spare | None:
        """A ready spare for a new segment (the caller renames it), or None."""
        with self._lock:
            spare = self._ready.pop(0) if self._ready else None
        self._refill()
        return spare

    def adopt(self, path: Path) -> bool:
        """Turn a freed segment file (no reader has it open) into a spare if there is room;
        False if there is none (the caller deletes it)."""
        with self._lock:
            if self._closed:
                return False
            if len(self._ready) + self._preparing >= self.keep:
                if self._fresh is None or self._fresh.dropped:
                    return False
                self._fresh.dropped = True  # its next step deletes it
            self._preparing += 1
            spare = _spare_path(self.directory, self._next)
            self._next += 1
        try:
            os.rename(path, spare)
        except OSError as exc:
            log.warning(
                "journal: could not recycle segment vpg=%s path=%s error=%s", self.vpg, path, exc
            )
            with self._lock:
                self._preparing -= 1
            return False
        self._executor.submit(self._start, _Filling(spare, True))
        return True

    def spare_bytes(self) -> int:
        """Bytes held by ready spares."""
        with self._lock:
            return sum(s.size for s in self._ready)

    def close(self) -> None:
        """Stop preparing (a spare being zero-filled stays as it is, finished at next open)."""
        with self._lock:
            self._closed = True

    def _refill(self) -> None:
        with self._lock:
            if self._closed or self.keep <= 0 or self._ready or self._preparing:
                return
            self._preparing += 1
            self._fresh = _Filling(_spare_path(self.directory, self._next), False)
            self._next += 1
        self._executor.submit(self._start, self._fresh)

    def _start(self, f: _Filling) -> None:
        """Open a spare to make it full: ``size`` bytes, all written."""
        try:
            f.fd = os.open(f.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                f.direct = os.open(f.path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                f.direct = -1  # e.g. tmpfs: buffered writes then
            if f.recycled is None:  # found at open: recycled if it starts with a segment header
                head = os.pread(f.fd, SEGMENT_HEADER.size, 0)
                f.recycled = decode_segment_header(head) is not None
            f.at = os.fstat(f.fd).st_size
            if f.at > self.size:
                os.ftruncate(f.fd, self.size)
                f.at = self.size
        except OSError as exc:
            self._failed(f, exc)
            return
        self._fill(f)

    def _fill(self, f: _Filling) -> None:
        """Write and sync up to SYNC_EVERY bytes of zeros, then queue the rest behind whatever
        else waits for the background thread (a sidecar, a recycled spare's few bytes)."""
        try:
            stop = min(self.size, f.at + SYNC_EVERY)
            while f.at < stop and not self._closed and not f.dropped:
                f.at += self._zeros(f, min(ZERO_CHUNK, stop - f.at))
            os.fdatasync(f.fd)
        except OSError as exc:
            self._failed(f, exc)
            return
        with self._lock:
            if f.at < self.size and not self._closed and not f.dropped:
                self._executor.submit(self._fill, f)
                return
            self._preparing -= 1
            if self._fresh is f:
                self._fresh = None
            if f.at >= self.size and not f.dropped:
                self._ready.append(Spare(f.path, self.size, bool(f.recycled)))
        f.close()
        if f.dropped:
            f.path.unlink(missing_ok=True)
            self._refill()  # in case the recycled file that took its place failed
        # Otherwise, if it is not full, the journal is closing: it is finished at the next open.

    @staticmethod
    def _zeros(f: _Filling, n: int) -> int:
        """Write up to ``n`` zeros at ``f.at``: aligned blocks with O_DIRECT if the file was
        opened so, the unaligned edges (a recycled file's end, an odd size) buffered."""
        if f.direct >= 0:
            if f.at % _ALIGN:
                n = min(n, _ALIGN - f.at % _ALIGN)
            elif n >= _ALIGN:
                try:
                    return os.pwrite(f.direct, memoryview(_ZEROS)[: n - n % _ALIGN], f.at)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    os.close(f.direct)  # alignment the device does not take: buffered then
                    f.direct = -1
        return os.pwrite(f.fd, memoryview(_ZEROS)[:n], f.at)

    def _failed(self, f: _Filling, exc: OSError) -> None:
        log.warning(
            "journal: could not prepare spare vpg=%s path=%s error=%s", self.vpg, f.path, exc
        )
        f.close()
        f.path.unlink(missing_ok=True)
        with self._lock:
            self._preparing -= 1
            if self._fresh is f:
                self._fresh = None
        self._refill()


@dataclass(slots=True)
class _Filling:
    """A spare being zero-filled: its open fd and how far it is written."""

    path: Path
    recycled: bool | None
    """None: not known yet (a spare found at open)."""
    fd: int = -1
    direct: int = -1
    """The file opened with O_DIRECT, or -1."""
    at: int = 0
    dropped: bool = False
    """A recycled spare took its place: stop and delete it."""

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct = -1
