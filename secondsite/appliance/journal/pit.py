"""Point-in-time images: the replica plus journal records up to a checkpoint, served without
copying, and an optional scratch overlay that takes writes (test failover).

An image is an :class:`~.index.ExtentMap` from volume bytes to the newest record (seq <= the
checkpoint) covering them; bytes no record covers come from the replica. The image pins its
checkpoint so that retention does not promote past it (promotion past it would put newer data
into the replica under the image's feet). Records the journal promotes while the image is open
are read from the replica instead once their segment is gone: promotion writes exactly those
bytes there, so the image does not change.

The scratch overlay is an unlinked temporary file in the scratch directory plus a bitmap of 4 KiB
grains. A write to part of a grain first copies the grain from the image below (read-modify-
write), so the overlay always holds whole grains. Closing the image drops the overlay; the kernel
frees the file even after a crash, because it never had a name.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .errors import CorruptJournalError, JournalClosedError, OutOfRangeError
from .index import Columns, ExtentMap, resolve_extents
from .record import RecordType
from .replica import ReplicaFile, punch_or_zero
from .segment import SegmentSet

__all__ = [
    "GRAIN",
    "PitImage",
    "RecordSnapshot",
    "ScratchOverlay",
    "build_extents",
    "extend_extents",
    "read_layered",
]

GRAIN = 4096
_MAX_READ_WINDOW = 32 << 20
_MAX_READ_GAP = 1 << 20
_WRITE = int(RecordType.WRITE)

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class RecordSnapshot:
    """Index columns of one volume as they were when an image was built (rows never change)."""

    seq: I64
    offset: I64
    length: I64
    seg: I64
    pos: I64
    kind: npt.NDArray[np.uint8]
    generation: int

    @classmethod
    def of(cls, cols: Columns) -> RecordSnapshot:
        c, gen = cols.snapshot()
        return cls(c["seq"], c["offset"], c["length"], c["seg"], c["pos"], c["kind"], gen)

    def rows_between(self, after_seq: int, upto_seq: int) -> tuple[int, int]:
        """Row range [lo, hi) of records with after_seq < seq <= upto_seq."""
        lo = int(np.searchsorted(self.seq, after_seq, side="right"))
        hi = int(np.searchsorted(self.seq, upto_seq, side="right"))
        return lo, max(lo, hi)


def read_layered(
    out: memoryview,
    offset: int,
    extents: tuple[I64, I64, I64],
    recs: RecordSnapshot,
    replica: ReplicaFile,
    segments: SegmentSet,
    promoted_seq: Callable[[], int],
) -> None:
    """Fill ``out`` (the volume bytes at ``offset``) from the given clipped extents, the journal
    segments they name, and the replica for everything else."""
    s, e, v = extents
    end = offset + len(out)
    at = offset
    for i in range(len(s)):
        a, b, r = int(s[i]), int(e[i]), int(v[i])
        if a > at:
            replica.pread_into(out[at - offset : a - offset], at)
        piece = out[a - offset : b - offset]
        if recs.kind[r] == _WRITE:
            _read_record(piece, a, r, recs, replica, segments, promoted_seq)
        else:
            piece[:] = bytes(len(piece))
        at = b
    if at < end:
        replica.pread_into(out[at - offset :], at)


def _read_record(
    piece: memoryview,
    a: int,
    r: int,
    recs: RecordSnapshot,
    replica: ReplicaFile,
    segments: SegmentSet,
    promoted_seq: Callable[[], int],
) -> None:
    segno = int(recs.seg[r])
    fd = segments.acquire(segno)
    if fd is None:
        # The segment was deleted after promotion: the replica holds these very bytes now.
        if int(recs.seq[r]) > promoted_seq():
            raise CorruptJournalError(f"segment {segno} missing for unpromoted record")
        replica.pread_into(piece, a)
        return
    try:
        src = int(recs.pos[r]) + a - int(recs.offset[r])
        done = 0
        while done < len(piece):
            n = os.preadv(fd, [piece[done:]], src + done)
            if n <= 0:
                raise CorruptJournalError(f"segment {segno} shorter than its index says")
            done += n
    finally:
        segments.release(segno)


class ScratchOverlay:
    """Writes of a writable PIT image, in whole grains, on a nameless sparse temp file."""

    def __init__(self, size: int, scratch_dir: Path) -> None:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        self.size = size
        # Kept open for the image's lifetime; it has no name, so nothing leaks on a crash.
        self._file = tempfile.TemporaryFile(dir=scratch_dir)  # noqa: SIM115
        self.fd = self._file.fileno()
        os.ftruncate(self.fd, size)
        self.grains = (size + GRAIN - 1) // GRAIN
        self._bits = np.zeros((self.grains + 7) // 8, dtype=np.uint8)

    def present(self, g0: int, g1: int) -> npt.NDArray[np.bool_]:
        """Per grain in [g0, g1): does the overlay hold it?"""
        b0, b1 = g0 // 8, (g1 + 7) // 8
        bits = np.unpackbits(self._bits[b0:b1], bitorder="little")
        return bits[g0 - b0 * 8 : g1 - b0 * 8].astype(bool)

    def mark_fast(self, g0: int, g1: int) -> None:
        """Mark grains [g0, g1) without unpacking the whole bitmap."""
        b0, b1 = g0 // 8, (g1 + 7) // 8
        part = np.unpackbits(self._bits[b0:b1], bitorder="little")
        part[g0 - b0 * 8 : g1 - b0 * 8] = 1
        self._bits[b0:b1] = np.packbits(part, bitorder="little")

    @property
    def grain_count(self) -> int:
        return int(np.unpackbits(self._bits, bitorder="little")[: self.grains].sum())

    def close(self) -> None:
        self._file.close()


class PitImage:
    """A volume as it was at a checkpoint (or, for :meth:`Journal.open_latest`, as it is now).

    Reads never change the replica or the journal. With ``writable``, writes, zeroes and trims go
    to a scratch overlay that :meth:`close` discards.
    """

    def __init__(
        self,
        *,
        volume: str,
        size: int,
        seq: int,
        extents: ExtentMap,
        recs: RecordSnapshot,
        replica: ReplicaFile,
        segments: SegmentSet,
        promoted_seq: Callable[[], int],
        on_close: Callable[[PitImage], None],
        overlay: ScratchOverlay | None = None,
        refresh: Callable[[PitImage], None] | None = None,
    ) -> None:
        self.volume = volume
        self.size = size
        self.seq = seq
        """Images show every record with a sequence number <= seq."""
        self._extents = extents
        self.recs = recs
        self._replica = replica
        self._segments = segments
        self._promoted_seq = promoted_seq
        self._on_close = on_close
        self._overlay = overlay
        self._refresh = refresh
        self._delta = (0, 0)
        self.pin_seq = seq
        """The sequence number this image keeps retention from promoting past."""
        self._lock = threading.Lock()
        self.closed = False

    @property
    def writable(self) -> bool:
        return self._overlay is not None

    def _rebase(
        self, seq: int, extents: ExtentMap, recs: RecordSnapshot, delta: tuple[int, int]
    ) -> None:
        """Switch to a newer view: ``extents`` over ``recs`` plus rows ``delta`` laid on top."""
        self.seq, self._extents, self.recs, self._delta = seq, extents, recs, delta

    def _check(self, offset: int, length: int) -> None:
        if self.closed:
            raise JournalClosedError(f"image of {self.volume} is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"volume {self.volume}: [{offset}, {offset + length}) outside size {self.size}"
            )

    def read_sync(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        buf = bytearray(length)
        with self._lock:
            if self._refresh is not None:
                self._refresh(self)
            self._read_into(memoryview(buf), offset)
        return bytes(buf)

    def _read_base(self, out: memoryview, offset: int) -> None:
        end = offset + len(out)
        ext = self._extents.overlapping(offset, end)
        lo, hi = self._delta
        if hi > lo:
            o = self.recs.offset[lo:hi]
            e = o + self.recs.length[lo:hi]
            hit = (o < end) & (e > offset)
            if hit.any():
                merged = resolve_extents(
                    np.concatenate((ext[0], np.maximum(o[hit], offset))),
                    np.concatenate((ext[1], np.minimum(e[hit], end))),
                    np.concatenate((ext[2], np.arange(lo, hi)[hit])),
                )
                ext = (merged.starts, merged.ends, merged.values)
        read_layered(
            out,
            offset,
            ext,
            self.recs,
            self._replica,
            self._segments,
            self._promoted_seq,
        )

    def _read_into(self, out: memoryview, offset: int) -> None:
        ov = self._overlay
        if ov is None:
            self._read_base(out, offset)
            return
        end = offset + len(out)
        g0, g1 = offset // GRAIN, (end + GRAIN - 1) // GRAIN
        present = ov.present(g0, g1)
        if not present.any():
            self._read_base(out, offset)
            return
        # Runs of grains with the same source.
        change = np.flatnonzero(np.diff(present.astype(np.int8))) + 1
        bounds = [0, *change.tolist(), len(present)]
        for k in range(len(bounds) - 1):
            a = max(offset, (g0 + bounds[k]) * GRAIN)
            b = min(end, (g0 + bounds[k + 1]) * GRAIN)
            piece = out[a - offset : b - offset]
            if present[bounds[k]]:
                done = 0
                while done < len(piece):
                    done += os.preadv(ov.fd, [piece[done:]], a + done)
            else:
                self._read_base(piece, a)

    def _write_sync(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        """Write ``data`` (or zeros when None) at ``offset`` into the overlay."""
        self._check(offset, length)
        ov = self._overlay
        if ov is None:
            raise PermissionError(f"image of {self.volume} is read-only")
        if length == 0:
            return
        with self._lock:
            end = offset + length
            g0, g1 = offset // GRAIN, (end + GRAIN - 1) // GRAIN
            a, b = g0 * GRAIN, min(g1 * GRAIN, self.size)
            aligned = a == offset and b == end
            if aligned and data is None:
                punch_or_zero(ov.fd, a, b - a)
            else:
                buf = bytearray(b - a)
                mv = memoryview(buf)
                # Only the partial head and tail grains need their old content.
                if offset != a:
                    self._read_into(mv[: min(GRAIN, b - a)], a)
                if end != b and (g1 - 1) * GRAIN >= a:
                    tail = (g1 - 1) * GRAIN
                    self._read_into(mv[tail - a :], tail)
                if data is None:
                    mv[offset - a : end - a] = bytes(length)
                else:
                    mv[offset - a : end - a] = data
                done = 0
                while done < len(buf):
                    done += os.pwrite(ov.fd, mv[done:], a + done)
            ov.mark_fast(g0, g1)

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.read_sync, offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.to_thread(self._write_sync, offset, data, len(data))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await asyncio.to_thread(self._write_sync, offset, None, length)

    async def trim(self, offset: int, length: int) -> None:
        """Trimmed bytes read back as zeros (the overlay punches them out)."""
        await asyncio.to_thread(self._write_sync, offset, None, length)

    async def flush(self) -> None:
        """Scratch data is thrown away on close, so there is nothing to make durable."""

    def close(self) -> None:
        """Drop the overlay and unpin the checkpoint. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._overlay is not None:
                self._overlay.close()
                self._overlay = None
        self._on_close(self)

    async def __aenter__(self) -> PitImage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def build_extents(recs: RecordSnapshot, lo: int, hi: int) -> ExtentMap:
    """The image map of rows [lo, hi) of a volume's index (rows are in sequence order)."""
    return resolve_extents(
        recs.offset[lo:hi], recs.offset[lo:hi] + recs.length[lo:hi], np.arange(lo, hi)
    )


def extend_extents(base: ExtentMap, recs: RecordSnapshot, lo: int, hi: int) -> ExtentMap:
    """``base`` with rows [lo, hi) laid on top (for the latest view as the journal grows)."""
    return resolve_extents(
        np.concatenate((base.starts, recs.offset[lo:hi])),
        np.concatenate((base.ends, recs.offset[lo:hi] + recs.length[lo:hi])),
        np.concatenate((base.values, np.arange(lo, hi))),
    )
