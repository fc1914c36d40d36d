"""The protected side's memory of what the recovery side does not have yet.

:class:`ProtectedBuffer` holds every captured change, numbered by the source sequence, until the
recovery side acknowledges it durable. It is bounded in bytes and never blocks: when a change does
not fit, ``append_*`` raises :class:`BufferFull` and the caller switches the VPG to bitmap sync.

:class:`DirtyMap` is what bitmap sync tracks instead: per volume, which fixed-size regions changed
since the recovery side last had them. :meth:`ProtectedBuffer.spill` turns everything still
unacknowledged into dirty regions and empties the buffer (the link stayed down too long, or the
buffer overflowed); :meth:`DirtyMap.take_batch` hands regions back out, to be read from the source
and shipped as ordinary WRITE records.

Sequence numbers are assigned synchronously in call order, so they order changes across all the
volumes of a VPG on this appliance. They must also grow across restarts of the protected appliance:
the recovery side skips any record numbered at or below what it already has. The default first
number is the wall clock in nanoseconds, which a restarted appliance cannot fall below unless it
appended more than one record per nanosecond or the clock stepped back; the sender renumbers
unsent records if the recovery side is ahead anyway (see :meth:`ProtectedBuffer.renumber_after`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .frames import NO_VOLUME, Op, Record

__all__ = [
    "ACK_LATENCIES",
    "RECORD_OVERHEAD",
    "BufferFull",
    "DirtyMap",
    "ProtectedBuffer",
    "SpillStats",
    "index_runs",
]

RECORD_OVERHEAD: Final = 64
"""Bytes charged per record on top of its payload, so that many small records are bounded too."""
_MAX_EXTENT: Final = 1 << 30
"""ZERO and TRIM records longer than this are split (the wire length field is 32 bits)."""
ACK_LATENCIES: Final = 16384
"""How many of the newest acknowledged changes :attr:`ProtectedBuffer.ack_latencies` keeps."""


def index_runs(idx: npt.NDArray[np.intp]) -> list[tuple[int, int]]:
    """Runs of consecutive indexes in the sorted ``idx``, as (first, last + 1)."""
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate((idx[:1], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], idx[-1:])) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


class BufferFull(Exception):
    """The change does not fit in the protected buffer: switch to bitmap sync."""


@dataclass(frozen=True, slots=True)
class SpillStats:
    records: int
    bytes: int
    """Buffer bytes released (payload plus per-record overhead)."""
    marked_bytes: int
    """Bytes of volume ranges marked dirty (before rounding to regions)."""


class ProtectedBuffer:
    """A bytes-bounded, in-order queue of records kept until acknowledged (see module doc)."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        max_record_bytes: int = 1024 * 1024,
        first_seq: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity_bytes <= 0 or max_record_bytes <= 0:
            raise ValueError("capacity and record size must be positive")
        self.capacity_bytes = capacity_bytes
        self.max_record_bytes = max_record_bytes
        self._clock = clock
        first = time.time_ns() if first_seq is None else first_seq
        if first < 1:
            raise ValueError("sequence numbers start at 1 or above")
        # Records kept are always numbered contiguously: _records[_head + i].seq == _first + i.
        self._records: list[Record] = []
        self._times: list[float] = []
        self._head = 0
        self._first = first
        self._next = first
        self._used = 0
        self._acked = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self.acked_seq = first - 1
        """Highest seq acknowledged durable by the recovery side (or dropped by a spill)."""
        self.appended_records = 0
        self.appended_bytes = 0
        """Payload bytes appended (WRITE data): what the workload wrote."""
        self.ack_latencies: collections.deque[float] = collections.deque(maxlen=ACK_LATENCIES)
        """Seconds from append to acknowledgement of the newest acknowledged changes (marks
        left out): how long each change waited to be durable on the recovery side."""
        self.spills = 0

    # -- appending ------------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def last_seq(self) -> int:
        """The seq of the newest record appended (``first_seq - 1`` before any)."""
        return self._next - 1

    @property
    def first_seq(self) -> int:
        """The seq of the oldest record kept (``next_seq`` when empty)."""
        return self._first

    @property
    def count(self) -> int:
        return len(self._records) - self._head

    @property
    def used_bytes(self) -> int:
        return self._used

    def _push(self, pieces: list[tuple[int, Op, int, int, bytes | memoryview]]) -> int:
        cost = sum(RECORD_OVERHEAD + len(p[4]) for p in pieces)
        if self._used + cost > self.capacity_bytes:
            raise BufferFull(f"{cost} bytes do not fit: {self._used} of {self.capacity_bytes} used")
        now = self._clock()
        for volume, op, offset, length, payload in pieces:
            self._records.append(Record(self._next, volume, op, offset, length, payload))
            self._times.append(now)
            self._next += 1
        self._used += cost
        self.appended_records += len(pieces)
        for listener in self._listeners:
            listener()
        return self._next - 1

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every append (the sender's wakeup)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def append_write(self, volume: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append a write; returns the seq of its (last) record. Raises :class:`BufferFull`.

        ``bytes`` and read-only views are kept as they are; anything mutable is copied, since the
        record lives until the recovery side acknowledges it.
        """
        if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
            data = bytes(data)
        step = self.max_record_bytes
        view = memoryview(data) if len(data) > step else data
        pieces = [
            (volume, Op.WRITE, offset + i, min(step, len(data) - i), view[i : i + step])
            for i in range(0, len(data), step)
        ]
        seq = self._push(pieces)
        self.appended_bytes += len(data)
        return seq

    def _extent(self, volume: int, op: Op, offset: int, length: int) -> int:
        pieces: list[tuple[int, Op, int, int, bytes | memoryview]] = [
            (volume, op, offset + i, min(_MAX_EXTENT, length - i), b"")
            for i in range(0, length, _MAX_EXTENT)
        ]
        return self._push(pieces)

    def append_zero(self, volume: int, offset: int, length: int) -> int:
        return self._extent(volume, Op.ZERO, offset, length)

    def append_trim(self, volume: int, offset: int, length: int) -> int:
        return self._extent(volume, Op.TRIM, offset, length)

    def append_mark(self, request: int, payload: bytes = b"") -> int:
        """Append a checkpoint mark for ``request`` (after every record appended so far)."""
        return self._push([(NO_VOLUME, Op.CHECKPOINT_MARK, request, len(payload), payload)])

    # -- consuming ------------------------------------------------------------------------------

    def _index(self, seq: int) -> int:
        """Index in _records of the first record with a seq above ``seq``."""
        return self._head + min(max(0, seq + 1 - self._first), self.count)

    def after(self, seq: int, max_bytes: int, max_records: int) -> list[Record]:
        """Records numbered above ``seq``, oldest first: at least one if any, then up to
        ``max_bytes`` of payload and ``max_records``."""
        i = self._index(seq)
        end = min(len(self._records), i + max_records)
        out: list[Record] = []
        size = 0
        for r in self._records[i:end]:
            if out and size + len(r.payload) > max_bytes:
                break
            out.append(r)
            size += len(r.payload)
        return out

    def ack(self, seq: int) -> int:
        """The recovery side has every record up to ``seq`` durably: free them. Returns how many."""
        end = self._index(seq)
        freed = end - self._head
        if freed:
            acked = self._records[self._head : end]
            self._used -= sum(RECORD_OVERHEAD + len(r.payload) for r in acked)
            now = self._clock()
            self.ack_latencies.extend(
                now - t
                for r, t in zip(acked, self._times[self._head : end], strict=True)
                if r.op is not Op.CHECKPOINT_MARK
            )
            self._first += freed
            self._head = end
            self._compact()
        if seq > self.acked_seq:
            self.acked_seq = min(seq, self.last_seq)
            self._acked.set()
        return freed

    async def wait_acked(self, seq: int) -> None:
        """Return once every record up to ``seq`` is acknowledged (or spilled)."""
        while self.acked_seq < seq:
            self._acked.clear()
            await self._acked.wait()

    def _compact(self) -> None:
        if self._head > 4096 and self._head * 2 > len(self._records):
            del self._records[: self._head]
            del self._times[: self._head]
            self._head = 0

    # -- lag --------------------------------------------------------------------------------

    def oldest_time(self) -> float | None:
        """Clock time the oldest unacknowledged record was appended, if any."""
        return self._times[self._head] if self.count else None

    def lag_seconds(self, now: float | None = None) -> float:
        """How long the oldest unacknowledged record has waited: the RPO, as far as this buffer
        knows it."""
        oldest = self.oldest_time()
        if oldest is None:
            return 0.0
        return max(0.0, (self._clock() if now is None else now) - oldest)

    def unacked_since(self, seq: int) -> int:
        """Records above ``seq`` still kept (e.g. appended but not yet sent)."""
        return len(self._records) - self._index(seq)

    # -- overflow and restarts ----------------------------------------------------------------

    def spill(self, dirty: Mapping[int, DirtyMap]) -> SpillStats:
        """Mark every unacknowledged record's range dirty in ``dirty`` (by volume index), then
        drop them all. Marks carry no data and are dropped; new appends continue the numbering.

        Raises ``KeyError`` before changing anything if a record's volume has no map.
        """
        kept = self._records[self._head :]
        missing = {r.volume for r in kept if r.op is not Op.CHECKPOINT_MARK} - set(dirty)
        if missing:
            raise KeyError(f"no dirty map for volume index {sorted(missing)}")
        marked = 0
        for r in kept:
            if r.op is not Op.CHECKPOINT_MARK and r.length:
                dirty[r.volume].mark(r.offset, r.length)
                marked += r.length
        stats = SpillStats(len(kept), self._used, marked)
        self._records, self._times, self._head = [], [], 0
        self._first = self._next
        self._used = 0
        self.acked_seq = max(self.acked_seq, self._next - 1)
        self.spills += 1
        self._acked.set()
        return stats

    def renumber_after(self, position: int, sent: int) -> int:
        """The recovery side already has seq ``position``, beyond ``sent``, the newest seq this
        buffer ever handed to a sender: its numbers come from an earlier life of this source.
        Records up to ``sent`` are durable over there (acknowledged here); the rest were never
        sent, so nobody has seen their numbers but the appender: renumber them to follow
        ``position``, keeping their order. Returns the shift applied (0 if none was needed)."""
        if position <= sent:
            raise ValueError(f"position {position} is not beyond the sent seq {sent}")
        self.ack(sent)
        shift = position + 1 - self._first
        if shift <= 0:
            return 0
        self._records[self._head :] = [
            Record(r.seq + shift, r.volume, r.op, r.offset, r.length, r.payload)
            for r in self._records[self._head :]
        ]
        self._first += shift
        self._next += shift
        self.acked_seq = position
        return shift


class DirtyMap:
    """Which regions of one volume changed since the recovery side last had them.

    One bool per ``region_size`` bytes (numpy): 16 MiB of map for 1 TiB at 64 KiB regions.
    Regions handed out by :meth:`take_batch` are clean again; mark them again if shipping fails.
    """

    def __init__(self, size: int, region_size: int = 64 * 1024) -> None:
        if size < 0 or region_size <= 0:
            raise ValueError("size must be >= 0 and region size > 0")
        self.size = size
        self.region_size = region_size
        self._map: npt.NDArray[np.bool_] = np.zeros(-(-size // region_size), dtype=bool)
        self._dirty = 0
        self._cursor = 0
        self.taken_bytes = 0
        """Bytes handed out by take_batch so far (for progress)."""

    @property
    def total_regions(self) -> int:
        return len(self._map)

    @property
    def dirty_regions(self) -> int:
        return self._dirty

    @property
    def dirty_bytes(self) -> int:
        """Bytes of the volume in dirty regions (the last region may be short)."""
        n = self._dirty
        if n and self._map[-1] and self.size % self.region_size:
            return n * self.region_size - (self.region_size - self.size % self.region_size)
        return n * self.region_size

    def mark(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"[{offset}, {offset + length}) outside volume of {self.size} bytes")
        if not length:
            return
        s, e = offset // self.region_size, -(-(offset + length) // self.region_size)
        part = self._map[s:e]
        self._dirty += int(part.size - np.count_nonzero(part))
        part[:] = True

    def mark_all(self) -> None:
        self._map[:] = True
        self._dirty = len(self._map)

    def is_dirty(self, offset: int, length: int) -> bool:
        s, e = offset // self.region_size, -(-(offset + length) // self.region_size)
        return bool(self._map[s:e].any())

    def extents(self) -> list[tuple[int, int]]:
        """All dirty ranges as (offset, length), merged, without taking them."""
        return self._runs(np.flatnonzero(self._map))

    def _runs(self, idx: npt.NDArray[np.intp]) -> list[tuple[int, int]]:
        r = self.region_size
        return [(s * r, min(e * r, self.size) - s * r) for s, e in index_runs(idx)]

    def take_batch(self, max_bytes: int, scan_regions: int = 1 << 16) -> list[tuple[int, int]]:
        """Up to ``max_bytes`` (at least one region) of dirty ranges, clearing them. Resumes where
        the previous batch stopped and wraps around, so that ranges dirtied again behind the cursor
        wait for at most one pass."""
        want = max(1, max_bytes // self.region_size)
        n = len(self._map)
        taken: list[npt.NDArray[np.intp]] = []
        count = 0
        pos, scanned = self._cursor, 0
        while count < want and self._dirty - count > 0 and scanned < n:
            end = min(n, pos + scan_regions)
            found = np.flatnonzero(self._map[pos:end])[: want - count] + pos
            if found.size:
                self._map[found] = False
                taken.append(found)
                count += found.size
                if count >= want:
                    end = int(found[-1]) + 1
            scanned += end - pos
            pos = end if end < n else 0
        self._cursor = pos
        self._dirty -= count
        out: list[tuple[int, int]] = []
        for part in taken:
            for off, length in self._runs(part):
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((off, length))
        self.taken_bytes += sum(length for _, length in out)
        return out

    def clear(self) -> None:
        self._map[:] = False
        self._dirty = 0
