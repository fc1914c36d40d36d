"""Where the receiver puts records: the :class:`StreamSink` protocol, and :class:`MemorySink`.

A sink belongs to one VPG on the recovery side; each protected appliance of the VPG is a *source*
with its own sequence. The receiver calls, per connection:

1. ``attach(source, volumes)`` with the source's volume table (name and size by volume index);
   raise :class:`SinkRefused` to turn the source away (e.g. a size that does not match);
2. ``position(source)``: the highest seq of that source whose record is durable (0 if none). The
   sender resumes right after it, so it must count every record whose ``submit`` completed and
   none that might be lost by a crash;
3. ``submit(source, record)`` for every record above the position, in seq order, without waiting
   for the previous one: the returned awaitable completes once the record is durable (group
   commit) and raises if it cannot be made durable. Awaiting it once complete must not yield
   (an ``asyncio.Future`` or the journal's ``PendingAppend`` qualify). Once a record of a source
   failed, no later record of that source may become durable until the source attaches again
   (the journal stops at its first I/O error): the position must stay a prefix of the stream.
4. ``checksums(source, volume, offset, length, block_size)`` for delta sync: the digests
   (``frames.block_digests``) of that range of the volume's newest state, with every record of
   the source that is durable in it. The receiver calls it once the records the sender sent
   before asking are durable.

Records of one source arrive strictly in seq order with gaps allowed (a gap is what the protected
side dropped into its dirty-region map). CHECKPOINT_MARK records carry the checkpoint request id
in ``offset``; see :meth:`StreamReceiver.request_checkpoint` for when a recovery-side cut may be
marked.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Sequence
from typing import Protocol

from .frames import Op, Record, VolumeEntry, block_digests

__all__ = ["MemorySink", "MemorySinkState", "SinkError", "SinkRefused", "StreamSink"]


class SinkError(Exception):
    """The sink cannot take a record (the receiver drops the connection with an ERROR)."""


class SinkRefused(SinkError):
    """The sink will not take records from this source at all (e.g. a volume table mismatch)."""


class StreamSink(Protocol):
    def attach(self, source: str, volumes: Sequence[VolumeEntry]) -> None: ...

    def position(self, source: str) -> int: ...

    def submit(self, source: str, record: Record) -> Awaitable[None]: ...

    def checksums(
        self, source: str, volume: int, offset: int, length: int, block_size: int
    ) -> Awaitable[bytes]: ...


@dataclasses.dataclass
class MemorySinkState:
    """What a :class:`MemorySink` keeps durable: survives a receiver restart in tests."""

    images: dict[str, bytearray] = dataclasses.field(default_factory=dict)
    positions: dict[str, int] = dataclasses.field(default_factory=dict)
    applied: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Seqs applied, per source, in order: a double apply shows as a repeat."""
    marks: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    """(seq, request id) of each CHECKPOINT_MARK, per source."""


class MemorySink:
    """An in-memory sink for tests and benchmarks: volume images as bytearrays.

    Submitted records become durable together, ``commit_delay`` seconds after the first of a
    group (a stand-in for the journal's group commit), and only then touch the images, so that
    :attr:`state` holds exactly what a durable sink would have after a crash. A seq at or below
    one already submitted for its source raises :class:`SinkError` (a double apply).
    """

    def __init__(self, state: MemorySinkState | None = None, *, commit_delay: float = 0.0) -> None:
        self.state = state if state is not None else MemorySinkState()
        self.commit_delay = commit_delay
        self._volumes: dict[str, list[str]] = {}
        self._submitted: dict[str, int] = {}
        self._group: list[tuple[str, Record, asyncio.Future[None]]] = []
        self._broken: set[str] = set()
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.commits = 0
        self.fail_next: Exception | None = None
        """When set, the next group commit fails with this exception (tests)."""

    def attach(self, source: str, volumes: Sequence[VolumeEntry]) -> None:
        images = self.state.images
        for v in volumes:
            if v.name in images and len(images[v.name]) != v.size:
                raise SinkRefused(
                    f"volume {v.name}: {v.size} bytes from {source}, {len(images[v.name])} here"
                )
        for v in volumes:
            images.setdefault(v.name, bytearray(v.size))
        self._volumes[source] = [v.name for v in volumes]
        self._submitted[source] = self.position(source)
        self._broken.discard(source)

    def position(self, source: str) -> int:
        return self.state.positions.get(source, 0)

    def submit(self, source: str, record: Record) -> asyncio.Future[None]:
        if source in self._broken:
            raise SinkError(f"source {source}: an earlier commit failed")
        last = self._submitted.get(source, 0)
        if record.seq <= last:
            raise SinkError(f"source {source}: seq {record.seq} after {last}: double apply")
        if record.op is not Op.CHECKPOINT_MARK:
            # Copy now: the receiver's frame buffer is not ours to keep.
            record = dataclasses.replace(record, payload=bytes(record.payload))
        self._submitted[source] = record.seq
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._group.append((source, record, fut))
        if self._timer is None:
            if self.commit_delay > 0:
                self._timer = loop.call_later(self.commit_delay, self._commit)
            else:
                self._timer = loop.call_soon(self._commit)
        return fut

    async def checksums(
        self, source: str, volume: int, offset: int, length: int, block_size: int
    ) -> bytes:
        image = self.state.images[self._volumes[source][volume]]
        return block_digests(memoryview(image)[offset : offset + length], block_size)

    def _commit(self) -> None:
        group, self._group, self._timer = self._group, [], None
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            self._broken.update(source for source, _, _ in group)
        for source, record, fut in group:
            if source in self._broken:
                self._submitted[source] = self.position(source)
                if not fut.done():
                    fut.set_exception(
                        SinkError(f"commit failed: {failure or 'an earlier one did'}")
                    )
                continue
            self._apply(source, record)
            if not fut.done():
                fut.set_result(None)
        self.commits += 1

    def _apply(self, source: str, r: Record) -> None:
        st = self.state
        if r.op is Op.CHECKPOINT_MARK:
            st.marks.setdefault(source, []).append((r.seq, r.offset))
        else:
            image = st.images[self._volumes[source][r.volume]]
            if r.op is Op.WRITE:
                image[r.offset : r.offset + r.length] = r.payload
            else:
                image[r.offset : r.offset + r.length] = bytes(r.length)
        st.applied.setdefault(source, []).append(r.seq)
        st.positions[source] = r.seq
