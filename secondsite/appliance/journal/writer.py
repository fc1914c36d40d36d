"""Group commit: many appends, one write + fdatasync.

Appends are queued in sequence order by the event loop thread (positions in the segment are
assigned at queue time). One flusher task hands the queue, as it is, to a dedicated I/O thread,
which writes it with ``pwritev`` and fdatasyncs; appends arriving meanwhile form the next batch
(pipelining: while a fsync is in flight the next batch accumulates). A large batch is instead
fdatasynced by a second thread while the first one writes the next (the journal decides, see
``_OVERLAP_BYTES``); syncs run one at a time in batch order, and a batch is acked once its sync
returns. When a batch crosses into a
new segment, the old segment is sealed (cut to its last record and synced) before the new one is
created, so a crash can never leave records in a newer segment behind a torn tail in an older one.

A new segment is made from a spare when the event loop got one (spares.py): records then
overwrite written blocks, whose fdatasync needs no file system journal commit. Its header (new
incarnation) is written and synced before the rename to ``<segno>.seg``, so a segment file always
has its own header. In written space, a batch that ends inside a 4 KiB page also writes zeros to
the end of that page: the page is then written whole, and the kernel need not read it first (a
recycled file's pages are rarely cached).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .record import SEGMENT_HEADER, encode_segment_header
from .segment import fsync_dir, seg_path
from .spares import Spare

__all__ = ["NewSegment", "PendingRecord", "SegmentWriter"]

_IOV_MAX = 1024
_PAGE = 4096
_ZERO_PAGE = memoryview(bytes(_PAGE))


@dataclass(frozen=True, slots=True)
class NewSegment:
    """The segment that the record carrying it opens."""

    segno: int
    first_seq: int
    incarnation: int
    spare: Spare | None
    """Written space to make the segment from; None: a new, empty file."""


@dataclass(slots=True)
class PendingRecord:
    """One queued record: where it goes and what it is (the index row once durable)."""

    seq: int
    segno: int
    file_pos: int
    """Where the header starts in the segment."""
    header: bytes
    payload: bytes | memoryview
    volume: int
    offset: int
    length: int
    kind: int
    opens: NewSegment | None = None
    """Set on the first record of a segment."""


class SegmentWriter:
    """Owns the write fd of the active segment. Used only from the journal's I/O thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segno = 0
        self.fd = -1
        self.end = 0
        """End of the last record written to the active segment."""
        self.prepared = 0
        """Bytes of the active segment's file that were written before it became a segment."""
        self.fsyncs = 0

    def resume(self, segno: int, end: int) -> None:
        """Append to an existing segment whose records end at ``end`` (its file size)."""
        self.fd = os.open(seg_path(self.directory, segno), os.O_WRONLY)
        self.segno, self.end, self.prepared = segno, end, 0

    def start(self, new: NewSegment) -> None:
        """Create the segment ``new`` (from its spare if it has one) with a synced header."""
        spare = new.spare
        header = encode_segment_header(
            new.segno,
            new.first_seq,
            time.time_ns(),
            new.incarnation,
            recycled=spare is not None and spare.recycled,
        )
        path = seg_path(self.directory, new.segno)
        if spare is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            if path.exists():  # rename() would replace it silently
                raise FileExistsError(f"segment {path.name} exists")
            fd = os.open(spare.path, os.O_WRONLY)
        try:
            os.pwrite(fd, header, 0)
            os.fdatasync(fd)
            if spare is not None:
                os.rename(spare.path, path)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self.fsyncs += 1
        self.fd = fd
        self.segno = new.segno
        self.end = SEGMENT_HEADER.size
        self.prepared = 0 if spare is None else spare.size

    def write_batch(self, batch: Sequence[PendingRecord]) -> None:
        """Write and fdatasync a batch (records in sequence order, possibly spanning segments)."""
        self.sync(self.write_unsynced(batch))

    def write_unsynced(self, batch: Sequence[PendingRecord]) -> int:
        """Write a batch without the final fdatasync; returns a duplicate of the segment's fd
        for :meth:`sync` (which closes it), so that the sync may run while the next batch is
        written, even if that batch seals the segment and closes its own fd.

        Segments sealed on the way are durable when this returns (see _seal)."""
        i = 0
        while i < len(batch):
            r = batch[i]
            if r.segno != self.segno:
                if r.opens is None or r.opens.segno != r.segno:
                    raise RuntimeError(f"record {r.seq} is the first of segment {r.segno}")
                self._seal()
                self.start(r.opens)
            j = i
            while j < len(batch) and batch[j].segno == r.segno:
                j += 1
            self._write_run(batch[i:j])
            i = j
        return os.dup(self.fd)

    def sync(self, fd: int) -> None:
        """fdatasync a duplicate fd from :meth:`write_unsynced`, then close it: every batch
        written to its segment before this call is then durable."""
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.fsyncs += 1

    def _seal(self) -> None:
        """Cut the active segment to its last record (dropping written space it did not use) and
        make that durable: a sealed segment's file ends where its records do."""
        if self.fd < 0:
            return
        if self.prepared > self.end:
            os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)
        else:
            os.fdatasync(self.fd)
        self.fsyncs += 1
        os.close(self.fd)
        self.fd = -1

    def _write_run(self, run: Sequence[PendingRecord]) -> None:
        bufs: list[bytes | memoryview] = []
        start = run[0].file_pos
        for r in run:
            bufs.append(r.header)
            if len(r.payload):
                bufs.append(r.payload)
        last = run[-1]
        end = last.file_pos + len(last.header) + len(last.payload)
        pad = -end % _PAGE
        if pad and end + pad <= self.prepared:
            bufs.append(_ZERO_PAGE[:pad])
        at = start
        k = 0
        while k < len(bufs):
            chunk = bufs[k : k + _IOV_MAX]
            want = sum(len(b) for b in chunk)
            n = os.pwritev(self.fd, chunk, at)
            if n == want:
                at += n
                k += len(chunk)
                continue
            # Short write: finish this chunk byte by byte-range, then go on.
            joined = b"".join(chunk)
            while n < want:
                n += os.pwrite(self.fd, joined[n:], at + n)
            at += want
            k += len(chunk)
        self.end = end

    def close(self, *, trim: bool) -> None:
        """Close the active segment; with ``trim``, cut the written space it did not use first
        (a clean close leaves every segment file ending at its last record)."""
        if self.fd < 0:
            return
        try:
            if trim and self.prepared > self.end:
                os.ftruncate(self.fd, self.end)
                os.fsync(self.fd)
                self.prepared = 0
        finally:
            os.close(self.fd)
            self.fd = -1
