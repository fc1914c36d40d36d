"""The recovery side of replication: a VPG's journal on this appliance, fed by the replication
stream from its protected appliances (the journal's `sources`).

:class:`JournalSink` is what the appliance's :class:`StreamReceiver` writes a VPG's records into:

- ``attach`` checks the source's volume table (a source the journal does not list, a volume another
  source owns, or a size the journal knows otherwise is refused; every source is refused during
  a failover and after a committed one) and adds new volumes to the
  journal; records that arrive while a volume is being added wait in a backlog, in order.
- ``submit`` journals WRITE, ZERO and TRIM records (``journal.submit_*``: the journal's order is
  the order records are submitted in, across sources), and once per event-loop turn submits one
  POSITION record per source for what was submitted in that turn. A record's durability is that
  of its turn's position record, so ``position(source)`` (the journal's durable position) counts
  exactly the records the sender may forget, and a resend after a reconnect or a crash starts right
  after them. A crash that tears the journal between data records and their position record makes
  the sender resend that suffix, which is re-applied in the same order (the volumes a source owns
  are written by nobody else, so the images do not change) and no checkpoint ever falls inside it.
- CHECKPOINT_MARK records are not journaled; their payload (``protected.parse_mark``) says whether
  the source was consistent when it marked.
- ``checksums`` (delta sync) hashes a range of the journal's latest view of a volume (replica plus
  every durable record: ``Journal.open_latest``, read without copying the volume) in a worker
  thread. Requests for a volume share one view, closed once none came for ``view_idle`` seconds
  (or when a promotion wants no open image), so that no view pins the journal while no delta
  sync runs.

:class:`RecoveryVpg` takes a checkpoint every `checkpointIntervalSeconds` as a cut across every
source (:meth:`StreamReceiver.request_checkpoint`): once every source's mark has reached the sink
(the receiver holds back what follows each mark meanwhile), the journal's checkpoint is marked
inside ``on_cut``, synchronously, so that it follows every record the sources acknowledged before
their holds and precedes every record after. It is consistent when
every source's mark says so. When a source is not connected, no checkpoint is taken: the RPO grows
and the status says why.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from secondsite.appliance.config import JournalSpec
from secondsite.appliance.journal import Checkpoint, Journal, JournalError, PitImage
from secondsite.appliance.protected import parse_mark
from secondsite.appliance.stream import (
    CheckpointError,
    Op,
    Record,
    SinkError,
    SinkRefused,
    StreamReceiver,
    VolumeEntry,
)
from secondsite.appliance.stream.frames import block_digests
from secondsite.appliance.vpg import CheckpointSkipped, JournaledVpg

__all__ = ["JournalSink", "RecoveryVpg", "SourceState"]

log = logging.getLogger(__name__)

_MARKS_KEPT: Final = 64
_HASH_PIECE: Final = 8 << 20
"""Bytes of a volume read at a time to answer a checksum request (a multiple of every block
size up to it: block sizes are powers of two)."""


@dataclasses.dataclass
class SourceState:
    """What the sink knows of one source (status and checkpoint consistency)."""

    volumes: list[str] = dataclasses.field(default_factory=list)
    """Volume names by the index of the source's volume table."""
    records: int = 0
    payload_bytes: int = 0
    last_record: float = 0.0
    """Wall-clock time of the last record submitted."""
    rate: float = 0.0
    """Payload bytes per second, over the last second or so of records."""
    _rate_at: float = 0.0
    _rate_bytes: int = 0
    marks: collections.OrderedDict[int, tuple[bool, str]] = dataclasses.field(
        default_factory=collections.OrderedDict
    )
    """seq -> (consistent, state) of recent marks."""
    consistent: bool | None = None
    """What the source's newest mark said (None: no mark yet)."""
    state: str = ""
    """The source's VPG state, as its newest mark said."""

    def count(self, payload: int, now: float) -> None:
        """One more record of ``payload`` data bytes, submitted at ``now``."""
        self.records += 1
        self.payload_bytes += payload
        if now - self._rate_at >= 1.0:
            if self._rate_at:
                self.rate = (self.payload_bytes - self._rate_bytes) / (now - self._rate_at)
            self._rate_at, self._rate_bytes = now, self.payload_bytes
        self.last_record = now

    def bytes_per_second(self, now: float) -> float:
        return self.rate if now - self.last_record < 2.0 else 0.0


@dataclasses.dataclass(eq=False)
class _SharedView:
    """A latest view of one volume, opened for the checksum requests in flight."""

    opening: asyncio.Task[PitImage]
    users: int = 0
    idle: asyncio.TimerHandle | None = None
    """Closes the view when no request came for a while."""

    def release(self) -> None:
        """Close the view now, or once it is open; its opening's failure was reported."""
        if self.opening.done():
            _close_view(self.opening)
        else:
            self.opening.add_done_callback(_close_view)


def _hash_view(view: PitImage, offset: int, length: int, block_size: int) -> bytes:
    """Digests of [offset, offset+length) of ``view``, read a piece at a time (memory stays
    bounded however large the request)."""
    piece = max(block_size, _HASH_PIECE)
    return b"".join(
        block_digests(view.read_sync(at, min(piece, offset + length - at)), block_size)
        for at in range(offset, offset + length, piece)
    )


def _close_view(opening: asyncio.Task[PitImage]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


@dataclasses.dataclass(eq=False)
class _Turn:
    seq: int
    future: asyncio.Future[None]


class JournalSink:
    """The :class:`~secondsite.appliance.stream.StreamSink` of one VPG's journal (module doc)."""

    def __init__(
        self,
        vpg: str,
        journal: Journal,
        sources: Sequence[str],
        replicas: Mapping[str, Path] | None = None,
        *,
        view_idle: float = 2.0,
    ) -> None:
        """``view_idle``: seconds a volume's view for checksums stays open after the last
        request, so that a delta sync's next ones reuse it instead of building the extent map
        again. An idle view pins retention meanwhile; a promotion closes it first
        (:meth:`close_idle_views`)."""
        self.vpg = vpg
        self.journal = journal
        self.allowed = set(sources)
        self.replicas = dict(replicas or {})
        """Replica files of volumes not kept at the journal's default place (JournalSpec)."""
        self.sources: dict[str, SourceState] = {}
        self._owners: dict[str, str] = {}
        self._adding: dict[str, asyncio.Task[None]] = {}
        self._backlog: dict[str, list[tuple[Record, asyncio.Future[None]]]] = {}
        self._turn: dict[str, _Turn] = {}
        self._flush_scheduled = False
        self._add_lock = asyncio.Lock()
        self._views: dict[str, _SharedView] = {}
        self._view_idle = view_idle

    # -- StreamSink --------------------------------------------------------------------------

    def attach(self, source: str, volumes: Sequence[VolumeEntry]) -> None:
        if self.journal.failover_phase is not None:
            raise SinkRefused(
                f"VPG {self.vpg} is in failover phase {self.journal.failover_phase}: replication "
                "resumes after commit or rollback"
            )
        committed = self.journal.committed_failover
        if committed is not None:
            # The replicas are the recovered volumes now: a stream from the old site would
            # journal (and in time promote) writes made after the failover point into them.
            raise SinkRefused(
                f"VPG {self.vpg} was failed over to checkpoint {committed.id} (committed): its "
                "replicas are the recovered volumes; reverse the VPG to protect them back"
            )
        if source not in self.allowed:
            raise SinkRefused(
                f"{source} is not a source of VPG {self.vpg} (sources: "
                f"{', '.join(sorted(self.allowed)) or 'none'})"
            )
        known = {v.name: v for v in self.journal.volumes()}
        for v in volumes:
            owner = self._owners.get(v.name)
            if owner is not None and owner != source:
                raise SinkRefused(f"volume {v.name} of VPG {self.vpg} comes from {owner}")
            info = known.get(v.name)
            if info is not None and info.size != v.size:
                raise SinkRefused(
                    f"volume {v.name}: {v.size} bytes from {source}, the journal has {info.size}"
                )
        for v in volumes:
            self._owners[v.name] = source
        state = self.sources.setdefault(source, SourceState())
        state.volumes = [v.name for v in volumes]
        missing = [v for v in volumes if v.name not in known]
        if missing:
            task = asyncio.get_running_loop().create_task(self._add_volumes(source, missing))
            self._adding[source] = task
            self._backlog.setdefault(source, [])
            task.add_done_callback(lambda t: self._added(source, t))
        log.info(
            "vpg=%s source=%s event=source-attached volumes=%s new=%s position=%d",
            self.vpg,
            source,
            ",".join(state.volumes),
            ",".join(v.name for v in missing) or "-",
            self.position(source),
        )

    def position(self, source: str) -> int:
        return self.journal.positions.get(source, 0)

    def submit(self, source: str, record: Record) -> Awaitable[None]:
        if source in self._adding:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._backlog[source].append((record, fut))
            return fut
        return self._submit(source, record)

    async def checksums(
        self, source: str, volume: int, offset: int, length: int, block_size: int
    ) -> bytes:
        adding = self._adding.get(source)
        if adding is not None:
            await asyncio.wait({adding})
        try:
            name = self.sources[source].volumes[volume]
        except (KeyError, IndexError):
            raise SinkError(f"{source} has no volume index {volume}") from None
        loop = asyncio.get_running_loop()
        shared = self._views.get(name)
        if shared is None:
            opening = loop.create_task(self.journal.open_latest(name))
            shared = self._views[name] = _SharedView(opening)
        if shared.idle is not None:
            shared.idle.cancel()
            shared.idle = None
        shared.users += 1
        try:
            view = await asyncio.shield(shared.opening)
            return await asyncio.to_thread(_hash_view, view, offset, length, block_size)
        except JournalError as e:
            raise SinkError(f"volume {name}: checksums not read: {e}") from e
        finally:
            shared.users -= 1
            if not shared.users:
                shared.idle = loop.call_later(self._view_idle, self._close_view, name, shared)

    def _close_view(self, name: str, shared: _SharedView) -> None:
        if self._views.get(name) is shared and not shared.users:
            del self._views[name]
            shared.release()

    def close_idle_views(self) -> None:
        """Close the views kept for checksums that no request uses now: a promotion wants no
        open image of the journal."""
        for name, shared in list(self._views.items()):
            if not shared.users:
                if shared.idle is not None:
                    shared.idle.cancel()
                self._close_view(name, shared)

    def close(self) -> None:
        """Close the views kept for checksums (before the journal closes)."""
        views, self._views = self._views, {}
        for shared in views.values():
            if shared.idle is not None:
                shared.idle.cancel()
            shared.release()

    # -- inside ------------------------------------------------------------------------------

    async def _add_volumes(self, source: str, volumes: Sequence[VolumeEntry]) -> None:
        # One at a time: Journal.add_volume picks the new volume's id before it awaits, so two
        # concurrent calls would give two volumes the same id.
        async with self._add_lock:
            for v in volumes:
                await self._add_volume(source, v)

    async def _add_volume(self, source: str, v: VolumeEntry) -> None:
        if not any(known.name == v.name for known in self.journal.volumes()):
            replica = self.replicas.get(v.name)
            await self.journal.add_volume(v.name, v.size, replica)
            log.info(
                "vpg=%s source=%s volume=%s event=volume-added size=%d replica=%s",
                self.vpg,
                source,
                v.name,
                v.size,
                replica or "default",
            )

    def _added(self, source: str, task: asyncio.Task[None]) -> None:
        if self._adding.get(source) is task:
            del self._adding[source]
        backlog = self._backlog.pop(source, [])
        error: BaseException | None = None
        if task.cancelled():
            error = SinkError("adding the source's volumes was cancelled")
        elif task.exception() is not None:
            error = SinkError(f"cannot add the source's volumes: {task.exception()!r}")
        for record, fut in backlog:
            if error is None:
                try:
                    done = self._submit(source, record)
                except Exception as e:
                    error = e
                else:
                    done.add_done_callback(functools.partial(_chain, target=fut))
                    continue
            if not fut.done():
                fut.set_exception(error)

    def _submit(self, source: str, record: Record) -> asyncio.Future[None]:
        state = self.sources[source]
        if record.op is Op.CHECKPOINT_MARK:
            mark = parse_mark(record.payload)
            state.marks[record.seq] = mark
            while len(state.marks) > _MARKS_KEPT:
                state.marks.popitem(last=False)
        else:
            try:
                volume = state.volumes[record.volume]
            except IndexError:
                raise SinkError(f"record {record.seq}: no volume index {record.volume}") from None
            payload = record.payload
            if isinstance(payload, memoryview) and not payload.readonly:
                # The receiver hands out views of immutable frame bodies; copy anything else,
                # since the journal holds the data until it is durable.
                payload = bytes(payload)
            if record.op is Op.WRITE:
                self.journal.submit_write(volume, record.offset, payload)
            elif record.op is Op.ZERO:
                self.journal.submit_zero(volume, record.offset, record.length)
            else:
                self.journal.submit_trim(volume, record.offset, record.length)
        state.count(len(record.payload) if record.op is Op.WRITE else 0, time.time())
        turn = self._turn.get(source)
        if turn is None:
            turn = self._turn[source] = _Turn(
                record.seq, asyncio.get_running_loop().create_future()
            )
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_positions)
        turn.seq = record.seq
        return turn.future

    def _flush_positions(self) -> None:
        self._flush_scheduled = False
        turns, self._turn = self._turn, {}
        for source, turn in turns.items():
            try:
                pending = self.journal.submit_position(source, turn.seq)
            except (JournalError, ValueError) as e:
                turn.future.set_exception(SinkError(f"position of {source} not journaled: {e}"))
                continue
            pending.future.add_done_callback(functools.partial(_chain, target=turn.future))

    def mark(self, source: str, seq: int) -> tuple[bool, str]:
        """(consistent, state) of the mark ``source`` appended at ``seq``."""
        mark = self.sources[source].marks.get(seq)
        return mark if mark is not None else (False, "unknown")

    def backlogged(self) -> bool:
        return any(self._backlog.values())


def _chain(done: asyncio.Future[Any], target: asyncio.Future[None]) -> None:
    if target.done():
        return
    if done.cancelled():
        target.set_exception(SinkError("cancelled"))
    elif done.exception() is not None:
        target.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        target.set_result(None)


class RecoveryVpg(JournaledVpg):
    """A VPG journaled here from the streams of its protected appliances (module doc)."""

    def __init__(self, journal_spec: JournalSpec, receiver: StreamReceiver) -> None:
        super().__init__(journal_spec)
        self.receiver = receiver
        self.sink: JournalSink | None = None
        self._hold_times: collections.deque[float] = collections.deque(maxlen=1000)

    async def start(self) -> None:
        journal = await self._open_journal()
        self.sink = JournalSink(self.name, journal, self.spec.sources, self.spec.replicas)
        self._start_loops()
        log.info(
            "vpg=%s event=recovery-started sources=%s positions=%s next_seq=%d",
            self.name,
            ",".join(self.spec.sources),
            dict(journal.positions),
            journal.next_seq,
        )

    async def stop(self) -> None:
        await self.tasks.cancel_all()
        if self.sink is not None:
            self.sink.close()
        self.sink = None
        if self.journal is not None:
            await self.journal.close()
        log.info("vpg=%s event=stopped", self.name)

    def connected(self) -> list[str]:
        """The VPG's sources connected now."""
        return [s for s in self.receiver.sources(self.name) if s in self.spec.sources]

    @property
    def consistent(self) -> bool:
        if self.sink is None or set(self.connected()) != set(self.spec.sources):
            return False
        sources = self.sink.sources
        return all(s in sources and sources[s].consistent is True for s in self.spec.sources)

    async def _cut(self, tag: str | None) -> Checkpoint:
        journal, sink = self.journal, self.sink
        assert journal is not None and sink is not None
        marked: list[tuple[Checkpoint, Awaitable[None]]] = []
        # Every write a source acknowledged before this instant is before its mark: the
        # checkpoint's time (the receiver releases the holds before the marks reach the sink,
        # so the moment the cut is marked below may be later than the cut itself).
        held_at = time.time_ns()

        def on_cut(marks: Mapping[str, int]) -> None:
            if sink.backlogged():
                raise CheckpointSkipped("a source's new volumes are still being added")
            verdicts = {src: sink.mark(src, seq) for src, seq in marks.items()}
            for src, (consistent, state) in verdicts.items():
                sink.sources[src].consistent = consistent
                sink.sources[src].state = state
            consistent = all(c for c, _ in verdicts.values())
            marked.append(journal.mark_checkpoint(tag, consistent, time_ns=held_at))

        missing = sorted(set(self.spec.sources) - set(self.connected()))
        if missing:
            raise CheckpointSkipped(f"sources not connected: {', '.join(missing)}")
        started = time.perf_counter()
        try:
            await self.receiver.request_checkpoint(self.name, self.spec.sources, on_cut=on_cut)
        except CheckpointError as e:
            raise CheckpointSkipped(str(e)) from None
        finally:
            self._hold_times.append(time.perf_counter() - started)
        cp, pending = marked[0]
        await pending
        return cp

    def hold_times(self) -> list[float]:
        """Recent cuts across the sources (HOLD sent to RELEASE sent), seconds, oldest first."""
        return list(self._hold_times)

    def hold_percentiles(self) -> dict[str, float]:
        samples = sorted(self._hold_times)
        if not samples:
            return {}

        def at(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3

        return {
            "count": float(len(samples)),
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
            "max_ms": samples[-1] * 1e3,
        }

    @property
    def state(self) -> str:
        """Disconnected (a source is not connected), a source's sync state (InitialSync,
        DeltaSync, BitmapSync, NotSynced) as its newest mark says, or Protected."""
        if self.sink is None or set(self.connected()) != set(self.spec.sources):
            return "Disconnected"
        for s in self.spec.sources:
            src = self.sink.sources.get(s)
            if src is not None and src.consistent is False:
                return src.state or "Syncing"
        return "Protected"

    def reason(self) -> str:
        missing = sorted(set(self.spec.sources) - set(self.connected()))
        if missing:
            return f"sources not connected: {', '.join(missing)}; no checkpoints meanwhile"
        if self.sink is not None:
            syncing = [
                f"{s}: {st.state}"
                for s, st in sorted(self.sink.sources.items())
                if st.consistent is False
            ]
            if syncing:
                return (
                    "checkpoints are not consistent while sources sync (" + ", ".join(syncing) + ")"
                )
        return self.checkpoint_problem

    def status(self) -> dict[str, Any]:
        st = super().status()
        assert self.journal is not None
        sessions = {s.source: s for s in self.receiver.stats() if s.vpg == self.name}
        now = time.time()
        sources: dict[str, Any] = {}
        for name in self.spec.sources:
            known = self.sink.sources.get(name) if self.sink is not None else None
            session = sessions.get(name)
            sources[name] = {
                "connected": session is not None,
                "peer": None if session is None else session.peer,
                "position": self.journal.positions.get(name, 0),
                "receivedSeq": None if session is None else session.last_seq,
                "durableSeq": None if session is None else session.durable_seq,
                "records": 0 if known is None else known.records,
                "payloadBytes": 0 if known is None else known.payload_bytes,
                "bytesPerSecond": 0.0 if known is None else known.bytes_per_second(now),
                "skippedRecords": None if session is None else session.skipped,
                "wireBytes": None if session is None else session.wire_bytes,
                "lastRecordTime": None
                if known is None or not known.last_record
                else known.last_record,
                "consistent": None if known is None else known.consistent,
                "state": "" if known is None else known.state,
                "volumes": [] if known is None else list(known.volumes),
            }
        st["state"] = self.state
        st["reason"] = self.reason()
        st["replication"] = {"role": "recovery", "sources": sources}
        return st
