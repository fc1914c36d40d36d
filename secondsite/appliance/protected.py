"""The protected side of replication: a VPG's volumes captured here and streamed to its recovery
appliance, with no journal on this appliance.

The capture exports of `capture.py` submit every change to a :class:`ProtectedVpg` (their write
target), which numbers it into the VPG's :class:`ProtectedBuffer`; a :class:`StreamSender` ships
the buffer to the recovery appliance, which journals it. Replication is asynchronous: a write is
acknowledged once (in-path) the backing store has it and its record is in the buffer, or (mirror
target) its record is in the buffer. The RPO is the age of the oldest record the recovery side
has not acknowledged durable (a few seconds at most while the link keeps up).

State machine of a replicated volume (`vpg.SyncState`)::

                 new volume                unclean stop, force sync, recovery side lost
         (initialSync: full | delta)      records, new volume with initialSync delta
                     |                                        |
                     v                                        v
               InitialSync ----- every region shipped, ----> Protected <--- DeltaSync
                     ^           and acknowledged durable      |    ^
                     |                                         |    |
                     +-- (overflow during a sync: the sync     |    | every dirty region shipped
                          goes on with the new regions)        v    | and acknowledged
                                                           BitmapSync
                                                  (buffer full: in-path only)

- *In-path volumes* are copied by one mechanism, a per-volume :class:`DirtyMap` shipped in the
  background (:meth:`ProtectedVpg._ship_loop`): a full initial sync marks the whole volume dirty;
  an overflow of the buffer spills the buffer's unacknowledged records into the maps. While a
  volume is not *streaming*, its new writes only mark regions dirty. The shipper claims a region
  with the volume's :class:`~secondsite.appliance.capture.RegionGuard` (so that no concurrent
  write races it), reads the backing store and appends a WRITE record (or a ZERO for a hole); the
  moment a volume's map is found empty, the volume streams again, and once everything shipped is
  acknowledged durable it is Protected. Shipping waits while the link is down or the buffer is
  half full.
- *Delta sync* (:meth:`ProtectedVpg._delta_sync`) compares instead of copying: it asks the
  recovery side for block digests (``DELTA_BLOCK`` bytes a block, ``SUM_SPAN`` bytes a request,
  ``SUM_DEPTH`` requests in flight) of its newest state, reads the same span of the source under
  the RegionGuard, and appends WRITE (or ZERO) records for the blocks that differ only. The volume
  keeps streaming meanwhile: a write racing the comparison is in the stream after the request (so
  the recovery side applies it after the state it hashed) and lands in the source either before
  the read (a difference, shipped again: harmless) or after it (in the stream after the shipped
  block); either way the replica ends equal to the source. It is used by force sync
  (:meth:`ProtectedVpg.force_sync`), after an unclean stop, when the recovery side lost records it
  had acknowledged, and for the initial sync of a VPG with ``initialSync: delta`` (the replica
  already holds most of the data: reverse protection).
- *Mirror targets* keep no copy of the source, so nothing can be re-read: a write that does not fit
  in the buffer waits for room (backpressure on the hypervisor, whose guest write is blocked
  meanwhile) for at most :data:`MIRROR_BACKPRESSURE_SECONDS`; then the write fails with EIO and the
  volume is NotSynced until QEMU reports a (new) mirror job ready. Their initial sync is QEMU's
  (``sync=full``), as with local capture.

After an unclean stop: the :class:`IntentMap` of each in-path volume (a small file: one byte per
MiB) holds every region whose changes the recovery side may not have durably; after a crash of the
process in the same boot of the node, only those regions are delta-synced. After a reboot of the
node the map may be stale (it is not synced to disk on every change), and so is a volume whose map
is missing: the whole volume is delta-synced. A delta sync keeps the regions it has not compared
yet set in the intent map, so after a stop in the middle it goes on with those.

Checkpoints: the recovery appliance sends HOLD; :meth:`ProtectedVpg._on_hold` closes the VPG's
:class:`AckGate` (new acknowledgements wait) and appends a CHECKPOINT_MARK after every record
appended so far, whose payload (:func:`mark_payload`) says whether this source is consistent
(every volume Protected); RELEASE opens the gate. Every write acknowledged before the hold has a
record before the mark; none after it is acknowledged until the recovery side has marked its cut.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Generator, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from secondsite.appliance.capture import InPathExport, MirrorTargetExport
from secondsite.appliance.config import (
    CaptureMode,
    Compression,
    InitialSync,
    ProtectedVpgSpec,
    StreamTlsSpec,
    VolumeSpec,
)
from secondsite.appliance.nbd.export import NBDError
from secondsite.appliance.resync import ResyncProgress
from secondsite.appliance.stream import (
    BandwidthLimiter,
    BufferFull,
    DirtyMap,
    ProtectedBuffer,
    SenderSettings,
    StreamSender,
    SumsLost,
    VolumeEntry,
    client_context,
    tcp_connector,
)
from secondsite.appliance.stream.buffer import index_runs
from secondsite.appliance.stream.frames import DIGEST_SIZE, block_digests
from secondsite.appliance.vpg import (
    CapturedVolumes,
    CaptureStateFile,
    MirrorWatch,
    SyncState,
    TaskSet,
    VolumeRuntime,
    open_backing,
    volume_status,
)

__all__ = [
    "DELTA_BLOCK",
    "MIRROR_BACKPRESSURE_SECONDS",
    "AckGate",
    "ProtectedVpg",
    "discard_sync_state",
    "mark_payload",
    "parse_mark",
    "sender_settings",
]

log = logging.getLogger(__name__)

MIRROR_BACKPRESSURE_SECONDS: Final = 30.0
"""How long a mirror-target write waits for room in a full protected buffer before it fails."""
SHIP_CHUNK: Final = 1 << 20
"""Most bytes of a dirty region read and shipped under one RegionGuard claim (an eighth of the
buffer when that is less, so that a chunk always fits once the buffer is half empty)."""
_SHIP_BATCH: Final = 16 << 20
"""Bytes of dirty regions taken from a map at a time."""
_MAX_ZERO: Final = 1 << 30
_ZEROES: Final = bytes(SHIP_CHUNK)
_DRAIN_SECONDS: Final = 10.0
"""At a clean stop, how long to wait for the recovery side to acknowledge the buffer."""
_CAPTURE_STATE: Final = "capture-state.json"
_RATE_PERIOD: Final = 1.0
INTENT_REGION: Final = 1 << 20
"""Bytes per byte of an in-path volume's intent map (:class:`IntentMap`)."""
_SWEEP_PERIOD: Final = 1.0
DELTA_BLOCK: Final = 4096
"""Bytes per digest compared by delta sync: scattered small writes ship about what they wrote."""
SUM_SPAN: Final = 8 << 20
"""Bytes of a volume per checksum request (2048 digests, 32 KiB of answer)."""
SUM_DEPTH: Final = 8
"""Checksum requests in flight per volume, so that delta sync runs at disk speed, not at the
round trip's."""


def mark_payload(consistent: bool, state: str) -> bytes:
    """The payload of a CHECKPOINT_MARK: this source's word on the cut, as compact JSON
    ``{"consistent": bool, "state": "<VPG state>"}``."""
    return json.dumps({"consistent": consistent, "state": state}, separators=(",", ":")).encode()


def parse_mark(payload: bytes | memoryview) -> tuple[bool, str]:
    """(consistent, state) from a mark's payload; anything unreadable is not consistent."""
    try:
        data = json.loads(bytes(payload))
        return data["consistent"] is True, str(data.get("state", ""))
    except (ValueError, KeyError, TypeError):
        return False, "unknown"


def sender_settings(compression: Compression) -> SenderSettings:
    """The stream sender's settings for a VPG's compression choice."""
    if compression is Compression.NONE:
        return SenderSettings(compression_level=None)
    return SenderSettings(
        compression_level=3, adaptive_compression=compression is Compression.ADAPTIVE
    )


class _Passed:
    """An awaitable that completes at once (the ack gate is open)."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that returns at once


_PASSED: Final = _Passed()


class AckGate:
    """Holds the acknowledgements of a VPG's writes while checkpoint cuts are being marked.

    A write's ack waits only if the gate was closed when the write was submitted: a write submitted
    while the gate was open was numbered before any mark appended since, so acknowledging it is
    always safe; one submitted while a hold is on was numbered after the mark and must not be
    acknowledged until the recovery side has marked its cut.
    """

    def __init__(self) -> None:
        self._holds: set[int] = set()
        self._released: asyncio.Future[None] | None = None
        self._since = 0.0
        self.hold_seconds: list[float] = []
        """Recent holds, closed to opened, seconds."""

    @property
    def held(self) -> bool:
        return bool(self._holds)

    def close(self, request: int) -> None:
        if not self._holds:
            self._released = asyncio.get_running_loop().create_future()
            self._since = time.perf_counter()
        self._holds.add(request)

    def open(self, request: int) -> None:
        if request not in self._holds:
            return
        self._holds.discard(request)
        if not self._holds and self._released is not None:
            self._released.set_result(None)
            self._released = None
            self.hold_seconds = [*self.hold_seconds[-999:], time.perf_counter() - self._since]

    def passage(self) -> Awaitable[None]:
        """What a write awaits before its ack (see the class doc)."""
        if self._released is None:
            return _PASSED
        # Shielded: a cancelled write must not cancel everybody's wait.
        return asyncio.shield(self._released)


class IntentMap:
    """Regions of an in-path volume whose changes the recovery side may not have durably: a file
    of one byte per region (``INTENT_REGION``), set before a change to the region is written to
    the backing store, cleared once every record covering it is acknowledged durable and it is
    not dirty. After an unclean stop of the process in the same boot of the node (the file's
    page cache survived), only these regions are delta-synced; after a reboot the file may be
    stale and the whole volume is.

    Setting a region costs a ``pwrite`` the first time it is written after a clear; clearing is
    done in sweeps (:meth:`sweep`).
    """

    def __init__(self, path: Path, size: int, region: int = INTENT_REGION) -> None:
        self.path = path
        self.region = region
        n = -(-size // region)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.found: npt.NDArray[np.bool_] | None = None
        """The regions the file held when opened (None: it did not fit this volume)."""
        raw = os.pread(self._fd, n + 1, 0)
        if len(raw) == n:
            self.found = np.frombuffer(raw, dtype=np.uint8) != 0
        os.ftruncate(self._fd, n)
        self._set = np.zeros(n, dtype=bool)
        self._last = np.zeros(n, dtype=np.int64)
        """Newest seq of a record covering each region."""
        self.sets = 0

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.region, -(-(offset + max(length, 1)) // self.region)

    def note(self, offset: int, length: int, seq: int = 0) -> None:
        """A change to [offset, offset+length), numbered ``seq`` (0: tracked as dirty)."""
        a, b = self._span(offset, length)
        if seq:
            last = self._last[a:b]
            np.maximum(last, seq, out=last)
        if not self._set[a:b].all():
            self._set[a:b] = True
            os.pwrite(self._fd, b"\x01" * (b - a), a)
            self.sets += 1

    def note_all(self) -> None:
        self._set[:] = True
        os.pwrite(self._fd, b"\x01" * len(self._set), 0)

    def reset(self) -> None:
        self._set[:] = False
        self._last[:] = 0
        os.pwrite(self._fd, bytes(len(self._set)), 0)

    def sweep(
        self, acked_seq: int, dirty: DirtyMap, pending: Sequence[tuple[int, int]] = ()
    ) -> int:
        """Clear the regions whose records are all acknowledged and that are neither dirty nor
        ``pending`` (a delta sync has not compared them yet); returns how many were cleared."""
        done = self._set & (self._last <= acked_seq)
        for off, length in [*dirty.extents(), *pending]:
            a, b = self._span(off, length)
            done[a:b] = False
        idx = np.flatnonzero(done)
        if not idx.size:
            return 0
        self._set[idx] = False
        for a, b in index_runs(idx):
            os.pwrite(self._fd, bytes(b - a), a)
        return int(idx.size)

    def found_regions(self, size: int) -> list[tuple[int, int]]:
        """The regions set in the file when opened, as (offset, length) within ``size``."""
        assert self.found is not None
        return [
            (i * self.region, min(self.region, size - i * self.region))
            for i in np.flatnonzero(self.found).tolist()
        ]

    @property
    def set_regions(self) -> int:
        return int(np.count_nonzero(self._set))

    def close(self) -> None:
        os.close(self._fd)


@dataclasses.dataclass(eq=False)
class _Replicated:
    """One volume's place in the stream: its index in the volume table, and for in-path volumes
    the dirty-region map and whether new writes go to the buffer (streaming) or the map."""

    index: int
    vol: VolumeRuntime
    dirty: DirtyMap | None
    intent: IntentMap | None = None
    streaming: bool = True
    shipping: bool = False
    """A batch of regions is being shipped: taken from the dirty map, not all appended yet (the
    intent map must not be swept meanwhile)."""
    overflows: int = 0
    """Times the buffer overflowed while this volume streamed (a sync ends only without one)."""
    syncing_since: float | None = None
    """Wall-clock time the current sync started (it bounds the RPO while the volume syncs)."""
    unchecked: DirtyMap | None = None
    """Delta sync: regions not asked about yet (None: no delta sync)."""
    comparing: collections.deque[tuple[int, int, asyncio.Task[bytes]]] = dataclasses.field(
        default_factory=collections.deque
    )
    """Delta sync: regions asked about and not compared yet, with the request for their
    checksums, in order."""
    delta_task: asyncio.Task[None] | None = None
    delta: ResyncProgress | None = None
    """The newest delta sync: ``done_bytes`` compared, ``changed_bytes`` shipped."""
    copying: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    """One copier at a time claims the volume's RegionGuard (bitmap shipping, delta sync)."""

    @property
    def in_path(self) -> bool:
        return self.dirty is not None


def discard_sync_state(spec: ProtectedVpgSpec, volumes: list[VolumeSpec]) -> None:
    """Forget what a stopped protected VPG knew of its volumes' sync (reverse protection: they
    became replicas of the other site's volumes); protected again from ``spec.directory``, every
    volume is synced as a new one."""
    (spec.directory / _CAPTURE_STATE).unlink(missing_ok=True)
    for vs in volumes:
        (spec.directory / f"{vs.name}.intent").unlink(missing_ok=True)


class ProtectedVpg(CapturedVolumes):
    """One VPG captured here and replicated to ``spec.recovery``. `await start()`, serve its
    exports (:attr:`volumes`), `await stop()`. It is the write target of its capture exports."""

    def __init__(
        self,
        spec: ProtectedVpgSpec,
        volumes: list[VolumeSpec],
        *,
        source: str,
        tls: StreamTlsSpec | None,
        limiter: BandwidthLimiter,
        settings: SenderSettings | None = None,
        backpressure_seconds: float = MIRROR_BACKPRESSURE_SECONDS,
    ) -> None:
        self.name = spec.vpg
        self.backpressure_seconds = backpressure_seconds
        self.spec = spec
        self.source = source
        self.volume_specs = volumes
        self.volumes: dict[str, VolumeRuntime] = {}
        self._sides: dict[str, _Replicated] = {}
        self.tasks = TaskSet(self.name)
        self._state = CaptureStateFile(spec.directory / _CAPTURE_STATE)
        self._mirrors = MirrorWatch(self.name, self.tasks, self._set_mirror_state)
        self.gate = AckGate()
        self.buffer = ProtectedBuffer(spec.buffer_size())
        host, port = spec.recovery_address()
        context: ssl.SSLContext | None = None
        if tls is not None:
            context = client_context(
                tls.cert_file, tls.key_file, tls.ca_file, check_hostname=tls.verify_hostname
            )
        self._connect = tcp_connector(host, port, ssl_context=context)
        self._flow = limiter.flow(self.name, spec.priority)
        self._settings = settings or sender_settings(spec.compression)
        self.sender: StreamSender | None = None
        self._chunk = max(4096, min(SHIP_CHUNK, self.buffer.capacity_bytes // 8) // 4096 * 4096)
        self._work = asyncio.Event()
        self._space = asyncio.Lock()
        self.spills = 0
        self._mark_seq = 0
        self._rates: dict[str, float] = {"written": 0.0, "wire": 0.0}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.spec.directory.mkdir(parents=True, exist_ok=True)
        clean = await self._state.open()
        try:
            for index, vs in enumerate(self.volume_specs):
                side = self._start_volume(index, vs, clean)
                self._sides[vs.name] = side
                self.volumes[vs.name] = side.vol
        except BaseException:
            self._close_volumes()
            raise
        self.sender = StreamSender(
            vpg=self.name,
            source=self.source,
            volumes=[VolumeEntry(n, v.export.size) for n, v in self.volumes.items()],
            buffer=self.buffer,
            connect=self._connect,
            settings=self._settings,
            on_hold=self._on_hold,
            on_release=self._on_release,
            on_gap=self._on_gap,
            bandwidth=self._flow,
            # What the recovery side had durably when this appliance last stopped cleanly: a
            # welcome below it means the recovery side lost records (say, its journal was
            # recreated), and the sender reports the gap (`_on_gap`) instead of trusting it.
            known_durable=self._state.recovery_position() if clean else 0,
        )
        self.sender.start()
        self.tasks.spawn(self._ship_loop(), "ship dirty regions")
        self.tasks.spawn(self._rate_loop(), "rates")
        self.tasks.spawn(self._sweep_loop(), "intent sweep")
        for side in self._sides.values():
            if side.unchecked is not None:
                self._spawn_delta(side)
            if side.in_path and not side.vol.synced:
                await self._state.set_synced(side.vol.spec.name, False)
        self._work.set()
        log.info(
            "vpg=%s event=protected-started source=%s recovery=%s volumes=%s clean=%s",
            self.name,
            self.source,
            self.spec.recovery,
            ",".join(self.volumes),
            clean,
        )

    def _start_volume(self, index: int, vs: VolumeSpec, clean: bool) -> _Replicated:
        known = self._state.known(vs.name)
        if vs.capture is CaptureMode.IN_PATH:
            backing = open_backing(vs)
            vol = VolumeRuntime(vs, InPathExport(vs.name, self, backing), SyncState.PROTECTED)
            try:
                intent = IntentMap(self.spec.directory / f"{vs.name}.intent", backing.size)
            except BaseException:
                backing.close()
                raise
            dirty = DirtyMap(backing.size)
            side = _Replicated(index, vol, dirty, intent)
            why = "unclean stop" if not clean else "stopped with changes not shipped"
            if not known and self.spec.initial_sync is InitialSync.DELTA:
                self._begin_delta(side, "initial sync by block checksums (initialSync: delta)")
            elif not known:
                self._begin_sync(side, SyncState.INITIAL_SYNC, "new volume")
            elif clean and known.get("synced"):
                intent.reset()
            elif self._state.same_boot and intent.found is not None:
                # The process stopped uncleanly (or with changes not shipped) in this boot of
                # the node: the intent map says where changes may be missing over there.
                regions = intent.found_regions(backing.size)
                self._begin_delta(
                    side,
                    f"{why}: delta sync of {sum(n for _, n in regions) / (1 << 20):.0f} MiB of "
                    "regions with changes in flight",
                    regions,
                )
            else:
                self._begin_delta(side, f"{why} across a restart of the node: delta sync")
            return side
        size = vs.size_bytes()
        assert size is not None  # the config model requires it for mirror targets
        synced = bool(known.get("synced")) and clean
        vol = VolumeRuntime(
            vs,
            MirrorTargetExport(vs.name, self, size),
            SyncState.PROTECTED if synced else SyncState.INITIAL_SYNC,
            "" if synced else "waiting for the mirror job to be ready",
        )
        if vs.qmp_socket is not None and vs.mirror_job is not None:
            self._mirrors.watch(vol, vs.qmp_socket, vs.mirror_job)
        return _Replicated(index, vol, None)

    async def stop(self) -> None:
        """Ship what the buffer holds (bounded), stop streaming, record a clean stop. Volumes
        whose changes did not all reach the recovery side are resynced at the next start."""
        await self.tasks.cancel_all()
        self._mirrors.clear()
        drained = await self._drain()
        if self.sender is not None:
            await self.sender.close()
            await self._state.set_recovery_position(self.sender.durable_seq if drained else 0)
        self._sweep()
        for side in self._sides.values():
            dirty = side.dirty is not None and side.dirty.dirty_regions > 0
            if not drained or dirty or not side.vol.synced:
                await self._state.set_synced(side.vol.spec.name, False)
        self._close_volumes()
        await self._state.close()
        log.info("vpg=%s event=protected-stopped drained=%s", self.name, drained)

    async def _drain(self) -> bool:
        if self.sender is None or not self.buffer.count:
            return True
        if not self.sender.connected:
            return False
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                await self.sender.wait_durable(self.buffer.last_seq)
        except TimeoutError:
            return False
        return self.buffer.count == 0

    def _close_volumes(self) -> None:
        for side in self._sides.values():
            if side.intent is not None:
                side.intent.close()
        for vol in self.volumes.values():
            if isinstance(vol.export, InPathExport):
                vol.export.backing.close()
            else:
                vol.export.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_PERIOD)
            self._sweep()

    def _sweep(self) -> None:
        for side in self._sides.values():
            if side.intent is None or side.dirty is None or side.shipping:
                continue
            pending: list[tuple[int, int]] = []
            if side.unchecked is not None:
                pending = side.unchecked.extents()
                pending += [(offset, length) for offset, length, _ in side.comparing]
            side.intent.sweep(self.buffer.acked_seq, side.dirty, pending)

    # -- the write target ---------------------------------------------------------------------

    def submit_write(self, volume: str, offset: int, data: bytes | memoryview) -> Awaitable[None]:
        side = self._sides[volume]
        i, buffer = side.index, self.buffer
        return self._submit(side, offset, len(data), lambda: buffer.append_write(i, offset, data))

    def submit_zero(self, volume: str, offset: int, length: int) -> Awaitable[None]:
        side = self._sides[volume]
        i, buffer = side.index, self.buffer
        return self._submit(side, offset, length, lambda: buffer.append_zero(i, offset, length))

    def submit_trim(self, volume: str, offset: int, length: int) -> Awaitable[None]:
        side = self._sides[volume]
        i, buffer = side.index, self.buffer
        return self._submit(side, offset, length, lambda: buffer.append_trim(i, offset, length))

    def _submit(
        self, side: _Replicated, offset: int, length: int, append: Callable[[], int]
    ) -> Awaitable[None]:
        if offset < 0 or length < 0 or offset + length > side.vol.export.size:
            raise NBDError(errno.EINVAL, f"[{offset}, {offset + length}) outside the volume")
        if side.dirty is None:
            if not self._space.locked():
                try:
                    append()
                    return self.gate.passage()
                except BufferFull:
                    pass
            return self._wait_for_room(side, append)
        intent = side.intent
        if side.streaming:
            try:
                seq = append()
            except BufferFull:
                self._overflow(side)
            else:
                if intent is not None:
                    intent.note(offset, length, seq)
                return self.gate.passage()
        side.dirty.mark(offset, length)
        if intent is not None:
            intent.note(offset, length)
        self._work.set()
        return self.gate.passage()

    async def _wait_for_room(self, side: _Replicated, append: Callable[[], int]) -> None:
        """Backpressure for a mirror target (see the module doc): one waiter at a time, in
        arrival order, so that writes keep their order."""
        deadline = time.monotonic() + self.backpressure_seconds
        async with self._space:
            while True:
                try:
                    append()
                    break
                except BufferFull:
                    pass
                if not self.buffer.count:  # empty, and still no room: the write is too large
                    self._mirror_failed(side, "the write is larger than the protected buffer")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._mirror_failed(
                        side,
                        f"the protected buffer stayed full for {self.backpressure_seconds:g} s",
                    )
                try:
                    async with asyncio.timeout(remaining):
                        await self.buffer.wait_acked(self.buffer.acked_seq + 1)
                except TimeoutError:
                    pass
        await self.gate.passage()

    def _mirror_failed(self, side: _Replicated, why: str) -> None:
        vol = side.vol
        reason = f"a write failed ({why}); the recovery side misses it until a new full mirror"
        if vol.state is not SyncState.NOT_SYNCED:
            log.error(
                "vpg=%s volume=%s event=mirror-write-failed reason=%r",
                self.name,
                vol.spec.name,
                why,
            )
        vol.state, vol.reason = SyncState.NOT_SYNCED, reason
        self.tasks.spawn(self._state.set_synced(vol.spec.name, False), "state")
        raise NBDError(errno.EIO, f"write: {why}")

    def _overflow(self, side: _Replicated) -> None:
        """The buffer is full: in-path volumes fall back to bitmap sync. When every volume here
        is in-path, the buffer's unacknowledged records become dirty regions (their data is in
        the backing stores); with a mirror target among them they stay, and only the volume
        whose write did not fit falls back. So do they while a checkpoint mark waits to be
        sent (the recovery side has its MARKED: dropping the mark would fail the cut)."""
        spilled = 0
        # The oldest change not acknowledged yet: where the RPO of the sync that follows starts.
        oldest = time.time() - self.buffer.lag_seconds()
        if all(s.in_path for s in self._sides.values()) and not self._mark_unsent():
            maps = {s.index: s.dirty for s in self._sides.values() if s.dirty is not None}
            stats = self.buffer.spill(maps)
            self.spills += 1
            spilled = stats.records
            fallen = list(self._sides.values())
        else:
            fallen = [side]
        switched = []
        for s in fallen:
            s.overflows += 1
            if s.streaming:
                s.streaming = False
                switched.append(s.vol.spec.name)
                if s.vol.state is SyncState.PROTECTED:
                    self._begin_sync(s, SyncState.BITMAP_SYNC, "protected buffer full")
                    s.syncing_since = oldest
        log.log(
            logging.WARNING if switched else logging.DEBUG,
            "vpg=%s event=buffer-overflow to_bitmap=%s spilled_records=%d",
            self.name,
            ",".join(switched) or "-",
            spilled,
        )
        self._work.set()

    def _begin_sync(
        self, side: _Replicated, state: SyncState, reason: str, *, full: bool = True
    ) -> None:
        """Start syncing an in-path volume: all of it (``full``, except for bitmap sync, whose
        regions are already marked), or the regions marked dirty."""
        assert side.dirty is not None
        if full and state is not SyncState.BITMAP_SYNC:
            side.dirty.mark_all()
            if side.intent is not None:
                side.intent.note_all()
        side.streaming = False
        side.vol.state, side.vol.reason = state, reason
        side.syncing_since = time.time()
        side.vol.progress = ResyncProgress(reason, side.dirty.dirty_bytes)
        log.info(
            "vpg=%s volume=%s event=sync-start state=%s reason=%r dirty_bytes=%d",
            self.name,
            side.vol.spec.name,
            state,
            reason,
            side.dirty.dirty_bytes,
        )

    def _on_gap(self, position: int, durable: int) -> None:
        """The recovery side lost records it had acknowledged: compare every block of the
        in-path volumes with what it has now (delta sync); mirror targets are not synced."""
        for side in self._sides.values():
            why = f"the recovery side lost records (position {position} < {durable})"
            if side.in_path:
                self._begin_delta(side, why + ": delta sync")
                self._spawn_delta(side)
            else:
                side.vol.state, side.vol.reason = SyncState.NOT_SYNCED, why

    # -- delta sync ----------------------------------------------------------------------------

    def force_sync(self) -> list[str]:
        """Delta-sync every in-path volume now (restarting a delta sync that runs); returns their
        names. Mirror targets are left alone: their source is QEMU's to re-read."""
        names = []
        for side in self._sides.values():
            if side.in_path:
                self._begin_delta(side, "force sync: delta sync by block checksums")
                self._spawn_delta(side)
                names.append(side.vol.spec.name)
        return names

    def _begin_delta(
        self, side: _Replicated, reason: str, regions: Sequence[tuple[int, int]] | None = None
    ) -> None:
        """Put an in-path volume in delta sync of ``regions`` (default: all of it); the walk
        starts with :meth:`_spawn_delta` once the sender exists."""
        # The intent map keeps the regions not compared yet (`_sweep`): a stop or crash
        # meanwhile syncs those again.
        todo = DirtyMap(side.vol.export.size, INTENT_REGION)
        if regions is None:
            todo.mark_all()
            if side.intent is not None:
                side.intent.note_all()
        for offset, length in regions or ():
            todo.mark(offset, length)
            if side.intent is not None:
                side.intent.note(offset, length)
        if side.delta_task is not None:
            side.delta_task.cancel()
            side.delta_task = None
        side.unchecked = todo
        side.vol.state, side.vol.reason = SyncState.DELTA_SYNC, reason
        side.syncing_since = time.time()
        side.delta = side.vol.progress = ResyncProgress(reason, todo.dirty_bytes)
        log.info(
            "vpg=%s volume=%s event=sync-start state=%s reason=%r bytes=%d block=%d",
            self.name,
            side.vol.spec.name,
            SyncState.DELTA_SYNC,
            reason,
            todo.dirty_bytes,
            DELTA_BLOCK,
        )

    def _spawn_delta(self, side: _Replicated) -> None:
        assert side.unchecked is not None
        side.delta_task = self.tasks.spawn(
            self._delta_sync(side, side.unchecked), f"delta sync {side.vol.spec.name}"
        )

    async def _delta_sync(self, side: _Replicated, todo: DirtyMap) -> None:
        """Compare ``todo`` with the recovery side, ``SUM_DEPTH`` requests ahead, shipping what
        differs; start again where it stood after a lost connection."""
        sender = self.sender
        assert sender is not None
        inflight: collections.deque[tuple[int, int, asyncio.Task[bytes]]] = collections.deque()
        side.comparing = inflight

        def abandon(why: str) -> None:
            if inflight:
                log.info(
                    "vpg=%s volume=%s event=delta-sync-interrupted requests=%d reason=%r",
                    self.name,
                    side.vol.spec.name,
                    len(inflight),
                    why,
                )
            while inflight:
                offset, length, task = inflight.popleft()
                task.cancel()
                todo.mark(offset, length)

        try:
            while todo.dirty_regions or inflight:
                if not sender.connected:
                    abandon("not connected")
                    await asyncio.sleep(0.05)
                    continue
                while len(inflight) < SUM_DEPTH and todo.dirty_regions:
                    for offset, length in todo.take_batch(SUM_SPAN):
                        ask = sender.checksums(side.index, offset, length, DELTA_BLOCK)
                        inflight.append((offset, length, asyncio.ensure_future(ask)))
                offset, length, task = inflight[0]
                try:
                    remote = await task
                except SumsLost as e:
                    abandon(str(e))
                    continue
                done = 0
                while done < length:
                    await self._wait_for_half_room()
                    done = await self._compare(side, offset, length, remote, done)
                    # Reads of the backing store may complete without suspending: let writes in.
                    await asyncio.sleep(0)
                inflight.popleft()
        finally:
            abandon("stopped")
        if side.delta_task is not asyncio.current_task():
            return
        side.delta_task = side.unchecked = None
        p = side.delta
        assert p is not None
        log.info(
            "vpg=%s volume=%s event=delta-compared bytes=%d shipped=%d seconds=%.1f",
            self.name,
            side.vol.spec.name,
            p.done_bytes,
            p.changed_bytes,
            time.monotonic() - p.started,
        )
        if side.streaming and side.dirty is not None and not side.dirty.dirty_regions:
            self.tasks.spawn(self._finish_sync(side, side.overflows), f"sync {side.vol.spec.name}")

    async def _compare(
        self, side: _Replicated, offset: int, length: int, remote: bytes, start: int
    ) -> int:
        """Read [offset+start, offset+length) of the source under the RegionGuard and append
        records for the blocks whose digests differ from ``remote`` (the digests of the whole
        span), until the buffer is half full; returns where it stopped (``length``: done)."""
        export, progress = side.vol.export, side.delta
        assert isinstance(export, InPathExport) and progress is not None
        async with side.copying:
            await export.guard.claim(offset + start, offset + length)
            try:
                data = memoryview(await export.backing.read(offset + start, length - start))
                theirs = remote[start // DELTA_BLOCK * DIGEST_SIZE :]
                runs = _differing(block_digests(data, DELTA_BLOCK), theirs, DELTA_BLOCK, len(data))
                stopped = self._ship_differing(side, offset + start, data, runs)
            finally:
                export.guard.release()
        reached = length if stopped is None else start + stopped
        progress.done_bytes += reached - start
        return reached

    def _ship_differing(
        self, side: _Replicated, offset: int, data: memoryview, runs: list[tuple[int, int]]
    ) -> int | None:
        """Append the ``runs`` of ``data`` (read at ``offset``), at least one piece, until the
        buffer is half full: returns where that stopped in ``data``, or None when all of it is in
        the buffer (or, if the workload filled the buffer meanwhile, in the dirty map)."""
        assert side.dirty is not None and side.delta is not None
        first = True
        for i, (run_start, run_end) in enumerate(runs):
            for pos in range(run_start, run_end, self._chunk):
                if not first and self.buffer.used_bytes > self.buffer.capacity_bytes // 2:
                    return pos
                first = False
                step = min(self._chunk, run_end - pos)
                try:
                    seq = self._append_data(side, offset + pos, data[pos : pos + step])
                except BufferFull:
                    side.dirty.mark(offset + pos, run_end - pos)
                    for later in runs[i + 1 :]:
                        side.dirty.mark(offset + later[0], later[1] - later[0])
                    self._overflow(side)
                    return None
                if side.intent is not None:
                    side.intent.note(offset + pos, step, seq)
                side.delta.changed_bytes += step
        return None

    async def _wait_for_half_room(self) -> None:
        """Wait while the buffer is more than half full (what is shipped must fit)."""
        while self.buffer.used_bytes > self.buffer.capacity_bytes // 2:
            try:
                async with asyncio.timeout(0.5):
                    await self.buffer.wait_acked(self.buffer.acked_seq + 1)
            except TimeoutError:
                pass

    # -- shipping dirty regions ---------------------------------------------------------------

    def _needs_shipping(self) -> list[_Replicated]:
        return [s for s in self._sides.values() if s.dirty is not None and not s.streaming]

    async def _ship_loop(self) -> None:
        assert self.sender is not None
        while True:
            pending = self._needs_shipping()
            if not pending:
                self._work.clear()
                await self._work.wait()
                continue
            if not self.sender.connected:
                await asyncio.sleep(0.05)  # nothing would leave: keep the changes as regions
                continue
            if self.buffer.used_bytes > self.buffer.capacity_bytes // 2:
                await self._wait_for_half_room()
                continue
            for side in pending:
                await self._ship_batch(side)

    async def _ship_batch(self, side: _Replicated) -> None:
        dirty = side.dirty
        assert dirty is not None
        regions = dirty.take_batch(_SHIP_BATCH)
        overflows = side.overflows
        if not dirty.dirty_regions:
            # Taken in the same step as the check: no write came between. New writes stream;
            # any to a region still to be shipped is numbered before the copy, or waits for it.
            side.streaming = True
        side.shipping = True
        try:
            for offset, length in regions:
                try:
                    await self._ship_region(side, offset, length)
                except BaseException:
                    dirty.mark(offset, length)  # not shipped: keep it for the next round
                    raise
        finally:
            side.shipping = False
        if side.streaming and not dirty.dirty_regions:
            self.tasks.spawn(self._finish_sync(side, overflows), f"sync {side.vol.spec.name}")

    async def _ship_region(self, side: _Replicated, offset: int, length: int) -> None:
        export = side.vol.export
        assert isinstance(export, InPathExport) and side.dirty is not None
        end = offset + length
        pos = offset
        while pos < end:
            extents = await export.backing.block_status(pos, end - pos)
            hole = bool(extents[0][1] & 2)
            step = min(extents[0][0], end - pos, _MAX_ZERO) if hole else min(self._chunk, end - pos)
            async with side.copying:
                await export.guard.claim(pos, pos + step)
                try:
                    if hole:  # look again, now that no write can land in it
                        extents = await export.backing.block_status(pos, step)
                        hole = bool(extents[0][1] & 2) and extents[0][0] >= step
                        if not hole:
                            step = min(self._chunk, step)
                    if hole:
                        seq = self.buffer.append_zero(side.index, pos, step)
                    else:
                        seq = self._append_data(side, pos, await export.backing.read(pos, step))
                    if side.intent is not None:
                        side.intent.note(pos, step, seq)
                except BufferFull:
                    side.dirty.mark(pos, end - pos)
                    self._overflow(side)
                    return
                finally:
                    export.guard.release()
            pos += step
            self._progress(side, step)
            # Reads of the backing store may complete without suspending: let writes, the
            # sender and the acks in.
            await asyncio.sleep(0)

    def _append_data(
        self, side: _Replicated, offset: int, data: bytes | bytearray | memoryview
    ) -> int:
        """A WRITE record of ``data`` read from the source, or a ZERO when it is all zeroes."""
        if data == _ZEROES[: len(data)]:
            return self.buffer.append_zero(side.index, offset, len(data))
        return self.buffer.append_write(side.index, offset, data)

    def _progress(self, side: _Replicated, shipped: int) -> None:
        p = side.vol.progress
        if p is not None and side.dirty is not None and side.unchecked is None:
            p.done_bytes += shipped
            p.total_bytes = p.done_bytes + side.dirty.dirty_bytes

    async def _finish_sync(self, side: _Replicated, overflows: int) -> None:
        """Once everything shipped is durable over there, the volume is Protected, unless the
        buffer overflowed meanwhile (then the regions are being shipped again)."""
        await self.buffer.wait_acked(self.buffer.last_seq)
        if side.overflows != overflows or not side.streaming or side.vol.synced:
            return
        if side.unchecked is not None:
            return  # a delta sync still compares: it finishes the sync
        assert side.dirty is not None
        if side.dirty.dirty_regions:
            return
        vol = side.vol
        if vol.progress is not None:
            vol.progress.finished = time.monotonic()
        log.info(
            "vpg=%s volume=%s event=sync-done from=%s seconds=%.1f",
            self.name,
            vol.spec.name,
            vol.state,
            time.time() - (side.syncing_since or time.time()),
        )
        vol.state, vol.reason = SyncState.PROTECTED, ""
        side.syncing_since = None
        await self._state.set_synced(vol.spec.name, True)

    # -- mirror targets ----------------------------------------------------------------------

    # -- checkpoint holds ---------------------------------------------------------------------

    async def _on_hold(self, request: int) -> int:
        await self._mirrors.confirm()  # a mirror job stopped just now must not be vouched for
        self.gate.close(request)
        try:
            seq = self.buffer.append_mark(request, mark_payload(self.consistent, self.state))
        except BufferFull:
            self.gate.open(request)
            raise
        self._mark_seq = seq
        return seq

    def _mark_unsent(self) -> bool:
        return self.sender is not None and self._mark_seq > self.sender.sent_seq

    async def _on_release(self, request: int) -> None:
        self.gate.open(request)

    # -- status ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Disconnected, InitialSync, DeltaSync, BitmapSync, NotSynced or Protected."""
        if self.sender is None or not self.sender.connected:
            return "Disconnected"
        states = {v.state for v in self.volumes.values()}
        for s in (
            SyncState.INITIAL_SYNC,
            SyncState.DELTA_SYNC,
            SyncState.BITMAP_SYNC,
            SyncState.NOT_SYNCED,
        ):
            if s in states:
                return str(s)
        return str(SyncState.PROTECTED)

    def reason(self) -> str:
        if self.sender is None or not self.sender.connected:
            error = self.sender.last_error if self.sender is not None else ""
            return f"not connected to {self.spec.recovery}" + (f": {error}" if error else "")
        return "; ".join(
            f"{name}: {v.reason}" for name, v in self.volumes.items() if not v.synced and v.reason
        )

    def rpo_seconds(self) -> float:
        """How far the recovery side may be behind: the age of the oldest record it has not
        acknowledged, or of the oldest sync still running (its regions are not there yet)."""
        assert self.sender is not None
        lag = self.buffer.lag_seconds()
        starts = [s.syncing_since for s in self._sides.values() if s.syncing_since is not None]
        if starts:
            lag = max(lag, time.time() - min(starts))
        return lag

    async def _rate_loop(self) -> None:
        assert self.sender is not None
        last = time.monotonic()
        written, wire = self.buffer.appended_bytes, self.sender.metrics().wire_bytes_sent
        while True:
            await asyncio.sleep(_RATE_PERIOD)
            now = time.monotonic()
            m = self.sender.metrics()
            elapsed = max(now - last, 1e-6)
            self._rates["written"] = (m.appended_bytes - written) / elapsed
            self._rates["wire"] = (m.wire_bytes_sent - wire) / elapsed
            last, written, wire = now, m.appended_bytes, m.wire_bytes_sent

    def status(self) -> dict[str, Any]:
        """A JSON-able summary (`control.models.ProtectedVpgStatus`)."""
        assert self.sender is not None
        m = self.sender.metrics()
        b = self.buffer
        holds = self.gate.hold_seconds
        volumes: dict[str, Any] = {}
        for name, v in self.volumes.items():
            volumes[name] = volume_status(v)
            side = self._sides[name]
            volumes[name]["dirtyBytes"] = None if side.dirty is None else side.dirty.dirty_bytes
            if side.delta is not None:
                volumes[name]["deltaSync"] = _delta_status(side.delta, side.unchecked is not None)
        return {
            "vpg": self.name,
            "source": self.source,
            "recovery": self.spec.recovery,
            "priority": str(self.spec.priority),
            "state": self.state,
            "reason": self.reason(),
            "consistent": self.consistent,
            "connected": m.connected,
            "rpoSeconds": self.rpo_seconds(),
            "buffer": {
                "usedBytes": b.used_bytes,
                "capacityBytes": b.capacity_bytes,
                "usedPercent": round(100.0 * b.used_bytes / b.capacity_bytes, 1),
                "records": b.count,
                "spills": self.spills,
            },
            "throughput": {
                "writtenBytesPerSecond": round(self._rates["written"], 1),
                "wireBytesPerSecond": round(self._rates["wire"], 1),
            },
            "stream": {
                "sessions": m.sessions,
                "connectFailures": m.connect_failures,
                "lastError": m.last_error,
                "durableSeq": m.durable_seq,
                "sentSeq": m.sent_seq,
                "appendedBytes": m.appended_bytes,
                "payloadBytesSent": m.payload_bytes_sent,
                "wireBytesSent": m.wire_bytes_sent,
                "wireRatio": round(m.wire_ratio, 3),
                "holds": m.holds,
                "holdsExpired": m.holds_expired,
            },
            "holdMs": _percentiles(holds),
            "ackLatencyMs": _percentiles(b.ack_latencies),
            "volumes": volumes,
        }


def _delta_status(p: ResyncProgress, running: bool) -> dict[str, Any]:
    """`control.models.DeltaSyncStatus` of a volume's newest delta sync."""
    return {
        "running": running,
        "reason": p.reason,
        "totalBytes": p.total_bytes,
        "comparedBytes": p.done_bytes,
        "shippedBytes": p.changed_bytes,
        "blockBytes": DELTA_BLOCK,
        "etaSeconds": p.eta_seconds if running else 0.0,
    }


def _differing(local: bytes, remote: bytes, block: int, length: int) -> list[tuple[int, int]]:
    """Byte ranges (start, end) of the runs of blocks whose digests differ."""
    if local == remote:
        return []
    a = np.frombuffer(local, dtype=np.uint64).reshape(-1, DIGEST_SIZE // 8)
    b = np.frombuffer(remote, dtype=np.uint64).reshape(-1, DIGEST_SIZE // 8)
    idx = np.flatnonzero((a != b).any(axis=1))
    return [(s * block, min(e * block, length)) for s, e in index_runs(idx)]


def _percentiles(samples: Collection[float]) -> dict[str, float]:
    """count, p50_ms, p99_ms, max_ms (nearest rank) of durations in seconds."""
    if not samples:
        return {}
    ordered = np.sort(np.fromiter(samples, dtype=np.float64, count=len(samples)))

    def at(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) * 1e3

    return {
        "count": float(len(ordered)),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": float(ordered[-1]) * 1e3,
    }
