"""Group commit: many appends, one write + fdatasync.

Appends are queued in sequence order by the event loop thread (positions in the segment are
assigned at queue time). One flusher task hands the queue, as it is, to a dedicated I/O thread,
which writes it with ``pwritev`` and fdatasyncs; appends arriving meanwhile form the next batch
(pipelining: while a fsync is in flight the next batch accumulates). When a batch crosses into a
new segment, the old segment is synced before the new one is created, so a crash can never leave
records in a newer segment behind a torn tail in an older one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .record import encode_segment_header
from .segment import fsync_dir, seg_path

__all__ = ["PendingRecord", "SegmentWriter"]

_IOV_MAX = 1024


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


class SegmentWriter:
    """Owns the write fd of the active segment. Used only from the journal's I/O thread."""

    def __init__(self, directory: Path, segno: int, *, create: bool, first_seq: int) -> None:
        self.directory = directory
        self.segno = segno
        self.fsyncs = 0
        self.fd = -1
        if create:
            self._create(segno, first_seq)
        else:
            self.fd = os.open(seg_path(directory, segno), os.O_WRONLY)

    def _create(self, segno: int, first_seq: int) -> None:
        path = seg_path(self.directory, segno)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.pwrite(fd, encode_segment_header(segno, first_seq, time.time_ns()), 0)
        os.fdatasync(fd)
        fsync_dir(self.directory)
        self.fsyncs += 1
        self.fd = fd
        self.segno = segno

    def write_batch(self, batch: Sequence[PendingRecord]) -> None:
        """Write and fdatasync a batch (records in sequence order, possibly spanning segments)."""
        i = 0
        while i < len(batch):
            segno = batch[i].segno
            if segno != self.segno:
                os.fdatasync(self.fd)
                self.fsyncs += 1
                os.close(self.fd)
                self._create(segno, batch[i].seq)
            j = i
            while j < len(batch) and batch[j].segno == segno:
                j += 1
            self._write_run(batch[i:j])
            i = j
        os.fdatasync(self.fd)
        self.fsyncs += 1

    def _write_run(self, run: Sequence[PendingRecord]) -> None:
        bufs: list[bytes | memoryview] = []
        start = run[0].file_pos
        for r in run:
            bufs.append(r.header)
            if len(r.payload):
                bufs.append(r.payload)
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
